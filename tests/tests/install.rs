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

/// The directory, first on the test containerd's PATH, that receives the shim.
fn shim_dir(config: &Path) -> Result<Option<PathBuf>> {
    let bin = config
        .parent()
        .context("config has no directory")?
        .join("bin");
    std::fs::create_dir_all(&bin)?;
    Ok(Some(bin))
}

/// `bulwark install` as on a node: on containerd's config, the shim into [`shim_dir`];
/// `extra` flags added. Returns what it printed.
fn bulwark_install(config: &Path, extra: &[&str]) -> Result<String> {
    let bin = shim_dir(config)?.context("no shim directory")?;
    let bulwark = bulwark_tests::release_dir().join("bulwark");
    // The node configuration goes beside containerd's, not into this machine's /etc.
    let node_config = config.with_file_name("bulwark.toml");
    let output = std::process::Command::new(&bulwark)
        .args(["install", "--containerd-config"])
        .arg(config)
        .arg("--shim-dir")
        .arg(&bin)
        .arg("--config-path")
        .arg(&node_config)
        .args(extra)
        .output()
        .with_context(|| format!("cannot run {}", bulwark.display()))?;
    ensure!(
        output.status.success(),
        "bulwark install failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The config hook of a node installed before containerd starts.
fn install(config: &Path) -> Result<Option<PathBuf>> {
    bulwark_install(config, &["--no-restart"])?;
    shim_dir(config)
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
    runs_a_fuel_limited_pod(&containerd, &registry).await?;
    containerd.stop()
}

/// A Wasm pod with `bulwark.dev/fuel` through the `bulwark` handler: exits 152 with the
/// reason naming the annotation, so the shim is found and the annotation got through.
async fn runs_a_fuel_limited_pod(containerd: &Containerd, registry: &Registry) -> Result<()> {
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
    Ok(())
}

/// Where no systemd runs containerd, `bulwark install` stops the containerd serving the
/// edited config with SIGTERM and checks that its supervisor started it again; the new
/// containerd then runs a Wasm pod, and a second install changes and restarts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_restarts_a_supervised_containerd_without_systemd() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    ensure!(
        !Path::new("/run/systemd/system").exists(),
        "this test needs a machine without systemd: here bulwark install would restart containerd.service"
    );
    let registry = Registry::start()?;
    let images = push_test_images(&registry)?;
    let cache = tempfile::tempdir()?;
    let mut options = ContainerdOptions::new(&registry, images.pause.clone())
        .env("BULWARK_CACHE_DIR", cache.path().display().to_string());
    options.config_hook = Some(shim_dir);
    options.supervised = true;
    let mut containerd = Containerd::start(options)?;
    let config = containerd.config_path().to_owned();
    let supervisor = containerd.pid();
    let daemon_line = format!("{}\0--config\0", containerd::SYSTEM_CONTAINERD);
    let daemons = || {
        bulwark_tests::harness::process::descendants(supervisor)
            .into_iter()
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|line| line.starts_with(daemon_line.as_bytes()))
            })
            .collect::<Vec<u32>>()
    };
    let before = daemons();
    ensure!(before.len() == 1, "containerd processes: {before:?}");

    let output = tokio::task::spawn_blocking({
        let config = config.clone();
        move || bulwark_install(&config, &[])
    })
    .await??;
    let after = daemons();
    ensure!(
        output.contains(&format!(
            "restarted containerd: pid {} stopped, its supervisor started pid {}",
            before[0],
            after.first().copied().unwrap_or_default()
        )),
        "{output}"
    );
    tokio::task::block_in_place(|| containerd.wait_ready())?;
    runs_a_fuel_limited_pod(&containerd, &registry).await?;

    let again = tokio::task::spawn_blocking({
        let config = config.clone();
        move || bulwark_install(&config, &[])
    })
    .await??;
    ensure!(again.contains("nothing to change"), "{again}");
    ensure!(daemons() == after, "restarted again: {again}");
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
/// chart's DaemonSet runs it), installs Bulwark on that node, and then, as the DaemonSet runs
/// it once the uninstall hook switched it, takes it off again: the node is as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_installer_image_installs_and_uninstalls_a_node_from_a_pod() -> Result<()> {
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
    let shim = node.path().join("usr/local/bin/containerd-shim-bulwark-v1");

    let containerd = Containerd::start(ContainerdOptions::new(&registry, images.pause.clone()))?;
    let cri = containerd.cri().await?;
    cri.pull(&reference).await?;
    let pod = PodSpec::new("installer");
    let pod_id = cri.run_pod(&pod).await?;
    // One init-container run of the DaemonSet's pod: `bulwark ACTION` on the node.
    let run = async |action: &'static str| -> Result<String> {
        let container = ContainerSpec::new(action, reference.clone())
            .command(["/bulwark", action, "--host-root=/host", "--no-restart"])
            .mount(node.path(), "/host", false);
        let id = cri.create_container(&pod_id, &pod, &container).await?;
        cri.start_container(&id).await?;
        let exit = cri.wait_exited(&id, Duration::from_secs(60)).await?;
        let log: Vec<String> = cri
            .read_container_log(&id)
            .await?
            .into_iter()
            .map(|line| line.text)
            .collect();
        cri.remove_container(&id).await?;
        ensure!(exit.exit_code == 0, "{action} exited {exit:?}: {log:?}");
        Ok(log.join("\n"))
    };
    let installed = run("install").await;
    let patched = std::fs::read_to_string(&config)?;
    let shim_installed = shim.exists();
    let node_config = node.path().join("etc/bulwark/config.toml");
    let node_configured = node_config.exists();
    let uninstalled = run("uninstall").await;
    cri.stop_pod(&pod_id).await?;
    cri.remove_pod(&pod_id).await?;
    containerd.stop()?;

    let log = installed?;
    ensure!(shim_installed, "no shim installed: {log:?}");
    ensure!(node_configured, "no node configuration: {log:?}");
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
    let log = uninstalled?;
    ensure!(!shim.exists(), "the shim is still there: {log:?}");
    ensure!(
        !node_config.exists(),
        "the node configuration is still there: {log:?}"
    );
    ensure!(
        std::fs::read(&config)? == default.stdout,
        "containerd's config is not as before: {log:?}"
    );
    Ok(())
}
