//! The workload process: one per Wasm container, started by the shim as
//! `containerd-shim-bulwark-v1 workload PLAN`. This file is the contract between the two
//! sides: the plan and the descriptors the process inherits; [`parent`] is how the shim
//! starts it, [`child`] what it runs.
//!
//! The shim starts it ([`parent::Launch`]) at Create, in the pod's network, IPC and UTS
//! namespaces, with the container's compiled artifact (never the module's bytes: the
//! compile step turned those into it, see [`crate::process::compile`]) and preopened
//! directories as descriptors it opened once, beneath the container's root (see
//! [`crate::bundle::spec::Location`]): the workload never looks a container path up
//! itself.
//!
//! Its gate opens twice. Once it is in the container's cgroup (or systemd scope) with its
//! OOM score and rlimits: it loads the artifact, and, for a service, binds its sockets and
//! works out its serving figures from the memory it then holds, and reports on
//! [`REPORT_FD`] (so Create fails with the reason when the figures do not fit). Then at
//! Start: it locks itself down ([`crate::process::lockdown`]) and only then runs the guest.
//! Its exit code is the container's: the guest's own, or the contract's code for a limit.

use std::os::fd::RawFd;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use bulwark_runtime::engine::Facts;
use bulwark_runtime::policy::{Access, Policy};

use crate::bundle::spec::User;

pub mod child;
pub mod parent;
pub mod probe;

pub use child::main;

/// The first argument that turns the shim binary into a workload process.
pub const WORKLOAD_ARG: &str = "workload";

/// The descriptor the workload process inherits the read end of its gate on: the shim
/// writes one byte once the process is in its cgroup (load), and one at Start (run); end of
/// file means it never will be.
pub const WORKLOAD_GATE_FD: RawFd = 3;
/// The descriptor the workload writes its [`LoadReport`] to.
pub const REPORT_FD: RawFd = 4;
/// The descriptor the compiled artifact (opened read-only by the shim) arrives on.
pub const ARTIFACT_FD: RawFd = 5;
/// The descriptor of the first preopened directory; the others follow in the plan's order,
/// and the termination-message file, if the plan has one, comes after them.
pub const FIRST_PREOPEN_FD: RawFd = 6;

/// How loading went, written to [`REPORT_FD`] as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LoadReport {
    /// Loaded and ready to run at Start.
    Loaded,
    /// What the pod asks for cannot be given: the module does not link, a service's
    /// figures do not fit, its address cannot be had.
    Refused(String),
    /// Loading failed for a reason that is not the pod's.
    Failed(String),
}

/// What the workload process tries right after locking itself down, colon-separated,
/// reporting each on stderr: paths to open for reading from the host side, `>PATH` to
/// create or write, and `@NAME` for system calls: `socket` (an IPv4 TCP socket),
/// `socket-unix`, `socket-netlink`, `socketpair`, `fork`, `unshare`, `ptrace`, and `kill-PID` and
/// `tgkill-PID` (signal 0 to process PID).
/// It is the test of the lock-down: a stand-in for a bug in the engine that would let a
/// guest reach past it. It only ever reports whether an attempt succeeded.
pub const LOCKDOWN_PROBE_ENV: &str = "BULWARK_LOCKDOWN_PROBE";

/// A directory the guest gets, as the plan records it (the descriptor arrives at
/// [`FIRST_PREOPEN_FD`] + its index).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedPreopen {
    /// The path the guest uses (the container path).
    pub guest: String,
    /// What the guest may do there.
    pub access: Access,
}

/// Everything a workload process needs, resolved by the shim at Create.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// The entrypoint as the container names it, for messages (its compiled artifact
    /// arrives on [`ARTIFACT_FD`]).
    pub entrypoint: String,
    /// argv for the guest.
    pub args: Vec<String>,
    /// Environment, after the policy's allow-list.
    pub env: Vec<(String, String)>,
    /// Preopened directories, in descriptor order.
    pub preopens: Vec<PlannedPreopen>,
    /// The effective policy.
    pub policy: Policy,
    /// What compiling learnt of the module: what it is, whether it is served, what an
    /// instance holds.
    pub facts: Facts,
    /// Whether kubelet mounted a termination-message file (it arrives, opened for writing,
    /// after the preopened directories).
    pub termination_log: bool,
    /// Whether the shim passes the egress counters (read-only, after the
    /// termination-message file; see `bulwark_runtime::run::Workload::egress_counts`).
    #[serde(default)]
    pub egress_counts: bool,
    /// The container's user.
    pub user: User,
}

impl Plan {
    /// Writes the plan next to the bundle's config.json, readable by root only: it holds
    /// the container's environment, secrets included.
    pub fn write(&self, path: &Path) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let json = serde_json::to_vec(self)?;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut file| file.write_all(&json))
            .with_context(|| format!("cannot write {}", path.display()))
    }

    pub(crate) fn read(path: &Path) -> Result<Plan> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("malformed plan {}", path.display()))
    }
}
