//! `make demo`: a private containerd (Debian's 1.6.20) with the `bulwark` runtime and a
//! pod network, driven through CRI the way kubelet drives it. Runs example pods with
//! annotations, prints their logs, shows each limit firing with its reason, and serves a
//! wasi:http component on its pod IP. Needs root; leaves nothing behind.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use bulwark_tests::harness::containerd::SYSTEM_CONTAINERD;
use bulwark_tests::harness::cri::{ContainerSpec, SecurityContext};
use bulwark_tests::harness::node::{Format, HANDLER, NODE_CONFIG, Node, NodeOptions, annotated};
use bulwark_tests::http::{get, wait_listening};

fn heading(text: &str) {
    println!("\n\x1b[1m{text}\x1b[0m");
}

fn show(finished: &bulwark_tests::harness::node::Finished) {
    for line in finished.stdout.lines() {
        println!("  stdout | {line}");
    }
    for line in finished.stderr.lines() {
        println!("  stderr | {line}");
    }
    println!(
        "  exit code {} ({}){}",
        finished.exit.exit_code,
        finished.exit.reason,
        if finished.exit.termination_message.is_empty() {
            String::new()
        } else {
            format!(
                ", termination message: {}",
                finished.exit.termination_message.trim()
            )
        }
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    println!(
        "Starting a private containerd 1.6 with the bulwark runtime handler and a local registry..."
    );
    let node = Node::start_with(
        NodeOptions::new(PathBuf::from(SYSTEM_CONTAINERD), NODE_CONFIG).pod_network(),
    )
    .await?;
    println!("Node configuration (/etc/bulwark/config.toml on a real node):{NODE_CONFIG}");
    let hello = node.push_guest("hello", Format::Layer)?;
    let echo = node.push_guest("echo", Format::Layer)?;
    let looping = node.push_guest("loop", Format::Layer)?;
    let membomb = node.push_guest("membomb", Format::Layer)?;
    let passwd = node.push_guest("passwd", Format::Layer)?;

    heading("Pod hello (runtimeClassName: bulwark)");
    show(
        &node
            .run(
                annotated("hello", &[]),
                ContainerSpec::new("hello", hello.clone()),
            )
            .await?,
    );

    heading("Pod echo: args and env, with bulwark.dev/env: GREETING (SECRET is filtered out)");
    let container = ContainerSpec::new("echo", echo)
        .args(["one", "two"])
        .env("GREETING", "hi")
        .env("SECRET", "do-not-pass");
    show(
        &node
            .run(
                annotated("echo", &[("bulwark.dev/env", "GREETING")]),
                container,
            )
            .await?,
    );

    heading("Pod passwd: the guest tries to read /etc/passwd (nothing granted)");
    show(
        &node
            .run(
                annotated("passwd", &[]),
                ContainerSpec::new("passwd", passwd),
            )
            .await?,
    );

    heading("Pod with bulwark.dev/fuel: 5000000, running an infinite loop");
    show(
        &node
            .run(
                annotated("fuel", &[("bulwark.dev/fuel", "5000000")]),
                ContainerSpec::new("loop", looping.clone()),
            )
            .await?,
    );

    heading("Pod with bulwark.dev/timeout: 500ms, running an infinite loop");
    show(
        &node
            .run(
                annotated("timeout", &[("bulwark.dev/timeout", "500ms")]),
                ContainerSpec::new("loop", looping),
            )
            .await?,
    );

    heading("Pod with bulwark.dev/memory: 16Mi, running a memory bomb");
    show(
        &node
            .run(
                annotated("memory", &[("bulwark.dev/memory", "16Mi")]),
                ContainerSpec::new("bomb", membomb),
            )
            .await?,
    );

    heading("Pod asking for bulwark.dev/memory: 2Gi, above the node's ceiling of 256Mi");
    let error = node
        .refused(
            annotated("greedy", &[("bulwark.dev/memory", "2Gi")]),
            ContainerSpec::new("hello", hello),
        )
        .await?;
    let shown = error
        .split("message: \"")
        .nth(1)
        .map_or(error.as_str(), |rest| rest.trim_end_matches('"'));
    println!("  StartContainer refused (what kubectl describe pod shows):\n  {shown}");

    serve(&node).await?;

    node.finish().await?;
    println!("\nDone: every pod removed, containerd stopped, nothing left behind.");
    Ok(())
}

/// A wasi:http component as a service: a pod on the pod network, as uid 65532 under Pod
/// Security "restricted", answering on its pod IP; a request that a limit ends gets its
/// status and reason, and the server answers the next one.
async fn serve(node: &Node) -> Result<()> {
    heading(
        "Serving pod: the httpd component, bulwark.dev/timeout: 1s, bulwark.dev/memory: 16Mi, on its own pod IP",
    );
    let image = node.push_component("httpd", Format::Layer)?;
    node.cri.pull(&image).await?;
    let pod = annotated(
        "web",
        &[
            ("bulwark.dev/timeout", "1s"),
            ("bulwark.dev/memory", "16Mi"),
        ],
    )
    .pod_network()
    .runtime_handler(HANDLER);
    let pod_id = node.cri.run_pod(&pod).await?;
    let container = ContainerSpec::new("web", image)
        .security(SecurityContext::restricted(Some(65532)))
        .memory_limit(128 << 20);
    let id = node.cri.create_container(&pod_id, &pod, &container).await?;
    node.cri.start_container(&id).await?;
    let address = SocketAddr::new(node.cri.pod_ip(&pod_id).await?, 8080);
    tokio::task::spawn_blocking(move || wait_listening(address, Duration::from_secs(30))).await??;
    for path in ["/", "/loop", "/grow", "/"] {
        let response =
            tokio::task::spawn_blocking(move || get(address, path, Duration::from_secs(30)))
                .await??;
        let limit = response
            .header("bulwark-limit")
            .map_or(String::new(), |kind| format!(", bulwark-limit: {kind}"));
        println!(
            "  GET http://{address}{path} -> {}{limit}: {}",
            response.status,
            response.body.trim_end()
        );
    }
    let log = node.cri.read_container_log(&id).await?;
    for line in log {
        println!("  log    | {}", line.text);
    }
    node.cri.tear_down(&pod_id, &[&id]).await?;
    Ok(())
}
