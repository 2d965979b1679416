//! What the shim reads from a container's OCI bundle: containerd's world, translated into
//! the plain values the runtime crate takes. No policy decisions are made here.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::Spec;

/// CRI's annotation naming a container's kind (`sandbox` or `container`).
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI's annotation naming a container's pod sandbox.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// Where kubelet mounts the termination-message file inside a container.
pub const TERMINATION_LOG: &str = "/dev/termination-log";

/// A bundle that cannot be run, with a message fit for `kubectl describe`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

/// One bind mount of the spec, as the shim uses it to find preopened directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    /// Path inside the container.
    pub destination: String,
    /// Path on the host.
    pub source: PathBuf,
    /// Mounted read-only.
    pub read_only: bool,
}

/// The parts of a container's `config.json` that Bulwark uses.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    /// `process.args`: the entrypoint (a wasm file) and its arguments.
    pub args: Vec<String>,
    /// `process.env`, in order.
    pub env: Vec<(String, String)>,
    /// All annotations (pod annotations included, as containerd copies them).
    pub annotations: HashMap<String, String>,
    /// Whether this is the pod sandbox (pause) container.
    pub is_sandbox: bool,
    /// `process.terminal`.
    pub terminal: bool,
    /// `linux.cgroupsPath`.
    pub cgroups_path: Option<String>,
    /// `linux.resources.memory.limit` (bytes), kubelet's memory limit.
    pub memory_limit: Option<i64>,
    /// `linux.resources.cpu` shares, quota and period.
    pub cpu: CpuResources,
    /// `linux.resources.pids.limit`.
    pub pids_limit: Option<i64>,
    /// Bind mounts (volumes, secrets, the termination log...).
    pub mounts: Vec<BindMount>,
    /// `process.user`.
    pub uid: u32,
    /// `process.user`.
    pub gid: u32,
    /// `process.user.additionalGids`.
    pub additional_gids: Vec<u32>,
    /// The pod's network namespace (`linux.namespaces`, type network, with a path), which
    /// the workload joins so that a guest's sockets use the pod's network, not the node's.
    pub network_namespace: Option<PathBuf>,
}

/// CPU controls kubelet derives from requests and limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuResources {
    /// cgroup v1 cpu.shares.
    pub shares: Option<u64>,
    /// CFS quota in microseconds per period.
    pub quota: Option<i64>,
    /// CFS period in microseconds.
    pub period: Option<u64>,
}

impl ContainerSpec {
    /// Reads `<bundle>/config.json`.
    pub fn load(bundle: &Path) -> Result<ContainerSpec, SpecError> {
        let path = bundle.join("config.json");
        let spec = Spec::load(&path)
            .map_err(|error| SpecError(format!("cannot read {}: {error}", path.display())))?;
        Ok(ContainerSpec::from_spec(&spec))
    }

    /// Extracts the fields Bulwark uses.
    pub fn from_spec(spec: &Spec) -> ContainerSpec {
        let annotations = spec.annotations().clone().unwrap_or_default();
        let is_sandbox = annotations
            .get(CONTAINER_TYPE)
            .is_some_and(|kind| kind == "sandbox");
        let process = spec.process().as_ref();
        let args = process.and_then(|p| p.args().clone()).unwrap_or_default();
        let env = process
            .and_then(|p| p.env().clone())
            .unwrap_or_default()
            .into_iter()
            .map(|entry| match entry.split_once('=') {
                Some((name, value)) => (name.to_owned(), value.to_owned()),
                None => (entry, String::new()),
            })
            .collect();
        let terminal = process.and_then(|p| p.terminal()).unwrap_or(false);
        let (uid, gid, additional_gids) = process
            .map(|p| {
                let user = p.user();
                (
                    user.uid(),
                    user.gid(),
                    user.additional_gids().clone().unwrap_or_default(),
                )
            })
            .unwrap_or((0, 0, Vec::new()));
        let linux = spec.linux().as_ref();
        let resources = linux.and_then(|l| l.resources().as_ref());
        let memory_limit = resources
            .and_then(|r| r.memory().as_ref())
            .and_then(|m| m.limit())
            .filter(|limit| *limit > 0);
        let cpu = resources
            .and_then(|r| r.cpu().as_ref())
            .map(|cpu| CpuResources {
                shares: cpu.shares(),
                quota: cpu.quota(),
                period: cpu.period(),
            })
            .unwrap_or_default();
        let pids_limit = resources
            .and_then(|r| r.pids().as_ref())
            .map(|pids| pids.limit())
            .filter(|limit| *limit > 0);
        let mounts = spec
            .mounts()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|mount| {
                let options = mount.options().clone().unwrap_or_default();
                let is_bind = mount.typ().as_deref() == Some("bind")
                    || options.iter().any(|o| o == "bind" || o == "rbind");
                let source = mount.source().clone()?;
                is_bind.then(|| BindMount {
                    destination: mount.destination().display().to_string(),
                    source,
                    read_only: options.iter().any(|o| o == "ro"),
                })
            })
            .collect();
        let network_namespace = linux
            .and_then(|l| l.namespaces().as_ref())
            .and_then(|namespaces| {
                namespaces
                    .iter()
                    .find(|ns| ns.typ() == oci_spec::runtime::LinuxNamespaceType::Network)
            })
            .and_then(|ns| ns.path().clone());
        ContainerSpec {
            args,
            env,
            annotations,
            is_sandbox,
            terminal,
            cgroups_path: linux
                .and_then(|l| l.cgroups_path().clone())
                .map(|p| p.display().to_string()),
            memory_limit,
            cpu,
            pids_limit,
            mounts,
            uid,
            gid,
            additional_gids,
            network_namespace,
        }
    }

    /// The pod this container belongs to (its own id for the sandbox itself).
    pub fn sandbox_id(&self) -> Option<&str> {
        self.annotations.get(SANDBOX_ID).map(String::as_str)
    }

    /// The host file kubelet mounted as the termination-message file, if any.
    pub fn termination_log(&self) -> Option<PathBuf> {
        self.mounts
            .iter()
            .find(|mount| mount.destination == TERMINATION_LOG)
            .map(|mount| mount.source.clone())
    }

    /// Where a container path lives on the host: under the bind mount that covers it
    /// (the longest destination wins), else inside the rootfs. Returns whether a read-only
    /// mount covers it. Never leaves the rootfs or the mount through `..` or symlinks.
    pub fn host_path(
        &self,
        rootfs: &Path,
        container_path: &str,
    ) -> Result<(PathBuf, bool), SpecError> {
        let relative = |base: &str| -> Option<PathBuf> {
            let rest = Path::new(container_path).strip_prefix(base).ok()?;
            Some(rest.to_owned())
        };
        let covering = self
            .mounts
            .iter()
            .filter(|mount| relative(&mount.destination).is_some())
            .max_by_key(|mount| mount.destination.len());
        let (root, rest, read_only) = match covering {
            Some(mount) => (
                mount.source.clone(),
                relative(&mount.destination).unwrap_or_default(),
                mount.read_only,
            ),
            None => (
                rootfs.to_owned(),
                Path::new(container_path)
                    .strip_prefix("/")
                    .unwrap_or(Path::new(container_path))
                    .to_owned(),
                false,
            ),
        };
        Ok((resolve_beneath(&root, &rest)?, read_only))
    }
}

/// Joins `rest` onto `root` and resolves symlinks, refusing any result outside `root`.
pub fn resolve_beneath(root: &Path, rest: &Path) -> Result<PathBuf, SpecError> {
    if rest.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(SpecError(format!(
            "{}: '..' is not allowed",
            rest.display()
        )));
    }
    let root = root
        .canonicalize()
        .map_err(|error| SpecError(format!("{}: {error}", root.display())))?;
    let joined = root.join(rest);
    let resolved = joined
        .canonicalize()
        .map_err(|error| SpecError(format!("{}: {error}", joined.display())))?;
    if !resolved.starts_with(&root) {
        return Err(SpecError(format!(
            "{} leads outside its root {}",
            rest.display(),
            root.display()
        )));
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with_mounts(mounts: Vec<BindMount>) -> ContainerSpec {
        let mut spec = ContainerSpec::from_spec(&Spec::default());
        spec.mounts = mounts;
        spec
    }

    #[test]
    fn host_paths_follow_mounts_and_stay_inside() {
        let temp = tempfile::tempdir().unwrap();
        let rootfs = temp.path().join("rootfs");
        let volume = temp.path().join("volume");
        std::fs::create_dir_all(rootfs.join("app/data")).unwrap();
        std::fs::create_dir_all(volume.join("sub")).unwrap();
        std::os::unix::fs::symlink("/etc", rootfs.join("app/evil")).unwrap();
        let spec = spec_with_mounts(vec![BindMount {
            destination: "/data".into(),
            source: volume.clone(),
            read_only: true,
        }]);
        let (path, ro) = spec.host_path(&rootfs, "/app/data").unwrap();
        assert_eq!(
            (path, ro),
            (rootfs.join("app/data").canonicalize().unwrap(), false)
        );
        let (path, ro) = spec.host_path(&rootfs, "/data/sub").unwrap();
        assert_eq!(
            (path, ro),
            (volume.join("sub").canonicalize().unwrap(), true)
        );
        assert!(spec.host_path(&rootfs, "/app/evil").is_err());
        assert!(spec.host_path(&rootfs, "/app/../../etc").is_err());
        assert!(spec.host_path(&rootfs, "/missing").is_err());
    }
}
