//! The compile step: a short-lived process that compiles one module, on bytes nobody
//! trusts, and hands its artifact over. This file is the contract between its two sides:
//! [`parent`] runs it (for the shim at Create, and for `bulwark run`, `serve` and
//! `compile`), [`child`] is what it does.
//!
//! It is locked down like a workload ([`crate::process::lockdown`]) before it reads the
//! module's first byte: no new privileges, Landlock with no file and no network access at
//! all, no capability, a non-root user (the container's, or `nobody`), the seccomp
//! allow-list without sockets. It gets what it works on as descriptors: the module to read,
//! a memory file to write the artifact to, and a pipe for its report. Its memory is bounded
//! by `[compile] memory` (an rlimit on its data, and, under the shim, a cgroup of its own),
//! its count on the node by `[compile] concurrency`; the parent learns from how it ended
//! whether that bound ended it.

use std::os::fd::RawFd;

use serde::{Deserialize, Serialize};

use bulwark_runtime::engine::{Facts, FlavorRequest};

pub mod child;
pub mod parent;

pub use child::main;

/// The first argument that turns Bulwark's binaries into a compile step.
pub const COMPILE_STEP_ARG: &str = "compile-step";

/// The descriptor of the gate: one byte once the parent has placed the step in its cgroup
/// (end of file: it never will be, so the step exits without reading anything).
pub const GATE_FD: RawFd = 3;
/// The module, open for reading.
pub const MODULE_FD: RawFd = 4;
/// The memory file the artifact goes to.
pub const OUTPUT_FD: RawFd = 5;
/// The pipe the step writes its [`Report`] to.
pub const REPORT_FD: RawFd = 6;

/// What the step is asked to do (its second argument, as JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    /// The limits the policy needs compiled in.
    pub flavor: FlavorRequest,
    /// Who the step runs as, when started as root: never root itself.
    pub uid: u32,
    /// Its group.
    pub gid: u32,
    /// Whether it may run where the kernel does not enforce Landlock.
    pub allow_without_landlock: bool,
}

/// How the step ended, written to [`REPORT_FD`] as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Report {
    /// The artifact is written; these are the module's facts.
    Compiled(Facts),
    /// The bytes are not WebAssembly Bulwark runs, or do not validate or compile.
    Invalid(String),
    /// The step itself failed (its lock-down, a write).
    Failed(String),
}

/// The user a compile step runs as for a container running as `uid`:`gid`: the container's
/// own when it is not root, else `nobody` (65534), so that no step ever compiles as root.
pub fn step_user(uid: u32, gid: u32) -> (u32, u32) {
    const NOBODY: u32 = 65534;
    if uid == 0 {
        (NOBODY, NOBODY)
    } else {
        (uid, if gid == 0 { NOBODY } else { gid })
    }
}
