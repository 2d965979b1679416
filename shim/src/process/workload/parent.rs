//! The shim's side of a workload process: start it in the pod's namespaces with its
//! descriptors, place it in its cgroup, and hold it at its gate until Start.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::bundle::spec::Namespace;
use crate::cgroup::Cgroup;
use crate::process::{ProcessLimits, SELF_EXE, on_spawner_thread, pipe, place_descriptors};

use super::{LOCKDOWN_PROBE_ENV, WORKLOAD_ARG, WORKLOAD_GATE_FD};

/// How the shim starts a workload process: its plan, the descriptors it inherits and the
/// pod namespaces it is born into.
#[derive(Debug)]
pub struct Launch {
    /// The plan file.
    pub plan: PathBuf,
    /// The module, open for reading.
    pub module: File,
    /// The preopened directories, in the plan's order.
    pub preopens: Vec<File>,
    /// The termination-message file kubelet made, open for writing.
    pub termination_log: Option<File>,
    /// The namespaces to join (with a path) or to get anew (without).
    pub namespaces: Vec<Namespace>,
}

impl Launch {
    /// The command that starts the workload process (`exe`: the shim binary, which the shim
    /// names as [`SELF_EXE`]), gated on `gate` (the read end of a [`pipe`]). Only
    /// async-signal-safe calls happen in the child before it runs: it asks to die with its
    /// parent, moves its descriptors into place and enters the pod's namespaces.
    pub fn command(self, gate: &File, exe: &Path) -> Result<Command> {
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
        let mut inherited: Vec<OwnedFd> = vec![gate.try_clone()?.into(), self.module.into()];
        inherited.extend(self.preopens.into_iter().map(OwnedFd::from));
        inherited.extend(self.termination_log.map(OwnedFd::from));
        let parent = std::process::id() as libc::pid_t;
        let mut command = Command::new(exe);
        command.arg0("containerd-shim-bulwark-v1");
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

/// A workload process, started and waiting at its gate for [`Gated::release`].
#[derive(Debug)]
pub struct Gated {
    /// Its pid.
    pub pid: u32,
    gate: File,
}

impl Gated {
    /// Lets the workload run (it loads its module and runs the guest).
    pub fn release(&self) -> std::io::Result<()> {
        use std::io::Write;
        (&self.gate).write_all(b"1")
    }
}

/// Starts the workload process of `launch` with `stdio`, places it in `cgroup` and applies
/// `limits`; it then waits at its gate. On failure nothing is left running.
pub fn start_gated(
    launch: Launch,
    stdio: [std::process::Stdio; 3],
    cgroup: Option<&Cgroup>,
    limits: &ProcessLimits,
) -> Result<Gated, String> {
    let (gate_reader, gate) =
        pipe().map_err(|e| format!("cannot make the workload's gate: {e}"))?;
    let mut command = launch
        .command(&gate_reader, Path::new(SELF_EXE))
        .map_err(|e| format!("{e:#}"))?;
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
        .map_err(|e| format!("cannot start the workload process: {e}"))?;
    drop(gate_reader);
    let pid = child.id();
    let placed = match cgroup {
        Some(cgroup) => cgroup.place(pid).map_err(|e| e.to_string()),
        None => Ok(()),
    };
    if let Err(message) = placed.and_then(|()| limits.apply(pid)) {
        // Closing the gate unreleased makes the workload exit without running; kill it
        // anyway so nothing is left running.
        let _ = child.kill();
        return Err(message);
    }
    Ok(Gated { pid, gate })
}
