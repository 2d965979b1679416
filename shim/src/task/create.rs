//! What Create makes of a bundle: the pod sandbox's holder, a Wasm workload waiting at its
//! gate, or a native container created by runc.

use std::path::{Path, PathBuf};

use containerd_shim::api;

use bulwark_runtime::config::{DEFAULT_CONFIG_PATH, NodeConfig};

use crate::bundle::spec::ContainerSpec;
use crate::bundle::{mount_rootfs, remove_files, unmount_rootfs};
use crate::cgroup::Cgroup;
use crate::container::Prepared;
use crate::container::native::{NativeContainer, NativeStdio};
use crate::process::ProcessLimits;

use super::options::config_path_from_options;
use super::service::TaskService;
use super::state::{Container, Kind, Phase};
use super::stdio::{StdioPaths, hold_output_fifos, open_stdio};

impl TaskService {
    /// Creates the container of `req` and its process; no lock is held.
    pub(super) fn create_container(
        &self,
        req: &api::CreateTaskRequest,
    ) -> Result<Container, String> {
        if req.terminal {
            return Err("bulwark runs WebAssembly without a terminal: tty is not supported (set tty: false)".into());
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec = ContainerSpec::load(&bundle).map_err(|e| e.to_string())?;
        let config = match config_path_from_options(req.options.as_ref()) {
            Ok(Some(path)) => NodeConfig::load_required(&path),
            Ok(None) => NodeConfig::load(Path::new(DEFAULT_CONFIG_PATH)),
            Err(error) => return Err(error.to_string()),
        }
        .map_err(|e| e.to_string())?;
        mount_rootfs(&bundle, &req.rootfs)?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
        };
        let created = if spec.is_sandbox {
            create_sandbox(&bundle, &spec)
        } else {
            match crate::container::prepare(&bundle, &spec, &config, &self.content) {
                Ok(Prepared::Wasm(wasm)) => create_wasm(wasm, &spec, &stdio),
                Ok(Prepared::Native) => create_native(&req.id, &bundle, &spec, &stdio),
                Err(message) => Err(message),
            }
        };
        match created {
            Ok((kind, pid, cgroup)) => Ok(Container {
                oom_start: cgroup
                    .as_ref()
                    .filter(|_| matches!(kind, Kind::Wasm { .. }))
                    .map(Cgroup::oom_count),
                bundle,
                kind,
                status: Phase::Created,
                pid,
                exit: None,
                cgroup,
                _output_readers: hold_output_fifos(&stdio),
                stdio,
            }),
            Err(message) => {
                remove_files(&bundle);
                unmount_rootfs(&bundle);
                Err(message)
            }
        }
    }
}

type Created = (Kind, u32, Option<Cgroup>);

/// The pod sandbox: its holder process in the pod's namespaces and the sandbox's cgroup.
fn create_sandbox(bundle: &Path, spec: &ContainerSpec) -> Result<Created, String> {
    crate::container::check_supported(spec)?;
    let pid = crate::process::holder::parent::start(bundle, spec)?;
    let placed = crate::container::create_cgroup(spec).and_then(|cgroup| {
        if let Some(cgroup) = &cgroup {
            cgroup.place(pid).map_err(|e| e.to_string())?;
        }
        ProcessLimits::of(spec).apply(pid)?;
        Ok(cgroup)
    });
    match placed {
        Ok(cgroup) => Ok((Kind::Sandbox, pid, cgroup)),
        Err(message) => {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            Err(message)
        }
    }
}

/// A Wasm container: its workload process, started and waiting at its gate.
fn create_wasm(
    wasm: Box<crate::container::WasmContainer>,
    spec: &ContainerSpec,
    stdio: &StdioPaths,
) -> Result<Created, String> {
    let wasm = *wasm;
    let started = open_stdio(stdio).and_then(|stdio| {
        crate::process::workload::parent::start_gated(
            wasm.launch,
            stdio,
            wasm.cgroup.as_ref(),
            &ProcessLimits::of(spec),
        )
    });
    match started {
        Ok(gated) => {
            let pid = gated.pid;
            Ok((Kind::Wasm { gate: Some(gated) }, pid, wasm.cgroup))
        }
        Err(message) => {
            if let Some(cgroup) = &wasm.cgroup
                && let Err(err) = cgroup.remove()
            {
                log::warn!("{err}");
            }
            Err(message)
        }
    }
}

/// A native container on a node that allows them: created by runc now, so that its pid is
/// known at Create, as containerd expects.
fn create_native(
    id: &str,
    bundle: &Path,
    spec: &ContainerSpec,
    stdio: &StdioPaths,
) -> Result<Created, String> {
    let [stdin, stdout, stderr] = open_stdio(stdio)?;
    let (container, init_pid) = NativeContainer::create(
        id,
        bundle,
        NativeStdio {
            stdin,
            stdout,
            stderr,
        },
    )
    .map_err(|e| e.to_string())?;
    let cgroup = spec
        .cgroups_path
        .as_deref()
        .and_then(|path| Cgroup::locate(path).ok());
    log::info!("native container {id} created by runc, pid {init_pid}");
    Ok((Kind::Native(container), init_pid, cgroup))
}
