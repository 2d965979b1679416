//! What a workload may do: the [`Policy`], resolved from the node's [`NodeConfig`] and a
//! [`Request`] (a pod's `bulwark.dev/*` annotations, or the CLI's flags).
//!
//! Deny by default: a workload gets compute, its own linear memory, its args, the env it
//! declares, stdout/stderr and nothing else unless granted. A request above a ceiling,
//! a malformed value or an unknown `bulwark.dev/*` key is an error, never clamped or ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Component, Path};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{ClientLimits, NodeConfig};
use crate::egress;
use crate::units::{self, format_duration, format_memory, format_size};

/// The prefix of every annotation Bulwark reads; any other key under it is an error.
pub const ANNOTATION_PREFIX: &str = "bulwark.dev/";

/// One policy setting, with its two spellings: a pod annotation and a CLI flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Knob {
    /// Wasmtime fuel budget for one run.
    Fuel,
    /// Wall-clock deadline for one run.
    Timeout,
    /// Cap on the instance's linear memory and tables.
    Memory,
    /// Directories preopened for the guest.
    Dirs,
    /// Allow-list over the declared environment.
    Env,
    /// Outbound TCP the guest may open.
    Network,
    /// Serving mode: where a wasi:http component listens.
    Listen,
    /// Serving mode: requests in flight at most.
    Concurrency,
    /// Serving mode: where Prometheus metrics are served.
    Metrics,
}

impl Knob {
    /// Every knob, in the order the docs list them.
    pub const ALL: [Knob; 9] = [
        Knob::Fuel,
        Knob::Timeout,
        Knob::Memory,
        Knob::Dirs,
        Knob::Env,
        Knob::Network,
        Knob::Listen,
        Knob::Concurrency,
        Knob::Metrics,
    ];

    /// The knob's name after the prefix (`fuel`).
    pub fn name(self) -> &'static str {
        match self {
            Knob::Fuel => "fuel",
            Knob::Timeout => "timeout",
            Knob::Memory => "memory",
            Knob::Dirs => "dirs",
            Knob::Env => "env",
            Knob::Network => "network",
            Knob::Listen => "listen",
            Knob::Concurrency => "concurrency",
            Knob::Metrics => "metrics",
        }
    }

    /// The pod annotation (`bulwark.dev/fuel`).
    pub fn annotation(self) -> &'static str {
        match self {
            Knob::Fuel => "bulwark.dev/fuel",
            Knob::Timeout => "bulwark.dev/timeout",
            Knob::Memory => "bulwark.dev/memory",
            Knob::Dirs => "bulwark.dev/dirs",
            Knob::Env => "bulwark.dev/env",
            Knob::Network => "bulwark.dev/network",
            Knob::Listen => "bulwark.dev/listen",
            Knob::Concurrency => "bulwark.dev/concurrency",
            Knob::Metrics => "bulwark.dev/metrics",
        }
    }

    /// The CLI flag (`--fuel`). `dirs` is `--dir`, given once per directory.
    pub fn flag(self) -> &'static str {
        match self {
            Knob::Fuel => "--fuel",
            Knob::Timeout => "--timeout",
            Knob::Memory => "--memory",
            Knob::Dirs => "--dir",
            Knob::Env => "--env",
            Knob::Network => "--network",
            Knob::Listen => "--listen",
            Knob::Concurrency => "--concurrency",
            Knob::Metrics => "--metrics",
        }
    }

    fn from_name(name: &str) -> Option<Knob> {
        Knob::ALL.into_iter().find(|knob| knob.name() == name)
    }
}

/// Whether a request came from annotations or flags, so errors name what the user typed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Spelling {
    /// `bulwark.dev/<knob>` pod annotations.
    Annotation,
    /// `--<knob>` command-line flags.
    Flag,
}

impl Spelling {
    /// The key as this spelling writes it.
    pub fn key(self, knob: Knob) -> &'static str {
        match self {
            Spelling::Annotation => knob.annotation(),
            Spelling::Flag => knob.flag(),
        }
    }
}

/// A policy request that could not be honoured. Every variant names the key (annotation
/// or flag) and the value, and says what is allowed, so `kubectl describe` explains it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The value is not in the knob's syntax.
    #[error("{key}: {value:?} is malformed: {expected}")]
    Malformed {
        /// The annotation or flag.
        key: String,
        /// The value as given.
        value: String,
        /// What was expected.
        expected: String,
    },
    /// The value asks for more than the node's ceiling.
    #[error(
        "{key}: {value:?} is above this node's ceiling of {ceiling} (ceilings.{knob} in the node configuration)"
    )]
    AboveCeiling {
        /// The annotation or flag.
        key: String,
        /// The knob's config name (`memory`).
        knob: &'static str,
        /// The value as given.
        value: String,
        /// The ceiling, as the admin wrote it.
        ceiling: String,
    },
    /// A `bulwark.dev/*` key that Bulwark does not know: a typo must not drop a limit.
    #[error("unknown annotation {key:?}: Bulwark knows {known}")]
    UnknownAnnotation {
        /// The key as given.
        key: String,
        /// The known annotations, listed.
        known: String,
    },
    /// Network grants were asked for on a node that does not allow them.
    #[error(
        "{key}: {value:?} is not allowed: this node does not grant network access (capabilities.allow_network = false in the node configuration)"
    )]
    NetworkNotAllowed {
        /// The annotation or flag.
        key: String,
        /// The value as given.
        value: String,
    },
    /// A network grant outside the node's `ceilings.network`.
    #[error(
        "{key}: tcp:{grant} is outside this node's network ceiling [{ceiling}] (ceilings.network in the node configuration)"
    )]
    NetworkOutsideCeiling {
        /// The annotation or flag.
        key: String,
        /// The grant.
        grant: SocketAddr,
        /// The ceiling's ranges, as the admin wrote them.
        ceiling: String,
    },
    /// A network grant to a place no pod reaches unless the node's ceiling names it.
    #[error(
        "{key}: tcp:{grant} is not allowed: it is {why}; a node that means to allow it names it in ceilings.network"
    )]
    NetworkForbidden {
        /// The annotation or flag.
        key: String,
        /// The grant.
        grant: SocketAddr,
        /// What the destination is.
        why: &'static str,
    },
    /// Serving mode: the instances asked for do not fit in the container's memory limit.
    #[error(
        "{key}: {concurrency} instances of {memory} each do not fit: {figures}, so {fits} fit: lower the concurrency or the memory per instance, or raise the container's memory limit"
    )]
    ServingOverBudget {
        /// The concurrency annotation or flag.
        key: String,
        /// Instances asked for.
        concurrency: u32,
        /// Memory per instance.
        memory: String,
        /// The budget's figures.
        figures: String,
        /// How many fit.
        fits: u32,
    },
    /// Serving mode: not even one instance fits in the container's memory limit.
    #[error(
        "the component cannot be served in this container: {figures}: raise the container's memory limit (resources.limits.memory)"
    )]
    NoInstanceFits {
        /// The budget's figures.
        figures: String,
    },
    /// Serving mode: a memory limit per instance below what the component starts with.
    #[error(
        "{key}: {memory} per instance is below the {initial} of linear memory the component starts with: no instance could be made"
    )]
    BelowInitialMemory {
        /// Where the limit came from (the annotation, or the node's setting).
        key: String,
        /// The limit.
        memory: String,
        /// The component's initial memory.
        initial: String,
    },
}

/// Access to a preopened directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Access {
    /// Read and list only: no create, write, rename, unlink or truncate.
    ReadOnly,
    /// Full access below the directory (never above it).
    ReadWrite,
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::ReadOnly => "ro",
            Access::ReadWrite => "rw",
        })
    }
}

/// A directory the guest may use, at the same path it has in the container (or host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirGrant {
    /// Absolute, normalised path, both where it is and where the guest sees it.
    pub path: String,
    /// What the guest may do there.
    pub access: Access,
}

/// What a workload process needs inside its container's memory limit besides the guest's
/// linear memory and tables: the engine, the compiled module, WASI's buffers and the stack.
/// A small guest's process holds about 7 MiB of anonymous memory (`bulwark run` of the
/// `sleep` guest); the binary's and the compiled module's pages are file-backed, so the
/// kernel reclaims them under the limit. The rest is margin for larger modules.
pub const RUNTIME_MEMORY_RESERVE: u64 = 16 << 20;

/// Where an effective limit came from, so that a reason can say which setting fired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LimitSource {
    /// The workload asked for it, through this annotation or flag (as written:
    /// `bulwark.dev/fuel`, `bulwark.dev/fuel.web`, `--fuel`).
    Requested(String),
    /// The node's `[defaults]`.
    NodeDefault,
    /// The node's `[ceilings]` (the workload asked for nothing and there is no default).
    NodeCeiling,
    /// The container's own memory limit (its cgroup) bounds the guest: the limit less what
    /// the workload process keeps for itself.
    ContainerMemoryLimit {
        /// The container's memory limit in bytes.
        limit: u64,
        /// The part of it kept for the runtime, in bytes.
        reserve: u64,
    },
    /// Bulwark's own default (nothing in the request or the node configuration says).
    BuiltIn,
    /// Serving mode: the container's memory limit, less the runtime's measured footprint
    /// and a margin, shared by this many instances.
    ContainerMemoryShare {
        /// The container's memory limit in bytes.
        limit: u64,
        /// The part of it the runtime holds, with its margin, in bytes.
        reserve: u64,
        /// Instances that share the rest.
        instances: u32,
    },
    /// Serving mode: derived from the component's initial memory (see
    /// [`derived_instance_memory`]).
    ComponentInitialMemory {
        /// The component's initial memory in bytes.
        initial: u64,
    },
}

impl fmt::Display for LimitSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitSource::Requested(key) => f.write_str(key),
            LimitSource::NodeDefault => f.write_str("node default"),
            LimitSource::NodeCeiling => f.write_str("node ceiling"),
            LimitSource::BuiltIn => f.write_str("Bulwark's default"),
            LimitSource::ContainerMemoryLimit { limit, reserve } => write!(
                f,
                "container memory limit {}, less {} kept for the runtime",
                format_memory(*limit),
                format_memory(*reserve)
            ),
            LimitSource::ContainerMemoryShare {
                limit,
                reserve,
                instances,
            } => write!(
                f,
                "container memory limit {}, less {} the runtime holds, shared by {instances} instances",
                format_size(*limit),
                format_size(*reserve)
            ),
            LimitSource::ComponentInitialMemory { initial } => write!(
                f,
                "the component's initial memory of {} and room to grow",
                format_size(*initial)
            ),
        }
    }
}

impl LimitSource {
    /// The setting a user would change: the annotation or flag, or the node
    /// configuration's key (`defaults.memory`).
    pub fn setting(&self, knob: Knob) -> String {
        match self {
            LimitSource::Requested(key) => key.clone(),
            LimitSource::NodeDefault => {
                format!("defaults.{} in the node configuration", knob.name())
            }
            LimitSource::NodeCeiling => {
                format!("ceilings.{} in the node configuration", knob.name())
            }
            other => other.to_string(),
        }
    }
}

/// An effective limit and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limit<T> {
    /// The limit.
    pub value: T,
    /// Which setting produced it.
    pub source: LimitSource,
}

/// A workload's request: annotations or flags, parsed and checked for syntax but not yet
/// held against the node's ceilings (that is [`Policy::resolve`]).
#[derive(Debug, Clone)]
pub struct Request {
    spelling: Spelling,
    fuel: Option<u64>,
    timeout: Option<Duration>,
    memory: Option<u64>,
    dirs: Vec<DirGrant>,
    env: Option<BTreeSet<String>>,
    network: Option<Vec<SocketAddr>>,
    listen: Option<SocketAddr>,
    concurrency: Option<u32>,
    metrics: Option<SocketAddr>,
    raw: BTreeMap<Knob, String>,
    /// The annotation each knob was set through, where it is not the plain one.
    keys: BTreeMap<Knob, String>,
    /// Keys `bulwark.dev/<knob>.<name>` for containers other than this one, with the name.
    for_other_containers: BTreeSet<(String, String)>,
}

impl Request {
    /// An empty request whose errors will name annotations.
    pub fn annotations() -> Request {
        Request::new(Spelling::Annotation)
    }

    /// An empty request whose errors will name CLI flags.
    pub fn flags() -> Request {
        Request::new(Spelling::Flag)
    }

    fn new(spelling: Spelling) -> Request {
        Request {
            spelling,
            fuel: None,
            timeout: None,
            memory: None,
            dirs: Vec::new(),
            env: None,
            network: None,
            listen: None,
            concurrency: None,
            metrics: None,
            raw: BTreeMap::new(),
            keys: BTreeMap::new(),
            for_other_containers: BTreeSet::new(),
        }
    }

    /// The `bulwark.dev/<knob>.<container>` keys that name another container than the one
    /// read for, with that container's name: they apply elsewhere, or, if the pod has no
    /// such container, nowhere (a typo the pod's author should hear of).
    pub fn for_other_containers(&self) -> impl Iterator<Item = (&str, &str)> {
        self.for_other_containers
            .iter()
            .map(|(key, name)| (key.as_str(), name.as_str()))
    }

    /// Reads the `bulwark.dev/*` keys of a container's annotations; other keys are not
    /// Bulwark's and are passed over. An unknown `bulwark.dev/*` key is an error.
    /// `bulwark.dev/<knob>.<container>` applies to the container of that name only
    /// (`container`, the container being read for) and wins over `bulwark.dev/<knob>`.
    pub fn from_annotations<'a>(
        annotations: impl IntoIterator<Item = (&'a str, &'a str)>,
        container: Option<&str>,
    ) -> Result<Request, PolicyError> {
        let mut chosen: BTreeMap<Knob, (bool, &str, &str)> = BTreeMap::new();
        let mut others = BTreeSet::new();
        for (key, value) in annotations {
            let Some(rest) = key.strip_prefix(ANNOTATION_PREFIX) else {
                continue;
            };
            let (name, for_container) = match rest.split_once('.') {
                Some((name, suffix)) => (name, Some(suffix)),
                None => (rest, None),
            };
            let knob = Knob::from_name(name).ok_or_else(|| PolicyError::UnknownAnnotation {
                key: key.to_owned(),
                known: Knob::ALL.map(Knob::annotation).join(", ")
                    + " (and bulwark.dev/<knob>.<container name> for one container)",
            })?;
            let specific = match for_container {
                None => false,
                Some(name) if !is_container_name(name) => {
                    return Err(PolicyError::Malformed {
                        key: key.to_owned(),
                        value: value.to_owned(),
                        expected: format!(
                            "a key bulwark.dev/{}.<container name>, and {name:?} is no container name (lowercase letters, digits and '-', at most 63)",
                            knob.name()
                        ),
                    });
                }
                Some(name) if Some(name) == container => true,
                Some(name) => {
                    others.insert((key.to_owned(), name.to_owned()));
                    continue;
                }
            };
            let entry = chosen.entry(knob).or_insert((specific, key, value));
            if specific {
                *entry = (specific, key, value);
            }
        }
        let mut request = Request::annotations();
        request.for_other_containers = others;
        for (knob, (specific, key, value)) in chosen {
            if specific {
                request.keys.insert(knob, key.to_owned());
            }
            request.set(knob, value)?;
        }
        Ok(request)
    }

    /// Sets one knob from its text form. `dirs` accumulates (the CLI's `--dir` repeats);
    /// the others replace an earlier value.
    pub fn set(&mut self, knob: Knob, value: &str) -> Result<(), PolicyError> {
        let key = &self.key(knob);
        let malformed = |expected: String| PolicyError::Malformed {
            key: key.clone(),
            value: value.to_owned(),
            expected,
        };
        match knob {
            Knob::Fuel => self.fuel = Some(parse_fuel(value).map_err(malformed)?),
            Knob::Timeout => {
                let timeout = units::parse_duration(value)
                    .map_err(|_| malformed("a duration such as 250ms, 30s, 5m or 1h30m".into()))?;
                if timeout.is_zero() {
                    return Err(malformed("a duration above zero".into()));
                }
                if timeout > MAX_TIMEOUT {
                    return Err(malformed(format!(
                        "a duration up to {} (a deadline further off cannot be kept)",
                        format_duration(MAX_TIMEOUT)
                    )));
                }
                self.timeout = Some(timeout);
            }
            Knob::Memory => {
                let memory = units::parse_memory(value).map_err(|_| {
                    malformed("a memory quantity such as 64Mi or 1Gi (whole bytes)".into())
                })?;
                if memory == 0 {
                    return Err(malformed("a memory quantity above zero".into()));
                }
                self.memory = Some(memory);
            }
            Knob::Dirs => {
                for grant in parse_dirs(value).map_err(malformed)? {
                    if self.dirs.iter().any(|existing| existing.path == grant.path) {
                        return Err(malformed(format!(
                            "each directory once; {} is repeated",
                            grant.path
                        )));
                    }
                    self.dirs.push(grant);
                }
            }
            Knob::Env => self.env = Some(parse_env_names(value).map_err(malformed)?),
            Knob::Network => self.network = Some(parse_network(value).map_err(malformed)?),
            Knob::Listen => self.listen = Some(parse_listen(value, false).map_err(malformed)?),
            Knob::Metrics => self.metrics = Some(parse_listen(value, true).map_err(malformed)?),
            Knob::Concurrency => {
                let expected = "a whole number of requests above zero, such as 100";
                let concurrency: u32 = value
                    .trim()
                    .parse()
                    .map_err(|_| malformed(expected.into()))?;
                if concurrency == 0 {
                    return Err(malformed(expected.into()));
                }
                self.concurrency = Some(concurrency);
            }
        }
        let raw = self.raw.entry(knob).or_default();
        if !raw.is_empty() {
            raw.push(',');
        }
        raw.push_str(value);
        Ok(())
    }

    fn key(&self, knob: Knob) -> String {
        self.keys
            .get(&knob)
            .cloned()
            .unwrap_or_else(|| self.spelling.key(knob).to_owned())
    }

    fn raw(&self, knob: Knob) -> String {
        self.raw.get(&knob).cloned().unwrap_or_default()
    }
}

/// The effective policy for one workload: every limit and grant it runs with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Fuel budget for one run, if any.
    pub fuel: Option<Limit<u64>>,
    /// Wall-clock deadline for one run, if any.
    pub timeout: Option<Limit<Duration>>,
    /// Cap in bytes on the instance's linear memory and tables, if any.
    pub memory: Option<Limit<u64>>,
    /// Preopened directories.
    pub dirs: Vec<DirGrant>,
    /// Allow-list over the declared environment; `None` lets all declared env through.
    pub env: Option<BTreeSet<String>>,
    /// Outbound TCP destinations the guest may connect to (WASI sockets, components only).
    pub network: Vec<SocketAddr>,
    /// Whether native (non-Wasm) containers may run on this node.
    pub allow_native: bool,
    /// Whether the workload may run where the kernel does not enforce Landlock.
    #[serde(default)]
    pub allow_without_landlock: bool,
    /// Serving mode: where it listens, how many requests it serves at once, where its
    /// metrics are (used only for a wasi:http component; see [`Policy::serving`]).
    pub serve: ServeRequest,
    /// The container's memory limit, if [`Policy::bound_by_container_memory`] was told one.
    pub container_memory: Option<u64>,
    /// Serving mode: what clients may do (the node's `[serving]`).
    #[serde(default)]
    pub clients: ClientLimits,
}

/// The longest deadline a workload may have: every request's deadline is a point in time,
/// and one further off than the clock can count would overflow it.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(366 * 24 * 3600);

/// Where a wasi:http component listens by default.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 8080);

/// Requests served at once when nothing (annotation, node default, memory budget) says.
pub const DEFAULT_CONCURRENCY: u32 = 64;

/// The least room to grow an instance gets beyond the component's initial memory when
/// nothing says how much memory it may have (see [`derived_instance_memory`]).
pub const INSTANCE_GROWTH: u64 = 16 << 20;

/// The least margin a serving process keeps inside its container's memory limit.
const SERVING_MARGIN_MIN: u64 = 4 << 20;

/// What a workload asked of serving mode, before its memory budget is shared out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServeRequest {
    /// Where it listens.
    pub listen: SocketAddr,
    /// Requests in flight at most, if asked for (or a node default or ceiling).
    pub concurrency: Option<Limit<u32>>,
    /// The concurrency ceiling, to bound a concurrency derived from memory.
    pub concurrency_ceiling: Option<u32>,
    /// Where Prometheus text is served, if anywhere.
    pub metrics: Option<SocketAddr>,
}

/// How a wasi:http component is served: every figure settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Serving {
    /// Where it listens.
    pub listen: SocketAddr,
    /// Where Prometheus text is served, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// Requests in flight at most.
    pub concurrency: Limit<u32>,
    /// Memory of one instance (one request), if capped.
    pub instance_memory: Option<Limit<u64>>,
    /// Open connections at most: the node's `serving.connections`, else 4 x concurrency
    /// + 64 (room for keep-alive clients between requests, never an unbounded queue).
    pub connections: u32,
    /// What clients may do.
    pub clients: ClientLimits,
}

impl Policy {
    /// Holds a request against the node's defaults and ceilings. Effective limit = the
    /// request, else the default, else the ceiling, else none.
    pub fn resolve(config: &NodeConfig, request: &Request) -> Result<Policy, PolicyError> {
        let fuel = resolve_limit(
            request,
            Knob::Fuel,
            request.fuel,
            config.defaults.fuel,
            config.ceilings.fuel,
            |fuel| fuel.to_string(),
        )?;
        let timeout = resolve_limit(
            request,
            Knob::Timeout,
            request.timeout,
            config.defaults.timeout,
            config.ceilings.timeout,
            format_duration,
        )?;
        let memory = resolve_limit(
            request,
            Knob::Memory,
            request.memory,
            config.defaults.memory,
            config.ceilings.memory,
            format_memory,
        )?;
        let network = request.network.clone().unwrap_or_default();
        if !network.is_empty() && !config.capabilities.allow_network {
            return Err(PolicyError::NetworkNotAllowed {
                key: request.key(Knob::Network),
                value: request.raw(Knob::Network),
            });
        }
        check_grants(request, &network, config)?;
        let concurrency = resolve_limit(
            request,
            Knob::Concurrency,
            request.concurrency,
            config.defaults.concurrency,
            None,
            |n| n.to_string(),
        )?;
        if let (Some(asked), Some(ceiling)) = (&concurrency, config.ceilings.concurrency)
            && asked.value > ceiling
        {
            return Err(PolicyError::AboveCeiling {
                key: request.key(Knob::Concurrency),
                knob: Knob::Concurrency.name(),
                value: request.raw(Knob::Concurrency),
                ceiling: ceiling.to_string(),
            });
        }
        let listen = request.listen.unwrap_or(DEFAULT_LISTEN);
        if let Some(metrics) = request.metrics
            && metrics.port() == listen.port()
            && (metrics.ip() == listen.ip()
                || metrics.ip().is_unspecified()
                || listen.ip().is_unspecified())
        {
            return Err(PolicyError::Malformed {
                key: request.key(Knob::Metrics),
                value: request.raw(Knob::Metrics),
                expected: format!(
                    "an address apart from where the service listens ({listen}, {})",
                    request.key(Knob::Listen)
                ),
            });
        }
        Ok(Policy {
            fuel,
            timeout,
            memory,
            dirs: request.dirs.clone(),
            env: request.env.clone(),
            network,
            allow_native: config.capabilities.allow_native,
            allow_without_landlock: config.capabilities.allow_without_landlock,
            serve: ServeRequest {
                listen,
                concurrency,
                concurrency_ceiling: config.ceilings.concurrency,
                metrics: request.metrics,
            },
            container_memory: None,
            clients: config.serving,
        })
    }

    /// Keeps the guest inside the container's memory limit (its cgroup's), so that a guest
    /// that grows too far ends with the memory limit's exit code and a reason instead of a
    /// kernel OOM kill of its process. The guest may use the limit less
    /// [`RUNTIME_MEMORY_RESERVE`] (a quarter of the limit, for small limits); an explicit
    /// memory limit that is tighter stays.
    pub fn bound_by_container_memory(&mut self, container_limit: u64) {
        self.container_memory = Some(container_limit);
        let reserve = runtime_reserve(container_limit);
        let bound = container_limit - reserve;
        if self
            .memory
            .as_ref()
            .is_none_or(|memory| memory.value > bound)
        {
            self.memory = Some(Limit {
                value: bound,
                source: LimitSource::ContainerMemoryLimit {
                    limit: container_limit,
                    reserve,
                },
            });
        }
    }

    /// Serving mode's figures: how many requests run at once and how much memory each
    /// one's instance may hold.
    ///
    /// Without a container memory limit: the concurrency asked for (or the node's default,
    /// else [`DEFAULT_CONCURRENCY`]) and the policy's memory limit per instance.
    ///
    /// With one, everything must fit in it: the runtime's own `footprint` (measured once the
    /// component is loaded), a margin, and every instance at once, each its memory limit
    /// plus its `instance_overhead`. What the pod asked for is kept or refused with the
    /// figures; what it left to defaults is derived: memory per instance from the
    /// component's initial memory ([`derived_instance_memory`]), as many instances as fit
    /// (at most [`DEFAULT_CONCURRENCY`]), and a node default that does not fit shrinks to
    /// what does. A pod that asks for nothing starts whenever one instance fits; one whose
    /// limit cannot hold a single instance is refused.
    pub fn serving(&self, sizing: &ServingSizing) -> Result<Serving, PolicyError> {
        let request = &self.serve;
        let ceiling = request.concurrency_ceiling.unwrap_or(u32::MAX);
        let initial = sizing.initial_memory;
        // A memory limit of the policy's own (not the container's whole budget).
        let own_memory = self
            .memory
            .clone()
            .filter(|memory| !matches!(memory.source, LimitSource::ContainerMemoryLimit { .. }));
        if let Some(memory) = &own_memory
            && memory.value < initial
        {
            return Err(PolicyError::BelowInitialMemory {
                key: memory.source.setting(Knob::Memory),
                memory: format_size(memory.value),
                initial: format_size(initial),
            });
        }
        let default_concurrency = || Limit {
            value: DEFAULT_CONCURRENCY.min(ceiling),
            source: LimitSource::BuiltIn,
        };
        let Some(limit) = self.container_memory else {
            let concurrency = request
                .concurrency
                .clone()
                .unwrap_or_else(default_concurrency);
            return Ok(self.settle_serving(concurrency, own_memory));
        };
        let budget = ServingBudget::new(limit, sizing);
        if budget.instances(initial) == 0 {
            return Err(PolicyError::NoInstanceFits {
                figures: budget.describe(initial),
            });
        }
        let derived = Limit {
            value: derived_instance_memory(initial),
            source: LimitSource::ComponentInitialMemory { initial },
        };
        let requested = |limit: &Limit<u64>| matches!(limit.source, LimitSource::Requested(_));
        // Memory per instance: the policy's, else derived from the component; a value the
        // pod did not ask for itself shrinks to what one instance can have.
        let memory = match own_memory {
            Some(memory) if requested(&memory) && budget.instances(memory.value) == 0 => {
                return Err(PolicyError::NoInstanceFits {
                    figures: format!(
                        "{} of {} per instance ({})",
                        budget.describe(memory.value),
                        format_size(memory.value),
                        memory.source
                    ),
                });
            }
            Some(memory) => memory,
            None => derived,
        };
        let memory = if budget.instances(memory.value) == 0 {
            budget.share(1)
        } else {
            memory
        };
        let (concurrency, memory) = match &request.concurrency {
            Some(concurrency) => {
                let fits = budget.instances(memory.value);
                if fits >= concurrency.value {
                    (concurrency.clone(), memory)
                } else if requested(&memory) || budget.share(concurrency.value).value < initial {
                    return Err(PolicyError::ServingOverBudget {
                        key: match &concurrency.source {
                            LimitSource::Requested(key) => key.clone(),
                            _ => "defaults.concurrency".into(),
                        },
                        concurrency: concurrency.value,
                        memory: format_size(memory.value),
                        figures: budget.describe(memory.value),
                        fits,
                    });
                } else {
                    (concurrency.clone(), budget.share(concurrency.value))
                }
            }
            None => {
                let cap = if requested(&memory) {
                    ceiling
                } else {
                    DEFAULT_CONCURRENCY.min(ceiling)
                };
                let instances = budget.instances(memory.value).clamp(1, cap);
                (
                    Limit {
                        value: instances,
                        source: budget.source(instances),
                    },
                    memory,
                )
            }
        };
        Ok(self.settle_serving(concurrency, Some(memory)))
    }

    fn settle_serving(&self, concurrency: Limit<u32>, memory: Option<Limit<u64>>) -> Serving {
        Serving {
            listen: self.serve.listen,
            metrics: self.serve.metrics,
            connections: self
                .clients
                .connections
                .unwrap_or_else(|| concurrency.value.saturating_mul(4).saturating_add(64)),
            concurrency,
            instance_memory: memory,
            clients: self.clients,
        }
    }

    /// Keeps the declared variables the policy allows, in their order.
    pub fn filter_env(
        &self,
        declared: impl IntoIterator<Item = (String, String)>,
    ) -> Vec<(String, String)> {
        declared
            .into_iter()
            .filter(|(name, _)| {
                self.env
                    .as_ref()
                    .is_none_or(|allowed| allowed.contains(name))
            })
            .collect()
    }
}

/// What the workload process keeps for itself inside a container memory limit.
fn runtime_reserve(container_limit: u64) -> u64 {
    RUNTIME_MEMORY_RESERVE.min(container_limit / 4)
}

/// Memory per instance when neither the pod nor the node says: the component's initial
/// memory, and room to grow by as much again, at least [`INSTANCE_GROWTH`].
pub fn derived_instance_memory(initial: u64) -> u64 {
    initial.saturating_add(initial.max(INSTANCE_GROWTH))
}

/// What serving mode's figures depend on besides the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServingSizing {
    /// Bytes of linear memory one instance starts with (the component's own figure).
    pub initial_memory: u64,
    /// Bytes the serving process holds itself once the component is loaded, measured
    /// (zero for the upper bound worked out before it is loaded).
    pub footprint: u64,
    /// Bytes one instance costs beyond its linear memory and tables: its stack and its
    /// host state.
    pub instance_overhead: u64,
}

/// A container memory limit, less what is not the instances'.
struct ServingBudget {
    limit: u64,
    footprint: u64,
    margin: u64,
    overhead: u64,
}

impl ServingBudget {
    fn new(limit: u64, sizing: &ServingSizing) -> ServingBudget {
        ServingBudget {
            limit,
            footprint: sizing.footprint,
            margin: serving_margin(limit),
            overhead: sizing.instance_overhead,
        }
    }

    /// What the instances may hold together.
    fn left(&self) -> u64 {
        self.limit
            .saturating_sub(self.footprint)
            .saturating_sub(self.margin)
    }

    /// How many instances of `memory` each fit.
    fn instances(&self, memory: u64) -> u32 {
        let each = memory.saturating_add(self.overhead).max(1);
        u32::try_from(self.left() / each).unwrap_or(u32::MAX)
    }

    /// The memory each of `instances` instances may have.
    fn share(&self, instances: u32) -> Limit<u64> {
        Limit {
            value: (self.left() / u64::from(instances.max(1))).saturating_sub(self.overhead),
            source: self.source(instances),
        }
    }

    fn source(&self, instances: u32) -> LimitSource {
        LimitSource::ContainerMemoryShare {
            limit: self.limit,
            reserve: self.footprint.saturating_add(self.margin),
            instances,
        }
    }

    /// The figures, for an instance of `memory`.
    fn describe(&self, memory: u64) -> String {
        format!(
            "the container's memory limit of {} holds the runtime ({} measured, {} margin) and leaves {} for instances; one instance needs {} ({} of linear memory and {} of stack and host state)",
            format_size(self.limit),
            format_size(self.footprint),
            format_size(self.margin),
            format_size(self.left()),
            format_size(memory.saturating_add(self.overhead)),
            format_size(memory),
            format_size(self.overhead),
        )
    }
}

/// What a serving process keeps beyond its measured footprint and its instances: page
/// tables, connection buffers and what the kernel charges as they come and go.
fn serving_margin(limit: u64) -> u64 {
    (limit / 32).max(SERVING_MARGIN_MIN)
}

fn resolve_limit<T: Copy + PartialOrd>(
    request: &Request,
    knob: Knob,
    requested: Option<T>,
    default: Option<T>,
    ceiling: Option<T>,
    format: impl Fn(T) -> String,
) -> Result<Option<Limit<T>>, PolicyError> {
    let key = request.key(knob);
    if let (Some(value), Some(ceiling)) = (requested, ceiling)
        && value > ceiling
    {
        return Err(PolicyError::AboveCeiling {
            key,
            knob: knob.name(),
            value: request.raw(knob),
            ceiling: format(ceiling),
        });
    }
    Ok(match (requested, default, ceiling) {
        (Some(value), _, _) => Some(Limit {
            value,
            source: LimitSource::Requested(request.key(knob)),
        }),
        (None, Some(value), _) => Some(Limit {
            value,
            source: LimitSource::NodeDefault,
        }),
        (None, None, Some(value)) => Some(Limit {
            value,
            source: LimitSource::NodeCeiling,
        }),
        (None, None, None) => None,
    })
}

fn parse_fuel(value: &str) -> Result<u64, String> {
    let expected = "a whole number of fuel units above zero, such as 1000000000";
    let digits = value.trim().replace('_', "");
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(expected.into());
    }
    match digits.parse::<u64>() {
        Ok(0) | Err(_) => Err(expected.into()),
        Ok(fuel) => Ok(fuel),
    }
}

fn parse_dirs(value: &str) -> Result<Vec<DirGrant>, String> {
    let expected = "absolute paths, each with an optional :ro or :rw, separated by commas (/data:ro,/scratch:rw)";
    let mut grants = Vec::new();
    for entry in value.split(',') {
        let entry = entry.trim();
        let (path, access) = match entry.rsplit_once(':') {
            Some((path, "ro")) => (path, Access::ReadOnly),
            Some((path, "rw")) => (path, Access::ReadWrite),
            Some((_, mode)) => {
                return Err(format!("{expected}; {mode:?} is not ro or rw"));
            }
            None => (entry, Access::ReadOnly),
        };
        grants.push(DirGrant {
            path: normalize_absolute(path).ok_or_else(|| {
                format!("{expected}; {path:?} is not an absolute path without '..'")
            })?,
            access,
        });
    }
    Ok(grants)
}

/// Whether `name` can be a container's name: a lowercase RFC 1123 label, as Kubernetes
/// requires of them.
fn is_container_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// `/a//b/./c/` -> `/a/b/c`; `None` for relative paths and paths that climb with `..`.
fn normalize_absolute(path: &str) -> Option<String> {
    let path = Path::new(path);
    if !path.is_absolute() {
        return None;
    }
    let mut normalized = String::new();
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => {
                normalized.push('/');
                normalized.push_str(part.to_str()?);
            }
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    if normalized.is_empty() {
        normalized.push('/');
    }
    Some(normalized)
}

fn parse_env_names(value: &str) -> Result<BTreeSet<String>, String> {
    let mut names = BTreeSet::new();
    for name in value
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
    {
        if name.contains('=') || name.chars().any(char::is_whitespace) {
            return Err(format!(
                "variable names separated by commas (HOME,LANG); {name:?} is not a name"
            ));
        }
        names.insert(name.to_owned());
    }
    Ok(names)
}

/// `PORT`, `IP:PORT` or `[IPv6]:PORT` (all addresses for a bare port); `metrics` only
/// changes what the message offers as an example.
fn parse_listen(value: &str, metrics: bool) -> Result<SocketAddr, String> {
    let example = if metrics { "9090" } else { "8080" };
    let expected = format!(
        "a port ({example}), IP:PORT (127.0.0.1:{example}) or [IPv6]:PORT ([::]:{example})"
    );
    let value = value.trim();
    let address = match value.parse::<u16>() {
        Ok(port) => SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), port),
        Err(_) => value.parse().map_err(|_| expected.clone())?,
    };
    if address.port() == 0 {
        return Err(format!("{expected}; port 0 is not a port to listen on"));
    }
    Ok(address)
}

/// Holds network grants against the node: inside `ceilings.network` when it is set, else
/// away from loopback, link-local and the node's own addresses.
fn check_grants(
    request: &Request,
    grants: &[SocketAddr],
    config: &NodeConfig,
) -> Result<(), PolicyError> {
    if grants.is_empty() {
        return Ok(());
    }
    let key = || request.key(Knob::Network);
    match &config.network_ceiling {
        Some(ceiling) => {
            if let Some(grant) = grants
                .iter()
                .find(|grant| !ceiling.iter().any(|range| range.contains(grant)))
            {
                return Err(PolicyError::NetworkOutsideCeiling {
                    key: key(),
                    grant: *grant,
                    ceiling: ceiling
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        }
        None => {
            let node = egress::node_addresses();
            for grant in grants {
                if let Some(why) = egress::forbidden_by_default(grant, &node) {
                    return Err(PolicyError::NetworkForbidden {
                        key: key(),
                        grant: *grant,
                        why,
                    });
                }
            }
        }
    }
    Ok(())
}

fn parse_network(value: &str) -> Result<Vec<SocketAddr>, String> {
    let expected = "none, or tcp:IP:PORT entries separated by commas (tcp:10.0.0.5:5432,tcp:[::1]:8080); hosts are IP addresses because the guest gets no DNS";
    if value.trim() == "none" {
        return Ok(Vec::new());
    }
    let mut grants = Vec::new();
    for entry in value.split(',').map(str::trim) {
        let address = entry
            .strip_prefix("tcp:")
            .ok_or_else(|| format!("{expected}; {entry:?} does not start with tcp:"))?;
        let address: SocketAddr = address
            .parse()
            .map_err(|_| format!("{expected}; {address:?} is not IP:PORT"))?;
        if address.port() == 0 {
            return Err(format!("{expected}; port 0 is not a destination"));
        }
        grants.push(address);
    }
    Ok(grants)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Capabilities, Limits};

    fn config_with_ceilings() -> NodeConfig {
        NodeConfig {
            defaults: Limits {
                fuel: None,
                timeout: None,
                memory: Some(256 << 20),
                concurrency: None,
            },
            ceilings: Limits {
                fuel: Some(1_000_000),
                timeout: Some(Duration::from_secs(3600)),
                memory: Some(1 << 30),
                concurrency: Some(500),
            },
            capabilities: Capabilities::default(),
            ..NodeConfig::default()
        }
    }

    fn annotations(pairs: &[(&str, &str)]) -> Result<Request, PolicyError> {
        Request::from_annotations(pairs.iter().copied(), None)
    }

    #[test]
    fn empty_request_gets_defaults_then_ceilings() {
        let policy = Policy::resolve(&config_with_ceilings(), &annotations(&[]).unwrap()).unwrap();
        assert_eq!(
            policy.memory,
            Some(Limit {
                value: 256 << 20,
                source: LimitSource::NodeDefault
            })
        );
        assert_eq!(
            policy.fuel,
            Some(Limit {
                value: 1_000_000,
                source: LimitSource::NodeCeiling
            })
        );
        assert_eq!(policy.timeout.unwrap().value, Duration::from_secs(3600));
        assert!(policy.dirs.is_empty() && policy.network.is_empty() && policy.env.is_none());
    }

    #[test]
    fn no_config_means_no_limits() {
        let policy = Policy::resolve(&NodeConfig::default(), &Request::flags()).unwrap();
        assert_eq!(
            (policy.fuel, policy.timeout, policy.memory),
            (None, None, None)
        );
    }

    #[test]
    fn requests_within_ceilings_win() {
        let request = annotations(&[
            ("bulwark.dev/fuel", "5000"),
            ("bulwark.dev/timeout", "250ms"),
            ("bulwark.dev/memory", "64Mi"),
            ("other.io/ignored", "x"),
        ])
        .unwrap();
        let policy = Policy::resolve(&config_with_ceilings(), &request).unwrap();
        assert_eq!(policy.fuel.as_ref().unwrap().value, 5000);
        assert_eq!(
            policy.fuel.unwrap().source,
            LimitSource::Requested("bulwark.dev/fuel".into())
        );
        assert_eq!(policy.timeout.unwrap().value, Duration::from_millis(250));
        assert_eq!(policy.memory.unwrap().value, 64 << 20);
    }

    #[test]
    fn above_ceiling_names_key_value_and_ceiling() {
        let request = annotations(&[("bulwark.dev/memory", "2Gi")]).unwrap();
        let error = Policy::resolve(&config_with_ceilings(), &request).unwrap_err();
        assert_eq!(
            error.to_string(),
            "bulwark.dev/memory: \"2Gi\" is above this node's ceiling of 1Gi (ceilings.memory in the node configuration)"
        );
        let mut flags = Request::flags();
        flags.set(Knob::Fuel, "1000001").unwrap();
        let error = Policy::resolve(&config_with_ceilings(), &flags).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("--fuel: \"1000001\" is above"),
            "{error}"
        );
        let request = annotations(&[("bulwark.dev/timeout", "2h")]).unwrap();
        let error = Policy::resolve(&config_with_ceilings(), &request).unwrap_err();
        assert!(error.to_string().contains("ceiling of 1h"), "{error}");
    }

    #[test]
    fn a_request_equal_to_the_ceiling_is_allowed() {
        let request = annotations(&[("bulwark.dev/memory", "1Gi")]).unwrap();
        assert!(Policy::resolve(&config_with_ceilings(), &request).is_ok());
    }

    #[test]
    fn unknown_annotation_is_an_error() {
        let error = annotations(&[("bulwark.dev/memroy", "64Mi")]).unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("bulwark.dev/memroy") && text.contains("bulwark.dev/memory"),
            "{text}"
        );
    }

    #[test]
    fn malformed_values_name_key_and_value() {
        for (key, value) in [
            ("bulwark.dev/fuel", "lots"),
            ("bulwark.dev/fuel", "-5"),
            ("bulwark.dev/fuel", "0"),
            ("bulwark.dev/fuel", "99999999999999999999999"),
            ("bulwark.dev/timeout", "30"),
            ("bulwark.dev/timeout", "0s"),
            ("bulwark.dev/memory", "64MB"),
            ("bulwark.dev/memory", "0"),
            ("bulwark.dev/dirs", "data"),
            ("bulwark.dev/dirs", "/data:rx"),
            ("bulwark.dev/dirs", "/data/../etc"),
            ("bulwark.dev/dirs", ""),
            ("bulwark.dev/dirs", "/a,/a:rw"),
            ("bulwark.dev/env", "A=B"),
            ("bulwark.dev/network", "tcp:db.local:5432"),
            ("bulwark.dev/network", "udp:10.0.0.1:53"),
            ("bulwark.dev/network", "tcp:10.0.0.1"),
            ("bulwark.dev/network", "tcp:10.0.0.1:0"),
            ("bulwark.dev/network", "none,tcp:10.0.0.1:80"),
        ] {
            let error = annotations(&[(key, value)]).expect_err(value);
            let text = error.to_string();
            assert!(
                text.starts_with(&format!("{key}: {value:?} is malformed: ")),
                "{text}"
            );
        }
    }

    #[test]
    fn dirs_parse_with_modes_and_normalise() {
        let request =
            annotations(&[("bulwark.dev/dirs", "/data, /scratch/:rw,/srv//www/./x:ro")]).unwrap();
        assert_eq!(
            request.dirs,
            vec![
                DirGrant {
                    path: "/data".into(),
                    access: Access::ReadOnly
                },
                DirGrant {
                    path: "/scratch".into(),
                    access: Access::ReadWrite
                },
                DirGrant {
                    path: "/srv/www/x".into(),
                    access: Access::ReadOnly
                },
            ]
        );
        let mut flags = Request::flags();
        flags.set(Knob::Dirs, "/a:rw").unwrap();
        flags.set(Knob::Dirs, "/b").unwrap();
        assert_eq!(flags.dirs.len(), 2);
        let error = flags.set(Knob::Dirs, "/a").unwrap_err();
        assert!(error.to_string().starts_with("--dir: \"/a\""), "{error}");
    }

    #[test]
    fn env_allow_list_filters_declared_env() {
        let request = annotations(&[("bulwark.dev/env", "LANG, MODE")]).unwrap();
        let policy = Policy::resolve(&NodeConfig::default(), &request).unwrap();
        let declared = vec![
            ("MODE".to_string(), "fast".to_string()),
            ("SECRET".to_string(), "x".to_string()),
            ("LANG".to_string(), "C".to_string()),
        ];
        assert_eq!(
            policy.filter_env(declared.clone()),
            vec![
                ("MODE".to_string(), "fast".to_string()),
                ("LANG".to_string(), "C".to_string())
            ]
        );
        let everything = Policy::resolve(&NodeConfig::default(), &Request::annotations()).unwrap();
        assert_eq!(everything.filter_env(declared.clone()).len(), 3);
        let nothing = Policy::resolve(
            &NodeConfig::default(),
            &annotations(&[("bulwark.dev/env", "")]).unwrap(),
        )
        .unwrap();
        assert!(nothing.filter_env(declared).is_empty());
    }

    #[test]
    fn network_needs_the_node_capability() {
        let request =
            annotations(&[("bulwark.dev/network", "tcp:127.0.0.1:8080,tcp:[::1]:80")]).unwrap();
        let error = Policy::resolve(&NodeConfig::default(), &request).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("capabilities.allow_network = false"),
            "{error}"
        );
        let mut config = NodeConfig::default();
        config.capabilities.allow_network = true;
        config.network_ceiling = Some(vec![
            crate::egress::NetworkRange::parse("127.0.0.0/8:1-65535").unwrap(),
            crate::egress::NetworkRange::parse("[::1]:80").unwrap(),
        ]);
        let policy = Policy::resolve(&config, &request).unwrap();
        assert_eq!(
            policy.network,
            vec![
                "127.0.0.1:8080".parse().unwrap(),
                "[::1]:80".parse().unwrap()
            ]
        );
        let none = annotations(&[("bulwark.dev/network", "none")]).unwrap();
        assert!(
            Policy::resolve(&NodeConfig::default(), &none)
                .unwrap()
                .network
                .is_empty()
        );
    }

    #[test]
    fn grants_without_a_ceiling_keep_away_from_the_node_and_metadata() {
        let mut config = NodeConfig::default();
        config.capabilities.allow_network = true;
        let node = crate::egress::node_addresses()
            .into_iter()
            .find(|address| !address.is_loopback())
            .map(|address| SocketAddr::new(address, 22).to_string());
        let mut refused = vec![
            "tcp:169.254.169.254:80".to_owned(),
            "tcp:127.0.0.1:10250".to_owned(),
            "tcp:[::1]:80".to_owned(),
        ];
        refused.extend(node.map(|node| format!("tcp:{node}")));
        for grant in &refused {
            let request = annotations(&[("bulwark.dev/network", grant.as_str())]).unwrap();
            let error = Policy::resolve(&config, &request).unwrap_err().to_string();
            assert!(
                error.starts_with("bulwark.dev/network: ") && error.contains("is not allowed"),
                "{grant}: {error}"
            );
        }
        let elsewhere = annotations(&[("bulwark.dev/network", "tcp:10.96.0.10:5432")]).unwrap();
        assert_eq!(
            Policy::resolve(&config, &elsewhere).unwrap().network,
            vec!["10.96.0.10:5432".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn grants_must_fall_inside_the_node_ceiling() {
        let mut config = NodeConfig::parse(
            "[ceilings]\nnetwork = [\"10.0.0.0/8:443\", \"127.0.0.1:8080-8090\"]\n[capabilities]\nallow_network = true\n",
            "test",
        )
        .unwrap();
        let inside =
            annotations(&[("bulwark.dev/network", "tcp:10.1.2.3:443,tcp:127.0.0.1:8085")]).unwrap();
        assert_eq!(Policy::resolve(&config, &inside).unwrap().network.len(), 2);
        let outside = annotations(&[("bulwark.dev/network", "tcp:10.1.2.3:80")]).unwrap();
        assert_eq!(
            Policy::resolve(&config, &outside).unwrap_err().to_string(),
            "bulwark.dev/network: tcp:10.1.2.3:80 is outside this node's network ceiling [10.0.0.0/8:443, 127.0.0.1/32:8080-8090] (ceilings.network in the node configuration)"
        );
        config.capabilities.allow_network = false;
        assert!(Policy::resolve(&config, &inside).is_err());
    }

    #[test]
    fn a_deadline_beyond_the_clock_is_refused() {
        let error = annotations(&[("bulwark.dev/timeout", "100000000h")]).unwrap_err();
        assert!(error.to_string().contains("a duration up to"), "{error}");
        assert!(annotations(&[("bulwark.dev/timeout", "8760h")]).is_ok());
    }

    #[test]
    fn container_memory_limit_bounds_the_guest_and_says_so() {
        let empty = NodeConfig::default();
        let mut policy = Policy::resolve(&empty, &annotations(&[]).unwrap()).unwrap();
        policy.bound_by_container_memory(256 << 20);
        let memory = policy.memory.unwrap();
        assert_eq!(memory.value, 240 << 20);
        assert_eq!(
            memory.source.to_string(),
            "container memory limit 256Mi, less 16Mi kept for the runtime"
        );

        // A small limit keeps a quarter for the runtime.
        let mut policy = Policy::resolve(&empty, &annotations(&[]).unwrap()).unwrap();
        policy.bound_by_container_memory(32 << 20);
        assert_eq!(policy.memory.unwrap().value, 24 << 20);

        // A tighter annotation stays; a looser one gives way to the container's limit.
        let tight = annotations(&[("bulwark.dev/memory", "8Mi")]).unwrap();
        let mut policy = Policy::resolve(&empty, &tight).unwrap();
        policy.bound_by_container_memory(64 << 20);
        assert_eq!(
            policy.memory.unwrap().source,
            LimitSource::Requested("bulwark.dev/memory".into())
        );
        let loose = annotations(&[("bulwark.dev/memory", "1Gi")]).unwrap();
        let mut policy = Policy::resolve(&empty, &loose).unwrap();
        policy.bound_by_container_memory(64 << 20);
        assert_eq!(
            policy.memory.unwrap(),
            Limit {
                value: 48 << 20,
                source: LimitSource::ContainerMemoryLimit {
                    limit: 64 << 20,
                    reserve: 16 << 20
                }
            }
        );
    }

    fn for_container(pairs: &[(&str, &str)], container: &str) -> Result<Request, PolicyError> {
        Request::from_annotations(pairs.iter().copied(), Some(container))
    }

    #[test]
    fn a_container_key_wins_for_its_container_only() {
        let pairs = [
            ("bulwark.dev/fuel", "1000"),
            ("bulwark.dev/fuel.web", "2000"),
            ("bulwark.dev/listen.web", "9000"),
            ("bulwark.dev/listen.admin", "9001"),
        ];
        let config = config_with_ceilings();
        let web = Policy::resolve(&config, &for_container(&pairs, "web").unwrap()).unwrap();
        assert_eq!(
            web.fuel,
            Some(Limit {
                value: 2000,
                source: LimitSource::Requested("bulwark.dev/fuel.web".into())
            })
        );
        assert_eq!(web.serve.listen, "0.0.0.0:9000".parse().unwrap());

        let admin = Policy::resolve(&config, &for_container(&pairs, "admin").unwrap()).unwrap();
        assert_eq!(admin.fuel.unwrap().value, 1000);
        assert_eq!(admin.serve.listen, "0.0.0.0:9001".parse().unwrap());

        // Another container's key is not this one's business, even when malformed; it is
        // known, so that one naming no container of the pod can be pointed out.
        let other = for_container(&[("bulwark.dev/fuel.web", "lots")], "side").unwrap();
        assert_eq!(
            other.for_other_containers().collect::<Vec<_>>(),
            [("bulwark.dev/fuel.web", "web")]
        );
        // A suffix that no container could be named is a malformed key.
        let err = for_container(&[("bulwark.dev/fuel.Web_1", "1")], "side").unwrap_err();
        assert!(
            err.to_string().contains("bulwark.dev/fuel.Web_1")
                && err.to_string().contains("no container name"),
            "{err}"
        );
        assert_eq!(
            Policy::resolve(&config, &other)
                .unwrap()
                .fuel
                .unwrap()
                .value,
            1_000_000
        );

        // Errors name the key that was given, the container's own.
        let err = for_container(&[("bulwark.dev/fuel.web", "lots")], "web").unwrap_err();
        assert!(err.to_string().contains("bulwark.dev/fuel.web"), "{err}");
        let err = Policy::resolve(
            &config,
            &for_container(&[("bulwark.dev/fuel.web", "2000000")], "web").unwrap(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("bulwark.dev/fuel.web"), "{err}");
        // An unknown knob is an error whichever container it names.
        assert!(for_container(&[("bulwark.dev/fule.web", "1")], "side").is_err());
    }

    #[test]
    fn listen_and_metrics_take_a_port_or_an_address() {
        let listen = |value: &str| {
            annotations(&[("bulwark.dev/listen", value)])
                .map(|request| Policy::resolve(&NodeConfig::default(), &request).unwrap())
        };
        assert_eq!(
            listen("9000").unwrap().serve.listen,
            "0.0.0.0:9000".parse().unwrap()
        );
        assert_eq!(
            listen("127.0.0.1:81").unwrap().serve.listen,
            "127.0.0.1:81".parse().unwrap()
        );
        assert_eq!(
            listen("[::]:8443").unwrap().serve.listen,
            "[::]:8443".parse().unwrap()
        );
        for bad in ["0", "http", "localhost:80", "1.2.3.4", "70000", "[::]"] {
            let err = listen(bad).unwrap_err().to_string();
            assert!(
                err.contains("bulwark.dev/listen") && err.contains(bad) && err.contains("IP:PORT"),
                "{bad}: {err}"
            );
        }
        let default = Policy::resolve(&NodeConfig::default(), &annotations(&[]).unwrap()).unwrap();
        assert_eq!(default.serve.listen, DEFAULT_LISTEN);
        assert_eq!(default.serve.metrics, None);
        let clash = annotations(&[("bulwark.dev/metrics", "127.0.0.1:8080")]).unwrap();
        let err = Policy::resolve(&NodeConfig::default(), &clash)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bulwark.dev/metrics") && err.contains("0.0.0.0:8080"),
            "{err}"
        );
        let metrics = annotations(&[("bulwark.dev/metrics", "9090")]).unwrap();
        let policy = Policy::resolve(&NodeConfig::default(), &metrics).unwrap();
        assert_eq!(
            policy.serving(&SIZING).unwrap().metrics,
            Some("0.0.0.0:9090".parse().unwrap())
        );
    }

    #[test]
    fn concurrency_is_checked_against_the_ceiling() {
        let config = config_with_ceilings();
        let err = annotations(&[("bulwark.dev/concurrency", "0")]).unwrap_err();
        assert!(err.to_string().contains("above zero"), "{err}");
        let over = annotations(&[("bulwark.dev/concurrency", "501")]).unwrap();
        let err = Policy::resolve(&config, &over).unwrap_err().to_string();
        assert!(
            err.contains("bulwark.dev/concurrency") && err.contains("500"),
            "{err}"
        );
        let at = annotations(&[("bulwark.dev/concurrency", "500")]).unwrap();
        assert!(Policy::resolve(&config, &at).is_ok());
    }

    /// A component of 8 MiB initial memory, a runtime that measured 24 MiB, 2 MiB beside
    /// each instance.
    const SIZING: ServingSizing = ServingSizing {
        initial_memory: 8 << 20,
        footprint: 24 << 20,
        instance_overhead: 2 << 20,
    };

    /// Serving figures for `pairs` on `config`, in a container of `container` bytes.
    fn serving_on(
        config: &NodeConfig,
        pairs: &[(&str, &str)],
        container: Option<u64>,
    ) -> Result<Serving, PolicyError> {
        let mut policy = Policy::resolve(config, &annotations(pairs).unwrap()).unwrap();
        if let Some(limit) = container {
            policy.bound_by_container_memory(limit);
        }
        policy.serving(&SIZING)
    }

    #[test]
    fn serving_without_a_container_limit_takes_what_the_policy_says() {
        let empty = NodeConfig::default();
        let open = serving_on(&empty, &[], None).unwrap();
        assert_eq!(open.concurrency.value, DEFAULT_CONCURRENCY);
        assert_eq!(open.concurrency.source, LimitSource::BuiltIn);
        assert_eq!(open.instance_memory, None);
        let asked = serving_on(
            &empty,
            &[
                ("bulwark.dev/memory", "32Mi"),
                ("bulwark.dev/concurrency", "7"),
            ],
            None,
        )
        .unwrap();
        assert_eq!(asked.concurrency.value, 7);
        assert_eq!(asked.instance_memory.unwrap().value, 32 << 20);
        // Below what the component starts with: no instance could ever be made.
        let error = serving_on(&empty, &[("bulwark.dev/memory", "4Mi")], None)
            .unwrap_err()
            .to_string();
        for part in ["bulwark.dev/memory", "4Mi", "8Mi"] {
            assert!(error.contains(part), "{part} missing from: {error}");
        }
    }

    #[test]
    fn a_pod_that_asks_for_nothing_gets_instances_derived_from_the_component() {
        let empty = NodeConfig::default();
        // 512Mi less 24Mi measured and a 16Mi margin: 472Mi for instances of 8Mi + 16Mi to
        // grow, 2Mi beside each: 18 of them.
        let served = serving_on(&empty, &[], Some(512 << 20)).unwrap();
        let memory = served.instance_memory.unwrap();
        assert_eq!(memory.value, derived_instance_memory(8 << 20));
        assert_eq!(memory.value, 24 << 20);
        assert_eq!(served.concurrency.value, 472 / 26);
        assert!(
            served.concurrency.source.to_string().contains("512Mi"),
            "{}",
            served.concurrency.source
        );
        // Never more than the built-in concurrency when nothing was asked.
        let big = serving_on(&empty, &[], Some(64 << 30)).unwrap();
        assert_eq!(big.concurrency.value, DEFAULT_CONCURRENCY);
        // A small limit that holds one instance, not a derived one: it starts, with what
        // there is.
        let small = serving_on(&empty, &[], Some(40 << 20)).unwrap();
        assert_eq!(small.concurrency.value, 1);
        let memory = small.instance_memory.unwrap().value;
        assert!((8 << 20..24 << 20).contains(&memory), "{memory}");
        // A limit that cannot hold one: refused with the figures.
        let error = serving_on(&empty, &[], Some(32 << 20))
            .unwrap_err()
            .to_string();
        for part in ["32Mi", "24Mi measured", "one instance needs 10Mi"] {
            assert!(error.contains(part), "{part} missing from: {error}");
        }
    }

    #[test]
    fn what_a_pod_asks_for_is_kept_or_refused_with_the_figures() {
        let empty = NodeConfig::default();
        let limit = Some(512 << 20);
        // Memory asked: as many instances as fit.
        let memory = serving_on(&empty, &[("bulwark.dev/memory", "256Mi")], limit).unwrap();
        assert_eq!(memory.concurrency.value, 1);
        assert_eq!(memory.instance_memory.unwrap().value, 256 << 20);
        let error = serving_on(&empty, &[("bulwark.dev/memory", "480Mi")], limit)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("bulwark.dev/memory") && error.contains("480Mi"),
            "{error}"
        );
        // Concurrency asked: each instance its share, if that still holds the component.
        let shared = serving_on(&empty, &[("bulwark.dev/concurrency", "4")], limit).unwrap();
        assert_eq!(shared.concurrency.value, 4);
        assert_eq!(
            shared.instance_memory.unwrap().value,
            derived_instance_memory(8 << 20)
        );
        let error = serving_on(&empty, &[("bulwark.dev/concurrency", "100")], limit)
            .unwrap_err()
            .to_string();
        for part in ["bulwark.dev/concurrency", "100", "fit"] {
            assert!(error.contains(part), "{part} missing from: {error}");
        }
        // Both: kept when they fit, else refused.
        let both = serving_on(
            &empty,
            &[
                ("bulwark.dev/memory", "16Mi"),
                ("bulwark.dev/concurrency", "10"),
            ],
            limit,
        )
        .unwrap();
        assert_eq!(
            (both.concurrency.value, both.instance_memory.unwrap().value),
            (10, 16 << 20)
        );
        let error = serving_on(
            &empty,
            &[
                ("bulwark.dev/memory", "16Mi"),
                ("bulwark.dev/concurrency", "40"),
            ],
            limit,
        )
        .unwrap_err()
        .to_string();
        for part in ["40 instances of 16Mi", "472Mi", "so 26 fit"] {
            assert!(error.contains(part), "{part} missing from: {error}");
        }
    }

    #[test]
    fn a_node_default_that_does_not_fit_shrinks_to_what_does() {
        let mut config = NodeConfig::default();
        config.defaults.memory = Some(100 << 20);
        let served = serving_on(&config, &[], Some(128 << 20)).unwrap();
        assert_eq!(served.concurrency.value, 1);
        let memory = served.instance_memory.unwrap();
        assert_eq!(
            memory.value,
            (128 << 20) - (24 << 20) - (4 << 20) - (2 << 20)
        );
    }

    #[test]
    fn derived_concurrency_stays_under_the_node_ceiling() {
        let mut config = NodeConfig::default();
        config.ceilings.concurrency = Some(8);
        let served = serving_on(&config, &[("bulwark.dev/memory", "9Mi")], Some(1 << 30)).unwrap();
        assert_eq!(served.concurrency.value, 8);
        let served = serving_on(&config, &[], Some(1 << 30)).unwrap();
        assert_eq!(served.concurrency.value, 8);
    }
}
