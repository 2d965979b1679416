//! Bulwark through CRI, the way kubelet drives it: a private containerd (Debian's 1.6.20,
//! and 1.7.24 for OCI Wasm artifacts), a local registry, the `bulwark` handler with its
//! `pod_annotations` allow-list and node configuration, real pods.
//!
//! Run with `make test` (as root; guests from `make guests`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use bulwark_tests::harness::cgroups;
use bulwark_tests::harness::containerd;
use bulwark_tests::harness::cri::{ContainerSpec, PodSpec, SecurityContext};
use bulwark_tests::harness::node::{Finished, Format, HANDLER, NODE_CONFIG, Node, annotated};
use bulwark_tests::http::logfmt_value;
use tokio::sync::Mutex;

mod big_modules;
mod faults;
mod hostile_images;
mod isolation;
mod processes;
mod resilience;
mod serving;

/// One containerd at a time: they share /run/containerd/s and the machine's 2 cores.
static ONE_CONTAINERD: Mutex<()> = Mutex::const_new(());

fn pod(name: &str) -> PodSpec {
    PodSpec::new(name)
}

/// Which containerd the suite runs on: Debian 12's 1.6.20, or the version named by
/// `BULWARK_TEST_CONTAINERD` (1.7.24 or 2.1.9, fetched on first use; `make test-matrix`).
pub(crate) async fn suite_containerd() -> Result<PathBuf> {
    Ok(match std::env::var("BULWARK_TEST_CONTAINERD") {
        Ok(version) if !version.is_empty() => {
            tokio::task::spawn_blocking(move || containerd::fetch(&version)).await??
        }
        _ => PathBuf::from(containerd::SYSTEM_CONTAINERD),
    })
}

/// A node on the suite's containerd with the tests' node configuration.
async fn system_node() -> Result<Node> {
    Node::start(suite_containerd().await?, NODE_CONFIG).await
}

/// Fails unless a run ended with `code` and `reason` on stderr and in the termination
/// message (which `kubectl describe` shows).
fn assert_limit_fired(what: &str, done: &Finished, code: i32, reason: &str) {
    assert_eq!(done.exit.exit_code, code, "{what}: {}", done.stderr);
    assert!(
        done.stderr.contains(&format!("bulwark: {reason}")),
        "{what}: {}",
        done.stderr
    );
    assert!(
        done.exit.termination_message.starts_with(reason),
        "{what}: termination message {:?}",
        done.exit.termination_message
    );
    assert_eq!(done.exit.reason, "Error", "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wasm_pod_runs_and_its_output_reaches_the_log() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let node = system_node().await?;
    let hello = node.push_guest("hello", Format::Layer)?;
    let done = node
        .run(pod("hello"), ContainerSpec::new("hello", hello))
        .await?;
    assert_eq!(done.exit.exit_code, 0, "{}", done.stderr);
    assert_eq!(done.exit.reason, "Completed");
    assert_eq!(done.stdout, "hello from bulwark\n");

    // args, env, and the env allow-list from a pod annotation.
    let echo = node.push_guest("echo", Format::Layer)?;
    let container = ContainerSpec::new("echo", echo.clone())
        .args(["one", "two words"])
        .env("MODE", "fast")
        .env("SECRET", "hidden");
    let done = node.run(pod("echo"), container.clone()).await?;
    assert_eq!(done.exit.exit_code, 0, "{}", done.stderr);
    assert!(
        done.stdout
            .starts_with("arg[0]=/app.wasm\narg[1]=one\narg[2]=two words\n"),
        "{}",
        done.stdout
    );
    assert!(done.stdout.contains("env:MODE=fast\n") && done.stdout.contains("env:SECRET=hidden\n"));
    let done = node
        .run(
            annotated("echo-allow", &[("bulwark.dev/env", "MODE")]),
            container,
        )
        .await?;
    assert!(done.stdout.contains("env:MODE=fast\n"), "{}", done.stdout);
    assert!(!done.stdout.contains("SECRET"), "{}", done.stdout);
    assert!(
        !done.stdout.contains("PATH="),
        "the runtime's env leaked: {}",
        done.stdout
    );
    node.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_fire_with_their_exit_code_and_reason() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let node = system_node().await?;
    let looping = node.push_guest("loop", Format::Layer)?;
    let membomb = node.push_guest("membomb", Format::Layer)?;
    let stack = node.push_guest("stack", Format::Layer)?;
    let cases = [
        (
            "fuel",
            &looping,
            vec![("bulwark.dev/fuel", "1000000")],
            152,
            "fuel exhausted after 1000000 units (bulwark.dev/fuel)",
        ),
        (
            "timeout",
            &looping,
            vec![("bulwark.dev/timeout", "300ms")],
            124,
            "deadline of 300ms exceeded (bulwark.dev/timeout)",
        ),
        (
            "memory",
            &membomb,
            vec![("bulwark.dev/memory", "16Mi")],
            137,
            "memory limit of 16Mi reached (bulwark.dev/memory)",
        ),
        // No annotation: the node's default memory (128Mi) holds.
        (
            "default-memory",
            &membomb,
            vec![],
            137,
            "memory limit of 128Mi reached (node default)",
        ),
        (
            "trap",
            &stack,
            vec![],
            134,
            "trapped: wasm trap: call stack exhausted",
        ),
    ];
    for (name, image, annotations, code, reason) in cases {
        let done = node
            .run(
                annotated(name, &annotations),
                ContainerSpec::new(name, image.clone()),
            )
            .await?;
        assert_limit_fired(name, &done, code, reason);
    }

    // A pod memory limit and no annotation: the guest is bounded inside the limit and ends
    // with 137 and a reason, rather than the kernel OOM-killing its process; the node goes
    // on serving pods.
    let done = node
        .run(
            pod("pod-memory-limit"),
            ContainerSpec::new("pod-memory-limit", membomb.clone()).memory_limit(64 << 20),
        )
        .await?;
    assert_limit_fired(
        "pod memory limit",
        &done,
        137,
        "memory limit of 48Mi reached (container memory limit 64Mi, less 16Mi kept for the runtime)",
    );
    assert!(done.stdout.contains("allocated 32 MiB"), "{}", done.stdout);
    let hello = node.push_guest("hello", Format::Layer)?;
    let done = node
        .run(pod("after-bomb"), ContainerSpec::new("hello", hello))
        .await?;
    assert_eq!(done.exit.exit_code, 0, "{}", done.stderr);
    node.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_pods_log_ends_with_what_it_used_and_wasi_0_3_commands_run() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let node = system_node().await?;
    // A WASI 0.3 command from a real toolchain (CPython by componentize-py), as a
    // non-root "restricted" container, metered.
    let python = node.push_component("pycmd-p3", Format::Layer)?;
    let done = node
        .run(
            annotated("p3-command", &[("bulwark.dev/fuel", "20000000000")]),
            ContainerSpec::new("p3", python)
                .args(["5"])
                .security(SecurityContext::restricted(Some(65532))),
        )
        .await?;
    assert_eq!(done.exit.exit_code, 5, "{}", done.stderr);
    assert_eq!(done.stdout, "hello from a p3 command\n");
    let usage = done
        .stderr
        .lines()
        .find(|line| line.starts_with("bulwark: usage: exit_code=5 "))
        .with_context(|| format!("no usage line: {}", done.stderr))?;
    for key in ["wall_ms", "cpu_ms", "fuel", "memory_bytes"] {
        let value: f64 = logfmt_value(usage, key)
            .with_context(|| format!("no {key} in {usage}"))?
            .parse()?;
        assert!(value > 0.0, "{key}: {usage}");
    }
    // A limit's run says which limit, and the line is the log's last.
    let looping = node.push_guest("loop", Format::Layer)?;
    let done = node
        .run(
            annotated("loop-usage", &[("bulwark.dev/timeout", "300ms")]),
            ContainerSpec::new("loop", looping),
        )
        .await?;
    assert_eq!(done.exit.exit_code, 124, "{}", done.stderr);
    let last = done.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("bulwark: usage: exit_code=124 limit=timeout wall_ms="),
        "{}",
        done.stderr
    );
    // Metered (the node's fuel ceiling is its budget), but ended from outside its store:
    // the count is not to be had; the memory is (loop.wat holds one page).
    assert_eq!(logfmt_value(last, "fuel"), Some("unknown"), "{last}");
    assert_eq!(logfmt_value(last, "memory_bytes"), Some("65536"), "{last}");
    node.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_annotations_and_native_entrypoints_never_start() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let node = system_node().await?;
    let hello = node.push_guest("hello", Format::Layer)?;
    let cases = [
        (
            vec![("bulwark.dev/memory", "2Gi")],
            "bulwark.dev/memory: \"2Gi\" is above this node's ceiling of 256Mi",
        ),
        (
            vec![("bulwark.dev/memroy", "64Mi")],
            "unknown annotation \"bulwark.dev/memroy\"",
        ),
        (
            vec![("bulwark.dev/fuel", "lots")],
            "bulwark.dev/fuel: \"lots\" is malformed",
        ),
        (
            vec![("bulwark.dev/network", "tcp:10.0.0.1:80")],
            "allow_network = false",
        ),
        (
            vec![("bulwark.dev/dirs", "/nonexistent:ro")],
            "bulwark.dev/dirs: /nonexistent",
        ),
    ];
    for (annotations, message) in cases {
        let error = node
            .refused(
                annotated("bad", &annotations),
                ContainerSpec::new("bad", hello.clone()),
            )
            .await?
            .replace("\\\"", "\"");
        assert!(error.contains(message), "{annotations:?}: {error}");
    }
    // A native program is not Wasm and this node does not allow native containers.
    let busybox = ContainerSpec::new("native", node.images.busybox.clone()).command([
        "/bin/busybox",
        "echo",
        "escaped",
    ]);
    let error = node.refused(pod("native"), busybox).await?;
    assert!(error.contains("native executable"), "{error}");

    // The handler's ConfigPath names a file that is gone: no pod runs without its limits.
    let config = node.temp().join("config.toml");
    std::fs::remove_file(&config)?;
    // Not even its sandbox runs (kubelet reports FailedCreatePodSandBox with the reason).
    let error = node
        .cri
        .run_pod(&pod("no-config").runtime_handler(HANDLER))
        .await
        .err()
        .context("a pod started without its node configuration")?;
    let error = format!("{error:#}");
    assert!(
        error.contains(&format!(
            "cannot read node configuration {}",
            config.display()
        )),
        "{error}"
    );
    node.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_sidecars_run_where_the_node_allows_them() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let allowing = NODE_CONFIG.replace("allow_native = false", "allow_native = true");
    let node = Node::start(suite_containerd().await?, &allowing).await?;
    let sleep = node.push_guest("sleep", Format::Layer)?;
    let busybox = node.images.busybox.clone();
    node.cri.pull(&sleep).await?;
    node.cri.pull(&busybox).await?;

    // A Wasm container and a native sidecar in one pod, one shim.
    let pod = PodSpec::new("sidecar").runtime_handler("bulwark");
    let pod_id = node.cri.run_pod(&pod).await?;
    let wasm = ContainerSpec::new("wasm", sleep).args(["300"]);
    let sidecar = ContainerSpec::new("sidecar", busybox).command([
        "/bin/busybox",
        "sh",
        "-c",
        "echo native sidecar; for ns in ipc uts; do /bin/busybox readlink /proc/self/ns/$ns; done",
    ]);
    let wasm_id = node.cri.create_container(&pod_id, &pod, &wasm).await?;
    let sidecar_id = node.cri.create_container(&pod_id, &pod, &sidecar).await?;
    node.cri.start_container(&wasm_id).await?;
    node.cri.start_container(&sidecar_id).await?;
    assert_eq!(node.containerd.shim_pids().len(), 1, "one shim per pod");
    let mut logs = Vec::new();
    for id in [&wasm_id, &sidecar_id] {
        let exit = node.cri.wait_exited(id, Duration::from_secs(30)).await?;
        let log = node.cri.read_container_log(id).await?;
        let text: Vec<String> = log.into_iter().map(|line| line.text).collect();
        assert_eq!(exit.exit_code, 0, "{text:?}");
        logs.push(text);
        node.cri.remove_container(id).await?;
    }
    assert_eq!(logs[0].first().map(String::as_str), Some("slept 300 ms"));
    // A Wasm container's log ends with what it used; a native one's does not.
    assert!(
        logs[0][1].starts_with("bulwark: usage: exit_code=0 "),
        "{:?}",
        logs[0]
    );
    assert!(
        !logs[1].iter().any(|line| line.contains("usage")),
        "{:?}",
        logs[1]
    );
    assert_eq!(logs[1].first().map(String::as_str), Some("native sidecar"));
    // As in a runc pod on the host network: the pod's own IPC namespace, never the host's
    // (where the shim lives), and the node's UTS namespace (hostNetwork shares it).
    for (line, namespace, shared_with_host) in
        [(&logs[1][1], "ipc", false), (&logs[1][2], "uts", true)]
    {
        let host = std::fs::read_link(format!("/proc/self/ns/{namespace}"))?;
        assert_eq!(
            line.as_str() == host.to_string_lossy(),
            shared_with_host,
            "{namespace}: {line}"
        );
        assert!(line.starts_with(&format!("{namespace}:[")), "{line}");
    }
    node.cri.stop_pod(&pod_id).await?;
    node.cri.remove_pod(&pod_id).await?;

    // A long-running sidecar stops when kubelet stops it.
    let pod = PodSpec::new("sidecar-stop").runtime_handler("bulwark");
    let pod_id = node.cri.run_pod(&pod).await?;
    let sleeper = ContainerSpec::new("sleeper", node.images.busybox.clone()).command([
        "/bin/busybox",
        "sleep",
        "3600",
    ]);
    let id = node.cri.create_container(&pod_id, &pod, &sleeper).await?;
    node.cri.start_container(&id).await?;
    let stats = node.cri.container_stats(&id).await?;
    assert!(
        stats
            .memory
            .and_then(|m| m.working_set_bytes.or(m.usage_bytes))
            .map_or(0, |v| v.value)
            > 0,
        "stats of a native container"
    );
    node.cri.stop_container(&id, Duration::from_secs(2)).await?;
    let exit = node.cri.wait_exited(&id, Duration::from_secs(10)).await?;
    assert_eq!(
        exit.exit_code,
        128 + 9,
        "busybox sleep as pid 1 ignores SIGTERM: SIGKILL"
    );
    node.cri.remove_container(&id).await?;
    node.cri.stop_pod(&pod_id).await?;
    node.cri.remove_pod(&pod_id).await?;
    node.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_are_preopened_read_only_unless_granted() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let node = system_node().await?;
    let fileio = node.push_guest("fileio", Format::Layer)?;
    let volume = node.temp().join("volume");
    std::fs::create_dir(&volume)?;
    std::fs::write(volume.join("input.txt"), "from the volume\n")?;
    let reader = ContainerSpec::new("reader", fileio.clone())
        .args(["read", "/data/input.txt"])
        .mount(&volume, "/data", false);
    let done = node
        .run(
            annotated("read", &[("bulwark.dev/dirs", "/data")]),
            reader.clone(),
        )
        .await?;
    assert_eq!(
        (done.exit.exit_code, done.stdout.as_str()),
        (0, "from the volume\n"),
        "{}",
        done.stderr
    );

    // Not granted: the guest cannot see the volume at all.
    let done = node.run(pod("ungranted"), reader).await?;
    assert_eq!(done.exit.exit_code, 1, "{}", done.stdout);

    let writer = ContainerSpec::new("writer", fileio.clone())
        .args(["write", "/data/input.txt", "changed"])
        .mount(&volume, "/data", false);
    let done = node
        .run(
            annotated("ro", &[("bulwark.dev/dirs", "/data:ro")]),
            writer.clone(),
        )
        .await?;
    assert_eq!(done.exit.exit_code, 1, "{}", done.stdout);
    assert_eq!(
        std::fs::read_to_string(volume.join("input.txt"))?,
        "from the volume\n"
    );
    let done = node
        .run(annotated("rw", &[("bulwark.dev/dirs", "/data:rw")]), writer)
        .await?;
    assert_eq!(done.exit.exit_code, 0, "{}", done.stderr);
    assert_eq!(
        std::fs::read_to_string(volume.join("input.txt"))?,
        "changed"
    );

    // A volume mounted read-only stays read-only, whatever the annotation asks.
    let read_only = ContainerSpec::new("ro-mount", fileio)
        .args(["write", "/data/input.txt", "again"])
        .mount(&volume, "/data", true);
    let error = node
        .refused(
            annotated("ro-mount", &[("bulwark.dev/dirs", "/data:rw")]),
            read_only,
        )
        .await?;
    assert!(error.contains("mounted read-only"), "{error}");
    node.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_containers_share_one_shim_and_twenty_pods_run_at_once() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let node = system_node().await?;
    let hello = node.push_guest("hello", Format::Layer)?;
    let sleep = node.push_guest("sleep", Format::Layer)?;
    node.cri.pull(&hello).await?;
    node.cri.pull(&sleep).await?;

    // Two containers in one pod: one shim process serves both.
    let pair = PodSpec::new("pair").runtime_handler("bulwark");
    let pod_id = node.cri.run_pod(&pair).await?;
    let first = ContainerSpec::new("sleeper", sleep.clone()).args(["500"]);
    let second = ContainerSpec::new("hello", hello.clone());
    let first_id = node.cri.create_container(&pod_id, &pair, &first).await?;
    let second_id = node.cri.create_container(&pod_id, &pair, &second).await?;
    node.cri.start_container(&first_id).await?;
    node.cri.start_container(&second_id).await?;
    assert_eq!(node.containerd.shim_pids().len(), 1, "one shim per pod");
    for id in [&first_id, &second_id] {
        let exit = node.cri.wait_exited(id, Duration::from_secs(30)).await?;
        assert_eq!(exit.exit_code, 0);
        node.cri.remove_container(id).await?;
    }
    node.cri.stop_pod(&pod_id).await?;
    node.cri.remove_pod(&pod_id).await?;

    // Twenty pods at once.
    let runs = (0..20).map(|i| {
        let node = &node;
        let hello = hello.clone();
        async move {
            node.run(
                pod(&format!("many-{i}")),
                ContainerSpec::new("hello", hello),
            )
            .await
        }
    });
    let results = futures::future::join_all(runs).await;
    for result in results {
        let done = result?;
        assert_eq!(
            (done.exit.exit_code, done.stdout.as_str()),
            (0, "hello from bulwark\n")
        );
    }
    node.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_containers_stop_report_stats_and_refuse_exec() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let node = system_node().await?;
    let cpu = node.push_guest("cpu", Format::Layer)?;
    node.cri.pull(&cpu).await?;
    let busy = PodSpec::new("busy").runtime_handler("bulwark");
    let pod_id = node.cri.run_pod(&busy).await?;
    let container = ContainerSpec::new("busy", cpu)
        .args(["100000"])
        .memory_limit(64 << 20)
        .cpu_limit(500);
    let id = node
        .cri
        .create_container(&pod_id, &busy, &container)
        .await?;
    node.cri.start_container(&id).await?;
    tokio::time::sleep(Duration::from_millis(700)).await;

    // Its cgroup (cgroupfs directory or systemd scope) holds kubelet's memory and CPU limits
    // and its process.
    let cgroup = node.cri.container_cgroup(&busy, &id);
    assert_eq!(cgroups::memory_limit(&cgroup)?, Some(64 << 20), "{cgroup}");
    assert_eq!(
        cgroups::cpu_quota(&cgroup)?,
        Some((50_000, 100_000)),
        "{cgroup}: half a CPU"
    );
    let procs = cgroups::processes(&cgroup)?;
    assert_eq!(procs.len(), 1, "{cgroup}: {procs:?}");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", procs[0]))?;
    assert!(
        String::from_utf8_lossy(&cmdline).contains("\0workload\0"),
        "{cgroup} holds {cmdline:?}, not the workload process"
    );

    let stats = node.cri.container_stats(&id).await?;
    let memory = stats
        .memory
        .and_then(|m| m.working_set_bytes.or(m.usage_bytes))
        .map_or(0, |v| v.value);
    let cpu_nanos = stats
        .cpu
        .and_then(|c| c.usage_core_nano_seconds)
        .map_or(0, |v| v.value);
    assert!(memory > 0, "memory {memory}");
    assert!(cpu_nanos > 0, "cpu {cpu_nanos}");

    let exec = node
        .cri
        .exec_sync(&id, &["sh"], Duration::from_secs(5))
        .await;
    let error = format!("{:#}", exec.err().context("exec succeeded")?);
    assert!(error.contains("exec is not supported"), "{error}");

    node.cri.stop_container(&id, Duration::from_secs(5)).await?;
    let exit = node.cri.wait_exited(&id, Duration::from_secs(10)).await?;
    assert_eq!(exit.exit_code, 128 + 15, "SIGTERM ends a Wasm container");
    node.cri.remove_container(&id).await?;
    node.cri.stop_pod(&pod_id).await?;
    node.cri.remove_pod(&pod_id).await?;
    node.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_wasm_artifacts_run_on_containerd_1_7() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let binary = tokio::task::spawn_blocking(|| containerd::fetch("1.7.24")).await??;
    let node = Node::start(binary, NODE_CONFIG).await?;
    let hello = node.push_guest("hello", Format::Artifact)?;
    // An artifact has no entrypoint: the pod names argv[0].
    let container = ContainerSpec::new("artifact", hello).command(["hello.wasm"]);
    let done = node.run(pod("artifact"), container).await?;
    assert_eq!(
        (done.exit.exit_code, done.stdout.as_str()),
        (0, "hello from bulwark\n"),
        "{}",
        done.stderr
    );
    let looping = node.push_guest("loop", Format::Artifact)?;
    let done = node
        .run(
            annotated("artifact-fuel", &[("bulwark.dev/fuel", "1000000")]),
            ContainerSpec::new("loop", looping).command(["loop.wasm"]),
        )
        .await?;
    assert_eq!(done.exit.exit_code, 152, "{}", done.stderr);
    // A tag moved between the pull and the start (another pull of it, by another pod):
    // the container runs the image kubelet pulled for it, by its image ID, not what the
    // tag names by then.
    let guests = bulwark_tests::build_dir().join("guests");
    let moving = node.push_module(&guests.join("hello.wasm"), "moving", Format::Artifact, None)?;
    node.cri.pull(&moving).await?;
    let pod_spec = pod("moving").runtime_handler(HANDLER);
    let pod_id = node.cri.run_pod(&pod_spec).await?;
    let container = ContainerSpec::new("moving", moving.clone()).command(["hello.wasm"]);
    let id = node
        .cri
        .create_container(&pod_id, &pod_spec, &container)
        .await?;
    node.push_module(&guests.join("loop.wasm"), "moving", Format::Artifact, None)?;
    node.cri.pull(&moving).await?;
    node.cri.start_container(&id).await?;
    let done = node.finished(&id, Duration::from_secs(30)).await?;
    assert_eq!(
        (done.exit.exit_code, done.stdout.as_str()),
        (0, "hello from bulwark\n"),
        "{}",
        done.stderr
    );
    node.cri.remove_container(&id).await?;
    node.cri.stop_pod(&pod_id).await?;
    node.cri.remove_pod(&pod_id).await?;
    // The wasm-in-layer format works on 1.7 too.
    let layered = node.push_guest("hello", Format::Layer)?;
    let done = node
        .run(pod("layered"), ContainerSpec::new("layered", layered))
        .await?;
    assert_eq!(done.exit.exit_code, 0, "{}", done.stderr);
    node.finish().await
}
