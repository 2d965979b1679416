//! Serving benchmark: `bulwark serve` on loopback under load from `wrk`, side by side in one
//! run, without limits, with a deadline and a memory limit per request, and with fuel
//! metered (what metering and its usage figures cost), and `wasmtime serve` (the peer, same
//! Wasmtime version, no limits) where `make bench` built it into `build/wasmtime/`; for the
//! small C component and the big Python one, each on wasi:http 0.2, and the Python one on
//! WASI 0.3 (where the peer runs twice: reusing instances, as it does by default, and with
//! an instance per request, as Bulwark serves). Requests/s and
//! p50/p99 at 1, 50 and 200 connections, the ratio of each to the first row of the same
//! component and connection count, and per-request instantiation time from Bulwark's own
//! histogram. `BULWARK_BENCH_SECONDS` sets each load's length (default 10).
//!
//! Then density: `BULWARK_BENCH_IN_FLIGHT` (default 10,000) requests to a guest that waits
//! 2 s, all sent at once to one server: how many were answered, how many were in flight at
//! the peak (Bulwark's gauge) and the server's resident memory then, per instance.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use bulwark_tests::harness::node::bulwark_binary;
use bulwark_tests::http::{get, wait_listening};

const CONNECTIONS: [u32; 3] = [1, 50, 200];

/// One server under test: `PROGRAM serve FLAGS COMPONENT`.
struct Config {
    name: &'static str,
    /// A component from `make components`.
    component: &'static str,
    program: PathBuf,
    flags: Vec<String>,
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
        .arg(bulwark_tests::build_dir().join(format!("components/{}.wasm", config.component)))
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
    let peer = bulwark_tests::build_dir().join("wasmtime/bin/wasmtime");
    let mut configs = Vec::new();
    for (component, memory) in [("httpd", "16Mi"), ("pyhttp", "64Mi"), ("pyhttp-p3", "64Mi")] {
        configs.push(Config {
            name: "bulwark serve, no limits",
            component,
            program: bulwark.clone(),
            flags: Vec::new(),
            bulwark: true,
        });
        configs.push(Config {
            name: if component == "httpd" {
                "bulwark serve, --timeout 10s --memory 16Mi"
            } else {
                "bulwark serve, --timeout 10s --memory 64Mi"
            },
            component,
            program: bulwark.clone(),
            flags: ["--timeout", "10s", "--memory", memory]
                .map(String::from)
                .to_vec(),
            bulwark: true,
        });
        // Metering on: the same server counting fuel for each request (and each request's
        // usage line and histograms then carry it), against the row without.
        configs.push(Config {
            name: "bulwark serve, --fuel 100000000000",
            component,
            program: bulwark.clone(),
            flags: ["--fuel", "100000000000"].map(String::from).to_vec(),
            bulwark: true,
        });
        if peer.exists() {
            configs.push(Config {
                name: "wasmtime serve (peer), no limits",
                component,
                program: peer.clone(),
                // wasi:cli as well as the proxy world, as Bulwark links it (CPython needs it).
                flags: vec!["-S".into(), "cli".into()],
                bulwark: false,
            });
            if component.ends_with("-p3") {
                // By default the peer sends up to 128 requests (16 at once) to one WASI 0.3
                // instance; Bulwark gives each request its own. Like for like:
                configs.push(Config {
                    name: "wasmtime serve (peer), an instance per request",
                    component,
                    program: peer.clone(),
                    flags: ["-S", "cli", "--max-instance-reuse-count", "1"]
                        .map(String::from)
                        .to_vec(),
                    bulwark: false,
                });
            }
        }
    }
    if !peer.exists() {
        println!(
            "(the peer is not built: `make bench` builds wasmtime-cli into {})",
            peer.display()
        );
    }
    print_conditions(seconds);
    println!(
        "| component | server | connections | requests/s | ratio | p50 ms | p99 ms | errors | instantiation p50 / p99 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for connections in CONNECTIONS {
        let mut first: Option<(&str, f64)> = None;
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
            let base = match first {
                Some((component, base)) if component == config.component => base,
                _ => {
                    first = Some((config.component, load.requests_per_second));
                    load.requests_per_second
                }
            };
            println!(
                "| {} | {} | {connections} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {instantiation} |",
                config.component,
                config.name,
                load.requests_per_second,
                load.requests_per_second / base,
                load.p50_ms,
                load.p99_ms,
                load.errors,
            );
        }
    }
    density()
}

/// Resident memory of `pid` in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .context("no VmRSS")
}

fn density() -> Result<()> {
    let requests: usize = std::env::var("BULWARK_BENCH_IN_FLIGHT")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(10_000);
    // One descriptor per connection on each side: both processes need room (the server
    // inherits this limit).
    // SAFETY: getrlimit/setrlimit on this process with a valid struct.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
    let config = Config {
        name: "density",
        component: "httpd",
        program: bulwark_binary()?,
        flags: vec![
            "--timeout".into(),
            "60s".into(),
            "--concurrency".into(),
            requests.to_string(),
        ],
        bulwark: true,
    };
    let metrics = free_address()?;
    let running = start(&config, Some(metrics))?;
    let pid = running.child.id();
    let idle = rss_kib(pid)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (answered, peak_in_flight, peak_rss) = runtime.block_on(async {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut in_flight, mut rss) = (0u64, 0u64);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(now) = rss_kib(pid) {
                        rss = rss.max(now);
                    }
                    let scraped = tokio::task::spawn_blocking(move || {
                        get(metrics, "/metrics", Duration::from_secs(5))
                    })
                    .await;
                    if let Ok(Ok(response)) = scraped
                        && let Some(value) = response
                            .body
                            .lines()
                            .find_map(|line| line.strip_prefix("bulwark_in_flight "))
                            .and_then(|value| value.trim().parse::<u64>().ok())
                    {
                        in_flight = in_flight.max(value);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                (in_flight, rss)
            })
        };
        let address = running.address;
        let tasks: Vec<_> = (0..requests)
            .map(|_| tokio::spawn(sleep_request(address)))
            .collect();
        let mut answered = 0;
        for task in tasks {
            if matches!(task.await, Ok(Ok(200))) {
                answered += 1;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (in_flight, rss) = sampler.await.unwrap_or((0, 0));
        (answered, in_flight, rss)
    });
    drop(running);
    println!();
    println!(
        "# Density: {requests} requests to a guest that waits 2 s, sent at once to one bulwark serve --concurrency {requests}"
    );
    println!(
        "answered 200: {answered} of {requests}; in flight at the peak: {peak_in_flight}; server RSS idle {:.1} MiB, at the peak {:.1} MiB; per in-flight instance {:.1} KiB",
        idle as f64 / 1024.0,
        peak_rss as f64 / 1024.0,
        (peak_rss.saturating_sub(idle)) as f64 / peak_in_flight.max(1) as f64,
    );
    ensure!(
        answered == requests,
        "{} requests were not answered 200",
        requests - answered
    );
    Ok(())
}

/// `GET /sleep/2000` on a connection of its own; the status code.
async fn sleep_request(address: SocketAddr) -> Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream
        .write_all(b"GET /sleep/2000 HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let head = String::from_utf8_lossy(&response[..response.len().min(16)]).into_owned();
    head.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("not an HTTP response: {head:?}"))
}

fn print_conditions(seconds: u64) {
    let (cpu, kernel) = bulwark_tests::machine();
    println!(
        "# Serving GET / -> 200: build/components/httpd.wasm (C, 94 KiB, wasi:http 0.2), pyhttp.wasm (CPython, 18 MiB, 0.2) and pyhttp-p3.wasm (CPython, 19 MiB, WASI 0.3)"
    );
    println!(
        "conditions: {cpu}, {} cores shared by server and load generator, Linux {}, release build, loopback, wrk (2 threads), {seconds} s per load after 1 s of warm-up, a fresh server per row; ratio = requests/s against the first row of the same connection count",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel,
    );
    println!();
}
