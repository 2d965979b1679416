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
}

impl Knob {
    /// Every knob, in the order the docs list them.
    pub const ALL: [Knob; 6] = [
        Knob::Fuel,
        Knob::Timeout,
        Knob::Memory,
        Knob::Dirs,
        Knob::Env,
        Knob::Network,
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
        }
    }

    fn from_annotation(key: &str) -> Option<Knob> {
        Knob::ALL.into_iter().find(|knob| knob.annotation() == key)
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
        key: &'static str,
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
        key: &'static str,
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
        key: &'static str,
        /// The value as given.
        value: String,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LimitSource {
    /// The workload asked for it, through this knob spelled this way.
    Requested(Knob, Spelling),
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
}

impl fmt::Display for LimitSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitSource::Requested(knob, spelling) => f.write_str(spelling.key(*knob)),
            LimitSource::NodeDefault => f.write_str("node default"),
            LimitSource::NodeCeiling => f.write_str("node ceiling"),
            LimitSource::ContainerMemoryLimit { limit, reserve } => write!(
                f,
                "container memory limit {}, less {} kept for the runtime",
                format_memory(*limit),
                format_memory(*reserve)
            ),
        }
    }
}

/// An effective limit and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
    raw: BTreeMap<Knob, String>,
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
            raw: BTreeMap::new(),
        }
    }

    /// Reads the `bulwark.dev/*` keys of a container's annotations; other keys are not
    /// Bulwark's and are passed over. An unknown `bulwark.dev/*` key is an error.
    pub fn from_annotations<'a>(
        annotations: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Request, PolicyError> {
        let mut request = Request::annotations();
        for (key, value) in annotations {
            if !key.starts_with(ANNOTATION_PREFIX) {
                continue;
            }
            let knob =
                Knob::from_annotation(key).ok_or_else(|| PolicyError::UnknownAnnotation {
                    key: key.to_owned(),
                    known: Knob::ALL.map(Knob::annotation).join(", "),
                })?;
            request.set(knob, value)?;
        }
        Ok(request)
    }

    /// Sets one knob from its text form. `dirs` accumulates (the CLI's `--dir` repeats);
    /// the others replace an earlier value.
    pub fn set(&mut self, knob: Knob, value: &str) -> Result<(), PolicyError> {
        let key = self.spelling.key(knob);
        let malformed = |expected: String| PolicyError::Malformed {
            key,
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
        }
        let raw = self.raw.entry(knob).or_default();
        if !raw.is_empty() {
            raw.push(',');
        }
        raw.push_str(value);
        Ok(())
    }

    fn key(&self, knob: Knob) -> &'static str {
        self.spelling.key(knob)
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
        Ok(Policy {
            fuel,
            timeout,
            memory,
            dirs: request.dirs.clone(),
            env: request.env.clone(),
            network,
            allow_native: config.capabilities.allow_native,
            allow_without_landlock: config.capabilities.allow_without_landlock,
        })
    }

    /// Keeps the guest inside the container's memory limit (its cgroup's), so that a guest
    /// that grows too far ends with the memory limit's exit code and a reason instead of a
    /// kernel OOM kill of its process. The guest may use the limit less
    /// [`RUNTIME_MEMORY_RESERVE`] (a quarter of the limit, for small limits); an explicit
    /// memory limit that is tighter stays.
    pub fn bound_by_container_memory(&mut self, container_limit: u64) {
        let reserve = RUNTIME_MEMORY_RESERVE.min(container_limit / 4);
        let bound = container_limit - reserve;
        if self.memory.is_none_or(|memory| memory.value > bound) {
            self.memory = Some(Limit {
                value: bound,
                source: LimitSource::ContainerMemoryLimit {
                    limit: container_limit,
                    reserve,
                },
            });
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
            source: LimitSource::Requested(knob, request.spelling),
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
            },
            ceilings: Limits {
                fuel: Some(1_000_000),
                timeout: Some(Duration::from_secs(3600)),
                memory: Some(1 << 30),
            },
            capabilities: Capabilities::default(),
        }
    }

    fn annotations(pairs: &[(&str, &str)]) -> Result<Request, PolicyError> {
        Request::from_annotations(pairs.iter().copied())
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
        assert_eq!(policy.fuel.unwrap().value, 5000);
        assert_eq!(
            policy.fuel.unwrap().source,
            LimitSource::Requested(Knob::Fuel, Spelling::Annotation)
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
            LimitSource::Requested(Knob::Memory, Spelling::Annotation)
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
}
