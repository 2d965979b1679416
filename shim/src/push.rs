//! Pushing an image to an OCI registry (the distribution API: blob uploads, then the
//! manifest). Anonymous access only; `insecure` speaks plain HTTP, for a registry on the
//! node's loopback or a lab.

use bulwark_runtime::image::{Blob, Image, MANIFEST_MEDIA_TYPE};

/// A push that did not complete.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The reference is not `REGISTRY/REPOSITORY[:TAG]`.
    #[error(
        "image reference {0:?}: expected REGISTRY/REPOSITORY[:TAG], e.g. registry.example.com/team/app:v1"
    )]
    Reference(String),
    /// The registry could not be reached or answered with an error.
    #[error("{method} {url}: {message}")]
    Http {
        /// The request method.
        method: &'static str,
        /// The URL.
        url: String,
        /// What went wrong.
        message: String,
    },
}

/// `REGISTRY/REPOSITORY[:TAG]`, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `host[:port]`.
    pub registry: String,
    /// `path/name`.
    pub repository: String,
    /// The tag (`latest` when not given).
    pub tag: String,
}

impl Reference {
    /// Parses a reference that names its registry.
    pub fn parse(text: &str) -> Result<Reference, PushError> {
        let bad = || PushError::Reference(text.to_owned());
        let (registry, rest) = text.split_once('/').ok_or_else(bad)?;
        if !(registry.contains('.') || registry.contains(':') || registry == "localhost") {
            return Err(bad());
        }
        let (repository, tag) = match rest.rsplit_once(':') {
            Some((repository, tag)) if !tag.contains('/') => (repository, tag),
            _ => (rest, "latest"),
        };
        let valid = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/".contains(c))
        };
        if !valid(repository) || tag.is_empty() || tag.len() > 128 {
            return Err(bad());
        }
        Ok(Reference {
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            tag: tag.to_owned(),
        })
    }
}

/// Pushes `image` as `reference`; returns the manifest digest.
pub fn push(image: &Image, reference: &Reference, insecure: bool) -> Result<String, PushError> {
    let scheme = if insecure { "http" } else { "https" };
    let base = format!("{scheme}://{}", reference.registry);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    for blob in std::iter::once(&image.config).chain(&image.layers) {
        upload_blob(&agent, &base, &reference.repository, blob)?;
    }
    let url = format!(
        "{base}/v2/{}/manifests/{}",
        reference.repository, reference.tag
    );
    let response = agent
        .put(&url)
        .header("Content-Type", MANIFEST_MEDIA_TYPE)
        .send(&image.manifest.bytes[..])
        .map_err(|e| http("PUT", &url, e.to_string()))?;
    expect(response, "PUT", &url, &[201])?;
    Ok(image.manifest.descriptor.digest.clone())
}

fn upload_blob(
    agent: &ureq::Agent,
    base: &str,
    repository: &str,
    blob: &Blob,
) -> Result<(), PushError> {
    let digest = &blob.descriptor.digest;
    let url = format!("{base}/v2/{repository}/blobs/{digest}");
    let response = agent
        .head(&url)
        .call()
        .map_err(|e| http("HEAD", &url, e.to_string()))?;
    if response.status() == 200 {
        return Ok(());
    }
    let url = format!("{base}/v2/{repository}/blobs/uploads/");
    let response = agent
        .post(&url)
        .send_empty()
        .map_err(|e| http("POST", &url, e.to_string()))?;
    let response = expect(response, "POST", &url, &[202])?;
    let location = response
        .headers()
        .get("location")
        .and_then(|value| value.to_str().ok())
        .ok_or_else(|| http("POST", &url, "no Location for the upload".into()))?;
    let location = if location.starts_with("http://") || location.starts_with("https://") {
        location.to_owned()
    } else {
        format!("{base}{location}")
    };
    let separator = if location.contains('?') { '&' } else { '?' };
    let url = format!("{location}{separator}digest={digest}");
    let response = agent
        .put(&url)
        .header("Content-Type", "application/octet-stream")
        .send(&blob.bytes[..])
        .map_err(|e| http("PUT", &url, e.to_string()))?;
    expect(response, "PUT", &url, &[201, 204])?;
    Ok(())
}

fn http(method: &'static str, url: &str, message: String) -> PushError {
    PushError::Http {
        method,
        url: url.to_owned(),
        message,
    }
}

fn expect(
    mut response: ureq::http::Response<ureq::Body>,
    method: &'static str,
    url: &str,
    statuses: &[u16],
) -> Result<ureq::http::Response<ureq::Body>, PushError> {
    let status = response.status().as_u16();
    if statuses.contains(&status) {
        return Ok(response);
    }
    let body = response.body_mut().read_to_string().unwrap_or_default();
    Err(http(method, url, format!("HTTP {status}: {}", body.trim())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        assert_eq!(
            Reference::parse("127.0.0.1:5000/hello:v1").unwrap(),
            Reference {
                registry: "127.0.0.1:5000".into(),
                repository: "hello".into(),
                tag: "v1".into()
            }
        );
        let r = Reference::parse("registry.example.com/team/app").unwrap();
        assert_eq!(
            (r.repository.as_str(), r.tag.as_str()),
            ("team/app", "latest")
        );
        for bad in [
            "hello:v1",
            "docker.io",
            "registry.example.com/Upper:v1",
            "localhost/app:",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }
}
