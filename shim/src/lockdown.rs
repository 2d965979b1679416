//! The workload process's lock-down, after its module is loaded and before the guest runs:
//! from here on the process can reach only what the guest was granted, even if a bug in
//! the engine handed the guest the process itself.
//!
//! In order: no new privileges; Landlock (files: the preopened directories and the
//! termination-message file; TCP: connect only to granted ports; no signals to, and no
//! abstract sockets of, anything outside); no capability in any set, bounding included;
//! the container's user and groups; the parent-death signal again (a change of user clears
//! it); the seccomp allow-list (see [`crate::seccomp`]). Each layer fails closed: a kernel
//! without Landlock refuses the container unless the node configuration allows it.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::Path;

use anyhow::{Context, Result};

use bulwark_runtime::policy::Access;

use crate::workload::Plan;

/// Locks the process down; `preopens` are the directories of the plan, in order, `shim`
/// the pid of the shim that started it, and
/// `termination_log` the termination-message file, if any.
pub fn lock_down(
    plan: &Plan,
    preopens: &[OwnedFd],
    termination_log: Option<&OwnedFd>,
    shim: libc::pid_t,
) -> Result<()> {
    // Landlock, capabilities and the user are per thread: a thread that existed before
    // would keep what the others give up. Loading compiles on this thread only.
    let threads = std::fs::read_dir("/proc/self/task")
        .map(Iterator::count)
        .unwrap_or(0);
    anyhow::ensure!(
        threads == 1,
        "{threads} threads exist before the lock-down; expected 1"
    );
    set_no_new_privs()?;
    restrict_access(plan, preopens, termination_log)?;
    drop_capability_bounds()?;
    become_user(plan)?;
    clear_capabilities()?;
    crate::spawn::die_with_parent(shim).context("cannot tie this workload to its shim")?;
    crate::seccomp::install(crate::seccomp::Needs {
        network: !plan.policy.network.is_empty(),
        serving: plan.serve,
    })?;
    Ok(())
}

fn set_no_new_privs() -> Result<()> {
    // SAFETY: plain prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot set no_new_privs");
    }
    Ok(())
}

/// The bounding, ambient and inheritable sets, while CAP_SETPCAP is still effective.
fn drop_capability_bounds() -> Result<()> {
    caps::clear(None, caps::CapSet::Bounding).context("cannot drop the bounding set")?;
    caps::clear(None, caps::CapSet::Ambient).context("cannot clear ambient capabilities")?;
    caps::clear(None, caps::CapSet::Inheritable)
        .context("cannot clear inheritable capabilities")?;
    Ok(())
}

/// What a change to a non-zero uid did not already clear (all of it, for uid 0).
fn clear_capabilities() -> Result<()> {
    caps::clear(None, caps::CapSet::Effective).context("cannot clear effective capabilities")?;
    caps::clear(None, caps::CapSet::Permitted).context("cannot clear permitted capabilities")?;
    Ok(())
}

fn become_user(plan: &Plan) -> Result<()> {
    let user = &plan.user;
    // SAFETY: setgroups/setgid/setuid with valid arguments; groups and gid first, while
    // CAP_SETGID is still ours.
    unsafe {
        if libc::setgroups(user.additional_gids.len(), user.additional_gids.as_ptr()) != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot set groups {:?}", user.additional_gids));
        }
        if libc::setgid(user.gid) != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot set gid {}", user.gid));
        }
        if libc::setuid(user.uid) != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot set uid {}", user.uid));
        }
    }
    Ok(())
}

/// Landlock, at the newest ABI the kernel offers: the process may open only the preopened
/// directories (read-only ones for reading) and write its termination-message file; it may
/// connect over TCP only to granted ports and bind none; it may not signal, nor connect to
/// an abstract UNIX socket of, anything outside its own domain.
fn restrict_access(
    plan: &Plan,
    preopens: &[OwnedFd],
    termination_log: Option<&OwnedFd>,
) -> Result<()> {
    use landlock::{
        ABI, Access as _, AccessFs, AccessNet, NetPort, PathBeneath, Ruleset, RulesetAttr,
        RulesetCreatedAttr, RulesetStatus, Scope,
    };
    let abi = ABI::V10;
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|ruleset| ruleset.handle_access(AccessNet::from_all(abi)))
        .and_then(|ruleset| ruleset.scope(Scope::from_all(abi)))
        .and_then(|ruleset| ruleset.create())
        .context("cannot create the Landlock ruleset")?;
    for (dir, planned) in preopens.iter().zip(&plan.preopens) {
        let access = match planned.access {
            Access::ReadOnly => AccessFs::from_read(abi),
            Access::ReadWrite => AccessFs::from_all(abi),
        };
        ruleset = ruleset
            .add_rule(PathBeneath::new(dir, access))
            .with_context(|| format!("cannot add a Landlock rule for {}", planned.guest))?;
    }
    if let Some(log) = termination_log {
        ruleset = ruleset
            .add_rule(PathBeneath::new(
                log,
                AccessFs::WriteFile | AccessFs::Truncate,
            ))
            .context("cannot add a Landlock rule for the termination-message file")?;
    }
    let mut ports: Vec<u16> = plan.policy.network.iter().map(|a| a.port()).collect();
    ports.sort_unstable();
    ports.dedup();
    for port in ports {
        ruleset = ruleset
            .add_rule(NetPort::new(port, AccessNet::ConnectTcp))
            .context("cannot add a Landlock rule for a granted port")?;
    }
    let status = ruleset.restrict_self().context("cannot apply Landlock")?;
    match status.ruleset {
        RulesetStatus::NotEnforced if plan.policy.allow_without_landlock => {
            log::warn!(
                "this kernel does not enforce Landlock: file access is not restricted (capabilities.allow_without_landlock = true)"
            );
        }
        RulesetStatus::NotEnforced => anyhow::bail!(
            "this kernel does not enforce Landlock ({:?}), so a Wasm workload would run with the node's filesystem open to it: refused. Run Linux 5.13 or later with landlock in its lsm= list, or set capabilities.allow_without_landlock = true in the node configuration",
            status.landlock
        ),
        RulesetStatus::PartiallyEnforced => log::info!(
            "this kernel enforces an older Landlock ABI ({:?}): some of Bulwark's rules are not applied",
            status.landlock
        ),
        RulesetStatus::FullyEnforced => {}
    }
    Ok(())
}

/// Overwrites the stack below the caller with zeros: loading went through the cache's key
/// (HMAC states live on the stack), and none of it may be there when the guest runs.
#[inline(never)]
pub fn scrub_stack() {
    let mut area = [0u8; 256 * 1024];
    for byte in area.iter_mut() {
        // SAFETY: a volatile write to a local the compiler must not elide.
        unsafe { std::ptr::write_volatile(byte, 0) };
    }
    std::hint::black_box(&mut area);
}

/// See [`crate::workload::LOCKDOWN_PROBE_ENV`].
pub fn probe(paths: &std::ffi::OsStr) {
    for path in std::env::split_paths(paths) {
        let name = path.display().to_string();
        let result = if let Some(syscall) = name.strip_prefix('@') {
            probe_syscall(syscall)
        } else if let Some(target) = name.strip_prefix('>') {
            File::options()
                .write(true)
                .create(true)
                .truncate(false)
                .open(Path::new(target))
                .map(drop)
        } else {
            File::open(&path).map(drop)
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
    let socket = |family, kind| {
        // SAFETY: a socket that is closed at once.
        check(unsafe { libc::socket(family, kind, 0) } as i64).map(|fd| {
            // SAFETY: closes the socket just made.
            unsafe { libc::close(fd as i32) };
        })
    };
    let target = |prefix: &str| -> Option<std::io::Result<libc::pid_t>> {
        let pid = name.strip_prefix(prefix)?;
        Some(
            pid.parse()
                .map_err(|_| std::io::Error::other(format!("bad pid in probe {name}"))),
        )
    };
    // SAFETY: signal 0 only checks whether the signal could be sent.
    if let Some(pid) = target("kill-") {
        return check(unsafe { libc::kill(pid?, 0) } as i64).map(drop);
    }
    if let Some(pid) = target("tgkill-") {
        let pid = pid?;
        // SAFETY: as above, to the thread group leader `pid` of process `pid`.
        return check(unsafe { libc::syscall(libc::SYS_tgkill, pid, pid, 0) }).map(drop);
    }
    // SAFETY: each call either fails or creates something that is released at once; a
    // forked child exits immediately without touching anything.
    unsafe {
        match name {
            "socket" => socket(libc::AF_INET, libc::SOCK_STREAM),
            "socket-unix" => socket(libc::AF_UNIX, libc::SOCK_STREAM),
            "socket-netlink" => socket(libc::AF_NETLINK, libc::SOCK_RAW),
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
