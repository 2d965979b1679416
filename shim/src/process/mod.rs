//! The processes the shim starts, each in a folder of its own with its contract (`mod.rs`:
//! what the two sides agree on), its parent side (`parent.rs`: how the shim starts it) and
//! its child side (`child.rs`: what it runs):
//!
//! - [`holder`]: the pod sandbox's holder, in the pod's namespaces;
//! - [`workload`]: one Wasm container, which loads its module, locks itself down
//!   ([`lockdown`]) and runs the guest.
//!
//! This module is what they share: where they are started from, the descriptors they
//! inherit, and the QoS kubelet asks for.
//!
//! # The spawner thread
//!
//! Every process the shim starts comes from one thread that lives as long as the shim.
//! Those processes ask the kernel to SIGKILL them when their parent goes
//! (`PR_SET_PDEATHSIG`), so that a shim that is itself SIGKILLed leaves nothing running. But
//! the kernel sends that signal when the parent *thread* ends, and the ttrpc server ends its
//! worker threads when it has more than it needs: a workload started from one of them would
//! die with it. Starting every process from this thread makes "the parent ended" mean
//! "the shim ended".

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;
use std::sync::mpsc;

pub mod binaries;
pub mod compile;
pub mod holder;
pub mod lockdown;
pub mod workload;

type Job = Box<dyn FnOnce() + Send>;

static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();

/// Runs `job` (which starts processes) on the spawner thread and returns its result.
pub fn on_spawner_thread<R: Send + 'static>(job: impl FnOnce() -> R + Send + 'static) -> R {
    let sender = SPAWNER.get_or_init(|| {
        let (sender, jobs) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("spawner".into())
            .spawn(move || {
                for job in jobs {
                    // A panicking job must not end this thread: its children would die.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })
            .expect("cannot start the spawner thread");
        sender
    });
    let (done, result) = mpsc::sync_channel(1);
    sender
        .send(Box::new(move || {
            let _ = done.send(job());
        }))
        .expect("the spawner thread runs as long as the shim");
    result
        .recv()
        .expect("the spawner thread answers every job (a panic is a bug)")
}

/// In a freshly forked child (async-signal-safe): be SIGKILLed when the parent that started
/// us ends, and fail if it already has (it may have ended before the request was made).
///
/// The kernel clears this setting when the process changes its user or group IDs, so a
/// process that does must call it again afterwards (see `lockdown`).
pub fn die_with_parent(parent: libc::pid_t) -> std::io::Result<()> {
    // SAFETY: prctl and getppid with plain integer arguments.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::getppid() != parent {
            // No allocation here (this runs between fork and exec): the shim is gone.
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
    }
    Ok(())
}

/// In a freshly forked child (async-signal-safe), before its exec: become `uid`:`gid` with
/// no supplementary group and no capability (bounding set included) when this is root,
/// die with `parent`, no new privileges, and `filter` (see
/// [`lockdown::seccomp::birth_filter`]). A process started so has no privilege from its
/// first instruction on.
pub fn born_unprivileged(
    uid: libc::uid_t,
    gid: libc::gid_t,
    parent: libc::pid_t,
    filter: &seccompiler::BpfProgram,
) -> std::io::Result<()> {
    let check = |result: libc::c_int| match result {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    };
    // SAFETY: plain system calls with integer arguments.
    unsafe {
        if libc::geteuid() == 0 {
            for capability in 0..=63 {
                // Past the last capability the kernel knows, EINVAL: nothing more to drop.
                if libc::prctl(libc::PR_CAPBSET_DROP, capability, 0, 0, 0) != 0 {
                    break;
                }
            }
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setgid(gid))?;
            check(libc::setuid(uid))?;
        }
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
    }
    // A change of user cleared the parent-death signal.
    die_with_parent(parent)?;
    seccompiler::apply_filter(filter).map_err(|_| std::io::Error::last_os_error())
}

/// kubelet's QoS for a process the shim started, from its container's spec: the OOM score
/// (`process.oomScoreAdj`) and the rlimits (`process.rlimits`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessLimits {
    /// The OOM score adjustment.
    pub oom_score_adj: Option<i32>,
    /// Resource limits.
    pub rlimits: Vec<crate::bundle::spec::Rlimit>,
}

impl ProcessLimits {
    /// The limits `spec` asks for.
    pub fn of(spec: &crate::bundle::spec::ContainerSpec) -> ProcessLimits {
        ProcessLimits {
            oom_score_adj: spec.oom_score_adj,
            rlimits: spec.rlimits.clone(),
        }
    }

    /// Applies them to process `pid`, which runs nothing of its own yet.
    pub fn apply(&self, pid: u32) -> Result<(), String> {
        if let Some(score) = self.oom_score_adj {
            std::fs::write(format!("/proc/{pid}/oom_score_adj"), score.to_string())
                .map_err(|e| format!("cannot set process.oomScoreAdj {score}: {e}"))?;
        }
        for rlimit in &self.rlimits {
            let limit = libc::rlimit64 {
                rlim_cur: rlimit.soft,
                rlim_max: rlimit.hard,
            };
            // SAFETY: prlimit64 on our own child with a valid limit and no old-limit buffer.
            let set = unsafe {
                libc::prlimit64(
                    pid as libc::pid_t,
                    rlimit.resource,
                    &limit,
                    std::ptr::null_mut(),
                )
            };
            if set != 0 {
                return Err(format!(
                    "cannot set rlimit {} to {}/{} (process.rlimits): {}",
                    rlimit.resource,
                    rlimit.soft,
                    rlimit.hard,
                    std::io::Error::last_os_error()
                ));
            }
        }
        Ok(())
    }
}

/// The running binary itself, which stays valid when an upgrade replaces the file at its
/// path: the CLI starts its compile steps from it.
pub const SELF_EXE: &str = "/proc/self/exe";

/// A close-on-exec pipe: a process's gate (the read end goes to the child, the write end
/// releases it), or its status report.
pub fn pipe() -> std::io::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two descriptors, which we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nothing else.
    unsafe { Ok((File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))) }
}

/// Makes `fds` the descriptors `first`, `first + 1`, ... of this (forked) process, without
/// close-on-exec. Async-signal-safe. Copies go above the target range first, so a source
/// that already sits on a target number is never overwritten before it is moved.
pub fn place_descriptors(fds: &[OwnedFd], first: RawFd) -> std::io::Result<()> {
    let above = first + fds.len() as RawFd;
    let mut copies = [0 as RawFd; 64];
    if fds.len() > copies.len() {
        return Err(std::io::Error::from_raw_os_error(libc::EMFILE));
    }
    for (copy, fd) in copies.iter_mut().zip(fds) {
        // SAFETY: fcntl on a descriptor we own; the copy is close-on-exec.
        *copy = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, above) };
        if *copy < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    for (target, copy) in (first..).zip(&copies[..fds.len()]) {
        // SAFETY: dup2 onto a number we are making ours; it clears close-on-exec.
        if unsafe { libc::dup2(*copy, target) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Names this process `name` in `/proc/PID/comm` (what `ps` and `top` show): the shim
/// starts its binaries through `/proc/self/fd/N`, whose last component would be the name
/// otherwise.
pub fn set_name(name: &std::ffi::CStr) {
    // SAFETY: PR_SET_NAME with a NUL-terminated string that outlives the call.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr(), 0, 0, 0) };
}

/// Reads `reader` (a pipe from a child) to its end, failing if that takes longer than
/// `timeout`: a child that hangs must not hang the shim's request with it.
pub fn read_to_end_within(reader: File, timeout: std::time::Duration) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let deadline = std::time::Instant::now() + timeout;
    let mut poll = libc::pollfd {
        fd: reader.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let mut reader = reader;
    let mut read = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(format!("no answer within {timeout:?}"));
        }
        // SAFETY: poll on one descriptor we own.
        let ready = unsafe { libc::poll(&mut poll, 1, left.as_millis().max(1) as libc::c_int) };
        if ready < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error.to_string());
        }
        if ready == 0 {
            // Timed out: the loop's deadline says so.
            continue;
        }
        let mut chunk = [0u8; 4096];
        match reader.read(&mut chunk) {
            Ok(0) => return Ok(read),
            Ok(n) => read.extend_from_slice(&chunk[..n]),
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error.to_string()),
        }
    }
}
