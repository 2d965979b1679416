//! Faults a node lives through with Wasm pods running: containerd restarted, the shim
//! killed, the shim binary replaced by an upgrade. Each ends with the suite's leak check.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use bulwark_tests::harness::cri::{ContainerSpec, PodSpec};
use bulwark_tests::harness::node::{Format, HANDLER, NODE_CONFIG, Node, NodeOptions, shim_binary};
use bulwark_tests::harness::process::{is_alive, signal};

use crate::{ONE_CONTAINERD, suite_containerd};

/// Waits until process `pid` is gone (a zombie counts as gone).
async fn gone(pid: u32, within: Duration) -> bool {
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
async fn sleeping_pod(node: &Node, name: &str, ms: u32) -> Result<(PodSpec, String, String)> {
    let sleep = node.push_guest("sleep", Format::Layer)?;
    node.cri.pull(&sleep).await?;
    let pod = PodSpec::new(name).runtime_handler(HANDLER);
    let pod_id = node.cri.run_pod(&pod).await?;
    let container = ContainerSpec::new(name, sleep).args([ms.to_string()]);
    let id = node.cri.create_container(&pod_id, &pod, &container).await?;
    node.cri.start_container(&id).await?;
    Ok((pod, pod_id, id))
}

async fn remove_pod(node: &Node, pod_id: &str) -> Result<()> {
    node.cri.stop_pod(pod_id).await?;
    node.cri.remove_pod(pod_id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasm_pods_live_through_a_containerd_restart_as_runc_pods_do() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let mut node = Node::start(suite_containerd().await?, NODE_CONFIG).await?;
    // One container ends while containerd is down, the other after it is back; a runc
    // pod does the same beside them.
    let (_, short_pod, short) = sleeping_pod(&node, "short", 4000).await?;
    let (_, long_pod, long) = sleeping_pod(&node, "long", 9000).await?;
    let busybox = node.images.busybox.clone();
    node.cri.pull(&busybox).await?;
    let runc = PodSpec::new("runc");
    let runc_pod = node.cri.run_pod(&runc).await?;
    let mut runc_ids = Vec::new();
    for (name, seconds) in [("runc-short", "4"), ("runc-long", "9")] {
        let script = format!("/bin/busybox sleep {seconds}; echo slept {seconds} s");
        let spec = ContainerSpec::new(name, busybox.clone()).command([
            "/bin/busybox",
            "sh",
            "-c",
            &script,
        ]);
        let id = node.cri.create_container(&runc_pod, &runc, &spec).await?;
        node.cri.start_container(&id).await?;
        runc_ids.push(id);
    }
    let mut pids = Vec::new();
    for id in [&short, &long, &runc_ids[0], &runc_ids[1]] {
        pids.push(node.cri.container_pid(id).await?);
    }
    node.containerd.stop_daemon()?;
    ensure!(
        pids.iter().all(|pid| is_alive(*pid)),
        "a container ended before containerd stopped: the test is too slow here"
    );
    for pid in [pids[0], pids[2]] {
        ensure!(
            gone(pid, Duration::from_secs(10)).await,
            "the short containers did not end"
        );
    }
    ensure!(
        is_alive(pids[1]) && is_alive(pids[3]),
        "a long container died with containerd"
    );
    node.containerd.start_daemon()?;
    node.cri = node.cri.reconnect().await?;
    // Each reaches kubelet with its exit code; the output of one that ended while
    // containerd was down is what runc's twin left in its log (containerd does not copy
    // what it missed), that of the others all of it.
    let mut logs = Vec::new();
    for id in [&short, &long, &runc_ids[0], &runc_ids[1]] {
        let exit = node.cri.wait_exited(id, Duration::from_secs(30)).await?;
        let log: Vec<String> = node
            .cri
            .read_container_log(id)
            .await?
            .into_iter()
            .map(|line| line.text)
            .collect();
        assert_eq!(exit.exit_code, 0, "{id}: {log:?}");
        logs.push(log);
        node.cri.remove_container(id).await?;
    }
    assert_eq!(logs[1], ["slept 9000 ms"]);
    assert_eq!(logs[3], ["slept 9 s"]);
    assert_eq!(logs[0].is_empty(), logs[2].is_empty(), "{logs:?}");
    for pod_id in [short_pod, long_pod, runc_pod] {
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
    // The handler runs a copy of the shim that the test replaces, as `bulwark install`
    // does on an upgrade: a new file renamed over the old one.
    let dir = tempfile::tempdir()?;
    let installed = dir.path().join("containerd-shim-bulwark-v1");
    std::fs::copy(shim_binary()?, &installed).context("cannot copy the shim")?;
    let node = Node::start_with(
        NodeOptions::new(suite_containerd().await?, NODE_CONFIG).shim(installed.clone()),
    )
    .await?;
    let (pod, pod_id, first) = sleeping_pod(&node, "upgraded", 3000).await?;
    let upgrade = dir.path().join(".containerd-shim-bulwark-v1.new");
    std::fs::copy(shim_binary()?, &upgrade)?;
    std::fs::rename(&upgrade, &installed)?;

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
        assert_eq!(log.last().map(|line| line.text.as_str()), Some(expected));
        node.cri.remove_container(id).await?;
    }
    remove_pod(&node, &pod_id).await?;
    node.finish().await
}
