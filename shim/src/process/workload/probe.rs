//! The lock-down probe (see [`super::LOCKDOWN_PROBE_ENV`]).

use std::fs::File;
use std::path::Path;

/// Tries what [`super::LOCKDOWN_PROBE_ENV`] lists and reports each attempt on stderr.
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
            "socketpair" => {
                let mut pair = [0; 2];
                check(
                    libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, pair.as_mut_ptr()) as i64,
                )
                .map(|_| {
                    libc::close(pair[0]);
                    libc::close(pair[1]);
                })
            }
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
