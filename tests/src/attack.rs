//! Hostile clients against a serving pod, and what normal clients see meanwhile: the
//! scenario of the serving CRI test and of `make bench`, so both measure the same thing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::http::get;

/// Normal clients' figures: requests answered, per second, and latency.
#[derive(Debug, Clone, Copy)]
pub struct NormalClients {
    /// Requests answered 200.
    pub answered: usize,
    /// Requests that failed or got another status.
    pub failed: usize,
    /// Answered requests per second.
    pub per_second: f64,
    /// The 99th percentile of the answered requests' latency.
    pub p99: Duration,
}

impl std::fmt::Display for NormalClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} answered ({:.0}/s), {} failed, p99 {:.1} ms",
            self.answered,
            self.per_second,
            self.failed,
            self.p99.as_secs_f64() * 1000.0
        )
    }
}

/// `GET /` from one normal client, one after another, for `length`, each within `timeout`.
pub fn normal_clients(address: SocketAddr, length: Duration, timeout: Duration) -> NormalClients {
    let started = Instant::now();
    let mut latencies = Vec::new();
    let mut failed = 0;
    while started.elapsed() < length {
        let sent = Instant::now();
        match get(address, "/", timeout) {
            Ok(response) if response.status == 200 => latencies.push(sent.elapsed()),
            _ => failed += 1,
        }
    }
    latencies.sort();
    let p99 = latencies
        .get((latencies.len() * 99 / 100).min(latencies.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default();
    NormalClients {
        answered: latencies.len(),
        failed,
        per_second: latencies.len() as f64 / started.elapsed().as_secs_f64(),
        p99,
    }
}

/// What an attack on a serving pod did to its normal clients.
#[derive(Debug, Clone, Copy)]
pub struct AttackFigures {
    /// Before any attack.
    pub quiet: NormalClients,
    /// While [`SLOW_CONNECTIONS`] slowloris connections are open.
    pub slowloris: NormalClients,
    /// Slowloris connections the server closed within a minute of the attack's start.
    pub slow_closed: usize,
    /// While [`STUCK_CLIENTS`] clients hold big responses they never read.
    pub stuck: NormalClients,
    /// Right after, once the stuck clients' deadlines passed.
    pub after_stuck: NormalClients,
}

/// Slowloris connections opened.
pub const SLOW_CONNECTIONS: usize = 300;
/// Clients that ask for a big body and never read it.
pub const STUCK_CLIENTS: usize = 6;

/// Runs the attack on the service at `address`, whose `GET /big/8` answers 8 MiB: first
/// [`SLOW_CONNECTIONS`] connections that start a request head and never end it, then
/// [`STUCK_CLIENTS`] clients that ask for 8 MiB and never read; `stuck_for` is how long they
/// are watched (past the service's deadline).
pub fn attack(address: SocketAddr, stuck_for: Duration) -> Result<AttackFigures> {
    let request = Duration::from_secs(20);
    let quiet = normal_clients(address, Duration::from_secs(3), request);

    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..SLOW_CONNECTIONS {
        let mut stream = TcpStream::connect_timeout(&address, request)?;
        // A connection the server already closed fails here: that is a closing too.
        let _ = stream.write_all(b"GET / HTTP/1.1\r\nHost: attacked\r\nX-Slow: ");
        slow.push(stream);
    }
    let slowloris = normal_clients(address, Duration::from_secs(10), request);
    let mut slow_closed = 0;
    for stream in &mut slow {
        let left = Duration::from_secs(60).saturating_sub(started.elapsed());
        stream.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        let mut buffer = [0u8; 1024];
        if matches!(stream.read(&mut buffer), Ok(0) | Err(_))
            && started.elapsed() < Duration::from_secs(60)
        {
            slow_closed += 1;
        }
    }
    drop(slow);

    let mut stuck = Vec::new();
    for _ in 0..STUCK_CLIENTS {
        let mut stream = TcpStream::connect_timeout(&address, request)?;
        stream.write_all(b"GET /big/8 HTTP/1.1\r\nHost: attacked\r\n\r\n")?;
        stuck.push(stream);
    }
    let during = normal_clients(address, stuck_for, request);
    let after_stuck = normal_clients(address, Duration::from_secs(2), Duration::from_secs(3));
    drop(stuck);
    Ok(AttackFigures {
        quiet,
        slowloris,
        slow_closed,
        stuck: during,
        after_stuck,
    })
}

impl std::fmt::Display for AttackFigures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "| normal clients (one after another) | figures |")?;
        writeln!(f, "|---|---|")?;
        writeln!(f, "| no attack | {} |", self.quiet)?;
        writeln!(
            f,
            "| {SLOW_CONNECTIONS} slowloris connections open | {} ({}/{SLOW_CONNECTIONS} closed by the server within 60 s) |",
            self.slowloris, self.slow_closed
        )?;
        writeln!(
            f,
            "| {STUCK_CLIENTS} clients not reading 8 MiB bodies | {} |",
            self.stuck
        )?;
        write!(f, "| after their deadline | {} |", self.after_stuck)
    }
}
