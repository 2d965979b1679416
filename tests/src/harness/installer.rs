//! The installer image (`images/installer`): `bulwark`, `containerd-shim-bulwark-v1` and
//! the binaries the shim starts from this build at the image's root and nothing else (they are statically linked), as
//! an ordinary OCI image built without a Docker engine. The Helm chart's DaemonSet runs it.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use bulwark_runtime::image::{self, Image, LayerEntry, RunConfig};

/// The binaries the image carries, from this build's release directory.
pub const BINARIES: [&str; 4] = [
    "bulwark",
    "containerd-shim-bulwark-v1",
    "bulwark-workload",
    "bulwark-holder",
];

/// Whether an ELF binary asks for a dynamic loader (a `PT_INTERP` program header), as
/// binutils' `readelf` shows it.
fn is_dynamic(binary: &Path) -> Result<bool> {
    let output = Command::new("readelf")
        .args(["--program-headers", "--wide"])
        .arg(binary)
        .output()
        .context("cannot run readelf (binutils)")?;
    ensure!(
        output.status.success(),
        "readelf {} failed",
        binary.display()
    );
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .any(|line| line.trim_start().starts_with("INTERP")))
}

/// Builds the installer image from this build's binaries.
pub fn installer_image() -> Result<Image> {
    let release = crate::release_dir();
    let mut entries = Vec::new();
    for name in BINARIES {
        let binary = release.join(name);
        ensure!(
            binary.exists(),
            "{} is missing: run `make build`",
            binary.display()
        );
        // The node's C library may be older than the build machine's; nothing but the two
        // binaries goes into the image.
        ensure!(
            !is_dynamic(&binary)?,
            "{} is dynamically linked: build with the workspace's .cargo/config.toml",
            binary.display()
        );
        // Debug line tables are for developers' backtraces; nodes get the code only.
        let stripped = tempfile::NamedTempFile::new()?;
        let status = Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(stripped.path())
            .arg(&binary)
            .status()
            .context("cannot run strip (binutils)")?;
        ensure!(status.success(), "strip {} failed", binary.display());
        let bytes = std::fs::read(stripped.path())?;
        entries.push(LayerEntry::file(format!("/{name}"), bytes, 0o755));
    }
    Ok(image::ordinary_image(
        &entries,
        &RunConfig {
            entrypoint: vec!["/bulwark".into()],
            cmd: vec!["--help".into()],
            ..RunConfig::default()
        },
    )?)
}
