//! Proves the integration-test harness on real components: a registry, images built here,
//! containerd 1.6 (Debian 12's), 1.7 and 2.1 (Debian trixie's and sid's, fetched into
//! `build/containerd/` on first use), runc, and a pod driven through CRI as kubelet drives it.
//!
//! Run with `cargo test --release --workspace --test harness` (as root).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use bulwark_tests::harness::containerd::{self, Containerd, ContainerdOptions, SYSTEM_CONTAINERD};
use bulwark_tests::harness::cri::{ContainerSpec, LogStream, PodSpec};
use bulwark_tests::harness::images::push_test_images;
use bulwark_tests::harness::mounts::mounts_under;
use bulwark_tests::harness::registry::Registry;
use bulwark_tests::harness::{cgroups, process};
use tokio::sync::Mutex;

/// One containerd at a time: they would share /run/containerd/s and the machine's 2 cores.
static ONE_CONTAINERD: Mutex<()> = Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runc_pod_on_containerd_1_6() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    busybox_pod_round_trip(PathBuf::from(SYSTEM_CONTAINERD), "1.6").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runc_pod_on_containerd_1_7() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let binary = tokio::task::spawn_blocking(|| containerd::fetch("1.7.24")).await??;
    busybox_pod_round_trip(binary, "1.7").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runc_pod_on_containerd_2_1() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let binary = tokio::task::spawn_blocking(|| containerd::fetch("2.1.9")).await??;
    busybox_pod_round_trip(binary, "2.1").await
}

/// A test that fails half-way leaves running pods; and containerd may die. Dropping the
/// harness's objects must still leave nothing behind: no shim or container process, no mount,
/// no cgroup, no directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleans_up_after_a_crashed_containerd() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let registry = Registry::start()?;
    let images = push_test_images(&registry)?;
    for crash in [false, true] {
        let containerd =
            Containerd::start(ContainerdOptions::new(&registry, images.pause.clone()))?;
        let cri = containerd.cri().await?;
        let pod = PodSpec::new("left-behind");
        let pod_id = cri.run_pod(&pod).await?;
        let sleeper =
            ContainerSpec::new("sleeper", images.busybox.clone()).command(["sleep", "3600"]);
        let sleeper_id = cri.create_container(&pod_id, &pod, &sleeper).await?;
        cri.start_container(&sleeper_id).await?;

        let shims = containerd.shim_pids();
        // runc's v2 shim serves a whole pod: one shim, the pause and sleep processes below it.
        ensure!(!shims.is_empty(), "no shim runs the pod");
        let mut processes = shims.clone();
        for shim in &shims {
            processes.extend(process::descendants(*shim));
        }
        let base = containerd
            .root()
            .parent()
            .context("no parent")?
            .to_path_buf();
        let cgroup_dirs = cgroups::dirs_of(containerd.cgroup_root())?;
        let sockets = containerd.new_shim_sockets();
        ensure!(!sockets.is_empty(), "no shim socket while a pod runs?");
        ensure!(
            !mounts_under(&base)?.is_empty(),
            "no mounts while a pod runs?"
        );
        if crash {
            process::signal(containerd.pid(), libc::SIGKILL);
            while process::is_alive(containerd.pid()) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        drop(cri);
        drop(containerd);

        let alive: Vec<u32> = processes
            .iter()
            .copied()
            .filter(|p| process::is_alive(*p))
            .collect();
        ensure!(
            alive.is_empty(),
            "crash={crash}: processes remain: {alive:?}"
        );
        ensure!(
            mounts_under(&base)?.is_empty(),
            "crash={crash}: mounts remain"
        );
        ensure!(!base.exists(), "crash={crash}: {} remains", base.display());
        let left: Vec<_> = cgroup_dirs.iter().filter(|d| d.exists()).collect();
        ensure!(left.is_empty(), "crash={crash}: cgroups remain: {left:?}");
        let left: Vec<_> = sockets.iter().filter(|s| s.exists()).collect();
        ensure!(
            left.is_empty(),
            "crash={crash}: shim sockets remain: {left:?}"
        );
    }
    Ok(())
}

/// Registry, images, containerd, then one pod on runc from RunPodSandbox to
/// RemovePodSandbox with three busybox containers (one succeeds, one fails with a termination
/// message, one runs under a memory limit until stopped); then everything is torn down and
/// checked for leftovers.
async fn busybox_pod_round_trip(binary: PathBuf, expected_version: &str) -> Result<()> {
    let started = Instant::now();
    let registry = Registry::start()?;
    let images = push_test_images(&registry)?;
    eprintln!("registry and images ready in {:?}", started.elapsed());

    let containerd =
        Containerd::start(ContainerdOptions::new(&registry, images.pause.clone()).binary(binary))?;
    ensure!(
        containerd
            .version()
            .to_string()
            .starts_with(expected_version),
        "running containerd {}",
        containerd.version()
    );
    let (root, state) = (
        containerd.root().to_path_buf(),
        containerd.state().to_path_buf(),
    );
    eprintln!(
        "containerd {} ready at {:?} (pid {})",
        containerd.version(),
        started.elapsed(),
        containerd.pid()
    );

    let cri = containerd.cri().await?;
    let version = cri.version().await?;
    ensure!(version.runtime_name == "containerd", "{version:?}");

    let pod = PodSpec::new("hello-runc").annotation("bulwark.dev/test", "harness");
    let pod_id = cri
        .run_pod(&pod)
        .await
        .with_context(|| containerd.log_contents())?;

    // A container that prints and exits 0: its CRI log has the line.
    let hello =
        ContainerSpec::new("hello", images.busybox.clone()).command(["echo", "hello-from-runc"]);
    let hello_id = cri.create_container(&pod_id, &pod, &hello).await?;
    cri.start_container(&hello_id).await?;
    let exit = cri.wait_exited(&hello_id, Duration::from_secs(30)).await?;
    ensure!(
        exit.exit_code == 0 && exit.reason == "Completed",
        "{exit:?}"
    );
    let log = cri.read_container_log(&hello_id).await?;
    ensure!(
        log.iter()
            .any(|l| l.stream == LogStream::Stdout && l.text == "hello-from-runc"),
        "log: {log:?}"
    );

    // A container that fails with a termination message, as kubelet reads it.
    let failing = ContainerSpec::new("failing", images.busybox.clone()).command([
        "sh",
        "-c",
        "echo oops >&2; printf 'gave up' > /dev/termination-log; exit 3",
    ]);
    let failing_id = cri.create_container(&pod_id, &pod, &failing).await?;
    cri.start_container(&failing_id).await?;
    let exit = cri
        .wait_exited(&failing_id, Duration::from_secs(30))
        .await?;
    ensure!(exit.exit_code == 3 && exit.reason == "Error", "{exit:?}");
    ensure!(exit.termination_message == "gave up", "{exit:?}");
    let log = cri.read_container_log(&failing_id).await?;
    ensure!(
        log.iter()
            .any(|l| l.stream == LogStream::Stderr && l.text == "oops"),
        "log: {log:?}"
    );

    // A long-running container with a memory limit: its cgroup has the limit, it has stats,
    // and StopContainer ends it (sleep as PID 1 ignores SIGTERM: this takes the SIGKILL path).
    let limit = 64 << 20;
    let sleeper = ContainerSpec::new("sleeper", images.busybox.clone())
        .command(["sleep", "3600"])
        .memory_limit(limit);
    let sleeper_id = cri.create_container(&pod_id, &pod, &sleeper).await?;
    cri.start_container(&sleeper_id).await?;
    let cgroup = format!("{}/{sleeper_id}", cri.cgroup_parent(&pod));
    let cgroup_limit = cgroups::memory_limit(&cgroup)?;
    ensure!(
        cgroup_limit == Some(limit as u64),
        "memory limit {cgroup_limit:?}"
    );
    let stats = cri.container_stats(&sleeper_id).await?;
    ensure!(stats.memory.is_some(), "{stats:?}");
    cri.stop_container(&sleeper_id, Duration::from_secs(1))
        .await?;
    let exit = cri
        .wait_exited(&sleeper_id, Duration::from_secs(10))
        .await?;
    ensure!(exit.exit_code == 137, "{exit:?}");

    for id in [&hello_id, &failing_id, &sleeper_id] {
        cri.stop_container(id, Duration::from_secs(10)).await?;
        cri.remove_container(id).await?;
    }
    cri.stop_pod(&pod_id).await?;
    cri.remove_pod(&pod_id).await?;
    eprintln!("pod cycle done at {:?}", started.elapsed());
    ensure!(
        cgroups::dirs_of(&cri.cgroup_parent(&pod))?
            .iter()
            .all(|d| !d.exists()),
        "the pod's cgroup remains"
    );

    ensure!(cri.list_pods().await?.is_empty(), "pods remain");
    ensure!(
        containerd.shim_pids().is_empty(),
        "shims remain: {:?}",
        containerd.shim_pids()
    );
    let sockets = containerd.new_shim_sockets();
    ensure!(sockets.is_empty(), "shim sockets remain: {sockets:?}");

    drop(cri);
    let stopping = Instant::now();
    containerd.stop()?;
    eprintln!("containerd stopped and cleaned in {:?}", stopping.elapsed());
    for dir in [&root, &state] {
        let left = mounts_under(dir)?;
        ensure!(
            left.is_empty(),
            "mounts remain under {}: {left:?}",
            dir.display()
        );
        ensure!(!dir.exists(), "{} remains", dir.display());
    }
    drop(registry);
    eprintln!("total {:?}", started.elapsed());
    Ok(())
}
