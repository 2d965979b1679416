//! The node configuration: what the cluster admin allows (`/etc/bulwark/config.toml`).
//!
//! ```toml
//! [defaults]            # what a pod gets when it asks for nothing; unset = no limit
//! memory = "256Mi"
//! [ceilings]            # the most a pod may ask for; unset = no ceiling
//! fuel = 100000000000
//! timeout = "1h"
//! memory = "1Gi"
//! concurrency = 1000   # serving mode: requests in flight in one pod
//! network = ["10.0.0.0/8:443"] # CIDR:PORT[-PORT]: what network grants may name
//! [capabilities]
//! allow_native = false
//! allow_network = false
//! allow_without_landlock = false
//! allow_without_egress_filter = false
//! [compile]             # compiling a module is the runtime's own work, bounded here
//! memory = "2Gi"        # the most one compilation may use
//! concurrency = 2       # compilations at once on the node
//! module_size = "512Mi" # the largest module (or component) the node takes
//! [serving]             # what a serving pod's clients may do
//! head_timeout = "10s"  # to send a request head, new or idle keep-alive connection alike
//! connections = 500     # open connections per pod (default 4 x concurrency + 64)
//! max_head_size = "64Ki" # larger request heads get 431
//! max_body_size = "64Mi" # larger request bodies get 413
//! ```
//!
//! A missing file means no defaults and no ceilings; a malformed one is an error, never
//! ignored, and so is a default above its ceiling.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::egress::{NetworkRange, RANGE_SYNTAX};
use crate::units::{self, format_duration, format_memory};

/// Where the shim and the CLI look for the node configuration unless told otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/bulwark/config.toml";

/// The three numeric limits, as used for both `[defaults]` and `[ceilings]`.
/// `None` means unset: no default, or no ceiling.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Wasmtime fuel units for one run.
    pub fuel: Option<u64>,
    /// Wall-clock deadline for one run.
    pub timeout: Option<Duration>,
    /// Bytes of linear memory (and tables) one instance may hold.
    pub memory: Option<u64>,
    /// Serving mode: requests in flight at once.
    pub concurrency: Option<u32>,
}

/// Switches for what pods may do beyond running Wasm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Run native (ELF) containers other than the pod sandbox, e.g. sidecars.
    pub allow_native: bool,
    /// Let pods request `bulwark.dev/network` grants at all.
    pub allow_network: bool,
    /// Run Wasm containers on a kernel that does not enforce Landlock (before Linux 5.13,
    /// or with Landlock left out of the `lsm=` list). Off: such a node refuses them, since
    /// a bug in the engine would then find the whole host filesystem open.
    pub allow_without_landlock: bool,
    /// Run Wasm containers with network grants where the kernel's egress filter (a cgroup
    /// BPF program allowing exactly the grants) cannot be attached: no cgroup2 hierarchy,
    /// no BPF. Off: such a node refuses them; Wasmtime's own check is then the only one.
    pub allow_without_egress_filter: bool,
}

/// The bounds of the runtime's own work of compiling modules, on bytes nobody trusts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompileLimits {
    /// The most memory one compilation may use; over it, the container fails, naming it.
    pub memory: u64,
    /// Compilations at once on the node; more wait for one to finish.
    pub concurrency: u32,
    /// The largest module (or component) the node takes, in bytes.
    pub module_size: u64,
}

impl Default for CompileLimits {
    fn default() -> Self {
        CompileLimits {
            memory: 2 << 30,
            concurrency: 2,
            module_size: 512 << 20,
        }
    }
}

/// What a serving pod's clients may do: bounds a hostile client cannot stretch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientLimits {
    /// Time a connection has to send a complete request head, counted from when it is
    /// ready for one: accepted, or idle on keep-alive after a response. Over it, closed.
    pub head_timeout: Duration,
    /// Open connections per pod; `None` is 4 x concurrency + 64. More are closed at once.
    pub connections: Option<u32>,
    /// The largest request head (request line and headers) in bytes; larger gets 431.
    pub max_head_size: u64,
    /// The largest request body in bytes; larger gets 413 (or, sent chunked, a failed
    /// body read in the guest).
    pub max_body_size: u64,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            head_timeout: Duration::from_secs(10),
            connections: None,
            max_head_size: 64 << 10,
            max_body_size: 64 << 20,
        }
    }
}

/// The smallest request-head cap: hyper's read buffer is never smaller.
pub const MIN_HEAD_SIZE: u64 = 8 << 10;

/// The admin's defaults and ceilings for one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// What a workload gets when it asks for nothing.
    pub defaults: Limits,
    /// The most a workload may ask for.
    pub ceilings: Limits,
    /// What network grants may name (`ceilings.network`); `None`: anything but loopback,
    /// link-local and the node's own addresses.
    pub network_ceiling: Option<Vec<NetworkRange>>,
    /// What a serving pod's clients may do.
    pub serving: ClientLimits,
    /// Capabilities beyond plain Wasm compute.
    pub capabilities: Capabilities,
    /// Bounds of compiling modules.
    pub compile: CompileLimits,
}

/// A node configuration that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but could not be read.
    #[error("cannot read node configuration {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or has unknown or mistyped keys.
    #[error("malformed node configuration {origin}: {message}")]
    Syntax {
        /// The file (or other origin) it came from.
        origin: String,
        /// The TOML parser's explanation, naming the key.
        message: String,
    },
    /// A value has the right type but not the right form (`memory = "lots"`).
    #[error("malformed node configuration {origin}: {key} = {value:?}: {reason}")]
    Value {
        /// The file (or other origin) it came from.
        origin: String,
        /// `section.key`.
        key: String,
        /// The value as written.
        value: String,
        /// What was expected.
        reason: String,
    },
    /// A default asks for more than the ceiling of the same limit allows.
    #[error(
        "invalid node configuration {origin}: defaults.{key} = {default} is above ceilings.{key} = {ceiling}"
    )]
    DefaultAboveCeiling {
        /// The file (or other origin) it came from.
        origin: String,
        /// The limit (`fuel`, `timeout`, `memory`).
        key: &'static str,
        /// The default, as the admin would write it.
        default: String,
        /// The ceiling, as the admin would write it.
        ceiling: String,
    },
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    defaults: RawLimits,
    #[serde(default)]
    ceilings: RawLimits,
    #[serde(default)]
    capabilities: RawCapabilities,
    #[serde(default)]
    compile: RawCompile,
    #[serde(default)]
    serving: RawServing,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServing {
    head_timeout: Option<String>,
    connections: Option<u32>,
    max_head_size: Option<RawQuantity>,
    max_body_size: Option<RawQuantity>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCompile {
    memory: Option<RawQuantity>,
    concurrency: Option<u32>,
    module_size: Option<RawQuantity>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    fuel: Option<u64>,
    timeout: Option<String>,
    memory: Option<RawQuantity>,
    concurrency: Option<u32>,
    network: Option<Vec<String>>,
}

/// Kubernetes lets a quantity be a bare number or a string; so does the node config.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawQuantity {
    Bytes(u64),
    Text(String),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCapabilities {
    #[serde(default)]
    allow_native: bool,
    #[serde(default)]
    allow_network: bool,
    #[serde(default)]
    allow_without_landlock: bool,
    #[serde(default)]
    allow_without_egress_filter: bool,
}

impl NodeConfig {
    /// Reads the node configuration at `path`. A missing file is the empty configuration
    /// (no defaults, no ceilings, no extra capabilities); anything else that goes wrong is
    /// an error.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => NodeConfig::parse(&text, &path.display().to_string()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                log::info!(
                    "no node configuration at {}: no defaults, no ceilings",
                    path.display()
                );
                Ok(NodeConfig::default())
            }
            Err(source) => Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Reads the node configuration at `path`, which someone named explicitly (containerd's
    /// `ConfigPath` option, `--config`): a missing file is an error here, not "no limits".
    pub fn load_required(path: &Path) -> Result<NodeConfig, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => NodeConfig::parse(&text, &path.display().to_string()),
            Err(source) => Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Parses a node configuration from TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<NodeConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|error| ConfigError::Syntax {
            origin: origin.to_owned(),
            message: error.message().to_owned()
                + &error
                    .span()
                    .map(|span| describe_position(text, span.start))
                    .unwrap_or_default(),
        })?;
        if raw.defaults.network.is_some() {
            return Err(ConfigError::Value {
                origin: origin.to_owned(),
                key: "defaults.network".into(),
                value: format!("{:?}", raw.defaults.network.unwrap_or_default()),
                reason: "network grants have no default: a pod asks with bulwark.dev/network; the node bounds them with ceilings.network".into(),
            });
        }
        let network_ceiling = raw
            .ceilings
            .network
            .as_ref()
            .map(|ranges| {
                ranges
                    .iter()
                    .map(|range| {
                        NetworkRange::parse(range).map_err(|reason| ConfigError::Value {
                            origin: origin.to_owned(),
                            key: "ceilings.network".into(),
                            value: range.clone(),
                            reason: format!("{reason}; expected {RANGE_SYNTAX}"),
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        let config = NodeConfig {
            network_ceiling,
            serving: raw.serving.resolve(origin)?,
            defaults: raw.defaults.resolve("defaults", origin)?,
            ceilings: raw.ceilings.resolve("ceilings", origin)?,
            capabilities: Capabilities {
                allow_native: raw.capabilities.allow_native,
                allow_network: raw.capabilities.allow_network,
                allow_without_landlock: raw.capabilities.allow_without_landlock,
                allow_without_egress_filter: raw.capabilities.allow_without_egress_filter,
            },
            compile: raw.compile.resolve(origin)?,
        };
        config.check_defaults_within_ceilings(origin)?;
        Ok(config)
    }

    fn check_defaults_within_ceilings(&self, origin: &str) -> Result<(), ConfigError> {
        let above = |key, default: String, ceiling: String| ConfigError::DefaultAboveCeiling {
            origin: origin.to_owned(),
            key,
            default,
            ceiling,
        };
        let (defaults, ceilings) = (&self.defaults, &self.ceilings);
        if let (Some(default), Some(ceiling)) = (defaults.fuel, ceilings.fuel)
            && default > ceiling
        {
            return Err(above("fuel", default.to_string(), ceiling.to_string()));
        }
        if let (Some(default), Some(ceiling)) = (defaults.timeout, ceilings.timeout)
            && default > ceiling
        {
            return Err(above(
                "timeout",
                format_duration(default),
                format_duration(ceiling),
            ));
        }
        if let (Some(default), Some(ceiling)) = (defaults.memory, ceilings.memory)
            && default > ceiling
        {
            return Err(above(
                "memory",
                format_memory(default),
                format_memory(ceiling),
            ));
        }
        if let (Some(default), Some(ceiling)) = (defaults.concurrency, ceilings.concurrency)
            && default > ceiling
        {
            return Err(above(
                "concurrency",
                default.to_string(),
                ceiling.to_string(),
            ));
        }
        Ok(())
    }
}

impl RawLimits {
    fn resolve(self, section: &str, origin: &str) -> Result<Limits, ConfigError> {
        let bad = |key: &str, value: &str, reason: String| ConfigError::Value {
            origin: origin.to_owned(),
            key: format!("{section}.{key}"),
            value: value.to_owned(),
            reason,
        };
        let timeout = match self.timeout {
            Some(text) => Some(
                units::parse_duration(&text)
                    .map_err(|error| bad("timeout", &text, error.to_string()))?,
            ),
            None => None,
        };
        let memory = self
            .memory
            .map(|quantity| quantity.bytes(|text, reason| bad("memory", text, reason)))
            .transpose()?;
        if self.concurrency == Some(0) {
            return Err(bad(
                "concurrency",
                "0",
                "a number of requests above zero".into(),
            ));
        }
        Ok(Limits {
            fuel: self.fuel,
            timeout,
            memory,
            concurrency: self.concurrency,
        })
    }
}

impl RawQuantity {
    /// The bytes of `value`, or `default` when it is not set.
    fn or(
        value: Option<RawQuantity>,
        default: u64,
        bad: impl FnOnce(&str, String) -> ConfigError,
    ) -> Result<u64, ConfigError> {
        value.map_or(Ok(default), |quantity| quantity.bytes(bad))
    }

    fn bytes(self, bad: impl FnOnce(&str, String) -> ConfigError) -> Result<u64, ConfigError> {
        match self {
            RawQuantity::Bytes(bytes) => Ok(bytes),
            RawQuantity::Text(text) => {
                units::parse_memory(&text).map_err(|error| bad(&text, error.to_string()))
            }
        }
    }
}

impl RawCompile {
    fn resolve(self, origin: &str) -> Result<CompileLimits, ConfigError> {
        let bad = |key: &str, value: &str, reason: String| ConfigError::Value {
            origin: origin.to_owned(),
            key: format!("compile.{key}"),
            value: value.to_owned(),
            reason,
        };
        let defaults = CompileLimits::default();
        let quantity = |key: &str, value: Option<RawQuantity>, default: u64| {
            let bytes = RawQuantity::or(value, default, |text, reason| bad(key, text, reason))?;
            if bytes == 0 {
                return Err(bad(key, "0", "a quantity above zero, such as 2Gi".into()));
            }
            Ok(bytes)
        };
        if self.concurrency == Some(0) {
            return Err(bad(
                "concurrency",
                "0",
                "a number of compilations above zero".into(),
            ));
        }
        Ok(CompileLimits {
            memory: quantity("memory", self.memory, defaults.memory)?,
            concurrency: self.concurrency.unwrap_or(defaults.concurrency),
            module_size: quantity("module_size", self.module_size, defaults.module_size)?,
        })
    }
}

impl RawServing {
    fn resolve(self, origin: &str) -> Result<ClientLimits, ConfigError> {
        let bad = |key: &str, value: &str, reason: String| ConfigError::Value {
            origin: origin.to_owned(),
            key: format!("serving.{key}"),
            value: value.to_owned(),
            reason,
        };
        let defaults = ClientLimits::default();
        let head_timeout = match self.head_timeout {
            Some(text) => {
                let timeout = units::parse_duration(&text)
                    .map_err(|error| bad("head_timeout", &text, error.to_string()))?;
                if timeout.is_zero() {
                    return Err(bad("head_timeout", &text, "a time above zero".into()));
                }
                timeout
            }
            None => defaults.head_timeout,
        };
        if self.connections == Some(0) {
            return Err(bad(
                "connections",
                "0",
                "a number of connections above zero".into(),
            ));
        }
        let max_head_size = RawQuantity::or(
            self.max_head_size,
            defaults.max_head_size,
            |text, reason| bad("max_head_size", text, reason),
        )?;
        if max_head_size < MIN_HEAD_SIZE {
            return Err(bad(
                "max_head_size",
                &max_head_size.to_string(),
                format!("at least {} (8Ki)", MIN_HEAD_SIZE),
            ));
        }
        let max_body_size = RawQuantity::or(
            self.max_body_size,
            defaults.max_body_size,
            |text, reason| bad("max_body_size", text, reason),
        )?;
        Ok(ClientLimits {
            head_timeout,
            connections: self.connections,
            max_head_size,
            max_body_size,
        })
    }
}

/// ` (line 2: fuel = "many")`: the line names the key even when the parser's message
/// does not.
fn describe_position(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let number = text[..offset].matches('\n').count() + 1;
    let line = text.lines().nth(number - 1).unwrap_or("").trim();
    format!(" (line {number}: {line})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_config_parses() {
        let config = NodeConfig::parse(
            r#"
            # comments are fine
            [defaults]
            memory = "256Mi"
            timeout = "10m"
            [ceilings]
            fuel = 100000000000
            timeout = "1h"
            memory = "1Gi"
            [capabilities]
            allow_native = true
            allow_network = false
            "#,
            "test",
        )
        .unwrap();
        assert_eq!(config.defaults.memory, Some(256 << 20));
        assert_eq!(config.defaults.timeout, Some(Duration::from_secs(600)));
        assert_eq!(config.defaults.fuel, None);
        assert_eq!(config.ceilings.fuel, Some(100_000_000_000));
        assert_eq!(config.ceilings.memory, Some(1 << 30));
        assert!(config.capabilities.allow_native);
        assert!(!config.capabilities.allow_network);
    }

    #[test]
    fn empty_config_is_no_limits() {
        assert_eq!(
            NodeConfig::parse("", "test").unwrap(),
            NodeConfig::default()
        );
    }

    #[test]
    fn missing_file_is_no_limits_but_unreadable_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            NodeConfig::load(&dir.path().join("absent.toml")).unwrap(),
            NodeConfig::default()
        );
        // A directory where the file should be cannot be read.
        let error = NodeConfig::load(dir.path()).unwrap_err();
        assert!(matches!(error, ConfigError::Read { .. }), "{error}");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let error = NodeConfig::parse("[ceilings]\nmemroy = \"1Gi\"\n", "cfg.toml").unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("cfg.toml") && text.contains("memroy"),
            "{text}"
        );
        assert!(NodeConfig::parse("[limits]\n", "t").is_err());
    }

    #[test]
    fn malformed_values_name_the_key() {
        let text = NodeConfig::parse("[defaults]\nmemory = \"lots\"\n", "cfg.toml")
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("defaults.memory") && text.contains("lots"),
            "{text}"
        );
        let text = NodeConfig::parse("[ceilings]\ntimeout = \"forever\"\n", "cfg.toml")
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("ceilings.timeout") && text.contains("forever"),
            "{text}"
        );
        let text = NodeConfig::parse("[ceilings]\nfuel = \"many\"\n", "cfg.toml")
            .unwrap_err()
            .to_string();
        assert!(text.contains("fuel"), "{text}");
        assert!(NodeConfig::parse("[ceilings]\nfuel = -1\n", "t").is_err());
        assert!(NodeConfig::parse("not toml at all [", "t").is_err());
    }

    #[test]
    fn default_above_ceiling_is_an_error() {
        let text = NodeConfig::parse(
            "[defaults]\nmemory = \"2Gi\"\n[ceilings]\nmemory = \"1Gi\"\n",
            "cfg.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            text.contains("defaults.memory = 2Gi") && text.contains("ceilings.memory = 1Gi"),
            "{text}"
        );
        assert!(NodeConfig::parse("[defaults]\nfuel = 2\n[ceilings]\nfuel = 1\n", "t").is_err());
        assert!(
            NodeConfig::parse(
                "[defaults]\ntimeout = \"2h\"\n[ceilings]\ntimeout = \"1h\"\n",
                "t"
            )
            .is_err()
        );
    }

    #[test]
    fn memory_may_be_a_bare_number() {
        let config = NodeConfig::parse("[ceilings]\nmemory = 1048576\n", "t").unwrap();
        assert_eq!(config.ceilings.memory, Some(1 << 20));
    }
}
