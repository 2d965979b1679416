//! A private containerd: its own root, state, sockets, registry configuration and runtime
//! handlers, in a temporary directory, so tests never touch the system's containerd.
//!
//! [`Containerd::start`] writes the configuration (version 2 for containerd 1.x, version 3 for
//! 2.x, as each release documents), starts the daemon and waits until CRI answers. Dropping
//! it (or [`Containerd::stop`]) removes whatever pods a failed test left, stops containerd by
//! PID, kills any shim of its still running, unmounts what is left under its directories,
//! removes its cgroups and deletes its directory.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use super::cgroups::{self, PodCgroups};
use super::cri::Cri;
use super::mounts;
use super::network::PodNetwork;
use super::process::{self, ServerProcess};
use super::registry::Registry;
use crate::block_on_thread;

/// Debian 12's containerd (1.6.20).
pub const SYSTEM_CONTAINERD: &str = "/usr/bin/containerd";

/// Where containerd 1.6 (and others) put shim sockets regardless of configuration.
pub const SHARED_SHIM_SOCKET_DIR: &str = "/run/containerd/s";

/// The CRI namespace containerd keeps Kubernetes' containers in.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// How long [`Containerd::start`] waits for CRI to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long containerd gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A containerd release, from `containerd --version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContainerdVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Patch version.
    pub patch: u32,
}

impl ContainerdVersion {
    /// Runs `binary --version` and parses its answer.
    pub fn of(binary: &Path) -> Result<Self> {
        let output = Command::new(binary)
            .arg("--version")
            .output()
            .with_context(|| format!("cannot run {} --version", binary.display()))?;
        let text = String::from_utf8_lossy(&output.stdout);
        Self::parse(&text).with_context(|| format!("cannot read a version in {text:?}"))
    }

    /// Parses `containerd github.com/containerd/containerd/v2 2.1.9+unknown` (the third word,
    /// with anything after the numbers ignored).
    pub fn parse(version_output: &str) -> Option<Self> {
        let word = version_output.split_whitespace().nth(2)?;
        let mut numbers = word.trim_start_matches('v').split('.').map(|part| {
            let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u32>().ok()
        });
        Some(Self {
            major: numbers.next()??,
            minor: numbers.next()??,
            patch: numbers.next().flatten().unwrap_or(0),
        })
    }
}

impl std::fmt::Display for ContainerdVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// A CRI runtime handler (what a RuntimeClass names) besides the default `runc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeHandler {
    /// The handler's name.
    pub name: String,
    /// `runtime_type`: `io.containerd.NAME.v1` (found as `containerd-shim-NAME-v1` on
    /// containerd's PATH) or an absolute path to a shim binary.
    pub runtime_type: String,
    /// Pod annotations passed to the shim (Go `path.Match` patterns: `"*"` does not match
    /// keys with a `/`; use `"bulwark.dev/*"`).
    pub pod_annotations: Vec<String>,
    /// Container annotations passed to the shim (same patterns).
    pub container_annotations: Vec<String>,
    /// The handler's `options` table: keys and TOML values written as they are (a string
    /// value needs its quotes: see [`RuntimeHandler::option_str`]).
    pub options: Vec<(String, String)>,
}

impl RuntimeHandler {
    /// A handler `name` running shims of `runtime_type`, with no annotations or options.
    pub fn new(name: impl Into<String>, runtime_type: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            runtime_type: runtime_type.into(),
            pod_annotations: Vec::new(),
            container_annotations: Vec::new(),
            options: Vec::new(),
        }
    }

    /// Adds a pod-annotation pattern.
    pub fn pod_annotation(mut self, pattern: impl Into<String>) -> Self {
        self.pod_annotations.push(pattern.into());
        self
    }

    /// Adds an option whose value is TOML (`true`, `42`, `"text"`).
    pub fn option(mut self, key: impl Into<String>, toml_value: impl Into<String>) -> Self {
        self.options.push((key.into(), toml_value.into()));
        self
    }

    /// Adds a string option, such as `ConfigPath`.
    pub fn option_str(self, key: impl Into<String>, value: &str) -> Self {
        self.option(key, toml_string(value))
    }
}

/// What [`Containerd::start`] runs.
#[derive(Debug, Clone)]
pub struct ContainerdOptions {
    /// The containerd binary ([`SYSTEM_CONTAINERD`], or one from [`fetch`]). Its directory is
    /// put first on containerd's PATH, so the `containerd-shim-runc-v2` next to it is used.
    pub binary: PathBuf,
    /// A plain-HTTP registry (`127.0.0.1:PORT`) to pull from, if any.
    pub registry: Option<String>,
    /// The sandbox (pause) image.
    pub sandbox_image: String,
    /// Handlers besides `runc`.
    pub runtime_handlers: Vec<RuntimeHandler>,
    /// containerd's log level (`info`, `debug`, ...).
    pub log_level: String,
    /// Directories to put on containerd's PATH before the binary's own and the inherited one.
    pub extra_path: Vec<PathBuf>,
    /// Environment for containerd, which its shims inherit.
    pub env: Vec<(String, String)>,
    /// Runs on the written config before containerd starts (an installer editing it, as on
    /// a node); may return a directory to put first on containerd's PATH.
    pub config_hook: Option<ConfigHook>,
    /// Runs containerd under a supervisor (a shell loop, as runit or s6 would) that starts it
    /// again whenever it exits, and stops it when stopped itself.
    pub supervised: bool,
    /// Gives pods that are not hostNetwork a CNI network (a bridge on a test-only subnet,
    /// see [`PodNetwork`]).
    pub pod_network: bool,
}

/// The supervisor of [`ContainerdOptions::supervised`]: `sh -c SUPERVISOR name BINARY ARGS...`.
const SUPERVISOR: &str = r#"trap 'kill -TERM "$child" 2>/dev/null; wait "$child"; exit 0' TERM INT
while :; do "$@" & child=$!; wait "$child"; sleep 0.1; done"#;

/// See [`ContainerdOptions::config_hook`].
pub type ConfigHook = fn(&Path) -> Result<Option<PathBuf>>;

impl ContainerdOptions {
    /// The system containerd pulling from `registry`, with `sandbox_image`, and only `runc`.
    pub fn new(registry: &Registry, sandbox_image: impl Into<String>) -> Self {
        Self {
            binary: PathBuf::from(SYSTEM_CONTAINERD),
            registry: Some(registry.addr()),
            sandbox_image: sandbox_image.into(),
            runtime_handlers: Vec::new(),
            log_level: "info".into(),
            extra_path: Vec::new(),
            env: Vec::new(),
            config_hook: None,
            supervised: false,
            pod_network: false,
        }
    }

    /// Gives pods that are not hostNetwork a network of their own.
    pub fn pod_network(mut self) -> Self {
        self.pod_network = true;
        self
    }

    /// Uses another containerd binary.
    pub fn binary(mut self, binary: impl Into<PathBuf>) -> Self {
        self.binary = binary.into();
        self
    }

    /// Adds a runtime handler.
    pub fn handler(mut self, handler: RuntimeHandler) -> Self {
        self.runtime_handlers.push(handler);
        self
    }

    /// Sets an environment variable for containerd and its shims.
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }
}

/// Makes sure containerd `version` (1.7.24 or 2.1.9) is unpacked under
/// `build/containerd/VERSION` (running `tests/containerd/fetch.sh` if not) and returns its
/// binary.
pub fn fetch(version: &str) -> Result<PathBuf> {
    static FETCHING: Mutex<()> = Mutex::new(());
    let _one_at_a_time = FETCHING.lock().unwrap_or_else(|e| e.into_inner());
    let dest = crate::build_dir().join("containerd").join(version);
    let binary = dest.join("usr/bin/containerd");
    if binary.exists() {
        return Ok(binary);
    }
    let script = crate::workspace_root().join("tests/containerd/fetch.sh");
    let output = Command::new("sh")
        .arg(&script)
        .arg(version)
        .arg(&dest)
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !output.status.success() || !binary.exists() {
        bail!(
            "{} {version} failed ({}):\n{}{}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(binary)
}

/// A running private containerd. See the module documentation.
#[derive(Debug)]
pub struct Containerd {
    process: ServerProcess,
    launch: Launch,
    dir: Option<TempDir>,
    paths: Paths,
    version: ContainerdVersion,
    cgroup_root: String,
    pod_cgroups: PodCgroups,
    sockets_before: BTreeSet<PathBuf>,
    network: Option<PodNetwork>,
    stopped: bool,
}

/// How containerd is started (again, for [`Containerd::restart`]).
#[derive(Debug, Clone)]
struct Launch {
    binary: PathBuf,
    supervised: bool,
    path: OsString,
    env: Vec<(String, String)>,
}

/// In a value of [`ContainerdOptions::env`], stands for containerd's own pid (which a test
/// cannot know before containerd starts: a shell sets it, then execs containerd).
pub const CONTAINERD_PID: &str = "${CONTAINERD_PID}";

impl Launch {
    fn command(&self, config: &Path) -> Command {
        let (with_pid, plain): (Vec<_>, Vec<_>) = self
            .env
            .iter()
            .partition(|(_, value)| value.contains(CONTAINERD_PID));
        let mut command = if !with_pid.is_empty() {
            // `exec` keeps the shell's pid: $$ is containerd's.
            let mut script = String::from("CONTAINERD_PID=$$; ");
            for (name, value) in &with_pid {
                assert!(
                    !value.contains(['"', '`', '\\']),
                    "{name}: a value with {CONTAINERD_PID} may not hold quotes or backslashes"
                );
                script.push_str(&format!("export {name}=\"{value}\"; "));
            }
            script.push_str("exec \"$@\"");
            let mut shell = Command::new("/bin/sh");
            shell.args(["-c", &script, "containerd"]);
            if self.supervised {
                shell.args(["/bin/sh", "-c", SUPERVISOR, "containerd-supervisor"]);
            }
            shell.arg(&self.binary);
            shell
        } else if self.supervised {
            let mut supervisor = Command::new("/bin/sh");
            supervisor
                .args(["-c", SUPERVISOR, "containerd-supervisor"])
                .arg(&self.binary);
            supervisor
        } else {
            Command::new(&self.binary)
        };
        command
            .arg("--config")
            .arg(config)
            .env("PATH", &self.path)
            .envs(plain.into_iter().map(|(k, v)| (k, v)));
        command
    }
}

/// The files and directories of one containerd, all inside its temporary directory.
#[derive(Debug, Clone)]
struct Paths {
    base: PathBuf,
    root: PathBuf,
    state: PathBuf,
    grpc: PathBuf,
    ttrpc: PathBuf,
    debug: PathBuf,
    opt: PathBuf,
    certs: PathBuf,
    cni_bin: PathBuf,
    cni_conf: PathBuf,
    config: PathBuf,
    log: PathBuf,
    kubelet: PathBuf,
}

impl Paths {
    fn new(base: &Path) -> Self {
        Self {
            base: base.to_path_buf(),
            root: base.join("root"),
            state: base.join("state"),
            grpc: base.join("containerd.sock"),
            ttrpc: base.join("containerd.ttrpc.sock"),
            debug: base.join("debug.sock"),
            opt: base.join("opt"),
            certs: base.join("certs.d"),
            cni_bin: base.join("cni/bin"),
            cni_conf: base.join("cni/net.d"),
            config: base.join("config.toml"),
            log: base.join("containerd.log"),
            kubelet: base.join("kubelet"),
        }
    }
}

impl Containerd {
    /// Writes the configuration, starts containerd and waits until its CRI service answers
    /// `Version`.
    pub fn start(opts: ContainerdOptions) -> Result<Self> {
        let version = ContainerdVersion::of(&opts.binary)?;
        // Short: shim sockets live below the state directory in newer releases, and a unix
        // socket's path must stay under 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("bwk-cd-")
            .tempdir_in("/tmp")
            .context("cannot make containerd's directory")?;
        let paths = Paths::new(&fs::canonicalize(dir.path())?);
        for d in [
            &paths.root,
            &paths.state,
            &paths.opt,
            &paths.certs,
            &paths.cni_bin,
            &paths.cni_conf,
            &paths.kubelet,
        ] {
            fs::create_dir_all(d)?;
        }
        if let Some(registry) = &opts.registry {
            let host_dir = paths.certs.join(registry);
            fs::create_dir_all(&host_dir)?;
            fs::write(
                host_dir.join("hosts.toml"),
                format!(
                    "server = {}\n\n[host.{}]\n  capabilities = [\"pull\", \"resolve\", \"push\"]\n  skip_verify = true\n",
                    toml_string(&format!("http://{registry}")),
                    toml_string(&format!("http://{registry}")),
                ),
            )?;
        }
        fs::write(&paths.config, config_toml(&opts, version, &paths))?;
        let hook_path = match opts.config_hook {
            Some(hook) => hook(&paths.config).context("the config hook failed")?,
            None => None,
        };

        let sockets_before = shim_sockets(&paths.state);
        let cgroup_root = paths
            .base
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "bwk-cd".into());
        let pod_cgroups = PodCgroups::from_env(&cgroup_root)?;
        let network = match opts.pod_network {
            true => {
                let network = PodNetwork::new(&cgroup_root);
                network.install(
                    &paths.cni_bin,
                    &paths.cni_conf,
                    &paths.base.join("cni/ipam"),
                )?;
                Some(network)
            }
            false => None,
        };

        let mut path_var: Vec<PathBuf> = hook_path.into_iter().collect();
        path_var.extend(opts.extra_path.iter().cloned());
        if let Some(bin_dir) = opts.binary.parent() {
            path_var.push(bin_dir.to_path_buf());
        }
        path_var.extend(std::env::split_paths(
            &std::env::var_os("PATH")
                .unwrap_or_else(|| OsString::from("/usr/sbin:/usr/bin:/sbin:/bin")),
        ));
        let launch = Launch {
            binary: opts.binary.clone(),
            supervised: opts.supervised,
            path: std::env::join_paths(path_var)?,
            env: opts.env.clone(),
        };
        let process =
            ServerProcess::spawn("containerd", &mut launch.command(&paths.config), &paths.log)?;
        let mut containerd = Self {
            process,
            launch,
            dir: Some(dir),
            paths,
            version,
            cgroup_root,
            pod_cgroups,
            sockets_before,
            network,
            stopped: false,
        };
        containerd.wait_ready()?;
        Ok(containerd)
    }

    /// Waits until containerd's CRI service answers `Version` (again, after a restart).
    pub fn wait_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.process.exited()? {
                bail!(
                    "containerd {} exited ({status}) while starting; its log:\n{}",
                    self.version,
                    self.log_contents()
                );
            }
            if self.paths.grpc.exists() {
                let socket = self.paths.grpc.clone();
                let answered =
                    block_on_thread(|| async move { Cri::connect(&socket).await?.version().await });
                if answered.is_ok() {
                    log::info!(
                        "containerd {} ready in {:?} (pid {})",
                        self.version,
                        started.elapsed(),
                        self.pid()
                    );
                    return Ok(());
                }
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!(
                    "containerd {} did not answer CRI Version within {READY_TIMEOUT:?}; its log:\n{}",
                    self.version,
                    self.log_contents()
                );
            }
            sleep(Duration::from_millis(25));
        }
    }

    /// Stops containerd (SIGTERM, by PID) while its pods run, and starts it again on the
    /// same configuration and state, as `systemctl restart containerd` does on a node: its
    /// shims and their containers keep running. Returns once CRI answers again.
    pub fn restart(&mut self) -> Result<()> {
        self.stop_daemon()?;
        self.start_daemon()
    }

    /// Stops containerd alone (SIGTERM, by PID), leaving its shims and containers running,
    /// until [`Containerd::start_daemon`].
    pub fn stop_daemon(&mut self) -> Result<()> {
        let status = self.process.stop(STOP_GRACE)?;
        log::info!(
            "containerd {} stopped for a restart ({status})",
            self.version
        );
        Ok(())
    }

    /// Starts containerd again after [`Containerd::stop_daemon`]; returns once CRI answers.
    pub fn start_daemon(&mut self) -> Result<()> {
        self.process = ServerProcess::spawn(
            "containerd",
            &mut self.launch.command(&self.paths.config),
            &self.paths.log,
        )?;
        self.wait_ready()
    }

    /// A CRI client for this containerd: logs and termination-message files go under its
    /// directory, and pods get cgroups as [`Containerd::pod_cgroups`] says.
    pub async fn cri(&self) -> Result<Cri> {
        Cri::connect_with(
            &self.paths.grpc,
            &self.paths.kubelet,
            Some(self.pod_cgroups.clone()),
        )
        .await
    }

    /// Where pods of [`Containerd::cri`] clients get their cgroups: below
    /// [`Containerd::cgroup_root`], or in systemd slices when the tests run with the
    /// systemd driver (see [`cgroups::DRIVER_ENV`]).
    pub fn pod_cgroups(&self) -> &PodCgroups {
        &self.pod_cgroups
    }

    /// The pods' CNI network, if it has one ([`ContainerdOptions::pod_network`]).
    pub fn pod_network(&self) -> Option<&PodNetwork> {
        self.network.as_ref()
    }

    /// containerd's gRPC (and CRI) socket.
    pub fn socket(&self) -> &Path {
        &self.paths.grpc
    }

    /// containerd's root directory (content store, snapshots, metadata).
    pub fn root(&self) -> &Path {
        &self.paths.root
    }

    /// containerd's state directory (bundles, FIFOs, sandbox files).
    pub fn state(&self) -> &Path {
        &self.paths.state
    }

    /// The configuration file containerd runs with.
    pub fn config_path(&self) -> &Path {
        &self.paths.config
    }

    /// The file containerd's stdout and stderr go to.
    pub fn log_path(&self) -> &Path {
        &self.paths.log
    }

    /// What containerd has logged so far.
    pub fn log_contents(&self) -> String {
        fs::read_to_string(&self.paths.log).unwrap_or_default()
    }

    /// containerd's PID (its supervisor's, when [`ContainerdOptions::supervised`]).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The running release.
    pub fn version(&self) -> ContainerdVersion {
        self.version
    }

    /// The relative cgroup under which pods of [`Containerd::cri`] clients go (removed on
    /// stop).
    pub fn cgroup_root(&self) -> &str {
        &self.cgroup_root
    }

    /// Shim sockets that exist now and did not when this containerd started, in
    /// [`SHARED_SHIM_SOCKET_DIR`] and in `<state>/s`. With all pods removed this should be
    /// empty. (The shared directory is shared: this only means something while one
    /// containerd runs at a time.)
    pub fn new_shim_sockets(&self) -> Vec<PathBuf> {
        shim_sockets(&self.paths.state)
            .difference(&self.sockets_before)
            .cloned()
            .collect()
    }

    /// PIDs of the shims this containerd started that are still running (they are started
    /// with `-address <this containerd's socket>`).
    pub fn shim_pids(&self) -> Vec<u32> {
        let address = self.paths.grpc.display().to_string();
        process::pids_with_argument(&address)
            .into_iter()
            .filter(|pid| *pid != self.pid())
            .collect()
    }

    /// Stops containerd and cleans up (see the module documentation). Leftovers of a failed
    /// test that had to be cleaned are printed; anything that could not be cleaned is the
    /// error. Dropping does the same but can only print that error.
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        // What a failed test left and was cleaned up (printed), and what could not be
        // cleaned up (the error).
        let mut cleaned: Vec<String> = Vec::new();
        let mut problems: Vec<String> = Vec::new();

        // 1. Whatever pods a failed test left: stop and remove them through CRI, so their
        //    shims exit and unmount as they would on a node.
        if matches!(self.process.exited(), Ok(None)) {
            let socket = self.paths.grpc.clone();
            let kubelet = self.paths.kubelet.clone();
            let pod_cgroups = self.pod_cgroups.clone();
            let removed = block_on_thread(|| async move {
                let cri = Cri::connect_with(&socket, &kubelet, Some(pod_cgroups)).await?;
                tokio::time::timeout(Duration::from_secs(60), cri.remove_everything())
                    .await
                    .context("timed out")?
            });
            match removed {
                Ok(0) => {}
                Ok(n) => cleaned.push(format!("removed {n} leftover pods and containers")),
                Err(err) => cleaned.push(format!("could not remove leftover pods: {err:#}")),
            }
        }

        // 2. containerd itself, by PID.
        let stopping = Instant::now();
        match self.process.stop(STOP_GRACE) {
            Ok(status) => log::info!(
                "containerd {} stopped in {:?} ({status})",
                self.version,
                stopping.elapsed()
            ),
            Err(err) => problems.push(format!("stopping containerd: {err:#}")),
        }

        // 3. Shims still running (only when step 1 failed), with their containers.
        for pid in self.shim_pids() {
            cleaned.push(format!("killed shim {pid} and its processes"));
            let left = process::kill_tree(pid, Duration::from_secs(5));
            if !left.is_empty() {
                problems.push(format!("processes survived SIGKILL: {left:?}"));
            }
        }

        // Sockets of killed shims stay behind in the shared directory: remove the new ones
        // nobody listens on any more (a live shim of another containerd still answers).
        for socket in self.new_shim_sockets() {
            let refused = matches!(
                UnixStream::connect(&socket),
                Err(err) if err.kind() == ErrorKind::ConnectionRefused
            );
            if refused && fs::remove_file(&socket).is_ok() {
                cleaned.push(format!(
                    "removed the stale shim socket {}",
                    socket.display()
                ));
            }
        }

        // 4. Mounts left under root and state (rootfs overlays, sandbox /dev/shm, ...).
        match mounts::unmount_all_under(&self.paths.base) {
            Ok(unmounted) if !unmounted.is_empty() => {
                cleaned.push(format!("unmounted {unmounted:?}"));
            }
            Ok(_) => {}
            Err(err) => problems.push(format!("unmounting: {err:#}")),
        }

        // 5. Cgroups of its pods (those of runc's pods too, below the cgroup root).
        if let Err(err) = self.pod_cgroups.remove_all() {
            problems.push(format!("removing pod cgroups: {err:#}"));
        }
        if let Err(err) = cgroups::remove(&self.cgroup_root) {
            problems.push(format!("removing cgroups: {err:#}"));
        }

        // 6. The pods' bridge.
        if let Some(network) = self.network.take()
            && let Err(err) = network.remove()
        {
            problems.push(format!("removing the pod network: {err:#}"));
        }

        // 7. The directory.
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            if let Err(err) = dir.close() {
                problems.push(format!("removing {}: {err}", path.display()));
            }
        }

        if !cleaned.is_empty() {
            eprintln!(
                "containerd {} clean-up after a failure: {}",
                self.version,
                cleaned.join("; ")
            );
        }
        if problems.is_empty() {
            Ok(())
        } else {
            bail!(
                "containerd {} clean-up left things behind: {}",
                self.version,
                problems.join("; ")
            )
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Err(err) = self.shutdown() {
            eprintln!("{err:#}");
        }
    }
}

/// Shim sockets in the shared directory and under `state/s`.
fn shim_sockets(state: &Path) -> BTreeSet<PathBuf> {
    [
        Path::new(SHARED_SHIM_SOCKET_DIR).to_path_buf(),
        state.join("s"),
    ]
    .iter()
    .filter_map(|dir| fs::read_dir(dir).ok())
    .flatten()
    .filter_map(|entry| Some(entry.ok()?.path()))
    .collect()
}

/// `value` as a TOML basic string, quotes included.
pub fn toml_string(value: &str) -> String {
    toml::Value::String(value.to_string()).to_string()
}

/// containerd's configuration: version 2 for 1.x, version 3 (where the CRI plugin is split
/// into `io.containerd.cri.v1.images` and `.runtime`) for 2.x.
fn config_toml(opts: &ContainerdOptions, version: ContainerdVersion, paths: &Paths) -> String {
    let path = |p: &Path| toml_string(&p.display().to_string());
    let v3 = version.major >= 2;
    let mut config = TomlWriter::default();
    config.entries(&[
        ("version", if v3 { "3" } else { "2" }.to_string()),
        ("root", path(&paths.root)),
        ("state", path(&paths.state)),
    ]);
    config.table("grpc", &[("address", path(&paths.grpc))]);
    config.table("ttrpc", &[("address", path(&paths.ttrpc))]);
    config.table(
        "debug",
        &[
            ("address", path(&paths.debug)),
            ("level", toml_string(&opts.log_level)),
        ],
    );
    config.table(
        r#"plugins."io.containerd.internal.v1.opt""#,
        &[("path", path(&paths.opt))],
    );

    // The CRI server streams on 127.0.0.1 and a random port. restrict_oom_score_adj: this
    // machine lacks CAP_SYS_RESOURCE for lowering a score.
    let cri = r#"plugins."io.containerd.grpc.v1.cri""#;
    let stream = [
        ("stream_server_address", toml_string("127.0.0.1")),
        ("stream_server_port", toml_string("0")),
    ];
    let oom = ("restrict_oom_score_adj", "true".to_string());
    // Pod network namespaces under the state directory, so nothing outlives the test there.
    let netns = ("netns_mounts_under_state_dir", "true".to_string());
    let (images, runtime) = if v3 {
        config.table(cri, &stream);
        let images = r#"plugins."io.containerd.cri.v1.images""#;
        let runtime = r#"plugins."io.containerd.cri.v1.runtime""#;
        config.table(
            &format!("{images}.pinned_images"),
            &[("sandbox", toml_string(&opts.sandbox_image))],
        );
        config.table(runtime, &[oom, netns]);
        config.table(
            &format!("{runtime}.cni"),
            &[
                ("bin_dirs", format!("[{}]", path(&paths.cni_bin))),
                ("conf_dir", path(&paths.cni_conf)),
            ],
        );
        (images, runtime)
    } else {
        let [address, port] = stream;
        config.table(
            cri,
            &[
                address,
                port,
                ("sandbox_image", toml_string(&opts.sandbox_image)),
                oom,
                netns,
            ],
        );
        config.table(
            &format!("{cri}.cni"),
            &[
                ("bin_dir", path(&paths.cni_bin)),
                ("conf_dir", path(&paths.cni_conf)),
            ],
        );
        (cri, cri)
    };
    config.table(
        &format!("{images}.registry"),
        &[("config_path", path(&paths.certs))],
    );
    config.table(
        &format!("{runtime}.containerd"),
        &[("default_runtime_name", toml_string("runc"))],
    );
    let runc = RuntimeHandler::new("runc", "io.containerd.runc.v2")
        .option_str("Root", &paths.state.join("runc").display().to_string());
    for handler in std::iter::once(&runc).chain(&opts.runtime_handlers) {
        let list = |items: &[String]| {
            let quoted: Vec<String> = items.iter().map(|i| toml_string(i)).collect();
            format!("[{}]", quoted.join(", "))
        };
        let table = format!("{runtime}.containerd.runtimes.{}", toml_key(&handler.name));
        config.table(
            &table,
            &[
                ("runtime_type", toml_string(&handler.runtime_type)),
                ("pod_annotations", list(&handler.pod_annotations)),
                (
                    "container_annotations",
                    list(&handler.container_annotations),
                ),
            ],
        );
        if !handler.options.is_empty() {
            let options: Vec<(&str, String)> = handler
                .options
                .iter()
                .map(|(key, value)| (key.as_str(), value.clone()))
                .collect();
            config.table(&format!("{table}.options"), &options);
        }
    }
    if version
        >= (ContainerdVersion {
            major: 1,
            minor: 7,
            patch: 0,
        })
    {
        // NRI's socket is machine-wide (/var/run/nri/nri.sock); 2.x enables NRI by default.
        config.table(
            r#"plugins."io.containerd.nri.v1.nri""#,
            &[("disable", "true".to_string())],
        );
    }
    if v3 {
        // Pulls may go through the transfer service, which reads its own hosts directory.
        config.table(
            r#"plugins."io.containerd.transfer.v1.local""#,
            &[("config_path", path(&paths.certs))],
        );
    }
    config.out
}

/// Writes TOML tables whose values are already TOML.
#[derive(Default)]
struct TomlWriter {
    out: String,
}

impl TomlWriter {
    fn entries(&mut self, entries: &[(&str, String)]) {
        for (key, value) in entries {
            let _ = writeln!(self.out, "{} = {value}", toml_key(key));
        }
        self.out.push('\n');
    }

    fn table(&mut self, name: &str, entries: &[(&str, String)]) {
        let _ = writeln!(self.out, "[{name}]");
        self.entries(entries);
    }
}

/// `key` bare if TOML allows it, else quoted.
fn toml_key(key: &str) -> String {
    if !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        key.to_string()
    } else {
        toml_string(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> ContainerdOptions {
        ContainerdOptions {
            binary: PathBuf::from(SYSTEM_CONTAINERD),
            registry: Some("127.0.0.1:5000".into()),
            sandbox_image: "127.0.0.1:5000/pause:3.9".into(),
            runtime_handlers: vec![
                RuntimeHandler::new("bulwark", "/opt/bin/containerd-shim-bulwark-v1")
                    .pod_annotation("bulwark.dev/*")
                    .option_str("ConfigPath", "/etc/bulwark/node.toml"),
            ],
            log_level: "info".into(),
            extra_path: Vec::new(),
            env: Vec::new(),
            config_hook: None,
            supervised: false,
            pod_network: false,
        }
    }

    #[test]
    fn parses_versions() {
        let v = |s| ContainerdVersion::parse(s).unwrap();
        assert_eq!(
            v("containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3"),
            ContainerdVersion {
                major: 1,
                minor: 6,
                patch: 20
            }
        );
        assert_eq!(
            v("containerd github.com/containerd/containerd/v2 2.1.9+unknown "),
            ContainerdVersion {
                major: 2,
                minor: 1,
                patch: 9
            }
        );
        assert_eq!(v("containerd x v1.7.24").to_string(), "1.7.24");
        assert!(ContainerdVersion::parse("nonsense").is_none());
    }

    #[test]
    fn configs_are_valid_toml_with_the_handlers() {
        let paths = Paths::new(Path::new("/tmp/bwk-cd-test"));
        for (version, runtimes) in [
            ("1.6.20", "io.containerd.grpc.v1.cri"),
            ("2.1.9", "io.containerd.cri.v1.runtime"),
        ] {
            let version = ContainerdVersion::parse(&format!("c x {version}")).unwrap();
            let text = config_toml(&options(), version, &paths);
            let config: toml::Table =
                toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
            let handler = &config["plugins"][runtimes]["containerd"]["runtimes"]["bulwark"];
            assert_eq!(
                handler["runtime_type"].as_str(),
                Some("/opt/bin/containerd-shim-bulwark-v1")
            );
            assert_eq!(
                handler["pod_annotations"][0].as_str(),
                Some("bulwark.dev/*")
            );
            assert_eq!(
                handler["options"]["ConfigPath"].as_str(),
                Some("/etc/bulwark/node.toml")
            );
            let cri = &config["plugins"][runtimes];
            assert_eq!(cri["restrict_oom_score_adj"].as_bool(), Some(true));
        }
    }
}
