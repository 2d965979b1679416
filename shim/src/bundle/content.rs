//! OCI Wasm artifacts from containerd's content store. containerd (>= 1.7.7) pulls an
//! artifact without unpacking a rootfs; the module is the image's `application/wasm`
//! layer, which the shim reads through containerd's own API (Containers, Images, Content),
//! so it works wherever containerd keeps its root.
//!
//! The image is the one kubelet pulled: its ID (the config's digest), which CRI records in
//! the container's metadata, not its tag, which may point elsewhere by the time the
//! container starts.

use std::io::Write;
use std::path::Path;

use containerd_client::services::v1::{GetContainerRequest, GetImageRequest, ReadContentRequest};
use containerd_client::tonic::Request;
use containerd_client::{Client, with_namespace};

use bulwark_runtime::image::{Digester, Manifest, is_index, manifest_in_index};
use bulwark_runtime::units::format_size;

/// CRI's annotation with the container's image name.
pub const IMAGE_NAME: &str = "io.kubernetes.cri.image-name";

/// The extension of a container record in which containerd's CRI keeps its metadata
/// (JSON: `{"Version":"v1","Metadata":{"ImageRef":"sha256:<image id>",...}}`), in 1.6, 1.7
/// and 2.x alike.
const CRI_METADATA: &str = "io.cri-containerd.container.metadata";

/// Most bytes read for a manifest or index: they are small JSON documents.
const MAX_DOCUMENT: u64 = 4 << 20;

/// The image a container runs, as the shim finds it in containerd.
#[derive(Debug, Clone)]
pub struct ContainerImage<'a> {
    /// The container's id (its record names the image ID kubelet pulled).
    pub container: &'a str,
    /// The image name CRI annotated the spec with, for messages and where no ID is recorded.
    pub name: &'a str,
}

/// Writes the Wasm layer of the container's image to `dest`, refusing one over
/// `max_size` bytes. `Ok(false)` when the image is not a Wasm artifact (an ordinary image
/// keeps its module in the rootfs).
pub fn fetch_wasm_layer(
    containerd: &str,
    namespace: &str,
    image: &ContainerImage,
    dest: &Path,
    max_size: u64,
) -> Result<bool, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    runtime.block_on(fetch(containerd, namespace, image, dest, max_size))
}

/// The image ID (config digest) CRI recorded for the container, if it recorded one.
async fn image_id(client: &Client, namespace: &str, container: &str) -> Option<String> {
    let request = with_namespace!(
        GetContainerRequest {
            id: container.to_owned()
        },
        namespace
    );
    let record = client
        .containers()
        .get(request)
        .await
        .ok()?
        .into_inner()
        .container?;
    let metadata = record.extensions.get(CRI_METADATA)?;
    let json: serde_json::Value = serde_json::from_slice(&metadata.value).ok()?;
    json["Metadata"]["ImageRef"]
        .as_str()
        .filter(|id| id.starts_with("sha256:"))
        .map(str::to_owned)
}

async fn fetch(
    containerd: &str,
    namespace: &str,
    image: &ContainerImage<'_>,
    dest: &Path,
    max_size: u64,
) -> Result<bool, String> {
    let client = Client::from_path(containerd)
        .await
        .map_err(|e| format!("cannot reach containerd at {containerd}: {e}"))?;
    let id = image_id(&client, namespace, image.container).await;
    let shown = image.name;
    // CRI names every image it pulled by its ID too: that entry is the image kubelet
    // pulled, whatever its tag points at now.
    let lookup = id.as_deref().unwrap_or(image.name);
    let request = with_namespace!(
        GetImageRequest {
            name: lookup.to_owned()
        },
        namespace
    );
    let target = client
        .images()
        .get(request)
        .await
        .map_err(|e| format!("image {shown} ({lookup}): {}", e.message()))?
        .into_inner()
        .image
        .and_then(|image| image.target)
        .ok_or_else(|| format!("image {shown} has no target"))?;
    let mut candidates = vec![target.digest.clone()];
    if is_index(&target.media_type) {
        let index = read(&client, namespace, &target.digest, MAX_DOCUMENT).await?;
        let index_json: serde_json::Value = serde_json::from_slice(&index)
            .map_err(|e| format!("image {shown}: malformed image index: {e}"))?;
        let preferred = manifest_in_index(&index).map_err(|e| format!("image {shown}: {e}"))?;
        candidates = vec![preferred];
        if id.is_some() {
            // Any of its manifests may be the one whose config is the image kubelet pulled.
            candidates.extend(
                index_json["manifests"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|entry| entry["digest"].as_str().map(str::to_owned)),
            );
        }
    }
    let mut chosen = None;
    for digest in candidates {
        let manifest = read(&client, namespace, &digest, MAX_DOCUMENT).await?;
        let manifest = Manifest::parse(&manifest).map_err(|e| format!("image {shown}: {e}"))?;
        if id.as_deref().is_none_or(|id| manifest.config.digest == id) {
            chosen = Some(manifest);
            break;
        }
    }
    let manifest = chosen.ok_or_else(|| {
        format!(
            "image {shown}: no manifest of it has the config {} that kubelet pulled",
            id.as_deref().unwrap_or_default()
        )
    })?;
    if !manifest.is_wasm_artifact() {
        return Ok(false);
    }
    let layer = manifest.wasm_layers().next().ok_or_else(|| {
        format!("image {shown}: a Wasm artifact without an application/wasm layer")
    })?;
    if layer.size > max_size {
        return Err(oversized(shown, layer.size, max_size));
    }
    // Streamed to the file, never held whole: a module may be hundreds of megabytes, and
    // every pod starting on the node would hold its own copy.
    let mut file = std::fs::File::create(dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    let mut digester = Digester::default();
    stream(&client, namespace, &layer.digest, max_size, |chunk| {
        digester.update(chunk);
        file.write_all(chunk)
            .map_err(|e| format!("{}: {e}", dest.display()))
    })
    .await?;
    if digester.finish() != layer.digest {
        return Err(format!(
            "image {shown}: layer {} does not match its digest",
            layer.digest
        ));
    }
    Ok(true)
}

/// The refusal of a module over the node's cap.
pub fn oversized(what: &str, size: u64, max_size: u64) -> String {
    format!(
        "{what} is {}, more than the {} this node takes (compile.module_size in the node configuration)",
        format_size(size),
        format_size(max_size)
    )
}

/// A small document (a manifest or an index) from the content store, whole.
async fn read(
    client: &Client,
    namespace: &str,
    digest: &str,
    limit: u64,
) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    stream(client, namespace, digest, limit, |chunk| {
        bytes.extend_from_slice(chunk);
        Ok(())
    })
    .await?;
    Ok(bytes)
}

/// Hands the blob `digest` to `sink` chunk by chunk, refusing it past `limit` bytes.
async fn stream(
    client: &Client,
    namespace: &str,
    digest: &str,
    limit: u64,
    mut sink: impl FnMut(&[u8]) -> Result<(), String>,
) -> Result<(), String> {
    let request = with_namespace!(
        ReadContentRequest {
            digest: digest.to_owned(),
            offset: 0,
            size: 0,
        },
        namespace
    );
    let mut chunks = client
        .content()
        .read(request)
        .await
        .map_err(|e| format!("content {digest}: {}", e.message()))?
        .into_inner();
    let mut length = 0u64;
    while let Some(chunk) = chunks
        .message()
        .await
        .map_err(|e| format!("content {digest}: {}", e.message()))?
    {
        length += chunk.data.len() as u64;
        if length > limit {
            return Err(format!("content {digest} is larger than {limit} bytes"));
        }
        sink(&chunk.data)?;
    }
    Ok(())
}
