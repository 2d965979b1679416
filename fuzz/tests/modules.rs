//! Generated WebAssembly (`wasm-smith`) run under Bulwark's limits. A module ends only
//! with an exit code of the contract, the same way bare Wasmtime ends it with the same
//! fuel and a memory limiter that follows the documented rule (linear memory and tables
//! together within `bulwark.dev/memory`, at most a million table elements, a module's own
//! declared maximum no limit at all). Never a host panic.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use bulwark_fuzz::{Result, Unstructured, fuzz};
use bulwark_runtime::engine::{Allocation, MAX_TABLE_ELEMENTS};
use bulwark_runtime::policy::Knob;
use bulwark_runtime::run::{DeadlineMode, Report, RunError};
use bulwark_runtime::{NodeConfig, Outcome, Policy, Request, Runtime, RuntimeOptions, Workload};
use wasmtime::{Engine, Linker, Module, ResourceLimiter, Store, Trap};

const FUEL: u64 = 2_000_000;
const MEMORY: u64 = 32 << 20;

fn policy() -> Policy {
    let mut request = Request::annotations();
    request.set(Knob::Fuel, &FUEL.to_string()).expect("fuel");
    request.set(Knob::Memory, "32Mi").expect("memory");
    Policy::resolve(&NodeConfig::default(), &request).expect("a policy")
}

fn runtime() -> Runtime {
    Runtime::new(RuntimeOptions {
        allocation: Allocation::OnDemand,
        // No watchdog thread that could end this process: fuel bounds every run.
        deadline: DeadlineMode::Epoch,
    })
}

/// wasm-smith's settings: the features Bulwark's engine runs, a `_start` to call, no
/// imports, modest sizes.
fn smith_config(u: &mut Unstructured<'_>) -> Result<wasm_smith::Config> {
    Ok(restrict(u.arbitrary()?))
}

/// Keeps a wasm-smith configuration to what Bulwark's engine runs.
fn restrict(mut config: wasm_smith::Config) -> wasm_smith::Config {
    config.exports = Some(wat::parse_str(r#"(module (func (export "_start")))"#).expect("wat"));
    config.max_imports = 0;
    config.min_funcs = 1;
    config.max_funcs = config.max_funcs.clamp(1, 20);
    config.max_memories = 1;
    config.max_tables = config.max_tables.min(2);
    config.max_memory32_bytes = config.max_memory32_bytes.min(256 << 20);
    config.memory64_enabled = false;
    config.threads_enabled = false;
    config.shared_everything_threads_enabled = false;
    config.gc_enabled = false;
    config.exceptions_enabled = false;
    config.custom_page_sizes_enabled = false;
    config.wide_arithmetic_enabled = false;
    config.custom_descriptors_enabled = false;
    config
}

/// How a run ended, comparable between Bulwark and bare Wasmtime.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    Invalid,
    Exited(i32),
    Fuel,
    Memory,
    Trap(String),
}

/// The documented memory rule, for bare Wasmtime.
#[derive(Default)]
struct Limiter {
    memory: u64,
    table_elements: usize,
    refused: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|maximum| desired > maximum) {
            return Ok(false); // the module's own maximum: no limit fired
        }
        let total = self.memory + (desired - current) as u64;
        let fits = total + (self.table_elements as u64) * 8 <= MEMORY;
        if fits {
            self.memory = total;
        } else {
            self.refused = true;
        }
        Ok(fits)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|maximum| desired > maximum) {
            return Ok(false);
        }
        let total = self.table_elements + (desired - current);
        let fits = total <= MAX_TABLE_ELEMENTS && self.memory + (total as u64) * 8 <= MEMORY;
        if fits {
            self.table_elements = total;
        } else {
            self.refused = true;
        }
        Ok(fits)
    }
}

fn bare(engine: &Engine, wasm: &[u8]) -> Ending {
    let Ok(module) = Module::new(engine, wasm) else {
        return Ending::Invalid;
    };
    let mut store = Store::new(engine, Limiter::default());
    store.limiter(|limiter| limiter);
    store.set_fuel(FUEL).expect("fuel is on");
    let result = Linker::new(engine)
        .instantiate(&mut store, &module)
        .and_then(|instance| instance.get_typed_func::<(), ()>(&mut store, "_start"))
        .and_then(|start| start.call(&mut store, ()));
    match result {
        Ok(()) => Ending::Exited(0),
        Err(error) => match error.downcast_ref::<Trap>() {
            Some(Trap::OutOfFuel) => Ending::Fuel,
            _ if store.data().refused => Ending::Memory,
            Some(trap) => Ending::Trap(trap.to_string()),
            None => Ending::Trap(format!("{error:#}")),
        },
    }
}

/// Stderr sent to /dev/null while it lives: Bulwark reports every limit there, as a
/// workload must, which would bury the test's own output.
struct QuietStderr(OwnedFd);

impl QuietStderr {
    fn new() -> QuietStderr {
        let saved = std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .expect("dup stderr");
        let null = std::fs::File::options()
            .write(true)
            .open("/dev/null")
            .expect("/dev/null");
        // SAFETY: dup2 onto fd 2 with a valid descriptor.
        unsafe { libc::dup2(null.as_raw_fd(), 2) };
        QuietStderr(saved)
    }
}

impl Drop for QuietStderr {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::dup2(self.0.as_raw_fd(), 2) };
    }
}

fn bulwark(runtime: &Runtime, policy: &Policy, wasm: &[u8]) -> Ending {
    let loaded = match runtime.load(policy, wasm) {
        Ok(loaded) => loaded,
        Err(RunError::Invalid(_) | RunError::NotWasm(_)) => return Ending::Invalid,
        Err(error) => panic!("Bulwark refused a module bare Wasmtime might run: {error}"),
    };
    let workload = Workload {
        args: vec!["fuzz".into()],
        ..Workload::default()
    };
    let outcome = {
        let _quiet = QuietStderr::new();
        loaded.run(&workload, &Report::default())
    };
    let outcome =
        outcome.unwrap_or_else(|error| panic!("Bulwark could not run a loaded module: {error}"));
    assert!(
        [0, 134, 137, 152].contains(&outcome.exit_code()),
        "{outcome:?}"
    );
    match outcome {
        Outcome::Exited(code) => Ending::Exited(code),
        Outcome::FuelExhausted(_) => Ending::Fuel,
        Outcome::MemoryLimit { .. } => Ending::Memory,
        Outcome::Trapped(reason) => Ending::Trap(reason),
        Outcome::DeadlineExceeded(_) => panic!("no deadline was set: {outcome:?}"),
    }
}

#[test]
fn generated_modules_end_as_bare_wasmtime_ends_them() {
    let (runtime, policy) = (runtime(), policy());
    let mut config = wasmtime::Config::new();
    config.consume_fuel(true).wasm_memory64(false);
    let engine = Engine::new(&config).expect("an engine");
    fuzz("modules", 1 << 16, |u| {
        let config = smith_config(u)?;
        let wasm = wasm_smith::Module::new(config, u)?.to_bytes();
        let expected = bare(&engine, &wasm);
        let got = bulwark(&runtime, &policy, &wasm);
        match (&expected, &got) {
            // Bulwark names the function after the trap.
            (Ending::Trap(bare), Ending::Trap(ours)) => {
                assert!(
                    ours.starts_with(bare.as_str()),
                    "bare Wasmtime: {bare}; Bulwark: {ours}"
                )
            }
            _ => assert_eq!(expected, got, "bare Wasmtime vs Bulwark"),
        }
        Ok(())
    });
}
