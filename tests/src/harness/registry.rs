//! A private OCI registry: Debian's `docker-registry` (distribution v2.8) on 127.0.0.1.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use super::process::ServerProcess;

/// The registry binary (Debian package `docker-registry`).
pub const REGISTRY_BINARY: &str = "/usr/bin/docker-registry";

/// How long [`Registry::start`] waits for `GET /v2/` to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running registry with its storage in a temporary directory. Dropping it stops the
/// registry by PID and removes the directory.
#[derive(Debug)]
pub struct Registry {
    // Field order matters for Drop: the process is stopped before the directory goes.
    process: ServerProcess,
    addr: String,
    dir: TempDir,
}

impl Registry {
    /// Starts a registry on a free port of 127.0.0.1 and waits until it answers `GET /v2/`.
    pub fn start() -> Result<Self> {
        Self::start_with(None)
    }

    /// Starts a registry that lets only `user` with `password` in (HTTP Basic
    /// authentication, from an htpasswd file, as docker-registry's `auth.htpasswd` does).
    pub fn start_with_user(user: &str, password: &str) -> Result<Self> {
        Self::start_with(Some((user, password)))
    }

    fn start_with(user: Option<(&str, &str)>) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("bulwark-registry-")
            .tempdir()
            .context("cannot make the registry's directory")?;
        // The port is found free, then handed to the registry: another process could take it
        // in between, so try a few ports.
        let mut last_error = None;
        for _ in 0..3 {
            match Self::start_on_free_port(dir.path(), user) {
                Ok((process, addr)) => return Ok(Self { process, addr, dir }),
                Err(err) => last_error = Some(err),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no attempt made")))
    }

    fn start_on_free_port(
        dir: &Path,
        user: Option<(&str, &str)>,
    ) -> Result<(ServerProcess, String)> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        let storage = dir.join("storage");
        fs::create_dir_all(&storage)?;
        let config = dir.join("config.yml");
        let mut text = format!(
            "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: {addr}\n",
            storage.display()
        );
        if let Some((user, password)) = user {
            let htpasswd = dir.join("htpasswd");
            // docker-registry takes bcrypt hashes only; cost 4 keeps the test quick.
            let hash = bcrypt::hash(password, 4).context("cannot hash the password")?;
            fs::write(&htpasswd, format!("{user}:{hash}\n"))?;
            text.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: bulwark-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        fs::write(&config, text)?;
        let log = dir.join("registry.log");
        let mut process = ServerProcess::spawn(
            "docker-registry",
            Command::new(REGISTRY_BINARY).arg("serve").arg(&config),
            &log,
        )?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = process.exited()? {
                bail!(
                    "docker-registry exited ({status}) before answering on {addr}:\n{}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if v2_answers(&addr) {
                return Ok((process, addr));
            }
            if Instant::now() >= deadline {
                process.stop(Duration::from_secs(5))?;
                bail!(
                    "docker-registry did not answer GET /v2/ on {addr} within {READY_TIMEOUT:?}:\n{}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            sleep(Duration::from_millis(25));
        }
    }

    /// The registry's address, `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        self.addr.clone()
    }

    /// The registry's PID.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The registry's own log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// Pushes the image tagged `tag_in_layout` in the OCI layout `layout_dir` to this registry
    /// as `repo_and_tag` (`name:tag`), with skopeo. Returns the full reference,
    /// `127.0.0.1:PORT/name:tag`.
    pub fn push_oci_layout(
        &self,
        layout_dir: &Path,
        tag_in_layout: &str,
        repo_and_tag: &str,
    ) -> Result<String> {
        let reference = format!("{}/{repo_and_tag}", self.addr);
        let output = Command::new("skopeo")
            .args([
                "--insecure-policy",
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
            ])
            .arg(format!("oci:{}:{tag_in_layout}", layout_dir.display()))
            .arg(format!("docker://{reference}"))
            .output()
            .context("cannot run skopeo (Debian package skopeo)")?;
        if !output.status.success() {
            bail!(
                "skopeo could not push {}:{tag_in_layout} to {reference} ({}):\n{}",
                layout_dir.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(reference)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Err(err) = self.process.stop(Duration::from_secs(5)) {
            eprintln!("cannot stop docker-registry (pid {}): {err:#}", self.pid());
        }
    }
}

/// Whether `GET http://ADDR/v2/` answers 200, or 401 from a registry that wants
/// credentials (the API check of the distribution spec).
fn v2_answers(addr: &str) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(
            stream,
            "GET /v2/ HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut status = [0u8; 12];
        stream.read_exact(&mut status)?;
        Ok(matches!(&status[9..12], b"200" | b"401"))
    };
    attempt().unwrap_or(false)
}
