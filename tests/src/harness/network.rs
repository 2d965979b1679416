//! Pod networks for a private containerd, as a node's CNI set-up gives them: Debian's
//! reference CNI plugins (`containernetworking-plugins`), one bridge with host-local IPAM
//! on a test-only subnet, so that pods that are not hostNetwork get a network namespace and
//! an IP of their own. The bridge is removed when the network is dropped.
//!
//! Also what tests need to look at pod networking from the outside: the identity of a
//! namespace, and a TCP listener opened inside another namespace (a second pod's).

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// Where Debian's `containernetworking-plugins` puts the plugins.
pub const CNI_PLUGIN_DIR: &str = "/usr/lib/cni";

/// The plugins the network uses (containerd's CRI always adds `loopback`).
const PLUGINS: [&str; 3] = ["bridge", "host-local", "loopback"];

/// A bridge network for one containerd's pods.
#[derive(Debug)]
pub struct PodNetwork {
    /// The bridge's interface name.
    pub bridge: String,
    /// The pods' subnet (a /24 in 10.234.0.0/16, which nothing here uses).
    pub subnet: String,
    /// The bridge's (gateway's) address.
    pub gateway: Ipv4Addr,
}

impl PodNetwork {
    /// A network whose bridge name and subnet derive from `key` (the containerd's directory
    /// name), so that two containerds never share one.
    pub fn new(key: &str) -> PodNetwork {
        let hash = Sha256::digest(key.as_bytes());
        let third = 1 + hash[0] % 250;
        PodNetwork {
            bridge: format!("bwk{:02x}{:02x}{:02x}", hash[1], hash[2], hash[3]),
            subnet: format!("10.234.{third}.0/24"),
            gateway: Ipv4Addr::new(10, 234, third, 1),
        }
    }

    /// Puts the plugins in `bin_dir` and the network's conflist in `conf_dir`; host-local
    /// keeps its leases in `data_dir`.
    pub fn install(&self, bin_dir: &Path, conf_dir: &Path, data_dir: &Path) -> Result<()> {
        for plugin in PLUGINS {
            let source = Path::new(CNI_PLUGIN_DIR).join(plugin);
            if !source.exists() {
                bail!(
                    "{} is missing: install Debian's containernetworking-plugins (make deps)",
                    source.display()
                );
            }
            std::os::unix::fs::symlink(&source, bin_dir.join(plugin))
                .with_context(|| format!("cannot link {}", source.display()))?;
        }
        let conflist = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "bulwark-test",
            "plugins": [{
                "type": "bridge",
                "bridge": self.bridge,
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": self.subnet, "gateway": self.gateway.to_string() }]],
                    "dataDir": data_dir,
                },
            }],
        });
        fs::write(
            conf_dir.join("10-bulwark-test.conflist"),
            serde_json::to_vec_pretty(&conflist)?,
        )?;
        Ok(())
    }

    /// Removes the bridge (the plugin made it with the first pod).
    pub fn remove(&self) -> Result<()> {
        if !Path::new("/sys/class/net").join(&self.bridge).exists() {
            return Ok(());
        }
        let status = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status()
            .context("cannot run ip")?;
        if !status.success() {
            bail!("ip link del {} failed ({status})", self.bridge);
        }
        Ok(())
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        if let Err(err) = self.remove() {
            eprintln!("{err:#}");
        }
    }
}

/// The identity of a namespace file (`/proc/PID/ns/net`, a bind-mounted netns): its inode.
pub fn namespace_id(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path)
        .with_context(|| format!("cannot stat namespace {}", path.display()))?
        .ino())
}

/// The namespace of `kind` (`net`, `ipc`, `uts`, ...) of process `pid`.
pub fn process_namespace(pid: u32, kind: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/ns/{kind}"))
}

/// A TCP listener on `address`, opened inside the network namespace at `netns` (a thread
/// joins it just for the socket, which stays in that namespace).
pub fn listen_in(netns: &Path, address: SocketAddr) -> Result<TcpListener> {
    let netns = fs::File::open(netns)
        .with_context(|| format!("cannot open network namespace {}", netns.display()))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on this short-lived thread only, with a descriptor we own.
                if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error())
                        .context("cannot join the pod's network namespace");
                }
                TcpListener::bind(address).with_context(|| format!("cannot listen on {address}"))
            })
            .join()
            .unwrap_or_else(|_| bail!("the listening thread panicked"))
    })
}
