//! `containerd-shim-bulwark-v1`: runs a pod's Wasm containers for containerd, each in a
//! workload process of its own inside the container's cgroup and the pod's namespaces,
//! under the Policy the runtime crate resolves from the pod's `bulwark.dev/*` annotations
//! and the node configuration. This crate translates containerd's world; it holds no
//! policy.
//!
//! - [`service`]: the containerd task service (one shim per pod);
//! - [`sandbox`]: the pod sandbox's holder process and the pod's namespaces;
//! - [`spec`] and [`container`]: what a bundle asks for, and a Wasm container prepared
//!   from it (policy, module, preopened directories, plan);
//! - [`workload`] and [`lockdown`]: the workload process, and how it locks itself down
//!   ([`seccomp`] is its system-call allow-list);
//! - [`cgroup`]: the container's cgroup or systemd scope; [`native`]: sidecars through runc;
//! - [`spawn`]: the one thread every process of the shim is started from.

pub mod cgroup;
pub mod container;
pub mod content;
pub mod install;
pub mod kube;
pub mod lockdown;
pub mod native;
pub mod options;
pub mod push;
pub mod restart;
pub mod sandbox;
pub mod seccomp;
pub mod service;
pub mod spawn;
pub mod spec;
pub mod stats;
pub mod workload;

/// Logs warnings (or what `RUST_LOG` asks for) to stderr as one `bulwark: level: message`
/// line each: for the CLI, the user's terminal; for a workload, the container's log.
pub fn init_stderr_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format(|buf, record| {
            use std::io::Write;
            writeln!(
                buf,
                "bulwark: {}: {}",
                record.level().as_str().to_lowercase(),
                record.args()
            )
        })
        .init();
}
