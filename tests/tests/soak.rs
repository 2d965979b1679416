//! The churn soak: pod lifecycles through CRI the way kubelet drives them (RunPodSandbox,
//! CreateContainer, StartContainer, the exit or a request, StopContainer, RemoveContainer,
//! StopPodSandbox, RemovePodSandbox), [`CONCURRENCY`] at a time, on containerd 1.7.24 with
//! a CNI pod network, with runc pods among them for comparison. Every lifecycle checks its
//! own result; at the end nothing may be left (shims, sockets, mounts, cgroups) and no
//! lifecycle may have failed.
//!
//! `BULWARK_SOAK_LIFECYCLES` sets how many (default 200, what `make test` and CI run);
//! `make soak` runs 2,000. It prints the start latency (RunPodSandbox to StartContainer
//! returned) and containerd's and the shims' memory over time.
//!
//! Runs as root; binaries from `make build`, guests from `make guests components`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bulwark_tests::harness::containerd;
use bulwark_tests::harness::cri::{ContainerSpec, PodSpec, SecurityContext};
use bulwark_tests::harness::node::{Format, HANDLER, NODE_CONFIG, Node, NodeOptions};
use bulwark_tests::harness::process::{Memory, memory};
use bulwark_tests::http::{get, wait_listening};
use bulwark_tests::percentile;
use futures::stream::{self, StreamExt};

/// Lifecycles in flight at once.
const CONCURRENCY: usize = 10;
/// How long a container may take to exit, or a serving pod to answer.
const CONTAINER_TIMEOUT: Duration = Duration::from_secs(60);

/// What one lifecycle runs, in turn.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// The hello guest, packaged as a layer in an ordinary image.
    Hello,
    /// The hello guest as an OCI Wasm artifact.
    Artifact,
    /// hello as uid 65532 under Pod Security "restricted".
    Restricted,
    /// A loop stopped by `bulwark.dev/fuel`.
    Fuel,
    /// A loop stopped by `bulwark.dev/timeout`.
    Timeout,
    /// A memory bomb stopped by `bulwark.dev/memory`.
    Memory,
    /// A guest reading a preopened hostPath volume.
    Volume,
    /// The httpd wasi:http component, answering one request, then stopped.
    Serving,
    /// busybox `echo` under runc: the same churn through the same containerd, side by side.
    Runc,
}

const KINDS: [Kind; 9] = [
    Kind::Hello,
    Kind::Artifact,
    Kind::Restricted,
    Kind::Fuel,
    Kind::Timeout,
    Kind::Memory,
    Kind::Volume,
    Kind::Serving,
    Kind::Runc,
];

/// The images of the mix, pushed and pulled once.
struct Images {
    hello: String,
    artifact: String,
    looping: String,
    membomb: String,
    fileio: String,
    httpd: String,
    busybox: String,
}

/// How the container of one lifecycle is expected to end.
enum Expect {
    /// Exit code and what stdout, or stderr's last line, must contain.
    Exit(i32, &'static str),
    /// A `200` to `GET /` on the pod's IP, then a clean stop.
    Answer,
}

fn lifecycle_of(
    kind: Kind,
    index: usize,
    images: &Images,
    volume: &std::path::Path,
) -> (PodSpec, ContainerSpec, Expect) {
    let name = format!("soak-{index}");
    let pod = PodSpec::new(&name).pod_network().runtime_handler(HANDLER);
    let container = |image: &String| ContainerSpec::new("main", image.clone());
    match kind {
        Kind::Hello => (
            pod,
            container(&images.hello),
            Expect::Exit(0, "hello from bulwark"),
        ),
        Kind::Artifact => (
            pod,
            container(&images.artifact).command(["hello.wasm"]),
            Expect::Exit(0, "hello from bulwark"),
        ),
        Kind::Restricted => (
            pod,
            container(&images.hello).security(SecurityContext::restricted(Some(65532))),
            Expect::Exit(0, "hello from bulwark"),
        ),
        Kind::Fuel => (
            pod.annotation("bulwark.dev/fuel", "1000000"),
            container(&images.looping),
            Expect::Exit(152, "fuel exhausted after 1000000 units (bulwark.dev/fuel)"),
        ),
        Kind::Timeout => (
            pod.annotation("bulwark.dev/timeout", "200ms"),
            container(&images.looping),
            Expect::Exit(124, "deadline of 200ms exceeded (bulwark.dev/timeout)"),
        ),
        Kind::Memory => (
            pod.annotation("bulwark.dev/memory", "16Mi"),
            container(&images.membomb),
            Expect::Exit(137, "memory limit of 16Mi reached (bulwark.dev/memory)"),
        ),
        Kind::Volume => (
            pod.annotation("bulwark.dev/dirs", "/data:ro"),
            container(&images.fileio)
                .args(["read", "/data/input.txt"])
                .mount(volume, "/data", true),
            Expect::Exit(0, "from the volume"),
        ),
        Kind::Serving => (
            pod,
            container(&images.httpd).security(SecurityContext::restricted(Some(65532))),
            Expect::Answer,
        ),
        Kind::Runc => (
            PodSpec::new(&name).pod_network(),
            container(&images.busybox).command(["/bin/busybox", "echo", "hello from runc"]),
            Expect::Exit(0, "hello from runc"),
        ),
    }
}

/// Runs one lifecycle to its end, tearing the pod down whatever happened; returns the
/// start latency (RunPodSandbox to StartContainer returned).
async fn lifecycle(
    node: &Node,
    pod: PodSpec,
    container: ContainerSpec,
    expect: Expect,
) -> Result<Duration> {
    let started = Instant::now();
    let pod_id = node.cri.run_pod(&pod).await?;
    let result = async {
        let id = node.cri.create_container(&pod_id, &pod, &container).await?;
        let outcome = async {
            node.cri.start_container(&id).await?;
            let latency = started.elapsed();
            match expect {
                Expect::Exit(code, wanted) => {
                    let done = node.finished(&id, CONTAINER_TIMEOUT).await?;
                    ensure!(
                        done.exit.exit_code == code
                            && (done.stdout.contains(wanted) || done.stderr.contains(wanted)),
                        "exited {} (expected {code} with {wanted:?}); stdout {:?}, stderr {:?}",
                        done.exit.exit_code,
                        done.stdout,
                        done.stderr
                    );
                }
                Expect::Answer => {
                    let address = std::net::SocketAddr::new(node.cri.pod_ip(&pod_id).await?, 8080);
                    let response = tokio::task::spawn_blocking(move || {
                        wait_listening(address, CONTAINER_TIMEOUT)?;
                        get(address, "/", CONTAINER_TIMEOUT)
                    })
                    .await??;
                    ensure!(response.status == 200, "GET / answered {}", response.status);
                    node.cri
                        .stop_container(&id, Duration::from_secs(10))
                        .await?;
                }
            }
            Ok(latency)
        }
        .await;
        node.cri.remove_container(&id).await?;
        outcome
    }
    .await;
    node.cri.stop_pod(&pod_id).await?;
    node.cri.remove_pod(&pod_id).await?;
    result
}

/// KiB as MiB.
fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// containerd's memory, and the shims' (with their workloads) and how many there are.
fn node_memory(node: &Node) -> (Memory, Memory, usize) {
    let containerd = memory(node.containerd.pid()).unwrap_or_default();
    let mut shims = Memory::default();
    let pids = node.containerd.shim_pids();
    for shim in &pids {
        for pid in std::iter::once(*shim).chain(bulwark_tests::harness::process::descendants(*shim))
        {
            // A process may end between the listing and the read.
            shims += memory(pid).unwrap_or_default();
        }
    }
    (containerd, shims, pids.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_lifecycles_churn_without_a_failure_or_a_leak() -> Result<()> {
    let lifecycles: usize = match std::env::var("BULWARK_SOAK_LIFECYCLES") {
        Ok(text) => text.parse().with_context(|| {
            format!("BULWARK_SOAK_LIFECYCLES: {text:?} is not a number of lifecycles")
        })?,
        Err(_) => 200,
    };
    ensure!(lifecycles > 0, "BULWARK_SOAK_LIFECYCLES must be at least 1");
    // OCI Wasm artifacts need containerd >= 1.7.7.
    let binary = tokio::task::spawn_blocking(|| containerd::fetch("1.7.24")).await??;
    let config = NODE_CONFIG.replace("allow_network = false", "allow_network = true");
    let node = Node::start_with(NodeOptions::new(binary, &config).pod_network()).await?;
    let images = Images {
        hello: node.push_guest("hello", Format::Layer)?,
        artifact: node.push_guest("hello", Format::Artifact)?,
        looping: node.push_guest("loop", Format::Layer)?,
        membomb: node.push_guest("membomb", Format::Layer)?,
        fileio: node.push_guest("fileio", Format::Layer)?,
        httpd: node.push_component("httpd", Format::Layer)?,
        busybox: node.images.busybox.clone(),
    };
    for image in [
        &images.hello,
        &images.artifact,
        &images.looping,
        &images.membomb,
        &images.fileio,
        &images.httpd,
        &images.busybox,
    ] {
        node.cri.pull(image).await?;
    }
    let volume = node.temp().join("volume");
    std::fs::create_dir(&volume)?;
    std::fs::write(volume.join("input.txt"), "from the volume\n")?;

    let (containerd_before, _, _) = node_memory(&node);
    println!(
        "soak: {lifecycles} lifecycles, {CONCURRENCY} at a time, containerd {} with a CNI pod network; kinds in turn: {KINDS:?}",
        node.containerd.version()
    );
    println!(
        "{:>10} {:>12} {:>16} {:>7} {:>12}",
        "done", "elapsed s", "containerd PSS", "shims", "shims PSS"
    );
    let report_every = (lifecycles / 10).max(1);
    let done = AtomicUsize::new(0);
    let began = Instant::now();
    let results: Vec<(usize, Kind, Result<Duration>)> = stream::iter(0..lifecycles)
        .map(|index| {
            let (node, images, volume, done) = (&node, &images, &volume, &done);
            async move {
                let kind = KINDS[index % KINDS.len()];
                let (pod, container, expect) = lifecycle_of(kind, index, images, volume);
                let result = lifecycle(node, pod, container, expect).await;
                let finished = done.fetch_add(1, Ordering::SeqCst) + 1;
                if finished % report_every == 0 {
                    let (containerd, shims, count) = node_memory(node);
                    println!(
                        "{finished:>10} {:>12.1} {:>12.1} MiB {count:>7} {:>8.1} MiB",
                        began.elapsed().as_secs_f64(),
                        mib(containerd.pss),
                        mib(shims.pss)
                    );
                }
                (index, kind, result)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let elapsed = began.elapsed();

    let (mut wasm, mut runc) = (Vec::new(), Vec::new());
    let mut failures = Vec::new();
    for (index, kind, result) in results {
        match result {
            Ok(latency) if matches!(kind, Kind::Runc) => runc.push(latency),
            Ok(latency) => wasm.push(latency),
            Err(error) => failures.push(format!("lifecycle {index} ({kind:?}): {error:#}")),
        }
    }
    println!(
        "start latency (RunPodSandbox -> StartContainer returned), {:.1} lifecycles/s:",
        lifecycles as f64 / elapsed.as_secs_f64()
    );
    for (what, latencies) in [("Wasm pods", &wasm), ("runc pods", &runc)] {
        if latencies.is_empty() {
            continue;
        }
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "  {what:<9} {:>5}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            latencies.len(),
            ms(percentile(latencies, 50.0)),
            ms(percentile(latencies, 99.0)),
            latencies.iter().max().map_or(0.0, |d| ms(*d))
        );
    }
    // The leak check first: a failed lifecycle may be what left something behind.
    let clean = node.assert_clean().await;
    let (containerd_after, _, _) = node_memory(&node);
    println!(
        "containerd PSS {:.1} MiB before, {:.1} MiB after ({:+.1} KiB per lifecycle)",
        mib(containerd_before.pss),
        mib(containerd_after.pss),
        (containerd_after.pss as f64 - containerd_before.pss as f64) / lifecycles as f64
    );
    if !failures.is_empty() {
        bail!(
            "{} of {lifecycles} lifecycles failed; the first: {:#?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
    }
    clean?;
    node.containerd.stop()
}
