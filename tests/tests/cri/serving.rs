//! Serving mode through CRI: wasi:http components as pods in their own network namespace,
//! answering on their pod IP, with per-request limits, a concurrency cap, metrics,
//! per-container annotations, outbound requests only where granted, and a drain on stop.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use bulwark_tests::attack::{AttackFigures, SLOW_CONNECTIONS, attack};
use bulwark_tests::harness::containerd;
use bulwark_tests::harness::cri::{ContainerSpec, PodSpec, SecurityContext};
use bulwark_tests::harness::network::listen_in;
use bulwark_tests::harness::node::{Format, HANDLER, NODE_CONFIG, Node, NodeOptions, annotated};
use bulwark_tests::http::{HttpResponse, get, metric, wait_listening};

use crate::{ONE_CONTAINERD, suite_containerd};

/// How long one request may take in these tests (a slow VM included).
const REQUEST: Duration = Duration::from_secs(30);

/// A serving pod: its id, its IP and its containers' ids.
struct ServingPod {
    id: String,
    ip: IpAddr,
    containers: Vec<String>,
}

impl ServingPod {
    /// Starts `containers` (name, listen port) of the httpd component, packaged as `format`,
    /// in a pod with its own network and `annotations`, each as uid 65532 under Pod
    /// Security "restricted", and waits until each one listens.
    async fn start(
        node: &Node,
        format: Format,
        name: &str,
        annotations: &[(&str, &str)],
        containers: &[(&str, u16)],
    ) -> Result<ServingPod> {
        Self::start_component(node, "httpd", format, name, annotations, containers, None).await
    }

    /// As [`ServingPod::start`], for `component`, each container with `memory_limit`.
    async fn start_component(
        node: &Node,
        component: &str,
        format: Format,
        name: &str,
        annotations: &[(&str, &str)],
        containers: &[(&str, u16)],
        memory_limit: Option<i64>,
    ) -> Result<ServingPod> {
        let image = node.push_component(component, format)?;
        node.cri.pull(&image).await?;
        let pod = annotated(name, annotations)
            .pod_network()
            .runtime_handler(HANDLER);
        let id = node.cri.run_pod(&pod).await?;
        let ip = node.cri.pod_ip(&id).await?;
        let mut ids = Vec::new();
        for (container, port) in containers {
            // As clusters run services: Pod Security "restricted", a non-root user.
            let mut spec = ContainerSpec::new(*container, image.clone())
                .security(SecurityContext::restricted(Some(65532)));
            if format == Format::Artifact {
                // An artifact has no entrypoint: the pod names argv[0].
                spec = spec.command([format!("{component}.wasm")]);
            }
            if let Some(limit) = memory_limit {
                spec = spec.memory_limit(limit);
            }
            let container_id = node.cri.create_container(&id, &pod, &spec).await?;
            node.cri.start_container(&container_id).await?;
            let address = SocketAddr::new(ip, *port);
            tokio::task::spawn_blocking(move || wait_listening(address, REQUEST)).await??;
            ids.push(container_id);
        }
        Ok(ServingPod {
            id,
            ip,
            containers: ids,
        })
    }

    async fn get(&self, port: u16, path: &str) -> Result<HttpResponse> {
        let address = SocketAddr::new(self.ip, port);
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || get(address, &path, REQUEST)).await?
    }

    /// The stderr lines of container `index`.
    async fn stderr(&self, node: &Node, index: usize) -> Result<Vec<String>> {
        Ok(node
            .cri
            .read_container_log(&self.containers[index])
            .await?
            .into_iter()
            .filter(|line| line.stream == bulwark_tests::harness::cri::LogStream::Stderr)
            .map(|line| line.text)
            .collect())
    }

    async fn remove(self, node: &Node) -> Result<()> {
        let containers: Vec<&str> = self.containers.iter().map(String::as_str).collect();
        node.cri.tear_down(&self.id, &containers).await
    }
}

/// The directory in the unified (cgroup2) hierarchy of process `pid`: where the egress
/// filter attaches (the container's cgroup on a v2 node, its twin on a hybrid one).
fn unified_cgroup_dir(pid: u32) -> Result<PathBuf> {
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?
        .lines()
        .find_map(|line| line.strip_prefix("0::").map(str::to_owned))
        .context("no cgroup2 line")?;
    let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .map(Path::new)
        .find(|root| root.join("cgroup.controllers").exists())
        .context("no cgroup2 hierarchy")?;
    Ok(root.join(own.trim_start_matches('/')))
}

/// Connects to `to` from a shell that first moves itself into the cgroup at `dir` (or, for
/// `/proc/self`, stays where it is): Ok, or the shell's error.
fn connect_from_cgroup(dir: &Path, to: SocketAddr) -> Result<Result<(), String>> {
    let output = std::process::Command::new("bash")
        .arg("-c")
        .arg(r#"if [ "$0" != /proc/self ]; then echo $$ > "$0/cgroup.procs" || exit 9; fi; exec 3<>"/dev/tcp/$1/$2""#)
        .arg(dir)
        .arg(to.ip().to_string())
        .arg(to.port().to_string())
        .output()?;
    ensure!(
        output.status.code() != Some(9),
        "cannot join {}",
        dir.display()
    );
    Ok(if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    })
}

fn serving_config() -> String {
    NODE_CONFIG.replace("allow_network = false", "allow_network = true")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wasi_http_pod_answers_on_its_pod_ip_and_each_limit_ends_only_its_request() -> Result<()>
{
    let _one = ONE_CONTAINERD.lock().await;
    let node = Node::start_with(
        NodeOptions::new(suite_containerd().await?, &serving_config()).pod_network(),
    )
    .await?;
    let annotations = [
        ("bulwark.dev/timeout", "1s"),
        ("bulwark.dev/memory", "16Mi"),
        ("bulwark.dev/metrics", "9090"),
        // Two containers, two ports; one of them also counts fuel.
        ("bulwark.dev/listen.api", "8081"),
        ("bulwark.dev/listen.web", "8082"),
        ("bulwark.dev/fuel.api", "100000000"),
        ("bulwark.dev/metrics.web", "9091"),
    ];
    let pod = ServingPod::start(
        &node,
        Format::Layer,
        "web",
        &annotations,
        &[("api", 8081), ("web", 8082)],
    )
    .await?;
    let hello = pod.get(8081, "/").await?;
    assert_eq!(
        (hello.status, hello.body.as_str()),
        (200, "hello from bulwark\n")
    );

    pod.get(8081, "/loop").await?.assert_limit(
        500,
        "fuel",
        "fuel exhausted after 100000000 units (bulwark.dev/fuel.api)",
    );
    pod.get(8082, "/loop").await?.assert_limit(
        504,
        "timeout",
        "deadline of 1s exceeded (bulwark.dev/timeout)",
    );
    pod.get(8082, "/grow").await?.assert_limit(
        500,
        "memory",
        "memory limit of 16Mi reached (bulwark.dev/memory)",
    );
    pod.get(8082, "/trap").await?.assert_limit(
        500,
        "trap",
        "trapped: wasm trap: wasm `unreachable` instruction executed",
    );
    let aborted = pod.get(8082, "/partial").await;
    ensure!(
        aborted.is_err(),
        "a response the guest broke off arrived whole: {aborted:?}"
    );
    // The server carries on.
    let after = pod.get(8082, "/").await?;
    assert_eq!(after.status, 200);

    let web = pod.stderr(&node, 1).await?;
    for reason in [
        "GET /loop: 504 deadline of 1s exceeded (bulwark.dev/timeout)",
        "GET /grow: 500 memory limit of 16Mi reached (bulwark.dev/memory)",
        "GET /partial: 200, then trapped",
    ] {
        assert!(
            web.iter()
                .any(|line| line.starts_with("bulwark: request ") && line.contains(reason)),
            "{reason}: {web:?}"
        );
    }
    let metrics = pod.get(9091, "/metrics").await?;
    for line in [
        "bulwark_requests_total{status=\"200\"} 2",
        "bulwark_limits_total{kind=\"timeout\"} 1",
        "bulwark_limits_total{kind=\"memory\"} 1",
        "bulwark_in_flight 0",
    ] {
        assert!(
            metrics.body.lines().any(|l| l == line),
            "{line}: {}",
            metrics.body
        );
    }
    pod.remove(&node).await?;
    node.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrency_cap_queues_then_refuses_and_stop_drains() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let node = Node::start_with(
        NodeOptions::new(suite_containerd().await?, &serving_config()).pod_network(),
    )
    .await?;
    let annotations = [
        ("bulwark.dev/concurrency", "1"),
        ("bulwark.dev/timeout", "1500ms"),
    ];
    let pod = ServingPod::start(
        &node,
        Format::Layer,
        "capped",
        &annotations,
        &[("capped", 8080)],
    )
    .await?;
    // One slot, four requests that would each hold it past the others' deadlines.
    let requests = (0..4).map(|_| pod.get(8080, "/sleep/5000"));
    let responses = futures::future::join_all(requests).await;
    let refused: Vec<&HttpResponse> = responses
        .iter()
        .filter_map(|response| response.as_ref().ok())
        .filter(|response| response.status == 503)
        .collect();
    ensure!(refused.len() >= 2, "{responses:?}");
    for response in &refused {
        assert_eq!(response.header("retry-after"), Some("1"), "{response:?}");
    }

    // StopContainer with a request in flight: it completes, then the server exits 0.
    let slow = {
        let address = SocketAddr::new(pod.ip, 8080);
        tokio::task::spawn_blocking(move || get(address, "/sleep/1000", REQUEST))
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let id = &pod.containers[0];
    node.cri.stop_container(id, Duration::from_secs(20)).await?;
    let answered = slow.await??;
    assert_eq!(
        (answered.status, answered.body.as_str()),
        (200, "slept 1000 ms\n")
    );
    let exit = node.cri.wait_exited(id, REQUEST).await?;
    assert_eq!((exit.exit_code, exit.reason.as_str()), (0, "Completed"));
    let stderr = pod.stderr(&node, 0).await?;
    assert!(
        stderr
            .iter()
            .any(|line| line.contains("every request finished")),
        "{stderr:?}"
    );
    pod.remove(&node).await?;
    node.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_requests_reach_granted_addresses_only() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let node = Node::start_with(
        NodeOptions::new(suite_containerd().await?, &serving_config()).pod_network(),
    )
    .await?;
    // An upstream in a pod of its own: the test answers HTTP inside its namespace.
    let upstream_pod = PodSpec::new("upstream").pod_network();
    node.cri.pull(&node.images.pause).await?;
    let upstream_id = node.cri.run_pod(&upstream_pod).await?;
    let upstream_ip = node.cri.pod_ip(&upstream_id).await?;
    let info = node.cri.pod_info(&upstream_id).await?;
    let netns = info["runtimeSpec"]["linux"]["namespaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|ns| ns["type"] == "network")
        .and_then(|ns| ns["path"].as_str())
        .context("no netns")?
        .to_owned();
    let listener = listen_in(
        std::path::Path::new(&netns),
        SocketAddr::new(upstream_ip, 7080),
    )?;
    let upstream = std::thread::spawn(move || -> Result<()> {
        let (mut stream, _) = listener.accept()?;
        let mut request = [0u8; 1024];
        let _ = stream.read(&mut request)?;
        stream.write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")?;
        Ok(())
    });
    let grant = format!("tcp:{upstream_ip}:7080");
    let pod = ServingPod::start(
        &node,
        Format::Layer,
        "client",
        &[
            ("bulwark.dev/network", &grant),
            ("bulwark.dev/metrics", "9090"),
        ],
        &[("client", 8080)],
    )
    .await?;
    let granted = pod
        .get(8080, &format!("/fetch/{upstream_ip}:7080/"))
        .await?;
    assert_eq!(
        (granted.status, granted.body.as_str()),
        (200, "fetched 204\n")
    );
    upstream.join().expect("the upstream thread")?;
    // Another port of the same address: wasi:http's HTTP-request-denied (case 15).
    let denied = pod
        .get(8080, &format!("/fetch/{upstream_ip}:7081/"))
        .await?;
    assert_eq!((denied.status, denied.body.as_str()), (502, "error 15\n"));

    // Below Wasmtime, the kernel holds the same line: a native process in the container's
    // cgroup (as a guest that escaped the engine would be) connects to the grant and to
    // nothing else, and the container's log names what it tried.
    let pid = node.cri.container_pid(&pod.containers[0]).await?;
    let egress_dir = unified_cgroup_dir(pid)?;
    let answering = listen_in(
        std::path::Path::new(&netns),
        SocketAddr::new(upstream_ip, 7080),
    )?;
    assert_eq!(
        connect_from_cgroup(&egress_dir, SocketAddr::new(upstream_ip, 7080))?,
        Ok(()),
        "the grant, from the container's cgroup"
    );
    drop(answering);
    let refused = connect_from_cgroup(&egress_dir, SocketAddr::new(upstream_ip, 7081))?;
    assert!(
        refused
            .as_ref()
            .is_err_and(|error| error.contains("Operation not permitted")),
        "{refused:?}"
    );
    // The same connect from outside the cgroup is only refused by the upstream (nothing
    // listens there): what refused it above was the filter.
    let outside = connect_from_cgroup(Path::new("/proc/self"), SocketAddr::new(upstream_ip, 7081))?;
    assert!(
        outside
            .as_ref()
            .is_err_and(|error| error.contains("Connection refused")),
        "{outside:?}"
    );
    let wanted = format!("egress denied by the kernel: tcp connect to {upstream_ip}:7081");
    let mut logged = Vec::new();
    for _ in 0..50 {
        logged = pod.stderr(&node, 0).await?;
        if logged.iter().any(|line| line.contains(&wanted)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        logged.iter().any(|line| line.contains(&wanted)),
        "{logged:?}"
    );
    // Every attempt is counted for the pod: allowed, the guest's request to its grant and
    // the native connect to it; denied, the native connect elsewhere (the guest's request
    // to 7081 never reached a socket: Wasmtime refused it first).
    let metrics = pod.get(9090, "/metrics").await?.body;
    let count = |series: &str| metric(&metrics, series);
    assert!(
        count("bulwark_egress_total{verdict=\"allowed\"}") >= 2,
        "{metrics}"
    );
    assert!(
        count("bulwark_egress_total{verdict=\"denied\"}") >= 1,
        "{metrics}"
    );
    pod.remove(&node).await?;
    assert!(
        !egress_dir.exists(),
        "{} (and the filter on it) outlived the pod",
        egress_dir.display()
    );
    node.cri.stop_pod(&upstream_id).await?;
    node.cri.remove_pod(&upstream_id).await?;
    node.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_that_cannot_fit_its_memory_limit_is_refused_at_start() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let node = Node::start(suite_containerd().await?, &serving_config()).await?;
    let image = node.push_component("httpd", Format::Layer)?;
    let container = ContainerSpec::new("big", image).memory_limit(64 << 20);
    let error = node
        .refused(
            annotated(
                "big",
                &[
                    ("bulwark.dev/concurrency", "10"),
                    ("bulwark.dev/memory", "16Mi"),
                ],
            ),
            container,
        )
        .await?;
    assert!(
        error.contains(
            "bulwark.dev/concurrency: 10 instances of 16Mi each do not fit: the container's memory limit of 64Mi holds the runtime ("
        ) && error.contains(" measured, 4Mi margin)"),
        "{error}"
    );
    node.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serving_oci_wasm_artifact_answers_on_containerd_1_7() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let binary = tokio::task::spawn_blocking(|| containerd::fetch("1.7.24")).await??;
    let node = Node::start_with(NodeOptions::new(binary, &serving_config()).pod_network()).await?;
    let pod = ServingPod::start(
        &node,
        Format::Artifact,
        "artifact",
        &[("bulwark.dev/timeout", "1s")],
        &[("httpd", 8080)],
    )
    .await?;
    let hello = pod.get(8080, "/").await?;
    assert_eq!(
        (hello.status, hello.body.as_str()),
        (200, "hello from bulwark\n")
    );
    pod.get(8080, "/sleep/5000").await?.assert_limit(
        504,
        "timeout",
        "deadline of 1s exceeded (bulwark.dev/timeout)",
    );
    pod.remove(&node).await?;
    node.finish().await
}

/// A node configuration as a fresh install writes it: no defaults at all.
const FRESH_NODE: &str = "[ceilings]\nmemory = \"1Gi\"\n";

/// The container limit the Python service tests size their pods with.
const PYTHON_LIMIT: i64 = 512 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_service_holds_its_memory_limit_from_a_cold_node_and_a_warm_one() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let node =
        Node::start_with(NodeOptions::new(suite_containerd().await?, FRESH_NODE).pod_network())
            .await?;
    for temperature in ["cold", "warm"] {
        let start = |name: &str, annotations: &'static [(&'static str, &'static str)]| {
            let name = format!("{temperature}-{name}");
            let node = &node;
            async move {
                if temperature == "cold" {
                    // The first pod of the module on this node: its cache does not hold it.
                    node.empty_cache()?;
                }
                ServingPod::start_component(
                    node,
                    "pyhttp",
                    Format::Layer,
                    &name,
                    annotations,
                    &[("app", 8080)],
                    Some(PYTHON_LIMIT),
                )
                .await
            }
        };
        // Nothing asked: it serves, with figures derived from the component.
        let plain = start("plain", &[]).await?;
        let hello = plain.get(8080, "/").await?;
        ensure!(
            (hello.status, hello.body.as_str()) == (200, "hello from python\n"),
            "{temperature}: {hello:?}"
        );
        let log = plain.stderr(&node, 0).await?;
        ensure!(
            log.iter().any(|line| line.contains("the runtime holds")),
            "{temperature}: no serving figures in {log:?}"
        );
        if temperature == "cold" {
            ensure!(
                log.iter().any(|line| line.contains("compiling /app.wasm")),
                "{temperature}: the log does not say the pod waits for a compilation: {log:?}"
            );
        }
        plain.remove(&node).await?;

        // A memory limit per instance that the guest outgrows: only that request ends.
        let memory = start("memory", &[("bulwark.dev/memory", "256Mi")]).await?;
        memory.get(8080, "/grow/300").await?.assert_limit(
            500,
            "memory",
            "memory limit of 256Mi reached (bulwark.dev/memory)",
        );
        let after = memory.get(8080, "/").await?;
        ensure!(after.status == 200, "{temperature}: {after:?}");
        memory.remove(&node).await?;

        // Fuel: it serves, and a spinning request ends by it.
        let fuel = start("fuel", &[("bulwark.dev/fuel", "2000000000")]).await?;
        let hello = fuel.get(8080, "/").await?;
        ensure!(hello.status == 200, "{temperature}: {hello:?}");
        fuel.get(8080, "/loop").await?.assert_limit(
            500,
            "fuel",
            "fuel exhausted after 2000000000 units (bulwark.dev/fuel)",
        );
        fuel.remove(&node).await?;

        // A limit that cannot hold one instance: refused at CreateContainer with the figures.
        if temperature == "cold" {
            node.empty_cache()?;
        }
        let image = node.push_component("pyhttp", Format::Layer)?;
        let error = node
            .refused(
                PodSpec::new(format!("{temperature}-small")).pod_network(),
                ContainerSpec::new("app", image)
                    .security(SecurityContext::restricted(Some(65532)))
                    .memory_limit(16 << 20),
            )
            .await?;
        for part in [
            "the component cannot be served in this container",
            "memory limit of 16Mi holds the runtime",
            "one instance needs",
        ] {
            ensure!(
                error.contains(part),
                "{temperature}: {part} missing from {error}"
            );
        }
    }
    node.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_service_keeps_answering_while_hostile_clients_attack() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let node =
        Node::start_with(NodeOptions::new(suite_containerd().await?, FRESH_NODE).pod_network())
            .await?;
    let pod = ServingPod::start_component(
        &node,
        "pyhttp",
        Format::Layer,
        "attacked",
        &[
            ("bulwark.dev/concurrency", "4"),
            ("bulwark.dev/timeout", "5s"),
            ("bulwark.dev/metrics", "9090"),
        ],
        &[("app", 8080)],
        Some(PYTHON_LIMIT),
    )
    .await?;
    let address = SocketAddr::new(pod.ip, 8080);
    // The stuck clients are watched for 8 s: past their 5 s deadline and its grace.
    let figures =
        tokio::task::spawn_blocking(move || attack(address, Duration::from_secs(8))).await??;
    eprintln!("Python service, concurrency 4, timeout 5s, through CRI:\n{figures}");
    let AttackFigures {
        slowloris,
        slow_closed,
        after_stuck,
        ..
    } = figures;
    ensure!(
        slowloris.failed == 0 && slowloris.answered > 0 && slowloris.p99 < Duration::from_secs(3),
        "normal clients during slowloris: {slowloris}"
    );
    ensure!(
        slow_closed >= SLOW_CONNECTIONS * 9 / 10,
        "only {slow_closed}/{SLOW_CONNECTIONS} slow connections closed within 60 s"
    );
    ensure!(
        after_stuck.failed == 0 && after_stuck.answered > 0,
        "after the stuck clients' deadline: {after_stuck}"
    );
    let metrics = pod.get(9090, "/metrics").await?.body;
    ensure!(
        metrics.contains("bulwark_connections_total{event=\"response_deadline\"}"),
        "{metrics}"
    );
    pod.remove(&node).await?;
    node.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wasi_0_3_python_service_answers_on_its_pod_ip_and_each_limit_ends_only_its_request()
-> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let node =
        Node::start_with(NodeOptions::new(suite_containerd().await?, FRESH_NODE).pod_network())
            .await?;
    // The first pod of the module on the node: compiled cold.
    node.empty_cache()?;
    let annotations = [
        ("bulwark.dev/timeout", "2s"),
        ("bulwark.dev/fuel", "2000000000"),
        ("bulwark.dev/memory", "96Mi"),
        ("bulwark.dev/metrics", "9090"),
    ];
    let pod = ServingPod::start_component(
        &node,
        "pyhttp-p3",
        Format::Layer,
        "p3",
        &annotations,
        &[("app", 8080)],
        Some(PYTHON_LIMIT),
    )
    .await?;
    let hello = pod.get(8080, "/").await?;
    ensure!(
        (hello.status, hello.body.as_str()) == (200, "hello from python p3\n"),
        "{hello:?}"
    );
    // Suspended in an async host call when its deadline passes: only it ends, and a
    // request beside it answers meanwhile.
    let sleeper = {
        let address = SocketAddr::new(pod.ip, 8080);
        tokio::task::spawn_blocking(move || get(address, "/sleep/60000", REQUEST))
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(pod.get(8080, "/").await?.status == 200);
    sleeper.await??.assert_limit(
        504,
        "timeout",
        "deadline of 2s exceeded (bulwark.dev/timeout)",
    );
    pod.get(8080, "/loop").await?.assert_limit(
        500,
        "fuel",
        "fuel exhausted after 2000000000 units (bulwark.dev/fuel)",
    );
    pod.get(8080, "/grow/200").await?.assert_limit(
        500,
        "memory",
        "memory limit of 96Mi reached (bulwark.dev/memory)",
    );
    let big = pod.get(8080, "/big/8").await?;
    ensure!(
        (big.status, big.body.len()) == (200, 8 << 20),
        "{}",
        big.status
    );
    ensure!(pod.get(8080, "/").await?.status == 200);

    // Every request's log line says what it used; the metrics hold the same.
    let log = pod.stderr(&node, 0).await?;
    for part in [
        "GET /sleep/60000: 504 deadline of 2s exceeded (bulwark.dev/timeout)",
        "GET /loop: 500 fuel exhausted after 2000000000 units (bulwark.dev/fuel)",
        "GET /grow/200: 500 memory limit of 96Mi reached (bulwark.dev/memory)",
        "GET /big/8: 200 wall_ms=",
    ] {
        ensure!(
            log.iter().any(|line| line.starts_with("bulwark: request ")
                && line.contains(part)
                && line.contains(" fuel=")
                && line.contains(" memory_bytes=")),
            "{part}: {log:?}"
        );
    }
    let metrics = pod.get(9090, "/metrics").await?.body;
    for (series, value) in [
        ("bulwark_limits_total{kind=\"timeout\"}", 1),
        ("bulwark_limits_total{kind=\"fuel\"}", 1),
        ("bulwark_limits_total{kind=\"memory\"}", 1),
        ("bulwark_request_fuel_count", 7),
        ("bulwark_request_memory_bytes_count", 7),
    ] {
        ensure!(metric(&metrics, series) == value, "{series}: {metrics}");
    }
    pod.remove(&node).await?;
    node.finish().await
}
