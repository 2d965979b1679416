//! `bulwark install` on a node, end to end: containerd's config as the test node writes it
//! (no bulwark handler), edited by the real `bulwark install` exactly as on a node, then
//! containerd 1.6.20, 1.7.24 and 2.1.9 started from it run a Wasm pod through CRI: the
//! runtime type resolves to the installed shim on containerd's PATH, and the pod
//! annotation allow-list lets `bulwark.dev/fuel` through.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use bulwark_tests::harness::containerd::{self, Containerd, ContainerdOptions};
use bulwark_tests::harness::cri::{ContainerSpec, PodSpec};
use bulwark_tests::harness::images::push_test_images;
use bulwark_tests::harness::registry::Registry;
use tokio::sync::Mutex;

static ONE_CONTAINERD: Mutex<()> = Mutex::const_new(());

/// What an installer run on the node does: `bulwark install` on containerd's config, the
/// shim into a directory that goes first on containerd's PATH.
fn install(config: &Path) -> Result<Option<PathBuf>> {
    let bin = config
        .parent()
        .context("config has no directory")?
        .join("bin");
    let bulwark = bulwark_tests::release_dir().join("bulwark");
    let output = std::process::Command::new(&bulwark)
        .args(["install", "--no-restart", "--containerd-config"])
        .arg(config)
        .arg("--shim-dir")
        .arg(&bin)
        .output()
        .with_context(|| format!("cannot run {}", bulwark.display()))?;
    ensure!(
        output.status.success(),
        "bulwark install failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(Some(bin))
}

async fn installed_node_runs_a_limited_pod(binary: PathBuf) -> Result<()> {
    let registry = Registry::start()?;
    let images = push_test_images(&registry)?;
    let cache = tempfile::tempdir()?;
    let mut options = ContainerdOptions::new(&registry, images.pause.clone())
        .binary(binary)
        .env("BULWARK_CACHE_DIR", cache.path().display().to_string());
    options.config_hook = Some(install);
    let containerd = Containerd::start(options)?;
    let config = std::fs::read_to_string(containerd.config_path())?;
    ensure!(
        config.contains("io.containerd.bulwark.v1"),
        "not installed:\n{config}"
    );

    let module = bulwark_tests::build_dir().join("guests/loop.wasm");
    let image = format!("{}/installed-loop:v1", registry.addr());
    let status = std::process::Command::new(bulwark_tests::release_dir().join("bulwark"))
        .args(["image", "push", "--insecure"])
        .arg(&module)
        .arg(&image)
        .status()?;
    ensure!(status.success(), "bulwark image push failed");

    let cri = containerd.cri().await?;
    cri.pull(&image).await?;
    let pod = PodSpec::new("installed")
        .runtime_handler("bulwark")
        .annotation("bulwark.dev/fuel", "1000000");
    let pod_id = cri.run_pod(&pod).await?;
    let id = cri
        .create_container(&pod_id, &pod, &ContainerSpec::new("loop", image))
        .await?;
    cri.start_container(&id).await?;
    let exit = cri.wait_exited(&id, Duration::from_secs(30)).await?;
    cri.remove_container(&id).await?;
    cri.stop_pod(&pod_id).await?;
    cri.remove_pod(&pod_id).await?;
    ensure!(exit.exit_code == 152, "exit {exit:?}");
    ensure!(
        exit.termination_message
            .contains("fuel exhausted after 1000000 units (bulwark.dev/fuel)"),
        "{exit:?}"
    );
    containerd.stop()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installed_on_containerd_1_6() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    installed_node_runs_a_limited_pod(PathBuf::from(containerd::SYSTEM_CONTAINERD)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installed_on_containerd_1_7() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let binary = tokio::task::spawn_blocking(|| containerd::fetch("1.7.24")).await??;
    installed_node_runs_a_limited_pod(binary).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installed_on_containerd_2_1() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let binary = tokio::task::spawn_blocking(|| containerd::fetch("2.1.9")).await??;
    installed_node_runs_a_limited_pod(binary).await
}

/// The installer image, run by runc in a pod with a node's root mounted at /host (as the
/// chart's DaemonSet runs it), installs Bulwark on that node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_installer_image_installs_a_node_from_a_pod() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let registry = Registry::start()?;
    let images = push_test_images(&registry)?;
    let work = tempfile::tempdir()?;
    let installer = bulwark_tests::harness::installer::installer_image()?;
    let reference = bulwark_tests::harness::images::push_image(
        &registry,
        work.path(),
        &installer,
        "bulwark-installer:test",
    )?;
    let node = tempfile::tempdir()?;
    let config = node.path().join("etc/containerd/config.toml");
    std::fs::create_dir_all(config.parent().context("no parent")?)?;
    let default = std::process::Command::new(containerd::SYSTEM_CONTAINERD)
        .args(["config", "default"])
        .output()?;
    std::fs::write(&config, &default.stdout)?;

    let containerd = Containerd::start(ContainerdOptions::new(&registry, images.pause.clone()))?;
    let cri = containerd.cri().await?;
    cri.pull(&reference).await?;
    let pod = PodSpec::new("installer");
    let pod_id = cri.run_pod(&pod).await?;
    let container = ContainerSpec::new("install", reference)
        .command(["/bulwark", "install", "--host-root=/host", "--no-restart"])
        .mount(node.path(), "/host", false);
    let id = cri.create_container(&pod_id, &pod, &container).await?;
    cri.start_container(&id).await?;
    let exit = cri.wait_exited(&id, Duration::from_secs(60)).await?;
    let log = cri.read_container_log(&id).await?;
    cri.remove_container(&id).await?;
    cri.stop_pod(&pod_id).await?;
    cri.remove_pod(&pod_id).await?;
    containerd.stop()?;
    ensure!(exit.exit_code == 0, "installer exited {exit:?}: {log:?}");
    let shim = node.path().join("usr/local/bin/containerd-shim-bulwark-v1");
    ensure!(shim.exists(), "no shim installed: {log:?}");
    let patched = std::fs::read_to_string(&config)?;
    ensure!(
        patched.contains("io.containerd.bulwark.v1"),
        "config not patched: {log:?}"
    );
    ensure!(
        node.path()
            .join("etc/containerd/config.toml.bulwark-backup")
            .exists(),
        "no backup"
    );
    Ok(())
}
