//! The images every CRI test needs — a pause image and busybox — built without a Docker
//! engine with Bulwark's own OCI image writer (`bulwark_runtime::image`) and pushed to a
//! [`Registry`].

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use bulwark_runtime::image::{self, Image, LayerEntry, RunConfig};
use tempfile::TempDir;

use super::registry::Registry;

/// The pause program's source, `images/pause/pause.c`.
pub fn pause_source() -> PathBuf {
    crate::workspace_root().join("images/pause/pause.c")
}

/// Compiles the pause program statically (`gcc -static -O2`) into `out_dir/pause`.
pub fn build_pause_binary(out_dir: &Path) -> Result<PathBuf> {
    let binary = out_dir.join("pause");
    let output = Command::new("gcc")
        .args(["-static", "-O2", "-Wall", "-o"])
        .arg(&binary)
        .arg(pause_source())
        .output()
        .context("cannot run gcc")?;
    if !output.status.success() {
        bail!(
            "gcc could not build {}:\n{}",
            pause_source().display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(binary)
}

/// The pause image: `/pause` (from [`build_pause_binary`]) as its entrypoint.
pub fn pause_image(pause_binary: &Path) -> Result<Image> {
    let contents = fs::read(pause_binary)
        .with_context(|| format!("cannot read {}", pause_binary.display()))?;
    Ok(image::ordinary_image(
        &[LayerEntry::file("/pause", contents, 0o755)],
        &RunConfig {
            entrypoint: vec!["/pause".into()],
            ..RunConfig::default()
        },
    )?)
}

/// The static busybox of this machine (Debian package `busybox-static`).
pub const BUSYBOX_BINARY: &str = "/bin/busybox";

/// A busybox image like the public one: `/bin/busybox` with a symlink in `/bin` for each of
/// its applets, `PATH` set, and `sh` as its command. Also has `/tmp` (mode 1777) and `/etc`.
pub fn busybox_image() -> Result<Image> {
    let contents = fs::read(BUSYBOX_BINARY)
        .with_context(|| format!("cannot read {BUSYBOX_BINARY} (busybox-static)"))?;
    let list = Command::new(BUSYBOX_BINARY)
        .arg("--list")
        .output()
        .context("cannot run busybox --list")?;
    let mut entries = vec![
        LayerEntry::file("/bin/busybox", contents, 0o755),
        LayerEntry::dir("/tmp", 0o1777),
        LayerEntry::dir("/etc", 0o755),
    ];
    entries.extend(
        String::from_utf8(list.stdout)?
            .lines()
            .map(str::trim)
            .filter(|applet| !applet.is_empty() && *applet != "busybox" && !applet.contains('/'))
            .map(|applet| LayerEntry::symlink(format!("/bin/{applet}"), "busybox")),
    );
    Ok(image::ordinary_image(
        &entries,
        &RunConfig {
            cmd: vec!["sh".into()],
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            ..RunConfig::default()
        },
    )?)
}

/// Writes `image` into its own OCI layout under `work` and pushes it to `registry` as
/// `repo_and_tag`; returns the full reference.
pub fn push_image(
    registry: &Registry,
    work: &Path,
    image: &Image,
    repo_and_tag: &str,
) -> Result<String> {
    let layout = work.join(format!("layout-{}", repo_and_tag.replace([':', '/'], "-")));
    image::write_layout(&layout, &[(repo_and_tag, image)])?;
    registry.push_oci_layout(&layout, image::tag_of(repo_and_tag), repo_and_tag)
}

/// References of the images pushed by [`push_test_images`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestImages {
    /// `ADDR/pause:3.9`: give it to containerd as its sandbox image.
    pub pause: String,
    /// `ADDR/busybox:latest`.
    pub busybox: String,
}

/// Builds the pause and busybox images and pushes them to `registry` as `pause:3.9` and
/// `busybox:latest`.
pub fn push_test_images(registry: &Registry) -> Result<TestImages> {
    let work = TempDir::with_prefix("bulwark-images-")?;
    let pause_binary = build_pause_binary(work.path())?;
    Ok(TestImages {
        pause: push_image(
            registry,
            work.path(),
            &pause_image(&pause_binary)?,
            "pause:3.9",
        )?,
        busybox: push_image(registry, work.path(), &busybox_image()?, "busybox:latest")?,
    })
}
