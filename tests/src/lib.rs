//! Bulwark's integration-test support.
//!
//! [`harness`] runs the real components a Kubernetes node has, privately and on this machine
//! only: a container registry ([`harness::registry`]), OCI images built without Docker
//! ([`harness::images`]), a containerd of a chosen version with its own root, state and sockets
//! ([`harness::containerd`]), and a CRI client that drives it the way kubelet does
//! ([`harness::cri`]). Everything the harness starts is stopped by PID, and every mount,
//! cgroup and temporary directory it makes is removed when its owner is dropped, also when a
//! test fails half-way.

#![warn(missing_docs)]

use std::path::PathBuf;

pub mod attack;
pub mod http;
pub mod socket_guest;

pub mod harness {
    //! The pieces of a private node: see the crate documentation.

    pub mod cgroups;
    pub mod containerd;
    pub mod cri;
    pub mod images;
    pub mod installer;
    pub mod mounts;
    pub mod network;
    pub mod node;
    pub mod process;
    pub mod registry;
}

/// The workspace's root directory (the one with the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(PathBuf::from)
        .unwrap_or(manifest_dir)
}

/// Where this build's binaries are: `target/<target triple>/release` (the workspace builds
/// for an explicit target, see `.cargo/config.toml`).
pub fn release_dir() -> PathBuf {
    workspace_root()
        .join("target")
        .join(env!("BULWARK_TESTS_TARGET"))
        .join("release")
}

/// This machine for a benchmark's conditions line: the CPU model and the kernel release.
pub fn machine() -> (String, String) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|name| name.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    (cpu, kernel.trim().to_owned())
}

/// The nearest-rank percentile `pct` (0-100) of `samples`, which need not be sorted; the
/// benchmarks and the soak report latencies with it. `samples` must not be empty.
pub fn percentile(samples: &[std::time::Duration], pct: f64) -> std::time::Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let index = ((sorted.len() as f64 * pct / 100.0).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

/// The workspace's `build/` directory, where downloaded and generated artifacts go.
pub fn build_dir() -> PathBuf {
    workspace_root().join("build")
}

/// Runs an async operation to completion on a runtime of its own, on a thread of its own.
///
/// The synchronous parts of the harness (a constructor waiting for a server, a `Drop` tidying
/// up) need to talk gRPC, and they may be called both from plain code and from inside a Tokio
/// runtime (where `block_on` would panic): a fresh thread works in both places.
pub(crate) fn block_on_thread<F, Fut, T>(make: F) -> anyhow::Result<T>
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = anyhow::Result<T>>,
    T: Send,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(make())
            })
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the async helper thread panicked")))
    })
}
