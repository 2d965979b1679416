//! Images whose entrypoint is not what it claims: a FIFO (which a plain open would wait on
//! forever), a character device (which an open as root would reach), a symbolic link, a
//! directory. Each is refused at once, naming what it is, and the pod's shim goes on
//! serving the pod.

use std::time::Duration;

use anyhow::{Result, ensure};
use bulwark_runtime::image::{EntryKind, LayerEntry};
use bulwark_tests::harness::cri::{ContainerSpec, PodSpec};
use bulwark_tests::harness::node::{Format, HANDLER, NODE_CONFIG, Node};

use crate::{ONE_CONTAINERD, suite_containerd};

/// Far longer than a refusal takes; a shim that waits on a FIFO never answers.
const REFUSAL: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entrypoints_that_are_not_files_are_refused_at_once_and_the_shim_serves_on() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let node = Node::start(suite_containerd().await?, NODE_CONFIG).await?;
    let hello = node.push_guest("hello", Format::Layer)?;
    let pod = PodSpec::new("hostile").runtime_handler(HANDLER);
    node.cri.pull(&node.images.pause).await?;
    let pod_id = node.cri.run_pod(&pod).await?;
    let cases = [
        (
            "fifo",
            LayerEntry::node("/app.wasm", EntryKind::Fifo),
            "is a FIFO",
        ),
        (
            "device",
            LayerEntry::node("/app.wasm", EntryKind::CharDevice { major: 1, minor: 3 }),
            "is a character device",
        ),
        (
            "symlink",
            LayerEntry::symlink("/app.wasm", "/real.wasm"),
            "is a symbolic link",
        ),
        (
            "directory",
            LayerEntry::dir("/app.wasm", 0o755),
            "is a directory",
        ),
    ];
    for (name, entry, what) in cases {
        let real = LayerEntry::file("/real.wasm", std::fs::read(node_guest("hello"))?, 0o644);
        let image = node.push_entries(&format!("hostile-{name}"), &[entry, real], "/app.wasm")?;
        node.cri.pull(&image).await?;
        let id = node
            .cri
            .create_container(&pod_id, &pod, &ContainerSpec::new(name, image))
            .await?;
        let started = tokio::time::timeout(REFUSAL, node.cri.start_container(&id)).await;
        let error = match started {
            Err(_) => anyhow::bail!("{name}: StartContainer still waits after {REFUSAL:?}"),
            Ok(Ok(())) => anyhow::bail!("{name}: the container started"),
            Ok(Err(error)) => format!("{error:#}"),
        };
        ensure!(
            error.contains(&format!("entrypoint /app.wasm {what}")),
            "{name}: {error}"
        );
        node.cri.remove_container(&id).await?;
    }
    // The same shim runs the pod's next container.
    let id = node
        .cri
        .create_container(&pod_id, &pod, &ContainerSpec::new("hello", hello))
        .await?;
    node.cri.start_container(&id).await?;
    let finished = node.finished(&id, REFUSAL).await?;
    ensure!(
        finished.stdout == "hello from bulwark\n",
        "{}",
        finished.stderr
    );
    node.cri.remove_container(&id).await?;
    node.cri.stop_pod(&pod_id).await?;
    node.cri.remove_pod(&pod_id).await?;
    node.finish().await
}

fn node_guest(name: &str) -> std::path::PathBuf {
    bulwark_tests::build_dir().join(format!("guests/{name}.wasm"))
}
