//! Modules that are big in bytes or in functions, and containers too small for what runs
//! in them: a 100 MiB module runs without any shim holding it in memory; one with a
//! million functions, too costly to compile within the node's bound on one compilation, is
//! refused naming that bound and the module's size; one past Wasm's limit of a million
//! functions is refused by name; a workload that outgrows its container's limit ends
//! `OOMKilled` as a runc container over its limit does, its shim untouched.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use bulwark_tests::harness::cgroups::PodCgroups;
use bulwark_tests::harness::containerd;
use bulwark_tests::harness::cri::{ContainerSpec, PodSpec};
use bulwark_tests::harness::mounts::Tmpfs;
use bulwark_tests::harness::node::{Format, HANDLER, NODE_CONFIG, Node};

use crate::{ONE_CONTAINERD, suite_containerd};
use bulwark_tests::harness::process::is_alive;

/// The padding that makes a module big: a custom section, which Wasmtime skips.
const PADDING: usize = 100 << 20;
/// wasmparser's (and so Wasmtime's) limit on the functions of one module.
const MAX_FUNCTIONS: u32 = 1_000_000;
/// The node's bound on one compilation in the million-function test (`[compile] memory`):
/// compiling a million functions takes gigabytes.
const COMPILE_MEMORY: &str = "512Mi";
/// The container limit of the OOM test: less than the volume its guest fills.
const OOM_LIMIT: i64 = 16 << 20;

fn leb128(mut value: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn section(id: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.push(id);
    leb128(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

/// `module` with a custom section of `padding` zero bytes appended.
fn padded(module: &[u8], padding: usize) -> Vec<u8> {
    let mut payload = Vec::with_capacity(padding + 16);
    leb128(7, &mut payload);
    payload.extend_from_slice(b"padding");
    payload.resize(payload.len() + padding, 0);
    let mut out = module.to_vec();
    section(0, &payload, &mut out);
    out
}

/// A module of `count` empty functions, the first exported as `_start`.
fn functions(count: u32) -> Vec<u8> {
    let mut out = b"\0asm\x01\0\0\0".to_vec();
    section(1, &[1, 0x60, 0, 0], &mut out);
    let mut declared = Vec::new();
    leb128(count.into(), &mut declared);
    declared.resize(declared.len() + count as usize, 0);
    section(3, &declared, &mut out);
    let mut exports = vec![1, 6];
    exports.extend_from_slice(b"_start");
    exports.extend_from_slice(&[0, 0]);
    section(7, &exports, &mut out);
    let mut code = Vec::new();
    leb128(count.into(), &mut code);
    for _ in 0..count {
        // Two bytes: no locals, `end`.
        code.extend_from_slice(&[2, 0, 0x0b]);
    }
    section(10, &code, &mut out);
    out
}

/// The peak resident memory of a process, in bytes (`VmHWM`).
fn peak_rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM")?;
    Ok(kib << 10)
}

fn write(node: &Node, name: &str, bytes: &[u8]) -> Result<std::path::PathBuf> {
    let path = node.temp().join(name);
    std::fs::write(&path, bytes)?;
    Ok(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_module_runs_and_no_shim_holds_it_in_memory() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    // OCI Wasm artifacts need containerd >= 1.7.7.
    let binary = tokio::task::spawn_blocking(|| containerd::fetch("1.7.24")).await??;
    let node = Node::start(binary, NODE_CONFIG).await?;
    let hello = std::fs::read(bulwark_tests::build_dir().join("guests/hello.wasm"))?;
    let module = write(&node, "padded.wasm", &padded(&hello, PADDING))?;
    for format in [Format::Layer, Format::Artifact] {
        let repo = format!("padded-{}", format!("{format:?}").to_lowercase());
        let image = node.push_module(&module, &repo, format, None)?;
        node.cri.pull(&image).await?;
        let pod = PodSpec::new(&repo).runtime_handler(HANDLER);
        let pod_id = node.cri.run_pod(&pod).await?;
        let container = ContainerSpec::new("padded", image).command(["/app.wasm"]);
        let id = node.cri.create_container(&pod_id, &pod, &container).await?;
        node.cri.start_container(&id).await?;
        let done = node.finished(&id, Duration::from_secs(120)).await?;
        ensure!(
            (done.exit.exit_code, done.stdout.as_str()) == (0, "hello from bulwark\n"),
            "{format:?}: exit {}: {}{}",
            done.exit.exit_code,
            done.stdout,
            done.stderr
        );
        // The pod's shim is still there (its pod is): it fetched the artifact's layer and
        // handed the module on without ever holding it.
        let shims = node.containerd.shim_pids();
        ensure!(shims.len() == 1, "{format:?}: one shim, not {shims:?}");
        let peak = peak_rss(shims[0])?;
        ensure!(
            // Half the module: the shim's own peak (with the egress filter's loading, a
            // transient ~19 MiB) stays far below anything that held the module.
            peak < (PADDING / 2) as u64,
            "{format:?}: the shim's peak RSS is {} MiB, against a {} MiB module",
            peak >> 20,
            PADDING >> 20
        );
        node.cri.remove_container(&id).await?;
        crate::faults::remove_pod(&node, &pod_id).await?;
    }
    node.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_too_costly_to_compile_is_refused_naming_the_nodes_bound() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    // Compiling a million functions takes gigabytes: far more than this node lets one
    // compilation have.
    let config = format!("{NODE_CONFIG}\n[compile]\nmemory = \"{COMPILE_MEMORY}\"\n");
    let node = Node::start(suite_containerd().await?, &config).await?;

    // Past the limit: refused by the compile step's parser, the limit named.
    let too_many = write(&node, "too-many.wasm", &functions(MAX_FUNCTIONS + 1))?;
    let image = node.push_module(&too_many, "too-many-functions", Format::Layer, None)?;
    let error = node
        .refused(
            PodSpec::new("too-many-functions"),
            ContainerSpec::new("too-many", image).command(["/app.wasm"]),
        )
        .await?;
    ensure!(
        error.contains("/app.wasm: invalid WebAssembly")
            && error.contains("functions count exceeds limit of 1000000"),
        "{error}"
    );

    // At the limit: valid, and compiling it outgrows the node's bound for one compilation.
    // The container is refused with the bound, where it is set and the module's size; the
    // compile step's cgroup goes, and the node carries on.
    let million = write(&node, "million.wasm", &functions(MAX_FUNCTIONS))?;
    let size = std::fs::metadata(&million)?.len();
    let image = node.push_module(&million, "million-functions", Format::Layer, None)?;
    let error = node
        .refused(
            PodSpec::new("million-functions"),
            ContainerSpec::new("million", image)
                .command(["/app.wasm"])
                .memory_limit(64 << 20),
        )
        .await?;
    let expected = format!(
        "compiling /app.wasm ({:.1}Mi) needed more than the {COMPILE_MEMORY} one compilation may use on this node (compile.memory in the node configuration)",
        size as f64 / f64::from(1 << 20)
    );
    ensure!(error.contains(&expected), "{error}\nexpected: {expected}");
    let hello = node.push_guest("hello", Format::Layer)?;
    let done = node
        .run(PodSpec::new("after"), ContainerSpec::new("hello", hello))
        .await?;
    ensure!(done.stdout == "hello from bulwark\n", "{}", done.stderr);
    node.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_that_outgrows_its_container_ends_oomkilled_as_in_runc() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let node = Node::start(suite_containerd().await?, NODE_CONFIG).await?;
    // A guest that fills a memory-backed volume (an emptyDir with medium Memory) past its
    // container's limit: those pages are the container's and cannot be reclaimed, so the
    // kernel kills the workload in its cgroup; kubelet hears OOMKilled, as for the runc
    // container over the same limit.
    let volume_dir = tempfile::tempdir()?;
    let volume = volume_dir.path().to_owned();
    let _mounted = Tmpfs::mount(&volume, "size=64m")?;
    let fileio = node.push_guest("fileio", Format::Layer)?;
    node.cri.pull(&fileio).await?;
    let pod = PodSpec::new("oom")
        .runtime_handler(HANDLER)
        .annotation("bulwark.dev/dirs", "/cache:rw");
    let pod_id = node.cri.run_pod(&pod).await?;
    let container = ContainerSpec::new("filler", fileio)
        .args(["fill", "/cache/fill", "32"])
        .mount(&volume, "/cache", false)
        .memory_limit(OOM_LIMIT);
    let id = node.cri.create_container(&pod_id, &pod, &container).await?;
    let shims = node.containerd.shim_pids();
    ensure!(shims.len() == 1, "one shim, not {shims:?}");
    node.cri.start_container(&id).await?;
    let wasm = node.cri.wait_exited(&id, Duration::from_secs(120)).await?;

    let busybox = node.images.busybox.clone();
    node.cri.pull(&busybox).await?;
    let runc_pod = PodSpec::new("runc-oom");
    let runc_pod_id = node.cri.run_pod(&runc_pod).await?;
    // dd's buffer is as big as its block: filling it outgrows the limit.
    let hog = ContainerSpec::new("hog", busybox)
        .command([
            "/bin/busybox",
            "dd",
            "if=/dev/zero",
            "of=/dev/null",
            "bs=128M",
            "count=1",
        ])
        .memory_limit(OOM_LIMIT);
    let runc_id = node
        .cri
        .create_container(&runc_pod_id, &runc_pod, &hog)
        .await?;
    node.cri.start_container(&runc_id).await?;
    let runc = node
        .cri
        .wait_exited(&runc_id, Duration::from_secs(60))
        .await?;
    ensure!(
        (wasm.exit_code, wasm.reason.as_str()) == (137, "OOMKilled"),
        "bulwark: exit {} reason {:?} ({})",
        wasm.exit_code,
        wasm.reason,
        wasm.message
    );
    // With the systemd driver runc's shim often misses the kill: systemd removes the
    // scope's cgroup, and its memory.events, before the shim reads it
    // (opencontainers/runc#5071; containerd skips its own OOMKilled test there). Bulwark
    // reads the pod slice's count then; runc's reason is held to it only where it is sure.
    let runc_sure = !matches!(node.containerd.pod_cgroups(), PodCgroups::Systemd);
    ensure!(
        runc.exit_code == 137 && (runc.reason == "OOMKilled" || !runc_sure),
        "runc: exit {} reason {:?} ({})",
        runc.exit_code,
        runc.reason,
        runc.message
    );
    // The shim lived through it and still serves its pod.
    ensure!(
        is_alive(shims[0]),
        "the shim {} died with its workload",
        shims[0]
    );
    node.cri.container_status(&id).await?;
    for (pod_id, container) in [(&pod_id, &id), (&runc_pod_id, &runc_id)] {
        node.cri.remove_container(container).await?;
        crate::faults::remove_pod(&node, pod_id).await?;
    }
    node.finish().await
}
