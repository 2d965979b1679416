//! The shim's reading of a container's egress filter: every denial the kernel reports goes
//! to the container's log (`kubectl logs` shows what a guest tried), once per destination
//! and never as a flood.

use std::collections::HashSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use super::CountsFile;
use super::bpf::{Denial, EgressFilter, Transport};

/// How often the ring buffer is read: it holds ~1,600 reports, so a storm between two reads
/// is counted (`dropped`), not lost from the counters.
const READ_EVERY: Duration = Duration::from_millis(200);

/// Denial lines one container may write per [`LOG_WINDOW`]; more are counted and summed
/// up in one line.
const LOG_LINES_PER_WINDOW: u32 = 10;
const LOG_WINDOW: Duration = Duration::from_secs(10);

/// A container's egress filter, read by a thread of the shim's for as long as the
/// container lives. Dropping it stops the thread (its channel closes; the filter stays
/// attached to the cgroup and goes with it).
#[derive(Debug)]
pub struct EgressWatch {
    _stop: mpsc::Sender<()>,
}

impl EgressWatch {
    /// Reads `filter` until dropped, writing denials to `log` (the container's stderr FIFO)
    /// and the counts to `published` (a serving workload's `/metrics` reads them there).
    pub fn start(
        filter: EgressFilter,
        log: Option<PathBuf>,
        published: Option<CountsFile>,
    ) -> EgressWatch {
        let (stop, stopped) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("egress-watch".into())
            .spawn(move || watch(filter, log, published, &stopped));
        if let Err(error) = spawned {
            log::warn!(
                "cannot start the egress watch (denials are still refused, not logged): {error}"
            );
        }
        EgressWatch { _stop: stop }
    }
}

fn watch(
    mut filter: EgressFilter,
    log: Option<PathBuf>,
    published: Option<CountsFile>,
    stopped: &mpsc::Receiver<()>,
) {
    let mut limiter = LogLimiter::new(Instant::now());
    loop {
        let stop = !matches!(
            stopped.recv_timeout(READ_EVERY),
            Err(RecvTimeoutError::Timeout)
        );
        let lines = limiter.lines(filter.next_denials(), Instant::now());
        if let Some(log) = &log
            && !lines.is_empty()
        {
            write_log(log, &lines);
        }
        if let Some(published) = &published
            && let Err(error) = published.write(filter.counts())
        {
            log::warn!("cannot publish the egress counts: {error}");
        }
        if stop {
            return;
        }
    }
}

/// Writes `lines` to the container's log. The FIFO is opened for each batch, never held:
/// containerd ends a container's log (and reports its exit) only once every writer of it
/// is gone. Without a reader, or with the pipe full, the lines are dropped, not waited on.
fn write_log(fifo: &Path, lines: &[String]) {
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut log) = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifo)
    else {
        return;
    };
    let text: String = lines
        .iter()
        .map(|line| format!("bulwark: {line}\n"))
        .collect();
    let _ = log.write_all(text.as_bytes());
}

/// What of a stream of denials reaches the log: each destination once, at most
/// [`LOG_LINES_PER_WINDOW`] lines per [`LOG_WINDOW`], and what was held back summed up.
struct LogLimiter {
    logged: HashSet<(SocketAddr, TransportKey)>,
    window_start: Instant,
    lines_in_window: u32,
    held_back: u64,
}

#[derive(Hash, PartialEq, Eq)]
enum TransportKey {
    Stream,
    Datagram,
    Other(u32),
}

impl From<Transport> for TransportKey {
    fn from(transport: Transport) -> Self {
        match transport {
            Transport::Stream => TransportKey::Stream,
            Transport::Datagram => TransportKey::Datagram,
            Transport::Other(kind) => TransportKey::Other(kind),
        }
    }
}

/// The most destinations remembered as logged: a guest that tries every address does not
/// grow the shim without bound.
const REMEMBERED: usize = 4096;

impl LogLimiter {
    fn new(now: Instant) -> LogLimiter {
        LogLimiter {
            logged: HashSet::new(),
            window_start: now,
            lines_in_window: 0,
            held_back: 0,
        }
    }

    fn lines(&mut self, denials: Vec<Denial>, now: Instant) -> Vec<String> {
        let mut lines = Vec::new();
        if now.duration_since(self.window_start) >= LOG_WINDOW {
            if self.held_back > 0 {
                lines.push(format!(
                    "egress: {} more denied attempts were not logged (each destination is logged once, at most {LOG_LINES_PER_WINDOW} lines per {}s)",
                    self.held_back,
                    LOG_WINDOW.as_secs()
                ));
                self.held_back = 0;
            }
            self.window_start = now;
            self.lines_in_window = 0;
        }
        for denial in denials {
            let key = (denial.destination, TransportKey::from(denial.transport));
            if self.logged.contains(&key) {
                continue;
            }
            if self.lines_in_window >= LOG_LINES_PER_WINDOW {
                self.held_back += 1;
                continue;
            }
            if self.logged.len() < REMEMBERED {
                self.logged.insert(key);
            }
            self.lines_in_window += 1;
            lines.push(describe(&denial));
        }
        lines
    }
}

fn describe(denial: &Denial) -> String {
    let what = match denial.transport {
        Transport::Stream => "tcp connect to".to_owned(),
        Transport::Datagram => "udp to".to_owned(),
        Transport::Other(kind) => format!("socket type {kind} to"),
    };
    format!(
        "egress denied by the kernel: {what} {} (pid {}): not among the grants of bulwark.dev/network; later attempts to it are counted, not logged",
        denial.destination, denial.pid
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denial(destination: &str, transport: Transport) -> Denial {
        Denial {
            destination: destination.parse().unwrap(),
            transport,
            pid: 7,
        }
    }

    #[test]
    fn each_destination_is_logged_once_and_a_storm_is_summed_up() {
        let start = Instant::now();
        let mut limiter = LogLimiter::new(start);
        let lines = limiter.lines(
            vec![
                denial("169.254.169.254:80", Transport::Stream),
                denial("169.254.169.254:80", Transport::Stream),
                denial("10.0.0.1:53", Transport::Datagram),
            ],
            start,
        );
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].contains("tcp connect to 169.254.169.254:80"));
        assert!(lines[1].contains("udp to 10.0.0.1:53"));

        let storm: Vec<Denial> = (1..=100)
            .map(|port| denial(&format!("10.0.0.2:{port}"), Transport::Stream))
            .collect();
        let lines = limiter.lines(storm, start);
        assert_eq!(lines.len(), 8, "10 lines a window, 2 used");
        let lines = limiter.lines(Vec::new(), start + LOG_WINDOW);
        assert_eq!(lines.len(), 1);
        assert!(lines[0].contains("92 more denied attempts"), "{lines:?}");
    }
}
