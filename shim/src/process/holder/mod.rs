//! The pod sandbox and the pod's namespaces.
//!
//! containerd's CRI builds every app container's namespaces from the sandbox's pid:
//! `/proc/<sandbox pid>/ns/{net,ipc,uts}` (and `pid` when the pod shares one). So the pid this
//! shim reports for a pod sandbox must be a process that lives in the pod's namespaces, as
//! `pause` does in a runc pod. That process is the *holder*: this binary started as
//! `containerd-shim-bulwark-v1 sandbox BUNDLE`, cloned into the new PID, IPC, UTS (and, if
//! the spec names no network namespace to join, network) namespaces the sandbox spec asks
//! for. It joins the pod's network namespace (the one containerd set up with CNI; none for a
//! hostNetwork pod, which stays in the node's), sets the pod's hostname and sysctls, reports
//! back, and waits. It runs no untrusted code and dies with the shim.
//!
//! Every container of the pod then joins those namespaces: a Wasm workload in the moment it
//! is started (see [`crate::process::workload::parent::Launch`]), a native sidecar through
//! runc.
//!
//! This file is the contract between the shim ([`parent`]) and the holder ([`child`]).

use std::time::Duration;

pub mod child;
pub mod parent;

pub use child::main;

/// The first argument that turns the shim binary into a pod sandbox's holder.
pub const SANDBOX_ARG: &str = "sandbox";

/// The descriptor on which the holder reports `ok` (or why not) once it is in the pod's
/// namespaces; the shim waits for that before it reports the sandbox's pid to containerd.
pub(crate) const STATUS_FD: libc::c_int = 3;

/// How long the holder may take to set the pod's namespaces up.
pub(crate) const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
