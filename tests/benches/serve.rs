//! Serving benchmark: `bulwark serve` on loopback under load from `wrk`, side by side in one
//! run, without limits and with a deadline and a memory limit per request, and `wasmtime
//! serve` (the peer, same Wasmtime version, no limits) where `make bench` built it into
//! `build/wasmtime/`. Requests/s and p50/p99 at 1, 50 and 200 connections, the ratio of each
//! to the first configuration, and per-request instantiation time from Bulwark's own
//! histogram. `BULWARK_BENCH_SECONDS` sets each load's length (default 10).

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use bulwark_tests::harness::node::bulwark_binary;
use bulwark_tests::http::{get, wait_listening};

const CONNECTIONS: [u32; 3] = [1, 50, 200];

/// One server under test: `PROGRAM serve FLAGS`.
struct Config {
    name: &'static str,
    program: PathBuf,
    flags: Vec<&'static str>,
    /// Bulwark (its flags and metrics), or the peer.
    bulwark: bool,
}

/// A server process, stopped by its PID when dropped.
struct Running {
    child: Child,
    address: SocketAddr,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What wrk measured.
struct Load {
    requests_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

fn free_address() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn start(config: &Config, metrics: Option<SocketAddr>) -> Result<Running> {
    let address = free_address()?;
    let mut command = Command::new(&config.program);
    command.arg("serve").args(&config.flags);
    if config.bulwark {
        command.args(["--listen", &address.to_string()]);
        if let Some(metrics) = metrics {
            command.args(["--metrics", &metrics.to_string()]);
        }
    } else {
        command.args(["--addr", &address.to_string()]);
    }
    command
        .arg(component())
        .env(
            "BULWARK_CACHE_DIR",
            std::env::temp_dir().join("bulwark-serve-bench-cache"),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = command
        .spawn()
        .with_context(|| format!("cannot start {}", config.name))?;
    let running = Running { child, address };
    wait_listening(address, Duration::from_secs(60))
        .with_context(|| format!("{} does not listen", config.name))?;
    Ok(running)
}

fn component() -> PathBuf {
    bulwark_tests::build_dir().join("components/httpd.wasm")
}

fn wrk(address: SocketAddr, connections: u32, seconds: u64) -> Result<Load> {
    let threads = connections.min(2);
    let output = Command::new("wrk")
        .args([
            "--latency",
            "-t",
            &threads.to_string(),
            "-c",
            &connections.to_string(),
            "-d",
            &format!("{seconds}s"),
            &format!("http://{address}/"),
        ])
        .output()
        .context("cannot run wrk (make deps installs it)")?;
    ensure!(output.status.success(), "wrk failed: {output:?}");
    parse_wrk(&String::from_utf8_lossy(&output.stdout))
}

/// The figures of wrk's `--latency` report.
fn parse_wrk(report: &str) -> Result<Load> {
    let latency = |label: &str| -> Result<f64> {
        let line = report
            .lines()
            .find(|line| line.trim_start().starts_with(label))
            .with_context(|| format!("no {label} line in wrk's report:\n{report}"))?;
        let value = line.split_whitespace().nth(1).context("no value")?;
        to_ms(value)
    };
    let requests_per_second = report
        .lines()
        .find(|line| line.starts_with("Requests/sec:"))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|value| value.parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's report:\n{report}"))?;
    let errors = report
        .lines()
        .filter(|line| line.contains("Non-2xx") || line.contains("Socket errors"))
        .flat_map(|line| line.split(|c: char| !c.is_ascii_digit()))
        .filter_map(|number| number.parse::<u64>().ok())
        .sum();
    Ok(Load {
        requests_per_second,
        p50_ms: latency("50%")?,
        p99_ms: latency("99%")?,
        errors,
    })
}

fn to_ms(value: &str) -> Result<f64> {
    let split = value
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("{value:?} has no unit"))?;
    let (number, unit) = value.split_at(split);
    let number: f64 = number.parse()?;
    Ok(match unit {
        "us" => number / 1e3,
        "ms" => number,
        "s" => number * 1e3,
        "m" => number * 60e3,
        other => bail!("unknown unit {other:?} in {value:?}"),
    })
}

/// p50 and p99 upper bounds, in microseconds, from the instantiation histogram's buckets.
fn instantiation_percentiles(metrics: &str) -> Option<(f64, f64)> {
    let buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter_map(|line| line.strip_prefix("bulwark_instantiation_seconds_bucket{le=\""))
        .filter_map(|rest| {
            let (bound, count) = rest.split_once("\"} ")?;
            Some((bound.parse().ok()?, count.trim().parse().ok()?))
        })
        .collect();
    let total = buckets.last()?.1;
    let at = |fraction: f64| {
        buckets
            .iter()
            .find(|(_, count)| *count >= total * fraction)
            .map(|(bound, _)| bound * 1e6)
    };
    Some((at(0.5)?, at(0.99)?))
}

fn main() -> ExitCode {
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("serve bench failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn bench() -> Result<()> {
    let seconds: u64 = std::env::var("BULWARK_BENCH_SECONDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(10);
    let bulwark = bulwark_binary()?;
    let mut configs = vec![
        Config {
            name: "bulwark serve, no limits",
            program: bulwark.clone(),
            flags: vec![],
            bulwark: true,
        },
        Config {
            name: "bulwark serve, --timeout 10s --memory 16Mi",
            program: bulwark,
            flags: vec!["--timeout", "10s", "--memory", "16Mi"],
            bulwark: true,
        },
    ];
    let peer = bulwark_tests::build_dir().join("wasmtime/bin/wasmtime");
    if peer.exists() {
        configs.push(Config {
            name: "wasmtime serve (peer), no limits",
            program: peer,
            flags: vec![],
            bulwark: false,
        });
    } else {
        println!(
            "(the peer is not built: `make bench` builds wasmtime-cli into {})",
            peer.display()
        );
    }
    print_conditions(seconds);
    println!(
        "| server | connections | requests/s | ratio | p50 ms | p99 ms | errors | instantiation p50 / p99 |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for connections in CONNECTIONS {
        let mut first = None;
        for config in &configs {
            let metrics = free_address()?;
            let running = start(config, Some(metrics))?;
            // Warm up (first instances, caches), then measure.
            let _ = wrk(running.address, connections, 1)?;
            let load = wrk(running.address, connections, seconds)?;
            let instantiation = if config.bulwark {
                get(metrics, "/metrics", Duration::from_secs(10))
                    .ok()
                    .and_then(|response| instantiation_percentiles(&response.body))
                    .map_or("-".into(), |(p50, p99)| {
                        format!("<= {p50:.0} us / <= {p99:.0} us")
                    })
            } else {
                "-".into()
            };
            drop(running);
            let base = *first.get_or_insert(load.requests_per_second);
            println!(
                "| {} | {connections} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {instantiation} |",
                config.name,
                load.requests_per_second,
                load.requests_per_second / base,
                load.p50_ms,
                load.p99_ms,
                load.errors,
            );
        }
    }
    Ok(())
}

fn print_conditions(seconds: u64) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|name| name.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("# Serving build/components/httpd.wasm (GET / -> 200, 19 bytes)");
    println!(
        "conditions: {cpu}, {} cores shared by server and load generator, Linux {}, release build, loopback, wrk (2 threads), {seconds} s per load after 1 s of warm-up, a fresh server per row; ratio = requests/s against the first row of the same connection count",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim(),
    );
    println!();
}
