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

use crate::config::NodeConfig;
use crate::units::{self, format_duration, format_memory};

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
    /// Serving mode: the instances asked for do not fit in the container's memory limit.
    #[error(
        "{key}: {concurrency} instances of {memory} each need {needed}, more than the {budget} the container's memory limit leaves for them (less what the runtime keeps): lower the concurrency or the memory per instance, or raise the container's memory limit"
    )]
    ServingOverBudget {
        /// The concurrency annotation or flag.
        key: String,
        /// Instances asked for.
        concurrency: u32,
        /// Memory per instance.
        memory: String,
        /// What they need together.
        needed: String,
        /// What the container leaves for them.
        budget: String,
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
    /// Serving mode: the container's memory limit, less the runtime's reserve, shared by
    /// this many instances.
    ContainerMemoryShare {
        /// The container's memory limit in bytes.
        limit: u64,
        /// The part of it kept for the runtime, in bytes.
        reserve: u64,
        /// Instances that share the rest.
        instances: u32,
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
                "container memory limit {}, less {} kept for the runtime, shared by {instances} instances",
                format_memory(*limit),
                format_memory(*reserve)
            ),
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
        }
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
                Some(name) if Some(name) == container => true,
                Some(_) => continue,
            };
            let entry = chosen.entry(knob).or_insert((specific, key, value));
            if specific {
                *entry = (specific, key, value);
            }
        }
        let mut request = Request::annotations();
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
}

/// Where a wasi:http component listens by default.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 8080);

/// Requests served at once when nothing (annotation, node default, memory budget) says.
pub const DEFAULT_CONCURRENCY: u32 = 64;

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

    /// Serving mode's figures. Requests in flight at most: the concurrency asked for (or the
    /// node's default), else as many instances of the memory limit as the container's
    /// memory budget holds, else [`DEFAULT_CONCURRENCY`] (never above the node's ceiling).
    /// All instances together stay inside the container's memory limit less the runtime's
    /// reserve: each gets at most its share of it.
    pub fn serving(&self) -> Result<Serving, PolicyError> {
        let request = &self.serve;
        let ceiling = request.concurrency_ceiling.unwrap_or(u32::MAX);
        let Some(limit) = self.container_memory else {
            let concurrency = request.concurrency.clone().unwrap_or(Limit {
                value: DEFAULT_CONCURRENCY.min(ceiling),
                source: LimitSource::BuiltIn,
            });
            return Ok(self.settle_serving(concurrency, self.memory.clone()));
        };
        let reserve = runtime_reserve(limit);
        let budget = limit - reserve;
        let share = |instances: u32| Limit {
            value: budget / u64::from(instances.max(1)),
            source: LimitSource::ContainerMemoryShare {
                limit,
                reserve,
                instances,
            },
        };
        // A memory limit of its own (not the container's whole budget) sets how many fit.
        let own_memory = self
            .memory
            .clone()
            .filter(|memory| !matches!(memory.source, LimitSource::ContainerMemoryLimit { .. }));
        let concurrency = match (&request.concurrency, &own_memory) {
            (Some(concurrency), Some(memory)) => {
                let needed = u64::from(concurrency.value).saturating_mul(memory.value);
                if needed > budget && matches!(memory.source, LimitSource::Requested(_)) {
                    return Err(PolicyError::ServingOverBudget {
                        key: match &concurrency.source {
                            LimitSource::Requested(key) => key.clone(),
                            _ => "defaults.concurrency".into(),
                        },
                        concurrency: concurrency.value,
                        memory: format_memory(memory.value),
                        needed: format_memory(needed),
                        budget: format_memory(budget),
                    });
                }
                concurrency.clone()
            }
            (Some(concurrency), None) => concurrency.clone(),
            (None, Some(memory)) => {
                let instances = u32::try_from(budget / memory.value.max(1))
                    .unwrap_or(u32::MAX)
                    .clamp(1, ceiling);
                Limit {
                    value: instances,
                    source: LimitSource::ContainerMemoryShare {
                        limit,
                        reserve,
                        instances,
                    },
                }
            }
            (None, None) => Limit {
                value: DEFAULT_CONCURRENCY.min(ceiling),
                source: LimitSource::BuiltIn,
            },
        };
        let own_share = share(concurrency.value);
        let memory = match own_memory {
            Some(memory) if memory.value <= own_share.value => Some(memory),
            _ => Some(own_share),
        };
        Ok(self.settle_serving(concurrency, memory))
    }

    fn settle_serving(&self, concurrency: Limit<u32>, memory: Option<Limit<u64>>) -> Serving {
        Serving {
            listen: self.serve.listen,
            metrics: self.serve.metrics,
            concurrency,
            instance_memory: memory,
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

        // Another container's key is not this one's business, even when malformed.
        let other = for_container(&[("bulwark.dev/fuel.web", "lots")], "side").unwrap();
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
            policy.serving().unwrap().metrics,
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

    #[test]
    fn serving_shares_the_container_memory_among_instances() {
        let empty = NodeConfig::default();
        let serving = |pairs: &[(&str, &str)], container: Option<u64>| {
            let mut policy = Policy::resolve(&empty, &annotations(pairs).unwrap()).unwrap();
            if let Some(limit) = container {
                policy.bound_by_container_memory(limit);
            }
            policy.serving()
        };

        // No limits anywhere: the built-in concurrency, no memory cap.
        let open = serving(&[], None).unwrap();
        assert_eq!(open.concurrency.value, DEFAULT_CONCURRENCY);
        assert_eq!(open.concurrency.source, LimitSource::BuiltIn);
        assert_eq!(open.instance_memory, None);

        // A container limit alone: the default concurrency, each instance its share.
        let shared = serving(&[], Some(272 << 20)).unwrap();
        assert_eq!(shared.concurrency.value, DEFAULT_CONCURRENCY);
        let memory = shared.instance_memory.unwrap();
        assert_eq!(memory.value, (256 << 20) / u64::from(DEFAULT_CONCURRENCY));
        assert!(
            memory.source.to_string().contains("shared by 64 instances"),
            "{}",
            memory.source
        );

        // An instance size alone: as many instances as the budget holds.
        let derived = serving(&[("bulwark.dev/memory", "16Mi")], Some(272 << 20)).unwrap();
        assert_eq!(derived.concurrency.value, 16);
        assert_eq!(derived.instance_memory.unwrap().value, 16 << 20);

        // Both, fitting: kept as asked.
        let both = serving(
            &[
                ("bulwark.dev/memory", "8Mi"),
                ("bulwark.dev/concurrency", "10"),
            ],
            Some(272 << 20),
        )
        .unwrap();
        assert_eq!(both.concurrency.value, 10);
        assert_eq!(both.instance_memory.unwrap().value, 8 << 20);

        // Both, not fitting: refused with the figures.
        let err = serving(
            &[
                ("bulwark.dev/memory", "8Mi"),
                ("bulwark.dev/concurrency", "100"),
            ],
            Some(272 << 20),
        )
        .unwrap_err()
        .to_string();
        for part in ["bulwark.dev/concurrency", "100", "8Mi", "800Mi", "256Mi"] {
            assert!(err.contains(part), "{part} missing from: {err}");
        }

        // Concurrency alone: each instance gets its share of the budget.
        let capped = serving(&[("bulwark.dev/concurrency", "4")], Some(272 << 20)).unwrap();
        assert_eq!(capped.instance_memory.unwrap().value, 64 << 20);
    }

    #[test]
    fn derived_concurrency_stays_under_the_node_ceiling() {
        let mut config = NodeConfig::default();
        config.ceilings.concurrency = Some(8);
        let request = annotations(&[("bulwark.dev/memory", "1Mi")]).unwrap();
        let mut policy = Policy::resolve(&config, &request).unwrap();
        policy.bound_by_container_memory(1 << 30);
        assert_eq!(policy.serving().unwrap().concurrency.value, 8);
        let policy = Policy::resolve(&config, &annotations(&[]).unwrap()).unwrap();
        assert_eq!(policy.serving().unwrap().concurrency.value, 8);
    }
}
