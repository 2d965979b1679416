//! The workload process: one per Wasm container, started by the shim as
//! `containerd-shim-bulwark-v1 workload PLAN`.
//!
//! The shim starts it ([`Launch`]) in the pod's network, IPC and UTS namespaces, with the
//! container's module and preopened directories as descriptors it opened once, beneath the
//! container's root (see [`crate::spec::Location`]): the workload never looks a container
//! path up itself. It waits at its gate until the shim has placed it in the container's
//! cgroup (or systemd scope) and set its OOM score and rlimits, loads the module through the
//! node cache, locks itself down ([`crate::lockdown`]) and only then runs the guest. Its exit
//! code is the container's: the guest's own, or the contract's code for a limit.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use bulwark_runtime::cache::ModuleCache;
use bulwark_runtime::policy::{Access, Policy};
use bulwark_runtime::run::{Preopen, Report, Workload};
use bulwark_runtime::{Runtime, RuntimeOptions};

use crate::cgroup::Cgroup;
use crate::spawn::{ProcessLimits, on_spawner_thread};
use crate::spec::{Namespace, User};

/// The first argument that turns the shim binary into a workload process.
pub const WORKLOAD_ARG: &str = "workload";

/// The descriptor the workload process inherits the read end of its gate on: the shim
/// writes one byte once the process is in its cgroup; end of file means it never will be.
pub const WORKLOAD_GATE_FD: RawFd = 3;
/// The descriptor the module (the wasm file, opened by the shim) arrives on.
pub const MODULE_FD: RawFd = 4;
/// The descriptor of the first preopened directory; the others follow in the plan's order,
/// and the termination-message file, if the plan has one, comes after them.
pub const FIRST_PREOPEN_FD: RawFd = 5;

/// What the workload process tries right after locking itself down, colon-separated,
/// reporting each on stderr: paths to open for reading from the host side, `>PATH` to
/// create or write, and `@NAME` for system calls: `socket` (an IPv4 TCP socket),
/// `socket-unix`, `socket-netlink`, `fork`, `unshare`, `ptrace`, and `kill-PID` and
/// `tgkill-PID` (signal 0 to process PID).
/// It is the test of the lock-down: a stand-in for a bug in the engine that would let a
/// guest reach past it. It only ever reports whether an attempt succeeded.
pub const LOCKDOWN_PROBE_ENV: &str = "BULWARK_LOCKDOWN_PROBE";

/// A directory the guest gets, as the plan records it (the descriptor arrives at
/// [`FIRST_PREOPEN_FD`] + its index).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedPreopen {
    /// The path the guest uses (the container path).
    pub guest: String,
    /// What the guest may do there.
    pub access: Access,
}

/// Everything a workload process needs, resolved by the shim at Create.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// The entrypoint as the container names it, for messages (the module itself arrives on
    /// [`MODULE_FD`]).
    pub entrypoint: String,
    /// argv for the guest.
    pub args: Vec<String>,
    /// Environment, after the policy's allow-list.
    pub env: Vec<(String, String)>,
    /// Preopened directories, in descriptor order.
    pub preopens: Vec<PlannedPreopen>,
    /// The effective policy.
    pub policy: Policy,
    /// The node's module cache.
    pub cache_dir: PathBuf,
    /// Whether kubelet mounted a termination-message file (it arrives, opened for writing,
    /// after the preopened directories).
    pub termination_log: bool,
    /// The container's user.
    pub user: User,
    /// Whether the module is a wasi:http component, served rather than run.
    #[serde(default)]
    pub serve: bool,
}

impl Plan {
    /// Writes the plan next to the bundle's config.json, readable by root only: it holds
    /// the container's environment, secrets included.
    pub fn write(&self, path: &Path) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let json = serde_json::to_vec(self)?;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut file| file.write_all(&json))
            .with_context(|| format!("cannot write {}", path.display()))
    }

    fn read(path: &Path) -> Result<Plan> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("malformed plan {}", path.display()))
    }
}

/// How the shim starts a workload process: its plan, the descriptors it inherits and the
/// pod namespaces it is born into.
#[derive(Debug)]
pub struct Launch {
    /// The plan file.
    pub plan: PathBuf,
    /// The module, open for reading.
    pub module: File,
    /// The preopened directories, in the plan's order.
    pub preopens: Vec<File>,
    /// The termination-message file kubelet made, open for writing.
    pub termination_log: Option<File>,
    /// The namespaces to join (with a path) or to get anew (without).
    pub namespaces: Vec<Namespace>,
}

impl Launch {
    /// The command that starts the workload process (`exe`: the shim binary, which the shim
    /// names as [`SELF_EXE`]), gated on `gate` (the read end of a [`pipe`]). Only
    /// async-signal-safe calls happen in the child before it runs: it asks to die with its
    /// parent, moves its descriptors into place and enters the pod's namespaces.
    pub fn command(self, gate: &File, exe: &Path) -> Result<Command> {
        use std::os::unix::process::CommandExt;
        let mut joins: Vec<(libc::c_int, OwnedFd)> = Vec::new();
        let mut unshare = 0;
        for namespace in &self.namespaces {
            match &namespace.path {
                Some(path) => {
                    let file = File::open(path).with_context(|| {
                        format!(
                            "cannot open the pod's {} namespace {}",
                            namespace.kind.proc_name(),
                            path.display()
                        )
                    })?;
                    joins.push((namespace.kind.clone_flag(), file.into()));
                }
                None => unshare |= namespace.kind.clone_flag(),
            }
        }
        let mut inherited: Vec<OwnedFd> = vec![gate.try_clone()?.into(), self.module.into()];
        inherited.extend(self.preopens.into_iter().map(OwnedFd::from));
        inherited.extend(self.termination_log.map(OwnedFd::from));
        let parent = std::process::id() as libc::pid_t;
        let mut command = Command::new(exe);
        command.arg0("containerd-shim-bulwark-v1");
        command.arg(WORKLOAD_ARG).arg(&self.plan);
        // SAFETY: the closure makes only async-signal-safe system calls (prctl, getppid,
        // fcntl, dup2, setns, unshare) on descriptors it owns.
        unsafe {
            command.pre_exec(move || {
                crate::spawn::die_with_parent(parent)?;
                place_descriptors(&inherited, WORKLOAD_GATE_FD)?;
                for (flag, namespace) in &joins {
                    if libc::setns(namespace.as_raw_fd(), *flag) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if unshare != 0 && libc::unshare(unshare) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(command)
    }
}

/// Makes `fds` the descriptors `first`, `first + 1`, ... of this (forked) process, without
/// close-on-exec. Async-signal-safe. Copies go above the target range first, so a source
/// that already sits on a target number is never overwritten before it is moved.
fn place_descriptors(fds: &[OwnedFd], first: RawFd) -> std::io::Result<()> {
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

/// The shim's own binary, for starting its workload and holder processes: the running
/// file itself, which stays valid when an upgrade replaces the file at the shim's path.
pub const SELF_EXE: &str = "/proc/self/exe";

/// A close-on-exec pipe: a workload's gate (the read end goes to [`Launch::command`], the
/// write end releases it), or a holder's status report.
pub fn pipe() -> std::io::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two descriptors, which we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nothing else.
    unsafe { Ok((File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))) }
}

/// Environment the shim passes on to its workload processes (nothing else of its own
/// environment reaches them).
const PASSED_ENV: [&str; 3] = [
    crate::container::CACHE_DIR_ENV,
    LOCKDOWN_PROBE_ENV,
    "RUST_LOG",
];

/// A workload process, started and waiting at its gate for [`Gated::release`].
#[derive(Debug)]
pub struct Gated {
    /// Its pid.
    pub pid: u32,
    gate: File,
}

impl Gated {
    /// Lets the workload run (it loads its module and runs the guest).
    pub fn release(&self) -> std::io::Result<()> {
        use std::io::Write;
        (&self.gate).write_all(b"1")
    }
}

/// Starts the workload process of `launch` with `stdio`, places it in `cgroup` and applies
/// `limits`; it then waits at its gate. On failure nothing is left running.
pub fn start_gated(
    launch: Launch,
    stdio: [std::process::Stdio; 3],
    cgroup: Option<&Cgroup>,
    limits: &ProcessLimits,
) -> Result<Gated, String> {
    let (gate_reader, gate) =
        pipe().map_err(|e| format!("cannot make the workload's gate: {e}"))?;
    let mut command = launch
        .command(&gate_reader, Path::new(SELF_EXE))
        .map_err(|e| format!("{e:#}"))?;
    let [stdin, stdout, stderr] = stdio;
    command
        .env_clear()
        .current_dir("/")
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr);
    for name in PASSED_ENV {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    let mut child = on_spawner_thread(move || command.spawn())
        .map_err(|e| format!("cannot start the workload process: {e}"))?;
    drop(gate_reader);
    let pid = child.id();
    let placed = match cgroup {
        Some(cgroup) => cgroup.place(pid).map_err(|e| e.to_string()),
        None => Ok(()),
    };
    if let Err(message) = placed.and_then(|()| limits.apply(pid)) {
        // Closing the gate unreleased makes the workload exit without running; kill it
        // anyway so nothing is left running.
        let _ = child.kill();
        return Err(message);
    }
    Ok(Gated { pid, gate })
}

/// Runs a workload process to its end; returns its exit code.
pub fn main(plan_path: &Path) -> i32 {
    crate::init_stderr_logging();
    match run(plan_path) {
        Ok(code) => code,
        Err(error) => {
            // The container's stderr is its log: say why it could not run.
            eprintln!("bulwark: error: {error:#}");
            1
        }
    }
}

/// What the workload runs: a program to its end, or a wasi:http service.
enum Loaded {
    Program(bulwark_runtime::run::Loaded),
    Service(
        bulwark_runtime::serve::Service,
        bulwark_runtime::serve::Listeners,
    ),
}

fn run(plan_path: &Path) -> Result<i32> {
    // SAFETY: getppid has no preconditions. The shim checked it was our parent before exec.
    let shim = unsafe { libc::getppid() };
    wait_at_gate()?;
    let plan = Plan::read(plan_path)?;
    let loaded = load(&plan)?;
    // The cache's key did not outlive loading (the runtime is dropped): the guest may not
    // forge entries. Nor may anything of it be left on the stack.
    crate::lockdown::scrub_stack();

    let preopens = inherited_descriptors(&plan)?;
    let termination_log = match plan.termination_log {
        true => Some(inherited(
            FIRST_PREOPEN_FD + plan.preopens.len() as RawFd,
            "the termination-message file",
        )?),
        false => None,
    };
    crate::lockdown::lock_down(&plan, &preopens, termination_log.as_ref(), shim)?;
    if let Some(paths) = std::env::var_os(LOCKDOWN_PROBE_ENV) {
        crate::lockdown::probe(&paths);
    }

    let workload = Workload {
        args: plan.args.clone(),
        env: plan.env.clone(),
        preopens: preopens
            .iter()
            .zip(&plan.preopens)
            .map(|(dir, planned)| Preopen {
                // The very directory the shim opened (a magic link to it, not a path).
                host: PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())),
                guest: planned.guest.clone(),
                access: planned.access,
            })
            .collect(),
        inherit_stdio: true,
    };
    let report = Report {
        // The very file kubelet made: its path on the host may not be ours to walk.
        termination_log: termination_log
            .as_ref()
            .map(|log| PathBuf::from(format!("/proc/self/fd/{}", log.as_raw_fd()))),
    };
    match loaded {
        Loaded::Program(program) => Ok(program.run(&workload, &report)?.exit_code()),
        Loaded::Service(service, listeners) => Ok(service.serve(listeners, workload)?),
    }
}

/// Loads the module through the node cache (then dropped, key and all) and, for a
/// service, binds its addresses in the pod's network namespace: before the lock-down, so a
/// port below 1024 can be had, but not yet listening (that waits for a first instance).
fn load(plan: &Plan) -> Result<Loaded> {
    let wasm = read_module(&plan.entrypoint)?;
    let cache = match ModuleCache::open(&plan.cache_dir) {
        Ok(cache) => Some(cache),
        Err(error) => {
            log::warn!("{error}; compiling without the cache");
            None
        }
    };
    let runtime = Runtime::new(RuntimeOptions {
        cache,
        parallel_compilation: false,
        ..RuntimeOptions::default()
    });
    let entrypoint = || plan.entrypoint.clone();
    if !plan.serve {
        let program = runtime.load(&plan.policy, &wasm).with_context(entrypoint)?;
        return Ok(Loaded::Program(program));
    }
    let service = runtime
        .load_service(&plan.policy, &wasm)
        .with_context(entrypoint)?;
    let listeners = bulwark_runtime::serve::Listeners::bind(service.serving())?;
    Ok(Loaded::Service(service, listeners))
}

fn read_module(entrypoint: &str) -> Result<Vec<u8>> {
    // SAFETY: the shim placed the module on this descriptor for us alone.
    let mut module = unsafe { File::from_raw_fd(MODULE_FD) };
    let mut wasm = Vec::new();
    module
        .read_to_end(&mut wasm)
        .with_context(|| format!("cannot read the module {entrypoint}"))?;
    Ok(wasm)
}

/// The preopened directories the shim passed, in the plan's order.
fn inherited_descriptors(plan: &Plan) -> Result<Vec<OwnedFd>> {
    (FIRST_PREOPEN_FD..)
        .zip(&plan.preopens)
        .map(|(fd, planned)| inherited(fd, &format!("the directory for {}", planned.guest)))
        .collect()
}

/// Descriptor `fd`, which the shim passed for `what`.
fn inherited(fd: RawFd, what: &str) -> Result<OwnedFd> {
    // SAFETY: F_GETFD only checks that the shim passed this descriptor.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        anyhow::bail!("{what} was not passed (descriptor {fd})");
    }
    // SAFETY: the shim placed it on this descriptor for us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Blocks until the shim releases this process (see [`WORKLOAD_GATE_FD`]).
fn wait_at_gate() -> Result<()> {
    // SAFETY: the shim set up this descriptor for us alone; nothing else in the process
    // uses it, and the File closes it.
    let mut gate = unsafe { File::from_raw_fd(WORKLOAD_GATE_FD) };
    let mut byte = [0u8; 1];
    match gate.read(&mut byte) {
        Ok(1) => Ok(()),
        Ok(_) => anyhow::bail!("the shim did not place this workload in its cgroup; not running"),
        Err(error) => Err(error).context("cannot read the workload gate"),
    }
}
