//! A Bulwark node: a registry holding the pause and busybox images, and a private
//! containerd with the `bulwark` runtime handler (the shim from this build, its
//! `pod_annotations` allow-list, a node configuration and a private module cache). The CRI
//! suite, the pod benchmark and `make demo` all start one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use super::containerd::{Containerd, ContainerdOptions, RuntimeHandler};
use super::cri::{ContainerExit, ContainerSpec, Cri, LogStream, PodSpec};
use super::images::{TestImages, push_test_images};
use super::mounts::mounts_under;
use super::process;
use super::registry::Registry;

/// The node configuration tests and the demo run under: a default memory limit, ceilings,
/// no native containers, no network.
pub const NODE_CONFIG: &str = r#"
[defaults]
memory = "128Mi"
[ceilings]
memory = "256Mi"
fuel = 100000000000
timeout = "5m"
[capabilities]
allow_native = false
allow_network = false
"#;

/// The shim's file name.
pub const SHIM: &str = "containerd-shim-bulwark-v1";
/// The shim and the binaries it starts beside itself, as `bulwark install` puts them on a
/// node (helpers first).
pub const SHIM_BINARIES: [&str; 3] = ["bulwark-holder", "bulwark-workload", SHIM];

/// The name of the runtime handler (and RuntimeClass).
pub const HANDLER: &str = "bulwark";

/// Runs the suite against another shim binary (an older build, to see what it fails).
pub const SHIM_ENV: &str = "BULWARK_TEST_SHIM";

/// The shim binary of this build, or the one [`SHIM_ENV`] names.
pub fn shim_binary() -> Result<PathBuf> {
    let path = std::env::var_os(SHIM_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::release_dir().join(SHIM));
    ensure!(
        path.exists(),
        "{} is missing: run `make build`",
        path.display()
    );
    Ok(path)
}

/// The `bulwark` CLI of this build.
pub fn bulwark_binary() -> Result<PathBuf> {
    let path = crate::release_dir().join("bulwark");
    ensure!(
        path.exists(),
        "{} is missing: run `make build`",
        path.display()
    );
    Ok(path)
}

/// How a guest is packaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The module at /app.wasm in an ordinary layer.
    Layer,
    /// The CNCF OCI Wasm artifact.
    Artifact,
}

/// How a container that ran to its end finished.
#[derive(Debug, Clone)]
pub struct Finished {
    /// Its exit as CRI reports it.
    pub exit: ContainerExit,
    /// Its stdout, from the CRI log.
    pub stdout: String,
    /// Its stderr, from the CRI log.
    pub stderr: String,
}

/// A pod spec with annotations.
pub fn annotated(name: &str, annotations: &[(&str, &str)]) -> PodSpec {
    annotations
        .iter()
        .fold(PodSpec::new(name), |pod, (key, value)| {
            pod.annotation(*key, *value)
        })
}

/// How a [`Node`] is set up.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The containerd binary.
    pub containerd: PathBuf,
    /// Bulwark's node configuration (TOML).
    pub node_config: String,
    /// A CNI network for pods that are not hostNetwork.
    pub pod_network: bool,
    /// The shim binary the handler runs (default: this build's, see [`shim_binary`]).
    pub shim: Option<PathBuf>,
    /// Environment for containerd, which its shims and their workloads inherit (such as
    /// the lock-down probe, `BULWARK_LOCKDOWN_PROBE`).
    pub env: Vec<(String, String)>,
    /// Directories put first on containerd's (and its shims') PATH.
    pub path_first: Vec<PathBuf>,
}

impl NodeOptions {
    /// `containerd` with `node_config`, host networking only, this build's shim.
    pub fn new(containerd: PathBuf, node_config: &str) -> NodeOptions {
        NodeOptions {
            containerd,
            node_config: node_config.to_owned(),
            pod_network: false,
            shim: None,
            env: Vec::new(),
            path_first: Vec::new(),
        }
    }

    /// Puts `dir` first on containerd's PATH (a wrapper around a tool the shim runs).
    pub fn path_first(mut self, dir: PathBuf) -> NodeOptions {
        self.path_first.push(dir);
        self
    }

    /// Gives pods that are not hostNetwork a CNI network.
    pub fn pod_network(mut self) -> NodeOptions {
        self.pod_network = true;
        self
    }

    /// Runs `shim` as the handler's shim.
    pub fn shim(mut self, shim: PathBuf) -> NodeOptions {
        self.shim = Some(shim);
        self
    }

    /// Sets an environment variable for containerd and what it starts.
    pub fn env(mut self, name: &str, value: &str) -> NodeOptions {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }
}

/// A registry and a containerd with the `bulwark` handler.
pub struct Node {
    /// The CRI client.
    pub cri: Cri,
    /// The containerd.
    pub containerd: Containerd,
    /// The registry.
    pub registry: Registry,
    /// The pause and busybox images in the registry.
    pub images: TestImages,
    temp: tempfile::TempDir,
}

impl Node {
    /// Starts a node on `containerd_binary` with `node_config` as Bulwark's configuration.
    pub async fn start(containerd_binary: PathBuf, node_config: &str) -> Result<Node> {
        Node::start_with(NodeOptions::new(containerd_binary, node_config)).await
    }

    /// Starts a node as `options` say.
    pub async fn start_with(options: NodeOptions) -> Result<Node> {
        let temp = tempfile::tempdir()?;
        let config = temp.path().join("config.toml");
        std::fs::write(&config, &options.node_config)?;
        let registry = Registry::start()?;
        let images = push_test_images(&registry)?;
        let shim = match options.shim {
            Some(shim) => shim,
            None => shim_binary()?,
        };
        let mut containerd_options = ContainerdOptions::new(&registry, images.pause.clone())
            .binary(options.containerd)
            .env(
                "BULWARK_CACHE_DIR",
                temp.path().join("cache").display().to_string(),
            )
            .handler(
                RuntimeHandler::new(HANDLER, shim.display().to_string())
                    .pod_annotation("bulwark.dev/*")
                    .option_str("ConfigPath", &config.display().to_string()),
            );
        for (name, value) in options.env {
            containerd_options = containerd_options.env(name, value);
        }
        if options.pod_network {
            containerd_options = containerd_options.pod_network();
        }
        containerd_options.extra_path = options.path_first;
        let containerd = Containerd::start(containerd_options)?;
        let cri = containerd.cri().await?;
        Ok(Node {
            cri,
            containerd,
            registry,
            images,
            temp,
        })
    }

    /// A directory that lives as long as the node.
    pub fn temp(&self) -> &Path {
        self.temp.path()
    }

    /// The node's module cache (`BULWARK_CACHE_DIR` of its shims).
    pub fn cache_dir(&self) -> PathBuf {
        self.temp.path().join("cache")
    }

    /// Empties the module cache but for its key: the next Wasm container compiles.
    pub fn empty_cache(&self) -> Result<()> {
        let Ok(entries) = std::fs::read_dir(self.cache_dir()) else {
            return Ok(());
        };
        for entry in entries {
            let entry = entry?;
            if entry.file_name() == "key" {
                continue;
            }
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            }
            .with_context(|| format!("cannot empty the cache: {}", path.display()))?;
        }
        Ok(())
    }

    /// Waits until no shim of this containerd runs any more (they exit after their pod).
    pub async fn wait_no_shims(&self) -> Result<()> {
        let mut shims = self.containerd.shim_pids();
        for _ in 0..1000 {
            if shims.is_empty() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            shims = self.containerd.shim_pids();
        }
        let mut report = String::new();
        for pid in shims {
            // The shim's `-id` is its pod sandbox's: what containerd logged of it says
            // which call it missed.
            let args = process::arguments(pid);
            let id = args
                .iter()
                .position(|arg| arg == "-id")
                .and_then(|at| args.get(at + 1))
                .cloned()
                .unwrap_or_default();
            report.push_str(&format!("\nshim {pid} (pod sandbox {id:?}):"));
            // Where each of its threads waits, in case it was told to exit and hangs.
            for thread in process::threads(pid) {
                report.push_str(&format!(
                    "\n  thread {} {:?} state {} wchan {}",
                    thread.tid, thread.comm, thread.state, thread.wchan
                ));
            }
            if !id.is_empty() {
                let log = self.containerd.log_contents();
                let lines: Vec<&str> = log.lines().filter(|line| line.contains(&id)).collect();
                for line in &lines[lines.len().saturating_sub(40)..] {
                    report.push_str("\n  ");
                    report.push_str(line);
                }
            }
        }
        bail!("shims still running after teardown:{report}")
    }

    /// Pushes a guest from `make guests` in a format with `bulwark image push`; returns
    /// its reference.
    pub fn push_guest(&self, name: &str, format: Format) -> Result<String> {
        let module = crate::build_dir().join(format!("guests/{name}.wasm"));
        ensure!(
            module.exists(),
            "{} is missing: run `make guests`",
            module.display()
        );
        let repo = match format {
            Format::Layer => format!("guest-{name}"),
            Format::Artifact => format!("artifact-{name}"),
        };
        self.push_module(&module, &repo, format, None)
    }

    /// Pushes a component from `make components` (`build/components/NAME.wasm`, such as the
    /// wasi:http guest `httpd`) in a format; returns its reference.
    pub fn push_component(&self, name: &str, format: Format) -> Result<String> {
        let component = crate::build_dir().join(format!("components/{name}.wasm"));
        ensure!(
            component.exists(),
            "{} is missing: run `make components`",
            component.display()
        );
        let repo = match format {
            Format::Layer => format!("component-{name}"),
            Format::Artifact => format!("component-artifact-{name}"),
        };
        self.push_module(&component, &repo, format, None)
    }

    /// Pushes the module or component at `module` as `REGISTRY/repo:v1` with `bulwark image
    /// push`, its image running as `user` (`UID[:GID]`, layer format only) when given;
    /// returns its reference.
    pub fn push_module(
        &self,
        module: &Path,
        repo: &str,
        format: Format,
        user: Option<&str>,
    ) -> Result<String> {
        let format = match format {
            Format::Layer => "layer",
            Format::Artifact => "artifact",
        };
        let reference = format!("{}/{repo}:v1", self.registry.addr());
        let mut command = std::process::Command::new(bulwark_binary()?);
        command.args(["image", "push", "--insecure", "--format", format]);
        if let Some(user) = user {
            command.args(["--user", user]);
        }
        let output = command
            .arg(module)
            .arg(&reference)
            .output()
            .context("cannot run bulwark image push")?;
        ensure!(
            output.status.success(),
            "bulwark image push {reference} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(reference)
    }

    /// Pushes an ordinary image of `entries` whose entrypoint is `entrypoint` as
    /// `REGISTRY/repo:v1`; returns its reference.
    pub fn push_entries(
        &self,
        repo: &str,
        entries: &[bulwark_runtime::image::LayerEntry],
        entrypoint: &str,
    ) -> Result<String> {
        let image = bulwark_runtime::image::ordinary_image(
            entries,
            &bulwark_runtime::image::RunConfig {
                entrypoint: vec![entrypoint.to_owned()],
                ..Default::default()
            },
        )?;
        let reference = format!("{repo}:v1");
        super::images::push_image(&self.registry, self.temp(), &image, &reference)
    }

    /// Runs one container in a new `bulwark` pod to its end and tears the pod down.
    pub async fn run(&self, pod: PodSpec, container: ContainerSpec) -> Result<Finished> {
        let pod = pod.runtime_handler(HANDLER);
        self.cri.pull(&container.image).await?;
        let pod_id = self.cri.run_pod(&pod).await?;
        let result = async {
            let id = self.cri.create_container(&pod_id, &pod, &container).await?;
            self.cri.start_container(&id).await?;
            let finished = self.finished(&id, Duration::from_secs(60)).await?;
            self.cri.remove_container(&id).await?;
            Ok(finished)
        }
        .await;
        self.cri.stop_pod(&pod_id).await?;
        self.cri.remove_pod(&pod_id).await?;
        result
    }

    /// Waits (at most `timeout`) until container `id` has exited; returns how, with what it
    /// wrote to stdout and stderr.
    pub async fn finished(&self, id: &str, timeout: Duration) -> Result<Finished> {
        let exit = self.cri.wait_exited(id, timeout).await?;
        let log = self.cri.read_container_log(id).await?;
        let stream = |wanted: LogStream| -> String {
            log.iter()
                .filter(|line| line.stream == wanted)
                .map(|line| format!("{}\n", line.text))
                .collect()
        };
        Ok(Finished {
            exit,
            stdout: stream(LogStream::Stdout),
            stderr: stream(LogStream::Stderr),
        })
    }

    /// Creates and starts a container in a new `bulwark` pod, expecting the start to be
    /// refused; returns the error kubelet would show.
    pub async fn refused(&self, pod: PodSpec, container: ContainerSpec) -> Result<String> {
        let pod = pod.runtime_handler(HANDLER);
        self.cri.pull(&container.image).await?;
        let pod_id = self.cri.run_pod(&pod).await?;
        let outcome = async {
            let id = self.cri.create_container(&pod_id, &pod, &container).await?;
            let start = self.cri.start_container(&id).await;
            self.cri.remove_container(&id).await?;
            match start {
                Ok(()) => bail!("the container started"),
                // The gRPC status is quoted in the error chain; unquote it.
                Err(error) => Ok(format!("{error:#}").replace("\\\"", "\"")),
            }
        }
        .await;
        self.cri.stop_pod(&pod_id).await?;
        self.cri.remove_pod(&pod_id).await?;
        outcome
    }

    /// Fails unless nothing of the pods is left: shims, shim sockets, mounts, cgroups.
    pub async fn assert_clean(&self) -> Result<()> {
        self.wait_no_shims().await?;
        let sockets = self.containerd.new_shim_sockets();
        ensure!(sockets.is_empty(), "shim sockets left: {sockets:?}");
        let base = self.containerd.root().parent().context("no parent")?;
        let mounts = mounts_under(base)?;
        ensure!(mounts.is_empty(), "mounts left: {mounts:?}");
        // No pod or container cgroup (or systemd slice or scope) may be left.
        let left = self.containerd.pod_cgroups().leftovers()?;
        ensure!(left.is_empty(), "cgroups left: {left:?}");
        Ok(())
    }

    /// Checks that nothing is left, then stops containerd.
    pub async fn finish(self) -> Result<()> {
        self.assert_clean().await?;
        self.containerd.stop()
    }
}
