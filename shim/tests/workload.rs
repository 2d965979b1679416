//! The workload process on its own (no containerd): what it can still reach after it
//! locked itself down, and that it runs a plan the way the shim writes it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use bulwark_runtime::NodeConfig;
use bulwark_runtime::policy::{Access, Knob, Policy, Request};
use bulwark_runtime::run::Preopen;
use bulwark_shim::workload::{self, LOCKDOWN_PROBE_ENV, Plan, WORKLOAD_ARG};

fn guest(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../build/guests/{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run `make guests`",
        path.display()
    );
    path
}

fn plan(
    temp: &Path,
    module: PathBuf,
    args: &[&str],
    preopens: Vec<Preopen>,
    flags: &[(Knob, &str)],
) -> PathBuf {
    let mut request = Request::annotations();
    for (knob, value) in flags {
        request.set(*knob, value).unwrap();
    }
    let plan = Plan {
        module,
        args: args.iter().map(|a| a.to_string()).collect(),
        env: vec![],
        preopens,
        policy: Policy::resolve(&NodeConfig::default(), &request).unwrap(),
        cache_dir: temp.join("cache"),
        termination_log: Some(temp.join("termination-log")),
        uid: 0,
        gid: 0,
        additional_gids: vec![],
        network_namespace: None,
    };
    let path = temp.join("plan.json");
    plan.write(&path).unwrap();
    fs::write(temp.join("termination-log"), "").unwrap();
    path
}

/// Runs the workload process on `plan` as the shim does, released at its gate unless
/// `release` is false.
fn workload_gated(plan: &Path, probe: &str, release: bool) -> std::process::Output {
    use std::io::Write;
    let (reader, mut writer) = workload::gate_pipe().unwrap();
    if release {
        writer.write_all(b"1").unwrap();
    }
    drop(writer);
    let mut command = Command::new(env!("CARGO_BIN_EXE_containerd-shim-bulwark-v1"));
    command
        .arg(WORKLOAD_ARG)
        .arg(plan)
        .env_clear()
        .env(LOCKDOWN_PROBE_ENV, probe);
    workload::attach_gate(&mut command, &reader);
    command.output().unwrap()
}

fn workload(plan: &Path, probe: &str) -> std::process::Output {
    workload_gated(plan, probe, true)
}

#[test]
fn an_unreleased_workload_runs_nothing() {
    let temp = tempfile::tempdir().unwrap();
    let plan = plan(temp.path(), guest("hello"), &["hello"], vec![], &[]);
    let output = workload_gated(&plan, "", false);
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty(), "the guest ran");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("did not place this workload"), "{stderr}");
}

#[test]
fn after_lock_down_only_granted_paths_open_from_the_host_side() {
    let temp = tempfile::tempdir().unwrap();
    let granted = temp.path().join("granted");
    fs::create_dir(&granted).unwrap();
    fs::write(granted.join("file"), "ok").unwrap();
    let module = guest("hello");
    let plan = plan(
        temp.path(),
        module.clone(),
        &["hello"],
        vec![Preopen {
            host: granted.clone(),
            guest: "/data".into(),
            access: Access::ReadOnly,
        }],
        &[],
    );
    let probes = [
        PathBuf::from("/etc/passwd"),
        PathBuf::from("/proc/self/environ"),
        module.clone(),
        temp.path().join("plan.json"),
        PathBuf::from("@socket"),
        PathBuf::from("@fork"),
        PathBuf::from("@unshare"),
        PathBuf::from("@ptrace"),
        granted.join("file"),
    ];
    let joined = std::env::join_paths(&probes).unwrap();
    let output = workload(&plan, joined.to_str().unwrap());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "hello from bulwark\n"
    );
    for denied in &probes[..8] {
        assert!(
            stderr.contains(&format!("probe: {}: denied", denied.display())),
            "{} was reachable: {stderr}",
            denied.display()
        );
    }
    assert!(
        stderr.contains(&format!(
            "probe: {}: ALLOWED",
            granted.join("file").display()
        )),
        "{stderr}"
    );
}

#[test]
fn the_plan_is_readable_by_root_only() {
    use std::os::unix::fs::PermissionsExt;
    let temp = tempfile::tempdir().unwrap();
    let path = plan(temp.path(), guest("hello"), &["hello"], vec![], &[]);
    assert_eq!(
        fs::metadata(path).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn a_limit_writes_the_termination_log() {
    let temp = tempfile::tempdir().unwrap();
    let plan = plan(
        temp.path(),
        guest("loop"),
        &["loop"],
        vec![],
        &[(Knob::Fuel, "1000000")],
    );
    let output = workload(&plan, "");
    assert_eq!(
        output.status.code(),
        Some(152),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        fs::read_to_string(temp.path().join("termination-log")).unwrap(),
        "fuel exhausted after 1000000 units (bulwark.dev/fuel)\n"
    );
}

#[test]
fn a_missing_plan_or_module_is_a_clear_error() {
    let temp = tempfile::tempdir().unwrap();
    let output = workload(&temp.path().join("absent.json"), "");
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("absent.json"));
    let plan = plan(
        temp.path(),
        temp.path().join("gone.wasm"),
        &["x"],
        vec![],
        &[],
    );
    let output = workload(&plan, "");
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("gone.wasm"));
}

#[test]
fn the_workload_joins_the_pods_network_namespace() {
    let temp = tempfile::tempdir().unwrap();
    let path = plan(temp.path(), guest("hello"), &["hello"], vec![], &[]);
    let mut plan: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    // A process in a network namespace of its own stands in for the pod's sandbox.
    let mut holder = Command::new("unshare")
        .args(["--net", "sleep", "30"])
        .spawn()
        .unwrap();
    let namespace = format!("/proc/{}/ns/net", holder.id());
    // unshare execs sleep only once the namespace exists.
    for _ in 0..100 {
        if fs::read_link(&namespace).ok() != fs::read_link("/proc/self/ns/net").ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    plan["network_namespace"] = serde_json::Value::String(namespace.clone());
    fs::write(&path, serde_json::to_vec(&plan).unwrap()).unwrap();
    let output = workload(&path, "");
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    plan["network_namespace"] = serde_json::Value::String("/proc/999999999/ns/net".into());
    fs::write(&path, serde_json::to_vec(&plan).unwrap()).unwrap();
    let output = workload(&path, "");
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("cannot open the pod's network namespace"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
