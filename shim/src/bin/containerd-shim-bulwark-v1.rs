//! The containerd shim binary. `workload PLAN` runs one Wasm container and `sandbox BUNDLE`
//! holds a pod's namespaces (the shim starts itself both ways); anything else is
//! containerd's shim protocol.

use std::path::Path;

use bulwark_shim::process::{holder, workload};

fn main() {
    let mut args = std::env::args_os().skip(1);
    let role = args.next();
    let role = role.as_ref().and_then(|arg| arg.to_str());
    if let Some(role @ (workload::WORKLOAD_ARG | holder::SANDBOX_ARG)) = role {
        let Some(path) = args.next() else {
            eprintln!("usage: containerd-shim-bulwark-v1 {role} PATH");
            std::process::exit(2);
        };
        let path = Path::new(&path);
        std::process::exit(match role {
            workload::WORKLOAD_ARG => workload::main(path),
            _ => holder::main(path),
        });
    }
    containerd_shim::run::<bulwark_shim::task::BulwarkShim>("io.containerd.bulwark.v1", None);
}
