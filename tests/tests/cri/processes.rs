//! What each process of a Wasm pod may do, seen from outside while the pod starts: no
//! process that handles the module's bytes (the compile step, the workload) or holds the
//! pod (the holder) keeps a capability or runs without seccomp, even while a module that
//! takes seconds to compile is compiled; and every workload process has addresses of its
//! own.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use bulwark_tests::harness::cri::{ContainerSpec, PodSpec, SecurityContext};
use bulwark_tests::harness::node::{Format, HANDLER, NODE_CONFIG, Node, NodeOptions};
use bulwark_tests::harness::process::{arguments, descendants};

use crate::faults::{remove_pod, sleeping_pod};
use crate::{ONE_CONTAINERD, suite_containerd};

/// One look at a process of the pod.
#[derive(Debug, Clone)]
struct Seen {
    role: String,
    uid: String,
    cap_eff: String,
    cap_prm: String,
    cap_bnd: String,
    seccomp: String,
    no_new_privs: String,
}

impl Seen {
    /// The process `pid`, if it is still there and has exec'd one of Bulwark's binaries.
    fn of(pid: u32) -> Option<Seen> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(&format!("{name}:")))
                .map(|value| value.split_whitespace().next().unwrap_or("").to_owned())
                .unwrap_or_default()
        };
        let args = arguments(pid);
        let role = match args.first().map(String::as_str) {
            Some("bulwark-compile") => "compile step",
            Some("bulwark-workload") => "workload",
            Some("bulwark-holder") => "holder",
            _ => return None,
        };
        Some(Seen {
            role: role.to_owned(),
            uid: field("Uid"),
            cap_eff: field("CapEff"),
            cap_prm: field("CapPrm"),
            cap_bnd: field("CapBnd"),
            seccomp: field("Seccomp"),
            no_new_privs: field("NoNewPrivs"),
        })
    }

    /// Locked down: no capability in any set, seccomp filtering, no new privileges.
    fn locked_down(&self) -> bool {
        let none = "0000000000000000";
        [&self.cap_eff, &self.cap_prm, &self.cap_bnd]
            .iter()
            .all(|set| set.as_str() == none)
            && self.seccomp == "2"
            && self.no_new_privs == "1"
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_process_handling_a_module_holds_a_capability_or_runs_without_seccomp() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let node = Node::start_with(NodeOptions::new(suite_containerd().await?, NODE_CONFIG)).await?;
    node.empty_cache()?;
    // CPython in a component takes seconds to compile: the compile step is long enough
    // to be watched, and the holder is there all along.
    let image = node.push_component("pyhttp", Format::Layer)?;
    node.cri.pull(&image).await?;
    let pod = PodSpec::new("watched").runtime_handler(HANDLER);
    let pod_id = node.cri.run_pod(&pod).await?;
    let container = ContainerSpec::new("app", image)
        .security(SecurityContext::restricted(Some(65532)))
        .memory_limit(512 << 20);
    let id = node.cri.create_container(&pod_id, &pod, &container).await?;
    let starting = {
        let cri = node.cri.clone();
        let id = id.clone();
        tokio::spawn(async move { cri.start_container(&id).await })
    };
    // Every process below the pod's shim, every few milliseconds until it started.
    let mut seen: BTreeMap<u32, Vec<Seen>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !starting.is_finished() && Instant::now() < deadline {
        for shim in node.containerd.shim_pids() {
            for pid in descendants(shim) {
                if let Some(process) = Seen::of(pid) {
                    seen.entry(pid).or_default().push(process);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    starting.await?.context("the container did not start")?;
    let roles = |role: &str| {
        seen.values()
            .flatten()
            .filter(|process| process.role == role)
            .count()
    };
    ensure!(
        roles("compile step") > 10,
        "the compile step was hardly seen: {seen:?}"
    );
    ensure!(roles("holder") > 0, "the holder was not seen: {seen:?}");
    // The compile step and the holder from the first look on. (The workload, between its
    // load and Start, is root with its capabilities: it has mapped an artifact Bulwark
    // wrote and touched no byte of the guest's. It locks down before the guest runs.)
    for (pid, looks) in &seen {
        for look in looks {
            if look.role == "workload" {
                continue;
            }
            ensure!(
                look.locked_down(),
                "{} {pid} is not locked down: {look:?}",
                look.role
            );
            ensure!(
                look.uid != "0",
                "{} {pid} runs as root: {look:?}",
                look.role
            );
        }
    }
    let mut workload = None;
    for _ in 0..600 {
        workload = node
            .containerd
            .shim_pids()
            .into_iter()
            .flat_map(descendants)
            .filter_map(Seen::of)
            .find(|process| process.role == "workload" && process.seccomp == "2");
        if workload.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let workload = workload.context("the workload never locked itself down")?;
    ensure!(
        workload.locked_down() && workload.uid == "65532",
        "the running workload: {workload:?}"
    );
    remove_pod(&node, &pod_id).await?;
    node.finish().await
}
/// The base address of the first mapping of `pid`'s own binary.
fn binary_base(pid: u32) -> Result<u64> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let line = maps
        .lines()
        .find(|line| line.ends_with(&*exe.to_string_lossy()))
        .with_context(|| format!("{} is not mapped in {pid}", exe.display()))?;
    let start = line.split('-').next().context("a maps line")?;
    Ok(u64::from_str_radix(start, 16)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_workload_process_has_addresses_of_its_own() -> Result<()> {
    let _one = ONE_CONTAINERD.lock().await;
    let node = Node::start(suite_containerd().await?, NODE_CONFIG).await?;
    let (_, first_pod, _) = sleeping_pod(&node, "first", 60_000).await?;
    let (_, second_pod, _) = sleeping_pod(&node, "second", 60_000).await?;
    let workloads: Vec<u32> = node
        .containerd
        .shim_pids()
        .into_iter()
        .flat_map(descendants)
        .filter(|pid| arguments(*pid).first().map(String::as_str) == Some("bulwark-workload"))
        .collect();
    ensure!(workloads.len() == 2, "two workloads, not {workloads:?}");
    let bases = workloads
        .iter()
        .map(|pid| binary_base(*pid))
        .collect::<Result<Vec<_>>>()?;
    ensure!(
        bases[0] != bases[1],
        "both workloads have their code at {:#x}",
        bases[0]
    );
    for pod in [first_pod, second_pod] {
        remove_pod(&node, &pod).await?;
    }
    node.finish().await
}
