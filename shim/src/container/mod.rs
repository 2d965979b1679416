//! A container prepared from its bundle: what Bulwark makes of it, and everything a pod got
//! wrong refused here, at Create, with a message that names the annotation or field, the
//! value and the reason.
//!
//! - [`wasm`]: a Wasm container: its policy, module, preopened directories and plan;
//! - [`native`]: a native sidecar, run by runc where the node allows it.

use bulwark_runtime::config::ConfigError;
use bulwark_runtime::policy::PolicyError;

use crate::bundle::ContentStore;
use crate::bundle::spec::{ContainerSpec, NamespaceKind, SpecError};
use crate::cgroup::{Cgroup, CgroupError, Resources};
use crate::process::compile::parent::CompileStepError;
use crate::process::workload::parent::StartError;

pub mod native;
pub mod wasm;

pub use wasm::{WasmContainer, prepare};

/// Why a container was not created. containerd passes the message on to kubelet (the
/// StartContainer error `kubectl describe pod` shows); the kind decides its code.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// What the pod asks for cannot be given: a malformed or unknown annotation, a value
    /// above a ceiling, a spec field Bulwark does not support, an entrypoint that is not a
    /// Wasm file or is too big, a module that does not compile, serving figures that do
    /// not fit (containerd's InvalidArgument).
    #[error("{0}")]
    Refused(String),
    /// The node cannot give the pod what its admin requires (a layer of defense the kernel
    /// lacks, a node configuration that is missing or malformed): FailedPrecondition.
    #[error("{0}")]
    NodeUnfit(String),
    /// Something on the node failed: a file, a cgroup, a process that would not start
    /// (Internal).
    #[error("{0}")]
    Failed(String),
}

impl From<PolicyError> for CreateError {
    fn from(error: PolicyError) -> Self {
        CreateError::Refused(error.to_string())
    }
}

impl From<SpecError> for CreateError {
    fn from(error: SpecError) -> Self {
        CreateError::Refused(error.to_string())
    }
}

impl From<ConfigError> for CreateError {
    fn from(error: ConfigError) -> Self {
        CreateError::NodeUnfit(error.to_string())
    }
}

impl From<CgroupError> for CreateError {
    fn from(error: CgroupError) -> Self {
        CreateError::Failed(error.to_string())
    }
}

impl From<StartError> for CreateError {
    fn from(error: StartError) -> Self {
        match error {
            StartError::Refused(message) => CreateError::Refused(message),
            StartError::Failed(message) => CreateError::Failed(message),
        }
    }
}

impl From<CompileStepError> for CreateError {
    fn from(error: CompileStepError) -> Self {
        match error {
            CompileStepError::Invalid { .. } | CompileStepError::OverMemory { .. } => {
                CreateError::Refused(error.to_string())
            }
            _ => CreateError::Failed(error.to_string()),
        }
    }
}

/// What a container's Create knows of its pod beyond its own bundle.
#[derive(Debug)]
pub struct Pod<'a> {
    /// The names of the pod's containers created so far.
    pub containers: Vec<String>,
    /// Where containerd keeps the pod's images.
    pub content: &'a ContentStore,
}

/// Refuses what Bulwark cannot give a pod, before anything is started for it.
pub fn check_supported(spec: &ContainerSpec) -> Result<(), CreateError> {
    if spec.namespace(NamespaceKind::User).is_some() {
        return Err(CreateError::Refused(
            "user namespaces (hostUsers: false) are not supported by Bulwark: a Wasm workload runs as the container's user in the node's user namespace, without any capability (remove hostUsers: false)"
                .into(),
        ));
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
pub fn create_cgroup(spec: &ContainerSpec) -> Result<Option<Cgroup>, CreateError> {
    let Some(path) = &spec.cgroups_path else {
        return Ok(None);
    };
    let resources = Resources {
        memory_limit: spec.memory_limit,
        cpu: spec.cpu,
        pids_limit: spec.pids_limit,
    };
    Ok(Some(Cgroup::create(path, &resources)?))
}
