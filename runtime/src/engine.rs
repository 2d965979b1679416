//! Wasmtime engine setup: one engine per *flavor* (which limits are compiled into the
//! code), so that a limit nobody asked for costs nothing at run time.
//!
//! Fuel metering and epoch interruption change the machine code Cranelift emits; a
//! workload that asks for neither runs code with neither. The flavor is part of the
//! engine's compatibility fingerprint, so precompiled artifacts never mix flavors.

use std::collections::HashMap;
use std::hash::Hasher;
use std::sync::{Mutex, OnceLock};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// Most table elements one instance may hold, whatever its memory limit: at a pointer
/// each, 8 MiB of host memory. Far above what compilers emit for function tables, far
/// below what would hurt a node.
pub const MAX_TABLE_ELEMENTS: usize = 1_000_000;

/// The stack each instance of an async (serving) engine runs on: Wasmtime's default, named
/// because serving mode counts it in each instance's memory.
pub const ASYNC_STACK_SIZE: usize = 2 << 20;

/// Which limits are compiled into the code of an engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Flavor {
    /// Fuel metering (`bulwark.dev/fuel`).
    pub fuel: bool,
    /// Epoch interruption checks (an in-engine deadline).
    pub epoch: bool,
    /// Wasmtime's support for the component model's async ABI (WASI 0.3): only for the
    /// components built on it, since it gives every store state of its own and routes
    /// every async call through its event loop (measured: a 0.2 serving request in flight
    /// held 58.6 KiB without it, 64.6 KiB with).
    pub concurrency: bool,
}

impl Flavor {
    /// No limits compiled in: the speed of unmetered Wasmtime.
    pub const PLAIN: Flavor = Flavor {
        fuel: false,
        epoch: false,
        concurrency: false,
    };
}

/// What a policy needs compiled into the code, before anything is known of the module:
/// whether it serves HTTP (which always counts epochs, see [`crate::serve`]) is learnt
/// when it is compiled, and decides the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FlavorRequest {
    /// Fuel metering (`bulwark.dev/fuel`).
    pub fuel: bool,
    /// Epoch checks for a program's deadline (the in-engine deadline mode).
    pub epoch: bool,
}

impl FlavorRequest {
    /// The flavor a module with these facts is compiled for.
    pub fn flavor(self, facts: &Facts) -> Flavor {
        Flavor {
            fuel: self.fuel,
            epoch: self.epoch || facts.serves_http,
            concurrency: facts.async_abi,
        }
    }
}

/// What compiling a module learns of its bytes, which the processes that load its
/// artifact need but may not parse themselves: what it is, whether it is served, what one
/// instance holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Facts {
    /// A core module or a component.
    pub kind: WasmKind,
    /// Whether it is a component that exports `wasi:http/incoming-handler@0.2` or
    /// `wasi:http/handler@0.3` (served).
    pub serves_http: bool,
    /// What one instance of it holds.
    pub shape: ComponentShape,
    /// Bytes of linear memory one instance starts with: the initial sizes of all the
    /// memories its modules define.
    pub initial_memory: u64,
    /// Bytes of the module (or component) itself.
    pub size: u64,
    /// Whether it is a component built on the component model's async ABI (async lifts or
    /// lowers, streams, futures: WASI 0.3), which needs [`Flavor::concurrency`].
    #[serde(default)]
    pub async_abi: bool,
}

impl Facts {
    /// Learns the facts of `wasm` in one pass over its sections.
    pub fn of(wasm: &[u8]) -> Result<Facts, NotWasm> {
        use wasmparser::Payload;
        let kind = detect_kind(wasm)?;
        let mut shape = ComponentShape {
            core_instances: u32::from(kind == WasmKind::Module),
            memories: 0,
            tables: 0,
        };
        let mut initial_memory = 0u64;
        let mut depth = 0usize;
        let mut serves_http = false;
        for payload in wasmparser::Parser::new(0).parse_all(wasm) {
            let payload = payload.map_err(|error| NotWasm(format!("malformed: {error}")))?;
            match payload {
                Payload::ModuleSection { .. } => {
                    shape.core_instances += 1;
                    depth += 1;
                }
                Payload::ComponentSection { .. } => depth += 1,
                Payload::End(_) => depth = depth.saturating_sub(1),
                Payload::MemorySection(memories) => {
                    shape.memories += memories.count();
                    for memory in memories {
                        let memory =
                            memory.map_err(|error| NotWasm(format!("malformed: {error}")))?;
                        let page = 1u64 << memory.page_size_log2.unwrap_or(16);
                        initial_memory =
                            initial_memory.saturating_add(memory.initial.saturating_mul(page));
                    }
                }
                Payload::TableSection(tables) => shape.tables += tables.count(),
                Payload::InstanceSection(instances) => shape.core_instances += instances.count(),
                // Only the component's own exports count, not those of components nested in it.
                Payload::ComponentExportSection(exports) if depth == 0 => {
                    serves_http |= exports.into_iter().any(|export| {
                        export.is_ok_and(|export| {
                            let name = export.name.name;
                            name.starts_with("wasi:http/incoming-handler@0.2.")
                                || name.starts_with("wasi:http/handler@0.3.")
                        })
                    });
                }
                _ => {}
            }
        }
        Ok(Facts {
            kind,
            serves_http,
            shape,
            initial_memory,
            size: wasm.len() as u64,
            async_abi: kind == WasmKind::Component && !valid_without_async_abi(wasm),
        })
    }
}

/// Whether `wasm` validates with every part of the component model's async ABI turned off.
/// (A component that fails for another reason fails to compile anyway.)
fn valid_without_async_abi(wasm: &[u8]) -> bool {
    use wasmparser::WasmFeatures;
    let features = WasmFeatures::default()
        - (WasmFeatures::CM_ASYNC
            | WasmFeatures::CM_ASYNC_STACKFUL
            | WasmFeatures::CM_MORE_ASYNC_BUILTINS
            | WasmFeatures::CM_THREADING
            | WasmFeatures::CM_ERROR_CONTEXT);
    wasmparser::Validator::new_with_features(features)
        .validate_all(wasm)
        .is_ok()
}

/// How instances get their memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// mmap per instance: the right choice where one process runs one instance.
    OnDemand,
    /// Wasmtime's pooling allocator with room for this many live instances: the fast path
    /// where one process instantiates many times.
    Pooling {
        /// Live instances (and memories, tables) the pool holds.
        instances: u32,
    },
    /// The pooling allocator for a component served with this many instances live at once
    /// (serving mode), each of the component's shape.
    ComponentPool {
        /// Live component instances.
        instances: u32,
        /// What one of them holds.
        shape: ComponentShape,
    },
}

/// What one instance of a component holds: core instances, memories and tables, counted in
/// its binary (an upper bound: every module instantiated once).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentShape {
    /// Core module instances.
    pub core_instances: u32,
    /// Linear memories defined by its modules.
    pub memories: u32,
    /// Tables defined by its modules.
    pub tables: u32,
}

/// The engine could not be configured (a platform without what Wasmtime needs).
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the Wasmtime engine: {0}")]
pub struct EngineError(String);

/// Builds the Wasmtime engine for a flavor and an allocation strategy.
pub fn build_engine(
    flavor: Flavor,
    allocation: Allocation,
    parallel_compilation: bool,
) -> Result<Engine, EngineError> {
    let mut config = Config::new();
    config.parallel_compilation(parallel_compilation);
    config.consume_fuel(flavor.fuel);
    config.epoch_interruption(flavor.epoch);
    // Wasm features beyond the stable, widely emitted set widen the attack surface
    // without serving the workloads Bulwark runs.
    config.wasm_memory64(false);
    config.wasm_component_model(true);
    config.concurrency_support(flavor.concurrency);
    config.async_stack_size(ASYNC_STACK_SIZE);
    match allocation {
        Allocation::OnDemand => {}
        Allocation::Pooling { instances } => {
            let mut pool = PoolingAllocationConfig::new();
            pool.total_core_instances(instances)
                .total_memories(instances)
                .total_tables(instances)
                .total_component_instances(instances)
                .max_memories_per_module(1)
                .max_tables_per_module(1)
                .table_elements(MAX_TABLE_ELEMENTS);
            config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        }
        Allocation::ComponentPool { instances, shape } => {
            let per = |count: u32| count.max(1);
            let mut pool = PoolingAllocationConfig::new();
            pool.total_component_instances(instances)
                .total_core_instances(instances.saturating_mul(per(shape.core_instances)))
                .total_memories(instances.saturating_mul(per(shape.memories)))
                .total_tables(instances.saturating_mul(per(shape.tables)))
                .total_stacks(instances)
                .max_core_instances_per_component(per(shape.core_instances))
                .max_memories_per_component(per(shape.memories))
                .max_tables_per_component(per(shape.tables))
                .max_memories_per_module(1)
                .max_tables_per_module(per(shape.tables))
                .table_elements(MAX_TABLE_ELEMENTS);
            config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        }
    }
    Engine::new(&config).map_err(|error| EngineError(format!("{error:#}")))
}

/// A stable name for everything that decides whether a precompiled artifact can be loaded
/// into `engine`: the Wasmtime version, its compiler settings and the flavor. Two engines
/// with the same fingerprint can share artifacts.
pub fn fingerprint(engine: &Engine) -> String {
    struct Sha256Hasher(Sha256);
    impl Hasher for Sha256Hasher {
        fn finish(&self) -> u64 {
            unreachable!("only the digest is used")
        }
        fn write(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
        }
    }
    let mut hasher = Sha256Hasher(Sha256::new());
    std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut hasher);
    hex(&hasher.0.finalize()[..16])
}

/// The fingerprint of the engine for `flavor` (see [`fingerprint`]), worked out once per
/// process: what names a flavor's entries in the module cache.
pub fn fingerprint_of(flavor: Flavor) -> Result<String, EngineError> {
    static FINGERPRINTS: OnceLock<Mutex<HashMap<Flavor, String>>> = OnceLock::new();
    let mut known = FINGERPRINTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(fingerprint) = known.get(&flavor) {
        return Ok(fingerprint.clone());
    }
    let fingerprint = fingerprint(&build_engine(flavor, Allocation::OnDemand, false)?);
    known.insert(flavor, fingerprint.clone());
    Ok(fingerprint)
}

/// What a WebAssembly binary is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WasmKind {
    /// A core module (WASI preview 1, `_start`).
    Module,
    /// A component (WASI preview 2, `wasi:cli/run`).
    Component,
}

/// Bytes that are not a WebAssembly binary Bulwark runs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a WebAssembly module or component: {0}")]
pub struct NotWasm(String);

impl NotWasm {
    /// What the bytes are instead.
    pub fn reason(&self) -> &str {
        &self.0
    }
}

/// Tells a core module from a component by the binary header, and says what the bytes are
/// when they are neither, so a user who passed the wrong file knows which file it was.
pub fn detect_kind(bytes: &[u8]) -> Result<WasmKind, NotWasm> {
    const MAGIC: &[u8] = b"\0asm";
    if bytes.len() >= 8 && &bytes[..4] == MAGIC {
        return match [bytes[4], bytes[5], bytes[6], bytes[7]] {
            [1, 0, 0, 0] => Ok(WasmKind::Module),
            [0x0d, 0, 1, 0] => Ok(WasmKind::Component),
            version => Err(NotWasm(format!(
                "unsupported WebAssembly binary version {version:02x?}"
            ))),
        };
    }
    let what = if bytes.is_empty() {
        "the file is empty".to_string()
    } else if bytes.starts_with(b"\x7fELF") {
        "it is an ELF executable (a native program)".to_string()
    } else if bytes.starts_with(b"#!") {
        "it is a script".to_string()
    } else if bytes.starts_with(b"(module") || bytes.starts_with(b"(component") {
        "it is WebAssembly text; compile it with wat2wasm first".to_string()
    } else {
        let head = &bytes[..bytes.len().min(4)];
        format!("it starts with bytes {head:02x?}, not \\0asm")
    };
    Err(NotWasm(what))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavors_have_distinct_fingerprints() {
        let plain = build_engine(Flavor::PLAIN, Allocation::OnDemand, true).unwrap();
        let fuel = build_engine(
            Flavor {
                fuel: true,
                epoch: false,
                concurrency: false,
            },
            Allocation::OnDemand,
            true,
        )
        .unwrap();
        let again = build_engine(Flavor::PLAIN, Allocation::OnDemand, true).unwrap();
        assert_ne!(fingerprint(&plain), fingerprint(&fuel));
        assert_eq!(fingerprint(&plain), fingerprint(&again));
    }

    #[test]
    fn only_components_on_the_async_abi_get_concurrency_support() {
        let component = |name: &str| {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(format!("../build/components/{name}.wasm"));
            std::fs::read(&path)
                .unwrap_or_else(|error| panic!("{}: {error} (make components)", path.display()))
        };
        for (name, async_abi) in [
            ("httpd", false),
            ("hello", false),
            ("pyhttp", false),
            ("pyhttp-p3", true),
            ("pycmd-p3", true),
            ("p3-command", true),
        ] {
            let facts = Facts::of(&component(name)).unwrap();
            assert_eq!(facts.async_abi, async_abi, "{name}");
            let flavor = FlavorRequest::default().flavor(&facts);
            assert_eq!(flavor.concurrency, async_abi, "{name}");
        }
        assert!(
            !Facts::of(&wat::parse_str("(module)").unwrap())
                .unwrap()
                .async_abi
        );
    }

    #[test]
    fn pooling_and_on_demand_share_artifacts() {
        let on_demand = build_engine(Flavor::PLAIN, Allocation::OnDemand, true).unwrap();
        let pooling =
            build_engine(Flavor::PLAIN, Allocation::Pooling { instances: 4 }, true).unwrap();
        assert_eq!(fingerprint(&on_demand), fingerprint(&pooling));
        let serial = build_engine(Flavor::PLAIN, Allocation::OnDemand, false).unwrap();
        assert_eq!(fingerprint(&on_demand), fingerprint(&serial));
    }

    #[test]
    fn kinds_are_detected_and_non_wasm_explained() {
        assert_eq!(detect_kind(b"\0asm\x01\0\0\0"), Ok(WasmKind::Module));
        assert_eq!(detect_kind(b"\0asm\x0d\0\x01\0"), Ok(WasmKind::Component));
        let elf = detect_kind(b"\x7fELF\x02\x01\x01").unwrap_err();
        assert!(elf.to_string().contains("ELF"), "{elf}");
        assert!(detect_kind(b"").unwrap_err().to_string().contains("empty"));
        assert!(
            detect_kind(b"(module)")
                .unwrap_err()
                .to_string()
                .contains("wat2wasm")
        );
        assert!(
            detect_kind(b"\0asm\x02\0\0\0")
                .unwrap_err()
                .to_string()
                .contains("version")
        );
        assert!(
            detect_kind(b"hello")
                .unwrap_err()
                .to_string()
                .contains("68, 65, 6c, 6c")
        );
    }
}
