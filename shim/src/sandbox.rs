//! The pod sandbox and the pod's namespaces.
//!
//! containerd's CRI builds every app container's namespaces from the sandbox's pid:
//! `/proc/<sandbox pid>/ns/{net,ipc,uts}` (and `pid` when the pod shares one). So the pid this
//! shim reports for a pod sandbox must be a process that lives in the pod's namespaces, as
//! `pause` does in a runc pod. That process is the *holder*: this binary started as
//! `containerd-shim-bulwark-v1 sandbox BUNDLE`, cloned into the new PID, IPC, UTS (and, if
//! the spec names no network namespace to join, network) namespaces the sandbox spec asks
//! for. It joins the pod's network namespace (the one containerd set up with CNI; none for a
//! hostNetwork pod, which stays in the node's), sets the pod's hostname and sysctls, reports
//! back, and waits. It runs no untrusted code and dies with the shim.
//!
//! Every container of the pod then joins those namespaces: a Wasm workload in the moment it
//! is started (see [`crate::workload::Launch`]), a native sidecar through runc.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::spawn::on_spawner_thread;
use crate::spec::{ContainerSpec, Namespace, NamespaceKind};

/// The first argument that turns the shim binary into a pod sandbox's holder.
pub const SANDBOX_ARG: &str = "sandbox";

/// The descriptor on which the holder reports `ok` (or why not) once it is in the pod's
/// namespaces; the shim waits for that before it reports the sandbox's pid to containerd.
const STATUS_FD: libc::c_int = 3;

/// How long the holder may take to set the pod's namespaces up.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// The namespaces a process can be given at birth (new ones) or join by path.
const POD_NAMESPACES: [NamespaceKind; 3] = [
    NamespaceKind::Network,
    NamespaceKind::Ipc,
    NamespaceKind::Uts,
];

/// Refuses what Bulwark cannot give a pod, before anything is started for it.
pub fn check_supported(spec: &ContainerSpec) -> Result<(), String> {
    if spec.namespace(NamespaceKind::User).is_some() {
        return Err(
            "user namespaces (hostUsers: false) are not supported by Bulwark: a Wasm workload runs as the container's user in the node's user namespace, without any capability (remove hostUsers: false)"
                .into(),
        );
    }
    Ok(())
}

/// Starts the holder of the pod sandbox whose bundle is `bundle`; returns its pid once it
/// is in the pod's namespaces.
pub fn start(bundle: &Path, spec: &ContainerSpec) -> Result<u32, String> {
    check_supported(spec)?;
    let new_namespaces = spec
        .namespaces
        .iter()
        .filter(|ns| ns.path.is_none())
        .filter(|ns| ns.kind == NamespaceKind::Pid || POD_NAMESPACES.contains(&ns.kind))
        .fold(0, |flags, ns| flags | ns.kind.clone_flag());
    let (status_reader, status_writer) =
        crate::workload::pipe().map_err(|e| format!("cannot make a pipe: {e}"))?;
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
    // The running binary, as for workloads (see `workload::SELF_EXE`).
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

/// The holder's main: enter the pod's namespaces, report, then wait until killed.
pub fn main(bundle: &Path) -> i32 {
    // SAFETY: the shim set this descriptor up for us alone.
    let mut status = unsafe { File::from_raw_fd(STATUS_FD) };
    if let Err(error) = enter_pod(bundle) {
        let _ = writeln!(status, "{error:#}");
        return 1;
    }
    // A shim that died before we set the parent-death signal closed the other end: EPIPE.
    if status.write_all(b"ok\n").is_err() {
        return 1;
    }
    drop(status);
    wait_until_stopped()
}

fn enter_pod(bundle: &Path) -> Result<()> {
    let spec = ContainerSpec::load(bundle)?;
    for namespace in &spec.namespaces {
        if let (Some(path), true) = (&namespace.path, POD_NAMESPACES.contains(&namespace.kind)) {
            join(namespace.kind, path)?;
        }
    }
    let own_uts = spec
        .namespace(NamespaceKind::Uts)
        .is_some_and(|ns| ns.path.is_none());
    if let (Some(hostname), true) = (&spec.hostname, own_uts) {
        // SAFETY: sethostname with a buffer and its length.
        if unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot set the hostname {hostname:?}"));
        }
    }
    for (key, value) in &spec.sysctls {
        write_sysctl(key, value)?;
    }
    Ok(())
}

/// Joins the namespace of `kind` at `path` (for this thread, the only one).
pub fn join(kind: NamespaceKind, path: &Path) -> Result<()> {
    let namespace = File::open(path).with_context(|| {
        format!(
            "cannot open the pod's {} namespace {}",
            kind.proc_name(),
            path.display()
        )
    })?;
    // SAFETY: setns on a descriptor we own.
    if unsafe { libc::setns(namespace.as_raw_fd(), kind.clone_flag()) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| {
            format!(
                "cannot join the pod's {} namespace {}",
                kind.proc_name(),
                path.display()
            )
        });
    }
    Ok(())
}

/// Sets a namespaced sysctl (kubelet only passes those) in the namespaces just entered.
fn write_sysctl(key: &str, value: &str) -> Result<()> {
    if key.contains('/') || key.split('.').any(|part| part.is_empty() || part == "..") {
        anyhow::bail!("sysctl {key:?} is not a sysctl name");
    }
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    std::fs::write(&path, value).with_context(|| format!("cannot set sysctl {key}={value}"))
}

/// Waits for SIGTERM or SIGINT (exit 0), reaping any child that a native sidecar sharing
/// the pod's PID namespace left to its init; SIGKILL ends it as usual.
fn wait_until_stopped() -> i32 {
    // SAFETY: signal-set manipulation on a local set; sigwaitinfo blocks until one arrives.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
        loop {
            let signal = libc::sigwaitinfo(&all, std::ptr::null_mut());
            match signal {
                libc::SIGTERM | libc::SIGINT => return 0,
                libc::SIGCHLD => {
                    while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {}
                }
                _ => {}
            }
        }
    }
}

/// The namespaces of the pod, as the spec of one of its containers names them: what a
/// process must join (path) or get anew (no path) to be in the pod.
pub fn pod_namespaces(spec: &ContainerSpec) -> Vec<Namespace> {
    spec.namespaces
        .iter()
        .filter(|ns| POD_NAMESPACES.contains(&ns.kind))
        .cloned()
        .collect()
}
