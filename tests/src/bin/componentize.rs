//! Turns a core module into a component.
//!
//! - `componentize IN.wasm OUT.wasm`: a WASI preview 1 command module into a WASI preview 2
//!   command component, with Wasmtime's preview 1 adapter (the C guests as components).
//! - `componentize --http IN.wasm OUT.wasm`: a core module written against the canonical ABI
//!   of the `wasi:http/proxy` world (images/guests/httpd.c) into a wasi:http component: the
//!   world's type information is embedded from the WIT files of the wasmtime-wasi-http crate
//!   this build uses, and preview 1 imports (if any) go through the proxy adapter.
//! - `componentize --http-wit`: prints that WIT directory and the world's name, for other
//!   tools that build wasi:http components (componentize-py, for the Python guest).
//! - `componentize --p3-wit`: prints the WASI 0.3 WIT directory of the same crate (worlds
//!   `wasi:http/service@0.3.0` and `wasi:cli/command@0.3.0`), for the Python p3 guests.
//! - `componentize --wat IN.wat OUT.wasm`: a component (or module) in the text format into
//!   its binary (the hand-written WASI 0.3 command).

use anyhow::{Context, Result, bail};
use wasi_preview1_component_adapter_provider::{
    WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME, WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER,
    WASI_SNAPSHOT_PREVIEW1_PROXY_ADAPTER,
};

/// The `wasi:http/proxy` world of the wasmtime-wasi-http WIT files.
const PROXY_WORLD: &str = "wasi:http/proxy@0.2.12";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args == ["--http-wit"] {
        println!("{} {PROXY_WORLD}", http_wit()?);
        return Ok(());
    }
    if args == ["--p3-wit"] {
        println!(
            "{}",
            option_env!("BULWARK_WASI_P3_WIT")
                .context("the build found no wasmtime-wasi-http p3 WIT files (tests/build.rs)")?
        );
        return Ok(());
    }
    if let [flag, input, output] = args.as_slice()
        && flag == "--wat"
    {
        let binary = wat::parse_file(input).with_context(|| format!("cannot parse {input}"))?;
        std::fs::write(output, binary).with_context(|| format!("cannot write {output}"))?;
        return Ok(());
    }
    let (http, input, output) = match args.as_slice() {
        [flag, input, output] if flag == "--http" => (true, input, output),
        [input, output] => (false, input, output),
        _ => bail!(
            "usage: componentize [--http] IN.wasm OUT.wasm | componentize --wat IN.wat OUT.wasm | componentize --http-wit | componentize --p3-wit"
        ),
    };
    let mut module = std::fs::read(input).with_context(|| format!("cannot read {input}"))?;
    let adapter = if http {
        embed_proxy_world(&mut module)?;
        WASI_SNAPSHOT_PREVIEW1_PROXY_ADAPTER
    } else {
        WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER
    };
    let component = wit_component::ComponentEncoder::default()
        .validate(true)
        .module(&module)
        .with_context(|| format!("{input} is not a core module wit-component accepts"))?
        .adapter(WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME, adapter)
        .context("the preview 1 adapter does not fit")?
        .encode()
        .with_context(|| format!("cannot turn {input} into a component"))?;
    std::fs::write(output, component).with_context(|| format!("cannot write {output}"))?;
    Ok(())
}

fn http_wit() -> Result<&'static str> {
    option_env!("BULWARK_WASI_HTTP_WIT")
        .context("the build found no wasmtime-wasi-http WIT files (tests/build.rs)")
}

fn embed_proxy_world(module: &mut Vec<u8>) -> Result<()> {
    let wit = http_wit()?;
    let mut resolve = wit_parser::Resolve::default();
    let (package, _) = resolve
        .push_dir(wit)
        .with_context(|| format!("cannot read the WIT files in {wit}"))?;
    let world = resolve.select_world(&[package], Some(PROXY_WORLD))?;
    wit_component::embed_component_metadata(
        module,
        &resolve,
        world,
        wit_component::StringEncoding::UTF8,
    )
}
