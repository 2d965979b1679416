//! Bulwark's own binaries the shim starts, beside its own: the workload's
//! ([`WORKLOAD_BINARY`], which also runs compile steps) and the pod sandbox's holder
//! ([`super::holder::HOLDER_BINARY`]).
//!
//! The shim opens them once, on first use, and starts them through those descriptors for
//! the rest of its life: an upgrade that renames new files over them on disk never gives
//! one shim's pod processes of another version.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The workload's binary, beside the shim's: a position-independent executable, so that
/// every process that runs guest code (or compiles it) has its own addresses.
pub const WORKLOAD_BINARY: &str = "bulwark-workload";

/// One of the shim's binaries, held open.
#[derive(Debug)]
pub struct Binary {
    file: File,
}

impl Binary {
    /// A path that names the file held open: `/proc/self/fd/N`, in this process and in a
    /// child between fork and exec alike.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }
}

/// The binary `name` beside the running shim, opened on first use and then held.
pub fn beside_shim(name: &'static str) -> Result<&'static Binary, String> {
    static WORKLOAD: OnceLock<Result<Binary, String>> = OnceLock::new();
    static HOLDER: OnceLock<Result<Binary, String>> = OnceLock::new();
    let slot = if name == WORKLOAD_BINARY {
        &WORKLOAD
    } else {
        &HOLDER
    };
    slot.get_or_init(|| open_beside(name))
        .as_ref()
        .map_err(Clone::clone)
}

fn open_beside(name: &str) -> Result<Binary, String> {
    let shim = std::fs::read_link("/proc/self/exe")
        .map_err(|error| format!("cannot find the shim's own binary: {error}"))?;
    let path = shim.parent().unwrap_or(Path::new("/")).join(name);
    let file = File::open(&path).map_err(|error| {
        format!(
            "{}: {error}: Bulwark's {name} belongs beside the shim (reinstall Bulwark on this node)",
            path.display()
        )
    })?;
    Ok(Binary { file })
}
