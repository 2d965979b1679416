//! The shim's binary is linked at a fixed address (see .cargo/config.toml): static, not a
//! static-pie. It runs one per pod and never handles guest bytes, and its pointer tables
//! then stay shared pages of the file instead of a private relocated copy in every shim.
//! Everything else of the build stays position-independent.

fn main() {
    for arg in ["-no-pie", "-static"] {
        println!("cargo:rustc-link-arg-bin=containerd-shim-bulwark-v1={arg}");
    }
}
