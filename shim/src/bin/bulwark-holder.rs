//! The pod sandbox's holder: a tiny process in the pod's namespaces, as `pause` is for a
//! runc pod (see `bulwark_shim::process::holder`).

fn main() {
    bulwark_shim::process::set_name(c"bulwark-holder");
    std::process::exit(bulwark_shim::process::holder::main(
        std::env::args_os().skip(1),
    ));
}
