//! The workload process: one per Wasm container, started by the shim as
//! `containerd-shim-bulwark-v1 workload PLAN`. It waits at its gate until the shim has
//! placed it in the container's cgroup (or systemd scope), loads the module through the
//! node cache, locks itself down (no new privileges, no capabilities, the container's
//! user, Landlock over the filesystem) and only then runs the guest. Its exit code is the
//! container's: the guest's own, or the contract's code for a limit.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use bulwark_runtime::cache::ModuleCache;
use bulwark_runtime::policy::{Access, Policy};
use bulwark_runtime::run::{Preopen, Report, Workload};
use bulwark_runtime::{Runtime, RuntimeOptions};

/// The first argument that turns the shim binary into a workload process.
pub const WORKLOAD_ARG: &str = "workload";

/// The descriptor the workload process inherits the read end of its gate on: the shim
/// writes one byte once the process is in its cgroup; end of file means it never will be.
pub const WORKLOAD_GATE_FD: i32 = 3;

/// What the workload process tries right after locking itself down, colon-separated,
/// reporting each on stderr: paths to open from the host side, and `@NAME` for the syscalls
/// `socket`, `fork`, `unshare` and `ptrace`. It is the test of the lock-down: a stand-in
/// for a bug in the engine that would let a guest reach past it. It only ever reports
/// whether an attempt succeeded.
pub const LOCKDOWN_PROBE_ENV: &str = "BULWARK_LOCKDOWN_PROBE";

/// Everything a workload process needs, resolved by the shim at Create.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// The wasm file on the host (inside the rootfs, or a content-store blob).
    pub module: PathBuf,
    /// argv for the guest.
    pub args: Vec<String>,
    /// Environment, after the policy's allow-list.
    pub env: Vec<(String, String)>,
    /// Preopened directories, host paths resolved.
    pub preopens: Vec<Preopen>,
    /// The effective policy.
    pub policy: Policy,
    /// The node's module cache.
    pub cache_dir: PathBuf,
    /// Kubernetes' termination-message file on the host.
    pub termination_log: Option<PathBuf>,
    /// The container's user.
    pub uid: u32,
    /// The container's group.
    pub gid: u32,
    /// The container's supplementary groups.
    pub additional_gids: Vec<u32>,
    /// The pod's network namespace to join, if it has one of its own.
    #[serde(default)]
    pub network_namespace: Option<PathBuf>,
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

fn run(plan_path: &Path) -> Result<i32> {
    wait_at_gate()?;
    let plan = Plan::read(plan_path)?;
    let wasm = std::fs::read(&plan.module)
        .with_context(|| format!("cannot read the module {}", plan.module.display()))?;
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
    let loaded = runtime
        .load(&plan.policy, &wasm)
        .with_context(|| format!("{}", plan.module.display()))?;
    drop(wasm);

    lock_down(&plan)?;
    if let Some(paths) = std::env::var_os(LOCKDOWN_PROBE_ENV) {
        probe(&paths);
    }

    let workload = Workload {
        args: plan.args.clone(),
        env: plan.env.clone(),
        preopens: plan.preopens.clone(),
        inherit_stdio: true,
    };
    let report = Report {
        termination_log: plan.termination_log.clone(),
    };
    let outcome = loaded.run(&workload, &report)?;
    Ok(outcome.exit_code())
}

/// A close-on-exec pipe whose read end becomes a workload's gate (see
/// [`attach_gate`]) and whose write end releases it.
pub fn gate_pipe() -> std::io::Result<(std::fs::File, std::fs::File)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two descriptors, which we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nothing else.
    unsafe {
        Ok((
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        ))
    }
}

/// Makes `reader` the gate of the workload process `command` starts, as
/// [`WORKLOAD_GATE_FD`]. Keep `reader` open until the process is spawned.
pub fn attach_gate(command: &mut std::process::Command, reader: &std::fs::File) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let reader = reader.as_raw_fd();
    // SAFETY: only dup2(2) and fcntl(2), both async-signal-safe, between fork and exec.
    unsafe {
        command.pre_exec(move || {
            // dup2 onto itself would keep close-on-exec set: clear it instead.
            let result = if reader == WORKLOAD_GATE_FD {
                libc::fcntl(reader, libc::F_SETFD, 0)
            } else {
                libc::dup2(reader, WORKLOAD_GATE_FD)
            };
            if result == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Blocks until the shim releases this process (see [`WORKLOAD_GATE_FD`]).
fn wait_at_gate() -> Result<()> {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    // SAFETY: the shim set up this descriptor for us alone; nothing else in the process
    // uses it, and the File closes it.
    let mut gate = unsafe { std::fs::File::from_raw_fd(WORKLOAD_GATE_FD) };
    let mut byte = [0u8; 1];
    match gate.read(&mut byte) {
        Ok(1) => Ok(()),
        Ok(_) => anyhow::bail!("the shim did not place this workload in its cgroup; not running"),
        Err(error) => Err(error).context("cannot read the workload gate"),
    }
}

fn probe(paths: &std::ffi::OsStr) {
    for path in std::env::split_paths(paths) {
        let name = path.display().to_string();
        let result = match name.strip_prefix('@') {
            Some(syscall) => probe_syscall(syscall),
            None => std::fs::File::open(&path).map(drop),
        };
        match result {
            Ok(()) => eprintln!("bulwark: probe: {name}: ALLOWED"),
            Err(error) => eprintln!("bulwark: probe: {name}: denied ({error})"),
        }
    }
}

fn probe_syscall(name: &str) -> std::io::Result<()> {
    let check = |result: i64| {
        if result < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(result)
        }
    };
    // SAFETY: each call either fails or creates something that is released at once; a
    // forked child exits immediately without touching anything.
    unsafe {
        match name {
            "socket" => check(libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) as i64).map(|fd| {
                libc::close(fd as i32);
            }),
            "fork" => check(libc::fork() as i64).map(|pid| {
                if pid == 0 {
                    libc::_exit(0);
                }
            }),
            "unshare" => check(libc::unshare(libc::CLONE_NEWNS) as i64).map(drop),
            "ptrace" => check(libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0)).map(drop),
            _ => Err(std::io::Error::other(format!("unknown probe {name}"))),
        }
    }
}

/// From here on the process can reach only what the guest was granted.
fn join_network_namespace(path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let namespace = std::fs::File::open(path)
        .with_context(|| format!("cannot open the pod's network namespace {}", path.display()))?;
    // SAFETY: setns on a descriptor we own, for the calling (only) thread.
    if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| {
            format!("cannot join the pod's network namespace {}", path.display())
        });
    }
    Ok(())
}

fn lock_down(plan: &Plan) -> Result<()> {
    // Landlock, capabilities and the user are per thread: a thread that existed before
    // would keep what the others give up. Loading compiles on this thread only.
    let threads = std::fs::read_dir("/proc/self/task")
        .map(Iterator::count)
        .unwrap_or(0);
    anyhow::ensure!(
        threads == 1,
        "{threads} threads exist before the lock-down; expected 1"
    );
    if let Some(path) = &plan.network_namespace {
        join_network_namespace(path)?;
    }
    set_no_new_privs()?;
    restrict_filesystem(plan)?;
    become_user(plan)?;
    drop_capabilities()?;
    crate::seccomp::install(!plan.policy.network.is_empty())?;
    Ok(())
}

fn set_no_new_privs() -> Result<()> {
    // SAFETY: plain prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot set no_new_privs");
    }
    Ok(())
}

fn become_user(plan: &Plan) -> Result<()> {
    let groups: Vec<libc::gid_t> = plan.additional_gids.clone();
    // SAFETY: setgroups/setgid/setuid with valid arguments; order matters (groups and
    // gid first, while we may still change them).
    unsafe {
        if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
            return Err(std::io::Error::last_os_error()).context("cannot set groups");
        }
        if libc::setgid(plan.gid) != 0 {
            return Err(std::io::Error::last_os_error()).context("cannot set gid");
        }
        if libc::setuid(plan.uid) != 0 {
            return Err(std::io::Error::last_os_error()).context("cannot set uid");
        }
    }
    Ok(())
}

fn drop_capabilities() -> Result<()> {
    caps::clear(None, caps::CapSet::Bounding).context("cannot drop the bounding set")?;
    caps::clear(None, caps::CapSet::Ambient).context("cannot clear ambient capabilities")?;
    caps::clear(None, caps::CapSet::Inheritable)
        .context("cannot clear inheritable capabilities")?;
    caps::clear(None, caps::CapSet::Effective).context("cannot clear effective capabilities")?;
    caps::clear(None, caps::CapSet::Permitted).context("cannot clear permitted capabilities")?;
    Ok(())
}

/// Landlock: the process may open only the preopened directories (read-only ones for
/// reading) and write its termination-message file; the module is already loaded.
fn restrict_filesystem(plan: &Plan) -> Result<()> {
    use landlock::{
        ABI, Access as _, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
        RulesetStatus,
    };
    let abi = ABI::V3;
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .context("cannot set up Landlock")?
        .create()
        .context("cannot create the Landlock ruleset")?;
    for preopen in &plan.preopens {
        let access = match preopen.access {
            Access::ReadOnly => AccessFs::from_read(abi),
            Access::ReadWrite => AccessFs::from_all(abi),
        };
        let fd = PathFd::new(&preopen.host)
            .with_context(|| format!("cannot open {}", preopen.host.display()))?;
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, access))
            .context("cannot add a Landlock rule")?;
    }
    if let Some(log) = &plan.termination_log
        && let Ok(fd) = PathFd::new(log)
    {
        ruleset = ruleset
            .add_rule(PathBeneath::new(
                fd,
                AccessFs::WriteFile | AccessFs::Truncate,
            ))
            .context("cannot add a Landlock rule")?;
    }
    let status = ruleset.restrict_self().context("cannot apply Landlock")?;
    if status.ruleset == RulesetStatus::NotEnforced {
        log::warn!("Landlock is not available on this kernel: file access is not restricted");
    }
    Ok(())
}
