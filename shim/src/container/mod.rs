//! A container prepared from its bundle: what Bulwark makes of it, and everything a pod got
//! wrong refused here, at Create, with a message that names the annotation or field, the
//! value and the reason.
//!
//! - [`wasm`]: a Wasm container: its policy, module, preopened directories and plan;
//! - [`native`]: a native sidecar, run by runc where the node allows it.

use crate::bundle::spec::{ContainerSpec, NamespaceKind};
use crate::cgroup::{Cgroup, Resources};

pub mod native;
pub mod wasm;

pub use wasm::{WasmContainer, prepare};

/// Refuses what Bulwark cannot give a pod, before anything is started for it.
pub fn check_supported(spec: &ContainerSpec) -> Result<(), String> {
    if spec.namespace(NamespaceKind::User).is_some() {
        return Err(
            "user namespaces (hostUsers: false) are not supported by Bulwark: a Wasm workload runs as the container's user in the node's user namespace, without any capability (remove hostUsers: false)"
                .into(),
        );
    }
    Ok(())
}

/// What a container turned out to be.
#[derive(Debug)]
pub enum Prepared {
    /// A Wasm container.
    Wasm(Box<WasmContainer>),
    /// A native container, on a node that allows them (runc runs it).
    Native,
}

/// The container's cgroup, made with the spec's resources (see [`Cgroup::create`]).
pub fn create_cgroup(spec: &ContainerSpec) -> Result<Option<Cgroup>, String> {
    let Some(path) = &spec.cgroups_path else {
        return Ok(None);
    };
    let resources = Resources {
        memory_limit: spec.memory_limit,
        cpu: spec.cpu,
        pids_limit: spec.pids_limit,
    };
    Cgroup::create(path, &resources)
        .map(Some)
        .map_err(|e| e.to_string())
}
