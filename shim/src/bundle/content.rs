//! OCI Wasm artifacts from containerd's content store. containerd (>= 1.7.7) pulls an
//! artifact without unpacking a rootfs; the module is the image's `application/wasm`
//! layer, which the shim reads through containerd's own API (Images, Content), so it
//! works wherever containerd keeps its root.

use std::io::Write;
use std::path::Path;

use containerd_client::services::v1::{GetImageRequest, ReadContentRequest};
use containerd_client::tonic::Request;
use containerd_client::{Client, with_namespace};

use bulwark_runtime::image::{Digester, Manifest, is_index, manifest_in_index};

/// CRI's annotation with the container's image name.
pub const IMAGE_NAME: &str = "io.kubernetes.cri.image-name";

/// Most bytes read for a manifest or index: they are small JSON documents.
const MAX_DOCUMENT: u64 = 4 << 20;

/// Writes the Wasm layer of `image` to `dest`. `Ok(false)` when the image is not a Wasm
/// artifact (an ordinary image keeps its module in the rootfs).
pub fn fetch_wasm_layer(
    containerd: &str,
    namespace: &str,
    image: &str,
    dest: &Path,
) -> Result<bool, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    runtime.block_on(fetch(containerd, namespace, image, dest))
}

async fn fetch(
    containerd: &str,
    namespace: &str,
    image: &str,
    dest: &Path,
) -> Result<bool, String> {
    let client = Client::from_path(containerd)
        .await
        .map_err(|e| format!("cannot reach containerd at {containerd}: {e}"))?;
    let request = with_namespace!(
        GetImageRequest {
            name: image.to_owned()
        },
        namespace
    );
    let target = client
        .images()
        .get(request)
        .await
        .map_err(|e| format!("image {image}: {}", e.message()))?
        .into_inner()
        .image
        .and_then(|image| image.target)
        .ok_or_else(|| format!("image {image} has no target"))?;
    let mut manifest_digest = target.digest.clone();
    if is_index(&target.media_type) {
        let index = read(&client, namespace, &target.digest, MAX_DOCUMENT).await?;
        manifest_digest = manifest_in_index(&index).map_err(|e| format!("image {image}: {e}"))?;
    }
    let manifest = read(&client, namespace, &manifest_digest, MAX_DOCUMENT).await?;
    let manifest = Manifest::parse(&manifest).map_err(|e| format!("image {image}: {e}"))?;
    if !manifest.is_wasm_artifact() {
        return Ok(false);
    }
    let layer = manifest.wasm_layers().next().ok_or_else(|| {
        format!("image {image}: a Wasm artifact without an application/wasm layer")
    })?;
    // Streamed to the file, never held whole: a module may be hundreds of megabytes, and
    // every pod starting on the node would hold its own copy.
    let mut file = std::fs::File::create(dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    let mut digester = Digester::default();
    stream(&client, namespace, &layer.digest, u64::MAX, |chunk| {
        digester.update(chunk);
        file.write_all(chunk)
            .map_err(|e| format!("{}: {e}", dest.display()))
    })
    .await?;
    if digester.finish() != layer.digest {
        return Err(format!(
            "image {image}: layer {} does not match its digest",
            layer.digest
        ));
    }
    Ok(true)
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
