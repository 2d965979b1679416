//! OCI images built without a Docker engine: an OCI image layout written directly.
//!
//! [`OciLayout`] writes blobs, manifests and the tagged `index.json` of a layout; [`Image`] is
//! an ordinary Linux/amd64 image with a single uncompressed tar layer. [`push_test_images`]
//! builds the two images every CRI test needs (a pause image and busybox) and pushes them to a
//! [`Registry`].

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

use super::registry::Registry;

/// Media type of an OCI image manifest.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an OCI image index.
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of an OCI image configuration.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of an uncompressed tar layer.
pub const TAR_LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
/// The index annotation that names a manifest's tag in a layout.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// An OCI content descriptor: what a manifest or an index points at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// The blob's media type.
    pub media_type: String,
    /// `sha256:<hex>` of the blob.
    pub digest: String,
    /// The blob's size in bytes.
    pub size: u64,
    /// Optional annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    media_type: Option<String>,
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Manifest<'a> {
    schema_version: u32,
    media_type: &'static str,
    config: &'a Descriptor,
    layers: &'a [Descriptor],
}

/// An OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/`).
#[derive(Debug, Clone)]
pub struct OciLayout {
    dir: PathBuf,
}

impl OciLayout {
    /// Opens the layout at `dir`, creating an empty one if there is none.
    pub fn create(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir.join("blobs/sha256"))
            .with_context(|| format!("cannot create the layout {}", dir.display()))?;
        fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
        let layout = Self {
            dir: dir.to_path_buf(),
        };
        if !dir.join("index.json").exists() {
            layout.write_index(&Index {
                schema_version: 2,
                media_type: Some(INDEX_MEDIA_TYPE.into()),
                manifests: Vec::new(),
            })?;
        }
        Ok(layout)
    }

    /// The layout's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stores `bytes` as a blob and returns its descriptor.
    pub fn write_blob(&self, media_type: &str, bytes: &[u8]) -> Result<Descriptor> {
        let digest = sha256_digest(bytes);
        let path = self.blob_path(&digest);
        fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(Descriptor {
            media_type: media_type.to_string(),
            digest,
            size: bytes.len() as u64,
            annotations: BTreeMap::new(),
        })
    }

    /// The path of the blob with `digest` (`sha256:<hex>`).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.dir.join("blobs/sha256").join(hex)
    }

    /// Writes an image manifest over `config` and `layers` (blobs already stored) and tags it
    /// `tag` in `index.json`, replacing an older manifest of that tag. Returns the manifest's
    /// descriptor.
    pub fn add_manifest(
        &self,
        tag: &str,
        config: &Descriptor,
        layers: &[Descriptor],
    ) -> Result<Descriptor> {
        let manifest = serde_json::to_vec(&Manifest {
            schema_version: 2,
            media_type: MANIFEST_MEDIA_TYPE,
            config,
            layers,
        })?;
        let mut descriptor = self.write_blob(MANIFEST_MEDIA_TYPE, &manifest)?;
        descriptor
            .annotations
            .insert(REF_NAME_ANNOTATION.into(), tag.into());
        let mut index: Index = serde_json::from_slice(&fs::read(self.dir.join("index.json"))?)
            .context("the layout's index.json is not an OCI index")?;
        index
            .manifests
            .retain(|m| m.annotations.get(REF_NAME_ANNOTATION).map(String::as_str) != Some(tag));
        index.manifests.push(descriptor.clone());
        self.write_index(&index)?;
        Ok(descriptor)
    }

    fn write_index(&self, index: &Index) -> Result<()> {
        fs::write(self.dir.join("index.json"), serde_json::to_vec(index)?)?;
        Ok(())
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// What one entry of a layer is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file with these contents and permission bits.
    File {
        /// The file's contents.
        contents: Vec<u8>,
        /// Permission bits, such as `0o755`.
        mode: u32,
    },
    /// A directory with these permission bits.
    Dir {
        /// Permission bits, such as `0o755`.
        mode: u32,
    },
    /// A symbolic link to `target`.
    Symlink {
        /// Where the link points (relative or absolute).
        target: String,
    },
}

/// One file, directory or symlink of a layer, owned by root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerEntry {
    /// The absolute path in the image, such as `/bin/busybox`.
    pub path: String,
    /// What it is.
    pub kind: EntryKind,
}

impl LayerEntry {
    /// A regular file at `path` with `contents` and `mode`.
    pub fn file(path: impl Into<String>, contents: impl Into<Vec<u8>>, mode: u32) -> Self {
        Self {
            path: path.into(),
            kind: EntryKind::File {
                contents: contents.into(),
                mode,
            },
        }
    }

    /// A directory at `path` with `mode`.
    pub fn dir(path: impl Into<String>, mode: u32) -> Self {
        Self {
            path: path.into(),
            kind: EntryKind::Dir { mode },
        }
    }

    /// A symlink at `path` pointing to `target`.
    pub fn symlink(path: impl Into<String>, target: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            kind: EntryKind::Symlink {
                target: target.into(),
            },
        }
    }
}

/// Builds an uncompressed tar layer of `entries`. Parent directories that are not listed are
/// added (mode 0755); every entry is owned by root and dated at the epoch, so the same entries
/// always give the same bytes.
pub fn tar_layer(entries: &[LayerEntry]) -> Result<Vec<u8>> {
    let mut by_path: BTreeMap<String, &EntryKind> = BTreeMap::new();
    let implicit_dir = EntryKind::Dir { mode: 0o755 };
    for entry in entries {
        let relative = entry.path.trim_matches('/');
        if relative.is_empty() || relative.split('/').any(|c| c == ".." || c == ".") {
            bail!("bad path in a layer: {:?}", entry.path);
        }
        let mut parent = String::new();
        for component in relative
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .unwrap()
            .1
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(component);
            by_path.entry(parent.clone()).or_insert(&implicit_dir);
        }
        by_path.insert(relative.to_string(), &entry.kind);
    }

    let mut builder = tar::Builder::new(Vec::new());
    for (path, kind) in by_path {
        let mut header = tar::Header::new_gnu();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        match kind {
            EntryKind::File { contents, mode } => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(*mode);
                header.set_size(contents.len() as u64);
                builder.append_data(&mut header, &path, contents.as_slice())?;
            }
            EntryKind::Dir { mode } => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(*mode);
                header.set_size(0);
                builder.append_data(&mut header, format!("{path}/"), std::io::empty())?;
            }
            EntryKind::Symlink { target } => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                builder.append_link(&mut header, &path, target)?;
            }
        }
    }
    Ok(builder.into_inner()?)
}

/// The runtime configuration of an image (the `config` object of its OCI configuration).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env`, as `NAME=value`.
    pub env: Vec<String>,
    /// `WorkingDir`; empty for none.
    pub working_dir: String,
}

/// An ordinary linux/amd64 image: one uncompressed tar layer and a runtime configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Image {
    /// The layer's contents.
    pub entries: Vec<LayerEntry>,
    /// The runtime configuration.
    pub config: ImageConfig,
}

/// What [`Image::write_to`] stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenImage {
    /// The manifest's descriptor (annotated with its tag).
    pub manifest: Descriptor,
    /// The configuration's digest: the image ID containerd reports.
    pub config_digest: String,
    /// The layer's digest (equal to its diff ID: it is uncompressed).
    pub layer_digest: String,
}

impl Image {
    /// Writes the image into `layout` under `tag`.
    pub fn write_to(&self, layout: &OciLayout, tag: &str) -> Result<WrittenImage> {
        let layer = layout.write_blob(TAR_LAYER_MEDIA_TYPE, &tar_layer(&self.entries)?)?;
        let config = serde_json::json!({
            "created": "1970-01-01T00:00:00Z",
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Entrypoint": self.config.entrypoint,
                "Cmd": self.config.cmd,
                "Env": self.config.env,
                "WorkingDir": self.config.working_dir,
            },
            "rootfs": { "type": "layers", "diff_ids": [layer.digest] },
            "history": [{ "created": "1970-01-01T00:00:00Z", "created_by": "bulwark-tests" }],
        });
        let config = layout.write_blob(CONFIG_MEDIA_TYPE, &serde_json::to_vec(&config)?)?;
        let manifest = layout.add_manifest(tag, &config, std::slice::from_ref(&layer))?;
        Ok(WrittenImage {
            manifest,
            config_digest: config.digest,
            layer_digest: layer.digest,
        })
    }
}

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
    Ok(Image {
        entries: vec![LayerEntry::file("/pause", contents, 0o755)],
        config: ImageConfig {
            entrypoint: vec!["/pause".into()],
            ..ImageConfig::default()
        },
    })
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
    Ok(Image {
        entries,
        config: ImageConfig {
            cmd: vec!["sh".into()],
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            ..ImageConfig::default()
        },
    })
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
    let layout = OciLayout::create(&work.path().join("layout"))?;
    let pause_binary = build_pause_binary(work.path())?;
    pause_image(&pause_binary)?.write_to(&layout, "pause")?;
    busybox_image()?.write_to(&layout, "busybox")?;
    Ok(TestImages {
        pause: registry.push_oci_layout(layout.dir(), "pause", "pause:3.9")?,
        busybox: registry.push_oci_layout(layout.dir(), "busybox", "busybox:latest")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_layer_adds_parents_in_order() {
        let layer = tar_layer(&[
            LayerEntry::file("/usr/bin/tool", b"x".to_vec(), 0o755),
            LayerEntry::symlink("/bin/sh", "busybox"),
        ])
        .unwrap();
        let mut archive = tar::Archive::new(layer.as_slice());
        let paths: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(
            paths,
            ["bin/", "bin/sh", "usr/", "usr/bin/", "usr/bin/tool"]
        );
    }

    #[test]
    fn layout_has_a_tagged_manifest() {
        let dir = TempDir::new().unwrap();
        let layout = OciLayout::create(dir.path()).unwrap();
        let image = Image {
            entries: vec![LayerEntry::file("/hello", b"hi".to_vec(), 0o644)],
            config: ImageConfig {
                cmd: vec!["/hello".into()],
                ..ImageConfig::default()
            },
        };
        let first = image.write_to(&layout, "v1").unwrap();
        image.write_to(&layout, "v1").unwrap();
        let index: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.path().join("index.json")).unwrap()).unwrap();
        let manifests = index["manifests"].as_array().unwrap();
        assert_eq!(manifests.len(), 1);
        assert_eq!(manifests[0]["annotations"][REF_NAME_ANNOTATION], "v1");
        assert_eq!(manifests[0]["digest"], first.manifest.digest.as_str());
        let blob = fs::read(layout.blob_path(&first.config_digest)).unwrap();
        assert_eq!(sha256_digest(&blob), first.config_digest);
    }
}
