//! Where the shim's own processes (pod sandboxes, Wasm workloads) come from: one thread that
//! lives as long as the shim.
//!
//! Those processes ask the kernel to SIGKILL them when their parent goes
//! (`PR_SET_PDEATHSIG`), so that a shim that is itself SIGKILLed leaves nothing running. But
//! the kernel sends that signal when the parent *thread* ends, and the ttrpc server ends its
//! worker threads when it has more than it needs: a workload started from one of them would
//! die with it. Starting every process from this thread makes "the parent ended" mean
//! "the shim ended".

use std::sync::OnceLock;
use std::sync::mpsc;

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

/// kubelet's QoS for a process the shim started, from its container's spec: the OOM score
/// (`process.oomScoreAdj`) and the rlimits (`process.rlimits`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessLimits {
    /// The OOM score adjustment.
    pub oom_score_adj: Option<i32>,
    /// Resource limits.
    pub rlimits: Vec<crate::spec::Rlimit>,
}

impl ProcessLimits {
    /// The limits `spec` asks for.
    pub fn of(spec: &crate::spec::ContainerSpec) -> ProcessLimits {
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
