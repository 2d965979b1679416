//! The holder's side, the whole of the `bulwark-holder` binary: enter the pod's
//! namespaces, set its hostname and sysctls, give up everything, report, then wait until
//! stopped. It uses nothing but the C library, so the binary stays tiny: one runs per pod.

use std::ffi::{CString, OsString};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;

use super::{HOSTNAME_ARG, JOIN_ARG, STATUS_FD, SYSCTL_ARG, USER_ARG};

/// What the shim asks of the holder, from its arguments.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Setup {
    /// Namespaces to join: the `setns` flag and the path.
    pub joins: Vec<(libc::c_int, OsString)>,
    /// The pod's hostname, when the pod has a UTS namespace of its own.
    pub hostname: Option<String>,
    /// Namespaced sysctls to set.
    pub sysctls: Vec<(String, String)>,
    /// Who the holder runs as once set up.
    pub uid: libc::uid_t,
    /// Its group.
    pub gid: libc::gid_t,
}

impl Setup {
    /// Parses the holder's arguments (after the program name).
    pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Setup, String> {
        let mut setup = Setup::default();
        let mut args = args.into_iter();
        while let Some(flag) = args.next() {
            let value = args
                .next()
                .ok_or_else(|| format!("{} needs a value", flag.to_string_lossy()))?;
            let text = || value.to_string_lossy().into_owned();
            match flag.to_str() {
                Some(HOSTNAME_ARG) => setup.hostname = Some(text()),
                Some(SYSCTL_ARG) => {
                    let (key, value) = text()
                        .split_once('=')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .ok_or_else(|| format!("{SYSCTL_ARG} {}: expected KEY=VALUE", text()))?;
                    setup.sysctls.push((key, value));
                }
                Some(JOIN_ARG) => {
                    let bytes = value.as_bytes();
                    let split = bytes.iter().position(|&b| b == b'=');
                    let (kind, path) = match split {
                        Some(at) => (&bytes[..at], &bytes[at + 1..]),
                        None => return Err(format!("{JOIN_ARG} {}: expected KIND=PATH", text())),
                    };
                    let flag = match kind {
                        b"net" => libc::CLONE_NEWNET,
                        b"ipc" => libc::CLONE_NEWIPC,
                        b"uts" => libc::CLONE_NEWUTS,
                        _ => return Err(format!("{JOIN_ARG} {}: net, ipc or uts", text())),
                    };
                    setup
                        .joins
                        .push((flag, std::ffi::OsStr::from_bytes(path).to_owned()));
                }
                Some(USER_ARG) => {
                    let parsed = text()
                        .split_once(':')
                        .and_then(|(uid, gid)| Some((uid.parse().ok()?, gid.parse().ok()?)));
                    (setup.uid, setup.gid) =
                        parsed.ok_or_else(|| format!("{USER_ARG} {}: expected UID:GID", text()))?;
                }
                _ => return Err(format!("unknown argument {}", flag.to_string_lossy())),
            }
        }
        Ok(setup)
    }
}

/// The holder's main: set the pod up, report, then wait until stopped.
pub fn main(args: impl IntoIterator<Item = OsString>) -> i32 {
    // SAFETY: the shim set this descriptor up for this process alone.
    let mut status = unsafe { File::from_raw_fd(STATUS_FD) };
    // SAFETY: getppid has no preconditions; the shim is our parent until it dies.
    let shim = unsafe { libc::getppid() };
    let set_up = Setup::parse(args)
        .and_then(|setup| enter_pod(&setup).map(|()| setup))
        .and_then(|setup| give_up_everything(&setup, shim));
    if let Err(error) = set_up {
        let _ = writeln!(status, "{error}");
        return 1;
    }
    // A shim that died before we set the parent-death signal closed the other end: EPIPE.
    if status.write_all(b"ok\n").is_err() {
        return 1;
    }
    drop(status);
    wait_until_stopped()
}

fn os_error(what: impl std::fmt::Display) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn enter_pod(setup: &Setup) -> Result<(), String> {
    for (flag, path) in &setup.joins {
        let namespace = File::open(path).map_err(|error| {
            format!(
                "cannot open the pod's namespace {}: {error}",
                path.to_string_lossy()
            )
        })?;
        // SAFETY: setns on a descriptor we own (for this thread, the only one).
        if unsafe { libc::setns(namespace.as_raw_fd(), *flag) } != 0 {
            return Err(os_error(format!(
                "cannot join the pod's namespace {}",
                path.to_string_lossy()
            )));
        }
    }
    if let Some(hostname) = &setup.hostname {
        // SAFETY: sethostname with a buffer and its length.
        if unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) } != 0 {
            return Err(os_error(format!("cannot set the hostname {hostname:?}")));
        }
    }
    for (key, value) in &setup.sysctls {
        if key.contains('/') || key.split('.').any(|part| part.is_empty() || part == "..") {
            return Err(format!("sysctl {key:?} is not a sysctl name"));
        }
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        std::fs::write(&path, value)
            .map_err(|error| format!("cannot set sysctl {key}={value}: {error}"))?;
    }
    Ok(())
}

/// Once the pod is set up the holder needs nothing: no privilege, no capability, and no
/// system call but those that wait for signals and reap children.
fn give_up_everything(setup: &Setup, shim: libc::pid_t) -> Result<(), String> {
    // SAFETY: plain system calls with integer arguments or buffers we own.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(os_error("cannot set no_new_privs"));
        }
        for capability in 0..=63 {
            // Past the last capability the kernel knows, EINVAL: nothing more to drop.
            if libc::prctl(libc::PR_CAPBSET_DROP, capability, 0, 0, 0) != 0 {
                break;
            }
        }
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(os_error("cannot clear the supplementary groups"));
        }
        if libc::setgid(setup.gid) != 0 {
            return Err(os_error(format!("cannot set gid {}", setup.gid)));
        }
        if libc::setuid(setup.uid) != 0 {
            return Err(os_error(format!("cannot set uid {}", setup.uid)));
        }
        // A change of user clears the parent-death signal; and what the kernel leaves of
        // the capability sets after it (all of them, for uid 0) goes now.
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            return Err(os_error("cannot tie the holder to its shim"));
        }
        if libc::getppid() != shim {
            return Err("the shim is gone".into());
        }
        let header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let none = [CapData::default(); 2];
        if libc::syscall(libc::SYS_capset, &header, none.as_ptr()) != 0 {
            return Err(os_error("cannot clear the capability sets"));
        }
        if libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        ) != 0
        {
            return Err(os_error("cannot clear the ambient capabilities"));
        }
        install_seccomp()
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// The system calls the holder makes from here on: waiting for signals and reaping.
const ALLOWED: [libc::c_long; 9] = [
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_restart_syscall,
    libc::SYS_write,
    libc::SYS_close,
];

/// A classic-BPF seccomp filter allowing [`ALLOWED`] on x86-64 and failing anything else
/// with ENOSYS: written out here, so the holder needs no library for it.
unsafe fn install_seccomp() -> Result<(), String> {
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const ARCH_OFFSET: u32 = 4;
    const NR_OFFSET: u32 = 0;
    let statement = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    let load = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    let jump_eq = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    let ret = (libc::BPF_RET | libc::BPF_K) as u16;
    let mut program = vec![
        statement(load, 0, 0, ARCH_OFFSET),
        statement(jump_eq, 1, 0, AUDIT_ARCH_X86_64),
        statement(ret, 0, 0, libc::SECCOMP_RET_KILL_PROCESS),
        statement(load, 0, 0, NR_OFFSET),
    ];
    let count = ALLOWED.len();
    for (index, syscall) in ALLOWED.iter().enumerate() {
        // Past the remaining comparisons and the refusal, to the allow.
        let to_allow = (count - index) as u8;
        program.push(statement(jump_eq, to_allow, 0, *syscall as u32));
    }
    program.push(statement(
        ret,
        0,
        0,
        libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
    ));
    program.push(statement(ret, 0, 0, libc::SECCOMP_RET_ALLOW));
    let filter = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: a filter program that lives until the call returns (the kernel copies it).
    if unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &filter as *const libc::sock_fprog,
            0,
            0,
        )
    } != 0
    {
        return Err(os_error("cannot install the seccomp filter"));
    }
    Ok(())
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

/// The arguments that ask a holder for `setup` (the shim's side of [`Setup::parse`]).
pub fn arguments(setup: &Setup) -> Vec<CString> {
    let mut args = Vec::new();
    let mut push = |flag: &str, value: &[u8]| {
        args.push(CString::new(flag).expect("flags hold no NUL"));
        // A NUL byte would cut the value short: such a value is refused before this.
        args.push(CString::new(value).unwrap_or_default());
    };
    push(USER_ARG, format!("{}:{}", setup.uid, setup.gid).as_bytes());
    if let Some(hostname) = &setup.hostname {
        push(HOSTNAME_ARG, hostname.as_bytes());
    }
    for (key, value) in &setup.sysctls {
        push(SYSCTL_ARG, format!("{key}={value}").as_bytes());
    }
    for (flag, path) in &setup.joins {
        let kind = match *flag {
            libc::CLONE_NEWNET => "net",
            libc::CLONE_NEWIPC => "ipc",
            _ => "uts",
        };
        let mut value = format!("{kind}=").into_bytes();
        value.extend_from_slice(path.as_bytes());
        push(JOIN_ARG, &value);
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_parse_back_into_the_setup() {
        let setup = Setup {
            joins: vec![
                (libc::CLONE_NEWNET, "/var/run/netns/cni-1".into()),
                (libc::CLONE_NEWIPC, "/proc/7/ns/ipc".into()),
            ],
            hostname: Some("web-0".into()),
            sysctls: vec![("net.ipv4.ip_unprivileged_port_start".into(), "0".into())],
            uid: 65535,
            gid: 65535,
        };
        let args = arguments(&setup)
            .into_iter()
            .map(|arg| OsString::from(arg.to_str().unwrap()));
        assert_eq!(Setup::parse(args).unwrap(), setup);
        let bad = ["--join", "pid=/proc/1/ns/pid"].map(OsString::from);
        assert!(Setup::parse(bad).unwrap_err().contains("net, ipc or uts"));
    }
}
