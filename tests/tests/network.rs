//! Network grants end to end: a WASI preview 2 component that opens a TCP connection, run
//! by `bulwark run`, reaches a listener on loopback only when `--network` grants exactly
//! that address, and a node configuration without `allow_network` refuses the grant.

use std::io::Read;
use std::net::{SocketAddr, SocketAddrV4, TcpListener};
use std::time::Duration;

use anyhow::Result;
use bulwark_tests::socket_guest::connect_component;

struct Run {
    code: i32,
    stderr: String,
}

fn bulwark(cache: &std::path::Path, args: &[&str]) -> Run {
    let output = std::process::Command::new(bulwark_tests::release_dir().join("bulwark"))
        .env_clear()
        .env("BULWARK_CACHE_DIR", cache)
        .arg("run")
        .args(args)
        .output()
        .unwrap();
    Run {
        code: output.status.code().unwrap(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Whether the listener got a connection (the guest opens at most one).
fn accepted(listener: &TcpListener) -> bool {
    listener.set_nonblocking(true).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    match listener.accept() {
        Ok((mut stream, _)) => {
            let _ = stream.read(&mut [0u8; 1]);
            true
        }
        Err(_) => false,
    }
}

#[test]
fn a_component_connects_only_where_granted() -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let SocketAddr::V4(address) = listener.local_addr()? else {
        unreachable!("bound to an IPv4 address")
    };
    let temp = tempfile::tempdir()?;
    let guest = temp.path().join("connect.wasm");
    std::fs::write(&guest, connect_component(address)?)?;
    let guest = guest.to_str().unwrap();
    let cache = temp.path().join("cache");

    // Granted: connects.
    let grant = format!("tcp:{address}");
    let run = bulwark(&cache, &["--network", &grant, guest]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(accepted(&listener), "granted, but no connection arrived");

    // Nothing granted: no connection.
    let run = bulwark(&cache, &[guest]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(!accepted(&listener), "connected without a grant");

    // Another port granted: no connection to this one.
    let other = SocketAddrV4::new(*address.ip(), address.port().wrapping_add(1).max(1));
    let run = bulwark(&cache, &["--network", &format!("tcp:{other}"), guest]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        !accepted(&listener),
        "connected with a grant for another port"
    );

    // A node that does not allow network grants refuses the request outright.
    let config = temp.path().join("config.toml");
    std::fs::write(&config, "[capabilities]\nallow_network = false\n")?;
    let run = bulwark(
        &cache,
        &[
            "--config",
            config.to_str().unwrap(),
            "--network",
            &grant,
            guest,
        ],
    );
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("allow_network = false"),
        "{}",
        run.stderr
    );

    // A node that allows grants but names no ceiling keeps them off its own loopback...
    std::fs::write(&config, "[capabilities]\nallow_network = true\n")?;
    let with_config = |grant: &str| {
        bulwark(
            &cache,
            &[
                "--config",
                config.to_str().unwrap(),
                "--network",
                grant,
                guest,
            ],
        )
    };
    let run = with_config(&grant);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains(&format!(
            "--network: {grant} is not allowed: it is a loopback address"
        )),
        "{}",
        run.stderr
    );
    assert!(!accepted(&listener), "connected to a refused grant");

    // ...and one whose ceiling holds the grant runs it; one outside it is refused.
    std::fs::write(
        &config,
        format!(
            "[ceilings]\nnetwork = [\"127.0.0.0/8:{}\"]\n[capabilities]\nallow_network = true\n",
            address.port()
        ),
    )?;
    let run = with_config(&grant);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        accepted(&listener),
        "granted within the ceiling, but no connection arrived"
    );
    let run = with_config(&format!("tcp:{other}"));
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("is outside this node's network ceiling"),
        "{}",
        run.stderr
    );
    Ok(())
}
