//! Applying a changed containerd configuration on a node. containerd reads its config only
//! when it starts, so the installer restarts it: through systemd where the node runs it (in
//! PID 1's namespaces, so a pod's installer reaches the node's own `systemctl`), or else by
//! stopping the containerd process that serves the edited file with SIGTERM and checking
//! that its supervisor (runit, s6, OpenRC's supervise-daemon, dockerd, ...) starts it again.
//! A containerd nothing would start again is never stopped.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::install::{ContainerdTarget, Distribution};

/// containerd's config when its command line names none.
const DEFAULT_CONFIG: &str = "/etc/containerd/config.toml";
/// How long containerd may take to stop on SIGTERM (it leaves its shims running).
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a supervisor may take to start containerd again.
const RESTART_TIMEOUT: Duration = Duration::from_secs(30);

/// How a change was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// `systemctl restart UNIT` succeeded.
    Systemd {
        /// The unit restarted.
        unit: &'static str,
    },
    /// containerd stopped on SIGTERM and its supervisor started it again.
    Signalled {
        /// The process stopped.
        stopped: u32,
        /// The process that serves the config now.
        started: u32,
    },
    /// No running containerd serves the file: it reads the change when it starts.
    NotRunning,
    /// The distribution applies changes to this file on its own (k0s's drop-ins).
    ByDistribution,
}

/// Why a change could not be applied; the files are changed either way.
#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    /// The installer runs in a pod that does not share the node's PID namespace.
    #[error(
        "cannot see the node's processes to restart containerd: run the installer pod with hostPID, or rerun with --no-restart"
    )]
    NotHostPid,
    /// One of PID 1's namespaces could not be opened.
    #[error("cannot open PID 1's {namespace} namespace: {source}")]
    Namespace {
        /// The namespace (`mnt`, `pid`, ...).
        namespace: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// `systemctl` could not be run.
    #[error("cannot run systemctl: {0}")]
    Spawn(std::io::Error),
    /// `systemctl restart` failed.
    #[error("systemctl restart {unit} failed ({status})")]
    Systemctl {
        /// The unit.
        unit: &'static str,
        /// How systemctl exited.
        status: std::process::ExitStatus,
    },
    /// A distribution's service needs a restart and there is no systemd to do it.
    #[error(
        "{unit} must be restarted to apply the change, and this node has no systemd to do it: restart it yourself, or rerun with --no-restart"
    )]
    NoSystemd {
        /// The service.
        unit: &'static str,
    },
    /// containerd's parent is the node's init, which would not start it again.
    #[error(
        "containerd (pid {pid}) serving {config} has no supervisor to start it again once stopped (its parent is PID 1, and PID 1 is not systemd): restart it yourself, or rerun with --no-restart"
    )]
    Unsupervised {
        /// containerd's pid.
        pid: u32,
        /// The config it serves.
        config: PathBuf,
    },
    /// More than one containerd serves the file.
    #[error(
        "containerd processes {pids:?} all serve {config}: restart the right one yourself, or rerun with --no-restart"
    )]
    Ambiguous {
        /// Their pids.
        pids: Vec<u32>,
        /// The config they serve.
        config: PathBuf,
    },
    /// SIGTERM could not be sent.
    #[error("cannot signal containerd (pid {pid}): {source}")]
    Signal {
        /// containerd's pid.
        pid: u32,
        /// Why.
        source: std::io::Error,
    },
    /// containerd outlived SIGTERM.
    #[error("containerd (pid {pid}) did not stop within {STOP_TIMEOUT:?} of SIGTERM")]
    DidNotStop {
        /// containerd's pid.
        pid: u32,
    },
    /// The supervisor did not bring containerd back.
    #[error(
        "containerd (pid {pid}) stopped to apply the change, and nothing started it again within {RESTART_TIMEOUT:?}: start containerd with {config} by hand"
    )]
    NotRestarted {
        /// The pid that stopped.
        pid: u32,
        /// The config it served.
        config: PathBuf,
    },
}

/// Applies a change to `target` on the node whose root is at `host_root` (`/`, or where a
/// privileged pod mounts it).
pub fn apply(host_root: &Path, target: &ContainerdTarget) -> Result<Applied, RestartError> {
    let Some(unit) = target.restart_unit else {
        return Ok(Applied::ByDistribution);
    };
    if !sees_node_processes(host_root) {
        return Err(RestartError::NotHostPid);
    }
    if host_root.join("run/systemd/system").is_dir() {
        systemctl_restart(host_root, unit)?;
        return Ok(Applied::Systemd { unit });
    }
    if target.distribution != Distribution::Containerd {
        // k3s, RKE2 and MicroK8s render containerd's config when their own service starts.
        return Err(RestartError::NoSystemd { unit });
    }
    signal_restart(&target.file)
}

/// Whether `/proc` shows the node's processes: true on the node itself, and in a pod
/// sharing the node's PID namespace, where PID 1's root is the node's root mounted at
/// `host_root`.
fn sees_node_processes(host_root: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if host_root == Path::new("/") {
        return true;
    }
    match (
        std::fs::metadata("/proc/1/root/"),
        std::fs::metadata(host_root),
    ) {
        (Ok(init_root), Ok(node_root)) => {
            (init_root.dev(), init_root.ino()) == (node_root.dev(), node_root.ino())
        }
        _ => false,
    }
}

/// `systemctl restart UNIT`, run in PID 1's namespaces when the node's root is mounted
/// elsewhere (a pod): the node's systemctl talks to the node's systemd.
fn systemctl_restart(host_root: &Path, unit: &'static str) -> Result<(), RestartError> {
    let mut command = std::process::Command::new("systemctl");
    command.args(["restart", unit]);
    let namespaces: Vec<std::fs::File> = if host_root != Path::new("/") {
        ["mnt", "uts", "ipc", "net", "pid"]
            .into_iter()
            .map(|namespace| {
                std::fs::File::open(format!("/proc/1/ns/{namespace}"))
                    .map_err(|source| RestartError::Namespace { namespace, source })
            })
            .collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    let fds: Vec<i32> = namespaces.iter().map(AsRawFd::as_raw_fd).collect();
    // SAFETY: only setns(2) runs between fork and exec, on descriptors opened before.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
            for fd in &fds {
                if libc::setns(*fd, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let status = command.status().map_err(RestartError::Spawn)?;
    drop(namespaces);
    if !status.success() {
        return Err(RestartError::Systemctl { unit, status });
    }
    Ok(())
}

/// Stops the one containerd serving `config` and waits for its supervisor to start a new
/// one.
fn signal_restart(config: &Path) -> Result<Applied, RestartError> {
    let serving = containerd_serving(config);
    let old = match serving.as_slice() {
        [] => return Ok(Applied::NotRunning),
        [one] => *one,
        many => {
            return Err(RestartError::Ambiguous {
                pids: many.iter().map(|p| p.pid).collect(),
                config: config.to_owned(),
            });
        }
    };
    if old.pid == 1 || old.parent == 1 {
        return Err(RestartError::Unsupervised {
            pid: old.pid,
            config: config.to_owned(),
        });
    }
    // SAFETY: kill(2) on a pid just read from /proc, checked by start time below.
    if unsafe { libc::kill(old.pid as i32, libc::SIGTERM) } != 0 {
        return Err(RestartError::Signal {
            pid: old.pid,
            source: std::io::Error::last_os_error(),
        });
    }
    let stopping = Instant::now();
    while ProcessInfo::read(old.pid).is_some_and(|now| now.start_time == old.start_time) {
        if stopping.elapsed() > STOP_TIMEOUT {
            return Err(RestartError::DidNotStop { pid: old.pid });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let restarting = Instant::now();
    loop {
        if let Some(new) = containerd_serving(config).first() {
            return Ok(Applied::Signalled {
                stopped: old.pid,
                started: new.pid,
            });
        }
        if restarting.elapsed() > RESTART_TIMEOUT {
            return Err(RestartError::NotRestarted {
                pid: old.pid,
                config: config.to_owned(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A process as `/proc/PID/stat` describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcessInfo {
    pid: u32,
    parent: u32,
    /// Clock ticks after boot: tells a process from a later one with the same pid.
    start_time: u64,
}

impl ProcessInfo {
    fn read(pid: u32) -> Option<ProcessInfo> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may hold spaces and parentheses: fields follow the last ')'.
        let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
        // After the name: state (3), ppid (4), ... starttime (22).
        Some(ProcessInfo {
            pid,
            parent: fields.get(1)?.parse().ok()?,
            start_time: fields.get(19)?.parse().ok()?,
        })
    }
}

/// The containerd daemons whose config is `config` (a path on the node), by their command
/// lines.
fn containerd_serving(config: &Path) -> Vec<ProcessInfo> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|arg| !arg.is_empty())
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect();
        let Some(served) = daemon_config(&args) else {
            continue;
        };
        let served = if served.is_relative() {
            match std::fs::read_link(format!("/proc/{pid}/cwd")) {
                Ok(cwd) => cwd.join(served),
                Err(_) => continue,
            }
        } else {
            served
        };
        if served.components().eq(config.components())
            && let Some(info) = ProcessInfo::read(pid)
        {
            found.push(info);
        }
    }
    found
}

/// The config file a containerd command line serves, when it is the daemon (not a
/// subcommand such as `containerd config dump`). containerd's flags follow Go's urfave/cli:
/// one or two dashes, the value after `=` or as the next argument.
fn daemon_config(args: &[String]) -> Option<PathBuf> {
    let (program, rest) = args.split_first()?;
    if Path::new(program).file_name()? != "containerd" {
        return None;
    }
    let mut config = None;
    let mut rest = rest.iter();
    while let Some(arg) = rest.next() {
        let Some(flag) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            // A subcommand: not the daemon.
            return None;
        };
        let (name, inline) = match flag.split_once('=') {
            Some((name, value)) => (name, Some(value.to_owned())),
            None => (flag, None),
        };
        if matches!(name, "help" | "h" | "version" | "v") {
            return None;
        }
        // Every other global flag of containerd takes a value.
        let value = match inline {
            Some(value) => value,
            None => rest.next()?.clone(),
        };
        if matches!(name, "config" | "c") {
            config = Some(PathBuf::from(value));
        }
    }
    Some(config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_of(line: &str) -> Option<PathBuf> {
        let args: Vec<String> = line.split(' ').map(str::to_owned).collect();
        daemon_config(&args)
    }

    #[test]
    fn the_daemon_s_config_is_read_from_its_command_line() {
        let default = Some(PathBuf::from(DEFAULT_CONFIG));
        assert_eq!(config_of("/usr/bin/containerd"), default);
        assert_eq!(
            config_of("containerd --log-level debug --config /etc/c.toml"),
            Some(PathBuf::from("/etc/c.toml"))
        );
        assert_eq!(
            config_of("containerd -c=/a.toml --address /run/x.sock"),
            Some(PathBuf::from("/a.toml"))
        );
        assert_eq!(
            config_of("/var/lib/rancher/k3s/data/x/bin/containerd -c rel.toml"),
            Some(PathBuf::from("rel.toml"))
        );
        // Not the daemon.
        assert_eq!(config_of("containerd config dump"), None);
        assert_eq!(config_of("containerd --config /a.toml config dump"), None);
        assert_eq!(config_of("containerd --version"), None);
        assert_eq!(config_of("containerd-shim-runc-v2 -namespace k8s.io"), None);
        assert_eq!(config_of("/usr/bin/dockerd --containerd /run/c.sock"), None);
    }

    #[test]
    fn this_process_reads_its_own_stat() {
        let me = ProcessInfo::read(std::process::id()).unwrap();
        assert_eq!(me.parent, std::os::unix::process::parent_id());
        assert!(me.start_time > 0);
    }

    #[test]
    fn a_config_nothing_serves_needs_no_restart() {
        let config = Path::new("/nonexistent/bulwark/config.toml");
        assert_eq!(signal_restart(config).unwrap(), Applied::NotRunning);
    }

    #[test]
    fn distributions_applying_changes_themselves_are_left_alone() {
        let target = ContainerdTarget {
            restart_unit: None,
            ..ContainerdTarget::config(Path::new("/etc/k0s/containerd.d/bulwark.toml"))
        };
        assert_eq!(
            apply(Path::new("/"), &target).unwrap(),
            Applied::ByDistribution
        );
    }
}
