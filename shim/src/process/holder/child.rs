//! The holder's side: enter the pod's namespaces, report, then wait until stopped.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;

use anyhow::{Context, Result};

use crate::bundle::spec::{ContainerSpec, NamespaceKind, POD_NAMESPACES};

use super::STATUS_FD;

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
