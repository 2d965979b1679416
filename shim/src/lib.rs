//! `containerd-shim-bulwark-v1`: runs a pod's Wasm containers for containerd, each in a
//! workload process of its own inside the container's cgroup, under the Policy the
//! runtime crate resolves from the pod's `bulwark.dev/*` annotations and the node
//! configuration. This crate translates containerd's world; it holds no policy.

pub mod cgroup;
pub mod content;
pub mod install;
pub mod kube;
pub mod native;
pub mod options;
pub mod push;
pub mod restart;
pub mod seccomp;
pub mod service;
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
