//! Running a workload under a [`Policy`]: loading (through the cache), instantiating with
//! exactly the granted capabilities, enforcing the limits, and turning however the run
//! ended into an [`Outcome`] with the exit code and reason of the contract.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, ResourceTable};
use wasmtime::{
    Engine, InstancePre, Linker, Module, ResourceLimiter, Store, Trap, UpdateDeadline,
    WasmBacktrace,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::sync::CommandPre;
use wasmtime_wasi::p3::bindings::{Command as P3Command, CommandPre as P3CommandPre};
use wasmtime_wasi::sockets::SocketAddrUse;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::cache::Artifact;
use crate::compile::{CompileError, compile_here};
use crate::engine::{
    Allocation, EngineError, Flavor, FlavorRequest, MAX_TABLE_ELEMENTS, NotWasm, WasmKind,
    build_engine,
};
use crate::policy::{Access, DirGrant, Limit, Policy};
use crate::units::{Bytes, format_duration};
use crate::usage::{Fuel, Usage, fuel_consumed, process_cpu, write_line};

/// Exit code when the fuel budget ran out (128 + SIGXCPU).
pub const EXIT_FUEL: i32 = 152;
/// Exit code when the deadline passed (as `timeout(1)`).
pub const EXIT_DEADLINE: i32 = 124;
/// Exit code when the guest died of a refused memory (or table) growth (128 + SIGKILL).
pub const EXIT_MEMORY: i32 = 137;
/// Exit code for any other trap (128 + SIGABRT).
pub const EXIT_TRAP: i32 = 134;

/// How epoch ticks are spaced when the deadline is enforced inside the engine.
const EPOCH_TICK: Duration = Duration::from_millis(5);
/// How long past the deadline a guest blocked in a host call (a sleep, a read) may take
/// to notice the epoch before the process is ended from outside.
const DEADLINE_GRACE: Duration = Duration::from_millis(20);

/// How a deadline is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadlineMode {
    /// A watchdog thread ends the whole process at the deadline. The guest's code carries
    /// no checks at all, so a deadline costs nothing while it runs; right wherever one
    /// process runs one workload (the CLI, the shim's workload process).
    ProcessWatchdog,
    /// Epoch interruption: the compiled code checks an epoch counter at loop headers and
    /// function entries and traps cleanly once it passes. Costs a few percent of speed;
    /// right where one process hosts many instances. A watchdog still ends the process
    /// if the guest is blocked in a host call past the deadline.
    Epoch,
}

impl FlavorRequest {
    /// What `policy` needs compiled into the code when deadlines are kept by `deadline`.
    pub fn of(policy: &Policy, deadline: DeadlineMode) -> FlavorRequest {
        FlavorRequest {
            fuel: policy.fuel.is_some(),
            epoch: policy.timeout.is_some() && deadline == DeadlineMode::Epoch,
        }
    }
}

/// How a [`Runtime`] is set up.
#[derive(Debug, Clone, Copy)]
pub struct RuntimeOptions {
    /// Instance allocation strategy.
    pub allocation: Allocation,
    /// Deadline enforcement.
    pub deadline: DeadlineMode,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            allocation: Allocation::OnDemand,
            deadline: DeadlineMode::ProcessWatchdog,
        }
    }
}

/// Something that kept a workload from being set up. Limits that fire are not errors:
/// they are [`Outcome`]s.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The bytes are not WebAssembly.
    #[error(transparent)]
    NotWasm(#[from] NotWasm),
    /// The bytes are WebAssembly but do not validate or compile.
    #[error("invalid WebAssembly: {0}")]
    Invalid(String),
    /// A compiled artifact could not be loaded (made for another engine or CPU).
    #[error("cannot load the compiled module: {0}")]
    Artifact(String),
    /// The binary needs something Bulwark does not provide (an import, an entry point).
    #[error("cannot run it: {0}")]
    Link(String),
    /// A granted directory could not be opened.
    #[error("cannot preopen {path}: {message}")]
    Preopen {
        /// The directory.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The engine could not be built.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The module could not be compiled for a reason that is not its own.
    #[error(transparent)]
    Compile(CompileError),
    /// The policy cannot be served as asked (serving mode's figures do not fit).
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    /// A serving address could not be bound or listened on.
    #[error("cannot listen on {address}: {message}")]
    Listen {
        /// The address.
        address: SocketAddr,
        /// What the OS said.
        message: String,
    },
    /// The server could not be set up or run.
    #[error("{0}")]
    Serve(String),
}

impl From<CompileError> for RunError {
    fn from(error: CompileError) -> Self {
        match error {
            CompileError::NotWasm(not_wasm) => RunError::NotWasm(not_wasm),
            CompileError::Invalid(message) => RunError::Invalid(message),
            other => RunError::Compile(other),
        }
    }
}

/// How a run ended. Limits end a run with a fixed exit code and a one-line reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest returned or called `proc_exit`; its code passes through.
    Exited(i32),
    /// The fuel budget ran out.
    FuelExhausted(Limit<u64>),
    /// The deadline passed.
    DeadlineExceeded(Limit<Duration>),
    /// A memory or table growth was refused and the guest died of it.
    MemoryLimit {
        /// The memory limit, if the refusal came from it (tables have a fixed cap too).
        limit: Option<Limit<u64>>,
        /// What was refused, in words.
        refused: String,
    },
    /// Any other trap.
    Trapped(String),
}

impl Outcome {
    /// The process exit code of the contract.
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Exited(code) => *code,
            Outcome::FuelExhausted(_) => EXIT_FUEL,
            Outcome::DeadlineExceeded(_) => EXIT_DEADLINE,
            Outcome::MemoryLimit { .. } => EXIT_MEMORY,
            Outcome::Trapped(_) => EXIT_TRAP,
        }
    }

    /// Which limit ended the run, in one word (the `bulwark-limit` header's values):
    /// `timeout`, `fuel`, `memory` or `trap`; `None` when the guest exited.
    pub fn limit(&self) -> Option<&'static str> {
        match self {
            Outcome::Exited(_) => None,
            Outcome::DeadlineExceeded(_) => Some("timeout"),
            Outcome::FuelExhausted(_) => Some("fuel"),
            Outcome::MemoryLimit { .. } => Some("memory"),
            Outcome::Trapped(_) => Some("trap"),
        }
    }

    /// The one-line reason for a run a limit or trap ended; `None` when the guest exited.
    pub fn reason(&self) -> Option<String> {
        match self {
            Outcome::Exited(_) => None,
            Outcome::FuelExhausted(limit) => Some(format!(
                "fuel exhausted after {} units ({})",
                limit.value, limit.source
            )),
            Outcome::DeadlineExceeded(limit) => Some(format!(
                "deadline of {} exceeded ({})",
                format_duration(limit.value),
                limit.source
            )),
            Outcome::MemoryLimit {
                limit: Some(limit),
                refused,
            } => Some(format!(
                "memory limit of {} reached ({}): {refused}",
                Bytes(limit.value),
                limit.source
            )),
            Outcome::MemoryLimit {
                limit: None,
                refused,
            } => Some(format!("memory limit reached: {refused}")),
            Outcome::Trapped(trap) => Some(format!("trapped: {trap}")),
        }
    }
}

/// Where the reason for a limit goes besides the process's stderr.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Kubernetes' termination-message file (`/dev/termination-log`), when mounted.
    pub termination_log: Option<PathBuf>,
    /// Whether to write a usage line (`bulwark: usage: ...`) to stderr at the end of the
    /// run: a container's log always gets one; the CLI when asked.
    pub usage: bool,
}

impl Report {
    /// Writes `bulwark: <reason>` to stderr and the reason to the termination log.
    pub fn outcome(&self, outcome: &Outcome) {
        let Some(reason) = outcome.reason() else {
            return;
        };
        write_line(format_args!("bulwark: {reason}"));
        if let Some(path) = &self.termination_log
            && let Err(error) = std::fs::write(path, format!("{reason}\n"))
        {
            log::warn!("cannot write termination log {}: {error}", path.display());
        }
    }

    /// Writes the run's usage line, `bulwark: usage: exit_code=N [limit=KIND] ...`, when
    /// asked for.
    pub fn usage(&self, outcome: &Outcome, usage: &Usage) {
        if !self.usage {
            return;
        }
        let limit = outcome
            .limit()
            .map(|kind| format!(" limit={kind}"))
            .unwrap_or_default();
        write_line(format_args!(
            "bulwark: usage: exit_code={}{limit} {usage}",
            outcome.exit_code()
        ));
    }
}

/// A directory to preopen: where it is on this host and where the guest sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Preopen {
    /// The directory as this process can open it (for a container: inside its rootfs).
    pub host: PathBuf,
    /// The path the guest uses.
    pub guest: String,
    /// What the guest may do there.
    pub access: Access,
}

impl Preopen {
    /// Grants preopened at the same path on the host (the CLI's `--dir`).
    pub fn same_path(grants: &[DirGrant]) -> Vec<Preopen> {
        grants
            .iter()
            .map(|grant| Preopen {
                host: PathBuf::from(&grant.path),
                guest: grant.path.clone(),
                access: grant.access,
            })
            .collect()
    }
}

/// What one run of a workload gets: argv, the (already policy-filtered) env and its
/// preopened directories. Stdio is the process's own.
#[derive(Debug, Clone, Default)]
pub struct Workload {
    /// argv; the first is the program's name.
    pub args: Vec<String>,
    /// Environment variables, after [`Policy::filter_env`].
    pub env: Vec<(String, String)>,
    /// Directories, after the policy's grants.
    pub preopens: Vec<Preopen>,
    /// Connect the guest's stdin/stdout/stderr to this process's (else: closed / discarded).
    pub inherit_stdio: bool,
    /// Serving mode: where the kernel's egress counters of this container are, for
    /// `/metrics`: [`EgressCounts::SIZE`] bytes that [`EgressCounts::decode`] reads, kept
    /// current by the shim.
    pub egress_counts: Option<std::sync::Arc<std::fs::File>>,
}

/// Every connection attempt the kernel's egress filter decided for a container since it
/// was attached: what the shim reads from the filter and a serving workload shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EgressCounts {
    /// TCP connects to a grant.
    pub allowed: u64,
    /// Everything refused (each one also reported to the shim, unless dropped).
    pub denied: u64,
    /// Denials whose report was lost because the shim read them too slowly. They are
    /// still counted in `denied`.
    pub dropped: u64,
}

impl EgressCounts {
    /// The size of their encoded form.
    pub const SIZE: usize = 32;

    /// Four native-endian `u64`s: 1 (a filter is attached), allowed, denied, dropped.
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut bytes = [0u8; Self::SIZE];
        for (slot, value) in
            bytes
                .chunks_exact_mut(8)
                .zip([1, self.allowed, self.denied, self.dropped])
        {
            slot.copy_from_slice(&value.to_ne_bytes());
        }
        bytes
    }

    /// The counts in `bytes`, or `None` when no filter stands behind them (all zero: the
    /// file was made, but nothing was ever published).
    pub fn decode(bytes: &[u8; Self::SIZE]) -> Option<EgressCounts> {
        let word = |index: usize| {
            u64::from_ne_bytes(
                bytes[index * 8..index * 8 + 8]
                    .try_into()
                    .expect("eight bytes"),
            )
        };
        (word(0) != 0).then(|| EgressCounts {
            allowed: word(1),
            denied: word(2),
            dropped: word(3),
        })
    }
}

/// The engines, linkers and cache of a host process.
pub struct Runtime {
    options: RuntimeOptions,
    engines: Mutex<HashMap<Flavor, Engine>>,
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// A runtime with the given options; engines are built on first use.
    pub fn new(options: RuntimeOptions) -> Runtime {
        Runtime {
            options,
            engines: Mutex::new(HashMap::new()),
        }
    }

    /// Which limits a policy needs compiled into the code (whether the module serves HTTP
    /// decides the rest: [`FlavorRequest::flavor`]).
    pub fn flavor_request(&self, policy: &Policy) -> FlavorRequest {
        FlavorRequest::of(policy, self.options.deadline)
    }

    /// The engine for a flavor, built once.
    pub fn engine(&self, flavor: Flavor) -> Result<Engine, RunError> {
        let mut engines = self.engines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(engine) = engines.get(&flavor) {
            return Ok(engine.clone());
        }
        // Engines here only load artifacts: they never compile.
        let engine = build_engine(flavor, self.options.allocation, false)?;
        if flavor.epoch {
            start_epoch_ticker(&engine);
        }
        engines.insert(flavor, engine.clone());
        Ok(engine)
    }

    /// Compiles `wasm` in this process and loads it for `policy`: for tests, benchmarks and
    /// trusted modules (the shim and the CLI load artifacts their compile step wrote, with
    /// [`Runtime::load_artifact`]).
    pub fn load(&self, policy: &Policy, wasm: &[u8]) -> Result<Loaded, RunError> {
        let artifact = compile_here(wasm, self.flavor_request(policy))?;
        self.load_artifact(policy, &artifact)
    }

    /// Loads a precompiled artifact for `policy` and links it against WASI, ready to
    /// instantiate many times.
    pub fn load_artifact(&self, policy: &Policy, artifact: &Artifact) -> Result<Loaded, RunError> {
        let facts = &artifact.facts;
        if facts.serves_http {
            return Err(RunError::Link(
                "a wasi:http component is a service, not a program to run: it is served".into(),
            ));
        }
        let flavor = self.flavor_request(policy).flavor(facts);
        let engine = self.engine(flavor)?;
        let entry = match facts.kind {
            WasmKind::Module => Entry::Module(link_module(&engine, &artifact.file)?),
            WasmKind::Component => link_component(&engine, &artifact.file)?,
        };
        if facts.kind == WasmKind::Module && !policy.network.is_empty() {
            log::warn!(
                "network grants do not apply: a WASI preview 1 module has no sockets (only components do)"
            );
        }
        Ok(Loaded {
            engine,
            flavor,
            entry,
            policy: policy.clone(),
            deadline: self.options.deadline,
        })
    }
}

/// Deserializes the module in `file`, an artifact the module cache verified or the compile
/// step just wrote: its code and memory images stay mapped from the file.
fn deserialize_module(engine: &Engine, file: &File) -> Result<Module, RunError> {
    let file = file
        .try_clone()
        .map_err(|error| RunError::Artifact(error.to_string()))?;
    // SAFETY: the artifact is one Bulwark's compile step wrote, handed over (and, from the
    // cache, authenticated) by the process that ran it; nothing writes to it any more.
    unsafe { Module::deserialize_open_file(engine, file) }
        .map_err(|error| RunError::Artifact(format!("{error:#}")))
}

/// As [`deserialize_module`], for a component.
pub(crate) fn deserialize_component(engine: &Engine, file: &File) -> Result<Component, RunError> {
    // Wasmtime maps a component only from a path: the descriptor's own, which names this
    // very file whatever may have happened to the path it was opened by.
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    // SAFETY: as for modules, above.
    unsafe { Component::deserialize_file(engine, path) }
        .map_err(|error| RunError::Artifact(format!("{error:#}")))
}

fn link_module(engine: &Engine, file: &File) -> Result<InstancePre<ModuleHost>, RunError> {
    let module = deserialize_module(engine, file)?;
    if module.get_export("_start").is_none() {
        return Err(RunError::Link(
            "the module exports no _start (it is a library, not a WASI command)".into(),
        ));
    }
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |host: &mut ModuleHost| &mut host.wasi)
        .map_err(|error| RunError::Link(format!("{error:#}")))?;
    linker
        .instantiate_pre(&module)
        .map_err(|error| RunError::Link(format!("{error:#}")))
}

/// Links a command component: a WASI 0.2 one (`wasi:cli/run@0.2`) against the synchronous
/// 0.2 interfaces, a WASI 0.3 one (`wasi:cli/run@0.3`) against the 0.3 interfaces and,
/// since toolchains built on wasi-libc still import them too, the 0.2 ones (async).
fn link_component(engine: &Engine, file: &File) -> Result<Entry, RunError> {
    let component = deserialize_component(engine, file)?;
    let link = |error: wasmtime::Error| RunError::Link(format!("{error:#}"));
    let not_a_command = |error: wasmtime::Error| {
        RunError::Link(format!(
            "the component is not a WASI command (no wasi:cli/run export): {error:#}"
        ))
    };
    let exports_p3_run = component
        .component_type()
        .exports(engine)
        .any(|(name, _)| name.starts_with("wasi:cli/run@0.3."));
    let mut linker = wasmtime::component::Linker::new(engine);
    if exports_p3_run {
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .and_then(|()| wasmtime_wasi::p3::add_to_linker(&mut linker))
            .map_err(link)?;
        let pre = linker.instantiate_pre(&component).map_err(link)?;
        return P3CommandPre::new(pre)
            .map(Entry::P3Component)
            .map_err(not_a_command);
    }
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(link)?;
    let pre = linker.instantiate_pre(&component).map_err(link)?;
    CommandPre::new(pre)
        .map(Entry::Component)
        .map_err(not_a_command)
}

enum Entry {
    Module(InstancePre<ModuleHost>),
    Component(CommandPre<ComponentHost>),
    /// A WASI 0.3 command: it runs on the component model's async ABI, in an event loop.
    P3Component(P3CommandPre<ComponentHost>),
}

/// A workload compiled and linked for one policy: instantiate it as often as needed.
pub struct Loaded {
    engine: Engine,
    flavor: Flavor,
    entry: Entry,
    policy: Policy,
    deadline: DeadlineMode,
}

/// A live instance, instantiated and not yet run.
pub struct Instance {
    inner: InstanceInner,
}

enum InstanceInner {
    Module(Store<ModuleHost>, wasmtime::Instance),
    Component(
        Store<ComponentHost>,
        wasmtime_wasi::p2::bindings::sync::Command,
    ),
    /// With the event loop it was made in, which runs it.
    P3Component(Store<ComponentHost>, P3Command, tokio::runtime::Runtime),
}

impl Loaded {
    /// Creates an instance with the policy's limits and the workload's capabilities,
    /// without running it. Limits that fire already here (a module whose initial memory
    /// is above the cap) come back as an [`Outcome`].
    pub fn instantiate(&self, workload: &Workload) -> Result<Result<Instance, Outcome>, RunError> {
        Ok(self
            .instantiate_guarded(workload, Guard::new(&self.policy))?
            .map_err(|(outcome, _)| outcome))
    }

    /// [`Loaded::instantiate`] with `guard` as the instance's limiter; a limit that fired
    /// comes back with the fuel instantiation consumed.
    fn instantiate_guarded(
        &self,
        workload: &Workload,
        guard: Guard,
    ) -> Result<Result<Instance, (Outcome, Fuel)>, RunError> {
        let wasi = wasi_builder(&self.policy, workload)?;
        match &self.entry {
            Entry::Module(pre) => {
                let mut wasi = wasi;
                let mut store = Store::new(
                    &self.engine,
                    ModuleHost {
                        wasi: wasi.build_p1(),
                        guard,
                    },
                );
                self.arm(&mut store);
                match pre.instantiate(&mut store) {
                    Ok(instance) => Ok(Ok(Instance {
                        inner: InstanceInner::Module(store, instance),
                    })),
                    Err(error) => Ok(Err(self.ended(error, &store, &store.data().guard))),
                }
            }
            Entry::P3Component(pre) => {
                let mut store = self.component_store(wasi, guard);
                if tokio::runtime::Handle::try_current().is_ok() {
                    // Its event loop would have to block inside another one.
                    return Err(RunError::Link(
                        "a WASI 0.3 command cannot be run from inside an async runtime".into(),
                    ));
                }
                let events = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|error| {
                        RunError::Link(format!("cannot start an event loop: {error}"))
                    })?;
                match events.block_on(pre.instantiate_async(&mut store)) {
                    Ok(command) => Ok(Ok(Instance {
                        inner: InstanceInner::P3Component(store, command, events),
                    })),
                    Err(error) => Ok(Err(self.ended(error, &store, &store.data().guard))),
                }
            }
            Entry::Component(pre) => {
                let mut store = self.component_store(wasi, guard);
                match pre.instantiate(&mut store) {
                    Ok(command) => Ok(Ok(Instance {
                        inner: InstanceInner::Component(store, command),
                    })),
                    Err(error) => Ok(Err(self.ended(error, &store, &store.data().guard))),
                }
            }
        }
    }

    /// Instantiates and runs the workload to its end, enforcing every limit of the
    /// policy, and reports a limit's reason (stderr and `report`'s termination log).
    ///
    /// With [`DeadlineMode::ProcessWatchdog`] (the default), a deadline that passes ends
    /// this process with exit code 124 after reporting: use it where the process belongs
    /// to the workload.
    pub fn run(&self, workload: &Workload, report: &Report) -> Result<Outcome, RunError> {
        self.run_measured(workload, report)
            .map(|(outcome, _)| outcome)
    }

    /// [`Loaded::run`], returning what the run used as well.
    pub fn run_measured(
        &self,
        workload: &Workload,
        report: &Report,
    ) -> Result<(Outcome, Usage), RunError> {
        let started = Instant::now();
        let guard = Guard::new(&self.policy);
        let meter = UsageMeter {
            started,
            memory: guard.memory.clone(),
            fuel: if self.policy.fuel.is_some() {
                Fuel::Unknown
            } else {
                Fuel::Unmetered
            },
        };
        let watchdog =
            self.policy.timeout.clone().map(|timeout| {
                Watchdog::start(timeout, self.deadline, report.clone(), meter.clone())
            });
        let (outcome, fuel) = match self.instantiate_guarded(workload, guard)? {
            Err(ended) => ended,
            Ok(instance) => self.run_instance(instance),
        };
        drop(watchdog);
        report.outcome(&outcome);
        let usage = meter.usage(fuel);
        report.usage(&outcome, &usage);
        Ok((outcome, usage))
    }

    fn run_instance(&self, instance: Instance) -> (Outcome, Fuel) {
        match instance.inner {
            InstanceInner::Module(mut store, instance) => {
                let result = instance
                    .get_typed_func::<(), ()>(&mut store, "_start")
                    .and_then(|start| start.call(&mut store, ()));
                match result {
                    Ok(()) => (Outcome::Exited(0), self.fuel(&store)),
                    Err(error) => self.ended(error, &store, &store.data().guard),
                }
            }
            InstanceInner::Component(mut store, command) => {
                match command.wasi_cli_run().call_run(&mut store) {
                    Ok(Ok(())) => (Outcome::Exited(0), self.fuel(&store)),
                    Ok(Err(())) => (Outcome::Exited(1), self.fuel(&store)),
                    Err(error) => self.ended(error, &store, &store.data().guard),
                }
            }
            InstanceInner::P3Component(mut store, command, events) => {
                // call_async, not run_concurrent: a guest that waits on nothing that can
                // ever come traps (a deadlock) rather than hanging until its deadline.
                let run = command.wasi_cli_run().func_run();
                match events.block_on(run.call_async(&mut store, ())) {
                    Ok((Ok(()),)) => (Outcome::Exited(0), self.fuel(&store)),
                    Ok((Err(()),)) => (Outcome::Exited(1), self.fuel(&store)),
                    Err(error) => self.ended(error, &store, &store.data().guard),
                }
            }
        }
    }

    /// How a run that failed with `error` ended, and the fuel it had consumed.
    fn ended<T>(&self, error: wasmtime::Error, store: &Store<T>, guard: &Guard) -> (Outcome, Fuel) {
        (
            classify(error, guard, &StoreLimits::of(&self.policy)),
            self.fuel(store),
        )
    }

    fn fuel<T>(&self, store: &Store<T>) -> Fuel {
        fuel_consumed(store, self.policy.fuel.as_ref().map(|fuel| fuel.value))
    }

    /// A component's store, armed with the policy's limits.
    fn component_store(&self, mut wasi: WasiCtxBuilder, guard: Guard) -> Store<ComponentHost> {
        let mut store = Store::new(
            &self.engine,
            ComponentHost {
                wasi: wasi.build(),
                table: ResourceTable::new(),
                guard,
            },
        );
        self.arm(&mut store);
        store
    }

    fn arm<T: GuardedHost>(&self, store: &mut Store<T>) {
        let deadline = match (self.flavor.epoch, &self.policy.timeout) {
            (true, Some(timeout)) => {
                let ticks = timeout.value.as_nanos().div_ceil(EPOCH_TICK.as_nanos());
                EpochDeadline::Ticks(u64::try_from(ticks).unwrap_or(u64::MAX))
            }
            _ => EpochDeadline::None,
        };
        arm(store, &StoreLimits::of(&self.policy), deadline);
    }
}

/// How a store's deadline is kept by epochs.
#[derive(Debug, Clone, Copy)]
pub(crate) enum EpochDeadline {
    /// No epoch checks (or none that end anything).
    None,
    /// Trap after this many epoch ticks: a program with an in-engine deadline.
    Ticks(u64),
    /// Yield to the host at every tick, and trap once the instant (if any) has passed: a
    /// request, which shares the server's threads with every other request.
    Yielding(Option<Instant>),
}

/// Arms `store` with the limits of one run (or one request): the memory and table limiter,
/// the fuel budget and the deadline. The one place both running and serving set them.
pub(crate) fn arm<T: GuardedHost>(
    store: &mut Store<T>,
    limits: &StoreLimits,
    deadline: EpochDeadline,
) {
    store.limiter(|host| host.guard() as &mut dyn ResourceLimiter);
    if let Some(fuel) = &limits.fuel {
        store
            .set_fuel(fuel.value)
            .expect("engines for a policy with fuel are built with consume_fuel");
    }
    match deadline {
        EpochDeadline::None => {}
        EpochDeadline::Ticks(ticks) => {
            store.set_epoch_deadline(ticks);
            store.epoch_deadline_trap();
        }
        EpochDeadline::Yielding(deadline) => {
            store.set_epoch_deadline(1);
            store.epoch_deadline_callback(move |_| match deadline {
                Some(deadline) if Instant::now() >= deadline => Ok(UpdateDeadline::Interrupt),
                _ => Ok(UpdateDeadline::Yield(1)),
            });
        }
    }
}

/// The WASI context of one instance: the workload's args, env, stdio and preopened
/// directories, and sockets only to the policy's grants (no DNS, no UDP, no listening).
pub(crate) fn wasi_builder(
    policy: &Policy,
    workload: &Workload,
) -> Result<WasiCtxBuilder, RunError> {
    let mut builder = WasiCtxBuilder::new();
    builder.args(&workload.args);
    builder.envs(&workload.env);
    if workload.inherit_stdio {
        builder.inherit_stdio();
    }
    for preopen in &workload.preopens {
        let perms = match preopen.access {
            Access::ReadOnly => FsPerms::ReadOnly,
            Access::ReadWrite => FsPerms::ReadWrite,
        };
        builder
            .preopened_dir(&preopen.host, &preopen.guest, perms)
            .map_err(|error| RunError::Preopen {
                path: preopen.host.clone(),
                message: format!("{error:#}"),
            })?;
    }
    // Sockets are off unless granted: no address passes the check, no DNS at all.
    builder.allow_ip_name_lookup(false).allow_udp(false);
    let grants: Arc<[SocketAddr]> = policy.network.clone().into();
    builder.allow_tcp(!grants.is_empty());
    builder.socket_addr_check(move |address, usage| {
        let allowed = socket_use_allowed(&grants, address, usage);
        Box::pin(async move { allowed })
    });
    Ok(builder)
}

/// The limits one store runs under, which an [`Outcome`] names when one fires.
#[derive(Debug, Clone, Default)]
pub(crate) struct StoreLimits {
    pub(crate) fuel: Option<Limit<u64>>,
    pub(crate) timeout: Option<Limit<Duration>>,
    pub(crate) memory: Option<Limit<u64>>,
}

impl StoreLimits {
    pub(crate) fn of(policy: &Policy) -> StoreLimits {
        StoreLimits {
            fuel: policy.fuel.clone(),
            timeout: policy.timeout.clone(),
            memory: policy.memory.clone(),
        }
    }
}

/// How a run (or a request) that failed with `error` ended, by the contract's causes.
pub(crate) fn classify(error: wasmtime::Error, guard: &Guard, limits: &StoreLimits) -> Outcome {
    if let Some(exit) = error.downcast_ref::<I32Exit>() {
        return Outcome::Exited(exit.0);
    }
    let trap = error.downcast_ref::<Trap>().copied();
    match (trap, &limits.fuel, &limits.timeout) {
        (Some(Trap::OutOfFuel), Some(fuel), _) => return Outcome::FuelExhausted(fuel.clone()),
        (Some(Trap::Interrupt), _, Some(timeout)) => {
            return Outcome::DeadlineExceeded(timeout.clone());
        }
        _ => {}
    }
    if let Some(refused) = &guard.refused {
        return Outcome::MemoryLimit {
            limit: refused
                .by_memory_limit
                .then(|| limits.memory.clone())
                .flatten(),
            refused: refused.what.clone(),
        };
    }
    let place = error
        .downcast_ref::<WasmBacktrace>()
        .and_then(|backtrace| backtrace.frames().first())
        .and_then(|frame| frame.func_name().map(|name| format!(" (in {name})")))
        .unwrap_or_default();
    match trap {
        Some(trap) => Outcome::Trapped(format!("{trap}{place}")),
        None => Outcome::Trapped(format!("{error}")),
    }
}

struct ModuleHost {
    wasi: WasiP1Ctx,
    guard: Guard,
}

struct ComponentHost {
    wasi: WasiCtx,
    table: ResourceTable,
    guard: Guard,
}

/// Store data that carries a [`Guard`].
pub(crate) trait GuardedHost: Send + 'static {
    fn guard(&mut self) -> &mut Guard;
}

impl GuardedHost for ModuleHost {
    fn guard(&mut self) -> &mut Guard {
        &mut self.guard
    }
}

impl GuardedHost for ComponentHost {
    fn guard(&mut self) -> &mut Guard {
        &mut self.guard
    }
}

impl WasiView for ComponentHost {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// The per-store resource limiter: caps all linear memory of the instance together (a
/// component's several memories included) and its table elements, and remembers a
/// refusal so the outcome can say that the guest died of it.
pub(crate) struct Guard {
    memory_cap: Option<u64>,
    /// Linear memory held now (Wasm memories never shrink, so also the most held). Shared
    /// so that a run's usage can be read where the store cannot: the deadline's watchdog.
    memory: Arc<AtomicU64>,
    tables_in_use: usize,
    refused: Option<Refusal>,
}

struct Refusal {
    by_memory_limit: bool,
    what: String,
}

impl Guard {
    fn new(policy: &Policy) -> Guard {
        Guard::with_cap(policy.memory.as_ref().map(|limit| limit.value))
    }

    /// Bytes of linear memory the instance holds now.
    pub(crate) fn peak(&self) -> u64 {
        self.memory.load(Ordering::Relaxed)
    }

    /// A guard that caps all memory of an instance at `memory_cap` bytes.
    pub(crate) fn with_cap(memory_cap: Option<u64>) -> Guard {
        Guard {
            memory_cap,
            memory: Arc::new(AtomicU64::new(0)),
            tables_in_use: 0,
            refused: None,
        }
    }
}

impl ResourceLimiter for Guard {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|maximum| desired > maximum) {
            // Beyond the module's own declared maximum: `memory.grow` returns -1 as Wasm
            // says it must, and no limit of Bulwark's fired (a later trap is the guest's).
            return Ok(false);
        }
        let growth = (desired - current) as u64;
        let total = self.peak().saturating_add(growth);
        let table_bytes = (self.tables_in_use as u64).saturating_mul(size_of::<usize>() as u64);
        if let Some(cap) = self.memory_cap
            && total.saturating_add(table_bytes) > cap
        {
            self.refused = Some(Refusal {
                by_memory_limit: true,
                what: format!("growing linear memory to {} refused", Bytes(total)),
            });
            return Ok(false);
        }
        self.memory.store(total, Ordering::Relaxed);
        Ok(true)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        // The OS (or the pool) could not back the growth: the guest sees -1, as for a cap.
        self.refused = Some(Refusal {
            by_memory_limit: false,
            what: format!("growing linear memory failed: {error}"),
        });
        Ok(())
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|maximum| desired > maximum) {
            // The table's own declared maximum, as for memories above.
            return Ok(false);
        }
        let total = self.tables_in_use.saturating_add(desired - current);
        let table_bytes = (total as u64).saturating_mul(size_of::<usize>() as u64);
        let memory_total = self.peak().saturating_add(table_bytes);
        let over_memory = self.memory_cap.is_some_and(|cap| memory_total > cap);
        if total > MAX_TABLE_ELEMENTS || over_memory {
            self.refused = Some(Refusal {
                by_memory_limit: over_memory,
                what: format!(
                    "growing tables to {total} elements refused (at most {MAX_TABLE_ELEMENTS} per instance)"
                ),
            });
            return Ok(false);
        }
        self.tables_in_use = total;
        Ok(true)
    }
}

/// The network policy at the socket level: connect only to granted destinations; bind
/// only the implicit wildcard bind that `connect` performs; never listen, accept or UDP.
fn socket_use_allowed(grants: &[SocketAddr], address: SocketAddr, usage: SocketAddrUse) -> bool {
    match usage {
        SocketAddrUse::TcpConnect => grants.contains(&address),
        SocketAddrUse::TcpBind => {
            !grants.is_empty() && address.ip().is_unspecified() && address.port() == 0
        }
        _ => false,
    }
}

/// Advances `engine`'s epoch every [`EPOCH_TICK`] for as long as the engine lives: guests
/// check their deadline (and, when serving, yield to the server) at each tick.
pub(crate) fn start_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("bulwark-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })
        .expect("cannot start the epoch thread");
}

/// What a run's usage is read from at its end, wherever that end comes.
#[derive(Clone)]
struct UsageMeter {
    started: Instant,
    memory: Arc<AtomicU64>,
    /// The fuel to report where the store cannot be read.
    fuel: Fuel,
}

impl UsageMeter {
    fn usage(&self, fuel: Fuel) -> Usage {
        Usage {
            wall: self.started.elapsed(),
            cpu: Some(process_cpu()),
            fuel,
            memory: self.memory.load(Ordering::Relaxed),
        }
    }
}

/// Ends the process at the deadline (plus a grace period in epoch mode, where the engine
/// itself should have stopped the guest first) unless dropped before.
struct Watchdog {
    done: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start(
        timeout: Limit<Duration>,
        mode: DeadlineMode,
        report: Report,
        meter: UsageMeter,
    ) -> Watchdog {
        let (done, finished) = mpsc::channel::<()>();
        let wait = match mode {
            DeadlineMode::ProcessWatchdog => timeout.value,
            DeadlineMode::Epoch => timeout.value + EPOCH_TICK + DEADLINE_GRACE,
        };
        let thread = std::thread::Builder::new()
            .name("bulwark-deadline".into())
            .spawn(move || {
                if let Err(mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(wait) {
                    let outcome = Outcome::DeadlineExceeded(timeout);
                    flush_stdout_briefly();
                    report.outcome(&outcome);
                    // The guest holds its store: its fuel count cannot be read here.
                    report.usage(&outcome, &meter.usage(meter.fuel));
                    // SAFETY: _exit ends the process without running destructors, which
                    // is the point: the guest may be anywhere, even inside a host call.
                    unsafe { libc::_exit(outcome.exit_code()) };
                }
            })
            .expect("cannot start the deadline thread");
        Watchdog {
            done: Some(done),
            thread: Some(thread),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Flushes what the guest wrote to stdout, but never waits long: a reader that stopped
/// reading must not keep a deadline from firing.
fn flush_stdout_briefly() {
    let (flushed, wait) = mpsc::channel();
    let _ = std::thread::Builder::new().spawn(move || {
        let _ = std::io::stdout().flush();
        let _ = flushed.send(());
    });
    let _ = wait.recv_timeout(Duration::from_millis(50));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn egress_counts_read_back_only_where_a_filter_published_them() {
        let counts = EgressCounts {
            allowed: 3,
            denied: 9,
            dropped: 1,
        };
        assert_eq!(EgressCounts::decode(&counts.encode()), Some(counts));
        assert_eq!(EgressCounts::decode(&[0; EgressCounts::SIZE]), None);
        assert_eq!(
            EgressCounts::decode(&EgressCounts::default().encode()),
            Some(EgressCounts::default()),
            "a filter that decided nothing yet still stands"
        );
    }

    #[test]
    fn sockets_reach_only_granted_destinations() {
        let grants: Vec<SocketAddr> = vec!["10.0.0.5:5432".parse().unwrap()];
        let connect = |addr: &str| {
            socket_use_allowed(&grants, addr.parse().unwrap(), SocketAddrUse::TcpConnect)
        };
        assert!(connect("10.0.0.5:5432"));
        assert!(!connect("10.0.0.5:5433"));
        assert!(!connect("10.0.0.6:5432"));
        assert!(!connect("127.0.0.1:5432"));
        let wildcard = "0.0.0.0:0".parse().unwrap();
        assert!(socket_use_allowed(
            &grants,
            wildcard,
            SocketAddrUse::TcpBind
        ));
        assert!(!socket_use_allowed(&[], wildcard, SocketAddrUse::TcpBind));
        let port = "0.0.0.0:8080".parse().unwrap();
        for usage in [SocketAddrUse::TcpBind, SocketAddrUse::TcpListen] {
            assert!(!socket_use_allowed(&grants, port, usage));
        }
        let peer = "10.0.0.5:5432".parse().unwrap();
        for usage in [
            SocketAddrUse::TcpAccept,
            SocketAddrUse::UdpBind,
            SocketAddrUse::UdpSend,
            SocketAddrUse::UdpReceive,
        ] {
            assert!(!socket_use_allowed(&grants, peer, usage));
        }
    }

    /// A run of `wat` with `bulwark.dev/memory: 32Mi` and no cache.
    /// Runs `wat` with `knobs` set, and returns how it ended and what it used.
    fn run_wat_measured(wat: &str, knobs: &[(crate::policy::Knob, &str)]) -> (Outcome, Usage) {
        let mut request = crate::Request::annotations();
        for (knob, value) in knobs {
            request.set(*knob, value).unwrap();
        }
        let policy = Policy::resolve(&crate::NodeConfig::default(), &request).unwrap();
        let wasm = wat::parse_str(wat).unwrap();
        let loaded = Runtime::new(RuntimeOptions::default())
            .load(&policy, &wasm)
            .unwrap();
        loaded
            .run_measured(&Workload::default(), &Report::default())
            .unwrap()
    }

    /// A module that runs a loop of five instructions, each costing one unit of fuel,
    /// `rounds` times, then grows its memory (one page to start) by `pages`.
    fn burner(rounds: u32, pages: u32) -> String {
        format!(
            r#"(module (memory 1)
                 (func (export "_start") (local $i i32)
                   (local.set $i (i32.const {rounds}))
                   (loop $l
                     (local.get $i) (i32.const 1) (i32.sub) (local.tee $i) (br_if $l))
                   (drop (memory.grow (i32.const {pages})))))"#
        )
    }

    #[test]
    fn usage_counts_the_fuel_of_every_instruction_and_the_memory_grown_to() {
        use crate::policy::Knob;
        let measure = |rounds, pages| {
            let (outcome, usage) =
                run_wat_measured(&burner(rounds, pages), &[(Knob::Fuel, "100000000")]);
            assert_eq!(outcome, Outcome::Exited(0));
            usage
        };
        let (short, long) = (measure(1_000, 3), measure(101_000, 3));
        let fuel = |usage: Usage| match usage.fuel {
            Fuel::Consumed(units) => units,
            other => panic!("{other:?}"),
        };
        // 100,000 more rounds of five one-unit instructions: exactly 500,000 units more.
        assert_eq!(fuel(long) - fuel(short), 500_000);
        assert_eq!(short.memory, 4 << 16);
        assert!(short.cpu.is_some());
        // Nothing metered without a budget.
        let (_, unmetered) = run_wat_measured(&burner(10, 0), &[]);
        assert_eq!(
            (unmetered.fuel, unmetered.memory),
            (Fuel::Unmetered, 1 << 16)
        );
    }

    fn run_wat(wat: &str) -> Outcome {
        let mut request = crate::Request::annotations();
        request.set(crate::policy::Knob::Memory, "32Mi").unwrap();
        let policy = Policy::resolve(&crate::NodeConfig::default(), &request).unwrap();
        let runtime = Runtime::new(RuntimeOptions {
            deadline: DeadlineMode::Epoch,
            ..RuntimeOptions::default()
        });
        let wasm = wat::parse_str(wat).unwrap();
        let loaded = runtime.load(&policy, &wasm).unwrap();
        loaded
            .run(&Workload::default(), &Report::default())
            .unwrap()
    }

    // Found by the `modules` fuzz target: a growth past the module's own declared maximum
    // was taken for a memory limit, and the guest's later trap reported as one (137).
    #[test]
    fn growing_past_a_declared_maximum_is_the_guests_business_not_a_limit() {
        let outcome = run_wat(
            r#"(module (memory 1 2) (table 1 2 funcref)
                (func (export "_start")
                  (drop (memory.grow (i32.const 5)))
                  (drop (table.grow (ref.null func) (i32.const 5)))
                  unreachable))"#,
        );
        assert!(
            matches!(&outcome, Outcome::Trapped(trap) if trap.contains("unreachable")),
            "{outcome:?}"
        );
    }

    #[test]
    fn memory_and_tables_share_one_limit() {
        // 4 MiB of table (512Ki elements of 8 bytes) leaves room for 28 MiB of memory, not 32.
        let outcome = run_wat(
            r#"(module (memory 1) (table 1 funcref)
                (func (export "_start")
                  (if (i32.eq (table.grow (ref.null func) (i32.const 524287)) (i32.const -1))
                    (then unreachable))
                  (if (i32.eq (memory.grow (i32.const 440)) (i32.const -1))
                    (then unreachable))
                  (if (i32.ne (memory.grow (i32.const 50)) (i32.const -1))
                    (then unreachable))))"#,
        );
        assert_eq!(outcome, Outcome::Exited(0));
    }
}
