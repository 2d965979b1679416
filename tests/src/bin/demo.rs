//! `make demo`: a private containerd (Debian's 1.6.20) with the `bulwark` runtime, driven
//! through CRI the way kubelet drives it. Runs example pods with annotations, prints their
//! logs, and shows each limit firing with its reason. Needs root; leaves nothing behind.

use std::path::PathBuf;

use anyhow::Result;
use bulwark_tests::harness::containerd::SYSTEM_CONTAINERD;
use bulwark_tests::harness::cri::ContainerSpec;
use bulwark_tests::harness::node::{Format, NODE_CONFIG, Node, annotated};

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
    let node = Node::start(PathBuf::from(SYSTEM_CONTAINERD), NODE_CONFIG).await?;
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

    node.finish().await?;
    println!("\nDone: every pod removed, containerd stopped, nothing left behind.");
    Ok(())
}
