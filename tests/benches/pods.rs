//! `make bench` (pods): Bulwark pods through CRI, next to runc pods, in one run on one
//! private containerd (Debian's 1.6.20) with the `bulwark` handler and the node
//! configuration of the CRI suite.
//!
//! 1. Pod start to exit: RunPodSandbox -> CreateContainer -> StartContainer -> the exit seen
//!    through ContainerStatus (polled every 5 ms), for a Wasm hello-world with a warm module
//!    cache and with a cold one (the cache emptied before each round), and for a runc pod
//!    running busybox `echo hello`; rounds interleaved so machine noise hits every variant
//!    alike. Images are pulled beforehand. The full cycle (teardown included) is timed too.
//! 2. A serving pod's first answer: RunPodSandbox -> CreateContainer -> StartContainer ->
//!    the first `200` from the httpd wasi:http component (connecting every 5 ms), with a
//!    warm module cache.
//! 3. Memory per running pod: PSS (`/proc/PID/smaps_rollup`) of every shim and all its
//!    descendants with 10 and 100 sleeping pods (kubelet's default maximum is 110 per node),
//!    Bulwark's `sleep` guest next to busybox `sleep` under runc; the start throughput
//!    (pods reaching Running per second, 10 started at once) and containerd's own growth
//!    per pod.
//!
//! Runs as root; binaries from `make build`, guests from `make guests`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use bulwark_tests::harness::containerd;
use bulwark_tests::harness::cri::{
    ContainerSpec, ContainerState, ContainerStatus, Cri, LogStream, PodSpec,
};
use bulwark_tests::harness::node::{Format, HANDLER as BULWARK, NODE_CONFIG, Node};
use bulwark_tests::harness::process::{self, Memory, memory};
use bulwark_tests::percentile;
use futures::stream::{self, StreamExt};

/// Interleaved rounds of the start-to-exit comparison.
const ROUNDS: usize = 20;
/// How often ContainerStatus is polled for the exit.
const POLL: Duration = Duration::from_millis(5);
/// Pod counts of the memory comparison.
const MEMORY_PODS: [usize; 2] = [10, 100];
/// Pods started at once in the memory comparison (and its start throughput).
const START_CONCURRENCY: usize = 10;
/// Pods removed at once in the memory comparison.
const TEARDOWN_CONCURRENCY: usize = 5;
/// How long StartContainer may take before the bench gives up on it (CRI's own timeout
/// is two minutes).
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long every container may take to exit or to be running.
const CONTAINER_TIMEOUT: Duration = Duration::from_secs(60);
/// After all pods run: time for the workloads to settle before memory is read.
const SETTLE: Duration = Duration::from_secs(1);

const RUNC: &str = "";

/// StartContainer, given up on after [`START_TIMEOUT`] so that a hung start fails the bench
/// with a message instead of stalling it for CRI's two minutes.
async fn start_container(cri: &Cri, id: &str) -> Result<()> {
    tokio::time::timeout(START_TIMEOUT, cri.start_container(id))
        .await
        .map_err(|_| anyhow::anyhow!("StartContainer of {id} took over {START_TIMEOUT:?}"))?
}

fn handler_name(handler: &str) -> &str {
    if handler.is_empty() { "runc" } else { handler }
}

/// One pod run to its container's exit, in phases.
#[derive(Debug, Clone, Copy)]
struct Cycle {
    run_pod: Duration,
    create: Duration,
    start: Duration,
    /// From StartContainer's answer to the exit seen in ContainerStatus.
    to_exit: Duration,
    /// RemoveContainer, StopPodSandbox, RemovePodSandbox.
    teardown: Duration,
}

impl Cycle {
    fn start_to_exit(&self) -> Duration {
        self.run_pod + self.create + self.start + self.to_exit
    }

    fn full(&self) -> Duration {
        self.start_to_exit() + self.teardown
    }
}

/// Polls ContainerStatus every [`POLL`] until the container has exited; returns its status.
async fn wait_exited(cri: &Cri, id: &str) -> Result<ContainerStatus> {
    let deadline = Instant::now() + CONTAINER_TIMEOUT;
    loop {
        let status = cri.container_status(id).await?;
        if status.state() == ContainerState::ContainerExited {
            return Ok(status);
        }
        ensure!(
            Instant::now() < deadline,
            "container {id} has not exited after {CONTAINER_TIMEOUT:?}: state {:?}",
            status.state()
        );
        tokio::time::sleep(POLL).await;
    }
}

/// What the container wrote, for error messages and the output check.
async fn container_output(cri: &Cri, id: &str) -> String {
    match cri.read_container_log(id).await {
        Ok(lines) => lines
            .iter()
            .map(|line| {
                let stream = match line.stream {
                    LogStream::Stdout => "out",
                    LogStream::Stderr => "err",
                };
                format!("[{stream}] {}\n", line.text)
            })
            .collect(),
        Err(error) => format!("(no log: {error:#})"),
    }
}

/// Runs `container` in a new pod on `handler` to its exit (exit code 0 and `expect` on
/// stdout), then removes the container and the pod; times each phase.
async fn run_to_exit(
    node: &Node,
    handler: &str,
    container: &ContainerSpec,
    expect: &str,
) -> Result<Cycle> {
    let cri = &node.cri;
    let pod = PodSpec::new(format!("bench-{}", handler_name(handler))).runtime_handler(handler);
    let began = Instant::now();
    let pod_id = cri.run_pod(&pod).await?;
    let run_pod = began.elapsed();
    let inner = async {
        let began = Instant::now();
        let id = cri.create_container(&pod_id, &pod, container).await?;
        let create = began.elapsed();
        let began = Instant::now();
        let started = start_container(cri, &id).await;
        let start = began.elapsed();
        let waited = match started {
            Ok(()) => wait_exited(cri, &id).await.map(|status| (status, began.elapsed() - start)),
            Err(error) => Err(error),
        };
        // Not timed: the output check.
        let checked = match waited {
            Ok((status, to_exit)) => {
                let output = container_output(cri, &id).await;
                if status.exit_code != 0 || !output.contains(expect) {
                    Err(anyhow::anyhow!(
                        "{} container {} exited {} ({} {}), expected 0 and {expect:?}; its log:\n{output}",
                        handler_name(handler),
                        container.name,
                        status.exit_code,
                        status.reason,
                        status.message
                    ))
                } else {
                    Ok(to_exit)
                }
            }
            Err(error) => Err(error),
        };
        let began = Instant::now();
        let removed = cri.remove_container(&id).await;
        let remove = began.elapsed();
        // A failure to run says more than the failure to remove what did not run.
        let to_exit = checked?;
        removed?;
        anyhow::Ok((create, start, to_exit, remove))
    }
    .await;
    let began = Instant::now();
    let removed = async {
        cri.stop_pod(&pod_id).await?;
        cri.remove_pod(&pod_id).await
    }
    .await;
    let pod_teardown = began.elapsed();
    let (create, start, to_exit, remove) = inner?;
    removed?;
    Ok(Cycle {
        run_pod,
        create,
        start,
        to_exit,
        teardown: remove + pod_teardown,
    })
}

fn median(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("pods bench: cannot start Tokio: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(bench()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("pods bench failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn bench() -> Result<()> {
    let began = Instant::now();
    let node = Node::start(PathBuf::from(containerd::SYSTEM_CONTAINERD), NODE_CONFIG).await?;
    let result = async {
        print_conditions(&node);
        start_to_exit(&node).await?;
        first_response(&node).await?;
        memory_per_pod(&node).await
    }
    .await;
    match result {
        Ok(()) => {
            node.wait_no_shims().await?;
            node.containerd.stop()?;
            println!("(whole bench: {:.0} s)", began.elapsed().as_secs_f64());
            Ok(())
        }
        Err(error) => {
            // containerd's directory goes with the node: keep its log (the shims' too).
            let log = node.containerd.log_contents();
            let kept = std::env::temp_dir().join(format!(
                "bulwark-pods-bench-{}.containerd.log",
                std::process::id()
            ));
            match std::fs::write(&kept, &log) {
                Ok(()) => eprintln!("containerd's log (with the shims'): {}", kept.display()),
                Err(error) => eprintln!("cannot keep containerd's log: {error}"),
            }
            let problems: Vec<&str> = log
                .lines()
                .filter(|line| line.contains("level=error") || line.contains("level=warning"))
                .collect();
            eprintln!("its last errors and warnings:");
            for line in &problems[problems.len().saturating_sub(20)..] {
                eprintln!("  {line}");
            }
            // Dropping the node removes what is left and stops everything by PID.
            Err(error)
        }
    }
}

fn first_line(command: &str, arg: &str) -> String {
    Command::new(command)
        .arg(arg)
        .output()
        .ok()
        .and_then(|output| {
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| format!("{command}: unknown"))
}

fn print_conditions(node: &Node) {
    let (cpu, kernel) = bulwark_tests::machine();
    let cgroups = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "cgroup v2"
    } else {
        "cgroup v1"
    };
    println!("# Bulwark pods through CRI");
    println!(
        "conditions: {cpu}, {} cores, Linux {}, {cgroups}, containerd {} (private instance, CRI v1), {}, release build; pods on the host network as kubelet sends them; images pulled beforehand",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel,
        node.containerd.version(),
        first_line("runc", "--version"),
    );
    println!();
}

async fn start_to_exit(node: &Node) -> Result<()> {
    let hello_image = node.push_guest("hello", Format::Layer)?;
    for image in [&node.images.pause, &node.images.busybox, &hello_image] {
        node.cri.pull(image).await?;
    }
    let hello = ContainerSpec::new("hello", hello_image);
    let echo =
        ContainerSpec::new("echo", node.images.busybox.clone()).command(["/bin/echo", "hello"]);
    let hello_out = "hello from bulwark";

    // The first pod of each handler: binaries and images not yet in the page cache, and
    // for Bulwark an empty module cache (the cold compile).
    let first_bulwark = run_to_exit(node, BULWARK, &hello, hello_out).await?;
    let first_runc = run_to_exit(node, RUNC, &echo, "hello").await?;

    #[derive(Clone, Copy)]
    enum Variant {
        Warm,
        Cold,
        Runc,
    }
    let order = [Variant::Warm, Variant::Runc, Variant::Cold];
    let mut warm = Vec::new();
    let mut cold = Vec::new();
    let mut runc = Vec::new();
    for round in 0..ROUNDS {
        // Rotate the order so that no variant always follows the same one.
        for step in 0..order.len() {
            match order[(round + step) % order.len()] {
                Variant::Warm => warm.push(run_to_exit(node, BULWARK, &hello, hello_out).await?),
                Variant::Cold => {
                    node.empty_cache()?;
                    cold.push(run_to_exit(node, BULWARK, &hello, hello_out).await?);
                }
                Variant::Runc => runc.push(run_to_exit(node, RUNC, &echo, "hello").await?),
            }
        }
    }

    let pick = |cycles: &[Cycle], f: fn(&Cycle) -> Duration| -> Vec<Duration> {
        cycles.iter().map(f).collect()
    };
    let runc_exit = median(&pick(&runc, Cycle::start_to_exit));
    let runc_full = median(&pick(&runc, Cycle::full));

    println!(
        "## 1. Pod start to exit through CRI: RunPodSandbox -> CreateContainer -> StartContainer -> exited in ContainerStatus"
    );
    println!(
        "| pod | n | start to exit median (ms) | p90 (ms) | vs runc | full cycle incl. teardown median (ms) | p90 (ms) | vs runc |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let row = |label: &str, cycles: &[Cycle]| {
        let exit = pick(cycles, Cycle::start_to_exit);
        let full = pick(cycles, Cycle::full);
        println!(
            "| {label} | {} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} | {:.2} |",
            cycles.len(),
            ms(median(&exit)),
            ms(percentile(&exit, 90.0)),
            median(&exit).as_secs_f64() / runc_exit.as_secs_f64(),
            ms(median(&full)),
            ms(percentile(&full, 90.0)),
            median(&full).as_secs_f64() / runc_full.as_secs_f64(),
        );
    };
    row("bulwark, hello.wasm, module cache warm", &warm);
    row(
        "bulwark, hello.wasm, module cache cold (emptied before each run)",
        &cold,
    );
    row("runc, busybox `echo hello`", &runc);
    row(
        "bulwark, first pod of the bench (cold cache, cold page cache)",
        &[first_bulwark],
    );
    row("runc, first pod of the bench", &[first_runc]);
    println!(
        "({ROUNDS} interleaved rounds, order rotated; ContainerStatus polled every {} ms; ratios > 1 are slower than runc)",
        POLL.as_millis()
    );
    println!();

    println!("### Phases (medians, ms)");
    println!(
        "| pod | RunPodSandbox | CreateContainer | StartContainer | start answered to exit seen | teardown (remove container, stop + remove pod) |"
    );
    println!("|---|---|---|---|---|---|");
    for (label, cycles) in [
        ("bulwark, warm cache", &warm),
        ("bulwark, cold cache", &cold),
        ("runc, busybox echo", &runc),
    ] {
        println!(
            "| {label} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            ms(median(&pick(cycles, |c| c.run_pod))),
            ms(median(&pick(cycles, |c| c.create))),
            ms(median(&pick(cycles, |c| c.start))),
            ms(median(&pick(cycles, |c| c.to_exit))),
            ms(median(&pick(cycles, |c| c.teardown))),
        );
    }
    println!();
    node.wait_no_shims().await
}

/// Rounds of the serving pod's first-answer measurement.
const SERVING_ROUNDS: usize = 10;

async fn first_response(node: &Node) -> Result<()> {
    let image = node.push_component("httpd", Format::Layer)?;
    node.cri.pull(&image).await?;
    let container = ContainerSpec::new("httpd", image);
    let mut samples = Vec::new();
    // The first round compiles the component into the cache; it is not counted.
    for round in 0..=SERVING_ROUNDS {
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], 18_080 + round as u16));
        let listen = address.to_string();
        let pod = PodSpec::new(format!("bench-serving-{round}"))
            .runtime_handler(BULWARK)
            .annotation("bulwark.dev/listen", listen);
        let began = Instant::now();
        let pod_id = node.cri.run_pod(&pod).await?;
        let id = node.cri.create_container(&pod_id, &pod, &container).await?;
        start_container(&node.cri, &id).await?;
        let answered = loop {
            let response = tokio::task::spawn_blocking(move || {
                bulwark_tests::http::get(address, "/", Duration::from_secs(5))
            })
            .await?;
            if let Ok(response) = response
                && response.status == 200
            {
                break began.elapsed();
            }
            ensure!(
                began.elapsed() < CONTAINER_TIMEOUT,
                "no answer from {address}: {}",
                container_output(&node.cri, &id).await
            );
            tokio::time::sleep(POLL).await;
        };
        if round > 0 {
            samples.push(answered);
        }
        node.cri.tear_down(&pod_id, &[&id]).await?;
    }
    println!(
        "## 2. A serving pod's first answer through CRI: RunPodSandbox -> CreateContainer -> StartContainer -> first 200 from httpd.wasm"
    );
    println!(
        "median {:.1} ms, p90 {:.1} ms ({SERVING_ROUNDS} pods one after another, module cache warm, connecting every {} ms; host network)",
        ms(median(&samples)),
        ms(percentile(&samples, 90.0)),
        POLL.as_millis()
    );
    println!();
    node.wait_no_shims().await?;
    python_first_answer(node).await?;
    hostile_clients(node).await
}

/// The CPython service under attack (`bulwark_tests::attack`): what its normal clients get
/// while slow and non-reading clients try to hold it, with the node's `[serving]` defaults.
async fn hostile_clients(node: &Node) -> Result<()> {
    let image = node.push_component("pyhttp", Format::Layer)?;
    node.cri.pull(&image).await?;
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], 18_400));
    let pod = PodSpec::new("bench-python-attacked")
        .runtime_handler(BULWARK)
        .annotation("bulwark.dev/listen", address.to_string())
        .annotation("bulwark.dev/concurrency", "4")
        .annotation("bulwark.dev/timeout", "5s");
    let container = ContainerSpec::new("app", image).memory_limit(512 << 20);
    let pod_id = node.cri.run_pod(&pod).await?;
    let id = node.cri.create_container(&pod_id, &pod, &container).await?;
    start_container(&node.cri, &id).await?;
    first_200(address, Instant::now()).await?;
    let figures = tokio::task::spawn_blocking(move || {
        bulwark_tests::attack::attack(address, Duration::from_secs(8))
    })
    .await??;
    println!(
        "### Hostile clients: the CPython service (concurrency 4, timeout 5s, 512Mi, [serving] defaults: head_timeout 10s, 80 connections)"
    );
    println!("{figures}");
    println!();
    node.cri.tear_down(&pod_id, &[&id]).await?;
    Ok(())
}

/// Rounds of the Python component's first answer, cold and warm each.
const PYTHON_ROUNDS: usize = 3;

/// The CPython component's first answer: a pod through CRI (512Mi, nothing asked) from a
/// node whose cache does not hold it and from one that does, next to `bulwark serve` and
/// `wasmtime serve` (where `make bench` built it) started cold and warm on the same
/// machine, interleaved.
async fn python_first_answer(node: &Node) -> Result<()> {
    let image = node.push_component("pyhttp", Format::Layer)?;
    node.cri.pull(&image).await?;
    let component = bulwark_tests::build_dir().join("components/pyhttp.wasm");
    let peer = bulwark_tests::build_dir().join("wasmtime/bin/wasmtime");
    let bulwark = bulwark_tests::harness::node::bulwark_binary()?;
    let mut rows: Vec<(String, Vec<Duration>)> = Vec::new();
    let mut record =
        |label: &str, took: Duration| match rows.iter_mut().find(|(name, _)| name == label) {
            Some((_, samples)) => samples.push(took),
            None => rows.push((label.to_owned(), vec![took])),
        };
    for round in 0..PYTHON_ROUNDS {
        for cold in [true, false] {
            let temperature = if cold { "cold" } else { "warm" };
            // Through CRI.
            if cold {
                node.empty_cache()?;
            }
            let address = std::net::SocketAddr::from(([127, 0, 0, 1], 18_200 + round as u16));
            let pod = PodSpec::new(format!("bench-python-{temperature}-{round}"))
                .runtime_handler(BULWARK)
                .annotation("bulwark.dev/listen", address.to_string());
            let container = ContainerSpec::new("app", image.clone()).memory_limit(512 << 20);
            let began = Instant::now();
            let pod_id = node.cri.run_pod(&pod).await?;
            let id = node.cri.create_container(&pod_id, &pod, &container).await?;
            start_container(&node.cri, &id).await?;
            let took = first_200(address, began).await?;
            record(&format!("pod through CRI, cache {temperature}"), took);
            node.cri.tear_down(&pod_id, &[&id]).await?;
            // The same on the command line, Bulwark's and the peer's.
            let cache = tempfile::tempdir()?;
            let mut servers = vec![(
                "bulwark serve",
                bulwark.clone(),
                vec![
                    "serve".to_owned(),
                    "--cache-dir".to_owned(),
                    cache.path().join("cache").display().to_string(),
                ],
            )];
            if peer.exists() {
                servers.push((
                    "wasmtime serve",
                    peer.clone(),
                    vec!["serve".into(), "-Scli".into()],
                ));
            }
            for (name, program, args) in servers {
                // Cold: a cache of its own, empty; warm: the same cache, once filled.
                let runs = if cold { 1 } else { 2 };
                for run in 0..runs {
                    let address = std::net::SocketAddr::from((
                        [127, 0, 0, 1],
                        18_300 + (round * 4 + run) as u16,
                    ));
                    let listen = match name {
                        "wasmtime serve" => vec!["--addr".to_owned(), address.to_string()],
                        _ => vec!["--listen".to_owned(), address.to_string()],
                    };
                    let began = Instant::now();
                    let mut child = Command::new(&program)
                        .args(&args)
                        .args(&listen)
                        .arg(&component)
                        .env("XDG_CACHE_HOME", cache.path())
                        .env("XDG_CONFIG_HOME", cache.path())
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .spawn()?;
                    let took = first_200(address, began).await;
                    let _ = child.kill();
                    let _ = child.wait();
                    if run == runs - 1 {
                        record(&format!("{name}, cache {temperature}"), took?);
                    }
                }
            }
        }
    }
    println!(
        "### The CPython component's first answer (pyhttp.wasm, {} MiB): from start to the first 200",
        std::fs::metadata(&component)?.len() >> 20
    );
    println!("| server | n | median (ms) | min (ms) | max (ms) |");
    println!("|---|---|---|---|---|");
    for (label, samples) in &rows {
        let sorted = {
            let mut sorted = samples.clone();
            sorted.sort();
            sorted
        };
        println!(
            "| {label} | {} | {:.0} | {:.0} | {:.0} |",
            samples.len(),
            ms(median(samples)),
            ms(sorted[0]),
            ms(sorted[sorted.len() - 1]),
        );
    }
    println!(
        "(pods: RunPodSandbox to the first 200, 512Mi, no bulwark.dev annotation, host network; servers: process start to the first 200; cold = no compiled artifact anywhere, warm = the server's own cache holds it; {PYTHON_ROUNDS} interleaved rounds{})",
        if peer.exists() {
            ""
        } else {
            "; wasmtime serve not built (make bench builds it)"
        }
    );
    println!();
    node.wait_no_shims().await
}

/// How long after `began` the first `200` came from `address`.
async fn first_200(address: std::net::SocketAddr, began: Instant) -> Result<Duration> {
    loop {
        let response = tokio::task::spawn_blocking(move || {
            bulwark_tests::http::get(address, "/", Duration::from_secs(5))
        })
        .await?;
        if let Ok(response) = response
            && response.status == 200
        {
            return Ok(began.elapsed());
        }
        ensure!(
            began.elapsed() < CONTAINER_TIMEOUT,
            "no answer from {address} within {CONTAINER_TIMEOUT:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// The processes of one role (shim, workload process, pause, ...) in a measurement.
#[derive(Debug, Default)]
struct Group {
    count: usize,
    sum: Memory,
    min_pss: Option<u64>,
    max_pss: u64,
}

impl Group {
    fn add(&mut self, memory: Memory) {
        self.count += 1;
        self.sum += memory;
        self.min_pss = Some(self.min_pss.map_or(memory.pss, |min| min.min(memory.pss)));
        self.max_pss = self.max_pss.max(memory.pss);
    }
}

/// What a process is, for the breakdown: the shim, Bulwark's workload process, or the
/// command name (pause, sleep).
fn role(pid: u32, shims: &BTreeSet<u32>) -> String {
    if shims.contains(&pid) {
        return "shim".into();
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    if args.get(1) == Some(&&b"workload"[..]) {
        return "workload process".into();
    }
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|comm| comm.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}

/// A running pod of the memory comparison.
struct Running {
    pod_id: String,
    container_id: String,
}

/// Starts one sleeping pod; a pod whose container failed is removed again.
async fn start_sleeper(
    node: &Node,
    handler: &str,
    container: &ContainerSpec,
    index: usize,
) -> Result<Running> {
    let pod =
        PodSpec::new(format!("sleeper-{}-{index}", handler_name(handler))).runtime_handler(handler);
    let pod_id = node.cri.run_pod(&pod).await?;
    let started = async {
        let id = node.cri.create_container(&pod_id, &pod, container).await?;
        if let Err(error) = start_container(&node.cri, &id).await {
            let _ = node.cri.remove_container(&id).await;
            return Err(error);
        }
        Ok(id)
    }
    .await;
    match started {
        Ok(container_id) => Ok(Running {
            pod_id,
            container_id,
        }),
        Err(error) => {
            let _ = node.cri.stop_pod(&pod_id).await;
            let _ = node.cri.remove_pod(&pod_id).await;
            Err(error)
        }
    }
}

async fn wait_running(node: &Node, running: &Running) -> Result<()> {
    let deadline = Instant::now() + CONTAINER_TIMEOUT;
    loop {
        let status = node.cri.container_status(&running.container_id).await?;
        match status.state() {
            ContainerState::ContainerRunning => return Ok(()),
            ContainerState::ContainerExited => {
                let output = container_output(&node.cri, &running.container_id).await;
                bail!(
                    "container {} exited {} ({} {}) instead of sleeping; its log:\n{output}",
                    running.container_id,
                    status.exit_code,
                    status.reason,
                    status.message
                );
            }
            _ => {}
        }
        ensure!(
            Instant::now() < deadline,
            "container {} is not running after {CONTAINER_TIMEOUT:?}",
            running.container_id
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn teardown(node: &Node, running: &[Running]) -> Result<()> {
    let results: Vec<Result<()>> = stream::iter(running)
        .map(|pod| async move {
            // Timeout 0: SIGKILL at once (busybox `sleep` as PID 1 ignores SIGTERM).
            node.cri
                .stop_container(&pod.container_id, Duration::ZERO)
                .await?;
            node.cri.remove_container(&pod.container_id).await?;
            node.cri.stop_pod(&pod.pod_id).await?;
            node.cri.remove_pod(&pod.pod_id).await
        })
        .buffer_unordered(TEARDOWN_CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect::<Result<()>>()?;
    node.wait_no_shims().await
}

/// One line of the memory table.
struct MemoryRow {
    pods: usize,
    shims: usize,
    processes: usize,
    total: Memory,
    by_role: BTreeMap<String, Group>,
    start_all: Duration,
    /// containerd's PSS with the pods running, less before they started (KiB).
    containerd_growth: i64,
}

async fn measure_memory(
    node: &Node,
    handler: &str,
    container: &ContainerSpec,
    pods: usize,
) -> Result<MemoryRow> {
    let containerd_before = memory(node.containerd.pid())?.pss as i64;
    let began = Instant::now();
    let results: Vec<Result<Running>> = stream::iter(0..pods)
        .map(|index| start_sleeper(node, handler, container, index))
        .buffer_unordered(START_CONCURRENCY)
        .collect()
        .await;
    let mut running = Vec::new();
    let mut errors = Vec::new();
    for result in results {
        match result {
            Ok(pod) => running.push(pod),
            Err(error) => errors.push(format!("{error:#}")),
        }
    }
    let measured = async {
        ensure!(
            errors.is_empty(),
            "{} of {pods} {} pods failed to start: {}",
            errors.len(),
            handler_name(handler),
            errors.join("; ")
        );
        for pod in &running {
            wait_running(node, pod).await?;
        }
        let start_all = began.elapsed();
        tokio::time::sleep(SETTLE).await;
        let shims: BTreeSet<u32> = node.containerd.shim_pids().into_iter().collect();
        let mut pids = shims.clone();
        for &shim in &shims {
            pids.extend(process::descendants(shim));
        }
        let mut total = Memory::default();
        let mut by_role: BTreeMap<String, Group> = BTreeMap::new();
        for &pid in &pids {
            let memory = memory(pid)?;
            total += memory;
            by_role.entry(role(pid, &shims)).or_default().add(memory);
        }
        Ok(MemoryRow {
            pods,
            shims: shims.len(),
            processes: pids.len(),
            total,
            by_role,
            start_all,
            containerd_growth: memory(node.containerd.pid())?.pss as i64 - containerd_before,
        })
    }
    .await;
    let removed = teardown(node, &running).await;
    let row = measured?;
    removed?;
    Ok(row)
}

async fn memory_per_pod(node: &Node) -> Result<()> {
    let sleep_image = node.push_guest("sleep", Format::Layer)?;
    node.cri.pull(&sleep_image).await?;
    // Not measured: the first run compiles sleep.wasm into the module cache. A process that
    // compiled keeps the compiler's heap; every measured pod loads the cached artifact.
    let once = ContainerSpec::new("sleep", sleep_image.clone()).args(["1"]);
    run_to_exit(node, BULWARK, &once, "slept 1 ms").await?;
    node.wait_no_shims().await?;
    let wasm = ContainerSpec::new("sleep", sleep_image).args(["600000"]);
    let busybox =
        ContainerSpec::new("sleep", node.images.busybox.clone()).command(["/bin/sleep", "600"]);

    let mut rows = Vec::new();
    for pods in MEMORY_PODS {
        for (label, handler, container) in [
            ("bulwark, sleep.wasm", BULWARK, &wasm),
            ("runc, busybox `sleep 600`", RUNC, &busybox),
        ] {
            rows.push((label, measure_memory(node, handler, container, pods).await?));
        }
    }

    let mib = |kib: u64, pods: usize| kib as f64 / 1024.0 / pods as f64;
    println!(
        "## 3. Memory per running pod: PSS of the shims and all their descendants (/proc/PID/smaps_rollup)"
    );
    println!(
        "| pod | pods | processes per pod | PSS per pod (MiB) | anon / file (MiB) | USS per pod (MiB) | RSS per pod (MiB) | all running after (s) | pods Running per s | containerd growth per pod (KiB) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (label, row) in &rows {
        let n = row.pods;
        println!(
            "| {label} | {n} | {:.2} | {:.2} | {:.2} / {:.2} | {:.2} | {:.2} | {:.1} | {:.1} | {} |",
            row.processes as f64 / n as f64,
            mib(row.total.pss, n),
            mib(row.total.pss_anon, n),
            mib(row.total.pss_file, n),
            mib(row.total.private, n),
            mib(row.total.rss, n),
            row.start_all.as_secs_f64(),
            n as f64 / row.start_all.as_secs_f64(),
            row.containerd_growth / n as i64,
        );
    }
    println!(
        "(USS = Private_Clean + Private_Dirty; PSS shares each page among the processes mapping it, so shared binary pages get cheaper with more pods; pods started {START_CONCURRENCY} at a time, RunPodSandbox to Running; read {} s after all were running)",
        SETTLE.as_secs()
    );
    println!();
    println!("### Per process (means, KiB)");
    println!(
        "| pod | pods | process | count | threads | PSS | PSS min-max | PSS anon | PSS file | USS | RSS |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (label, row) in &rows {
        if row.shims != row.pods {
            println!(
                "| {label} | {} | ({} shims for {} pods) | | | | | | | | |",
                row.pods, row.shims, row.pods
            );
        }
        for (role, group) in &row.by_role {
            let each = |kib: u64| kib / group.count as u64;
            let memory = &group.sum;
            println!(
                "| {label} | {} | {role} | {} | {:.1} | {} | {}-{} | {} | {} | {} | {} |",
                row.pods,
                group.count,
                memory.threads as f64 / group.count as f64,
                each(memory.pss),
                group.min_pss.unwrap_or(0),
                group.max_pss,
                each(memory.pss_anon),
                each(memory.pss_file),
                each(memory.private),
                each(memory.rss),
            );
        }
    }
    println!();
    Ok(())
}
