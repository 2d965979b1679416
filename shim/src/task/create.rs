//! What Create makes of a bundle: the pod sandbox's holder, a Wasm workload waiting at its
//! gate, or a native container created by runc.

use std::path::{Path, PathBuf};

use containerd_shim::api;

use bulwark_runtime::config::{DEFAULT_CONFIG_PATH, NodeConfig};

use crate::bundle::spec::ContainerSpec;
use crate::bundle::{mount_rootfs, remove_files, unmount_rootfs};
use crate::cgroup::Cgroup;
use crate::container::native::{NativeContainer, NativeStdio};
use crate::container::{CreateError, Pod, Prepared, WasmContainer};
use crate::egress::EgressPlan;
use crate::egress::bpf::EgressFilter;
use crate::egress::watch::EgressWatch;
use crate::process::ProcessLimits;

use super::options::config_path_from_options;
use super::service::TaskService;
use super::state::{Container, Kind, Phase};
use super::stdio::{OpenedStdio, StdioPaths, hold_output_fifos};

impl TaskService {
    /// Creates the container of `req` and its process; no lock is held.
    pub(super) fn create_container(
        &self,
        req: &api::CreateTaskRequest,
    ) -> Result<Container, CreateError> {
        if req.terminal {
            return Err(CreateError::Refused(
                "bulwark runs WebAssembly without a terminal: tty is not supported (set tty: false)"
                    .into(),
            ));
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec = ContainerSpec::load(&bundle)?;
        let config = match config_path_from_options(req.options.as_ref()) {
            Ok(Some(path)) => NodeConfig::load_required(&path)?,
            Ok(None) => NodeConfig::load(Path::new(DEFAULT_CONFIG_PATH))?,
            Err(error) => return Err(CreateError::NodeUnfit(error.to_string())),
        };
        mount_rootfs(&bundle, &req.rootfs).map_err(CreateError::Failed)?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
        };
        let created = if spec.is_sandbox {
            create_sandbox(&spec)
        } else {
            OpenedStdio::open(&stdio)
                .map_err(CreateError::Failed)
                .and_then(|mut opened| {
                    let pod = Pod {
                        containers: self.lock().names(),
                        content: &self.content,
                    };
                    let mut log = |line: &str| opened.log(line);
                    match crate::container::prepare(
                        &req.id, &bundle, &spec, &config, &pod, &mut log,
                    )? {
                        Prepared::Wasm(wasm) => create_wasm(*wasm, &spec, opened, &stdio.stderr),
                        Prepared::Native => create_native(&req.id, &bundle, &spec, opened),
                    }
                })
        };
        match created {
            Ok((kind, pid, cgroup)) => Ok(Container {
                name: spec.container_name().map(str::to_owned),
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
            Err(error) => {
                remove_files(&bundle);
                unmount_rootfs(&bundle);
                Err(error)
            }
        }
    }
}

type Created = (Kind, u32, Option<Cgroup>);

/// The pod sandbox: its holder process in the pod's namespaces and the sandbox's cgroup.
fn create_sandbox(spec: &ContainerSpec) -> Result<Created, CreateError> {
    crate::container::check_supported(spec)?;
    let pid = crate::process::holder::parent::start(spec).map_err(CreateError::Failed)?;
    let placed = crate::container::create_cgroup(spec).and_then(|cgroup| {
        if let Some(cgroup) = &cgroup {
            cgroup.place(pid)?;
        }
        ProcessLimits::of(spec)
            .apply(pid)
            .map_err(CreateError::Failed)?;
        Ok(cgroup)
    });
    match placed {
        Ok(cgroup) => Ok((Kind::Sandbox, pid, cgroup)),
        Err(error) => {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            Err(error)
        }
    }
}

/// A Wasm container: its workload process, started, loaded and waiting at its gate, with
/// the kernel's egress filter on its cgroup.
fn create_wasm(
    wasm: WasmContainer,
    spec: &ContainerSpec,
    stdio: OpenedStdio,
    stderr: &str,
) -> Result<Created, CreateError> {
    let log = (!stderr.is_empty()).then(|| PathBuf::from(stderr));
    let started = crate::process::workload::parent::start_gated(
        wasm.launch,
        stdio.into_array(),
        wasm.cgroup.as_ref(),
        &ProcessLimits::of(spec),
    )
    .map_err(CreateError::from)
    .and_then(|gated| {
        // The workload is in its cgroup but runs nothing of the guest until Start.
        let egress = attach_egress_filter(wasm.cgroup.as_ref(), wasm.egress, log);
        match egress {
            Ok(egress) => Ok((gated, egress)),
            Err(error) => {
                // SAFETY: kill(2) on our own child, not yet reaped.
                unsafe { libc::kill(gated.pid as libc::pid_t, libc::SIGKILL) };
                Err(error)
            }
        }
    });
    match started {
        Ok((gated, egress)) => {
            let pid = gated.pid;
            let kind = Kind::Wasm {
                gate: Some(gated),
                _egress: egress,
            };
            Ok((kind, pid, wasm.cgroup))
        }
        Err(error) => {
            if let Some(cgroup) = &wasm.cgroup
                && let Err(err) = cgroup.remove()
            {
                log::warn!("{err}");
            }
            Err(error)
        }
    }
}

/// Puts the egress filter on the container's cgroup, allowing exactly its grants (nothing
/// when it has none). A container with grants on a node where it cannot be attached is
/// refused, unless the node allows running without it; one without grants runs anyway,
/// since its seccomp filter already allows no socket at all.
fn attach_egress_filter(
    cgroup: Option<&Cgroup>,
    plan: EgressPlan,
    log: Option<PathBuf>,
) -> Result<Option<EgressWatch>, CreateError> {
    let attached = cgroup
        .and_then(Cgroup::egress_dir)
        .ok_or_else(|| {
            "the container has no cgroup in a cgroup2 hierarchy to attach it to".to_owned()
        })
        .and_then(|dir| EgressFilter::attach(dir, &plan.grants).map_err(|e| e.to_string()));
    match attached {
        Ok(filter) => Ok(Some(EgressWatch::start(filter, log, plan.counts))),
        Err(reason) if plan.grants.is_empty() => {
            log::info!(
                "no egress filter ({reason}); the container has no network grant and no socket"
            );
            Ok(None)
        }
        Err(reason) if plan.allow_without => {
            log::warn!(
                "no egress filter ({reason}): its grants are checked by Wasmtime only (capabilities.allow_without_egress_filter = true)"
            );
            Ok(None)
        }
        Err(reason) => Err(CreateError::NodeUnfit(format!(
            "bulwark.dev/network: the kernel's egress filter cannot be attached ({reason}), so a guest that escaped Wasmtime could connect anywhere the pod's network reaches: refused. Run a node with cgroup v2 and BPF, or set capabilities.allow_without_egress_filter = true in the node configuration"
        ))),
    }
}

/// A native container on a node that allows them: created by runc now, so that its pid is
/// known at Create, as containerd expects.
fn create_native(
    id: &str,
    bundle: &Path,
    spec: &ContainerSpec,
    stdio: OpenedStdio,
) -> Result<Created, CreateError> {
    let [stdin, stdout, stderr] = stdio.into_array();
    let (container, init_pid) = NativeContainer::create(
        id,
        bundle,
        NativeStdio {
            stdin,
            stdout,
            stderr,
        },
    )
    .map_err(|e| CreateError::Failed(e.to_string()))?;
    let cgroup = spec
        .cgroups_path
        .as_deref()
        .and_then(|path| Cgroup::locate(path).ok());
    log::info!("native container {id} created by runc, pid {init_pid}");
    Ok((Kind::Native(container), init_pid, cgroup))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(grants: &[&str], allow_without: bool) -> EgressPlan {
        EgressPlan {
            grants: grants.iter().map(|grant| grant.parse().unwrap()).collect(),
            allow_without,
            counts: None,
        }
    }

    #[test]
    fn grants_without_a_filter_are_refused_unless_the_node_allows_it() {
        // No cgroup: nowhere to attach the filter.
        let error =
            attach_egress_filter(None, plan(&["10.0.0.5:5432"], false), None).expect_err("refused");
        let text = error.to_string();
        assert!(
            text.contains("bulwark.dev/network: the kernel's egress filter cannot be attached")
                && text.contains("capabilities.allow_without_egress_filter"),
            "{text}"
        );
        assert!(matches!(error, CreateError::NodeUnfit(_)));
        assert!(matches!(
            attach_egress_filter(None, plan(&["10.0.0.5:5432"], true), None),
            Ok(None)
        ));
        // Without grants the workload has no socket at all: it runs.
        assert!(matches!(
            attach_egress_filter(None, plan(&[], false), None),
            Ok(None)
        ));
    }
}
