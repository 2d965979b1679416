//! The side that runs a compile step: find a verified artifact in the node's cache, or take
//! a compilation slot, start the step in its own cgroup with its descriptors, and store
//! what it wrote. The shim does this at Create, the CLI before it runs or serves.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bulwark_runtime::cache::{
    Artifact, CacheError, CacheEvent, ModuleCache, ModuleDigest, compile_in_memory,
};
use bulwark_runtime::engine::{EngineError, Facts, FlavorRequest, fingerprint_of};
use bulwark_runtime::units::format_size;

use crate::cgroup::{Cgroup, Resources};
use crate::process::lockdown::seccomp::birth_filter;
use crate::process::{
    born_unprivileged, die_with_parent, on_spawner_thread, pipe, place_descriptors,
};

use super::{COMPILE_STEP_ARG, GATE_FD, Job, Report};

/// How often a step waiting for a compilation slot (or for a step to end) looks again.
const SLOT_POLL: Duration = Duration::from_millis(100);
/// How long a compilation runs before the pod's log says it is compiling: a module that
/// compiles faster than this leaves no trace there.
const SLOW_COMPILE: Duration = Duration::from_secs(1);
/// How much of a failed step's stderr its error quotes.
const STDERR_TAIL: usize = 2048;

/// A module could not be compiled; the message names the module, and for a bound, the
/// bound, its setting and the module's size.
#[derive(Debug, thiserror::Error)]
pub enum CompileStepError {
    /// The module is not WebAssembly Bulwark runs, or does not validate or compile.
    #[error("{module}: {message}")]
    Invalid {
        /// The module, as its container or the user named it.
        module: String,
        /// The compiler's explanation.
        message: String,
    },
    /// The step needed more memory than the node allows one compilation.
    #[error(
        "compiling {module} ({size}) needed more than the {limit} one compilation may use on this node (compile.memory in the node configuration): the module is too big to compile here"
    )]
    OverMemory {
        /// The module.
        module: String,
        /// Its size.
        size: String,
        /// The bound.
        limit: String,
    },
    /// The step could not be run, or failed for a reason that is not the module's.
    #[error("cannot compile {module}: {message}")]
    Failed {
        /// The module.
        module: String,
        /// What went wrong.
        message: String,
    },
    /// The module cache could not be used.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The engine could not be set up (to name its artifacts).
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// How this process learns that a child exited: the shim's reaper collects every child
/// and reports it through containerd-shim's monitor; anything else waits for its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaping {
    /// containerd-shim's reaper (the shim).
    Monitor,
    /// `wait(2)` (the CLI).
    Direct,
}

/// How compile steps run here.
#[derive(Debug, Clone)]
pub struct CompileSteps {
    /// The binary that runs the step (`COMPILE_STEP_ARG` is its first argument).
    pub exe: PathBuf,
    /// The most memory one compilation may use (`[compile] memory`).
    pub memory: u64,
    /// Compilations at once on the node (`[compile] concurrency`), counted through the
    /// cache directory's `slots/`: only where there is a cache.
    pub concurrency: u32,
    /// Whether a step may run where the kernel does not enforce Landlock.
    pub allow_without_landlock: bool,
    /// How the step's exit is learnt.
    pub reaping: Reaping,
}

/// One module to compile, opened by the caller.
#[derive(Debug)]
pub struct ModuleToCompile<'a> {
    /// The module, open for reading.
    pub file: &'a File,
    /// Its name for messages (the entrypoint, or the path given).
    pub name: &'a str,
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256, worked out by the caller (never taken from the step).
    pub digest: ModuleDigest,
}

/// Where one step runs: its user and, under the shim, its cgroup.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// The step's user and group (see [`super::step_user`]).
    pub uid: u32,
    /// Its group.
    pub gid: u32,
    /// The cgroupsPath (either driver's form) of a cgroup made for this step alone.
    pub cgroup: Option<String>,
}

impl CompileSteps {
    /// The verified artifact of `module` for `request`: from `cache` when it holds one,
    /// else compiled by a step (and stored, when there is a cache). `progress` hears
    /// what a pod's log should say: that it waits for a slot, that it compiles, and how
    /// long it took.
    pub fn artifact(
        &self,
        cache: Option<&ModuleCache>,
        module: &ModuleToCompile,
        request: FlavorRequest,
        placement: &Placement,
        progress: &mut dyn FnMut(&str),
    ) -> Result<(Artifact, Option<CacheEvent>), CompileStepError> {
        let compile = |output: &File| {
            let slots = cache.map(|cache| cache.dir().join("slots"));
            let _slot = self.slot(slots.as_deref(), progress);
            self.run(module, request, placement, output, progress)
        };
        match cache {
            Some(cache) => {
                let fingerprint = |facts: &Facts| -> Result<String, CompileStepError> {
                    Ok(fingerprint_of(request.flavor(facts))?)
                };
                let (artifact, event) =
                    cache.get_or_compile(&module.digest, fingerprint, compile)?;
                Ok((artifact, Some(event)))
            }
            None => Ok((compile_in_memory(compile)?, None)),
        }
    }

    /// A compilation slot of the node's `concurrency`, held until dropped; none to take
    /// without a cache directory to count them in. Slots that cannot be had at all (the
    /// cache's filesystem full or read-only) do not stop a compilation: each one is still
    /// bounded by `compile.memory`.
    fn slot(&self, slots: Option<&Path>, progress: &mut dyn FnMut(&str)) -> Option<File> {
        let dir = slots?;
        let open = |index: u32| {
            std::fs::create_dir_all(dir)?;
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(format!("{index}.lock")))
        };
        let mut said = false;
        loop {
            for index in 0..self.concurrency.max(1) {
                let file = match open(index) {
                    Ok(file) => file,
                    Err(error) => {
                        log::warn!(
                            "compilation slots {}: {error}: compiling without one",
                            dir.display()
                        );
                        return None;
                    }
                };
                // SAFETY: flock on a descriptor we own; released when it is closed.
                if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                    return Some(file);
                }
            }
            if !said {
                progress(&format!(
                    "waiting to compile: this node compiles {} modules at once (compile.concurrency), all busy",
                    self.concurrency
                ));
                said = true;
            }
            std::thread::sleep(SLOT_POLL);
        }
    }

    /// Runs one compile step that writes `module`'s artifact to `output`; one that takes
    /// long is said to `progress`.
    fn run(
        &self,
        module: &ModuleToCompile,
        request: FlavorRequest,
        placement: &Placement,
        output: &File,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Facts, CompileStepError> {
        let failed = |message: String| CompileStepError::Failed {
            module: module.name.to_owned(),
            message,
        };
        let job = serde_json::to_string(&Job {
            flavor: request,
            uid: placement.uid,
            gid: placement.gid,
            allow_without_landlock: self.allow_without_landlock,
        })
        .map_err(|error| failed(error.to_string()))?;
        let pipes = || -> std::io::Result<_> { Ok((pipe()?, pipe()?, pipe()?)) };
        let ((gate_reader, mut gate), (mut report, report_writer), (mut stderr, stderr_writer)) =
            pipes().map_err(|error| failed(format!("cannot make its pipes: {error}")))?;
        let inherited: Vec<OwnedFd> = [
            gate_reader.try_clone(),
            module.file.try_clone(),
            output.try_clone(),
            report_writer.try_clone(),
        ]
        .into_iter()
        .map(|file| file.map(OwnedFd::from))
        .collect::<std::io::Result<_>>()
        .map_err(|error| failed(format!("cannot pass it its descriptors: {error}")))?;
        let memory = self.memory;
        let parent = std::process::id() as libc::pid_t;
        let filter = birth_filter().map_err(|error| failed(error.to_string()))?;
        let (uid, gid) = (placement.uid, placement.gid);
        let mut command = Command::new(&self.exe);
        command
            .arg0("bulwark-compile")
            .arg(COMPILE_STEP_ARG)
            .arg(job)
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr_writer));
        // SAFETY: only async-signal-safe calls (prctl, getppid, fcntl, dup2, setrlimit,
        // setgroups, setgid, setuid, seccomp) on descriptors and values prepared before the
        // fork.
        unsafe {
            command.pre_exec(move || {
                die_with_parent(parent)?;
                place_descriptors(&inherited, GATE_FD)?;
                for (resource, limit) in [(libc::RLIMIT_DATA, memory), (libc::RLIMIT_CORE, 0)] {
                    let limit = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(resource, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // It holds the module's descriptor from its first instruction: it is no
                // one, with nothing, from then on too.
                born_unprivileged(uid, gid, parent, &filter)
            });
        }
        let subscription = match self.reaping {
            Reaping::Monitor => Some(
                containerd_shim::monitor::monitor_subscribe(containerd_shim::monitor::Topic::Pid)
                    .map_err(|error| failed(format!("cannot watch its exit: {error}")))?,
            ),
            Reaping::Direct => None,
        };
        let mut child = on_spawner_thread(move || command.spawn())
            .map_err(|error| failed(format!("cannot start it: {error}")))?;
        drop(gate_reader);
        drop(report_writer);
        let pid = child.id();
        let cgroup = match &placement.cgroup {
            Some(path) => {
                let resources = Resources {
                    memory_limit: i64::try_from(self.memory).ok(),
                    ..Resources::default()
                };
                match Cgroup::create(path, &resources).and_then(|cgroup| {
                    cgroup.place(pid)?;
                    Ok(cgroup)
                }) {
                    Ok(cgroup) => Some(cgroup),
                    Err(error) => {
                        // Its gate closes unreleased: it exits without reading anything.
                        let _ = child.kill();
                        return Err(failed(format!("cannot place it in its cgroup: {error}")));
                    }
                }
            }
            None => None,
        };
        let released = gate.write_all(b"1");
        drop(gate);
        let stderr_tail = std::thread::spawn(move || {
            let mut tail = Vec::new();
            let mut chunk = [0u8; 4096];
            while let Ok(read) = stderr.read(&mut chunk) {
                if read == 0 {
                    break;
                }
                tail.extend_from_slice(&chunk[..read]);
                let excess = tail.len().saturating_sub(STDERR_TAIL);
                tail.drain(..excess);
            }
            String::from_utf8_lossy(&tail).into_owned()
        });
        let started = std::time::Instant::now();
        let mut said = false;
        let mut slow = || {
            if !said && started.elapsed() >= SLOW_COMPILE {
                progress(&format!(
                    "compiling {} ({}): its first start on this node compiles it, once",
                    module.name,
                    format_size(module.size)
                ));
                said = true;
            }
        };
        let code = loop {
            match &subscription {
                Some(subscription) => match subscription.rx.recv_timeout(SLOT_POLL) {
                    Ok(containerd_shim::monitor::ExitEvent {
                        subject: containerd_shim::monitor::Subject::Pid(exited),
                        exit_code,
                    }) if exited == pid as i32 => break exit_code,
                    Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        return Err(failed("its exit went unreported".into()));
                    }
                },
                None => match child.try_wait() {
                    Ok(Some(status)) => {
                        use std::os::unix::process::ExitStatusExt;
                        break status
                            .code()
                            .or_else(|| status.signal().map(|signal| 128 + signal))
                            .unwrap_or(1);
                    }
                    Ok(None) => std::thread::sleep(SLOT_POLL),
                    Err(error) => return Err(failed(format!("cannot wait for it: {error}"))),
                },
            }
            slow();
        };
        let took = started.elapsed();
        if let Some(cgroup) = cgroup
            && let Err(error) = cgroup.remove()
        {
            log::warn!("{error}");
        }
        let mut json = Vec::new();
        let _ = report.read_to_end(&mut json);
        let stderr = stderr_tail.join().unwrap_or_default();
        released.map_err(|error| failed(format!("it is gone before it started: {error}")))?;
        match serde_json::from_slice::<Report>(&json) {
            Ok(Report::Compiled(facts)) if code == 0 => {
                if said {
                    progress(&format!(
                        "compiled {} in {:.1} s",
                        module.name,
                        took.as_secs_f64()
                    ));
                }
                Ok(facts)
            }
            Ok(Report::Invalid(message)) => Err(CompileStepError::Invalid {
                module: module.name.to_owned(),
                message,
            }),
            Ok(Report::Failed(message)) => Err(failed(message)),
            _ if over_memory(code, &stderr) => Err(CompileStepError::OverMemory {
                module: module.name.to_owned(),
                size: format_size(module.size),
                limit: format_size(self.memory),
            }),
            _ => Err(failed(format!(
                "it exited with {code}{}",
                match stderr.trim() {
                    "" => String::new(),
                    said => format!(": {said}"),
                }
            ))),
        }
    }
}

/// Whether a step that ended with `code` and `stderr` ran out of its memory: killed by
/// the kernel (its cgroup's limit; nothing else here sends it SIGKILL), or aborted when
/// an allocation failed (its data rlimit).
fn over_memory(code: i32, stderr: &str) -> bool {
    code == 128 + libc::SIGKILL
        || (code == 128 + libc::SIGABRT && stderr.contains("memory allocation of"))
        || stderr.contains("out of memory")
}
