//! Compiling a module: what the compile step runs, on bytes nobody trusts.
//!
//! The step learns the module's [`Facts`], picks the engine flavor they and the policy's
//! [`FlavorRequest`] call for, and writes Wasmtime's serialized artifact. Everything that
//! runs a guest afterwards loads that artifact ([`crate::run::Runtime::load_artifact`])
//! and never parses or compiles the module's bytes itself.

use std::fs::File;
use std::io::Write;

use crate::cache::{Artifact, CacheError, compile_in_memory};
use crate::engine::{
    Allocation, EngineError, Facts, Flavor, FlavorRequest, NotWasm, WasmKind, build_engine,
    detect_kind,
};

/// A module that could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// The bytes are not WebAssembly.
    #[error(transparent)]
    NotWasm(#[from] NotWasm),
    /// The bytes are WebAssembly but do not validate or compile.
    #[error("invalid WebAssembly: {0}")]
    Invalid(String),
    /// The engine could not be built.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The artifact could not be written where it was asked to go.
    #[error("cannot write the compiled artifact: {0}")]
    Write(std::io::Error),
    /// The cache could not be used.
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// A module compiled: Wasmtime's serialized artifact, its facts and the flavor it is for.
#[derive(Debug)]
pub struct Compiled {
    /// The serialized module or component.
    pub artifact: Vec<u8>,
    /// What compiling learnt of the module.
    pub facts: Facts,
    /// The engine flavor the artifact loads into.
    pub flavor: Flavor,
}

/// Compiles `wasm` for what `request` and its own facts call for, on as many threads as
/// `parallel` allows.
pub fn compile(
    wasm: &[u8],
    request: FlavorRequest,
    parallel: bool,
) -> Result<Compiled, CompileError> {
    detect_kind(wasm)?;
    // Past the header, bytes that do not parse are WebAssembly gone wrong.
    let facts = Facts::of(wasm).map_err(|error| CompileError::Invalid(error.reason().into()))?;
    let flavor = request.flavor(&facts);
    let engine = build_engine(flavor, Allocation::OnDemand, parallel)?;
    let artifact = match facts.kind {
        WasmKind::Module => engine.precompile_module(wasm),
        WasmKind::Component => engine.precompile_component(wasm),
    }
    .map_err(|error| CompileError::Invalid(format!("{error:#}")))?;
    Ok(Compiled {
        artifact,
        facts,
        flavor,
    })
}

/// Compiles `wasm` in this process into an artifact in memory: for tests, benchmarks and
/// library users that run trusted modules. The shim and the CLI compile in a compile step
/// of its own instead.
pub fn compile_here(wasm: &[u8], request: FlavorRequest) -> Result<Artifact, CompileError> {
    compile_in_memory(|file: &File| {
        let compiled = compile(wasm, request, true)?;
        (&*file)
            .write_all(&compiled.artifact)
            .map_err(CompileError::Write)?;
        Ok(compiled.facts)
    })
}
