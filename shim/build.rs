//! Two things the shim's build does besides compiling Rust:
//!
//! - The shim's binary is linked at a fixed address (see .cargo/config.toml): static, not a
//!   static-pie. It runs one per pod and never handles guest bytes, and its pointer tables
//!   then stay shared pages of the file instead of a private relocated copy in every shim.
//!   Everything else of the build stays position-independent.
//! - The egress filter (`bpf/egress.bpf.c`) is compiled to a BPF object with clang (`make
//!   deps` installs it) and embedded in the binaries that attach it.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    for arg in ["-no-pie", "-static"] {
        println!("cargo:rustc-link-arg-bin=containerd-shim-bulwark-v1={arg}");
    }
    build_egress_filter();
}

fn build_egress_filter() {
    let source = "bpf/egress.bpf.c";
    println!("cargo:rerun-if-changed={source}");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out.join("egress.bpf.o");
    let clang = std::env::var("BULWARK_BPF_CLANG").unwrap_or_else(|_| "clang".into());
    println!("cargo:rerun-if-env-changed=BULWARK_BPF_CLANG");
    let arch_headers = format!("/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-I{arch_headers}"))
        .args(["-c", source, "-o"])
        .arg(&object)
        .status()
        .unwrap_or_else(|error| {
            panic!("cannot run {clang} to build {source} ({error}): `make deps` installs clang")
        });
    assert!(status.success(), "{clang} could not build {source}");
}
