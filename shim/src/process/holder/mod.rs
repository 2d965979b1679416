//! The pod sandbox and the pod's namespaces.
//!
//! containerd's CRI builds every app container's namespaces from the sandbox's pid:
//! `/proc/<sandbox pid>/ns/{net,ipc,uts}` (and `pid` when the pod shares one). So the pid this
//! shim reports for a pod sandbox must be a process that lives in the pod's namespaces, as
//! `pause` does in a runc pod. That process is the *holder*, cloned into the new PID, IPC,
//! UTS (and, if the spec names no network namespace to join, network) namespaces the
//! sandbox spec asks for. It joins the pod's network namespace (the one containerd set up with CNI; none for a
//! hostNetwork pod, which stays in the node's), sets the pod's hostname and sysctls, gives
//! up every privilege (its user becomes the pod's, or the pause image's 65535; no
//! capability; a seccomp filter that leaves it only waiting for signals and reaping),
//! reports back, and waits. It runs no untrusted code and dies with the shim. It is a
//! binary of its own, [`HOLDER_BINARY`], that needs nothing but the C library: one runs
//! per pod, so it must cost next to nothing.
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

/// The holder's binary, beside the shim's.
pub const HOLDER_BINARY: &str = "bulwark-holder";

/// `--user UID:GID`: who the holder runs as once it set the pod up.
pub const USER_ARG: &str = "--user";
/// `--hostname NAME`: the pod's hostname, in its own UTS namespace.
pub const HOSTNAME_ARG: &str = "--hostname";
/// `--sysctl KEY=VALUE`: a namespaced sysctl of the pod (repeated).
pub const SYSCTL_ARG: &str = "--sysctl";
/// `--join KIND=PATH`: a namespace of the pod to join, `net`, `ipc` or `uts` (repeated).
pub const JOIN_ARG: &str = "--join";

/// Who a holder runs as when the pod runs as root: the user of Kubernetes' own pause
/// image.
pub const PAUSE_USER: u32 = 65535;

/// The descriptor on which the holder reports `ok` (or why not) once it is in the pod's
/// namespaces; the shim waits for that before it reports the sandbox's pid to containerd.
pub const STATUS_FD: libc::c_int = 3;

/// How long the holder may take to set the pod's namespaces up.
pub(crate) const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
