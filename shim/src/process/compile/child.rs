//! The compile step's side: wait to be placed, lock down, then (only then) read the
//! module, compile it, write the artifact and report.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;

use anyhow::{Context, Result};

use bulwark_runtime::compile::{CompileError, compile};

use crate::bundle::spec::User;
use crate::process::lockdown::seccomp::Needs;
use crate::process::lockdown::{Confinement, lock_down};

use super::{GATE_FD, Job, MODULE_FD, OUTPUT_FD, REPORT_FD, Report};

/// Runs the compile step described by `job` (JSON); returns its exit code.
pub fn main(job: &str) -> i32 {
    // SAFETY: the parent set these descriptors up for this process alone.
    let mut report = unsafe { File::from_raw_fd(REPORT_FD) };
    let outcome = run(job).unwrap_or_else(|error| Report::Failed(format!("{error:#}")));
    let code = match outcome {
        Report::Compiled(_) => 0,
        _ => 1,
    };
    let written = serde_json::to_vec(&outcome)
        .map_err(std::io::Error::other)
        .and_then(|json| report.write_all(&json));
    if written.is_err() {
        return 2;
    }
    code
}

fn run(job: &str) -> Result<Report> {
    let job: Job = serde_json::from_str(job).context("malformed compile job")?;
    wait_at_gate()?;
    // SAFETY: getppid has no preconditions; the parent checked it was ours before exec.
    let parent = unsafe { libc::getppid() };
    let user = User {
        uid: job.uid,
        gid: job.gid,
        additional_gids: Vec::new(),
    };
    // Before a single byte of the module is read: nothing of the host's files, no
    // network, no privilege.
    lock_down(&Confinement {
        dirs: Vec::new(),
        writable_file: None,
        tcp_ports: Vec::new(),
        user: &user,
        allow_without_landlock: job.allow_without_landlock,
        parent,
        seccomp: Needs::default(),
    })?;
    // SAFETY: as above.
    let mut module = unsafe { File::from_raw_fd(MODULE_FD) };
    let mut wasm = Vec::new();
    module
        .read_to_end(&mut wasm)
        .context("cannot read the module")?;
    let compiled = match compile(&wasm, job.flavor, true) {
        Ok(compiled) => compiled,
        Err(error @ (CompileError::NotWasm(_) | CompileError::Invalid(_))) => {
            return Ok(Report::Invalid(error.to_string()));
        }
        Err(error) => return Err(error.into()),
    };
    drop(wasm);
    // SAFETY: as above.
    let mut output = unsafe { File::from_raw_fd(OUTPUT_FD) };
    output
        .write_all(&compiled.artifact)
        .context("cannot write the artifact")?;
    Ok(Report::Compiled(compiled.facts))
}

/// Blocks until the parent placed this process in its cgroup (see [`GATE_FD`]).
fn wait_at_gate() -> Result<()> {
    // SAFETY: the parent set this descriptor up for this process alone.
    let mut gate = unsafe { File::from_raw_fd(GATE_FD) };
    let mut byte = [0u8; 1];
    match gate.read(&mut byte) {
        Ok(1) => Ok(()),
        Ok(_) => anyhow::bail!("the parent did not place this compile step; not compiling"),
        Err(error) => Err(error).context("cannot read the gate"),
    }
}
