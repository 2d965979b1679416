//! The installer image (`images/installer`): `bulwark` and `containerd-shim-bulwark-v1`
//! from this build at the image's root, with the few shared libraries they load, as an
//! ordinary OCI image built without a Docker engine. The Helm chart's DaemonSet runs it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};
use bulwark_runtime::image::{self, Image, LayerEntry, RunConfig};

/// The binaries the image carries, from `target/release`.
pub const BINARIES: [&str; 2] = ["bulwark", "containerd-shim-bulwark-v1"];

/// The shared libraries (and the dynamic loader) a binary needs, from `ldd`.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .context("cannot run ldd")?;
    ensure!(output.status.success(), "ldd {} failed", binary.display());
    Ok(String::from_utf8(output.stdout)?
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, target)) => target.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// Builds the installer image from this build's binaries.
pub fn installer_image() -> Result<Image> {
    let release = crate::workspace_root().join("target/release");
    let mut entries = Vec::new();
    let mut libraries = std::collections::BTreeSet::new();
    for name in BINARIES {
        let binary = release.join(name);
        ensure!(
            binary.exists(),
            "{} is missing: run `make build`",
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
        libraries.extend(shared_libraries(&binary)?);
    }
    for library in libraries {
        let bytes = std::fs::read(&library)
            .with_context(|| format!("cannot read {}", library.display()))?;
        entries.push(LayerEntry::file(
            library.display().to_string(),
            bytes,
            0o755,
        ));
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
