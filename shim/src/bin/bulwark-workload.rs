//! The binary of the processes that handle guest bytes: `workload PLAN` runs one Wasm
//! container, `compile-step JOB` compiles one module. The shim starts it both ways. It is
//! position-independent: every such process has addresses of its own.

use std::path::Path;

use bulwark_shim::process::{compile, workload};

fn main() {
    bulwark_shim::process::set_name(c"bulwark-workload");
    let mut args = std::env::args_os().skip(1);
    let role = args.next();
    let argument = args.next();
    let code = match (role.as_ref().and_then(|role| role.to_str()), argument) {
        (Some(workload::WORKLOAD_ARG), Some(plan)) => workload::main(Path::new(&plan)),
        (Some(compile::COMPILE_STEP_ARG), Some(job)) => compile::main(&job.to_string_lossy()),
        _ => {
            eprintln!(
                "usage: bulwark-workload {} PLAN | {} JOB (the shim starts it)",
                workload::WORKLOAD_ARG,
                compile::COMPILE_STEP_ARG
            );
            2
        }
    };
    std::process::exit(code);
}
