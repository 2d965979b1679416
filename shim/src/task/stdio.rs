//! The container's stdio: the FIFOs containerd made for it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::process::Stdio;

/// Where containerd made the container's stdio FIFOs (empty: none).
#[derive(Clone, Default)]
pub(super) struct StdioPaths {
    pub(super) stdin: String,
    pub(super) stdout: String,
    pub(super) stderr: String,
}

/// The container's stdio, opened: its process gets it, and until then the shim writes
/// what the container's log should say while it is created.
pub(super) struct OpenedStdio {
    stdin: Option<File>,
    stdout: Option<File>,
    stderr: Option<File>,
}

impl OpenedStdio {
    /// Opens the FIFOs containerd created for the container's stdio (`/dev/null` for those
    /// it made none).
    pub(super) fn open(paths: &StdioPaths) -> Result<OpenedStdio, String> {
        Ok(OpenedStdio {
            stdin: open_fifo(&paths.stdin, false)?,
            stdout: open_fifo(&paths.stdout, true)?,
            stderr: open_fifo(&paths.stderr, true)?,
        })
    }

    /// Writes `bulwark: <line>` to the container's stderr, which is its log.
    pub(super) fn log(&mut self, line: &str) {
        if let Some(stderr) = &mut self.stderr {
            let _ = writeln!(stderr, "bulwark: {line}");
        }
    }

    /// stdin, stdout and stderr for the container's process.
    pub(super) fn into_array(self) -> [Stdio; 3] {
        [self.stdin, self.stdout, self.stderr]
            .map(|file| file.map_or_else(Stdio::null, Stdio::from))
    }
}

fn open_fifo(path: &str, write: bool) -> Result<Option<File>, String> {
    if path.is_empty() {
        return Ok(None);
    }
    let file = if write {
        OpenOptions::new().write(true).open(path)
    } else {
        // Opening a FIFO for reading blocks until a writer appears; do not wait for one.
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .inspect(|file| {
                use std::os::fd::AsRawFd;
                // SAFETY: fcntl on a descriptor we own.
                unsafe {
                    let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
                    libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
                }
            })
    };
    file.map(Some)
        .map_err(|e| format!("cannot open {path}: {e}"))
}

/// Opens (and the container keeps) a read end of its stdout and stderr FIFOs, as runc's
/// shim does: while containerd restarts nobody else reads them, and a FIFO without a reader
/// fails the container's writes with EPIPE. Held, the output waits in the FIFO until
/// containerd is back and drains it into the log.
pub(super) fn hold_output_fifos(stdio: &StdioPaths) -> Vec<std::fs::File> {
    [&stdio.stdout, &stdio.stderr]
        .into_iter()
        .filter(|path| !path.is_empty())
        .filter_map(|path| {
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(path)
                .inspect_err(|err| log::warn!("cannot hold {path} open: {err}"))
                .ok()
        })
        .collect()
}
