//! The few Kubernetes API calls the installer makes from inside the cluster, as its pod's
//! service account (the token and CA Kubernetes mounts into every pod):
//!
//! - labelling its node [`INSTALLED_LABEL`] once Bulwark is installed there, which the
//!   RuntimeClass's `scheduling.nodeSelector` selects, and taking the label off first when
//!   uninstalling, so Wasm pods only land on nodes that can run them;
//! - for the chart's pre-delete hook, switching the installer DaemonSet's pods to
//!   `uninstall` ([`ACTION_ANNOTATION`]) and waiting until every node has run it.
//!
//! Patches are JSON merge patches: they touch only the fields they name.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The node label that says Bulwark is installed on a node (value `"true"`).
pub const INSTALLED_LABEL: &str = "bulwark.dev/installed";
/// The installer DaemonSet's pod-template annotation that says what its init container
/// runs: `install` or `uninstall`.
pub const ACTION_ANNOTATION: &str = "bulwark.dev/action";
/// Where Kubernetes mounts a pod's service account credentials.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// A Kubernetes API call that failed.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// Not running in a pod: the API server's address is not in the environment.
    #[error("not running in a Kubernetes pod: {0} is not set")]
    NotInCluster(&'static str),
    /// The service account's files could not be read.
    #[error("cannot read the pod's service account credentials {path}: {source}")]
    Credentials {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The CA file holds no usable certificate.
    #[error("{path}: no PEM certificate: {message}")]
    Ca {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The request did not get a response.
    #[error("{method} {url}: {message}")]
    Http {
        /// The method.
        method: &'static str,
        /// The URL.
        url: String,
        /// Why.
        message: String,
    },
    /// The API server refused the request.
    #[error("{method} {url}: {status} {message}")]
    Status {
        /// The method.
        method: &'static str,
        /// The URL.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The API server's explanation (its Status object's `message`).
        message: String,
    },
    /// The response was not the JSON object expected.
    #[error("{url}: unexpected response: {message}")]
    Response {
        /// The URL.
        url: String,
        /// What was wrong.
        message: String,
    },
    /// A wait ran out of time.
    #[error("{what} did not happen within {timeout:?}; last seen: {last}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        timeout: Duration,
        /// The last state seen.
        last: String,
    },
}

/// A client of the API server, authenticated as the pod's service account.
pub struct Client {
    agent: ureq::Agent,
    base: String,
    token: String,
    namespace: Option<String>,
}

impl Client {
    /// The client a pod has: the API server from `KUBERNETES_SERVICE_HOST` and
    /// `KUBERNETES_SERVICE_PORT`, credentials from [`SERVICE_ACCOUNT_DIR`].
    pub fn in_cluster() -> Result<Client, KubeError> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST")
            .map_err(|_| KubeError::NotInCluster("KUBERNETES_SERVICE_HOST"))?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT")
            .map_err(|_| KubeError::NotInCluster("KUBERNETES_SERVICE_PORT"))?;
        Client::with_service_account(&host, &port, Path::new(SERVICE_ACCOUNT_DIR))
    }

    /// A client of the API server at `host:port` with the credentials in `dir` (`token`,
    /// `ca.crt`, and `namespace` if present).
    pub fn with_service_account(host: &str, port: &str, dir: &Path) -> Result<Client, KubeError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|source| KubeError::Credentials { path, source })
        };
        let token = String::from_utf8_lossy(&read("token")?).trim().to_owned();
        let ca_path = dir.join("ca.crt");
        let certificates = ureq::tls::parse_pem(&read("ca.crt")?)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(certificate)) => Some(Ok(certificate)),
                Ok(_) => None,
                Err(error) => Some(Err(error)),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| KubeError::Ca {
                path: ca_path.clone(),
                message: error.to_string(),
            })?;
        if certificates.is_empty() {
            return Err(KubeError::Ca {
                path: ca_path,
                message: "the file holds no certificate".into(),
            });
        }
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::new_with_certs(&certificates))
            .build();
        let agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        let namespace = read("namespace")
            .ok()
            .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_owned());
        Ok(Client {
            agent,
            base: api_base(host, port),
            token,
            namespace,
        })
    }

    /// The pod's own namespace, when its service account says.
    pub fn namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
    }

    /// Sets (`Some`) or removes (`None`) `label` on `node`.
    pub fn label_node(
        &self,
        node: &str,
        label: &str,
        value: Option<&str>,
    ) -> Result<(), KubeError> {
        self.merge_patch(
            &format!("/api/v1/nodes/{node}"),
            &json!({ "metadata": { "labels": { label: value } } }),
        )
        .map(drop)
    }

    /// Sets the pod-template annotation [`ACTION_ANNOTATION`] of a DaemonSet to `action`,
    /// which rolls its pods out again.
    pub fn set_daemonset_action(
        &self,
        namespace: &str,
        name: &str,
        action: &str,
    ) -> Result<(), KubeError> {
        self.merge_patch(
            &daemonset_path(namespace, name),
            &json!({ "spec": { "template": { "metadata": {
                "annotations": { ACTION_ANNOTATION: action }
            } } } }),
        )
        .map(drop)
    }

    /// Waits until the DaemonSet's current pod template runs, ready, on every node it
    /// selects, as `kubectl rollout status` decides it.
    pub fn wait_rolled_out(
        &self,
        namespace: &str,
        name: &str,
        timeout: Duration,
    ) -> Result<(), KubeError> {
        let started = Instant::now();
        loop {
            let daemonset = self.get(&daemonset_path(namespace, name))?;
            let progress = Rollout::of(&daemonset);
            if progress.done() {
                return Ok(());
            }
            if started.elapsed() > timeout {
                return Err(KubeError::Timeout {
                    what: format!("the rollout of DaemonSet {namespace}/{name}"),
                    timeout,
                    last: progress.to_string(),
                });
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    fn get(&self, path: &str) -> Result<Value, KubeError> {
        let url = format!("{}{path}", self.base);
        let response = self.authorized(self.agent.get(&url)).call();
        read_response("GET", url, response)
    }

    fn merge_patch(&self, path: &str, patch: &Value) -> Result<Value, KubeError> {
        let url = format!("{}{path}", self.base);
        let response = self
            .authorized(self.agent.patch(&url))
            .header("Content-Type", "application/merge-patch+json")
            .send(patch.to_string());
        read_response("PATCH", url, response)
    }

    /// A request as the service account, asking for JSON.
    fn authorized<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        request
            .header("Authorization", &format!("Bearer {}", self.token))
            .header("Accept", "application/json")
    }
}

/// The API server's base URL (an IPv6 address in brackets).
fn api_base(host: &str, port: &str) -> String {
    if host.contains(':') {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    }
}

fn daemonset_path(namespace: &str, name: &str) -> String {
    format!("/apis/apps/v1/namespaces/{namespace}/daemonsets/{name}")
}

fn read_response(
    method: &'static str,
    url: String,
    response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
) -> Result<Value, KubeError> {
    let mut response = response.map_err(|error| KubeError::Http {
        method,
        url: url.clone(),
        message: error.to_string(),
    })?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .read_to_string()
        .map_err(|error| KubeError::Http {
            method,
            url: url.clone(),
            message: error.to_string(),
        })?;
    let parsed: Option<Value> = serde_json::from_str(&body).ok();
    if !(200..300).contains(&status) {
        // The API server explains refusals in a Status object.
        let message = parsed
            .as_ref()
            .and_then(|status| status["message"].as_str())
            .map_or_else(|| body.trim().to_owned(), str::to_owned);
        return Err(KubeError::Status {
            method,
            url,
            status,
            message,
        });
    }
    parsed.ok_or_else(|| KubeError::Response {
        url,
        message: format!("not JSON: {}", body.chars().take(200).collect::<String>()),
    })
}

/// How far a DaemonSet's rollout has come, from its `metadata` and `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rollout {
    /// Whether the controller has seen the current spec (`status.observedGeneration` is
    /// `metadata.generation`).
    pub observed: bool,
    /// Nodes that should run a pod.
    pub desired: u64,
    /// Nodes running a pod of the current template.
    pub updated: u64,
    /// Nodes whose pod is available.
    pub available: u64,
}

impl Rollout {
    /// Reads a DaemonSet object; missing fields count as zero.
    pub fn of(daemonset: &Value) -> Rollout {
        let number = |value: &Value| value.as_u64().unwrap_or(0);
        let status = &daemonset["status"];
        Rollout {
            observed: number(&status["observedGeneration"])
                >= number(&daemonset["metadata"]["generation"]),
            desired: number(&status["desiredNumberScheduled"]),
            updated: number(&status["updatedNumberScheduled"]),
            available: number(&status["numberAvailable"]),
        }
    }

    /// Every node runs an available pod of the current template.
    pub fn done(&self) -> bool {
        self.observed && self.updated >= self.desired && self.available >= self.desired
    }
}

impl std::fmt::Display for Rollout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.observed {
            return f.write_str("the DaemonSet controller has not seen the change yet");
        }
        write!(
            f,
            "{} of {} nodes updated, {} available",
            self.updated, self.desired, self.available
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rollout_is_done_when_every_node_runs_the_new_template() {
        let daemonset = |generation, observed, desired, updated, available| {
            json!({
                "metadata": { "generation": generation },
                "status": {
                    "observedGeneration": observed,
                    "desiredNumberScheduled": desired,
                    "updatedNumberScheduled": updated,
                    "numberAvailable": available,
                }
            })
        };
        // The controller has not seen the patch: its counts are of the old template.
        assert!(!Rollout::of(&daemonset(3, 2, 2, 2, 2)).done());
        let halfway = Rollout::of(&daemonset(3, 3, 2, 1, 2));
        assert!(!halfway.done());
        assert_eq!(halfway.to_string(), "1 of 2 nodes updated, 2 available");
        assert!(!Rollout::of(&daemonset(3, 3, 2, 2, 1)).done());
        assert!(Rollout::of(&daemonset(3, 3, 2, 2, 2)).done());
        // No node selected: nothing to wait for.
        assert!(
            Rollout::of(
                &json!({ "metadata": { "generation": 1 }, "status": { "observedGeneration": 1 } })
            )
            .done()
        );
    }

    #[test]
    fn the_api_server_address_may_be_ipv6() {
        assert_eq!(api_base("10.96.0.1", "443"), "https://10.96.0.1:443");
        assert_eq!(api_base("fd00::1", "443"), "https://[fd00::1]:443");
    }

    #[test]
    fn credentials_are_read_from_the_service_account_directory() {
        let dir = tempfile::tempdir().unwrap();
        let missing = Client::with_service_account("10.96.0.1", "443", dir.path()).err();
        assert!(
            matches!(&missing, Some(KubeError::Credentials { path, .. }) if path.ends_with("token")),
            "{missing:?}"
        );
        std::fs::write(dir.path().join("token"), "abc\n").unwrap();
        std::fs::write(dir.path().join("ca.crt"), "not a certificate\n").unwrap();
        let error = Client::with_service_account("10.96.0.1", "443", dir.path())
            .err()
            .unwrap();
        assert!(
            error.to_string().contains("ca.crt: no PEM certificate"),
            "{error}"
        );
        // A real bundle (the system's CAs) and a namespace file.
        std::fs::copy(
            "/etc/ssl/certs/ca-certificates.crt",
            dir.path().join("ca.crt"),
        )
        .unwrap();
        std::fs::write(dir.path().join("namespace"), "kube-system\n").unwrap();
        let client = Client::with_service_account("10.96.0.1", "443", dir.path()).unwrap();
        assert_eq!(client.namespace(), Some("kube-system"));
        assert_eq!(client.base, "https://10.96.0.1:443");
        assert_eq!(client.token, "abc");
    }
}
