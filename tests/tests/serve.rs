//! `bulwark serve`, end to end: the real binary serving the httpd component from
//! `make components` on loopback. The same server the shim runs for a serving pod, so these
//! cover what is hard to see through CRI: readiness, each limit as the client sees it,
//! SIGTERM's drain and the second signal, and inputs that must be refused.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bulwark_tests::harness::node::bulwark_binary;
use bulwark_tests::http::{HttpResponse, get, logfmt_value, metric, wait_listening};
use tempfile::TempDir;

const REQUEST: Duration = Duration::from_secs(20);

/// The small component: C against the canonical ABI (images/guests/httpd.c).
fn httpd() -> PathBuf {
    component("httpd")
}

/// A component from `make components`.
fn component(name: &str) -> PathBuf {
    let path = bulwark_tests::build_dir().join(format!("components/{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run `make components` (make test does)",
        path.display()
    );
    path
}

/// A loopback address nothing listens on now.
fn free_address() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
}

/// `bulwark serve` running in the background; killed (by its PID) when dropped.
struct Server {
    child: Child,
    address: SocketAddr,
    stderr: PathBuf,
    _temp: TempDir,
}

impl Server {
    /// Starts `bulwark serve FLAGS --listen ADDRESS httpd.wasm` without waiting for it.
    fn spawn(flags: &[&str]) -> Server {
        Server::spawn_component(&httpd(), flags)
    }

    /// Starts `bulwark serve FLAGS --listen ADDRESS COMPONENT` without waiting for it.
    fn spawn_component(component: &Path, flags: &[&str]) -> Server {
        let temp = tempfile::tempdir().unwrap();
        let address = free_address();
        let stderr = temp.path().join("stderr");
        let child = Command::new(bulwark_binary().unwrap())
            .env_clear()
            .env("BULWARK_CACHE_DIR", temp.path().join("cache"))
            .arg("serve")
            .args(flags)
            .args(["--listen", &address.to_string()])
            .arg(component)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Server {
            child,
            address,
            stderr,
            _temp: temp,
        }
    }

    /// Starts a server and waits until it accepts connections.
    fn start(flags: &[&str]) -> Server {
        Server::ready(Server::spawn(flags), REQUEST)
    }

    /// Waits until `server` accepts connections, for up to `timeout`.
    fn ready(mut server: Server, timeout: Duration) -> Server {
        if let Err(error) = wait_listening(server.address, timeout) {
            let status = server.child.try_wait();
            panic!("{error}; status {status:?}; stderr:\n{}", server.stderr());
        }
        server
    }

    fn get(&self, path: &str) -> anyhow::Result<HttpResponse> {
        get(self.address, path, REQUEST)
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Fails unless `stderr` (this server's) has a request's log line containing `part`.
    fn assert_request_logged(&self, stderr: &str, part: &str) {
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with("bulwark: request ") && l.contains(part)),
            "{part}: {stderr}"
        );
    }

    /// Waits (up to a request's time) until the server's log contains `part`.
    fn wait_logged(&self, part: &str) {
        let until = Instant::now() + REQUEST;
        while !self.stderr().contains(part) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) with our own child's pid, which it stays until waited for.
        let sent = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(sent, 0, "kill: {}", std::io::Error::last_os_error());
    }

    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "bulwark serve still runs after {timeout:?}; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn each_limit_ends_only_its_own_request() {
    let metrics = free_address();
    let server = Server::start(&[
        "--fuel",
        "100000000",
        "--timeout",
        "2s",
        "--memory",
        "16Mi",
        "--metrics",
        &metrics.to_string(),
    ]);
    let hello = server.get("/").unwrap();
    assert_eq!(
        (hello.status, hello.body.as_str()),
        (200, "hello from bulwark\n")
    );
    server.get("/loop").unwrap().assert_limit(
        500,
        "fuel",
        "fuel exhausted after 100000000 units (--fuel)",
    );
    // Sleeping burns no fuel: the deadline ends it.
    server.get("/sleep/60000").unwrap().assert_limit(
        504,
        "timeout",
        "deadline of 2s exceeded (--timeout)",
    );
    server.get("/grow").unwrap().assert_limit(
        500,
        "memory",
        "memory limit of 16Mi reached (--memory)",
    );
    server
        .get("/trap")
        .unwrap()
        .assert_limit(500, "trap", "trapped: ");
    // Headers already sent: the connection is aborted rather than completed with a lie.
    let partial = server.get("/partial");
    assert!(partial.is_err(), "{partial:?}");
    let missing = server.get("/nothing-here").unwrap();
    assert_eq!(missing.status, 404);
    // And the server carries on, every instance fresh.
    assert_eq!(server.get("/").unwrap().status, 200);

    let stderr = server.stderr();
    for line in [
        "GET /loop: 500 fuel exhausted after 100000000 units (--fuel)",
        "GET /sleep/60000: 504 deadline of 2s exceeded (--timeout)",
        "GET /grow: 500 memory limit of 16Mi reached (--memory)",
        "GET /trap: 500 trapped",
    ] {
        server.assert_request_logged(&stderr, line);
    }
    let scraped = get(metrics, "/metrics", REQUEST).unwrap();
    assert_eq!(scraped.status, 200);
    for line in [
        // The broken-off response counts by the head it sent.
        "bulwark_requests_total{status=\"200\"} 3",
        "bulwark_requests_total{status=\"404\"} 1",
        "bulwark_requests_total{status=\"504\"} 1",
        "bulwark_limits_total{kind=\"fuel\"} 1",
        "bulwark_limits_total{kind=\"timeout\"} 1",
        "bulwark_limits_total{kind=\"memory\"} 1",
        "bulwark_limits_total{kind=\"trap\"} 2",
        "bulwark_in_flight 0",
    ] {
        assert!(
            scraped.body.lines().any(|l| l == line),
            "{line}: {}",
            scraped.body
        );
    }
    assert!(
        scraped
            .body
            .contains("bulwark_instantiation_seconds_bucket"),
        "{}",
        scraped.body
    );
}

#[test]
fn sigterm_drains_the_request_in_flight_then_exits_zero() {
    let mut server = Server::start(&["--timeout", "10s"]);
    let address = server.address;
    let slow = std::thread::spawn(move || get(address, "/sleep/1500", REQUEST));
    std::thread::sleep(Duration::from_millis(300));
    server.signal(libc::SIGTERM);
    // No new connections once draining.
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        TcpStream::connect_timeout(&address, Duration::from_millis(500)).is_err(),
        "a draining server accepted a connection"
    );
    let answered = slow.join().unwrap().unwrap();
    assert_eq!(
        (answered.status, answered.body.as_str()),
        (200, "slept 1500 ms\n")
    );
    let status = server.wait(REQUEST);
    assert_eq!(status.code(), Some(0), "{}", server.stderr());
    assert!(
        server.stderr().contains("every request finished"),
        "{}",
        server.stderr()
    );
}

#[test]
fn a_second_sigterm_or_a_sigint_ends_the_server_at_once() {
    for (second, code) in [(libc::SIGTERM, 128 + 15), (libc::SIGINT, 128 + 2)] {
        let mut server = Server::start(&[]);
        let address = server.address;
        let slow = std::thread::spawn(move || get(address, "/sleep/30000", REQUEST));
        std::thread::sleep(Duration::from_millis(300));
        server.signal(libc::SIGTERM);
        std::thread::sleep(Duration::from_millis(200));
        server.signal(second);
        let started = Instant::now();
        let status = server.wait(Duration::from_secs(5));
        assert_eq!(status.code(), Some(code), "{}", server.stderr());
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(slow.join().unwrap().is_err(), "the slow request completed");
    }
}

#[test]
fn concurrency_beyond_the_cap_waits_then_gets_503() {
    let server = Server::start(&["--concurrency", "1", "--timeout", "1s"]);
    let address = server.address;
    let requests: Vec<_> = (0..3)
        .map(|_| std::thread::spawn(move || get(address, "/sleep/3000", REQUEST)))
        .collect();
    let statuses: Vec<HttpResponse> = requests
        .into_iter()
        .map(|request| request.join().unwrap().unwrap())
        .collect();
    let refused: Vec<_> = statuses.iter().filter(|r| r.status == 503).collect();
    assert!(refused.len() >= 2, "{statuses:?}");
    for response in refused {
        assert_eq!(response.header("retry-after"), Some("1"), "{response:?}");
        assert!(
            response.body.contains("all 1 instances were busy"),
            "{response:?}"
        );
    }
    // The slot frees: the next request is served.
    assert_eq!(server.get("/").unwrap().status, 200);
}

#[test]
fn a_component_that_cannot_instantiate_never_listens() {
    // A memory limit below the component's initial memory: no instance could ever be made,
    // which is said with the figures before anything listens or readiness could pass.
    let mut server = Server::spawn(&["--memory", "64Ki"]);
    let status = server.wait(REQUEST);
    assert_eq!(status.code(), Some(2), "{}", server.stderr());
    let stderr = server.stderr();
    assert!(
        stderr.contains(
            "--memory: 64Ki per instance is below the 128Ki of linear memory the component starts with"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("serving on"), "{stderr}");
    assert!(TcpStream::connect_timeout(&server.address, Duration::from_millis(200)).is_err());
}

#[test]
fn bad_serving_input_is_refused_with_the_flag_and_value() {
    let run = |args: &[&str], component: &Path| {
        let temp = tempfile::tempdir().unwrap();
        Command::new(bulwark_binary().unwrap())
            .env_clear()
            .env("BULWARK_CACHE_DIR", temp.path().join("cache"))
            .arg("serve")
            .args(args)
            .arg(component)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let httpd = httpd();
    for (flags, expected) in [
        (
            &["--listen", "localhost:80"][..],
            "--listen: \"localhost:80\"",
        ),
        (&["--listen", "0"][..], "--listen: \"0\""),
        (&["--metrics", "http"][..], "--metrics: \"http\""),
        (&["--concurrency", "0"][..], "--concurrency: \"0\""),
        (&["--concurrency", "many"][..], "--concurrency: \"many\""),
    ] {
        let output = run(flags, &httpd);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{flags:?}: {stderr}");
        assert!(stderr.contains(expected), "{flags:?}: {stderr}");
    }

    // An address someone else holds: named, and exit 2.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let output = run(&["--listen", &address], &httpd);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&address), "{stderr}");

    // A command is not a service, and a service is not a command.
    let hello = bulwark_tests::build_dir().join("components/hello.wasm");
    let output = run(&[], &hello);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not a wasi:http component"), "{stderr}");
    let temp = tempfile::tempdir().unwrap();
    let output = Command::new(bulwark_binary().unwrap())
        .env_clear()
        .env("BULWARK_CACHE_DIR", temp.path().join("cache"))
        .arg("run")
        .arg(&httpd)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("bulwark serve"), "{stderr}");
}

#[test]
fn a_big_python_component_serves_under_the_same_limits() {
    // CPython inside (componentize-py, ~18 MB): compiling it cold takes a while.
    let python = component("pyhttp");
    assert!(std::fs::metadata(&python).unwrap().len() > 10 << 20);
    let server = Server::ready(
        Server::spawn_component(&python, &["--timeout", "2s", "--memory", "64Mi"]),
        Duration::from_secs(300),
    );
    let hello = server.get("/").unwrap();
    assert_eq!(
        (hello.status, hello.body.as_str()),
        (200, "hello from python\n")
    );
    server.get("/loop").unwrap().assert_limit(
        504,
        "timeout",
        "deadline of 2s exceeded (--timeout)",
    );
    server.get("/grow/200").unwrap().assert_limit(
        500,
        "memory",
        "memory limit of 64Mi reached (--memory)",
    );
    let held = server.get("/grow/8").unwrap();
    assert_eq!((held.status, held.body.as_str()), (200, "held 8 MiB\n"));
    assert_eq!(server.get("/missing").unwrap().status, 404);
}

#[test]
fn a_wasi_0_3_python_component_serves_under_the_same_limits() {
    let python = component("pyhttp-p3");
    let server = Server::ready(
        Server::spawn_component(
            &python,
            &[
                "--timeout",
                "2s",
                "--memory",
                "96Mi",
                "--fuel",
                "2000000000",
            ],
        ),
        Duration::from_secs(300),
    );
    let hello = server.get("/").unwrap();
    assert_eq!(
        (hello.status, hello.body.as_str()),
        (200, "hello from python p3\n")
    );
    // Suspended in an async host call (a clock wait) when its deadline passes: it ends
    // there, and only it: a request beside it answers meanwhile.
    let sleeper = {
        let address = server.address;
        std::thread::spawn(move || get(address, "/sleep/60000", REQUEST))
    };
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(server.get("/").unwrap().status, 200);
    sleeper.join().unwrap().unwrap().assert_limit(
        504,
        "timeout",
        "deadline of 2s exceeded (--timeout)",
    );
    server.get("/loop").unwrap().assert_limit(
        500,
        "fuel",
        "fuel exhausted after 2000000000 units (--fuel)",
    );
    server.get("/grow/200").unwrap().assert_limit(
        500,
        "memory",
        "memory limit of 96Mi reached (--memory)",
    );
    let held = server.get("/grow/8").unwrap();
    assert_eq!((held.status, held.body.as_str()), (200, "held 8 MiB\n"));
    // A body the guest streams after `handle` returned arrives whole...
    let big = server.get("/big/8").unwrap();
    assert_eq!((big.status, big.body.len()), (200, 8 << 20));
    // ...and one a client does not read is cut at the deadline, freeing its instance.
    let _stalled = send(server.address, b"GET /big/512 HTTP/1.1\r\nHost: x\r\n\r\n");
    server.wait_logged("GET /big/512: 200, then deadline");
    assert_eq!(server.get("/missing").unwrap().status, 404);

    let stderr = server.stderr();
    for line in [
        "GET /sleep/60000: 504 deadline of 2s exceeded (--timeout)",
        "GET /loop: 500 fuel exhausted after 2000000000 units (--fuel)",
        "GET /grow/200: 500 memory limit of 96Mi reached (--memory)",
        "GET /grow/8: 200 wall_ms=",
        "GET /big/512: 200, then deadline of 2s exceeded (--timeout) (after the response head: connection aborted)",
    ] {
        server.assert_request_logged(&stderr, line);
    }
}

#[test]
fn a_client_that_hangs_up_does_not_keep_its_request_past_the_deadline() {
    // One slot; a request suspended in a host call whose client is gone keeps it only
    // until its deadline, not for as long as the guest would wait.
    let server = Server::start(&["--timeout", "1s", "--concurrency", "1"]);
    let client = send(
        server.address,
        b"GET /sleep/60000 HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    std::thread::sleep(Duration::from_millis(300));
    drop(client);
    let line = "GET /sleep/60000: 504 deadline of 1s exceeded (--timeout)";
    server.wait_logged(line);
    assert!(server.stderr().contains(line), "{}", server.stderr());
    assert_eq!(server.get("/").unwrap().status, 200, "{}", server.stderr());
}

/// The value of `key` in the `key=value` usage of the log line of the request for `path`.
fn request_usage(stderr: &str, path: &str, key: &str) -> u64 {
    let line = stderr
        .lines()
        .find(|line| line.contains(&format!(" GET {path}: ")))
        .unwrap_or_else(|| panic!("no line for {path}: {stderr}"));
    logfmt_value(line, key)
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        .parse()
        .unwrap_or_else(|error| panic!("{key} in {line}: {error}"))
}

#[test]
fn a_requests_usage_is_what_its_limits_measure() {
    let metrics = free_address();
    let server = Server::start(&["--fuel", "100000000", "--metrics", &metrics.to_string()]);
    assert_eq!(server.get("/").unwrap().status, 200);
    assert_eq!(server.get("/missing").unwrap().status, 404);
    let stderr = server.stderr();
    let fuel = request_usage(&stderr, "/", "fuel");
    let missing = request_usage(&stderr, "/missing", "fuel");
    // Measured apart from the count: a server whose budget is that answers, one whose
    // budget is half of it runs out.
    let exact = Server::start(&["--fuel", &fuel.to_string()]);
    assert_eq!(exact.get("/").unwrap().status, 200, "{}", exact.stderr());
    let short = Server::start(&["--fuel", &(fuel / 2).to_string()]);
    short.get("/").unwrap().assert_limit(
        500,
        "fuel",
        &format!("fuel exhausted after {} units (--fuel)", fuel / 2),
    );
    // The histograms hold the same figures.
    let scraped = get(metrics, "/metrics", REQUEST).unwrap().body;
    let fuel_sum = scraped.lines().find_map(|line| {
        line.strip_prefix("bulwark_request_fuel_sum ")?
            .parse::<f64>()
            .ok()
    });
    assert_eq!(fuel_sum, Some((fuel + missing) as f64), "{scraped}");
    assert_eq!(
        metric(&scraped, "bulwark_request_fuel_count"),
        2,
        "{scraped}"
    );
    assert_eq!(
        metric(&scraped, "bulwark_request_memory_bytes_count"),
        2,
        "{scraped}"
    );
    // No budget, no metering: no fuel figure in the line nor in the histogram.
    let unmetered = Server::start(&[]);
    assert_eq!(unmetered.get("/").unwrap().status, 200);
    let line = unmetered.stderr();
    assert!(
        line.contains("GET /: 200 wall_ms=") && !line.contains("fuel="),
        "{line}"
    );
}

#[test]
fn a_requests_usage_names_the_memory_its_instance_grew_to() {
    let python = component("pyhttp-p3");
    let server = Server::ready(
        Server::spawn_component(&python, &["--memory", "128Mi"]),
        Duration::from_secs(300),
    );
    assert_eq!(server.get("/").unwrap().status, 200);
    assert_eq!(server.get("/grow/32").unwrap().status, 200);
    let stderr = server.stderr();
    let base = request_usage(&stderr, "/", "memory_bytes");
    let grown = request_usage(&stderr, "/grow/32", "memory_bytes");
    // 32 MiB held by the guest, and the allocator's change on top.
    assert!(
        grown - base >= 32 << 20 && grown - base < 34 << 20,
        "{base} then {grown}: {stderr}"
    );
}

/// Writes `raw` on a new connection and returns the connection.
fn send(address: SocketAddr, raw: &[u8]) -> TcpStream {
    use std::io::Write;
    let mut stream = TcpStream::connect_timeout(&address, REQUEST).unwrap();
    stream.write_all(raw).unwrap();
    stream
}

/// Whether the server closed `stream` within `within` (anything it sent first is read).
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    use std::io::Read;
    let deadline = Instant::now() + within;
    let mut buffer = [0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// The first line (status) the server sent on `stream`.
fn status_line(stream: &mut TcpStream) -> String {
    use std::io::Read;
    stream.set_read_timeout(Some(REQUEST)).unwrap();
    let mut text = Vec::new();
    let mut byte = [0u8; 1];
    while !text.ends_with(b"\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
        text.push(byte[0]);
    }
    String::from_utf8_lossy(&text).trim_end().to_owned()
}

#[test]
fn hostile_clients_get_only_what_the_node_allows() {
    let temp = tempfile::tempdir().unwrap();
    let config = temp.path().join("config.toml");
    std::fs::write(
        &config,
        "[serving]\nhead_timeout = \"1s\"\nconnections = 24\nmax_head_size = \"8Ki\"\nmax_body_size = \"1Ki\"\n",
    )
    .unwrap();
    let metrics = free_address();
    let server = Server::start(&[
        "--config",
        config.to_str().unwrap(),
        "--concurrency",
        "2",
        "--timeout",
        "2s",
        "--metrics",
        &metrics.to_string(),
    ]);
    let address = server.address;

    // Slowloris: heads that never end are closed after head_timeout, and a normal
    // request is answered meanwhile.
    let started = Instant::now();
    let mut slow: Vec<TcpStream> = (0..16)
        .map(|_| send(address, b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: "))
        .collect();
    assert_eq!(server.get("/").unwrap().status, 200, "during slowloris");
    for stream in &mut slow {
        assert!(
            closed_within(stream, Duration::from_secs(5)),
            "a slow head still open after {:?}",
            started.elapsed()
        );
    }
    // An idle keep-alive connection is closed after the same time.
    let mut idle = send(address, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status_line(&mut idle), "HTTP/1.1 200 OK");
    assert!(
        closed_within(&mut idle, Duration::from_secs(5)),
        "idle keep-alive"
    );

    // Open connections are capped. At the cap, a new connection pushes out the oldest one
    // that only waits, so slow clients cannot lock the others out...
    let mut held: Vec<TcpStream> = (0..24).map(|_| send(address, b"")).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut newcomer = send(
        address,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status_line(&mut newcomer), "HTTP/1.1 200 OK");
    assert!(
        closed_within(&mut held[0], Duration::from_millis(700)),
        "the oldest waiting connection was not pushed out"
    );
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    // ...and when every one is in the middle of a request, a new one is closed at once,
    // never queued.
    let busy: Vec<TcpStream> = (0..24)
        .map(|_| send(address, b"GET /sleep/1500 HTTP/1.1\r\nHost: x\r\n\r\n"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut over = send(address, b"");
    assert!(
        closed_within(&mut over, Duration::from_millis(700)),
        "a connection over the cap was kept while every one was busy"
    );
    drop(busy);
    // The sleeping requests give their slots back.
    std::thread::sleep(Duration::from_millis(2000));

    // Oversized heads get 431, oversized bodies 413.
    let mut big_head = send(
        address,
        format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(10_000)
        )
        .as_bytes(),
    );
    assert_eq!(
        status_line(&mut big_head),
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    let mut big_body = send(
        address,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2048\r\n\r\n",
    );
    assert_eq!(status_line(&mut big_body), "HTTP/1.1 413 Payload Too Large");

    // Clients that ask for a big body and never read it hold both slots only until the
    // deadline: then their responses are abandoned and the next request is served.
    let stuck: Vec<TcpStream> = (0..2)
        .map(|_| send(address, b"GET /big/65536 HTTP/1.1\r\nHost: x\r\n\r\n"))
        .collect();
    std::thread::sleep(Duration::from_millis(2500));
    let answered = Instant::now();
    assert_eq!(
        server.get("/").unwrap().status,
        200,
        "after the stuck clients' deadline"
    );
    assert!(
        answered.elapsed() < Duration::from_secs(2),
        "{:?}",
        answered.elapsed()
    );
    drop(stuck);

    // Connections are counted as they end, which the server sees a moment later (longer on
    // a loaded machine): read the metrics until the stuck ones are counted.
    let mut text = String::new();
    let until = Instant::now() + REQUEST;
    while Instant::now() < until {
        text = get(metrics, "/metrics", REQUEST).unwrap().body;
        if metric(
            &text,
            "bulwark_connections_total{event=\"response_deadline\"}",
        ) >= 2
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let count = |series: &str| metric(&text, series);
    assert!(
        count("bulwark_connections_total{event=\"head_timeout\"}") >= 17,
        "{text}"
    );
    assert!(
        count("bulwark_connections_total{event=\"refused\"}") >= 1,
        "{text}"
    );
    assert!(
        count("bulwark_connections_total{event=\"pushed_out\"}") >= 1,
        "{text}"
    );
    assert!(
        count("bulwark_connections_total{event=\"head_too_large\"}") >= 1,
        "{text}"
    );
    assert!(
        count("bulwark_connections_total{event=\"response_deadline\"}") >= 2,
        "{text}"
    );
    assert!(
        count("bulwark_requests_total{status=\"413\"}") >= 1,
        "{text}"
    );
    assert!(
        count("bulwark_limits_total{kind=\"timeout\"}") >= 2,
        "{text}"
    );
}
