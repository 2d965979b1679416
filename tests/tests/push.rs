//! `bulwark image push` to a registry that wants credentials (docker-registry with an
//! htpasswd file): refused without them, with a message saying how to give some; refused
//! with a wrong password, naming where it came from; accepted with `--password-stdin` and
//! with what `docker login` stores. skopeo, a client of its own, then reads the image back.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, ensure};
use bulwark_tests::harness::registry::Registry;

const USER: &str = "alice";
const PASSWORD: &str = "s3cret:with-colon";

/// `bulwark image push --insecure hello.wasm REFERENCE [flags]` with `home` as HOME and no
/// other place for stored credentials, `stdin` on its standard input.
fn push(reference: &str, home: &Path, flags: &[&str], stdin: &str) -> Result<Output> {
    let mut child = Command::new(bulwark_tests::release_dir().join("bulwark"))
        .args(["image", "push", "--insecure"])
        .args(flags)
        .arg(bulwark_tests::build_dir().join("guests/hello.wasm"))
        .arg(reference)
        .env("HOME", home)
        .env_remove("DOCKER_CONFIG")
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("REGISTRY_AUTH_FILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run bulwark")?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(stdin.as_bytes())?;
    Ok(child.wait_with_output()?)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The manifest digest skopeo reads for `reference` with the test user's credentials.
fn digest_as_skopeo_reads_it(reference: &str) -> Result<String> {
    let output = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--creds"])
        .arg(format!("{USER}:{PASSWORD}"))
        .arg(format!("docker://{reference}"))
        .output()
        .context("cannot run skopeo")?;
    ensure!(
        output.status.success(),
        "skopeo inspect: {}",
        stderr(&output)
    );
    let inspected: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    Ok(inspected["Digest"]
        .as_str()
        .context("no Digest")?
        .to_owned())
}

#[test]
fn pushes_to_a_registry_that_wants_credentials() -> Result<()> {
    let registry = Registry::start_with_user(USER, PASSWORD)?;
    let home = tempfile::tempdir()?;
    let reference = format!("{}/team/hello:v1", registry.addr());

    let anonymous = push(&reference, home.path(), &[], "")?;
    ensure!(!anonymous.status.success(), "pushed without credentials");
    ensure!(
        stderr(&anonymous).contains(&format!(
            "{} refused the push (401): no credentials for it were found; log in with `docker login`",
            registry.addr()
        )),
        "{}",
        stderr(&anonymous)
    );

    let wrong = push(
        &reference,
        home.path(),
        &["--username", USER, "--password-stdin"],
        "not-the-password\n",
    )?;
    ensure!(!wrong.status.success(), "pushed with a wrong password");
    ensure!(
        stderr(&wrong).contains(
            "refused the push (401): the credentials of alice from --username were not accepted"
        ),
        "{}",
        stderr(&wrong)
    );

    let given = push(
        &reference,
        home.path(),
        &["--username", USER, "--password-stdin"],
        &format!("{PASSWORD}\n"),
    )?;
    ensure!(given.status.success(), "{}", stderr(&given));
    let printed = String::from_utf8(given.stdout)?;
    let digest = printed
        .split_whitespace()
        .nth(1)
        .context("no digest printed")?;
    ensure!(
        digest_as_skopeo_reads_it(&reference)? == digest,
        "{printed}"
    );

    // What `docker login` writes: ~/.docker/config.json, base64 of USER:PASSWORD.
    let docker = home.path().join(".docker");
    std::fs::create_dir_all(&docker)?;
    let auth = Command::new("base64")
        .arg("-w0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child
                .stdin
                .take()
                .expect("piped")
                .write_all(format!("{USER}:{PASSWORD}").as_bytes())?;
            child.wait_with_output()
        })?;
    std::fs::write(
        docker.join("config.json"),
        format!(
            r#"{{"auths": {{"{}": {{"auth": "{}"}}}}}}"#,
            registry.addr(),
            String::from_utf8(auth.stdout)?
        ),
    )?;
    let stored_reference = format!("{}/team/hello:stored", registry.addr());
    let stored = push(&stored_reference, home.path(), &[], "")?;
    ensure!(stored.status.success(), "{}", stderr(&stored));
    ensure!(
        digest_as_skopeo_reads_it(&stored_reference)? == digest,
        "the image pushed with stored credentials differs"
    );
    Ok(())
}

/// A stand-in registry: answers every request on `listener` with `response`, in a thread
/// that lives as long as the test process.
fn answer_all(listener: std::net::TcpListener, response: String) {
    use std::io::Read;
    std::thread::spawn(move || {
        while let Ok((mut stream, _)) = listener.accept() {
            let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let _ = stream.write_all(response.as_bytes());
        }
    });
}

#[test]
fn credentials_never_go_to_a_plain_http_token_service_the_registry_names() -> Result<()> {
    let token_service = std::net::TcpListener::bind("127.0.0.1:0")?;
    let realm = format!("http://{}/token", token_service.local_addr()?);
    let registry = std::net::TcpListener::bind("127.0.0.1:0")?;
    let registry_address = registry.local_addr()?;
    let challenge = format!(
        "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"{realm}\",service=\"test\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    answer_all(registry, challenge);
    token_service.set_nonblocking(true)?;
    let home = tempfile::tempdir()?;
    let output = push(
        &format!("{registry_address}/hostile/hello:v1"),
        home.path(),
        &["--username", USER, "--password-stdin"],
        PASSWORD,
    )?;
    ensure!(!output.status.success(), "pushed: {}", stderr(&output));
    ensure!(
        stderr(&output)
            .contains("is neither https nor the registry itself: credentials are not sent there"),
        "{}",
        stderr(&output)
    );
    ensure!(
        token_service.accept().is_err(),
        "the plain-http token service was contacted"
    );
    Ok(())
}
