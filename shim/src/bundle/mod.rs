//! What containerd hands the shim for a container: its OCI bundle ([`spec`]), its rootfs
//! mounts, and, for a Wasm artifact, its image in containerd's content store ([`content`]).

use std::path::Path;

pub mod content;
pub mod spec;

/// The plan's file in the bundle.
pub const PLAN_FILE: &str = "bulwark-plan.json";
/// Where a Wasm artifact's module is written in the bundle.
pub const ARTIFACT_MODULE_FILE: &str = "bulwark-module.wasm";

/// Where containerd keeps images, for Wasm artifacts (whose module is a layer, not a file).
#[derive(Debug, Clone)]
pub struct ContentStore {
    /// containerd's gRPC address.
    pub address: String,
    /// The containerd namespace (`k8s.io`).
    pub namespace: String,
}

/// The files the shim wrote into a bundle.
pub fn remove_files(bundle: &Path) {
    for file in [PLAN_FILE, ARTIFACT_MODULE_FILE] {
        let _ = std::fs::remove_file(bundle.join(file));
    }
}

pub fn mount_rootfs(
    bundle: &Path,
    mounts: &[containerd_shim::protos::types::mount::Mount],
) -> Result<(), String> {
    if mounts.is_empty() {
        return Ok(());
    }
    let target = bundle.join("rootfs");
    std::fs::create_dir_all(&target)
        .map_err(|e| format!("cannot create {}: {e}", target.display()))?;
    for mount in mounts {
        containerd_shim::mount::mount_rootfs(
            Some(mount.type_.as_str()).filter(|t| !t.is_empty()),
            Some(mount.source.as_str()).filter(|s| !s.is_empty()),
            &mount.options,
            &target,
        )
        .map_err(|e| format!("cannot mount the rootfs: {e}"))?;
    }
    Ok(())
}

pub fn unmount_rootfs(bundle: &Path) {
    let target = bundle.join("rootfs");
    if let Some(target) = target.to_str()
        && let Err(err) = containerd_shim::mount::umount_recursive(Some(target), libc::MNT_DETACH)
    {
        log::warn!("cannot unmount {target}: {err}");
    }
}
