//! The shim's side of a workload process: start it in the pod's namespaces with its
//! descriptors, place it in its cgroup, let it load, and hold it at its gate until Start.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::bundle::spec::Namespace;
use crate::cgroup::Cgroup;
use crate::process::binaries::{WORKLOAD_BINARY, beside_shim};
use crate::process::{
    ProcessLimits, on_spawner_thread, pipe, place_descriptors, read_to_end_within,
};

use super::{LOCKDOWN_PROBE_ENV, LoadReport, WORKLOAD_ARG, WORKLOAD_GATE_FD};

/// How the shim starts a workload process: its plan, the descriptors it inherits and the
/// pod namespaces it is born into.
#[derive(Debug)]
pub struct Launch {
    /// The plan file.
    pub plan: PathBuf,
    /// The compiled artifact, open read-only.
    pub artifact: File,
    /// The preopened directories, in the plan's order.
    pub preopens: Vec<File>,
    /// The termination-message file kubelet made, open for writing.
    pub termination_log: Option<File>,
    /// The egress counters the shim keeps current, open read-only (serving workloads).
    pub egress_counts: Option<File>,
    /// The namespaces to join (with a path) or to get anew (without).
    pub namespaces: Vec<Namespace>,
}

impl Launch {
    /// The command that starts the workload process (`exe`: the workload binary beside the
    /// shim, see [`crate::process::binaries`]), gated on `gate` (the read end of a [`pipe`]) and reporting
    /// its load on `report` (the write end of another). Only async-signal-safe calls happen
    /// in the child before it runs: it asks to die with its parent, moves its descriptors
    /// into place and enters the pod's namespaces.
    pub fn command(self, gate: &File, report: &File, exe: &Path) -> Result<Command> {
        use std::os::unix::process::CommandExt;
        let mut joins: Vec<(libc::c_int, OwnedFd)> = Vec::new();
        let mut unshare = 0;
        for namespace in &self.namespaces {
            match &namespace.path {
                Some(path) => {
                    let file = File::open(path).with_context(|| {
                        format!(
                            "cannot open the pod's {} namespace {}",
                            namespace.kind.proc_name(),
                            path.display()
                        )
                    })?;
                    joins.push((namespace.kind.clone_flag(), file.into()));
                }
                None => unshare |= namespace.kind.clone_flag(),
            }
        }
        let mut inherited: Vec<OwnedFd> = vec![
            gate.try_clone()?.into(),
            report.try_clone()?.into(),
            self.artifact.into(),
        ];
        inherited.extend(self.preopens.into_iter().map(OwnedFd::from));
        inherited.extend(self.termination_log.map(OwnedFd::from));
        inherited.extend(self.egress_counts.map(OwnedFd::from));
        let parent = std::process::id() as libc::pid_t;
        let mut command = Command::new(exe);
        command.arg0("bulwark-workload");
        command.arg(WORKLOAD_ARG).arg(&self.plan);
        // SAFETY: the closure makes only async-signal-safe system calls (prctl, getppid,
        // fcntl, dup2, setns, unshare) on descriptors it owns.
        unsafe {
            command.pre_exec(move || {
                crate::process::die_with_parent(parent)?;
                place_descriptors(&inherited, WORKLOAD_GATE_FD)?;
                for (flag, namespace) in &joins {
                    if libc::setns(namespace.as_raw_fd(), *flag) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if unshare != 0 && libc::unshare(unshare) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(command)
    }
}

/// Environment the shim passes on to its workload processes (nothing else of its own
/// environment reaches them).
const PASSED_ENV: [&str; 3] = [
    bulwark_runtime::cache::CACHE_DIR_ENV,
    LOCKDOWN_PROBE_ENV,
    "RUST_LOG",
];

/// Why a workload process was not started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// It reported that what the pod asks for cannot be given (see [`LoadReport::Refused`]).
    #[error("{0}")]
    Refused(String),
    /// It could not be started, placed, or loaded, for a reason that is not the pod's.
    #[error("{0}")]
    Failed(String),
}

/// How long a workload may take to load its artifact and report.
const LOAD_TIMEOUT: Duration = Duration::from_secs(120);

/// A workload process, loaded and waiting at its gate for [`Gated::release`].
#[derive(Debug)]
pub struct Gated {
    /// Its pid.
    pub pid: u32,
    gate: File,
}

impl Gated {
    /// Lets the workload run (it locks itself down and runs the guest).
    pub fn release(&self) -> std::io::Result<()> {
        (&self.gate).write_all(b"1")
    }
}

/// Starts the workload process of `launch` with `stdio`, places it in `cgroup`, applies
/// `limits`, and lets it load its artifact; it then waits at its gate for Start. What it
/// reports of loading is Create's answer: refused with its reason, or ready. On failure
/// nothing is left running.
pub fn start_gated(
    launch: Launch,
    stdio: [std::process::Stdio; 3],
    cgroup: Option<&Cgroup>,
    limits: &ProcessLimits,
) -> Result<Gated, StartError> {
    let failed = |message: String| StartError::Failed(message);
    let (gate_reader, mut gate) =
        pipe().map_err(|e| failed(format!("cannot make the workload's gate: {e}")))?;
    let (report, report_writer) =
        pipe().map_err(|e| failed(format!("cannot make the workload's report pipe: {e}")))?;
    let exe = beside_shim(WORKLOAD_BINARY).map_err(failed)?;
    let mut command = launch
        .command(&gate_reader, &report_writer, &exe.path())
        .map_err(|e| failed(format!("{e:#}")))?;
    let [stdin, stdout, stderr] = stdio;
    command
        .env_clear()
        .current_dir("/")
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr);
    for name in PASSED_ENV {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    let mut child = on_spawner_thread(move || command.spawn())
        .map_err(|e| failed(format!("cannot start the workload process: {e}")))?;
    drop(gate_reader);
    drop(report_writer);
    let pid = child.id();
    let placed = match cgroup {
        Some(cgroup) => cgroup
            .place(pid)
            .map_err(|error| StartError::Failed(error.to_string())),
        None => Ok(()),
    };
    let loaded = placed
        .and_then(|()| limits.apply(pid).map_err(failed))
        .and_then(|()| {
            gate.write_all(b"1").map_err(|e| {
                failed(format!(
                    "the workload process is gone before it loaded: {e}"
                ))
            })
        })
        .and_then(|()| await_load(report));
    if let Err(error) = loaded {
        // Closing the gate unreleased makes the workload exit without running; kill it
        // anyway so nothing is left running.
        let _ = child.kill();
        return Err(error);
    }
    Ok(Gated { pid, gate })
}

/// The workload's report of its load.
fn await_load(report: File) -> Result<(), StartError> {
    let json = read_to_end_within(report, LOAD_TIMEOUT).map_err(|error| {
        StartError::Failed(format!(
            "the workload process did not report its load: {error}"
        ))
    })?;
    match serde_json::from_slice(&json) {
        Ok(LoadReport::Loaded) => Ok(()),
        Ok(LoadReport::Refused(message)) => Err(StartError::Refused(message)),
        Ok(LoadReport::Failed(message)) => Err(StartError::Failed(message)),
        Err(_) => Err(StartError::Failed(
            "the workload process exited before it loaded its module (its log says why)".into(),
        )),
    }
}
