//! The shim's side: clone the holder into the pod's new namespaces and wait for its report.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStringExt;

use crate::bundle::spec::{ContainerSpec, NamespaceKind, POD_NAMESPACES};
use crate::process::binaries::beside_shim;
use crate::process::{on_spawner_thread, pipe, read_to_end_within};

use super::child::{Setup, arguments};
use super::{HOLDER_BINARY, PAUSE_USER, SETUP_TIMEOUT, STATUS_FD};

/// Starts the holder of the pod sandbox whose bundle is `bundle`; returns its pid once it
/// is in the pod's namespaces.
pub fn start(spec: &ContainerSpec) -> Result<u32, String> {
    let holder = beside_shim(HOLDER_BINARY)?;
    let setup = setup_of(spec)?;
    let new_namespaces = spec
        .namespaces
        .iter()
        .filter(|ns| ns.path.is_none())
        .filter(|ns| ns.kind == NamespaceKind::Pid || POD_NAMESPACES.contains(&ns.kind))
        .fold(0, |flags, ns| flags | ns.kind.clone_flag());
    let (status_reader, status_writer) = pipe().map_err(|e| format!("cannot make a pipe: {e}"))?;
    let exe = CString::new(holder.path().into_os_string().into_vec())
        .map_err(|_| "the holder's path holds a NUL byte".to_owned())?;
    let args = arguments(&setup);
    let pid = on_spawner_thread(move || clone_holder(new_namespaces, &exe, &args, &status_writer))
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

/// What the holder of the pod sandbox of `spec` is asked to do: the namespaces to join,
/// the hostname and sysctls to set, and who to run as.
fn setup_of(spec: &ContainerSpec) -> Result<Setup, String> {
    let joins = spec
        .namespaces
        .iter()
        .filter(|ns| POD_NAMESPACES.contains(&ns.kind))
        .filter_map(|ns| ns.path.as_ref().map(|path| (ns.kind.clone_flag(), path)))
        .map(|(flag, path)| (flag, path.clone().into_os_string()))
        .collect();
    let own_uts = spec
        .namespace(NamespaceKind::Uts)
        .is_some_and(|ns| ns.path.is_none());
    let no_nul = |what: &str, value: &str| match value.contains('\0') {
        true => Err(format!("{what} {value:?} holds a NUL byte")),
        false => Ok(()),
    };
    let mut sysctls = Vec::new();
    for (key, value) in &spec.sysctls {
        no_nul("sysctl", key)?;
        no_nul("sysctl value", value)?;
        sysctls.push((key.clone(), value.clone()));
    }
    let hostname = spec.hostname.clone().filter(|_| own_uts);
    if let Some(hostname) = &hostname {
        no_nul("hostname", hostname)?;
    }
    let (uid, gid) = match spec.user.uid {
        0 => (PAUSE_USER, PAUSE_USER),
        uid => (uid, spec.user.gid),
    };
    Ok(Setup {
        joins,
        hostname,
        sysctls,
        uid,
        gid,
    })
}

/// clone(2) without CLONE_VM (a fork) into the new namespaces, then exec the holder. A
/// fork, not `Command`, because only clone can put the child into a new PID namespace as
/// its init; between clone and exec the child makes raw system calls only.
fn clone_holder(
    new_namespaces: libc::c_int,
    exe: &CString,
    args: &[CString],
    status_writer: &File,
) -> std::io::Result<u32> {
    let mut argv: Vec<*const libc::c_char> = vec![c"bulwark-holder".as_ptr()];
    argv.extend(args.iter().map(|arg| arg.as_ptr()));
    argv.push(std::ptr::null());
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
    let report = read_to_end_within(reader, SETUP_TIMEOUT)?;
    match String::from_utf8_lossy(&report).trim() {
        "ok" => Ok(()),
        "" => Err("the process exited before it was set up".into()),
        message => Err(message.to_owned()),
    }
}
