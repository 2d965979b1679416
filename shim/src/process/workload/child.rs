//! The workload process's side: wait at the gate, load the artifact and report, wait
//! again, lock down, run.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use bulwark_runtime::cache::Artifact;
use bulwark_runtime::run::{Preopen, Report, RunError, Workload};
use bulwark_runtime::serve::Listeners;
use bulwark_runtime::{Runtime, RuntimeOptions};

use crate::process::lockdown::seccomp::Needs;
use crate::process::lockdown::{Confinement, lock_down, warm_tokio_signals};

use super::{
    ARTIFACT_FD, FIRST_PREOPEN_FD, LOCKDOWN_PROBE_ENV, LoadReport, Plan, REPORT_FD,
    WORKLOAD_GATE_FD,
};

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
    Program(Box<bulwark_runtime::run::Loaded>),
    Service(
        Box<bulwark_runtime::serve::Service>,
        bulwark_runtime::serve::Listeners,
    ),
}

fn run(plan_path: &Path) -> Result<i32> {
    // SAFETY: getppid has no preconditions. The shim checked it was our parent before exec.
    let shim = unsafe { libc::getppid() };
    let mut gate = Gate::inherited();
    gate.wait("load")?;
    let plan = Plan::read(plan_path)?;
    let loaded = load(&plan);
    // SAFETY: the shim set this descriptor up for this process alone.
    let mut report = unsafe { File::from_raw_fd(REPORT_FD) };
    let (loaded, said) = match loaded {
        Ok(loaded) => (Some(loaded), LoadReport::Loaded),
        Err(LoadError::Refused(message)) => (None, LoadReport::Refused(message)),
        Err(LoadError::Failed(message)) => (None, LoadReport::Failed(message)),
    };
    let json = serde_json::to_vec(&said).context("cannot write the load report")?;
    report
        .write_all(&json)
        .context("cannot write the load report")?;
    drop(report);
    let Some(loaded) = loaded else {
        return Ok(1);
    };
    gate.wait("start")?;

    let preopens = inherited_descriptors(&plan)?;
    let termination_log = match plan.termination_log {
        true => Some(inherited(
            FIRST_PREOPEN_FD + plan.preopens.len() as RawFd,
            "the termination-message file",
        )?),
        false => None,
    };
    let egress_counts = match plan.egress_counts {
        true => Some(File::from(inherited(
            FIRST_PREOPEN_FD + plan.preopens.len() as RawFd + RawFd::from(plan.termination_log),
            "the egress counters",
        )?)),
        false => None,
    };
    warm_tokio_signals()?;
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
            serving: plan.facts.serves_http,
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
        egress_counts: egress_counts.map(std::sync::Arc::new),
    };
    let report = Report {
        // The very file kubelet made: its path on the host may not be ours to walk.
        termination_log: termination_log
            .as_ref()
            .map(|log| PathBuf::from(format!("/proc/self/fd/{}", log.as_raw_fd()))),
        // A container's log always ends with what it used: the figures a platform bills.
        usage: true,
    };
    match loaded {
        Loaded::Program(program) => Ok(program.run(&workload, &report)?.exit_code()),
        Loaded::Service(service, listeners) => Ok(service.serve(listeners, workload)?),
    }
}

/// Why the workload did not load.
enum LoadError {
    /// The pod's doing (see [`LoadReport::Refused`]).
    Refused(String),
    /// Not the pod's.
    Failed(String),
}

impl From<RunError> for LoadError {
    fn from(error: RunError) -> Self {
        match error {
            RunError::Link(_) | RunError::Policy(_) | RunError::Listen { .. } => {
                LoadError::Refused(error.to_string())
            }
            other => LoadError::Failed(other.to_string()),
        }
    }
}

/// Loads the compiled artifact and, for a service, binds its addresses in the pod's
/// network namespace: before the lock-down, so a port below 1024 can be had, but not yet
/// listening (that waits for a first instance).
fn load(plan: &Plan) -> Result<Loaded, LoadError> {
    // SAFETY: the shim placed the artifact on this descriptor for us alone.
    let artifact = Artifact {
        file: unsafe { File::from_raw_fd(ARTIFACT_FD) },
        facts: plan.facts.clone(),
    };
    let runtime = Runtime::new(RuntimeOptions::default());
    let named = |error: RunError| LoadError::from(error).named(&plan.entrypoint);
    if !plan.facts.serves_http {
        let program = runtime
            .load_artifact(&plan.policy, &artifact)
            .map_err(named)?;
        return Ok(Loaded::Program(Box::new(program)));
    }
    let service = runtime
        .load_service(&plan.policy, &artifact)
        .map_err(named)?;
    let listeners = Listeners::bind(service.serving()).map_err(named)?;
    Ok(Loaded::Service(Box::new(service), listeners))
}

impl LoadError {
    fn named(self, entrypoint: &str) -> LoadError {
        match self {
            LoadError::Refused(message) => LoadError::Refused(format!("{entrypoint}: {message}")),
            LoadError::Failed(message) => LoadError::Failed(format!("{entrypoint}: {message}")),
        }
    }
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

/// The gate the shim opens at Create (load) and at Start (run) (see [`WORKLOAD_GATE_FD`]).
struct Gate(File);

impl Gate {
    fn inherited() -> Gate {
        // SAFETY: the shim set up this descriptor for us alone; nothing else in the
        // process uses it, and the File closes it.
        Gate(unsafe { File::from_raw_fd(WORKLOAD_GATE_FD) })
    }

    /// Blocks until the shim lets the process go on to `step`.
    fn wait(&mut self, step: &str) -> Result<()> {
        let mut byte = [0u8; 1];
        match self.0.read(&mut byte) {
            Ok(1) => Ok(()),
            Ok(_) => anyhow::bail!("the shim did not let this workload {step}; not running"),
            Err(error) => Err(error).context("cannot read the workload gate"),
        }
    }
}
