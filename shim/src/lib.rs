//! `containerd-shim-bulwark-v1`: runs a pod's Wasm containers for containerd, each in a
//! workload process of its own inside the container's cgroup and the pod's namespaces,
//! under the Policy the runtime crate resolves from the pod's `bulwark.dev/*` annotations
//! and the node configuration. This crate translates containerd's world; it holds no
//! policy.
//!
//! Each process and each concern has a folder of its own; lower layers never import
//! higher ones:
//!
//! - [`task`]: the per-pod shim process, containerd's task API (top);
//! - [`container`]: what a bundle becomes: a Wasm container (its policy, module and plan)
//!   or a native sidecar run by runc;
//! - [`process`]: the processes the shim starts, each with its contract, parent and child
//!   side: the pod sandbox's [`process::holder`], the Wasm [`process::workload`], and the
//!   [`process::lockdown`] they apply;
//! - [`cgroup`]: a container's cgroup or systemd scope;
//! - [`bundle`]: what containerd hands the shim (the OCI spec, rootfs, content store)
//!   (bottom);
//! - [`node`] (installing Bulwark on a node) and [`registry`] (pushing images) serve the
//!   `bulwark` CLI.

pub mod bundle;
pub mod cgroup;
pub mod container;
pub mod egress;
pub mod node;
pub mod process;
pub mod registry;
pub mod task;

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
