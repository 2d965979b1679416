//! The shim's side: clone the holder into the pod's new namespaces and wait for its report.

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::bundle::spec::{ContainerSpec, NamespaceKind};
use crate::process::{on_spawner_thread, pipe};

use super::{SETUP_TIMEOUT, STATUS_FD};

/// Starts the holder of the pod sandbox whose bundle is `bundle`; returns its pid once it
/// is in the pod's namespaces.
pub fn start(bundle: &Path, spec: &ContainerSpec) -> Result<u32, String> {
    let new_namespaces = spec
        .namespaces
        .iter()
        .filter(|ns| ns.path.is_none())
        .filter(|ns| {
            ns.kind == NamespaceKind::Pid || crate::bundle::spec::POD_NAMESPACES.contains(&ns.kind)
        })
        .fold(0, |flags, ns| flags | ns.kind.clone_flag());
    let (status_reader, status_writer) = pipe().map_err(|e| format!("cannot make a pipe: {e}"))?;
    let bundle_arg = CString::new(bundle.as_os_str().as_bytes())
        .map_err(|_| format!("bundle path {} holds a NUL byte", bundle.display()))?;
    let pid = on_spawner_thread(move || clone_holder(new_namespaces, &bundle_arg, &status_writer))
        .map_err(|e| format!("cannot start the pod sandbox process: {e}"))?;
    match read_status(status_reader) {
        Ok(()) => Ok(pid),
        Err(message) => {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            Err(format!("cannot set up the pod's namespaces: {message}"))
        }
    }
}

/// clone(2) without CLONE_VM (a fork) into the new namespaces, then exec this binary as the
/// holder. A fork, not `Command`, because only clone can put the child into a new PID
/// namespace as its init; between clone and exec the child makes raw system calls only.
fn clone_holder(
    new_namespaces: libc::c_int,
    bundle: &CString,
    status_writer: &File,
) -> std::io::Result<u32> {
    // The running binary, as for workloads (see `crate::process::SELF_EXE`).
    let exe = c"/proc/self/exe";
    let argv = [
        c"containerd-shim-bulwark-v1".as_ptr(),
        c"sandbox".as_ptr(),
        bundle.as_ptr(),
        std::ptr::null(),
    ];
    let envp = [std::ptr::null::<libc::c_char>()];
    let status = status_writer.as_raw_fd();
    // SAFETY: a fork-like clone; the child only calls dup2, fcntl, prctl, execve and _exit,
    // which are async-signal-safe, on memory prepared before the clone.
    unsafe {
        let pid = libc::syscall(
            libc::SYS_clone,
            (new_namespaces | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        );
        if pid < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if pid == 0 {
            let moved = if status == STATUS_FD {
                libc::fcntl(status, libc::F_SETFD, 0)
            } else {
                libc::dup2(status, STATUS_FD)
            };
            // The status pipe covers a shim that dies before this: the holder's report
            // then fails with EPIPE and it exits.
            if moved < 0 || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                libc::_exit(126);
            }
            libc::execve(exe.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
        Ok(pid as u32)
    }
}

/// Waits for the holder's report: `ok`, or what went wrong.
fn read_status(reader: File) -> Result<(), String> {
    let mut poll = libc::pollfd {
        fd: reader.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let mut report = Vec::new();
    let deadline = std::time::Instant::now() + SETUP_TIMEOUT;
    let mut reader = reader;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(format!("no answer within {SETUP_TIMEOUT:?}"));
        }
        // SAFETY: poll on one descriptor we own.
        let ready = unsafe { libc::poll(&mut poll, 1, left.as_millis() as libc::c_int) };
        if ready < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error.to_string());
        }
        let mut chunk = [0u8; 512];
        match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => report.extend_from_slice(&chunk[..n]),
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error.to_string()),
        }
    }
    match String::from_utf8_lossy(&report).trim() {
        "ok" => Ok(()),
        "" => Err("the process exited before it was set up".into()),
        message => Err(message.to_owned()),
    }
}
