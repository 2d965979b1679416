//! Tells the crate which target it is built for (for `cargo metadata --filter-platform`),
//! and where the wasmtime-wasi and wasmtime-wasi-http sources this build uses keep their
//! WIT files, so that tests and tools can build WASI components where no cargo runs (the VM
//! of `make test-cgroup2`).
use std::path::{Path, PathBuf};

fn main() {
    println!(
        "cargo:rustc-env=BULWARK_TESTS_TARGET={}",
        std::env::var("TARGET").expect("cargo sets TARGET for build scripts")
    );
    let lock = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock");
    println!("cargo:rerun-if-changed={}", lock.display());
    let wit = [
        ("wasmtime-wasi", "src/p2/wit", "BULWARK_WASI_WIT"),
        ("wasmtime-wasi-http", "wit", "BULWARK_WASI_HTTP_WIT"),
        ("wasmtime-wasi-http", "src/p3/wit", "BULWARK_WASI_P3_WIT"),
    ];
    for (package, dir, variable) in wit {
        if let Some(dir) = locked_version(&lock, package).and_then(|v| source_dir(package, &v, dir))
        {
            println!("cargo:rustc-env={variable}={}", dir.display());
        }
    }
}

/// The version of `package` in Cargo.lock.
fn locked_version(lock: &Path, package: &str) -> Option<String> {
    let text = std::fs::read_to_string(lock).ok()?;
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line == format!("name = \"{package}\"") {
            let version = lines.next()?.strip_prefix("version = \"")?;
            return Some(version.trim_end_matches('"').to_owned());
        }
    }
    None
}

/// Directory `dir` of `package` `version` in the cargo registry's sources.
fn source_dir(package: &str, version: &str, dir: &str) -> Option<PathBuf> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))?;
    std::fs::read_dir(cargo_home.join("registry/src"))
        .ok()?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path().join(format!("{package}-{version}/{dir}")))
        .find(|dir| dir.is_dir())
}
