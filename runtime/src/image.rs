//! OCI images of Wasm workloads, in the two formats Bulwark runs:
//!
//! 1. **Wasm in a layer**: an ordinary image whose single tar layer holds the module at
//!    `/app.wasm`, with that path as the entrypoint. Every containerd pulls and unpacks it
//!    (1.6 included); the shim finds the module in the container's rootfs.
//! 2. **OCI Wasm artifact** (CNCF TAG Runtime): config `application/vnd.wasm.config.v0+json`
//!    and `application/wasm` layers. containerd >= 1.7.7 pulls it into its content store
//!    without a rootfs; the shim reads the layer from there.
//!
//! Images are written as an OCI image layout (a directory) or as a tar of one, which
//! `ctr image import` and `skopeo copy oci-archive:` read.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Media type of an OCI image manifest.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an OCI image index.
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of an ordinary image config.
pub const IMAGE_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of an uncompressed layer.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
/// Media type of a Wasm artifact's config (CNCF TAG Runtime spec).
pub const WASM_CONFIG_MEDIA_TYPE: &str = "application/vnd.wasm.config.v0+json";
/// Media type of a Wasm artifact's layer.
pub const WASM_LAYER_MEDIA_TYPE: &str = "application/wasm";
/// Where the wasm-in-layer format puts the module, and its entrypoint.
pub const WASM_ENTRYPOINT: &str = "/app.wasm";

/// An image could not be built, written or read.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The filesystem refused.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A manifest or config is not what it claims.
    #[error("malformed {what}: {message}")]
    Malformed {
        /// Which document.
        what: &'static str,
        /// Why.
        message: String,
    },
}

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// What the blob is.
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Bytes.
    pub size: u64,
    /// Annotations (ref names in an index).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An image manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always 2.
    pub schema_version: u32,
    /// [`MANIFEST_MEDIA_TYPE`].
    #[serde(default)]
    pub media_type: String,
    /// Set on artifacts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// The config blob.
    pub config: Descriptor,
    /// The layers, in order.
    pub layers: Vec<Descriptor>,
}

impl Manifest {
    /// Parses a manifest.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ImageError> {
        serde_json::from_slice(bytes).map_err(|error| ImageError::Malformed {
            what: "image manifest",
            message: error.to_string(),
        })
    }

    /// Whether this is a CNCF Wasm artifact (rather than an ordinary image).
    pub fn is_wasm_artifact(&self) -> bool {
        self.config.media_type == WASM_CONFIG_MEDIA_TYPE
    }

    /// The `application/wasm` layers of an artifact.
    pub fn wasm_layers(&self) -> impl Iterator<Item = &Descriptor> {
        self.layers
            .iter()
            .filter(|layer| layer.media_type == WASM_LAYER_MEDIA_TYPE)
    }
}

/// Media type of a Docker manifest list, which containerd may also hold as an image's target.
pub const DOCKER_MANIFEST_LIST_MEDIA_TYPE: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";

/// Whether an image target of `media_type` lists manifests (an OCI index or a Docker
/// manifest list) rather than being one.
pub fn is_index(media_type: &str) -> bool {
    media_type == INDEX_MEDIA_TYPE || media_type == DOCKER_MANIFEST_LIST_MEDIA_TYPE
}

/// The digest of the manifest to run from an index: the entry for the `wasm` platform,
/// which a Wasm artifact's index names, else the first entry.
pub fn manifest_in_index(bytes: &[u8]) -> Result<String, ImageError> {
    let malformed = |message: String| ImageError::Malformed {
        what: "image index",
        message,
    };
    let index: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|error| malformed(error.to_string()))?;
    let manifests = index["manifests"]
        .as_array()
        .ok_or_else(|| malformed("no \"manifests\" list".into()))?;
    manifests
        .iter()
        .find(|entry| entry["platform"]["architecture"] == "wasm")
        .or(manifests.first())
        .and_then(|entry| entry["digest"].as_str())
        .map(str::to_owned)
        .ok_or_else(|| malformed("its first manifest (or its wasm one) has no digest".into()))
}

/// A blob and its descriptor.
#[derive(Debug, Clone)]
pub struct Blob {
    /// Its descriptor.
    pub descriptor: Descriptor,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

impl Blob {
    /// Wraps bytes, computing digest and size.
    pub fn new(media_type: &str, bytes: Vec<u8>) -> Blob {
        Blob {
            descriptor: Descriptor {
                media_type: media_type.to_owned(),
                digest: digest(&bytes),
                size: bytes.len() as u64,
                annotations: BTreeMap::new(),
            },
            bytes,
        }
    }
}

/// `sha256:<hex>` of some bytes.
pub fn digest(bytes: &[u8]) -> String {
    let mut digester = Digester::default();
    digester.update(bytes);
    digester.finish()
}

/// [`digest`] of bytes that arrive in pieces, such as a layer streamed from a content
/// store: nothing needs to hold the whole blob.
#[derive(Default)]
pub struct Digester(Sha256);

impl Digester {
    /// Adds the next bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// `sha256:<hex>` of everything added.
    pub fn finish(self) -> String {
        format!("sha256:{}", crate::engine::hex(&self.0.finalize()))
    }
}

/// An image: manifest, config and layers, all as blobs.
#[derive(Debug, Clone)]
pub struct Image {
    /// The manifest.
    pub manifest: Blob,
    /// The config.
    pub config: Blob,
    /// The layers.
    pub layers: Vec<Blob>,
}

/// One file, directory or symlink of an ordinary image's layer, owned by root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerEntry {
    /// Absolute path in the image, such as `/app.wasm`.
    pub path: String,
    /// What it is.
    pub kind: EntryKind,
}

/// The kinds of [`LayerEntry`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File {
        /// Its contents.
        contents: Vec<u8>,
        /// Permission bits.
        mode: u32,
    },
    /// A directory.
    Dir {
        /// Permission bits.
        mode: u32,
    },
    /// A symbolic link.
    Symlink {
        /// Where it points.
        target: String,
    },
    /// A named pipe.
    Fifo,
    /// A character device node.
    CharDevice {
        /// Its major number.
        major: u32,
        /// Its minor number.
        minor: u32,
    },
}

impl LayerEntry {
    /// A regular file.
    pub fn file(path: impl Into<String>, contents: impl Into<Vec<u8>>, mode: u32) -> LayerEntry {
        LayerEntry {
            path: path.into(),
            kind: EntryKind::File {
                contents: contents.into(),
                mode,
            },
        }
    }

    /// A directory.
    pub fn dir(path: impl Into<String>, mode: u32) -> LayerEntry {
        LayerEntry {
            path: path.into(),
            kind: EntryKind::Dir { mode },
        }
    }

    /// A node of `kind`: a FIFO or a device, as hostile images carry them.
    pub fn node(path: impl Into<String>, kind: EntryKind) -> LayerEntry {
        LayerEntry {
            path: path.into(),
            kind,
        }
    }

    /// A symbolic link.
    pub fn symlink(path: impl Into<String>, target: impl Into<String>) -> LayerEntry {
        LayerEntry {
            path: path.into(),
            kind: EntryKind::Symlink {
                target: target.into(),
            },
        }
    }
}

/// What an ordinary image's config says about running it.
#[derive(Debug, Clone, Default)]
pub struct RunConfig {
    /// Entrypoint.
    pub entrypoint: Vec<String>,
    /// Default arguments.
    pub cmd: Vec<String>,
    /// Environment, `NAME=VALUE`.
    pub env: Vec<String>,
    /// Working directory; empty for none.
    pub working_dir: String,
    /// The user it runs as, `UID[:GID]`; empty for root (what the pod does not override).
    pub user: String,
}

/// The architecture name OCI uses for this host, for ordinary images' configs.
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Builds an ordinary OCI image (linux, this host's architecture) with one layer.
pub fn ordinary_image(entries: &[LayerEntry], run: &RunConfig) -> Result<Image, ImageError> {
    let layer = Blob::new(LAYER_MEDIA_TYPE, tar_layer(entries)?);
    let config = serde_json::json!({
        "architecture": host_architecture(),
        "os": "linux",
        "config": {
            "Entrypoint": run.entrypoint,
            "Cmd": run.cmd,
            "Env": run.env,
            "WorkingDir": run.working_dir,
            "User": run.user,
        },
        "rootfs": { "type": "layers", "diff_ids": [layer.descriptor.digest] },
    });
    let config = Blob::new(IMAGE_CONFIG_MEDIA_TYPE, to_json(&config));
    Ok(image(config, vec![layer], None))
}

/// The wasm-in-layer format: the module at [`WASM_ENTRYPOINT`], which is the entrypoint,
/// run as `user` (`UID[:GID]`, numeric: the image has no /etc/passwd) or root. An image with
/// a non-root user satisfies a pod's `runAsNonRoot` without a `runAsUser`.
pub fn wasm_in_layer(wasm: &[u8], user: Option<&str>) -> Result<Image, ImageError> {
    if let Some(user) = user {
        check_numeric_user(user)?;
    }
    ordinary_image(
        &[LayerEntry::file(WASM_ENTRYPOINT, wasm, 0o644)],
        &RunConfig {
            entrypoint: vec![WASM_ENTRYPOINT.to_owned()],
            user: user.unwrap_or_default().to_owned(),
            ..RunConfig::default()
        },
    )
}

fn check_numeric_user(user: &str) -> Result<(), ImageError> {
    let numeric = |part: &str| !part.is_empty() && part.parse::<u32>().is_ok();
    let valid = match user.split_once(':') {
        Some((uid, gid)) => numeric(uid) && numeric(gid),
        None => numeric(user),
    };
    if valid {
        Ok(())
    } else {
        Err(ImageError::Malformed {
            what: "user",
            message: format!(
                "{user:?} is not UID or UID:GID in numbers (a Wasm image has no /etc/passwd to look names up in)"
            ),
        })
    }
}

/// The CNCF TAG Runtime Wasm artifact: one `application/wasm` layer.
pub fn wasm_artifact(wasm: &[u8]) -> Result<Image, ImageError> {
    let kind = crate::engine::detect_kind(wasm).map_err(|error| ImageError::Malformed {
        what: "module",
        message: error.to_string(),
    })?;
    let layer = Blob::new(WASM_LAYER_MEDIA_TYPE, wasm.to_vec());
    let config = serde_json::json!({
        "architecture": "wasm",
        "os": match kind {
            crate::engine::WasmKind::Module => "wasip1",
            crate::engine::WasmKind::Component => "wasip2",
        },
        "layerDigests": [layer.descriptor.digest],
    });
    let config = Blob::new(WASM_CONFIG_MEDIA_TYPE, to_json(&config));
    Ok(image(config, vec![layer], Some(WASM_CONFIG_MEDIA_TYPE)))
}

fn image(config: Blob, layers: Vec<Blob>, artifact_type: Option<&str>) -> Image {
    let manifest = Manifest {
        schema_version: 2,
        media_type: MANIFEST_MEDIA_TYPE.to_owned(),
        artifact_type: artifact_type.map(str::to_owned),
        config: config.descriptor.clone(),
        layers: layers
            .iter()
            .map(|layer| layer.descriptor.clone())
            .collect(),
    };
    Image {
        manifest: Blob::new(MANIFEST_MEDIA_TYPE, to_json(&manifest)),
        config,
        layers,
    }
}

fn to_json(value: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(value).expect("image documents serialize")
}

/// An uncompressed tar layer of `entries`, with parent directories added (0755) where not
/// listed, all owned by root and dated at the epoch: the same entries give the same bytes.
pub fn tar_layer(entries: &[LayerEntry]) -> Result<Vec<u8>, ImageError> {
    let implicit_dir = EntryKind::Dir { mode: 0o755 };
    let mut by_path: BTreeMap<String, &EntryKind> = BTreeMap::new();
    for entry in entries {
        let relative = entry.path.trim_matches('/');
        if relative.is_empty()
            || relative
                .split('/')
                .any(|c| c == ".." || c == "." || c.is_empty())
        {
            return Err(ImageError::Malformed {
                what: "layer entry",
                message: format!("bad path {:?}", entry.path),
            });
        }
        let mut parent = String::new();
        if let Some((_, ancestors)) = relative.split('/').collect::<Vec<_>>().split_last() {
            for component in ancestors {
                if !parent.is_empty() {
                    parent.push('/');
                }
                parent.push_str(component);
                by_path.entry(parent.clone()).or_insert(&implicit_dir);
            }
        }
        by_path.insert(relative.to_owned(), &entry.kind);
    }
    let io = |path: &str| {
        let path = path.to_owned();
        move |source| ImageError::Io { path, source }
    };
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
                builder
                    .append_data(&mut header, &path, contents.as_slice())
                    .map_err(io(&path))?;
            }
            EntryKind::Dir { mode } => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(*mode);
                header.set_size(0);
                builder
                    .append_data(&mut header, format!("{path}/"), std::io::empty())
                    .map_err(io(&path))?;
            }
            EntryKind::Fifo | EntryKind::CharDevice { .. } => {
                let (entry_type, (major, minor)) = match kind {
                    EntryKind::CharDevice { major, minor } => {
                        (tar::EntryType::Char, (*major, *minor))
                    }
                    _ => (tar::EntryType::Fifo, (0, 0)),
                };
                header.set_entry_type(entry_type);
                header.set_mode(0o644);
                header.set_size(0);
                header.set_device_major(major).map_err(io(&path))?;
                header.set_device_minor(minor).map_err(io(&path))?;
                builder
                    .append_data(&mut header, &path, std::io::empty())
                    .map_err(io(&path))?;
            }
            EntryKind::Symlink { target } => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                builder
                    .append_link(&mut header, &path, target)
                    .map_err(io(&path))?;
            }
        }
    }
    builder.into_inner().map_err(io("layer"))
}

/// The annotation naming an image in an OCI layout's index.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The annotation `ctr image import` takes an image's full name from.
pub const CONTAINERD_IMAGE_NAME: &str = "io.containerd.image.name";

/// Writes images into an OCI image layout directory; `name` is a full reference
/// (`registry/repo:tag`), whose tag becomes the layout's ref name.
pub fn write_layout(dir: &Path, images: &[(&str, &Image)]) -> Result<(), ImageError> {
    for (path, bytes) in layout_files(images) {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| ImageError::Io {
                path: parent.display().to_string(),
                source,
            })?;
        }
        std::fs::write(&path, bytes).map_err(|source| ImageError::Io {
            path: path.display().to_string(),
            source,
        })?;
    }
    Ok(())
}

/// Writes images as a tar of an OCI image layout (`ctr image import FILE`).
pub fn write_archive(path: &Path, images: &[(&str, &Image)]) -> Result<(), ImageError> {
    let io = |source| ImageError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::create(path).map_err(io)?;
    let mut builder = tar::Builder::new(file);
    for (name, bytes) in layout_files(images) {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_size(bytes.len() as u64);
        header.set_mtime(0);
        builder
            .append_data(&mut header, &name, bytes.as_slice())
            .map_err(io)?;
    }
    builder
        .into_inner()
        .and_then(|mut file| file.flush())
        .map_err(io)
}

/// The tag part of a reference (`latest` when it has none).
pub fn tag_of(reference: &str) -> &str {
    let last = reference.rsplit('/').next().unwrap_or(reference);
    last.rsplit_once(':').map_or("latest", |(_, tag)| tag)
}

fn layout_files(images: &[(&str, &Image)]) -> Vec<(String, Vec<u8>)> {
    let mut files = vec![(
        "oci-layout".to_owned(),
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
    )];
    let mut manifests = Vec::new();
    for (name, image) in images {
        for blob in std::iter::once(&image.manifest)
            .chain(std::iter::once(&image.config))
            .chain(&image.layers)
        {
            let hex = blob.descriptor.digest.trim_start_matches("sha256:");
            files.push((format!("blobs/sha256/{hex}"), blob.bytes.clone()));
        }
        let mut descriptor = image.manifest.descriptor.clone();
        descriptor
            .annotations
            .insert(REF_NAME.to_owned(), tag_of(name).to_owned());
        descriptor
            .annotations
            .insert(CONTAINERD_IMAGE_NAME.to_owned(), (*name).to_owned());
        manifests.push(descriptor);
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": manifests,
    });
    files.push(("index.json".to_owned(), to_json(&index)));
    files.sort_by(|a, b| a.0.cmp(&b.0));
    files.dedup_by(|a, b| a.0 == b.0);
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    const WASM: &[u8] = b"\0asm\x01\0\0\0";

    #[test]
    fn wasm_in_layer_has_the_module_as_entrypoint() {
        let image = wasm_in_layer(WASM, None).unwrap();
        let manifest = Manifest::parse(&image.manifest.bytes).unwrap();
        assert!(!manifest.is_wasm_artifact());
        assert_eq!(manifest.layers.len(), 1);
        let config: serde_json::Value = serde_json::from_slice(&image.config.bytes).unwrap();
        assert_eq!(config["config"]["Entrypoint"][0], "/app.wasm");
        assert_eq!(config["os"], "linux");
        let mut archive = tar::Archive::new(image.layers[0].bytes.as_slice());
        let entries: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(entries, ["app.wasm"]);
        assert_eq!(config["config"]["User"], "");
    }

    #[test]
    fn a_layer_image_may_name_a_numeric_user() {
        let image = wasm_in_layer(WASM, Some("65532:65532")).unwrap();
        let config: serde_json::Value = serde_json::from_slice(&image.config.bytes).unwrap();
        assert_eq!(config["config"]["User"], "65532:65532");
        for bad in ["nobody", "65532:", ":1", "1:2:3", "-1"] {
            let error = wasm_in_layer(WASM, Some(bad)).unwrap_err().to_string();
            assert!(error.contains(bad) && error.contains("UID"), "{error}");
        }
    }

    #[test]
    fn artifact_follows_the_tag_runtime_spec() {
        let image = wasm_artifact(WASM).unwrap();
        let manifest = Manifest::parse(&image.manifest.bytes).unwrap();
        assert!(manifest.is_wasm_artifact());
        let layers: Vec<_> = manifest.wasm_layers().collect();
        assert_eq!(layers.len(), 1);
        assert_eq!(layers[0].digest, digest(WASM));
        let config: serde_json::Value = serde_json::from_slice(&image.config.bytes).unwrap();
        assert_eq!(config["os"], "wasip1");
        assert_eq!(config["architecture"], "wasm");
        assert!(wasm_artifact(b"\x7fELF....").is_err());
    }

    #[test]
    fn layouts_and_archives_hold_every_blob() {
        let temp = tempfile::tempdir().unwrap();
        let image = wasm_artifact(WASM).unwrap();
        write_layout(temp.path(), &[("example.com/app:v1", &image)]).unwrap();
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(temp.path().join("index.json")).unwrap())
                .unwrap();
        assert_eq!(index["manifests"][0]["annotations"][REF_NAME], "v1");
        for blob in [&image.manifest, &image.config, &image.layers[0]] {
            let hex = blob.descriptor.digest.trim_start_matches("sha256:");
            assert_eq!(
                std::fs::read(temp.path().join("blobs/sha256").join(hex)).unwrap(),
                blob.bytes
            );
        }
        let archive = temp.path().join("image.tar");
        write_archive(&archive, &[("example.com/app:v1", &image)]).unwrap();
        let mut tar = tar::Archive::new(std::fs::File::open(&archive).unwrap());
        let names: Vec<String> = tar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert!(
            names.contains(&"index.json".to_owned()) && names.contains(&"oci-layout".to_owned())
        );
        assert_eq!(names.len(), 5);
    }

    #[test]
    fn layers_add_parents_and_keep_links() {
        let layer = tar_layer(&[
            LayerEntry::file("/usr/bin/tool", b"x".to_vec(), 0o755),
            LayerEntry::symlink("/bin/sh", "busybox"),
        ])
        .unwrap();
        let mut archive = tar::Archive::new(layer.as_slice());
        let entries: Vec<(String, tar::EntryType)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().display().to_string(),
                    e.header().entry_type(),
                )
            })
            .collect();
        let names: Vec<&str> = entries.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(
            names,
            ["bin/", "bin/sh", "usr/", "usr/bin/", "usr/bin/tool"]
        );
        assert_eq!(entries[1].1, tar::EntryType::Symlink);
        assert!(tar_layer(&[LayerEntry::dir("/a/../b", 0o755)]).is_err());
    }

    #[test]
    fn tags() {
        assert_eq!(tag_of("127.0.0.1:5000/app:v1"), "v1");
        assert_eq!(tag_of("127.0.0.1:5000/app"), "latest");
        assert_eq!(tag_of("app"), "latest");
    }
}
