//! The workload process's side: wait at the gate, load the module, lock down, run.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use bulwark_runtime::cache::ModuleCache;
use bulwark_runtime::run::{Preopen, Report, Workload};
use bulwark_runtime::{Runtime, RuntimeOptions};

use crate::process::lockdown::seccomp::Needs;
use crate::process::lockdown::{Confinement, lock_down};

use super::{FIRST_PREOPEN_FD, LOCKDOWN_PROBE_ENV, MODULE_FD, Plan, WORKLOAD_GATE_FD};

/// Runs a workload process to its end; returns its exit code.
pub fn main(plan_path: &Path) -> i32 {
    crate::init_stderr_logging();
    match run(plan_path) {
        Ok(code) => code,
        Err(error) => {
            // The container's stderr is its log: say why it could not run.
            eprintln!("bulwark: error: {error:#}");
            1
        }
    }
}

/// What the workload runs: a program to its end, or a wasi:http service.
enum Loaded {
    Program(bulwark_runtime::run::Loaded),
    Service(
        bulwark_runtime::serve::Service,
        bulwark_runtime::serve::Listeners,
    ),
}

fn run(plan_path: &Path) -> Result<i32> {
    // SAFETY: getppid has no preconditions. The shim checked it was our parent before exec.
    let shim = unsafe { libc::getppid() };
    wait_at_gate()?;
    let plan = Plan::read(plan_path)?;
    let loaded = load(&plan)?;
    // The cache's key did not outlive loading (the runtime is dropped): the guest may not
    // forge entries. Nor may anything of it be left on the stack.
    crate::process::lockdown::scrub_stack();

    let preopens = inherited_descriptors(&plan)?;
    let termination_log = match plan.termination_log {
        true => Some(inherited(
            FIRST_PREOPEN_FD + plan.preopens.len() as RawFd,
            "the termination-message file",
        )?),
        false => None,
    };
    lock_down(&Confinement {
        dirs: preopens
            .iter()
            .zip(&plan.preopens)
            .map(|(dir, planned)| (dir, planned.access, planned.guest.as_str()))
            .collect(),
        writable_file: termination_log.as_ref(),
        tcp_ports: plan.policy.network.iter().map(|a| a.port()).collect(),
        user: &plan.user,
        allow_without_landlock: plan.policy.allow_without_landlock,
        parent: shim,
        seccomp: Needs {
            network: !plan.policy.network.is_empty(),
            serving: plan.serve,
        },
    })?;
    if let Some(paths) = std::env::var_os(LOCKDOWN_PROBE_ENV) {
        super::probe::probe(&paths);
    }

    let workload = Workload {
        args: plan.args.clone(),
        env: plan.env.clone(),
        preopens: preopens
            .iter()
            .zip(&plan.preopens)
            .map(|(dir, planned)| Preopen {
                // The very directory the shim opened (a magic link to it, not a path).
                host: PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())),
                guest: planned.guest.clone(),
                access: planned.access,
            })
            .collect(),
        inherit_stdio: true,
    };
    let report = Report {
        // The very file kubelet made: its path on the host may not be ours to walk.
        termination_log: termination_log
            .as_ref()
            .map(|log| PathBuf::from(format!("/proc/self/fd/{}", log.as_raw_fd()))),
    };
    match loaded {
        Loaded::Program(program) => Ok(program.run(&workload, &report)?.exit_code()),
        Loaded::Service(service, listeners) => Ok(service.serve(listeners, workload)?),
    }
}

/// Loads the module through the node cache (then dropped, key and all) and, for a
/// service, binds its addresses in the pod's network namespace: before the lock-down, so a
/// port below 1024 can be had, but not yet listening (that waits for a first instance).
fn load(plan: &Plan) -> Result<Loaded> {
    let wasm = read_module(&plan.entrypoint)?;
    let cache = match ModuleCache::open(&plan.cache_dir) {
        Ok(cache) => Some(cache),
        Err(error) => {
            log::warn!("{error}; compiling without the cache");
            None
        }
    };
    let runtime = Runtime::new(RuntimeOptions {
        cache,
        parallel_compilation: false,
        ..RuntimeOptions::default()
    });
    let entrypoint = || plan.entrypoint.clone();
    if !plan.serve {
        let program = runtime.load(&plan.policy, &wasm).with_context(entrypoint)?;
        return Ok(Loaded::Program(program));
    }
    let service = runtime
        .load_service(&plan.policy, &wasm)
        .with_context(entrypoint)?;
    let listeners = bulwark_runtime::serve::Listeners::bind(service.serving())?;
    Ok(Loaded::Service(service, listeners))
}

fn read_module(entrypoint: &str) -> Result<Vec<u8>> {
    // SAFETY: the shim placed the module on this descriptor for us alone.
    let mut module = unsafe { File::from_raw_fd(MODULE_FD) };
    let mut wasm = Vec::new();
    module
        .read_to_end(&mut wasm)
        .with_context(|| format!("cannot read the module {entrypoint}"))?;
    Ok(wasm)
}

/// The preopened directories the shim passed, in the plan's order.
fn inherited_descriptors(plan: &Plan) -> Result<Vec<OwnedFd>> {
    (FIRST_PREOPEN_FD..)
        .zip(&plan.preopens)
        .map(|(fd, planned)| inherited(fd, &format!("the directory for {}", planned.guest)))
        .collect()
}

/// Descriptor `fd`, which the shim passed for `what`.
fn inherited(fd: RawFd, what: &str) -> Result<OwnedFd> {
    // SAFETY: F_GETFD only checks that the shim passed this descriptor.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        anyhow::bail!("{what} was not passed (descriptor {fd})");
    }
    // SAFETY: the shim placed it on this descriptor for us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Blocks until the shim releases this process (see [`WORKLOAD_GATE_FD`]).
fn wait_at_gate() -> Result<()> {
    // SAFETY: the shim set up this descriptor for us alone; nothing else in the process
    // uses it, and the File closes it.
    let mut gate = unsafe { File::from_raw_fd(WORKLOAD_GATE_FD) };
    let mut byte = [0u8; 1];
    match gate.read(&mut byte) {
        Ok(1) => Ok(()),
        Ok(_) => anyhow::bail!("the shim did not place this workload in its cgroup; not running"),
        Err(error) => Err(error).context("cannot read the workload gate"),
    }
}
