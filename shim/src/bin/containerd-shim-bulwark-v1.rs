//! The containerd shim binary: containerd's shim protocol, one shim per pod. The processes
//! it starts are binaries of their own beside it: `bulwark-workload` (a Wasm container, and
//! the compile step) and `bulwark-holder` (a pod sandbox).

fn main() {
    containerd_shim::run::<bulwark_shim::task::BulwarkShim>("io.containerd.bulwark.v1", None);
}
