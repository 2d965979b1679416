//! Processes the harness starts, and the few `/proc` look-ups its clean-up needs.
//!
//! Servers are stopped by their own PID, never by name: SIGTERM, a grace period, then SIGKILL.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use anyhow::{Context, Result, ensure};

/// A server process started by the harness, with its output going to a log file.
///
/// It is not stopped on drop by itself: its owner decides when (see [`ServerProcess::stop`]),
/// so that the order of shutdown steps stays explicit.
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    name: String,
}

impl ServerProcess {
    /// Spawns `command` with stdin closed and stdout and stderr appended to `log`.
    ///
    /// `name` is only used in messages.
    pub fn spawn(name: &str, command: &mut Command, log: &Path) -> Result<Self> {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let err = out.try_clone()?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {name} ({command:?})"))?;
        Ok(Self {
            child,
            name: name.to_string(),
        })
    }

    /// The process's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` once the process has exited (it is then reaped), `None` while it runs.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("cannot check on {}", self.name))
    }

    /// Stops the process: SIGTERM, up to `grace` to exit, then SIGKILL. Returns its exit
    /// status; a process that had already exited is just reaped.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.exited()? {
            return Ok(status);
        }
        signal(self.pid(), libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.exited()? {
                return Ok(status);
            }
            sleep(Duration::from_millis(20));
        }
        log::warn!(
            "{} (pid {}) ignored SIGTERM for {grace:?}: killing it",
            self.name,
            self.pid()
        );
        signal(self.pid(), libc::SIGKILL);
        self.child
            .wait()
            .with_context(|| format!("cannot reap {}", self.name))
    }
}

/// Sends `sig` to the process `pid`; a process that is already gone is not an error.
pub fn signal(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Whether a process `pid` exists and has not exited (a zombie counts as exited).
pub fn is_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(stat_fields(&stat).first(), Some(&"Z" | &"X")),
        Err(_) => false,
    }
}

/// The PIDs of all processes whose command line has `arg` as one of its arguments, exactly.
///
/// The harness uses it with paths unique to one test (a containerd's socket), which identify
/// the processes that containerd started, such as its shims.
pub fn pids_with_argument(arg: &str) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|pid| arguments(*pid).iter().any(|a| a == arg))
        .collect()
}

/// The command line of `pid`, an argument a string (empty if it is gone).
pub fn arguments(pid: u32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmdline| {
            cmdline
                .split(|b| *b == 0)
                .filter(|arg| !arg.is_empty())
                .map(|arg| String::from_utf8_lossy(arg).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// One thread of a process, as `/proc` shows it: what a hung process waits on.
#[derive(Debug, Clone)]
pub struct Thread {
    /// Its thread id.
    pub tid: u32,
    /// Its name.
    pub comm: String,
    /// Its state letter (`R`, `S`, `D`, ...).
    pub state: String,
    /// The kernel function it sleeps in.
    pub wchan: String,
}

/// The threads of `pid` (none if it is gone).
pub fn threads(pid: u32) -> Vec<Thread> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let path = task.path();
            let read = |name: &str| fs::read_to_string(path.join(name)).unwrap_or_default();
            let stat = read("stat");
            Some(Thread {
                tid: task.file_name().to_str()?.parse().ok()?,
                comm: read("comm").trim().to_owned(),
                state: stat_fields(&stat).first().copied().unwrap_or("").to_owned(),
                wchan: read("wchan").trim().to_owned(),
            })
        })
        .collect()
}

/// The PIDs of all descendants of `pid` (children, their children, ...), parents first.
pub fn descendants(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = all_pids()
        .into_iter()
        .filter_map(|p| {
            let stat = fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let ppid = stat_fields(&stat).get(1)?.parse().ok()?;
            Some((p, ppid))
        })
        .collect();
    let mut found = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for &(p, pp) in &parents {
            if pp == parent && !found.contains(&p) {
                found.push(p);
                frontier.push(p);
            }
        }
    }
    found
}

/// SIGKILLs `pid` and all its descendants, then waits up to `timeout` for them to be gone.
/// Returns the PIDs that were still alive at the end.
pub fn kill_tree(pid: u32, timeout: Duration) -> Vec<u32> {
    let mut pids = vec![pid];
    pids.extend(descendants(pid));
    for &p in &pids {
        signal(p, libc::SIGKILL);
    }
    let deadline = Instant::now() + timeout;
    loop {
        let alive: Vec<u32> = pids.iter().copied().filter(|p| is_alive(*p)).collect();
        if alive.is_empty() || Instant::now() >= deadline {
            return alive;
        }
        sleep(Duration::from_millis(20));
    }
}

fn all_pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The fields of `/proc/PID/stat` after the command name: state, ppid, ...
fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default()
}

/// The memory figures of one process, from `/proc/PID/smaps_rollup` (KiB), and its
/// thread count.
#[derive(Debug, Default, Clone, Copy)]
pub struct Memory {
    /// Resident set size.
    pub rss: u64,
    /// Proportional set size: shared pages divided among their sharers.
    pub pss: u64,
    /// PSS of anonymous memory (heap, stacks).
    pub pss_anon: u64,
    /// PSS of file-backed memory (the binary, libraries).
    pub pss_file: u64,
    /// Pages only this process maps.
    pub private: u64,
    /// Threads.
    pub threads: u64,
}

impl std::ops::AddAssign for Memory {
    fn add_assign(&mut self, other: Memory) {
        self.rss += other.rss;
        self.pss += other.pss;
        self.pss_anon += other.pss_anon;
        self.pss_file += other.pss_file;
        self.private += other.private;
        self.threads += other.threads;
    }
}

/// The memory figures of process `pid`.
pub fn memory(pid: u32) -> Result<Memory> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let mut fields = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let (Some(key), Some(value)) = (words.next(), words.next())
            && let Some(key) = key.strip_suffix(':')
            && let Ok(value) = value.parse::<u64>()
        {
            fields.insert(key.to_owned(), value);
        }
    }
    let field = |name: &str| fields.get(name).copied().unwrap_or(0);
    ensure!(fields.contains_key("Pss"), "{path} has no Pss: {text}");
    let threads = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0);
    Ok(Memory {
        rss: field("Rss"),
        pss: field("Pss"),
        pss_anon: field("Pss_Anon"),
        pss_file: field("Pss_File"),
        private: field("Private_Clean") + field("Private_Dirty"),
        threads,
    })
}
