//! Pushing an image to an OCI registry (the distribution API: blob uploads, then the
//! manifest). `insecure` speaks plain HTTP, for a registry on the node's loopback or a lab.
//!
//! Registries that want credentials answer 401 with a `WWW-Authenticate` challenge: `Basic`
//! (the credentials on every request) or `Bearer` (a token from the registry's token
//! service, asked for with the credentials, or anonymously when there are none). The
//! credentials are given ([`Credentials`]) or read from where `docker login` and
//! `podman login` keep them ([`Credentials::stored_for`]).

use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bulwark_runtime::image::{Blob, Image, MANIFEST_MEDIA_TYPE};
use ureq::http::{Response, StatusCode};

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
    /// The registry refused the credentials, or wants some and none were found.
    #[error("{registry} refused the push ({status}): {hint}")]
    Unauthorized {
        /// The registry.
        registry: String,
        /// 401 or 403.
        status: u16,
        /// Which credentials were tried, or how to give some.
        hint: String,
    },
    /// A registry's authentication challenge or token answer that cannot be followed.
    #[error("{registry}: {message}")]
    Challenge {
        /// The registry.
        registry: String,
        /// What was wrong.
        message: String,
    },
    /// A file of stored credentials that cannot be read.
    #[error("{path}: {message}")]
    AuthFile {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
}

/// A registry user name and password (or access token).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password or token.
    pub password: String,
    /// Where they came from, for messages: `--username`, or the file.
    pub source: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// The credentials `podman login` or `docker login` stored for `registry`, from the
    /// first of `$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json` and
    /// `$DOCKER_CONFIG/config.json` (or `~/.docker/config.json`) that has an entry for it.
    /// Credential helpers (`credsStore`, `credHelpers`) are not run.
    pub fn stored_for(registry: &str) -> Result<Option<Credentials>, PushError> {
        let env = |name: &str| std::env::var_os(name).map(PathBuf::from);
        let files = [
            env("REGISTRY_AUTH_FILE"),
            env("XDG_RUNTIME_DIR").map(|dir| dir.join("containers/auth.json")),
            env("DOCKER_CONFIG")
                .or_else(|| env("HOME").map(|home| home.join(".docker")))
                .map(|dir| dir.join("config.json")),
        ];
        for path in files.into_iter().flatten() {
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => {
                    return Err(PushError::AuthFile {
                        path,
                        message: error.to_string(),
                    });
                }
            };
            if let Some(found) = Credentials::from_auth_file(&text, registry, &path)? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// The entry for `registry` in an auth file's `auths` (keys may carry a scheme and a
    /// path, as Docker Hub's `https://index.docker.io/v1/` does).
    fn from_auth_file(
        text: &str,
        registry: &str,
        path: &std::path::Path,
    ) -> Result<Option<Credentials>, PushError> {
        let bad = |message: String| PushError::AuthFile {
            path: path.to_owned(),
            message,
        };
        let file: serde_json::Value =
            serde_json::from_str(text).map_err(|error| bad(format!("not JSON: {error}")))?;
        let Some(auths) = file["auths"].as_object() else {
            return Ok(None);
        };
        let host_of = |key: &str| {
            let key = key.split_once("://").map_or(key, |(_, rest)| rest);
            key.split('/').next().unwrap_or(key).to_owned()
        };
        let Some((key, entry)) = auths.iter().find(|(key, _)| host_of(key) == registry) else {
            return Ok(None);
        };
        let Some(encoded) = entry["auth"].as_str() else {
            return Ok(None);
        };
        let decoded = BASE64
            .decode(encoded)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or_else(|| bad(format!("auths.{key:?}.auth: not base64 of USER:PASSWORD")))?;
        let (username, password) = decoded
            .split_once(':')
            .ok_or_else(|| bad(format!("auths.{key:?}.auth: not base64 of USER:PASSWORD")))?;
        Ok(Some(Credentials {
            username: username.to_owned(),
            password: password.to_owned(),
            source: path.display().to_string(),
        }))
    }

    fn basic(&self) -> String {
        let pair = format!("{}:{}", self.username, self.password);
        format!("Basic {}", BASE64.encode(pair))
    }
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

/// Pushes `image` as `reference`, with `credentials` when the registry asks for them;
/// returns the manifest digest.
pub fn push(
    image: &Image,
    reference: &Reference,
    insecure: bool,
    credentials: Option<&Credentials>,
) -> Result<String, PushError> {
    let scheme = if insecure { "http" } else { "https" };
    let base = format!("{scheme}://{}", reference.registry);
    let mut session = Session {
        agent: ureq::Agent::config_builder()
            .http_status_as_error(false)
            // A registry that stops answering must not hang the push: no read or write
            // may stall longer than this (a big layer still uploads, chunk by chunk).
            .timeout_connect(Some(HTTP_CONNECT_TIMEOUT))
            .timeout_per_read(Some(HTTP_STALL_TIMEOUT))
            .timeout_per_write(Some(HTTP_STALL_TIMEOUT))
            .timeout_recv_response(Some(HTTP_STALL_TIMEOUT))
            // Credentials are sent only where this code decides (see `send_once` and
            // `authorize`), never to where a redirect points.
            .max_redirects(0)
            .build()
            .into(),
        base: base.clone(),
        reference,
        credentials,
        authorization: None,
    };
    for blob in std::iter::once(&image.config).chain(&image.layers) {
        upload_blob(&mut session, blob)?;
    }
    let url = format!(
        "{base}/v2/{}/manifests/{}",
        reference.repository, reference.tag
    );
    let response = session.send(
        "PUT",
        &url,
        Some(MANIFEST_MEDIA_TYPE),
        &image.manifest.bytes[..],
    )?;
    session.expect(response, "PUT", &url, &[201])?;
    Ok(image.manifest.descriptor.digest.clone())
}

/// How long connecting to a registry (or its token service) may take.
const HTTP_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a registry may leave a request without progress (no byte read or written).
const HTTP_STALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Whether Basic credentials may go to a token service at `realm` for a registry at `base`
/// (`scheme://host[:port]`): over TLS, or to the registry itself (an `--insecure` local
/// registry's own token endpoint). A registry names its realm, so a hostile or spoofed one
/// could otherwise ask for the user's password in the clear, or at a host of its choosing.
fn may_send_credentials(realm: &str, base: &str) -> bool {
    realm.starts_with("https://")
        || realm
            .strip_prefix(base)
            .is_some_and(|path| path.starts_with('/'))
}

/// Requests to one registry for one repository, answering its authentication challenges.
struct Session<'a> {
    agent: ureq::Agent,
    /// `scheme://registry`: credentials and tokens go only to URLs under it.
    base: String,
    reference: &'a Reference,
    credentials: Option<&'a Credentials>,
    /// The `Authorization` header the registry accepted last (or none yet).
    authorization: Option<String>,
}

impl Session<'_> {
    /// Sends a request; on a 401 challenge, authorizes and sends it once more.
    fn send<B: ureq::AsSendBody + Copy>(
        &mut self,
        method: &'static str,
        url: &str,
        content_type: Option<&str>,
        body: B,
    ) -> Result<Response<ureq::Body>, PushError> {
        let response = self.send_once(method, url, content_type, body)?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        let Some(challenge) = response
            .headers()
            .get("www-authenticate")
            .and_then(|value| value.to_str().ok())
        else {
            return Ok(response);
        };
        let authorization = self.authorize(challenge)?;
        if self.authorization.as_ref() == Some(&authorization) {
            // Refused with what was accepted before (a token that expired is fetched anew).
            return Ok(response);
        }
        self.authorization = Some(authorization);
        self.send_once(method, url, content_type, body)
    }

    fn send_once<B: ureq::AsSendBody>(
        &self,
        method: &'static str,
        url: &str,
        content_type: Option<&str>,
        body: B,
    ) -> Result<Response<ureq::Body>, PushError> {
        let mut request = ureq::http::Request::builder().method(method).uri(url);
        // An upload's Location may point elsewhere (a storage service): no credentials there.
        let to_registry = url
            .strip_prefix(&self.base)
            .is_some_and(|path| path.starts_with('/'));
        if let Some(authorization) = self.authorization.as_ref().filter(|_| to_registry) {
            request = request.header("Authorization", authorization);
        }
        if let Some(content_type) = content_type {
            request = request.header("Content-Type", content_type);
        }
        let request = request
            .body(body)
            .map_err(|e| http(method, url, e.to_string()))?;
        self.agent
            .run(request)
            .map_err(|e| http(method, url, e.to_string()))
    }

    /// The `Authorization` header that answers `challenge`.
    fn authorize(&self, challenge: &str) -> Result<String, PushError> {
        let registry = &self.reference.registry;
        let (scheme, params) = parse_challenge(challenge).ok_or_else(|| PushError::Challenge {
            registry: registry.clone(),
            message: format!("cannot read its authentication challenge {challenge:?}"),
        })?;
        if scheme.eq_ignore_ascii_case("basic") {
            return match self.credentials {
                Some(credentials) => Ok(credentials.basic()),
                None => Err(self.unauthorized(401)),
            };
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(PushError::Challenge {
                registry: registry.clone(),
                message: format!("unsupported authentication scheme {scheme:?}"),
            });
        }
        let param = |name: &str| {
            params
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.as_str())
        };
        let realm = param("realm").ok_or_else(|| PushError::Challenge {
            registry: registry.clone(),
            message: format!("its Bearer challenge names no realm: {challenge:?}"),
        })?;
        let scope = format!("repository:{}:pull,push", self.reference.repository);
        let mut request = self.agent.get(realm).query("scope", &scope);
        if let Some(service) = param("service") {
            request = request.query("service", service);
        }
        if let Some(credentials) = self.credentials {
            if !may_send_credentials(realm, &self.base) {
                return Err(PushError::Challenge {
                    registry: registry.clone(),
                    message: format!(
                        "its token service {realm} is neither https nor the registry itself: credentials are not sent there"
                    ),
                });
            }
            request = request.header("Authorization", &credentials.basic());
        }
        let response = request
            .call()
            .map_err(|e| http("GET", realm, e.to_string()))?;
        let status = response.status().as_u16();
        if status == 401 || status == 403 {
            return Err(self.unauthorized(status));
        }
        let answer = self.expect(response, "GET", realm, &[200]);
        let text = answer?
            .body_mut()
            .read_to_string()
            .map_err(|e| http("GET", realm, e.to_string()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| PushError::Challenge {
                registry: registry.clone(),
                message: format!("its token service {realm} answered with no JSON: {e}"),
            })?;
        let token = json["token"]
            .as_str()
            .or(json["access_token"].as_str())
            .ok_or_else(|| PushError::Challenge {
                registry: registry.clone(),
                message: format!("its token service {realm} answered with no token"),
            })?;
        Ok(format!("Bearer {token}"))
    }

    fn unauthorized(&self, status: u16) -> PushError {
        let hint = match self.credentials {
            Some(credentials) => format!(
                "the credentials of {} from {} were not accepted",
                credentials.username, credentials.source
            ),
            None => "no credentials for it were found; log in with `docker login` or `podman login`, or pass --username with --password-stdin".into(),
        };
        PushError::Unauthorized {
            registry: self.reference.registry.clone(),
            status,
            hint,
        }
    }

    /// `response` if its status is one of `statuses`; an error that says why otherwise.
    fn expect(
        &self,
        mut response: Response<ureq::Body>,
        method: &'static str,
        url: &str,
        statuses: &[u16],
    ) -> Result<Response<ureq::Body>, PushError> {
        let status = response.status().as_u16();
        if statuses.contains(&status) {
            return Ok(response);
        }
        if status == 401 || status == 403 {
            return Err(self.unauthorized(status));
        }
        let body = response.body_mut().read_to_string().unwrap_or_default();
        Err(http(method, url, format!("HTTP {status}: {}", body.trim())))
    }
}

/// `Scheme key="value", key=value` (RFC 7235), split; quoted values may hold commas.
fn parse_challenge(challenge: &str) -> Option<(String, Vec<(String, String)>)> {
    let challenge = challenge.trim();
    let (scheme, rest) = challenge
        .split_once(char::is_whitespace)
        .unwrap_or((challenge, ""));
    if scheme.is_empty() {
        return None;
    }
    let mut params = Vec::new();
    let mut rest = rest.trim_start();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let after = after.trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim_end(), &after[end..])
        };
        params.push((key.trim().to_owned(), value.to_owned()));
        rest = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    Some((scheme.to_owned(), params))
}

fn upload_blob(session: &mut Session<'_>, blob: &Blob) -> Result<(), PushError> {
    let base = session.base.clone();
    let repository = &session.reference.repository;
    let digest = &blob.descriptor.digest;
    let url = format!("{base}/v2/{repository}/blobs/{digest}");
    let response = session.send("HEAD", &url, None, ())?;
    if response.status() == 200 {
        return Ok(());
    }
    let url = format!("{base}/v2/{repository}/blobs/uploads/");
    let response = session.send("POST", &url, None, ())?;
    let response = session.expect(response, "POST", &url, &[202])?;
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
    let response = session.send(
        "PUT",
        &url,
        Some("application/octet-stream"),
        &blob.bytes[..],
    )?;
    session.expect(response, "PUT", &url, &[201, 204])?;
    Ok(())
}

fn http(method: &'static str, url: &str, message: String) -> PushError {
    PushError::Http {
        method,
        url: url.to_owned(),
        message,
    }
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

    #[test]
    fn credentials_go_only_over_tls_or_to_the_registry_itself() {
        let base = "http://127.0.0.1:5000";
        assert!(may_send_credentials("https://auth.example.com/token", base));
        assert!(may_send_credentials("http://127.0.0.1:5000/token", base));
        assert!(!may_send_credentials("http://auth.example.com/token", base));
        assert!(!may_send_credentials("http://127.0.0.1:50000/token", base));
        assert!(!may_send_credentials(
            "http://127.0.0.1:5000.evil.com/token",
            base
        ));
        assert!(!may_send_credentials(
            "ftp://x/token",
            "https://r.example.com"
        ));
    }

    #[test]
    fn challenges_are_split_into_scheme_and_parameters() {
        let (scheme, params) = parse_challenge(
            r#"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(scheme, "Bearer");
        assert_eq!(
            params,
            [
                ("realm".into(), "https://auth.example.com/token".into()),
                ("service".into(), "registry.example.com".into()),
                ("scope".into(), "repository:a/b:pull,push".into()),
            ]
        );
        let (scheme, params) = parse_challenge(r#"Basic realm="bulwark-test""#).unwrap();
        assert_eq!((scheme.as_str(), params.len()), ("Basic", 1));
        assert_eq!(parse_challenge(r#"Bearer realm="unterminated"#), None);
    }

    #[test]
    fn auth_files_give_the_registry_s_entry() {
        let path = std::path::Path::new("/home/u/.docker/config.json");
        let file = r#"{"auths": {
            "https://index.docker.io/v1/": {"auth": "ZG9jazpodWI="},
            "registry.example.com": {"auth": "YWxpY2U6czNjcjp0"}
        }}"#;
        let found = Credentials::from_auth_file(file, "registry.example.com", path)
            .unwrap()
            .unwrap();
        assert_eq!(
            (found.username.as_str(), found.password.as_str()),
            ("alice", "s3cr:t")
        );
        let hub = Credentials::from_auth_file(file, "index.docker.io", path)
            .unwrap()
            .unwrap();
        assert_eq!(hub.username, "dock");
        assert_eq!(
            Credentials::from_auth_file(file, "other.example.com", path).unwrap(),
            None
        );
        let broken = r#"{"auths": {"registry.example.com": {"auth": "not base64!"}}}"#;
        let error = Credentials::from_auth_file(broken, "registry.example.com", path)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("auths.\"registry.example.com\".auth: not base64"),
            "{error}"
        );
        assert!(!format!("{found:?}").contains("s3cr"), "{found:?}");
    }
}
