//! Native (non-Wasm) containers, on nodes whose configuration allows them
//! (`capabilities.allow_native`, for sidecars): run by the node's own `runc`, the runtime
//! containerd would have used for them, from the bundle containerd prepared.
//!
//! The shim gives runc a copy of the bundle's config.json whose root path is absolute (runc
//! runs it from a directory of its own). Its namespace paths name the pod sandbox's holder
//! (`/proc/<holder pid>/ns/...`, see [`crate::process::holder`]), so a sidecar shares the pod's
//! network, IPC and UTS namespaces exactly as in a runc pod.
//!
//! runc's state lives in the bundle, so nothing of it outlives the container's Delete.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use containerd_shim::monitor::{Topic, monitor_subscribe, wait_pid};
use oci_spec::runtime::Spec;

/// The runc binary: containerd's PATH has it on every node that runs runc pods.
const RUNC: &str = "runc";

/// A native container failed to be created, started or deleted.
#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    /// The bundle's spec could not be read or rewritten.
    #[error("native container: {0}")]
    Spec(String),
    /// runc could not run, or said no.
    #[error("native container: runc {action}: {message}")]
    Runc {
        /// The runc command.
        action: &'static str,
        /// What runc said (its log), or why it could not run.
        message: String,
    },
}

/// One native container, run by runc.
#[derive(Debug, Clone)]
pub struct NativeContainer {
    id: String,
    /// Where runc's bundle (the rewritten config.json), state and log live.
    dir: PathBuf,
    systemd_cgroup: bool,
}

/// The container's stdio: the FIFOs containerd made, opened.
pub struct NativeStdio {
    /// stdin.
    pub stdin: Stdio,
    /// stdout.
    pub stdout: Stdio,
    /// stderr.
    pub stderr: Stdio,
}

impl NativeContainer {
    /// `runc create` for container `id` of `bundle` (its rootfs already mounted at
    /// `bundle/rootfs`); returns the container and its init process's pid, which waits
    /// for [`NativeContainer::start`].
    pub fn create(
        id: &str,
        bundle: &Path,
        stdio: NativeStdio,
    ) -> Result<(NativeContainer, u32), NativeError> {
        let dir = bundle.join("bulwark-native");
        std::fs::create_dir_all(&dir)
            .map_err(|e| NativeError::Spec(format!("cannot create {}: {e}", dir.display())))?;
        let mut spec = Spec::load(bundle.join("config.json"))
            .map_err(|e| NativeError::Spec(format!("cannot read config.json: {e}")))?;
        if let Some(root) = spec.root().clone() {
            let mut root = root;
            root.set_path(bundle.join(root.path()));
            spec.set_root(Some(root));
        }
        let systemd_cgroup = spec
            .linux()
            .as_ref()
            .and_then(|linux| linux.cgroups_path().as_ref())
            .is_some_and(|path| crate::cgroup::is_systemd_form(&path.to_string_lossy()));
        spec.save(dir.join("config.json"))
            .map_err(|e| NativeError::Spec(format!("cannot write config.json: {e}")))?;
        let container = NativeContainer {
            id: id.to_owned(),
            dir,
            systemd_cgroup,
        };
        let pid_file = container.dir.join("init.pid");
        let bundle_arg = container.dir.display().to_string();
        let pid_arg = pid_file.display().to_string();
        container.runc(
            "create",
            &["--bundle", &bundle_arg, "--pid-file", &pid_arg, id],
            Some(stdio),
        )?;
        let pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|text| text.trim().parse().ok());
        match pid {
            Some(pid) => Ok((container, pid)),
            None => {
                // Created but unusable: take it down again rather than leave it waiting.
                let _ = container.delete();
                Err(NativeError::Runc {
                    action: "create",
                    message: format!("no pid in {}", pid_file.display()),
                })
            }
        }
    }

    /// `runc start`: the init process runs the container's entrypoint.
    pub fn start(&self) -> Result<(), NativeError> {
        self.runc("start", &[&self.id], None)
    }

    /// `runc delete --force`: kills what is left, removes the container's cgroup and runc's
    /// state.
    pub fn delete(&self) -> Result<(), NativeError> {
        let result = self.runc("delete", &["--force", &self.id], None);
        let _ = std::fs::remove_dir_all(&self.dir);
        result
    }

    /// Runs one runc command to its end. containerd-shim's reaper reaps every child of the
    /// shim, so the exit status comes from its monitor rather than from waiting.
    fn runc(
        &self,
        action: &'static str,
        args: &[&str],
        stdio: Option<NativeStdio>,
    ) -> Result<(), NativeError> {
        let log = self.dir.join("runc.log");
        let failed = |message: String| NativeError::Runc { action, message };
        let mut command = Command::new(RUNC);
        command
            .arg("--root")
            .arg(self.dir.join("state"))
            .arg("--log")
            .arg(&log);
        if self.systemd_cgroup {
            command.arg("--systemd-cgroup");
        }
        command.arg(action).args(args);
        match stdio {
            // runc hands its own stdio to the container (no terminal): the FIFOs.
            Some(stdio) => {
                command
                    .stdin(stdio.stdin)
                    .stdout(stdio.stdout)
                    .stderr(stdio.stderr);
            }
            None => {
                command
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
            }
        }
        let subscription = monitor_subscribe(Topic::Pid)
            .map_err(|e| failed(format!("cannot watch its exit: {e}")))?;
        let child = command
            .spawn()
            .map_err(|e| failed(format!("cannot run {RUNC}: {e}")))?;
        let code = wait_pid(child.id() as i32, subscription);
        drop(command);
        if code == 0 {
            return Ok(());
        }
        Err(failed(format!(
            "exit status {code}: {}",
            last_error(&log).unwrap_or_else(|| "no log".into())
        )))
    }
}

/// The message of the last error line in runc's log (JSON lines with a `msg`), if any.
fn last_error(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().rev().find_map(|line| {
        let entry: serde_json::Value = serde_json::from_str(line).ok()?;
        (entry["level"] == "error").then(|| entry["msg"].as_str().unwrap_or(line).to_owned())
    })
}

/// After the shim died (containerd's `delete` action, a process of its own without the
/// daemon's reaper): `runc delete --force` the native container `id` of `bundle`, if it has
/// one, which kills what is left of it and removes its cgroup.
pub fn delete_after_shim_died(id: &str, bundle: &Path) -> Result<(), NativeError> {
    let dir = bundle.join("bulwark-native");
    if !dir.join("state").exists() {
        return Ok(());
    }
    let systemd_cgroup = Spec::load(dir.join("config.json"))
        .ok()
        .and_then(|spec| spec.linux().clone())
        .and_then(|linux| linux.cgroups_path().clone())
        .is_some_and(|path| crate::cgroup::is_systemd_form(&path.to_string_lossy()));
    let mut command = Command::new(RUNC);
    command.arg("--root").arg(dir.join("state"));
    if systemd_cgroup {
        command.arg("--systemd-cgroup");
    }
    let status = command
        .args(["delete", "--force", id])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| NativeError::Runc {
            action: "delete",
            message: format!("cannot run {RUNC}: {e}"),
        })?;
    let _ = std::fs::remove_dir_all(&dir);
    if status.success() {
        Ok(())
    } else {
        Err(NativeError::Runc {
            action: "delete",
            message: format!("exit status {status}"),
        })
    }
}
