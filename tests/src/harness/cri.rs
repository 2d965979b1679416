//! A CRI (`runtime.v1`) client that talks to containerd the way kubelet does.
//!
//! [`Cri`] wraps the generated gRPC clients of the `k8s-cri` crate over containerd's unix
//! socket. Its helpers send what kubelet sends for an ordinary pod: a sandbox on the host
//! network (no CNI needed) or, with [`PodSpec::pod_network`], in a network namespace of its
//! own (the containerd needs a CNI network: see `ContainerdOptions::pod_network`), with
//! kubelet's labels, annotations and security context; containers with kubelet's resources,
//! security context, log path and termination-message mount, and the pod's sandbox config
//! again with every CreateContainer. Like kubelet, it refuses to create a `runAsNonRoot`
//! container whose user would be root. The API is async (use it from `#[tokio::test]`); the raw
//! clients are there for anything the helpers do not cover.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

pub use k8s_cri::v1::{ContainerState, ContainerStats, ContainerStatus, PodSandboxConfig};

use super::cgroups::PodCgroups;

/// How long one CRI call may take (a pull included).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// kubelet's default `/proc` paths masked in every container (`securitycontext` package).
pub const DEFAULT_MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// kubelet's default read-only `/proc` paths in every container.
pub const DEFAULT_READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// kubelet's default `terminationMessagePath`.
pub const DEFAULT_TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";

/// A pod as a test describes it; [`Cri::sandbox_config`] turns it into what kubelet sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.uid` (a fresh UUID from [`PodSpec::new`]).
    pub uid: String,
    /// The pod's annotations (kubelet adds `kubernetes.io/config.seen` and `.source`).
    pub annotations: BTreeMap<String, String>,
    /// The pod's labels (kubelet adds `io.kubernetes.pod.{name,namespace,uid}`).
    pub labels: BTreeMap<String, String>,
    /// The runtime handler (RuntimeClass handler); empty for containerd's default.
    pub runtime_handler: String,
    /// The pod's cgroup parent. `None`: what kubelet's cgroup driver would give it when the
    /// [`Cri`] has one (see [`PodCgroups`]; made and removed with the pod by the client), else
    /// none at all.
    pub cgroup_parent: Option<String>,
    /// The pod's log directory. `None`: `<kubelet dir>/logs/<namespace>_<name>_<uid>`, as
    /// kubelet's `/var/log/pods/...`.
    pub log_directory: Option<PathBuf>,
    /// `hostNetwork`: the node's network (and UTS) namespace rather than the pod's own.
    pub host_network: bool,
    /// Namespaced sysctls (`securityContext.sysctls`), set in the pod's namespaces.
    pub sysctls: BTreeMap<String, String>,
}

impl PodSpec {
    /// A pod `name` in namespace `default` with a fresh UID, on the default handler.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            namespace: "default".into(),
            uid: new_uid(),
            annotations: BTreeMap::new(),
            labels: BTreeMap::new(),
            runtime_handler: String::new(),
            cgroup_parent: None,
            log_directory: None,
            host_network: true,
            sysctls: BTreeMap::new(),
        }
    }

    /// The pod gets a network namespace, an IP and a hostname of its own (not hostNetwork).
    pub fn pod_network(mut self) -> Self {
        self.host_network = false;
        self
    }

    /// Adds the namespaced sysctl `name=value`.
    pub fn sysctl(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.sysctls.insert(name.into(), value.into());
        self
    }

    /// Adds the annotation `key: value`.
    pub fn annotation(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    /// Sets the runtime handler.
    pub fn runtime_handler(mut self, handler: impl Into<String>) -> Self {
        self.runtime_handler = handler.into();
        self
    }
}

/// A bind mount of a host path into a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// Where it appears in the container.
    pub container_path: String,
    /// The host file or directory.
    pub host_path: PathBuf,
    /// Whether it is read-only.
    pub readonly: bool,
}

/// A container's `securityContext` (with what the pod's adds), as kubelet passes it on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecurityContext {
    /// `runAsUser`.
    pub run_as_user: Option<i64>,
    /// `runAsGroup`.
    pub run_as_group: Option<i64>,
    /// `supplementalGroups` (the pod's).
    pub supplemental_groups: Vec<i64>,
    /// `runAsNonRoot`: kubelet checks it against the user the container would run as.
    pub run_as_non_root: bool,
    /// `allowPrivilegeEscalation: false` (no_new_privs).
    pub no_new_privileges: bool,
    /// `capabilities.drop`.
    pub drop_capabilities: Vec<String>,
    /// `capabilities.add`.
    pub add_capabilities: Vec<String>,
    /// `readOnlyRootFilesystem`.
    pub read_only_root_filesystem: bool,
    /// `seccompProfile.type: RuntimeDefault` (else Unconfined).
    pub seccomp_runtime_default: bool,
}

impl SecurityContext {
    /// What the Pod Security Standard "restricted" asks of a container: non-root (as `uid`,
    /// or the image's user when `None`), no privilege escalation, every capability dropped,
    /// the RuntimeDefault seccomp profile; and a read-only root filesystem besides.
    pub fn restricted(uid: Option<i64>) -> Self {
        SecurityContext {
            run_as_user: uid,
            run_as_group: uid,
            run_as_non_root: true,
            no_new_privileges: true,
            drop_capabilities: vec!["ALL".into()],
            read_only_root_filesystem: true,
            seccomp_runtime_default: true,
            ..SecurityContext::default()
        }
    }
}

/// A container as a test describes it; [`Cri::container_config`] turns it into what kubelet
/// sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSpec {
    /// `name`.
    pub name: String,
    /// The image reference as written in the pod (`ADDR/busybox:latest`).
    pub image: String,
    /// `command` (overrides the image's entrypoint when not empty).
    pub command: Vec<String>,
    /// `args` (override the image's cmd when not empty).
    pub args: Vec<String>,
    /// `env`, in order.
    pub env: Vec<(String, String)>,
    /// `workingDir`; empty for the image's.
    pub working_dir: String,
    /// Extra container annotations (kubelet's own are added).
    pub annotations: BTreeMap<String, String>,
    /// Volume mounts.
    pub mounts: Vec<MountSpec>,
    /// The log path relative to the pod's log directory; `None`: kubelet's `<name>/0.log`.
    pub log_path: Option<String>,
    /// `resources.limits.memory` in bytes.
    pub memory_limit_in_bytes: Option<i64>,
    /// `resources.limits.cpu` in millicores.
    pub cpu_limit_millis: Option<i64>,
    /// `terminationMessagePath`: kubelet mounts a fresh host file there. Defaults to
    /// [`DEFAULT_TERMINATION_MESSAGE_PATH`] as the API server does; `None` for no mount.
    pub termination_message_path: Option<String>,
    /// `securityContext`.
    pub security: SecurityContext,
}

impl ContainerSpec {
    /// A container `name` running `image` with the image's entrypoint and cmd.
    pub fn new(name: impl Into<String>, image: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            image: image.into(),
            command: Vec::new(),
            args: Vec::new(),
            env: Vec::new(),
            working_dir: String::new(),
            annotations: BTreeMap::new(),
            mounts: Vec::new(),
            log_path: None,
            memory_limit_in_bytes: None,
            cpu_limit_millis: None,
            termination_message_path: Some(DEFAULT_TERMINATION_MESSAGE_PATH.into()),
            security: SecurityContext::default(),
        }
    }

    /// Sets the security context.
    pub fn security(mut self, security: SecurityContext) -> Self {
        self.security = security;
        self
    }

    /// Sets `command`.
    pub fn command<S: Into<String>>(mut self, command: impl IntoIterator<Item = S>) -> Self {
        self.command = command.into_iter().map(Into::into).collect();
        self
    }

    /// Sets `args`.
    pub fn args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args = args.into_iter().map(Into::into).collect();
        self
    }

    /// Adds the environment variable `name=value`.
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Adds the container annotation `key: value`.
    pub fn annotation(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    /// Adds a bind mount of `host_path` at `container_path`.
    pub fn mount(
        mut self,
        host_path: impl Into<PathBuf>,
        container_path: impl Into<String>,
        readonly: bool,
    ) -> Self {
        self.mounts.push(MountSpec {
            container_path: container_path.into(),
            host_path: host_path.into(),
            readonly,
        });
        self
    }

    /// Sets the memory limit.
    pub fn memory_limit(mut self, bytes: i64) -> Self {
        self.memory_limit_in_bytes = Some(bytes);
        self
    }

    /// Sets the CPU limit, in millicores.
    pub fn cpu_limit(mut self, millis: i64) -> Self {
        self.cpu_limit_millis = Some(millis);
        self
    }
}

/// How a container ended, as kubelet sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerExit {
    /// Its exit code.
    pub exit_code: i32,
    /// The runtime's reason (`Completed`, `Error`, `OOMKilled`, ...).
    pub reason: String,
    /// The runtime's message.
    pub message: String,
    /// What the container wrote to its termination-message file (empty if nothing).
    pub termination_message: String,
}

/// The stream a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One line of a CRI container log (partial lines joined).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// The RFC 3339 time of the line's last fragment.
    pub time: String,
    /// Which stream.
    pub stream: LogStream,
    /// The line, without its newline.
    pub text: String,
}

/// Reads a CRI container log: lines of `TIMESTAMP STREAM TAG TEXT`, where tag `P` marks a
/// partial line continued by the next entry of the same stream and `F` a full one.
pub fn read_log(path: &Path) -> Result<Vec<LogLine>> {
    let contents =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_log(&contents).with_context(|| format!("{} is not a CRI log", path.display()))
}

/// Parses the contents of a CRI container log (see [`read_log`]).
pub fn parse_log(contents: &str) -> Result<Vec<LogLine>> {
    let mut lines = Vec::new();
    let mut partial: HashMap<LogStream, String> = HashMap::new();
    for line in contents.lines() {
        let mut fields = line.splitn(4, ' ');
        let (Some(time), Some(stream), Some(tag)) = (fields.next(), fields.next(), fields.next())
        else {
            bail!("bad log line {line:?}");
        };
        let text = fields.next().unwrap_or("");
        let stream = match stream {
            "stdout" => LogStream::Stdout,
            "stderr" => LogStream::Stderr,
            other => bail!("bad stream {other:?} in log line {line:?}"),
        };
        let pending = partial.entry(stream).or_default();
        pending.push_str(text);
        match tag.split(':').next() {
            Some("P") => {}
            Some("F") => lines.push(LogLine {
                time: time.to_string(),
                stream,
                text: std::mem::take(pending),
            }),
            _ => bail!("bad tag {tag:?} in log line {line:?}"),
        }
    }
    Ok(lines)
}

/// A CRI client connected to a runtime's socket.
#[derive(Debug, Clone)]
pub struct Cri {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    socket: PathBuf,
    kubelet_dir: PathBuf,
    pod_cgroups: Option<PodCgroups>,
    /// Cgroup parents the client chose, by pod ID, to remove with the pod.
    chosen_cgroups: Arc<Mutex<HashMap<String, String>>>,
    _own_dir: Option<Arc<TempDir>>,
}

impl Cri {
    /// Connects to the CRI socket `socket`. Logs and termination-message files go into a
    /// temporary directory that lives as long as the client; pods get no cgroup parent unless
    /// their spec names one.
    pub async fn connect(socket: &Path) -> Result<Self> {
        let dir = TempDir::with_prefix("bulwark-kubelet-")?;
        let mut cri = Self::connect_with(socket, dir.path(), None).await?;
        cri._own_dir = Some(Arc::new(dir));
        Ok(cri)
    }

    /// Connects to the CRI socket `socket`, keeping logs and termination-message files under
    /// `kubelet_dir` and giving pods cgroups as kubelet's driver would (`pod_cgroups`) by
    /// default.
    pub async fn connect_with(
        socket: &Path,
        kubelet_dir: &Path,
        pod_cgroups: Option<PodCgroups>,
    ) -> Result<Self> {
        let path = socket.to_path_buf();
        let channel =
            Endpoint::from_static("http://localhost")
                .connect_timeout(Duration::from_secs(5))
                .timeout(CALL_TIMEOUT)
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }))
                .await
                .with_context(|| format!("cannot connect to {}", socket.display()))?;
        Ok(Self {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            socket: socket.to_path_buf(),
            kubelet_dir: kubelet_dir.to_path_buf(),
            pod_cgroups,
            chosen_cgroups: Arc::default(),
            _own_dir: None,
        })
    }

    /// A new connection to the same runtime (after it restarted), as kubelet reconnects:
    /// the same kubelet directory and the same record of the pods' cgroups.
    pub async fn reconnect(&self) -> Result<Self> {
        let mut cri =
            Self::connect_with(&self.socket, &self.kubelet_dir, self.pod_cgroups.clone()).await?;
        cri.chosen_cgroups = self.chosen_cgroups.clone();
        cri._own_dir = self._own_dir.clone();
        Ok(cri)
    }

    /// The generated RuntimeService client, for calls the helpers do not cover.
    pub fn runtime_client(&self) -> RuntimeServiceClient<Channel> {
        self.runtime.clone()
    }

    /// The generated ImageService client, for calls the helpers do not cover.
    pub fn image_client(&self) -> ImageServiceClient<Channel> {
        self.images.clone()
    }

    /// Where logs (`logs/`) and termination-message files (`pods/`) go.
    pub fn kubelet_dir(&self) -> &Path {
        &self.kubelet_dir
    }

    /// `Version`: the runtime's name and version.
    pub async fn version(&self) -> Result<cri::VersionResponse> {
        let request = cri::VersionRequest {
            version: "v1".into(),
        };
        Ok(self.runtime.clone().version(request).await?.into_inner())
    }

    /// `PullImage`: pulls `image` and returns its image reference (the image ID).
    pub async fn pull(&self, image: &str) -> Result<String> {
        let request = cri::PullImageRequest {
            image: Some(image_spec(image)),
            ..Default::default()
        };
        let response = self
            .images
            .clone()
            .pull_image(request)
            .await
            .with_context(|| format!("cannot pull {image}"))?;
        Ok(response.into_inner().image_ref)
    }

    /// `ImageStatus`: the image ID of `image` if the runtime has it.
    pub async fn image_id(&self, image: &str) -> Result<Option<String>> {
        let request = cri::ImageStatusRequest {
            image: Some(image_spec(image)),
            verbose: false,
        };
        let response = self.images.clone().image_status(request).await?;
        Ok(response.into_inner().image.map(|i| i.id))
    }

    /// The `PodSandboxConfig` kubelet sends for `pod`: host network, kubelet's labels and
    /// annotations, RuntimeDefault seccomp for the sandbox, and the cgroup parent and log
    /// directory as [`PodSpec`] explains.
    pub fn sandbox_config(&self, pod: &PodSpec) -> PodSandboxConfig {
        let mut labels = pod.labels.clone();
        labels.insert("io.kubernetes.pod.name".into(), pod.name.clone());
        labels.insert("io.kubernetes.pod.namespace".into(), pod.namespace.clone());
        labels.insert("io.kubernetes.pod.uid".into(), pod.uid.clone());
        let mut annotations = pod.annotations.clone();
        annotations
            .entry("kubernetes.io/config.seen".into())
            .or_insert_with(now_rfc3339);
        annotations
            .entry("kubernetes.io/config.source".into())
            .or_insert_with(|| "api".into());
        PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: pod.name.clone(),
                uid: pod.uid.clone(),
                namespace: pod.namespace.clone(),
                attempt: 0,
            }),
            // kubelet sets no hostname for a host-network pod.
            hostname: if pod.host_network {
                String::new()
            } else {
                pod.name.clone()
            },
            log_directory: self.log_directory(pod).display().to_string(),
            labels: labels.into_iter().collect(),
            annotations: annotations.into_iter().collect(),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent(pod),
                sysctls: pod.sysctls.clone().into_iter().collect(),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(pod_namespaces(pod)),
                    seccomp: Some(cri::SecurityProfile {
                        profile_type: cri::security_profile::ProfileType::RuntimeDefault.into(),
                        localhost_ref: String::new(),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// `RunPodSandbox` for `pod` on its runtime handler; creates the pod's log directory first,
    /// as kubelet does. Returns the pod sandbox ID.
    pub async fn run_pod(&self, pod: &PodSpec) -> Result<String> {
        let config = self.sandbox_config(pod);
        fs::create_dir_all(&config.log_directory)
            .with_context(|| format!("cannot create {}", config.log_directory))?;
        let cgroup_parent = config
            .linux
            .as_ref()
            .map(|l| l.cgroup_parent.clone())
            .unwrap_or_default();
        let request = cri::RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: pod.runtime_handler.clone(),
        };
        let chosen = match &self.pod_cgroups {
            Some(driver) if pod.cgroup_parent.is_none() && !cgroup_parent.is_empty() => {
                driver.create_pod(&cgroup_parent)?;
                Some(driver)
            }
            _ => None,
        };
        let response = self.runtime.clone().run_pod_sandbox(request).await;
        let id = match response {
            Ok(response) => response.into_inner().pod_sandbox_id,
            Err(status) => {
                // The runtime may have made the cgroup even if it failed.
                if let Some(driver) = chosen {
                    let _ = driver.remove_pod(&cgroup_parent);
                }
                return Err(status).with_context(|| {
                    format!(
                        "RunPodSandbox of {} (handler {:?}) failed",
                        pod.name, pod.runtime_handler
                    )
                });
            }
        };
        if chosen.is_some() {
            self.chosen_cgroups
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id.clone(), cgroup_parent);
        }
        Ok(id)
    }

    /// The `ContainerConfig` kubelet sends for `container` of `pod`, with `image_ref` (the
    /// image ID) as its image. `termination_file` is the host file mounted at the termination
    /// message path, if any.
    pub fn container_config(
        &self,
        pod: &PodSpec,
        container: &ContainerSpec,
        image_ref: &str,
        termination_file: Option<&Path>,
    ) -> cri::ContainerConfig {
        let mut labels = BTreeMap::new();
        labels.insert("io.kubernetes.container.name", container.name.clone());
        labels.insert("io.kubernetes.pod.name", pod.name.clone());
        labels.insert("io.kubernetes.pod.namespace", pod.namespace.clone());
        labels.insert("io.kubernetes.pod.uid", pod.uid.clone());

        let mut annotations = container.annotations.clone();
        let hash = Sha256::digest(format!("{container:?}"));
        let mut kubelet_annotation = |key: &str, value: String| {
            annotations.entry(key.to_string()).or_insert(value);
        };
        kubelet_annotation(
            "io.kubernetes.container.hash",
            format!(
                "{:08x}",
                u32::from_be_bytes([hash[0], hash[1], hash[2], hash[3]])
            ),
        );
        kubelet_annotation("io.kubernetes.container.restartCount", "0".into());
        kubelet_annotation(
            "io.kubernetes.container.terminationMessagePath",
            container
                .termination_message_path
                .clone()
                .unwrap_or_default(),
        );
        kubelet_annotation(
            "io.kubernetes.container.terminationMessagePolicy",
            "File".into(),
        );
        kubelet_annotation("io.kubernetes.pod.terminationGracePeriod", "30".into());

        let mut mounts: Vec<cri::Mount> = container
            .mounts
            .iter()
            .map(|m| cri::Mount {
                container_path: m.container_path.clone(),
                host_path: m.host_path.display().to_string(),
                readonly: m.readonly,
                ..Default::default()
            })
            .collect();
        if let (Some(path), Some(file)) = (&container.termination_message_path, termination_file) {
            mounts.push(cri::Mount {
                container_path: path.clone(),
                host_path: file.display().to_string(),
                ..Default::default()
            });
        }

        cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: container.name.clone(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: image_ref.to_string(),
                user_specified_image: container.image.clone(),
                ..Default::default()
            }),
            command: container.command.clone(),
            args: container.args.clone(),
            working_dir: container.working_dir.clone(),
            envs: container
                .env
                .iter()
                .map(|(key, value)| cri::KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                })
                .collect(),
            mounts,
            labels: labels
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            annotations: annotations.into_iter().collect(),
            log_path: container
                .log_path
                .clone()
                .unwrap_or_else(|| format!("{}/0.log", container.name)),
            linux: Some(cri::LinuxContainerConfig {
                resources: Some(container_resources(container)),
                security_context: Some(container_security(pod, &container.security)),
            }),
            ..Default::default()
        }
    }

    /// `CreateContainer` of `container` in the pod `pod_id` made from `pod`, as kubelet does
    /// it: the image is pulled if the runtime lacks it and referred to by its ID, the
    /// container's log directory and termination-message file are created, and the pod's
    /// sandbox config (annotations included) goes along. Returns the container ID.
    pub async fn create_container(
        &self,
        pod_id: &str,
        pod: &PodSpec,
        container: &ContainerSpec,
    ) -> Result<String> {
        let image_ref = match self.image_id(&container.image).await? {
            Some(id) => id,
            None => self.pull(&container.image).await?,
        };
        if container.security.run_as_non_root {
            self.verify_run_as_non_root(container).await?;
        }
        let sandbox_config = self.sandbox_config(pod);
        let log_dir = self.log_directory(pod).join(&container.name);
        fs::create_dir_all(&log_dir)
            .with_context(|| format!("cannot create {}", log_dir.display()))?;
        let termination_file = match container.termination_message_path {
            Some(_) => Some(self.termination_file(pod, container)?),
            None => None,
        };
        let config = self.container_config(pod, container, &image_ref, termination_file.as_deref());
        let request = cri::CreateContainerRequest {
            pod_sandbox_id: pod_id.to_string(),
            config: Some(config),
            sandbox_config: Some(sandbox_config),
        };
        let response = self
            .runtime
            .clone()
            .create_container(request)
            .await
            .with_context(|| format!("CreateContainer of {} failed", container.name))?;
        Ok(response.into_inner().container_id)
    }

    /// kubelet's `verifyRunAsNonRoot`: the container must not run as root, by its
    /// `runAsUser` or else by its image's user, which must then be numeric.
    async fn verify_run_as_non_root(&self, container: &ContainerSpec) -> Result<()> {
        let uid = match container.security.run_as_user {
            Some(uid) => uid,
            None => {
                let request = cri::ImageStatusRequest {
                    image: Some(image_spec(&container.image)),
                    verbose: false,
                };
                let image = self
                    .images
                    .clone()
                    .image_status(request)
                    .await?
                    .into_inner()
                    .image
                    .context("the image is gone")?;
                match image.uid {
                    Some(uid) => uid.value,
                    None if image.username.is_empty() => 0,
                    None => bail!(
                        "container has runAsNonRoot and image has non-numeric user ({}), cannot verify user is non-root",
                        image.username
                    ),
                }
            }
        };
        if uid == 0 {
            bail!(
                "container has runAsNonRoot and image will run as root (container: {})",
                container.name
            );
        }
        Ok(())
    }

    /// `StartContainer`.
    pub async fn start_container(&self, container_id: &str) -> Result<()> {
        let request = cri::StartContainerRequest {
            container_id: container_id.to_string(),
        };
        self.runtime
            .clone()
            .start_container(request)
            .await
            .with_context(|| format!("StartContainer of {container_id} failed"))?;
        Ok(())
    }

    /// `ContainerStatus`.
    pub async fn container_status(&self, container_id: &str) -> Result<ContainerStatus> {
        let request = cri::ContainerStatusRequest {
            container_id: container_id.to_string(),
            verbose: false,
        };
        self.runtime
            .clone()
            .container_status(request)
            .await
            .with_context(|| format!("ContainerStatus of {container_id} failed"))?
            .into_inner()
            .status
            .context("ContainerStatus returned no status")
    }

    /// The pid of a container's process, from the runtime's verbose `ContainerStatus` (for
    /// a Bulwark container: its workload process; for runc: its init).
    pub async fn container_pid(&self, container_id: &str) -> Result<u32> {
        let request = cri::ContainerStatusRequest {
            container_id: container_id.to_string(),
            verbose: true,
        };
        let response = self
            .runtime
            .clone()
            .container_status(request)
            .await
            .with_context(|| format!("ContainerStatus of {container_id} failed"))?
            .into_inner();
        let info: serde_json::Value =
            serde_json::from_str(response.info.get("info").context("no verbose info")?)?;
        info["pid"]
            .as_u64()
            .filter(|pid| *pid != 0)
            .map(|pid| pid as u32)
            .with_context(|| format!("no pid in the status of {container_id}: {info}"))
    }

    /// Polls `ContainerStatus` until the container has exited, for at most `timeout`, and
    /// reads its termination message as kubelet does (from the host side of the mount).
    pub async fn wait_exited(
        &self,
        container_id: &str,
        timeout: Duration,
    ) -> Result<ContainerExit> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.container_status(container_id).await?;
            if status.state() == ContainerState::ContainerExited {
                let termination_message = termination_message(&status);
                return Ok(ContainerExit {
                    exit_code: status.exit_code,
                    reason: status.reason,
                    message: status.message,
                    termination_message,
                });
            }
            if Instant::now() >= deadline {
                bail!(
                    "container {container_id} has not exited after {timeout:?}: state {:?}, \
                     reason {:?}, message {:?}",
                    status.state(),
                    status.reason,
                    status.message
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `StopContainer`, giving the container `grace` to stop after SIGTERM.
    pub async fn stop_container(&self, container_id: &str, grace: Duration) -> Result<()> {
        let request = cri::StopContainerRequest {
            container_id: container_id.to_string(),
            timeout: i64::try_from(grace.as_secs()).unwrap_or(i64::MAX),
        };
        self.runtime
            .clone()
            .stop_container(request)
            .await
            .with_context(|| format!("StopContainer of {container_id} failed"))?;
        Ok(())
    }

    /// `RemoveContainer`.
    pub async fn remove_container(&self, container_id: &str) -> Result<()> {
        let request = cri::RemoveContainerRequest {
            container_id: container_id.to_string(),
        };
        self.runtime
            .clone()
            .remove_container(request)
            .await
            .with_context(|| format!("RemoveContainer of {container_id} failed"))?;
        Ok(())
    }

    /// `StopPodSandbox`.
    pub async fn stop_pod(&self, pod_id: &str) -> Result<()> {
        let request = cri::StopPodSandboxRequest {
            pod_sandbox_id: pod_id.to_string(),
        };
        self.runtime
            .clone()
            .stop_pod_sandbox(request)
            .await
            .with_context(|| format!("StopPodSandbox of {pod_id} failed"))?;
        Ok(())
    }

    /// `RemovePodSandbox`, then removal of the pod's cgroup if this client chose it.
    pub async fn remove_pod(&self, pod_id: &str) -> Result<()> {
        let request = cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod_id.to_string(),
        };
        self.runtime
            .clone()
            .remove_pod_sandbox(request)
            .await
            .with_context(|| format!("RemovePodSandbox of {pod_id} failed"))?;
        let cgroup = self
            .chosen_cgroups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(pod_id);
        if let (Some(cgroup), Some(driver)) = (cgroup, &self.pod_cgroups) {
            driver.remove_pod(&cgroup)?;
        }
        Ok(())
    }

    /// Takes a pod down as kubelet does when it is deleted: each of `containers` stopped
    /// (10 s of grace) and removed, then the pod sandbox stopped and removed.
    pub async fn tear_down(&self, pod_id: &str, containers: &[&str]) -> Result<()> {
        for id in containers {
            self.stop_container(id, Duration::from_secs(10)).await?;
            self.remove_container(id).await?;
        }
        self.stop_pod(pod_id).await?;
        self.remove_pod(pod_id).await
    }

    /// `PodSandboxStatus`.
    pub async fn pod_status(&self, pod_id: &str) -> Result<cri::PodSandboxStatus> {
        let request = cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.to_string(),
            verbose: false,
        };
        self.runtime
            .clone()
            .pod_sandbox_status(request)
            .await
            .with_context(|| format!("PodSandboxStatus of {pod_id} failed"))?
            .into_inner()
            .status
            .context("PodSandboxStatus returned no status")
    }

    /// The runtime's verbose `info` of a pod sandbox (containerd: its `pid`, `runtimeSpec`
    /// with the namespace paths, ...).
    pub async fn pod_info(&self, pod_id: &str) -> Result<serde_json::Value> {
        let request = cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.to_string(),
            verbose: true,
        };
        let response = self
            .runtime
            .clone()
            .pod_sandbox_status(request)
            .await
            .with_context(|| format!("PodSandboxStatus of {pod_id} failed"))?
            .into_inner();
        let info = response.info.get("info").context("no verbose info")?;
        serde_json::from_str(info).context("the verbose info is not JSON")
    }

    /// The IP of a pod that is not hostNetwork.
    pub async fn pod_ip(&self, pod_id: &str) -> Result<std::net::IpAddr> {
        let status = self.pod_status(pod_id).await?;
        let ip = status.network.map(|n| n.ip).unwrap_or_default();
        ip.parse()
            .with_context(|| format!("pod {pod_id} has no IP ({ip:?})"))
    }

    /// `ListPodSandbox` without a filter.
    pub async fn list_pods(&self) -> Result<Vec<cri::PodSandbox>> {
        let request = cri::ListPodSandboxRequest { filter: None };
        Ok(self
            .runtime
            .clone()
            .list_pod_sandbox(request)
            .await?
            .into_inner()
            .items)
    }

    /// `ListContainers` without a filter.
    pub async fn list_containers(&self) -> Result<Vec<cri::Container>> {
        let request = cri::ListContainersRequest { filter: None };
        Ok(self
            .runtime
            .clone()
            .list_containers(request)
            .await?
            .into_inner()
            .containers)
    }

    /// `ContainerStats`.
    pub async fn container_stats(&self, container_id: &str) -> Result<ContainerStats> {
        let request = cri::ContainerStatsRequest {
            container_id: container_id.to_string(),
        };
        self.runtime
            .clone()
            .container_stats(request)
            .await
            .with_context(|| format!("ContainerStats of {container_id} failed"))?
            .into_inner()
            .stats
            .context("ContainerStats returned no stats")
    }

    /// `ExecSync`: runs `command` in the container and returns its output and exit code.
    pub async fn exec_sync(
        &self,
        container_id: &str,
        command: &[&str],
        timeout: Duration,
    ) -> Result<cri::ExecSyncResponse> {
        let request = cri::ExecSyncRequest {
            container_id: container_id.to_string(),
            cmd: command.iter().map(|c| c.to_string()).collect(),
            timeout: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
        };
        Ok(self
            .runtime
            .clone()
            .exec_sync(request)
            .await
            .with_context(|| format!("ExecSync of {command:?} in {container_id} failed"))?
            .into_inner())
    }

    /// The log of a container, found through its status.
    pub async fn read_container_log(&self, container_id: &str) -> Result<Vec<LogLine>> {
        let status = self.container_status(container_id).await?;
        read_log(Path::new(&status.log_path))
    }

    /// Stops and removes every container and pod the runtime has, as kubelet would when
    /// their pods are deleted: the clean-up after a test that failed half-way. Returns how
    /// many containers and pods it removed.
    pub async fn remove_everything(&self) -> Result<usize> {
        let mut removed = 0;
        for container in self.list_containers().await? {
            self.stop_container(&container.id, Duration::ZERO).await?;
            self.remove_container(&container.id).await?;
            removed += 1;
        }
        for pod in self.list_pods().await? {
            self.stop_pod(&pod.id).await?;
            self.remove_pod(&pod.id).await?;
            removed += 1;
        }
        Ok(removed)
    }

    fn log_directory(&self, pod: &PodSpec) -> PathBuf {
        pod.log_directory.clone().unwrap_or_else(|| {
            self.kubelet_dir
                .join("logs")
                .join(format!("{}_{}_{}", pod.namespace, pod.name, pod.uid))
        })
    }

    /// The cgroup parent `pod` gets (see [`PodSpec::cgroup_parent`]). Empty for none.
    pub fn cgroup_parent(&self, pod: &PodSpec) -> String {
        match (&pod.cgroup_parent, &self.pod_cgroups) {
            (Some(parent), _) => parent.clone(),
            (None, Some(driver)) => driver.pod_parent(&pod.uid),
            (None, None) => String::new(),
        }
    }

    /// The cgroup (a path for [`super::cgroups::dirs_of`]) of container `id` of `pod`.
    pub fn container_cgroup(&self, pod: &PodSpec, id: &str) -> String {
        let parent = self.cgroup_parent(pod);
        match &self.pod_cgroups {
            Some(driver) => driver.container_cgroup(&parent, id),
            None => format!("{parent}/{id}"),
        }
    }

    /// Creates the host file kubelet mounts at the termination message path, world-writable
    /// as kubelet makes it.
    fn termination_file(&self, pod: &PodSpec, container: &ContainerSpec) -> Result<PathBuf> {
        let dir = self
            .kubelet_dir
            .join("pods")
            .join(&pod.uid)
            .join("containers")
            .join(&container.name);
        fs::create_dir_all(&dir)?;
        let file = dir.join(&new_uid()[..8]);
        fs::write(&file, b"")?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&file, fs::Permissions::from_mode(0o666))?;
        Ok(file)
    }
}

/// Reads the termination message from the host side of the container's mount at its
/// termination message path, as kubelet does.
fn termination_message(status: &ContainerStatus) -> String {
    let Some(path) = status
        .annotations
        .get("io.kubernetes.container.terminationMessagePath")
        .filter(|p| !p.is_empty())
    else {
        return String::new();
    };
    status
        .mounts
        .iter()
        .find(|m| &m.container_path == path)
        .and_then(|m| fs::read(&m.host_path).ok())
        .map(|bytes| String::from_utf8_lossy(&bytes[..bytes.len().min(4096)]).into_owned())
        .unwrap_or_default()
}

/// kubelet's `NamespacesForPod`: the pod's own IPC namespace, a PID namespace per
/// container, and the node's network namespace for a hostNetwork pod, else the pod's own.
fn pod_namespaces(pod: &PodSpec) -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: if pod.host_network {
            cri::NamespaceMode::Node
        } else {
            cri::NamespaceMode::Pod
        }
        .into(),
        pid: cri::NamespaceMode::Container.into(),
        ipc: cri::NamespaceMode::Pod.into(),
        ..Default::default()
    }
}

/// The `LinuxContainerSecurityContext` kubelet sends for `security` in `pod`.
fn container_security(
    pod: &PodSpec,
    security: &SecurityContext,
) -> cri::LinuxContainerSecurityContext {
    let profile = if security.seccomp_runtime_default {
        cri::security_profile::ProfileType::RuntimeDefault
    } else {
        cri::security_profile::ProfileType::Unconfined
    };
    let capabilities = (!security.drop_capabilities.is_empty()
        || !security.add_capabilities.is_empty())
    .then(|| cri::Capability {
        add_capabilities: security.add_capabilities.clone(),
        drop_capabilities: security.drop_capabilities.clone(),
        ..Default::default()
    });
    cri::LinuxContainerSecurityContext {
        namespace_options: Some(pod_namespaces(pod)),
        capabilities,
        run_as_user: security.run_as_user.map(|value| cri::Int64Value { value }),
        run_as_group: security.run_as_group.map(|value| cri::Int64Value { value }),
        supplemental_groups: security.supplemental_groups.clone(),
        readonly_rootfs: security.read_only_root_filesystem,
        no_new_privs: security.no_new_privileges,
        seccomp: Some(cri::SecurityProfile {
            profile_type: profile.into(),
            localhost_ref: String::new(),
        }),
        masked_paths: DEFAULT_MASKED_PATHS.iter().map(|p| p.to_string()).collect(),
        readonly_paths: DEFAULT_READONLY_PATHS
            .iter()
            .map(|p| p.to_string())
            .collect(),
        ..Default::default()
    }
}

/// kubelet's resources for a container with no requests and `container`'s limits: BestEffort
/// without limits; with them, Burstable with the requests defaulted to the limits (CPU
/// shares from the request, CFS quota from the limit over a 100ms period).
fn container_resources(container: &ContainerSpec) -> cri::LinuxContainerResources {
    let memory_limit = container.memory_limit_in_bytes;
    let oom_score_adj = match memory_limit {
        None => 1000,
        Some(limit) => {
            let capacity = memory_capacity().max(1);
            (1000 - (1000 * limit) / capacity).clamp(3, 999)
        }
    };
    let (cpu_shares, cpu_quota) = match container.cpu_limit_millis {
        Some(millis) => ((millis * 1024 / 1000).max(2), millis * 100),
        None => (2, 0),
    };
    cri::LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota,
        cpu_shares,
        memory_limit_in_bytes: memory_limit.unwrap_or(0),
        oom_score_adj,
        ..Default::default()
    }
}

/// The machine's memory in bytes (`MemTotal`).
fn memory_capacity() -> i64 {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(i64::MAX)
}

fn image_spec(image: &str) -> cri::ImageSpec {
    cri::ImageSpec {
        image: image.to_string(),
        ..Default::default()
    }
}

/// A fresh random-looking UUID (version 4 layout) for pod UIDs and file names.
fn new_uid() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let seed = format!(
        "{nanos}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let mut b: [u8; 16] = Sha256::digest(seed)[..16].try_into().unwrap_or_default();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Now as RFC 3339 in UTC with nanoseconds, as kubelet writes `kubernetes.io/config.seen`.
fn now_rfc3339() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_nanos()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_partial_lines() {
        let log = "2024-01-01T00:00:00.1Z stdout P hel\n\
                   2024-01-01T00:00:00.2Z stderr F oops\n\
                   2024-01-01T00:00:00.3Z stdout F lo world\n\
                   2024-01-01T00:00:00.4Z stdout F \n";
        let lines = parse_log(log).unwrap();
        let texts: Vec<_> = lines.iter().map(|l| (l.stream, l.text.as_str())).collect();
        assert_eq!(
            texts,
            [
                (LogStream::Stderr, "oops"),
                (LogStream::Stdout, "hello world"),
                (LogStream::Stdout, "")
            ]
        );
        assert!(parse_log("garbage\n").is_err());
    }

    #[test]
    fn uids_look_like_uuids() {
        let (a, b) = (new_uid(), new_uid());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }

    #[test]
    fn rfc3339_is_well_formed() {
        let now = now_rfc3339();
        assert_eq!(now.len(), 30, "{now}");
        assert!(now.starts_with("20") && now.ends_with('Z'), "{now}");
    }
}
