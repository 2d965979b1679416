//! Pod cgroups as kubelet's cgroup driver makes them ([`PodCgroups`]), and cgroups that
//! containers of a test leave behind, found in every hierarchy and removed.
//!
//! With the cgroupfs driver (the default) tests give containerd RELATIVE cgroup parents: runc nests a relative cgroup path under its
//! caller's own cgroup in each hierarchy (this machine's processes live in a memory cgroup of
//! their own), so nothing is created outside the test's subtree. runc removes a container's
//! own cgroup when the container is deleted; the parents (kubelet's pod cgroups) are left for
//! the harness to remove, as kubelet would.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

/// The environment variable that picks kubelet's cgroup driver for the tests' pods:
/// `cgroupfs` (the default) or `systemd` (needs systemd as PID 1 and the system bus, as in
/// `make test-cgroup2`).
pub const DRIVER_ENV: &str = "BULWARK_TEST_CGROUP_DRIVER";

/// The slice kubelet's systemd driver puts burstable pods under.
const BURSTABLE_SLICE: &str = "/kubepods.slice/kubepods-burstable.slice";

/// Where pods' cgroups go, as kubelet's cgroup driver decides, and how they are made and
/// removed around the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodCgroups {
    /// cgroupfs driver: a pod's cgroup parent is `<root>/pod<uid>`, containerd's containers
    /// `<parent>/<container id>`. A relative root nests below this process's cgroup.
    Cgroupfs {
        /// The root of the pods' cgroups.
        root: String,
    },
    /// systemd driver: a pod is the slice `kubepods-burstable-pod<uid>.slice` below
    /// `kubepods-burstable.slice`, made before RunPodSandbox as kubelet makes it, and each
    /// container the scope `cri-containerd-<id>.scope` in it.
    Systemd,
}

impl PodCgroups {
    /// The driver [`DRIVER_ENV`] names, with `root` for cgroupfs.
    pub fn from_env(root: &str) -> Result<PodCgroups> {
        match std::env::var(DRIVER_ENV).unwrap_or_default().as_str() {
            "" | "cgroupfs" => Ok(PodCgroups::Cgroupfs {
                root: root.to_owned(),
            }),
            "systemd" => Ok(PodCgroups::Systemd),
            other => bail!("{DRIVER_ENV}={other:?}: expected cgroupfs or systemd"),
        }
    }

    /// The cgroup parent kubelet gives the pod with `uid`.
    pub fn pod_parent(&self, uid: &str) -> String {
        match self {
            PodCgroups::Cgroupfs { root } => format!("{root}/pod{uid}"),
            PodCgroups::Systemd => format!(
                "{BURSTABLE_SLICE}/kubepods-burstable-pod{}.slice",
                uid.replace('-', "_")
            ),
        }
    }

    /// The cgroup (path for [`dirs_of`]) of container `id` in a pod with cgroup parent
    /// `parent`.
    pub fn container_cgroup(&self, parent: &str, id: &str) -> String {
        match self {
            PodCgroups::Cgroupfs { .. } => format!("{parent}/{id}"),
            PodCgroups::Systemd => format!("{parent}/cri-containerd-{id}.scope"),
        }
    }

    /// Makes the pod's cgroup before RunPodSandbox, as kubelet does (the systemd driver's
    /// slice; the cgroupfs driver's parent is made by the runtime).
    pub fn create_pod(&self, parent: &str) -> Result<()> {
        match self {
            PodCgroups::Cgroupfs { .. } => Ok(()),
            PodCgroups::Systemd => systemctl("start", unit_of(parent)?),
        }
    }

    /// Removes the pod's cgroup after RemovePodSandbox, as kubelet does.
    pub fn remove_pod(&self, parent: &str) -> Result<()> {
        match self {
            PodCgroups::Cgroupfs { .. } => remove(parent),
            PodCgroups::Systemd if exists(parent)? => stop_slice(unit_of(parent)?, parent),
            PodCgroups::Systemd => Ok(()),
        }
    }

    /// Removes every pod cgroup and their parents.
    pub fn remove_all(&self) -> Result<()> {
        match self {
            PodCgroups::Cgroupfs { root } => remove(root),
            PodCgroups::Systemd if exists("/kubepods.slice")? => {
                stop_slice("kubepods.slice", "/kubepods.slice")
            }
            PodCgroups::Systemd => Ok(()),
        }
    }

    /// The cgroups of pods and containers that exist now: none should, once every pod is
    /// removed. For the systemd driver, also the pod slices and container scopes systemd
    /// still has loaded.
    pub fn leftovers(&self) -> Result<Vec<String>> {
        let root = match self {
            PodCgroups::Cgroupfs { root } => root.as_str(),
            PodCgroups::Systemd => BURSTABLE_SLICE,
        };
        let mut left = Vec::new();
        for dir in dirs_of(root)? {
            if let Ok(entries) = fs::read_dir(&dir) {
                left.extend(
                    entries
                        .flatten()
                        .filter(|entry| entry.path().is_dir())
                        .map(|entry| entry.path().display().to_string()),
                );
            }
        }
        if *self == PodCgroups::Systemd {
            let units = std::process::Command::new("systemctl")
                .args(["list-units", "--all", "--plain", "--no-legend"])
                .args(["kubepods-burstable-pod*", "cri-containerd-*"])
                .output()
                .context("cannot run systemctl list-units")?;
            left.extend(
                String::from_utf8_lossy(&units.stdout)
                    .lines()
                    .filter(|line| !line.trim().is_empty())
                    .map(|line| format!("unit {}", line.trim())),
            );
        }
        Ok(left)
    }
}

/// The slice unit a systemd-driver cgroup path ends in.
fn unit_of(parent: &str) -> Result<&str> {
    parent
        .rsplit('/')
        .next()
        .filter(|unit| unit.ends_with(".slice"))
        .with_context(|| format!("{parent} does not end in a slice"))
}

/// Stops slice `unit` (cgroup `path`) and removes what systemd leaves of it, as kubelet
/// does. On cgroup v1, systemd manages only some controllers; runc makes a pod's directories
/// in the others (cpuset, freezer, hugetlb, ...), and kubelet removes the pod's cgroup in
/// every hierarchy when the pod goes.
fn stop_slice(unit: &str, path: &str) -> Result<()> {
    systemctl("stop", unit)?;
    remove(path)?;
    ensure_gone(path)
}

fn systemctl(verb: &str, unit: &str) -> Result<()> {
    let output = std::process::Command::new("systemctl")
        .args([verb, unit])
        .output()
        .with_context(|| format!("cannot run systemctl {verb} {unit}"))?;
    ensure!(
        output.status.success(),
        "systemctl {verb} {unit}: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

/// Whether cgroup `path` exists in any hierarchy.
fn exists(path: &str) -> Result<bool> {
    Ok(dirs_of(path)?.iter().any(|dir| dir.exists()))
}

/// Fails unless the cgroup at absolute `path` is gone (systemd removes a stopped unit's
/// cgroup as the stop job ends).
fn ensure_gone(path: &str) -> Result<()> {
    let dirs = dirs_of(path)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while dirs.iter().any(|dir| dir.exists()) {
        ensure!(
            Instant::now() < deadline,
            "{path} is still there after its unit stopped"
        );
        sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// One mounted cgroup hierarchy and this process's cgroup in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Where the hierarchy is mounted, such as `/sys/fs/cgroup/memory`.
    pub mount_point: PathBuf,
    /// Its controllers as `/proc/self/cgroup` names them (`memory`, `cpu,cpuacct`, empty for
    /// cgroup v2).
    pub controllers: String,
    /// The directory of this process's own cgroup in it.
    pub own_dir: PathBuf,
}

/// Every cgroup hierarchy this process belongs to that is mounted in its mount namespace.
pub fn hierarchies() -> Result<Vec<Hierarchy>> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").context("cannot read mountinfo")?;
    let own = fs::read_to_string("/proc/self/cgroup").context("cannot read /proc/self/cgroup")?;
    let mounts: Vec<CgroupMount> = mountinfo.lines().filter_map(CgroupMount::parse).collect();
    let mut found = Vec::new();
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let mount = if id == "0" {
            mounts.iter().find(|m| m.version2)
        } else {
            let wanted: Vec<&str> = controllers.split(',').collect();
            mounts
                .iter()
                .find(|m| !m.version2 && wanted.iter().all(|c| m.options.iter().any(|o| o == c)))
        };
        let Some(mount) = mount else { continue };
        let inside = Path::new(path)
            .strip_prefix(&mount.root)
            .unwrap_or(Path::new(path).strip_prefix("/").unwrap_or(Path::new(path)));
        found.push(Hierarchy {
            mount_point: mount.mount_point.clone(),
            controllers: controllers.to_string(),
            own_dir: mount.mount_point.join(inside),
        });
    }
    Ok(found)
}

/// The directories of cgroup `path` in every hierarchy, existing or not.
///
/// A relative `path` is taken below this process's own cgroup (as runc does), an absolute one
/// from the hierarchy's root.
pub fn dirs_of(path: &str) -> Result<Vec<PathBuf>> {
    Ok(hierarchies()?
        .into_iter()
        .map(|h| match path.strip_prefix('/') {
            Some(absolute) => h.mount_point.join(absolute),
            None => h.own_dir.join(path),
        })
        .collect())
}

/// The memory limit of cgroup `path` (see [`dirs_of`]) in bytes: `memory.max` on cgroup v2,
/// `memory.limit_in_bytes` on v1. `None` when unlimited.
pub fn memory_limit(path: &str) -> Result<Option<u64>> {
    for dir in dirs_of(path)? {
        for file in ["memory.max", "memory.limit_in_bytes"] {
            let Ok(text) = fs::read_to_string(dir.join(file)) else {
                continue;
            };
            let text = text.trim();
            if text == "max" {
                return Ok(None);
            }
            let bytes: u64 = text
                .parse()
                .with_context(|| format!("{}/{file} holds {text:?}", dir.display()))?;
            // cgroup v1 reports "unlimited" as the largest page-aligned i64.
            let unlimited = (i64::MAX as u64) & !0xfff;
            return Ok((bytes < unlimited).then_some(bytes));
        }
    }
    bail!("cgroup {path} has no memory controller file")
}

/// The CFS quota and period of cgroup `path` (see [`dirs_of`]) in microseconds: `cpu.max` on
/// cgroup v2, `cpu.cfs_quota_us` and `cpu.cfs_period_us` on v1. `None` when unlimited.
pub fn cpu_quota(path: &str) -> Result<Option<(u64, u64)>> {
    for dir in dirs_of(path)? {
        if let Ok(max) = fs::read_to_string(dir.join("cpu.max")) {
            let mut parts = max.split_whitespace();
            return match (parts.next(), parts.next().map(str::parse::<u64>)) {
                (Some("max"), _) => Ok(None),
                (Some(quota), Some(Ok(period))) => {
                    Ok(Some((quota.parse().context("malformed cpu.max")?, period)))
                }
                _ => bail!("{}/cpu.max holds {max:?}", dir.display()),
            };
        }
        if let (Ok(quota), Ok(period)) = (
            fs::read_to_string(dir.join("cpu.cfs_quota_us")),
            fs::read_to_string(dir.join("cpu.cfs_period_us")),
        ) {
            let quota: i64 = quota.trim().parse().context("malformed cpu.cfs_quota_us")?;
            let period: u64 = period
                .trim()
                .parse()
                .context("malformed cpu.cfs_period_us")?;
            return Ok((quota > 0).then_some((quota as u64, period)));
        }
    }
    bail!("cgroup {path} has no cpu controller file")
}

/// The processes in cgroup `path` (see [`dirs_of`]), from the first hierarchy that has it.
pub fn processes(path: &str) -> Result<Vec<u32>> {
    for dir in dirs_of(path)? {
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            return procs
                .lines()
                .map(|line| line.trim().parse().context("malformed cgroup.procs"))
                .collect();
        }
    }
    bail!("cgroup {path} does not exist")
}

/// Removes cgroup `path` (see [`dirs_of`]) and every cgroup below it, in every hierarchy.
///
/// For a relative `path` of several components (`a/b/c`), the parents `a/b` and `a` are then
/// removed too when they are empty. A cgroup that still holds a process cannot be removed: the
/// call waits a little for exiting processes, then reports what is left.
pub fn remove(path: &str) -> Result<()> {
    let path = path.trim_end_matches('/');
    if path.is_empty() || path == "/" || path.split('/').any(|c| c == "..") {
        bail!("refusing to remove cgroup {path:?}");
    }
    let mut left = Vec::new();
    for hierarchy in hierarchies()? {
        let base = match path.strip_prefix('/') {
            Some(absolute) => hierarchy.mount_point.join(absolute),
            None => hierarchy.own_dir.join(path),
        };
        if let Err(err) = remove_tree(&base) {
            left.push(format!("{}: {err:#}", base.display()));
            continue;
        }
        if !path.starts_with('/') {
            let mut parent = base.parent();
            while let Some(dir) = parent.filter(|d| d.starts_with(&hierarchy.own_dir)) {
                if dir == hierarchy.own_dir || fs::remove_dir(dir).is_err() {
                    break;
                }
                parent = dir.parent();
            }
        }
    }
    if left.is_empty() {
        Ok(())
    } else {
        bail!("cgroups left behind: {}", left.join("; "))
    }
}

/// Removes the cgroup directory `dir` and the cgroups below it, children first. A missing
/// `dir` is fine.
fn remove_tree(dir: &Path) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err).with_context(|| format!("cannot list {}", dir.display())),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    // A cgroup whose last process is exiting is busy for a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(err) if err.kind() == ErrorKind::NotFound => return Ok(()),
            Err(err) if Instant::now() < deadline && err.raw_os_error() == Some(libc::EBUSY) => {
                sleep(Duration::from_millis(50));
            }
            Err(err) => {
                let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                return Err(err).with_context(|| {
                    format!(
                        "cannot remove {} (processes: {})",
                        dir.display(),
                        procs.split_whitespace().collect::<Vec<_>>().join(" ")
                    )
                });
            }
        }
    }
}

/// A cgroup filesystem's line of `/proc/self/mountinfo`.
struct CgroupMount {
    root: PathBuf,
    mount_point: PathBuf,
    version2: bool,
    /// Its super options: `rw`, the controllers, `name=systemd`, ...
    options: Vec<String>,
}

impl CgroupMount {
    fn parse(line: &str) -> Option<Self> {
        let fields: Vec<&str> = line.split(' ').collect();
        let separator = fields.iter().position(|f| *f == "-")?;
        let fstype = *fields.get(separator + 1)?;
        if fstype != "cgroup" && fstype != "cgroup2" {
            return None;
        }
        Some(Self {
            root: PathBuf::from(fields.get(3)?),
            mount_point: PathBuf::from(fields.get(4)?),
            version2: fstype == "cgroup2",
            options: fields
                .get(separator + 3)?
                .split(',')
                .map(str::to_string)
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_this_process_in_every_hierarchy() {
        let found = hierarchies().unwrap();
        assert!(!found.is_empty());
        for h in &found {
            assert!(h.own_dir.is_dir(), "{h:?}");
        }
    }

    #[test]
    fn refuses_dangerous_paths() {
        assert!(remove("").is_err());
        assert!(remove("/").is_err());
        assert!(remove("a/../..").is_err());
    }

    #[test]
    fn removes_a_relative_tree() {
        let name = format!("bulwark-cgroup-test-{}", std::process::id());
        let dirs = dirs_of(&format!("{name}/pod/leaf")).unwrap();
        let made: Vec<_> = dirs
            .iter()
            .filter(|d| fs::create_dir_all(d).is_ok())
            .collect();
        assert!(!made.is_empty());
        remove(&format!("{name}/pod")).unwrap();
        for dir in dirs_of(&name).unwrap() {
            assert!(!dir.exists(), "{} is left", dir.display());
        }
    }
}
