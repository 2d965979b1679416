//! The workload process's seccomp allow-list: what Wasmtime and WASI need to run a guest
//! whose module is already loaded, and nothing else.
//!
//! The list was taken from strace of every guest in images/guests (files, directories,
//! clocks, sleep, stdin, memory growth, traps) after the lock-down point, widened only to
//! the sibling calls of the same operations (`*at` variants, vectored I/O). Sockets are
//! allowed only when the policy grants network destinations.
//!
//! Some calls are allowed only with certain arguments: `clone` only for threads; `tgkill`
//! only to the workload's own threads (no signal reaches another process); `socket` only
//! for IPv4/IPv6 TCP, and only when the policy grants destinations; `fcntl`, `ioctl` and
//! `prctl` only for the commands Wasmtime, WASI and the Rust runtime use (descriptor
//! flags, terminal and non-blocking queries, thread names).
//!
//! Anything else fails with ENOSYS, as if this kernel did not have it: that is also what
//! makes libc fall back from clone3 (whose flags a filter cannot inspect) to clone.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the seccomp filter: {0}")]
pub struct SeccompError(String);

const ALWAYS: &[i64] = &[
    // I/O on descriptors the guest was given.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fadvise64,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_utimensat,
    // Paths beneath preopened directories (Landlock decides which).
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_getdents64,
    libc::SYS_mkdirat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_symlinkat,
    libc::SYS_linkat,
    libc::SYS_readlinkat,
    // Memory: linear memory growth, code, decommit.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_memfd_create,
    // Threads (WASI's blocking pool, the deadline watchdog) and their synchronisation.
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_pipe2,
    // Time and randomness.
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    // Signals: Wasmtime turns traps into signals it handles itself.
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Talking on a socket the process already holds: what both outbound grants and serving
/// need.
const CONNECTED: &[i64] = &[
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
];

/// Outbound TCP through WASI sockets, for policies that grant destinations (`socket`
/// itself is allowed with arguments, below), besides [`CONNECTED`].
const NETWORK: &[i64] = &[libc::SYS_connect, libc::SYS_bind];

/// Serving a wasi:http component on sockets bound before the lock-down: listening and
/// accepting on them, besides [`CONNECTED`]; no new sockets but through [`NETWORK`] grants.
const SERVING: &[i64] = &[libc::SYS_listen, libc::SYS_accept, libc::SYS_accept4];

/// What the workload needs beyond computing and its files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    /// Outbound TCP to granted destinations.
    pub network: bool,
    /// Serving HTTP on already-bound sockets.
    pub serving: bool,
}

/// `fcntl` commands: descriptor and status flags, duplication, and the seals Wasmtime puts
/// on memory images. No locks, leases, signals-on-I/O, owners or pipe sizes.
const FCNTL_COMMANDS: &[libc::c_int] = &[
    libc::F_GETFD,
    libc::F_SETFD,
    libc::F_GETFL,
    libc::F_SETFL,
    libc::F_DUPFD_CLOEXEC,
    libc::F_ADD_SEALS,
    libc::F_GET_SEALS,
];

/// `ioctl` requests: "is this a terminal" and its size, non-blocking and close-on-exec
/// switches, bytes ready to read. Nothing that reaches a device or injects terminal input.
const IOCTL_REQUESTS: &[libc::c_ulong] = &[
    libc::TCGETS,
    libc::TIOCGWINSZ,
    libc::FIONBIO,
    libc::FIONREAD,
    libc::FIOCLEX,
    libc::FIONCLEX,
];

/// `prctl` options: thread names (the Rust runtime names its threads) and naming anonymous
/// memory (the C library may).
const PRCTL_OPTIONS: &[libc::c_int] = &[libc::PR_SET_NAME, libc::PR_GET_NAME, libc::PR_SET_VMA];

/// Builds the allow-list filter for a process whose pid is `pid`.
pub fn filter(needs: Needs, pid: libc::pid_t) -> Result<BpfProgram, SeccompError> {
    let error = |e: seccompiler::BackendError| SeccompError(e.to_string());
    let network = needs.network;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let granted: &[i64] = if network { NETWORK } else { &[] };
    let serving: &[i64] = if needs.serving { SERVING } else { &[] };
    let connected: &[i64] = if network || needs.serving {
        CONNECTED
    } else {
        &[]
    };
    for syscall in ALWAYS.iter().chain(granted).chain(serving).chain(connected) {
        rules.insert(*syscall, Vec::new());
    }
    // The arguments filtered on are C ints (or, for ioctl, an int-sized request): compare
    // the low 32 bits, which is all the kernel reads of them.
    let arg = |index: u8, op: SeccompCmpOp, value: u64| {
        SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value).map_err(error)
    };
    let rule = |conditions: Vec<SeccompCondition>| SeccompRule::new(conditions).map_err(error);
    let one_of = |index: u8, values: &mut dyn Iterator<Item = u64>| {
        values
            .map(|value| rule(vec![arg(index, SeccompCmpOp::Eq, value)?]))
            .collect::<Result<Vec<_>, _>>()
    };
    // New threads yes, new processes no: clone only with CLONE_THREAD; clone3 is absent.
    let thread = libc::CLONE_THREAD as u64;
    let thread_only = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(thread),
        thread,
    )
    .map_err(error)?;
    rules.insert(libc::SYS_clone, vec![rule(vec![thread_only])?]);
    // Signals to its own threads only (traps, abort): never to another process.
    rules.insert(
        libc::SYS_tgkill,
        vec![rule(vec![arg(0, SeccompCmpOp::Eq, pid as u64)?])?],
    );
    rules.insert(
        libc::SYS_fcntl,
        one_of(1, &mut FCNTL_COMMANDS.iter().map(|&c| c as u64))?,
    );
    rules.insert(
        libc::SYS_ioctl,
        one_of(1, &mut IOCTL_REQUESTS.iter().copied())?,
    );
    rules.insert(
        libc::SYS_prctl,
        one_of(0, &mut PRCTL_OPTIONS.iter().map(|&o| o as u64))?,
    );
    if network {
        // TCP over IPv4 or IPv6 (the type may carry SOCK_NONBLOCK and SOCK_CLOEXEC).
        let stream = libc::SOCK_STREAM as u64;
        let mut socket = Vec::new();
        for family in [libc::AF_INET, libc::AF_INET6] {
            for protocol in [0, libc::IPPROTO_TCP] {
                socket.push(rule(vec![
                    arg(0, SeccompCmpOp::Eq, family as u64)?,
                    arg(1, SeccompCmpOp::MaskedEq(0xf), stream)?,
                    arg(2, SeccompCmpOp::Eq, protocol as u64)?,
                ])?);
            }
        }
        rules.insert(libc::SYS_socket, socket);
    }
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(error)?;
    SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::ENOSYS as u32),
        SeccompAction::Allow,
        arch,
    )
    .map_err(error)?
    .try_into()
    .map_err(error)
}

/// System calls none of Bulwark's processes makes at any point in its life: refused by the
/// filter a process is born with (see [`birth_filter`]) before its binary runs a single
/// instruction, under the allow-list it installs later.
const NEVER: &[i64] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_fsopen,
    libc::SYS_fsmount,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_fsconfig,
    libc::SYS_fspick,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
    libc::SYS_acct,
    libc::SYS_quotactl,
];

/// The filter a process that handles guest bytes is born with, between its fork and its
/// exec: [`NEVER`] refused (EPERM), the rest allowed, so that its binary's own start-up
/// runs, and the allow-list it installs once it is up stacks on top. Built before the
/// fork: applying it there is one system call.
pub fn birth_filter() -> Result<BpfProgram, SeccompError> {
    let error = |e: &dyn std::fmt::Display| SeccompError(e.to_string());
    let rules = NEVER.iter().map(|&syscall| (syscall, Vec::new())).collect();
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| error(&e))?;
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| error(&e))?
    .try_into()
    .map_err(|e: seccompiler::BackendError| error(&e))
}

/// Installs the filter on every thread of the process.
pub fn install(needs: Needs) -> Result<(), SeccompError> {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    seccompiler::apply_filter_all_threads(&filter(needs, pid)?)
        .map_err(|e| SeccompError(e.to_string()))
}
