//! A WASI preview 2 component that opens one TCP connection, for testing network grants
//! end to end. Nothing here can compile a socket-using guest from a source language (the
//! machine's wasi-libc is preview 1 only), so it is a core module written in WAT against the
//! canonical ABI of `wasi:sockets`, with the world taken from the WIT files of the
//! wasmtime-wasi crate this build uses (read in place, not copied) and encoded as a
//! component with wit-component.
//!
//! `run` returns ok when the connection was established, err otherwise (creating the socket
//! refused, the connect refused by policy, or the connection failed).

use std::net::SocketAddrV4;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};

const WASI: &str = "0.2.12";

/// The wasmtime-wasi crate's WIT directory (its `deps/` holds every WASI package): found by
/// the build script where it can, else asked of cargo.
fn wasi_wit_dir() -> Result<PathBuf> {
    if let Some(dir) = option_env!("BULWARK_WASI_WIT").map(PathBuf::from)
        && dir.is_dir()
    {
        return Ok(dir);
    }
    let output = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--offline"])
        // Only this platform's packages: the others need not be downloaded.
        .args([
            "--filter-platform",
            env!("BULWARK_TESTS_TARGET"),
            "--manifest-path",
        ])
        .arg(crate::workspace_root().join("Cargo.toml"))
        .output()
        .context("cannot run cargo metadata")?;
    if !output.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let manifest = metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|package| package["name"] == "wasmtime-wasi")
        .and_then(|package| package["manifest_path"].as_str())
        .context("wasmtime-wasi is not in the build")?;
    let dir = PathBuf::from(manifest)
        .parent()
        .context("manifest has no directory")?
        .join("src/p2/wit");
    Ok(dir)
}

/// The guest's core module: connect to `target`, report success or failure from `run`.
fn core_module(target: SocketAddrV4) -> String {
    let [a, b, c, d] = target.ip().octets();
    let port = target.port();
    format!(
        r#"(module
  (import "wasi:sockets/instance-network@{WASI}" "instance-network" (func $network (result i32)))
  (import "wasi:sockets/tcp-create-socket@{WASI}" "create-tcp-socket" (func $create (param i32 i32)))
  (import "wasi:sockets/tcp@{WASI}" "[method]tcp-socket.start-connect"
    (func $start_connect (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32)))
  (import "wasi:sockets/tcp@{WASI}" "[method]tcp-socket.finish-connect" (func $finish_connect (param i32 i32)))
  (import "wasi:sockets/tcp@{WASI}" "[method]tcp-socket.subscribe" (func $subscribe (param i32) (result i32)))
  (import "wasi:io/poll@{WASI}" "[method]pollable.block" (func $block (param i32)))
  (memory (export "memory") 1)
  (func (export "wasi:cli/run@{WASI}#run") (result i32)
    (local $network i32) (local $socket i32)
    (local.set $network (call $network))
    ;; create-tcp-socket(ipv4) -> result<tcp-socket, error-code> at 64
    (call $create (i32.const 0) (i32.const 64))
    (if (i32.load8_u (i32.const 64)) (then (return (i32.const 1))))
    (local.set $socket (i32.load (i32.const 68)))
    ;; start-connect(network, ipv4({port}, {a}.{b}.{c}.{d})) -> result<_, error-code> at 128
    (call $start_connect (local.get $socket) (local.get $network)
      (i32.const 0) (i32.const {port}) (i32.const {a}) (i32.const {b}) (i32.const {c}) (i32.const {d})
      (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
      (i32.const 128))
    (if (i32.load8_u (i32.const 128)) (then (return (i32.const 1))))
    (call $block (call $subscribe (local.get $socket)))
    ;; finish-connect() -> result<tuple<input-stream, output-stream>, error-code> at 192
    (call $finish_connect (local.get $socket) (i32.const 192))
    (if (i32.load8_u (i32.const 192)) (then (return (i32.const 1))))
    (i32.const 0))
)"#
    )
}

/// Builds the component that connects to `target`.
pub fn connect_component(target: SocketAddrV4) -> Result<Vec<u8>> {
    let mut resolve = wit_parser::Resolve::default();
    resolve.push_dir(wasi_wit_dir()?)?;
    let package = resolve.push_str(
        "bulwark-connect.wit",
        &format!(
            "package bulwark:test;\n\
             world connect {{\n\
               import wasi:sockets/instance-network@{WASI};\n\
               import wasi:sockets/tcp-create-socket@{WASI};\n\
               import wasi:sockets/tcp@{WASI};\n\
               import wasi:io/poll@{WASI};\n\
               export wasi:cli/run@{WASI};\n\
             }}\n"
        ),
    )?;
    let world = resolve.select_world(&[package], Some("connect"))?;
    let mut module = wat::parse_str(core_module(target))?;
    wit_component::embed_component_metadata(
        &mut module,
        &resolve,
        world,
        wit_component::StringEncoding::UTF8,
    )?;
    wit_component::ComponentEncoder::default()
        .validate(true)
        .module(&module)?
        .encode()
}
