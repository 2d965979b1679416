//! What a node's own state does to Bulwark pods: the module cache full or its entries
//! truncated while pods start, the node configuration replaced with garbage, the registry
//! gone during a pull. None of it depends on the cgroup driver, so the VM runs skip these.

use std::time::Duration;

use anyhow::{Result, bail, ensure};
use bulwark_tests::harness::cri::{ContainerSpec, ContainerState, PodSpec};
use bulwark_tests::harness::mounts::Tmpfs;
use bulwark_tests::harness::node::{Format, HANDLER, NODE_CONFIG, Node};
use bulwark_tests::harness::process::signal;

use crate::faults::{gone, remove_pod, sleeping_pod};
use crate::{ONE_CONTAINERD, suite_containerd};

/// Runs the hello guest in `pods` pods at once; fails unless each said hello and exited 0.
/// Returns what they wrote to stderr.
async fn hellos(node: &Node, name: &str, pods: usize) -> Result<Vec<String>> {
    let hello = node.push_guest("hello", Format::Layer)?;
    let runs = (0..pods).map(|i| {
        let hello = hello.clone();
        async move {
            node.run(
                PodSpec::new(format!("{name}-{i}")),
                ContainerSpec::new("hello", hello),
            )
            .await
        }
    });
    let mut stderr = Vec::new();
    for done in futures::future::join_all(runs).await {
        let done = done?;
        ensure!(
            (done.exit.exit_code, done.stdout.as_str()) == (0, "hello from bulwark\n"),
            "exit {}: {}{}",
            done.exit.exit_code,
            done.stdout,
            done.stderr
        );
        stderr.push(done.stderr);
    }
    Ok(stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_module_cache_still_runs_pods_compiled_in_memory() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let node = Node::start(suite_containerd().await?, NODE_CONFIG).await?;
    // The cache on a small filesystem that is full before the first pod: the key fits,
    // no compiled module does.
    let cache = node.cache_dir();
    std::fs::create_dir_all(&cache)?;
    let mounted = Tmpfs::mount(&cache, "size=256k,mode=0700")?;
    let filler = std::fs::File::create(cache.join("filler"))?;
    let chunk = vec![0u8; 4096];
    let mut writer = std::io::BufWriter::new(filler);
    while std::io::Write::write_all(&mut writer, &chunk).is_ok() {}
    let _ = std::io::Write::flush(&mut writer);
    // Closed now: an open file keeps the filesystem busy, and it could not be unmounted.
    drop(writer);

    for stderr in hellos(&node, "full-cache", 3).await? {
        let warnings: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("bulwark: warn"))
            .collect();
        ensure!(
            warnings.len() == 1 && warnings[0].contains("No space left on device"),
            "one warning that the cache is full, not {warnings:?}"
        );
    }
    drop(mounted);
    node.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_entries_truncated_while_pods_start_are_recompiled_never_loaded() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let node = Node::start(suite_containerd().await?, NODE_CONFIG).await?;
    hellos(&node, "warm", 1).await?;
    let entries = |dir: &std::path::Path| -> Vec<std::path::PathBuf> {
        let mut found = Vec::new();
        for fingerprint in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            for entry in std::fs::read_dir(fingerprint.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "artifact") {
                    found.push(path);
                }
            }
        }
        found
    };
    let cache = node.cache_dir();
    ensure!(
        !entries(&cache).is_empty(),
        "the first pod left no cache entry in {}",
        cache.display()
    );

    // Replace every entry by a truncated copy of a random-ish length, over and over, while
    // ten pods start: damage that appears in the cache between a pod's looks. (A file is
    // never changed in place in the cache: Bulwark only renames new ones over old ones,
    // and a loader maps the very file it verified.)
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let truncator = {
        let (stop, cache) = (stop.clone(), cache.clone());
        std::thread::spawn(move || {
            let mut cuts = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for path in entries(&cache) {
                    let damaged = path.with_extension("damaged");
                    if let Ok(bytes) = std::fs::read(&path) {
                        let keep = bytes.len() * (cuts as usize % 7 + 1) / 8;
                        if std::fs::write(&damaged, &bytes[..keep]).is_ok()
                            && std::fs::rename(&damaged, &path).is_ok()
                        {
                            cuts += 1;
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(3));
            }
            cuts
        })
    };
    let result = hellos(&node, "truncated", 10).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let cuts = truncator.join().expect("the truncating thread");
    result?;
    ensure!(cuts > 0, "nothing was truncated");
    node.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_the_node_config_refuses_new_pods_and_spares_running_ones() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let node = Node::start(suite_containerd().await?, NODE_CONFIG).await?;
    let (_, pod_id, running) = sleeping_pod(&node, "before", 60_000).await?;
    let config = node.temp().join("config.toml");
    std::fs::write(&config, "[ceilings\nmemory = \"64Mi\"\n")?;

    // The new pod's sandbox is the first to read it: RunPodSandbox is refused, as kubelet
    // would show in the pod's events.
    let pod = PodSpec::new("after").runtime_handler(HANDLER);
    let refused = match node.cri.run_pod(&pod).await {
        Ok(id) => bail!("pod sandbox {id} started with a garbage node configuration"),
        Err(error) => format!("{error:#}"),
    };
    ensure!(
        refused.contains(&config.display().to_string()) && refused.contains("(line "),
        "the refusal names neither the file nor the place: {refused}"
    );
    let status = node.cri.container_status(&running).await?;
    ensure!(
        status.state == ContainerState::ContainerRunning as i32,
        "the running pod did not carry on: {status:?}"
    );

    std::fs::write(&config, NODE_CONFIG)?;
    hellos(&node, "repaired", 1).await?;
    node.cri
        .stop_container(&running, Duration::from_secs(5))
        .await?;
    node.cri.remove_container(&running).await?;
    remove_pod(&node, &pod_id).await?;
    node.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_from_a_registry_that_is_gone_names_it() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let node = Node::start(suite_containerd().await?, NODE_CONFIG).await?;
    let image = node.push_guest("hello", Format::Layer)?;
    let registry = node.registry.addr();
    signal(node.registry.pid(), libc::SIGKILL);
    ensure!(
        gone(node.registry.pid(), Duration::from_secs(5)).await,
        "the registry outlived SIGKILL"
    );
    let error = match node.cri.pull(&image).await {
        Ok(_) => bail!("{image} was pulled from a registry that is gone"),
        Err(error) => format!("{error:#}"),
    };
    ensure!(
        error.contains(&registry),
        "the pull error does not name {registry}: {error}"
    );
    node.finish().await
}
