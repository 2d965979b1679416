//! A Wasm container from its bundle: the policy its annotations ask for within the node's
//! configuration, its module and preopened directories opened once beneath its root, and
//! the plan its workload process runs. Everything a pod got wrong is refused here, at
//! Create, with a message that names the annotation or field, the value and the reason.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bulwark_runtime::cache::{CACHE_DIR_ENV, DEFAULT_CACHE_DIR};
use bulwark_runtime::config::NodeConfig;
use bulwark_runtime::engine::{WasmKind, detect_kind};
use bulwark_runtime::policy::{Access, Policy, Request};

use crate::bundle::content::{IMAGE_NAME, fetch_wasm_layer};
use crate::bundle::spec::ContainerSpec;
use crate::bundle::{ARTIFACT_MODULE_FILE, ContentStore, PLAN_FILE};
use crate::cgroup::Cgroup;
use crate::process::workload::parent::Launch;
use crate::process::workload::{Plan, PlannedPreopen};

use super::{Prepared, create_cgroup};

/// A Wasm container ready to start: its plan written, its cgroup made, its descriptors open.
#[derive(Debug)]
pub struct WasmContainer {
    /// How to start its workload process.
    pub launch: Launch,
    /// Its cgroup (cgroupfs directories made, or the systemd scope to start).
    pub cgroup: Option<Cgroup>,
}

/// Prepares the container of `bundle` (rootfs mounted), whose spec is `spec`.
pub fn prepare(
    bundle: &Path,
    spec: &ContainerSpec,
    config: &NodeConfig,
    content: &ContentStore,
) -> Result<Prepared, String> {
    super::check_supported(spec)?;
    let policy = resolve_policy(spec, config)?;
    let entrypoint = spec.args.first().ok_or(
        "the container has no entrypoint: set command to the wasm file, e.g. [\"/app.wasm\"]",
    )?;
    let module = open_module(bundle, spec, entrypoint, content);
    let head = module.as_ref().ok().map(read_head);
    let is_wasm = head.as_ref().is_some_and(|head| detect_kind(head).is_ok());
    if !is_wasm && policy.allow_native {
        return Ok(Prepared::Native);
    }
    let module = module?;
    let head = head.unwrap_or_default();
    check_module(&head, entrypoint)?;
    let serve = serves_http(&module, &head)?;
    if serve {
        // Refused here, with the annotations' names, rather than when it starts.
        policy.serving().map_err(|e| e.to_string())?;
    }
    let (planned, preopens) = open_preopens(bundle, spec, &policy)?;
    let termination_log = open_termination_log(spec)?;
    let plan = Plan {
        entrypoint: entrypoint.clone(),
        args: spec.args.clone(),
        env: policy.filter_env(spec.env.clone()),
        preopens: planned,
        cache_dir: std::env::var_os(CACHE_DIR_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_DIR)),
        termination_log: termination_log.is_some(),
        user: spec.user.clone(),
        policy,
        serve,
    };
    let plan_path = bundle.join(PLAN_FILE);
    plan.write(&plan_path).map_err(|e| format!("{e:#}"))?;
    let cgroup = match create_cgroup(spec) {
        Ok(cgroup) => cgroup,
        Err(message) => {
            let _ = std::fs::remove_file(&plan_path);
            return Err(message);
        }
    };
    Ok(Prepared::Wasm(Box::new(WasmContainer {
        launch: Launch {
            plan: plan_path,
            module,
            preopens,
            termination_log,
            namespaces: spec.pod_namespaces(),
        },
        cgroup,
    })))
}

fn resolve_policy(spec: &ContainerSpec, config: &NodeConfig) -> Result<Policy, String> {
    let annotations = spec
        .annotations
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()));
    let request =
        Request::from_annotations(annotations, spec.container_name()).map_err(|e| e.to_string())?;
    let mut policy = Policy::resolve(config, &request).map_err(|e| e.to_string())?;
    if let Some(limit) = spec.memory_limit.filter(|limit| *limit > 0) {
        policy.bound_by_container_memory(limit as u64);
    }
    Ok(policy)
}

/// The module file the entrypoint names, opened beneath the container's root; or, for a
/// Wasm artifact, its layer from containerd's content store.
fn open_module(
    bundle: &Path,
    spec: &ContainerSpec,
    entrypoint: &str,
    content: &ContentStore,
) -> Result<File, String> {
    let in_image = spec
        .locate(&bundle.join("rootfs"), entrypoint)
        .map_err(|e| format!("entrypoint {entrypoint}: {e}"))?
        .open(libc::O_RDONLY);
    let error = match in_image {
        Ok(file) if file.metadata().is_ok_and(|m| m.is_file()) => return Ok(file),
        Ok(_) => return Err(format!("entrypoint {entrypoint} is not a file")),
        Err(error) => error,
    };
    // No such file in a rootfs: the image may be a Wasm artifact, whose module is a layer
    // in containerd's content store rather than a file.
    let not_found = || {
        log::info!("entrypoint {entrypoint}: {error}");
        format!(
            "entrypoint {entrypoint}: no such file in the container image (the entrypoint names the .wasm file to run, e.g. /app.wasm)"
        )
    };
    let image = spec.annotations.get(IMAGE_NAME).ok_or_else(not_found)?;
    let dest = bundle.join(ARTIFACT_MODULE_FILE);
    if !fetch_wasm_layer(&content.address, &content.namespace, image, &dest)? {
        return Err(not_found());
    }
    File::open(&dest).map_err(|e| format!("cannot open {}: {e}", dest.display()))
}

/// The first bytes of a module: enough to tell Wasm (a module or a component) from anything
/// else. Read in place, so the workload reads the module from its start.
fn read_head(module: &File) -> Vec<u8> {
    let mut head = [0u8; 8];
    let read = module.read_at(&mut head, 0).unwrap_or(0);
    head[..read].to_vec()
}

/// Whether the module is a component that exports wasi:http/incoming-handler (served, not
/// run): read whole, from the descriptor the workload gets.
fn serves_http(module: &File, head: &[u8]) -> Result<bool, String> {
    if detect_kind(head) != Ok(WasmKind::Component) {
        return Ok(false);
    }
    let length = module.metadata().map(|m| m.len()).unwrap_or(0);
    let mut wasm = vec![0; length as usize];
    module
        .read_exact_at(&mut wasm, 0)
        .map_err(|e| format!("cannot read the module: {e}"))?;
    Ok(bulwark_runtime::engine::serves_http(&wasm))
}

/// Refuses entrypoints that are not WebAssembly (on a node that allows no native
/// containers), with a message that says what they are.
fn check_module(head: &[u8], entrypoint: &str) -> Result<(), String> {
    match detect_kind(head) {
        Ok(_) => Ok(()),
        Err(not_wasm) if head.starts_with(b"\x7fELF") || head.starts_with(b"#!") => Err(format!(
            "entrypoint {entrypoint} is a native executable, not WebAssembly: this node runs only Wasm (capabilities.allow_native = false; {not_wasm})"
        )),
        Err(not_wasm) => Err(format!("entrypoint {entrypoint}: {not_wasm}")),
    }
}

/// The termination-message file kubelet made (a trusted host path), open for writing.
fn open_termination_log(spec: &ContainerSpec) -> Result<Option<File>, String> {
    let Some(path) = spec.termination_log() else {
        return Ok(None);
    };
    File::options()
        .write(true)
        .open(&path)
        .map(Some)
        .map_err(|e| {
            format!(
                "cannot open the termination-message file {}: {e}",
                path.display()
            )
        })
}

/// Opens every granted directory once, beneath its volume or the rootfs, and checks that
/// the grant can be honoured there.
fn open_preopens(
    bundle: &Path,
    spec: &ContainerSpec,
    policy: &Policy,
) -> Result<(Vec<PlannedPreopen>, Vec<File>), String> {
    let rootfs = bundle.join("rootfs");
    let mut planned = Vec::new();
    let mut dirs = Vec::new();
    for grant in &policy.dirs {
        let refuse = |reason: String| format!("bulwark.dev/dirs: {}: {reason}", grant.path);
        let location = spec
            .locate(&rootfs, &grant.path)
            .map_err(|e| refuse(e.to_string()))?;
        if grant.access == Access::ReadWrite && location.read_only {
            return Err(refuse(if location.in_rootfs {
                "rw asks to write to the container's root filesystem, which is read-only (readOnlyRootFilesystem: true): mount a writable volume (an emptyDir) there instead".into()
            } else {
                "rw asks to write to a volume mounted read-only".into()
            }));
        }
        let dir = location
            .open(libc::O_RDONLY | libc::O_DIRECTORY)
            .map_err(|error| {
                refuse(match error.raw_os_error() {
                    Some(libc::ENOENT) => "no such directory in the container".into(),
                    Some(libc::ENOTDIR) => "is not a directory in the container".into(),
                    Some(libc::EXDEV) => "leads outside its volume".into(),
                    _ => error.to_string(),
                })
            })?;
        planned.push(PlannedPreopen {
            guest: grant.path.clone(),
            access: grant.access,
        });
        dirs.push(dir);
    }
    Ok((planned, dirs))
}
