//! The containerd shim binary. `workload PLAN` runs one Wasm container (the shim starts
//! itself that way); anything else is containerd's shim protocol.

fn main() {
    let mut args = std::env::args_os().skip(1);
    if args
        .next()
        .is_some_and(|arg| arg == bulwark_shim::workload::WORKLOAD_ARG)
    {
        let Some(plan) = args.next() else {
            eprintln!("usage: containerd-shim-bulwark-v1 workload PLAN");
            std::process::exit(2);
        };
        std::process::exit(bulwark_shim::workload::main(std::path::Path::new(&plan)));
    }
    containerd_shim::run::<bulwark_shim::service::BulwarkShim>("io.containerd.bulwark.v1", None);
}
