//! The kernel's part of egress control: a BPF filter on each Wasm container's cgroup that
//! lets it connect only where its grants say ([`bpf::EgressFilter`]), and the shim's reading
//! of what it refused ([`watch::EgressWatch`]).

pub mod bpf;
pub mod watch;

use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use bulwark_runtime::run::EgressCounts;

/// What a Wasm container's egress filter must allow, and whether it may run without one.
#[derive(Debug, Default)]
pub struct EgressPlan {
    /// The container's network grants: exactly what the filter lets through.
    pub grants: Vec<SocketAddr>,
    /// The node allows running grants without the filter
    /// (`capabilities.allow_without_egress_filter`).
    pub allow_without: bool,
    /// Where a serving workload reads the filter's counts for its `/metrics`.
    pub counts: Option<CountsFile>,
}

/// The filter's counts as a serving workload reads them: a small memory file the shim
/// writes and the workload reads through a read-only descriptor (the workload may make no
/// `bpf` call to read the map itself), in [`EgressCounts::encode`]'s layout.
#[derive(Debug)]
pub struct CountsFile(File);

impl CountsFile {
    /// Makes the file; returns the shim's writable handle and the workload's read-only one.
    pub fn create() -> std::io::Result<(CountsFile, File)> {
        // SAFETY: memfd_create with a NUL-terminated name; the descriptor is ours.
        let fd =
            unsafe { libc::memfd_create(c"bulwark-egress-counts".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd was just made and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(EgressCounts::SIZE as u64)?;
        let reader = File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
        Ok((CountsFile(file), reader))
    }

    /// Publishes `counts`.
    pub fn write(&self, counts: EgressCounts) -> std::io::Result<()> {
        self.0.write_all_at(&counts.encode(), 0)
    }
}
