//! A Wasm container from its bundle: the policy its annotations ask for within the node's
//! configuration, its module opened once beneath its root (a regular file, within the
//! node's size cap) and compiled by a compile step (or found in the node's cache), its
//! preopened directories, and the plan its workload process runs. Everything a pod got
//! wrong is refused here, at Create, with a message that names the annotation or field,
//! the value and the reason.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bulwark_runtime::cache::{
    Artifact, CACHE_DIR_ENV, CacheEvent, DEFAULT_CACHE_DIR, ModuleCache, digest_file,
};
use bulwark_runtime::config::NodeConfig;
use bulwark_runtime::engine::{FlavorRequest, detect_kind};
use bulwark_runtime::policy::{Access, Policy, Request};
use bulwark_runtime::run::DeadlineMode;

use crate::bundle::content::{ContainerImage, IMAGE_NAME, fetch_wasm_layer, oversized};
use crate::bundle::spec::ContainerSpec;
use crate::bundle::{ARTIFACT_MODULE_FILE, ContentStore, PLAN_FILE};
use crate::cgroup::{Cgroup, compile_step_path};
use crate::egress::{CountsFile, EgressPlan};
use crate::process::binaries::{WORKLOAD_BINARY, beside_shim};
use crate::process::compile::parent::{CompileSteps, ModuleToCompile, Placement, Reaping};
use crate::process::compile::step_user;
use crate::process::workload::parent::Launch;
use crate::process::workload::{Plan, PlannedPreopen};

use super::{CreateError, Pod, Prepared, create_cgroup};

/// A Wasm container ready to start: its artifact compiled, its plan written, its cgroup
/// made, its descriptors open.
#[derive(Debug)]
pub struct WasmContainer {
    /// How to start its workload process.
    pub launch: Launch,
    /// Its cgroup (cgroupfs directories made, or the systemd scope to start).
    pub cgroup: Option<Cgroup>,
    /// What the kernel's egress filter on that cgroup must allow.
    pub egress: EgressPlan,
}

/// Prepares container `id` of `bundle` (rootfs mounted), whose spec is `spec`: `log` says
/// what the container's log should (it waits for a compilation slot, it compiles).
pub fn prepare(
    id: &str,
    bundle: &Path,
    spec: &ContainerSpec,
    config: &NodeConfig,
    pod: &Pod,
    log: &mut dyn FnMut(&str),
) -> Result<Prepared, CreateError> {
    super::check_supported(spec)?;
    let policy = resolve_policy(spec, config, pod, log)?;
    let entrypoint = spec.args.first().ok_or_else(|| {
        CreateError::Refused(
            "the container has no entrypoint: set command to the wasm file, e.g. [\"/app.wasm\"]"
                .into(),
        )
    })?;
    let max_size = config.compile.module_size;
    let module = open_module(id, bundle, spec, entrypoint, pod.content, max_size);
    let head = module.as_ref().ok().map(read_head);
    let is_wasm = head.as_ref().is_some_and(|head| detect_kind(head).is_ok());
    if !is_wasm && policy.allow_native {
        return Ok(Prepared::Native);
    }
    let module = module?;
    check_module(&head.unwrap_or_default(), entrypoint)?;
    let size = module
        .metadata()
        .map_err(|e| CreateError::Failed(format!("entrypoint {entrypoint}: {e}")))?
        .len();
    if size > max_size {
        return Err(CreateError::Refused(oversized(
            &format!("entrypoint {entrypoint}"),
            size,
            max_size,
        )));
    }
    let artifact = compile(id, spec, &policy, config, entrypoint, &module, size, log)?;
    drop(module);
    let (planned, preopens) = open_preopens(bundle, spec, &policy)?;
    let termination_log = open_termination_log(spec)?;
    // A service shows its egress counts in /metrics: the shim writes them, the workload
    // reads them.
    let counts = if artifact.facts.serves_http {
        Some(CountsFile::create().map_err(|e| CreateError::Failed(format!("{e:#}")))?)
    } else {
        None
    };
    let (counts_writer, counts_reader) = counts.unzip();
    let egress = EgressPlan {
        grants: policy.network.clone(),
        allow_without: config.capabilities.allow_without_egress_filter,
        counts: counts_writer,
    };
    let plan = Plan {
        entrypoint: entrypoint.clone(),
        args: spec.args.clone(),
        env: policy.filter_env(spec.env.clone()),
        preopens: planned,
        facts: artifact.facts,
        termination_log: termination_log.is_some(),
        egress_counts: counts_reader.is_some(),
        user: spec.user.clone(),
        policy,
    };
    let plan_path = bundle.join(PLAN_FILE);
    plan.write(&plan_path)
        .map_err(|e| CreateError::Failed(format!("{e:#}")))?;
    let cgroup = match create_cgroup(spec) {
        Ok(mut cgroup) => {
            if !egress.grants.is_empty()
                && let Some(cgroup) = &mut cgroup
            {
                cgroup.make_egress_twin();
            }
            cgroup
        }
        Err(error) => {
            let _ = std::fs::remove_file(&plan_path);
            return Err(error);
        }
    };
    Ok(Prepared::Wasm(Box::new(WasmContainer {
        launch: Launch {
            plan: plan_path,
            artifact: artifact.file,
            preopens,
            termination_log,
            egress_counts: counts_reader,
            namespaces: spec.pod_namespaces(),
        },
        cgroup,
        egress,
    })))
}

/// The module's compiled artifact: from the node's cache, or from a compile step that runs
/// as the container's user (never root) in a cgroup of its own beside the pod.
#[allow(clippy::too_many_arguments)]
fn compile(
    id: &str,
    spec: &ContainerSpec,
    policy: &Policy,
    config: &NodeConfig,
    entrypoint: &str,
    module: &File,
    size: u64,
    log: &mut dyn FnMut(&str),
) -> Result<Artifact, CreateError> {
    let digest = digest_file(module)
        .map_err(|e| CreateError::Failed(format!("cannot read entrypoint {entrypoint}: {e}")))?;
    let cache_dir = std::env::var_os(CACHE_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_DIR));
    let cache = match ModuleCache::open(&cache_dir) {
        Ok(cache) => Some(cache),
        Err(error) => {
            log(&format!("warn: {error}; compiling without the cache"));
            None
        }
    };
    let steps = CompileSteps {
        exe: beside_shim(WORKLOAD_BINARY)
            .map_err(CreateError::NodeUnfit)?
            .path(),
        memory: config.compile.memory,
        concurrency: config.compile.concurrency,
        allow_without_landlock: policy.allow_without_landlock,
        reaping: Reaping::Monitor,
    };
    let (uid, gid) = step_user(spec.user.uid, spec.user.gid);
    let placement = Placement {
        uid,
        gid,
        cgroup: spec
            .cgroups_path
            .as_deref()
            .map(|path| compile_step_path(path, id)),
    };
    let module = ModuleToCompile {
        file: module,
        name: entrypoint,
        size,
        digest,
    };
    let request = FlavorRequest::of(policy, DeadlineMode::ProcessWatchdog);
    let (artifact, event) = steps.artifact(cache.as_ref(), &module, request, &placement, log)?;
    if let Some(CacheEvent::NotStored { reason }) = event {
        log(&format!(
            "warn: {reason}: the module cache cannot store it; running it compiled in memory"
        ));
    }
    Ok(artifact)
}

fn resolve_policy(
    spec: &ContainerSpec,
    config: &NodeConfig,
    pod: &Pod,
    log: &mut dyn FnMut(&str),
) -> Result<Policy, CreateError> {
    let annotations = spec
        .annotations
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()));
    let request = Request::from_annotations(annotations, spec.container_name())?;
    // A key for a container the pod has not (yet) shown: later containers are not known
    // here, so it is pointed out rather than refused, in case it is a typo.
    for (key, name) in request.for_other_containers() {
        if !pod.containers.iter().any(|known| known == name) {
            log(&format!(
                "note: {key} is for a container named {name}, which this pod has not started so far: it applies to that container only"
            ));
        }
    }
    let mut policy = Policy::resolve(config, &request)?;
    if let Some(limit) = spec.memory_limit.filter(|limit| *limit > 0) {
        policy.bound_by_container_memory(limit as u64);
    }
    Ok(policy)
}

/// The module file the entrypoint names, opened beneath the container's root (a regular
/// file, nothing else); or, for a Wasm artifact, its layer from containerd's content store.
fn open_module(
    id: &str,
    bundle: &Path,
    spec: &ContainerSpec,
    entrypoint: &str,
    content: &ContentStore,
    max_size: u64,
) -> Result<File, CreateError> {
    let refused = |message: String| CreateError::Refused(format!("entrypoint {message}"));
    let location = spec
        .locate(&bundle.join("rootfs"), entrypoint)
        .map_err(|e| refused(format!("{entrypoint}: {e}")))?;
    if let Some(file) = location
        .open_regular_file(entrypoint)
        .map_err(|e| refused(e.to_string()))?
    {
        return Ok(file);
    }
    // No such file in a rootfs: the image may be a Wasm artifact, whose module is a layer
    // in containerd's content store rather than a file.
    let not_found = || {
        refused(format!(
            "{entrypoint}: no such file in the container image (the entrypoint names the .wasm file to run, e.g. /app.wasm)"
        ))
    };
    let name = spec.annotations.get(IMAGE_NAME).ok_or_else(not_found)?;
    let image = ContainerImage {
        container: id,
        name,
    };
    let dest = bundle.join(ARTIFACT_MODULE_FILE);
    if !fetch_wasm_layer(
        &content.address,
        &content.namespace,
        &image,
        &dest,
        max_size,
    )
    .map_err(CreateError::Refused)?
    {
        return Err(not_found());
    }
    File::open(&dest)
        .map_err(|e| CreateError::Failed(format!("cannot open {}: {e}", dest.display())))
}

/// The first bytes of a module: enough to tell Wasm (a module or a component) from anything
/// else.
fn read_head(module: &File) -> Vec<u8> {
    let mut head = [0u8; 8];
    let read = module.read_at(&mut head, 0).unwrap_or(0);
    head[..read].to_vec()
}

/// Refuses entrypoints that are not WebAssembly (on a node that allows no native
/// containers), with a message that says what they are.
fn check_module(head: &[u8], entrypoint: &str) -> Result<(), CreateError> {
    match detect_kind(head) {
        Ok(_) => Ok(()),
        Err(not_wasm) if head.starts_with(b"\x7fELF") || head.starts_with(b"#!") => {
            Err(CreateError::Refused(format!(
                "entrypoint {entrypoint} is a native executable, not WebAssembly: this node runs only Wasm (capabilities.allow_native = false; {not_wasm})"
            )))
        }
        Err(not_wasm) => Err(CreateError::Refused(format!(
            "entrypoint {entrypoint}: {not_wasm}"
        ))),
    }
}

/// The termination-message file kubelet made (a trusted host path), open for writing.
fn open_termination_log(spec: &ContainerSpec) -> Result<Option<File>, CreateError> {
    let Some(path) = spec.termination_log() else {
        return Ok(None);
    };
    File::options()
        .write(true)
        .open(&path)
        .map(Some)
        .map_err(|e| {
            CreateError::Failed(format!(
                "cannot open the termination-message file {}: {e}",
                path.display()
            ))
        })
}

/// Opens every granted directory once, beneath its volume or the rootfs, and checks that
/// the grant can be honoured there.
fn open_preopens(
    bundle: &Path,
    spec: &ContainerSpec,
    policy: &Policy,
) -> Result<(Vec<PlannedPreopen>, Vec<File>), CreateError> {
    let rootfs = bundle.join("rootfs");
    let mut planned = Vec::new();
    let mut dirs = Vec::new();
    for grant in &policy.dirs {
        let refuse = |reason: String| {
            CreateError::Refused(format!("bulwark.dev/dirs: {}: {reason}", grant.path))
        };
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
