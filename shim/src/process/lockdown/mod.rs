//! The lock-down of a process that handles guest bytes: from here on it can reach only
//! what its [`Confinement`] names, even if a bug in the engine handed the guest the process
//! itself.
//!
//! In order: no new privileges; Landlock (files: the granted directories and the one
//! writable file; TCP: connect only to granted ports; no signals to, and no abstract
//! sockets of, anything outside); no capability in any set, bounding included; the user and
//! groups; the parent-death signal again (a change of user clears it); the seccomp
//! allow-list (see [`seccomp`]). Each layer fails closed: a kernel without Landlock refuses
//! the container unless the node configuration allows it.

use std::os::fd::OwnedFd;

use anyhow::{Context, Result};

use bulwark_runtime::policy::Access;

use crate::bundle::spec::User;

pub mod seccomp;

/// What a locked-down process may still reach.
#[derive(Debug)]
pub struct Confinement<'a> {
    /// Directories it may use (by descriptor), what it may do there, and their names for
    /// messages.
    pub dirs: Vec<(&'a OwnedFd, Access, &'a str)>,
    /// A file it may write (the termination-message file), if any.
    pub writable_file: Option<&'a OwnedFd>,
    /// TCP ports it may connect to.
    pub tcp_ports: Vec<u16>,
    /// Who it runs as (a process that is not root stays who it is).
    pub user: &'a User,
    /// Whether it may run where the kernel does not enforce Landlock.
    pub allow_without_landlock: bool,
    /// The pid of the process it must die with (the shim).
    pub parent: libc::pid_t,
    /// What its system calls must allow.
    pub seccomp: seccomp::Needs,
}

/// Locks the calling process down to `confinement`. It must be single-threaded.
pub fn lock_down(confinement: &Confinement) -> Result<()> {
    // Landlock, capabilities and the user are per thread: a thread that existed before
    // would keep what the others give up. Loading compiles on this thread only.
    let threads = std::fs::read_dir("/proc/self/task")
        .map(Iterator::count)
        .unwrap_or(0);
    anyhow::ensure!(
        threads == 1,
        "{threads} threads exist before the lock-down; expected 1"
    );
    // Root (the shim's processes) gives up every privilege and becomes the user; anyone
    // else (the CLI run by a user) has none to give up but the sets it may clear itself.
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    set_no_new_privs()?;
    restrict_access(confinement)?;
    if root {
        caps::clear(None, caps::CapSet::Bounding).context("cannot drop the bounding set")?;
    }
    drop_inheritable_capabilities()?;
    if root {
        become_user(confinement.user)?;
    }
    clear_capabilities()?;
    crate::process::die_with_parent(confinement.parent)
        .context("cannot tie this process to its shim")?;
    seccomp::install(confinement.seccomp)?;
    Ok(())
}

/// Tokio makes a pair of UNIX sockets for its signal driver the first time a runtime with
/// I/O is built in a process (WASI preview 2 and the HTTP server build one), and keeps it
/// for the process's life. Made here, before the filter, the pair exists already, and the
/// filter allows no socket but TCP (none at all without a network grant). Only the workload
/// needs it: the compile step runs no Tokio, and is born refusing every socket.
pub fn warm_tokio_signals() -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("cannot start an I/O runtime before lock-down")?;
    Ok(())
}

fn set_no_new_privs() -> Result<()> {
    // SAFETY: plain prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot set no_new_privs");
    }
    Ok(())
}

/// The ambient and inheritable sets: nothing passes to a program executed later.
fn drop_inheritable_capabilities() -> Result<()> {
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

fn become_user(user: &User) -> Result<()> {
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

/// Landlock, at the newest ABI the kernel offers: the process may open only the granted
/// directories (read-only ones for reading) and write its one writable file; it may
/// connect over TCP only to granted ports and bind none; it may not signal, nor connect to
/// an abstract UNIX socket of, anything outside its own domain.
fn restrict_access(confinement: &Confinement) -> Result<()> {
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
    for (dir, access, name) in &confinement.dirs {
        let access = match access {
            Access::ReadOnly => AccessFs::from_read(abi),
            Access::ReadWrite => AccessFs::from_all(abi),
        };
        ruleset = ruleset
            .add_rule(PathBeneath::new(*dir, access))
            .with_context(|| format!("cannot add a Landlock rule for {name}"))?;
    }
    if let Some(log) = confinement.writable_file {
        ruleset = ruleset
            .add_rule(PathBeneath::new(
                log,
                AccessFs::WriteFile | AccessFs::Truncate,
            ))
            .context("cannot add a Landlock rule for the writable file")?;
    }
    let mut ports = confinement.tcp_ports.clone();
    ports.sort_unstable();
    ports.dedup();
    for port in ports {
        ruleset = ruleset
            .add_rule(NetPort::new(port, AccessNet::ConnectTcp))
            .context("cannot add a Landlock rule for a granted port")?;
    }
    let status = ruleset.restrict_self().context("cannot apply Landlock")?;
    match status.ruleset {
        RulesetStatus::NotEnforced if confinement.allow_without_landlock => {
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
