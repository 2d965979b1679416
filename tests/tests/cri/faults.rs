//! Faults a node lives through with Wasm pods running: containerd restarted, the shim
//! killed, the shim binary replaced by an upgrade. Each ends with the suite's leak check.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use bulwark_tests::harness::cri::{ContainerSpec, PodSpec};
use bulwark_tests::harness::node::{
    Format, HANDLER, NODE_CONFIG, Node, NodeOptions, SHIM, SHIM_BINARIES, shim_binary,
};
use bulwark_tests::harness::process::{is_alive, signal};

use crate::{ONE_CONTAINERD, suite_containerd};

/// Waits until process `pid` is gone (a zombie counts as gone).
pub(crate) async fn gone(pid: u32, within: Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if !is_alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Starts a Wasm pod running the sleep guest for `ms`; returns (pod, pod id, container id).
pub(crate) async fn sleeping_pod(
    node: &Node,
    name: &str,
    ms: u32,
) -> Result<(PodSpec, String, String)> {
    let sleep = node.push_guest("sleep", Format::Layer)?;
    node.cri.pull(&sleep).await?;
    let pod = PodSpec::new(name).runtime_handler(HANDLER);
    let pod_id = node.cri.run_pod(&pod).await?;
    let container = ContainerSpec::new(name, sleep).args([ms.to_string()]);
    let id = node.cri.create_container(&pod_id, &pod, &container).await?;
    node.cri.start_container(&id).await?;
    Ok((pod, pod_id, id))
}

pub(crate) async fn remove_pod(node: &Node, pod_id: &str) -> Result<()> {
    node.cri.stop_pod(pod_id).await?;
    node.cri.remove_pod(pod_id).await
}

/// Starts a runc pod with a busybox container per `(name, script)`; returns the pod's id
/// and the containers'.
async fn busybox_pod(node: &Node, scripts: &[(&str, String)]) -> Result<(String, Vec<String>)> {
    let busybox = node.images.busybox.clone();
    node.cri.pull(&busybox).await?;
    let pod = PodSpec::new("runc");
    let pod_id = node.cri.run_pod(&pod).await?;
    let mut ids = Vec::new();
    for (name, script) in scripts {
        let command = ["/bin/busybox", "sh", "-c", script.as_str()];
        let spec = ContainerSpec::new(*name, busybox.clone()).command(command);
        let id = node.cri.create_container(&pod_id, &pod, &spec).await?;
        node.cri.start_container(&id).await?;
        ids.push(id);
    }
    Ok((pod_id, ids))
}

/// Lines `tick 1`, `tick 2`, ... with none missing: how many.
fn contiguous_ticks(log: &[String]) -> Result<usize> {
    for (index, line) in log.iter().enumerate() {
        ensure!(
            *line == format!("tick {}", index + 1),
            "a gap at line {index}: {log:?}"
        );
    }
    Ok(log.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasm_pods_live_through_a_containerd_restart_as_runc_pods_do() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let mut node = Node::start(suite_containerd().await?, NODE_CONFIG).await?;
    // In each runtime, a container that ends while containerd is down and one that keeps
    // writing its log through the restart.
    let (_, ending_pod, ending) = sleeping_pod(&node, "ending", 600_000).await?;
    let tick = node.push_guest("tick", Format::Layer)?;
    node.cri.pull(&tick).await?;
    let ticking = PodSpec::new("ticking").runtime_handler(HANDLER);
    let ticking_pod = node.cri.run_pod(&ticking).await?;
    let spec = ContainerSpec::new("ticking", tick).args(["100000", "200"]);
    let ticker = node
        .cri
        .create_container(&ticking_pod, &ticking, &spec)
        .await?;
    node.cri.start_container(&ticker).await?;
    let (runc_pod, runc) = busybox_pod(
        &node,
        &[
            ("runc-ending", "exec /bin/busybox sleep 600".into()),
            (
                "runc-ticking",
                "i=0; while true; do i=$((i+1)); /bin/busybox sleep 0.2; echo tick $i; done".into(),
            ),
        ],
    )
    .await?;
    let ids = [&ending, &ticker, &runc[0], &runc[1]];
    let mut pids = Vec::new();
    for id in ids {
        pids.push(node.cri.container_pid(id).await?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Each ticker's own count: the runc one starts later, and on a slow VM ticks slower.
    let mut before = Vec::new();
    for id in [&ticker, &runc[1]] {
        before.push(node.cri.read_container_log(id).await?.len());
    }

    node.containerd.stop_daemon()?;
    // As the kernel's OOM killer would (a container's PID 1 ignores SIGTERM).
    for pid in [pids[0], pids[2]] {
        signal(pid, libc::SIGKILL);
        ensure!(
            gone(pid, Duration::from_secs(10)).await,
            "pid {pid} did not end"
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    ensure!(
        is_alive(pids[1]) && is_alive(pids[3]),
        "a ticking container died while containerd was down"
    );
    node.containerd.start_daemon()?;
    node.cri = node.cri.reconnect().await?;

    // The ends reach kubelet, with the same exit code for both runtimes.
    let mut exits = Vec::new();
    for id in [&ending, &runc[0]] {
        exits.push(
            node.cri
                .wait_exited(id, Duration::from_secs(30))
                .await?
                .exit_code,
        );
    }
    // containerd 1.6 reports 137; 1.7 and 2.x, which missed the exit, report 255 for runc
    // too: the same as runc's, whatever it is.
    assert_eq!(exits[0], exits[1], "Bulwark's, then runc's");
    assert_ne!(exits[0], 0, "a SIGKILLed container");
    // Every line reaches the log, those written while containerd was down included.
    for (id, before) in [&ticker, &runc[1]].into_iter().zip(before) {
        node.cri.stop_container(id, Duration::from_secs(2)).await?;
        node.cri.wait_exited(id, Duration::from_secs(30)).await?;
        let log: Vec<String> = node
            .cri
            .read_container_log(id)
            .await?
            .into_iter()
            .map(|line| line.text)
            .collect();
        let ticks = contiguous_ticks(&log)?;
        // A tick every 200 ms through more than a second of containerd being down.
        ensure!(
            ticks >= before + 3,
            "{id}: {ticks} lines, {before} before the restart"
        );
    }
    for id in ids {
        node.cri.remove_container(id).await?;
    }
    for pod_id in [ending_pod, ticking_pod, runc_pod] {
        remove_pod(&node, &pod_id).await?;
    }
    node.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_shim_leaves_no_workload_behind() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let node = Node::start(suite_containerd().await?, NODE_CONFIG).await?;
    let (_, pod_id, id) = sleeping_pod(&node, "orphan", 60_000).await?;
    let workload = node.cri.container_pid(&id).await?;
    let shims = node.containerd.shim_pids();
    let [shim] = shims[..] else {
        bail!("expected one shim, found {shims:?}")
    };
    signal(shim, libc::SIGKILL);
    ensure!(
        gone(workload, Duration::from_secs(5)).await,
        "the workload {workload} outlived its SIGKILLed shim"
    );
    // containerd notices the shim's death and reports the container as ended.
    let exit = node.cri.wait_exited(&id, Duration::from_secs(30)).await?;
    assert_ne!(exit.exit_code, 0, "a killed container");
    node.cri.remove_container(&id).await?;
    remove_pod(&node, &pod_id).await?;
    node.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_shim_binary_starts_new_containers_in_running_pods() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    // The handler runs a copy of the shim and its binaries that the test replaces, as
    // `bulwark install` does on an upgrade: new files renamed over the old ones.
    let dir = tempfile::tempdir()?;
    let built = shim_binary()?;
    let install = || -> Result<()> {
        for name in SHIM_BINARIES {
            let upgrade = dir.path().join(format!(".{name}.new"));
            std::fs::copy(built.with_file_name(name), &upgrade)
                .with_context(|| format!("cannot copy {name}"))?;
            std::fs::rename(&upgrade, dir.path().join(name))?;
        }
        Ok(())
    };
    install()?;
    let installed = dir.path().join(SHIM);
    let node = Node::start_with(
        NodeOptions::new(suite_containerd().await?, NODE_CONFIG).shim(installed.clone()),
    )
    .await?;
    let (pod, pod_id, first) = sleeping_pod(&node, "upgraded", 3000).await?;
    install()?;

    let hello = node.push_guest("hello", Format::Layer)?;
    let second = node
        .cri
        .create_container(&pod_id, &pod, &ContainerSpec::new("hello", hello))
        .await?;
    node.cri.start_container(&second).await?;
    for (id, expected) in [(&second, "hello from bulwark"), (&first, "slept 3000 ms")] {
        let exit = node.cri.wait_exited(id, Duration::from_secs(30)).await?;
        let log = node.cri.read_container_log(id).await?;
        assert_eq!(exit.exit_code, 0, "{log:?}");
        let mut stdout = log
            .iter()
            .filter(|line| line.stream == bulwark_tests::harness::cri::LogStream::Stdout)
            .map(|line| line.text.as_str());
        assert_eq!(stdout.next_back(), Some(expected), "{log:?}");
        node.cri.remove_container(id).await?;
    }
    remove_pod(&node, &pod_id).await?;
    node.finish().await
}

/// The shim holds the pod's lock for bookkeeping only: while one container's start is slow
/// (runc, slowed down here by 6 s by a wrapper on the shim's PATH; D-Bus is the other), calls about
/// the pod's other containers are answered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_start_does_not_stall_the_pods_other_containers() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let wrapper = tempfile::tempdir()?;
    let runc = wrapper.path().join("runc");
    std::fs::write(
        &runc,
        "#!/bin/sh\ncase \" $* \" in *\" start \"*) sleep 6;; esac\nexec /usr/sbin/runc \"$@\"\n",
    )?;
    std::fs::set_permissions(&runc, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let allowing = NODE_CONFIG.replace("allow_native = false", "allow_native = true");
    let node = Node::start_with(
        NodeOptions::new(suite_containerd().await?, &allowing).path_first(wrapper.path().into()),
    )
    .await?;
    let (pod, pod_id, wasm) = sleeping_pod(&node, "slow-start", 60_000).await?;
    let busybox = node.images.busybox.clone();
    node.cri.pull(&busybox).await?;
    let sidecar = ContainerSpec::new("sidecar", busybox).command(["/bin/busybox", "sleep", "60"]);
    let sidecar_id = node.cri.create_container(&pod_id, &pod, &sidecar).await?;
    let starting = {
        let cri = node.cri.clone();
        let id = sidecar_id.clone();
        tokio::spawn(async move { cri.start_container(&id).await })
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    ensure!(!starting.is_finished(), "the slow start was not slow");
    // Stats of the Wasm container go to the shim (its Stats call).
    let asked = std::time::Instant::now();
    node.cri.container_stats(&wasm).await?;
    let answered = asked.elapsed();
    ensure!(
        !starting.is_finished(),
        "the start ended before the answer: inconclusive"
    );
    ensure!(
        answered < Duration::from_secs(3),
        "Stats waited {answered:?} for another container's start"
    );
    starting.await??;
    for id in [&wasm, &sidecar_id] {
        node.cri.stop_container(id, Duration::from_secs(1)).await?;
        node.cri.remove_container(id).await?;
    }
    remove_pod(&node, &pod_id).await?;
    node.finish().await
}
