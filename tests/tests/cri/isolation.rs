//! A Wasm pod is isolated as Kubernetes defines a pod, compared with runc pods in the same
//! node: its own network namespace and IP (containerd's CNI), its containers' users and
//! capabilities (Pod Security "restricted"), kubelet's QoS, and preopened volumes that a
//! symlink swap cannot redirect.

use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use bulwark_tests::harness::containerd::CONTAINERD_PID;
use bulwark_tests::harness::cri::{ContainerSpec, PodSpec, SecurityContext};
use bulwark_tests::harness::network::{listen_in, namespace_id, process_namespace};
use bulwark_tests::harness::node::{Format, HANDLER, NODE_CONFIG, Node, NodeOptions, annotated};

use crate::{ONE_CONTAINERD, suite_containerd};

/// The tests' node configuration with network grants and native sidecars allowed.
fn permissive_config() -> String {
    NODE_CONFIG
        .replace("allow_native = false", "allow_native = true")
        .replace("allow_network = false", "allow_network = true")
}

/// A node whose pods may have networks of their own.
async fn networked_node(config: &str) -> Result<Node> {
    Node::start_with(NodeOptions::new(suite_containerd().await?, config).pod_network()).await
}

/// The network namespace file of a pod's sandbox, from the runtime's own spec of it.
async fn sandbox_netns(node: &Node, pod_id: &str) -> Result<PathBuf> {
    let info = node.cri.pod_info(pod_id).await?;
    info["runtimeSpec"]["linux"]["namespaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|ns| ns["type"] == "network")
        .and_then(|ns| ns["path"].as_str())
        .map(PathBuf::from)
        .with_context(|| format!("no network namespace path in the sandbox spec: {info}"))
}

/// The pid containerd holds for a pod's sandbox (the holder for Bulwark, pause for runc).
async fn sandbox_pid(node: &Node, pod_id: &str) -> Result<u32> {
    let info = node.cri.pod_info(pod_id).await?;
    info["pid"]
        .as_u64()
        .map(|pid| pid as u32)
        .with_context(|| format!("no sandbox pid: {info}"))
}

/// Namespace identities of a process, by kind.
fn namespaces_of(pid: u32) -> Result<[u64; 3]> {
    Ok([
        namespace_id(&process_namespace(pid, "net"))?,
        namespace_id(&process_namespace(pid, "ipc"))?,
        namespace_id(&process_namespace(pid, "uts"))?,
    ])
}

/// What a busybox sidecar prints about itself: its namespaces and hostname.
const NAMESPACE_REPORT: &str = "for ns in net ipc uts; do /bin/busybox readlink /proc/self/ns/$ns; done; /bin/busybox hostname; /bin/busybox sleep 30";

/// The first lines of a container's log.
async fn log_lines(node: &Node, id: &str, wanted: usize) -> Result<Vec<String>> {
    for _ in 0..200 {
        let log = node.cri.read_container_log(id).await.unwrap_or_default();
        if log.len() >= wanted {
            return Ok(log.into_iter().map(|line| line.text).collect());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("container {id} did not write {wanted} log lines")
}

/// `[net, ipc, uts]` as `readlink /proc/self/ns/*` prints them, to identities.
fn parse_namespace_lines(lines: &[String]) -> Result<[u64; 3]> {
    let id = |line: &str| -> Result<u64> {
        line.split_once(":[")
            .and_then(|(_, rest)| rest.strip_suffix(']'))
            .and_then(|number| number.parse().ok())
            .with_context(|| format!("not a namespace: {line:?}"))
    };
    Ok([id(&lines[0])?, id(&lines[1])?, id(&lines[2])?])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_network_is_the_pods_own_for_wasm_and_sidecar_as_for_runc() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let node = networked_node(&permissive_config()).await?;
    let sleep = node.push_guest("sleep", Format::Layer)?;
    let busybox = node.images.busybox.clone();
    let host = namespaces_of(std::process::id())?;

    // The same pod twice: on runc, and on Bulwark (a Wasm container and a native sidecar).
    let mut pods = Vec::new();
    for handler in ["", HANDLER] {
        let pod = PodSpec::new(format!(
            "net-{}",
            if handler.is_empty() { "runc" } else { handler }
        ))
        .pod_network()
        .runtime_handler(handler);
        let pod_id = node.cri.run_pod(&pod).await?;
        let sidecar = ContainerSpec::new("sidecar", busybox.clone()).command([
            "/bin/busybox",
            "sh",
            "-c",
            NAMESPACE_REPORT,
        ]);
        let sidecar_id = node.cri.create_container(&pod_id, &pod, &sidecar).await?;
        node.cri.start_container(&sidecar_id).await?;
        let wasm_id = if handler == HANDLER {
            let wasm = ContainerSpec::new("wasm", sleep.clone()).args(["30000"]);
            let id = node.cri.create_container(&pod_id, &pod, &wasm).await?;
            node.cri.start_container(&id).await?;
            Some(id)
        } else {
            None
        };
        pods.push((pod, pod_id, sidecar_id, wasm_id));
    }

    for (pod, pod_id, sidecar_id, wasm_id) in &pods {
        let what = &pod.name;
        let netns = namespace_id(&sandbox_netns(&node, pod_id).await?)?;
        let sandbox = namespaces_of(sandbox_pid(&node, pod_id).await?)?;
        assert_eq!(
            sandbox[0], netns,
            "{what}: the sandbox process is in the pod's netns"
        );
        for (kind, (ours, hosts)) in ["net", "ipc", "uts"].iter().zip(sandbox.iter().zip(host)) {
            assert_ne!(
                *ours, hosts,
                "{what}: the pod's {kind} namespace is the node's"
            );
        }
        let lines = log_lines(&node, sidecar_id, 4).await?;
        assert_eq!(
            parse_namespace_lines(&lines)?,
            sandbox,
            "{what}: the sidecar's namespaces"
        );
        assert_eq!(
            lines[3], pod.name,
            "{what}: the sidecar's hostname is the pod's"
        );
        if let Some(wasm_id) = wasm_id {
            let workload = node.cri.container_pid(wasm_id).await?;
            assert_eq!(
                namespaces_of(workload)?,
                sandbox,
                "{what}: the Wasm workload's namespaces"
            );
        }
        let ip = node.cri.pod_ip(pod_id).await?;
        let network = node.containerd.pod_network().context("no pod network")?;
        let IpAddr::V4(v4) = ip else {
            bail!("{what}: not an IPv4 address: {ip}")
        };
        assert_eq!(
            v4.octets()[..3],
            network.gateway.octets()[..3],
            "{what}: {ip} is not in {}",
            network.subnet
        );
    }
    for (_, pod_id, _, _) in pods {
        node.cri.stop_pod(&pod_id).await?;
        node.cri.remove_pod(&pod_id).await?;
    }
    node.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_granted_guest_connects_from_its_pod_ip() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let node = networked_node(&permissive_config()).await?;

    // A second pod (runc) to connect to: the test listens inside its network namespace.
    let server_pod = PodSpec::new("server").pod_network();
    let pause = node.images.pause.clone();
    node.cri.pull(&pause).await?;
    let server_id = node.cri.run_pod(&server_pod).await?;
    let server_ip = node.cri.pod_ip(&server_id).await?;
    let IpAddr::V4(server_v4) = server_ip else {
        bail!("the server pod has no IPv4 address: {server_ip}")
    };
    let listener = listen_in(
        &sandbox_netns(&node, &server_id).await?,
        SocketAddr::new(server_ip, 7070),
    )?;

    let guest = node.temp().join("connect.wasm");
    std::fs::write(
        &guest,
        bulwark_tests::socket_guest::connect_component(SocketAddrV4::new(server_v4, 7070))?,
    )?;
    let image = node.push_module(&guest, "connect", Format::Layer, None)?;
    let grant = format!("tcp:{server_ip}:7070");
    let client = annotated("client", &[("bulwark.dev/network", &grant)])
        .pod_network()
        .runtime_handler(HANDLER);
    node.cri.pull(&image).await?;
    let client_id = node.cri.run_pod(&client).await?;
    let client_ip = node.cri.pod_ip(&client_id).await?;
    let container = node
        .cri
        .create_container(&client_id, &client, &ContainerSpec::new("connect", image))
        .await?;
    node.cri.start_container(&container).await?;
    let exit = node
        .cri
        .wait_exited(&container, Duration::from_secs(60))
        .await?;
    let log = node.cri.read_container_log(&container).await?;
    assert_eq!(exit.exit_code, 0, "{log:?}");
    listener.set_nonblocking(true)?;
    let (_, peer) = listener
        .accept()
        .context("the granted connection never arrived")?;
    assert_eq!(
        peer.ip(),
        client_ip,
        "the connection comes from the pod's IP"
    );

    for pod_id in [client_id, server_id] {
        node.cri.stop_pod(&pod_id).await?;
        node.cri.remove_pod(&pod_id).await?;
    }
    node.finish().await
}

/// `/proc/PID/status` of a container's process once it is locked down (Seccomp: 2).
async fn locked_down_status(pid: u32) -> Result<String> {
    for _ in 0..400 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        if status
            .lines()
            .any(|l| l.split_whitespace().eq(["Seccomp:", "2"]))
        {
            return Ok(status);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("pid {pid} did not lock itself down")
}

fn status_field<'a>(status: &'a str, name: &str) -> Vec<&'a str> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name}:")))
        .map(|rest| rest.split_whitespace().collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restricted_and_non_root_pods_run_as_their_user_with_nothing_else() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let probes = format!(
        "@kill-{CONTAINERD_PID}:@tgkill-{CONTAINERD_PID}:@kill-1:@socket:@socket-unix:@socket-netlink"
    );
    let node = Node::start_with(
        NodeOptions::new(suite_containerd().await?, NODE_CONFIG)
            .pod_network()
            .env("BULWARK_LOCKDOWN_PROBE", &probes),
    )
    .await?;
    let sleep = node.push_guest("sleep", Format::Layer)?;
    let module = bulwark_tests::build_dir().join("guests/sleep.wasm");
    let non_root_image =
        node.push_module(&module, "sleep-nonroot", Format::Layer, Some("65532:65532"))?;
    let volume = node.temp().join("scratch");
    std::fs::create_dir(&volume)?;
    // An emptyDir is world-writable, as kubelet makes it.
    std::fs::set_permissions(&volume, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;

    // PSS "restricted" with the image's user, and an explicit runAsUser 1000 with groups.
    let restricted = SecurityContext::restricted(None);
    let explicit = SecurityContext {
        run_as_user: Some(1000),
        run_as_group: Some(1000),
        supplemental_groups: vec![3000],
        ..SecurityContext::restricted(Some(1000))
    };
    // containerd lists the primary group among the groups, for runc too.
    let cases = [
        (
            "restricted",
            non_root_image,
            restricted,
            ("65532", "65532", vec!["65532"]),
        ),
        (
            "uid-1000",
            sleep,
            explicit,
            ("1000", "1000", vec!["1000", "3000"]),
        ),
    ];
    let containerd_pid = node.containerd.pid();
    for (name, image, security, (uid, gid, groups)) in cases {
        let pod = annotated(name, &[("bulwark.dev/dirs", "/scratch:rw")])
            .pod_network()
            .runtime_handler(HANDLER);
        node.cri.pull(&image).await?;
        let pod_id = node.cri.run_pod(&pod).await?;
        let container = ContainerSpec::new(name, image)
            .args(["1500"])
            .mount(&volume, "/scratch", false)
            .security(security);
        let id = node.cri.create_container(&pod_id, &pod, &container).await?;
        node.cri.start_container(&id).await?;
        let pid = node.cri.container_pid(&id).await?;
        let status = locked_down_status(pid).await?;
        for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(
                status_field(&status, set),
                ["0000000000000000"],
                "{name} {set}"
            );
        }
        assert_eq!(status_field(&status, "NoNewPrivs"), ["1"], "{name}");
        assert_eq!(status_field(&status, "Uid"), [uid; 4], "{name}");
        assert_eq!(status_field(&status, "Gid"), [gid; 4], "{name}");
        assert_eq!(status_field(&status, "Groups"), groups, "{name}");
        let exit = node.cri.wait_exited(&id, Duration::from_secs(60)).await?;
        let log: Vec<String> = node
            .cri
            .read_container_log(&id)
            .await?
            .into_iter()
            .map(|line| line.text)
            .collect();
        assert_eq!(exit.exit_code, 0, "{name}: {log:?}");
        assert!(
            log.contains(&"slept 1500 ms".to_string()),
            "{name}: {log:?}"
        );
        for probe in [
            format!("@kill-{containerd_pid}"),
            format!("@tgkill-{containerd_pid}"),
            "@kill-1".into(),
            "@socket".into(),
            "@socket-unix".into(),
            "@socket-netlink".into(),
        ] {
            assert!(
                log.iter()
                    .any(|line| line.starts_with(&format!("bulwark: probe: {probe}: denied"))),
                "{name}: {probe} not denied: {log:?}"
            );
        }
        node.cri.remove_container(&id).await?;
        node.cri.stop_pod(&pod_id).await?;
        node.cri.remove_pod(&pod_id).await?;
    }

    // A read-only root filesystem cannot be granted for writing; a volume on it can.
    let hello = node.push_guest("hello", Format::Layer)?;
    let read_only =
        ContainerSpec::new("rofs", hello).security(SecurityContext::restricted(Some(1000)));
    let error = node
        .refused(
            annotated("rofs", &[("bulwark.dev/dirs", "/tmp:rw")]),
            read_only,
        )
        .await?;
    assert!(
        error.contains("bulwark.dev/dirs: /tmp: rw asks to write to the container's root filesystem, which is read-only (readOnlyRootFilesystem: true)"),
        "{error}"
    );
    node.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelets_oom_score_and_rlimits_reach_the_workload_as_runcs_process() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let node = Node::start_with(NodeOptions::new(
        suite_containerd().await?,
        &permissive_config(),
    ))
    .await?;
    let sleep = node.push_guest("sleep", Format::Layer)?;
    let busybox = node.images.busybox.clone();
    node.cri.pull(&sleep).await?;
    // BestEffort (score 1000) and Burstable (a score from the memory limit).
    for memory_limit in [None, Some(256 << 20)] {
        let mut scores = Vec::new();
        for handler in ["", HANDLER] {
            let pod = PodSpec::new("qos").runtime_handler(handler);
            let pod_id = node.cri.run_pod(&pod).await?;
            let image = if handler.is_empty() {
                busybox.clone()
            } else {
                sleep.clone()
            };
            let mut container = ContainerSpec::new("qos", image);
            container = if handler.is_empty() {
                container.command(["/bin/busybox", "sleep", "30"])
            } else {
                container.args(["30000"])
            };
            if let Some(limit) = memory_limit {
                container = container.memory_limit(limit);
            }
            let id = node.cri.create_container(&pod_id, &pod, &container).await?;
            node.cri.start_container(&id).await?;
            let pid = node.cri.container_pid(&id).await?;
            let sandbox = sandbox_pid(&node, &pod_id).await?;
            let read =
                |pid: u32, file: &str| std::fs::read_to_string(format!("/proc/{pid}/{file}"));
            let open_files = read(pid, "limits")?
                .lines()
                .find(|line| line.starts_with("Max open files"))
                .map(str::to_owned)
                .context("no open-files limit")?;
            scores.push((
                read(pid, "oom_score_adj")?.trim().to_owned(),
                read(sandbox, "oom_score_adj")?.trim().to_owned(),
                open_files,
            ));
            node.cri.stop_pod(&pod_id).await?;
            node.cri.remove_pod(&pod_id).await?;
        }
        assert_eq!(
            scores[0], scores[1],
            "runc, then Bulwark (memory limit {memory_limit:?})"
        );
        let expected = if memory_limit.is_none() {
            "1000"
        } else {
            scores[0].0.as_str()
        };
        assert_eq!(scores[1].0, expected);
    }
    node.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_swapped_into_a_shared_volume_never_leads_a_guest_outside() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let node = Node::start(suite_containerd().await?, NODE_CONFIG).await?;
    let fileio = node.push_guest("fileio", Format::Layer)?;
    // The shared volume: `sub` is a directory with a harmless `passwd`, which another
    // container of the pod keeps swapping for a relative symlink up to the node's /etc.
    let volume = node.temp().join("shared");
    let real = volume.join("real");
    let link = volume.join("link");
    let sub = volume.join("sub");
    std::fs::create_dir_all(&real)?;
    std::fs::write(real.join("passwd"), "inside the volume\n")?;
    let up = "../".repeat(Path::new(&volume).components().count() + 2) + "etc";
    std::os::unix::fs::symlink(&up, &link)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let stop = stop.clone();
        let (real, link, sub) = (real.clone(), link.clone(), sub.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = std::fs::rename(&real, &sub);
                std::thread::sleep(Duration::from_micros(300));
                let _ = std::fs::rename(&sub, &real);
                let _ = std::fs::rename(&link, &sub);
                std::thread::sleep(Duration::from_micros(300));
                let _ = std::fs::rename(&sub, &link);
            }
        })
    };
    let reader = ContainerSpec::new("reader", fileio)
        .args(["read", "/shared/sub/passwd"])
        .mount(&volume, "/shared", false);
    let mut outcomes = (0, 0);
    for round in 0..12 {
        let pod = annotated(
            &format!("swap-{round}"),
            &[("bulwark.dev/dirs", "/shared/sub")],
        );
        match node.run(pod, reader.clone()).await {
            Ok(done) => {
                ensure!(
                    !done.stdout.contains("root:"),
                    "round {round}: the guest read the node's /etc/passwd: {}",
                    done.stdout
                );
                outcomes.0 += 1;
            }
            // Refused at Create: the directory was a symlink leading nowhere inside.
            Err(error) => {
                let error = format!("{error:#}");
                ensure!(
                    error.contains("bulwark.dev/dirs: /shared/sub"),
                    "round {round}: {error}"
                );
                outcomes.1 += 1;
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    swapper.join().expect("the swapper thread");
    eprintln!("symlink swap: {} runs, {} refused", outcomes.0, outcomes.1);
    node.finish().await
}
