//! The container's cgroup, v1 or v2, from `linux.cgroupsPath` in either form containerd
//! writes:
//!
//! - cgroupfs driver: a path. A relative one nests under the shim's own cgroup, controller
//!   by controller, as runc does; an absolute one is taken from each hierarchy's root. The
//!   shim creates the directories and writes the spec's resources at Create.
//! - systemd driver: `slice:prefix:name`. The container is a transient scope
//!   `prefix-name.scope` in the slice kubelet made for the pod, started through systemd's
//!   D-Bus API with the workload's pid and the spec's resources as unit properties (so a
//!   `daemon-reload` keeps them), as runc does. The scope needs a process, so it is made
//!   when the workload is placed.
//!
//! Either way the workload process is placed before it runs a single instruction of the
//! guest, Stats read the cgroup, and Delete removes it (or stops the scope).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use cgroups_rs::systemd::props::PropertiesBuilder;
use cgroups_rs::systemd::{Property, SystemdClient, cpu, memory, pids, utils::expand_slice};

use crate::bundle::spec::CpuResources;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The v1 controllers Bulwark places a workload in and limits.
const V1_CONTROLLERS: [&str; 4] = ["memory", "cpu", "cpuacct", "pids"];

/// A cgroup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The filesystem refused.
    #[error("cgroup {path}: {action}: {source}")]
    Io {
        /// The cgroup file or directory.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A `slice:prefix:name` path whose slice is not a slice name.
    #[error(
        "linux.cgroupsPath {path:?}: {slice:?} is not a systemd slice name (expected the systemd driver's form slice:prefix:name, such as kubepods-pod1.slice:cri-containerd:ID)"
    )]
    BadSlice {
        /// The cgroupsPath as given.
        path: String,
        /// Its slice part.
        slice: String,
    },
    /// systemd refused or failed to start or stop the container's scope.
    #[error("systemd scope {unit}: {action}: {message}")]
    Systemd {
        /// The scope unit.
        unit: String,
        /// What was being done.
        action: &'static str,
        /// What systemd (or the bus) said.
        message: String,
    },
}

/// Resources from the spec to apply to the cgroup.
#[derive(Debug, Clone, Copy, Default)]
pub struct Resources {
    /// Memory limit in bytes.
    pub memory_limit: Option<i64>,
    /// CPU controls.
    pub cpu: CpuResources,
    /// Most tasks.
    pub pids_limit: Option<i64>,
}

/// Memory and CPU use, as Stats reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of memory charged to the cgroup.
    pub memory_bytes: u64,
    /// Its memory limit, if any.
    pub memory_limit: Option<u64>,
    /// CPU time in nanoseconds.
    pub cpu_nanos: u64,
    /// Tasks in the cgroup.
    pub pids: u64,
}

/// One container's cgroup: a directory in the unified hierarchy (v2) or one per
/// controller (v1).
#[derive(Debug, Clone)]
pub struct Cgroup {
    unified: bool,
    /// (controller, directory); the controller is empty for v2.
    dirs: Vec<(String, PathBuf)>,
    /// The resources to hold the container to.
    resources: Resources,
    /// The systemd scope the directories belong to (systemd driver).
    scope: Option<Scope>,
    /// Its directory in the unified (v2) hierarchy, where cgroup BPF programs attach (see
    /// [`Cgroup::egress_dir`]).
    egress_dir: Option<PathBuf>,
    /// Whether Bulwark made that directory as a hybrid node's twin of the cgroup (see
    /// [`Cgroup::make_egress_twin`]), so that it joins and removes it too.
    twin: bool,
}

/// Where a hybrid node (v1 controllers) mounts its cgroup2 hierarchy, which has no
/// controllers but does run cgroup BPF programs.
const HYBRID_UNIFIED_ROOT: &str = "/sys/fs/cgroup/unified";

/// The directory at `inside` in the unified hierarchy of a v2 or hybrid node.
fn unified_dir(unified: bool, inside: &Path) -> Option<PathBuf> {
    if unified {
        return Some(Path::new(CGROUP_ROOT).join(inside));
    }
    let root = Path::new(HYBRID_UNIFIED_ROOT);
    root.join("cgroup.controllers")
        .exists()
        .then(|| root.join(inside))
}

/// A transient systemd scope in a slice.
#[derive(Debug, Clone)]
struct Scope {
    slice: String,
    unit: String,
}

/// How long systemd may take to move a process into a new scope (a slow node under load
/// takes far less; this bounds a wedged systemd).
const SCOPE_START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

fn io(path: &Path, action: &'static str) -> impl FnOnce(std::io::Error) -> CgroupError {
    let path = path.to_owned();
    move |source| CgroupError::Io {
        path,
        action,
        source,
    }
}

/// Whether this host runs the unified (v2) hierarchy at /sys/fs/cgroup.
pub fn is_unified() -> bool {
    Path::new(CGROUP_ROOT).join("cgroup.controllers").exists()
}

/// The shim's own cgroup per controller (`""` for the v2 line), from /proc/self/cgroup.
fn own_paths() -> Vec<(String, String)> {
    fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            Some((controllers.to_owned(), path.to_owned()))
        })
        .collect()
}

/// A cgroup's OOM kills as counted when a container was created: see
/// [`Cgroup::oom_killed_since`].
#[derive(Debug, Clone, Copy)]
pub struct OomCount {
    /// The parent's count (cgroup v2 only).
    parent: Option<u64>,
}

impl Cgroup {
    /// Prepares the cgroup for `cgroups_path`: with the cgroupfs driver, creates it and
    /// applies `resources`; with the systemd driver, checks the path (the scope starts when
    /// the workload is placed).
    pub fn create(cgroups_path: &str, resources: &Resources) -> Result<Cgroup, CgroupError> {
        let mut cgroup = Cgroup::locate(cgroups_path)?;
        cgroup.resources = *resources;
        if cgroup.scope.is_none() {
            for dir in cgroup.own_dirs() {
                fs::create_dir_all(dir).map_err(io(dir, "create"))?;
            }
            if cgroup.unified {
                cgroup.enable_v2_controllers()?;
            }
            cgroup.apply()?;
        }
        Ok(cgroup)
    }

    /// The cgroup for `cgroups_path`, without creating anything or any resources to apply:
    /// for reading one that another runtime (runc) manages.
    pub fn locate(cgroups_path: &str) -> Result<Cgroup, CgroupError> {
        let unified = is_unified();
        if let Some((slice, prefix, name)) = systemd_form(cgroups_path) {
            let bad_slice = || CgroupError::BadSlice {
                path: cgroups_path.to_owned(),
                slice: slice.to_owned(),
            };
            // runc's rule: an empty slice means system.slice.
            let slice = if slice.is_empty() {
                "system.slice"
            } else {
                slice
            };
            let slice_dir = expand_slice(slice).map_err(|_| bad_slice())?;
            let unit = if prefix.is_empty() {
                format!("{name}.scope")
            } else {
                format!("{prefix}-{name}.scope")
            };
            if name.is_empty() || unit.contains('/') {
                return Err(bad_slice());
            }
            let inside = Path::new(&slice_dir).join(&unit);
            return Ok(Cgroup {
                unified,
                dirs: hierarchy_dirs(unified, |_| inside.clone()),
                resources: Resources::default(),
                // systemd puts the scope in the unified hierarchy of a hybrid node too.
                egress_dir: unified_dir(unified, &inside),
                twin: false,
                scope: Some(Scope {
                    slice: slice.to_owned(),
                    unit,
                }),
            });
        }
        let relative = !cgroups_path.starts_with('/');
        let own = own_paths();
        let inside = |controller: &str| {
            let parent = if relative {
                own.iter()
                    .find(|(controllers, _)| {
                        if unified {
                            controllers.is_empty()
                        } else {
                            controllers.split(',').any(|c| c == controller)
                        }
                    })
                    .map(|(_, path)| path.trim_start_matches('/').to_owned())
                    .unwrap_or_default()
            } else {
                String::new()
            };
            Path::new(&parent).join(cgroups_path.trim_start_matches('/'))
        };
        Ok(Cgroup {
            unified,
            egress_dir: unified_dir(unified, &inside("")),
            twin: false,
            dirs: hierarchy_dirs(unified, inside),
            resources: Resources::default(),
            scope: None,
        })
    }

    /// Moves process `pid` (the workload, waiting to be released) into the cgroup; with
    /// the systemd driver, starts the scope with it and waits until systemd has moved it.
    pub fn place(&self, pid: u32) -> Result<(), CgroupError> {
        let Some(scope) = &self.scope else {
            for dir in self.own_dirs() {
                let procs = dir.join("cgroup.procs");
                fs::write(&procs, pid.to_string()).map_err(io(&procs, "add the workload"))?;
            }
            return Ok(());
        };
        let systemd = |action: &'static str| {
            move |error: &dyn std::fmt::Display| CgroupError::Systemd {
                unit: scope.unit.clone(),
                action,
                message: error.to_string(),
            }
        };
        let mut properties = PropertiesBuilder::default_cgroup(&scope.slice, &scope.unit)
            .description(format!("Bulwark Wasm container {}", scope.unit))
            .pids(vec![pid])
            .build();
        properties.extend(
            self.unit_properties()
                .map_err(|e| systemd("resources")(&e))?,
        );
        SystemdClient::new(&scope.unit, properties)
            .and_then(|client| client.start())
            .map_err(|e| systemd("start")(&e))?;
        // StartTransientUnit only queues the start job: wait for the move itself.
        let expected = self.dirs[0].1.clone();
        let started = std::time::Instant::now();
        while !self.holds(pid, &expected) {
            if started.elapsed() > SCOPE_START_TIMEOUT {
                return Err(systemd("start")(&format!(
                    "pid {pid} is not in {} after {:?}",
                    expected.display(),
                    SCOPE_START_TIMEOUT
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        // The properties survive a daemon-reload; the files carry the exact values (systemd
        // rounds CPU quotas to whole percents).
        self.apply()
    }

    /// The directory where cgroup BPF programs see the container's sockets: the cgroup
    /// itself on a v2 node; on a hybrid node, the same path in its cgroup2 hierarchy (made
    /// and removed with the cgroup, or systemd's scope there). `None` on a v1-only node.
    pub fn egress_dir(&self) -> Option<&Path> {
        self.egress_dir.as_deref()
    }

    /// On a hybrid node with the cgroupfs driver, makes the cgroup's twin in the cgroup2
    /// hierarchy, for the egress filter; the workload joins it when placed, and it goes
    /// with the cgroup. Only containers with network grants need it there: one without
    /// has no socket at all (its seccomp filter), and a twin per container cost each shim
    /// ~0.5 MiB here (measured with `make bench`; the reason is not understood yet). A twin
    /// that cannot be made means no filter (containers with grants are then refused, see
    /// `task::create`), not a node that runs no pod.
    pub fn make_egress_twin(&mut self) {
        if self.unified || self.scope.is_some() {
            return;
        }
        let Some(twin) = &self.egress_dir else {
            return;
        };
        match fs::create_dir_all(twin) {
            Ok(()) => self.twin = true,
            Err(error) => {
                log::warn!(
                    "cannot create {} for the egress filter: {error}",
                    twin.display()
                );
                self.egress_dir = None;
            }
        }
    }

    /// The directories Bulwark itself makes, joins and removes (cgroupfs driver): one per
    /// hierarchy, and on a hybrid node the cgroup2 twin beside them, if it made one.
    fn own_dirs(&self) -> impl Iterator<Item = &PathBuf> {
        let twin = self.egress_dir.as_ref().filter(|_| self.twin);
        self.dirs.iter().map(|(_, dir)| dir).chain(twin)
    }

    /// Whether `pid` is in the cgroup at `dir` (of the first hierarchy).
    fn holds(&self, pid: u32, dir: &Path) -> bool {
        let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) else {
            return false;
        };
        procs.lines().any(|line| line.trim() == pid.to_string())
    }

    /// The spec's resources as systemd unit properties.
    fn unit_properties(&self) -> Result<Vec<Property<'static>>, cgroups_rs::systemd::error::Error> {
        let v2 = self.unified;
        let resources = &self.resources;
        let mut properties: Vec<Property<'static>> = Vec::new();
        if let Some(limit) = resources.memory_limit.filter(|limit| *limit > 0) {
            let (name, value) = memory::limit(limit, v2)?;
            properties.push((name, value.into()));
        }
        if let Some(shares) = resources.cpu.shares {
            let (name, value) =
                cpu::shares(if v2 { shares_to_weight(shares) } else { shares }, v2)?;
            properties.push((name, value.into()));
        }
        if let Some(quota) = resources.cpu.quota.filter(|quota| *quota > 0) {
            let period = resources.cpu.period.unwrap_or(100_000).max(1);
            // systemd takes quota per second of wall time, in whole percents (10 ms steps).
            let per_second = (quota as u64 * 1_000_000).div_ceil(period).div_ceil(10_000) * 10_000;
            let (name, value) = cpu::quota(per_second)?;
            properties.push((name, value.into()));
        }
        if let Some(limit) = resources.pids_limit.filter(|limit| *limit > 0) {
            let (name, value) = pids::max(limit)?;
            properties.push((name, value.into()));
        }
        Ok(properties)
    }

    /// v2 only lets a cgroup use a controller its parent delegates; delegate memory, cpu
    /// and pids down the path (as far as each parent offers them).
    fn enable_v2_controllers(&self) -> Result<(), CgroupError> {
        let dir = &self.dirs[0].1;
        let mut ancestors: Vec<&Path> = dir
            .ancestors()
            .skip(1)
            .take_while(|path| path.starts_with(CGROUP_ROOT))
            .collect();
        ancestors.reverse();
        for parent in ancestors {
            let available =
                fs::read_to_string(parent.join("cgroup.controllers")).unwrap_or_default();
            for controller in ["memory", "cpu", "pids"] {
                if available.split_whitespace().any(|c| c == controller) {
                    // Fails harmlessly where the parent has processes of its own (the
                    // "no internal processes" rule); the limits then land where allowed.
                    let _ = fs::OpenOptions::new()
                        .write(true)
                        .open(parent.join("cgroup.subtree_control"))
                        .and_then(|mut file| file.write_all(format!("+{controller}").as_bytes()));
                }
            }
        }
        Ok(())
    }

    fn dir(&self, controller: &str) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|(name, _)| self.unified || name == controller)
            .map(|(_, dir)| dir.as_path())
    }

    fn write(&self, controller: &str, file: &str, value: &str) -> Result<(), CgroupError> {
        let Some(dir) = self.dir(controller) else {
            return Ok(());
        };
        let path = dir.join(file);
        fs::write(&path, value).map_err(io(&path, "write"))
    }

    fn apply(&self) -> Result<(), CgroupError> {
        let resources = &self.resources;
        let cpu = resources.cpu;
        if self.unified {
            if let Some(limit) = resources.memory_limit {
                self.write("memory", "memory.max", &limit.to_string())?;
            }
            if let Some(shares) = cpu.shares {
                self.write("cpu", "cpu.weight", &shares_to_weight(shares).to_string())?;
            }
            if let Some(quota) = cpu.quota.filter(|quota| *quota > 0) {
                let period = cpu.period.unwrap_or(100_000);
                self.write("cpu", "cpu.max", &format!("{quota} {period}"))?;
            }
            if let Some(limit) = resources.pids_limit {
                self.write("pids", "pids.max", &limit.to_string())?;
            }
        } else {
            if let Some(limit) = resources.memory_limit {
                self.write("memory", "memory.limit_in_bytes", &limit.to_string())?;
            }
            if let Some(shares) = cpu.shares {
                self.write("cpu", "cpu.shares", &shares.to_string())?;
            }
            if let Some(period) = cpu.period {
                self.write("cpu", "cpu.cfs_period_us", &period.to_string())?;
            }
            if let Some(quota) = cpu.quota.filter(|quota| *quota > 0) {
                self.write("cpu", "cpu.cfs_quota_us", &quota.to_string())?;
            }
            if let Some(limit) = resources.pids_limit {
                self.write("pids", "pids.max", &limit.to_string())?;
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` files a process writes `0` to in order to join this cgroup.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|(_, dir)| dir.join("cgroup.procs"))
            .collect()
    }

    /// Reads current usage.
    pub fn usage(&self) -> Usage {
        let read = |controller: &str, file: &str| -> Option<String> {
            fs::read_to_string(self.dir(controller)?.join(file)).ok()
        };
        let number = |text: Option<String>| text.and_then(|t| t.trim().parse::<u64>().ok());
        if self.unified {
            let cpu_usec = read("cpu", "cpu.stat").and_then(|stat| {
                stat.lines()
                    .find_map(|line| line.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            });
            Usage {
                memory_bytes: number(read("memory", "memory.current")).unwrap_or(0),
                memory_limit: number(read("memory", "memory.max")),
                cpu_nanos: cpu_usec.unwrap_or(0) * 1000,
                pids: number(read("pids", "pids.current")).unwrap_or(0),
            }
        } else {
            Usage {
                memory_bytes: number(read("memory", "memory.usage_in_bytes")).unwrap_or(0),
                memory_limit: number(read("memory", "memory.limit_in_bytes"))
                    .filter(|limit| *limit < (1 << 62)),
                cpu_nanos: number(read("cpuacct", "cpuacct.usage")).unwrap_or(0),
                pids: number(read("pids", "pids.current")).unwrap_or(0),
            }
        }
    }

    /// What [`Cgroup::oom_killed_since`] compares with: taken when the container is
    /// created, before its workload can run.
    pub fn oom_count(&self) -> OomCount {
        OomCount {
            parent: self.parent_oom_kills(),
        }
    }

    /// Whether the kernel's OOM killer killed a process in the cgroup since `start`. The
    /// cgroup's own count (`oom_kill` in memory.events on v2, memory.oom_control on v1)
    /// answers while the cgroup exists: with the cgroupfs driver until the shim removes
    /// it. With the systemd driver, systemd removes a scope's cgroup as soon as its last
    /// process is gone, often before the exit is handled here (runc has the same race,
    /// opencontainers/runc#5071): on v2 the parent (the pod's slice), whose counts include
    /// its children's, then answers by its increase since `start`. On v1 counts are not
    /// passed up, and such a kill goes unreported, as with runc.
    pub fn oom_killed_since(&self, start: OomCount) -> bool {
        match self.dir("memory").and_then(|dir| self.read_oom_kills(dir)) {
            Some(count) => count > 0,
            None => matches!(
                (start.parent, self.parent_oom_kills()),
                (Some(then), Some(now)) if now > then
            ),
        }
    }

    fn parent_oom_kills(&self) -> Option<u64> {
        if !self.unified {
            return None;
        }
        let parent = self.dir("memory")?.parent()?;
        self.read_oom_kills(parent)
    }

    fn read_oom_kills(&self, dir: &Path) -> Option<u64> {
        let file = if self.unified {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        fs::read_to_string(dir.join(file))
            .ok()?
            .lines()
            .find_map(|line| line.strip_prefix("oom_kill "))
            .and_then(|count| count.trim().parse().ok())
    }

    /// The processes in the cgroup (of every hierarchy it has).
    pub fn processes(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .dirs
            .iter()
            .filter_map(|(_, dir)| fs::read_to_string(dir.join("cgroup.procs")).ok())
            .flat_map(|procs| {
                procs
                    .lines()
                    .filter_map(|line| line.trim().parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// SIGKILLs whatever runs in the cgroup and waits (up to `timeout`) until it is empty:
    /// for containerd's clean-up after a shim died, when nobody else will.
    pub fn kill_all(&self, timeout: std::time::Duration) -> bool {
        let started = std::time::Instant::now();
        loop {
            let pids = self.processes();
            if pids.is_empty() {
                return true;
            }
            if started.elapsed() > timeout {
                return false;
            }
            for pid in pids {
                // SAFETY: kill(2); a pid in the container's own cgroup is the container's.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Removes the cgroup (after its processes have exited): stops the scope, if any, and
    /// removes the directories.
    pub fn remove(&self) -> Result<(), CgroupError> {
        if let Some(scope) = &self.scope {
            // Stopping a scope that systemd already collected (it empties when the workload
            // exits) is not an error.
            SystemdClient::new(&scope.unit, Vec::new())
                .and_then(|client| client.stop())
                .map_err(|error| CgroupError::Systemd {
                    unit: scope.unit.clone(),
                    action: "stop",
                    message: error.to_string(),
                })?;
        }
        for dir in self.own_dirs() {
            match fs::remove_dir(dir) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(io(dir, "remove")(error)),
            }
        }
        Ok(())
    }
}

/// Whether a cgroupsPath is in the systemd driver's form `slice:prefix:name`.
pub fn is_systemd_form(cgroups_path: &str) -> bool {
    systemd_form(cgroups_path).is_some()
}

/// Where the compile step for container `id` runs, given the container's cgroupsPath: in
/// a cgroup of its own beside the container's pod (in the pod's parent, kubelet's QoS
/// class), in the same driver's form. The node's pods account for it, an admin sees it
/// there, and no pod's own memory limit holds it: its bound is the node's
/// `[compile] memory`.
pub fn compile_step_path(container: &str, id: &str) -> String {
    if let Some((slice, _, _)) = systemd_form(container) {
        // kubepods-burstable-pod<uid>.slice lives in kubepods-burstable.slice.
        let parent = slice
            .strip_suffix(".slice")
            .and_then(|name| name.rsplit_once('-'))
            .map(|(parent, _)| format!("{parent}.slice"))
            .unwrap_or_else(|| "system.slice".to_owned());
        return format!("{parent}:bulwark-compile:{id}");
    }
    let leaf = format!("bulwark-compile-{id}");
    let pod_parent = Path::new(container)
        .parent()
        .and_then(Path::parent)
        .filter(|dir| !dir.as_os_str().is_empty() && *dir != Path::new("/"));
    match pod_parent {
        Some(dir) => dir.join(leaf).display().to_string(),
        None if container.starts_with('/') => format!("/{leaf}"),
        None => leaf,
    }
}

/// The parts of a cgroupsPath in the systemd driver's form `slice:prefix:name`.
fn systemd_form(cgroups_path: &str) -> Option<(&str, &str, &str)> {
    let mut parts = cgroups_path.split(':');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(slice), Some(prefix), Some(name), None) if !cgroups_path.starts_with('/') => {
            Some((slice, prefix, name))
        }
        _ => None,
    }
}

/// The directory of `inside(controller)` in each hierarchy Bulwark uses.
fn hierarchy_dirs(unified: bool, inside: impl Fn(&str) -> PathBuf) -> Vec<(String, PathBuf)> {
    if unified {
        vec![(String::new(), Path::new(CGROUP_ROOT).join(inside("")))]
    } else {
        V1_CONTROLLERS
            .iter()
            .map(|controller| {
                (
                    controller.to_string(),
                    Path::new(CGROUP_ROOT)
                        .join(controller)
                        .join(inside(controller)),
                )
            })
            .collect()
    }
}

/// cgroup v1's cpu.shares as v2's cpu.weight, the conversion runc and the kernel docs use.
fn shares_to_weight(shares: u64) -> u64 {
    1 + ((shares.clamp(2, 262_144) - 2) * 9999) / 262_142
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_paths_become_scopes_in_their_slice() {
        let cgroup = Cgroup::create(
            "kubepods-burstable-pod1.slice:cri-containerd:abc",
            &Resources::default(),
        )
        .unwrap();
        let scope = cgroup.scope.as_ref().unwrap();
        assert_eq!(scope.unit, "cri-containerd-abc.scope");
        assert_eq!(scope.slice, "kubepods-burstable-pod1.slice");
        assert!(cgroup.dirs[0].1.ends_with(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-abc.scope"
        ));
    }

    #[test]
    fn malformed_systemd_paths_are_refused_with_the_path() {
        for path in ["pods:cri:abc", "a--b.slice:cri:abc", "pod.slice:cri:"] {
            let error = Cgroup::create(path, &Resources::default()).unwrap_err();
            assert!(error.to_string().contains(path), "{error}");
        }
    }

    #[test]
    fn compile_steps_run_beside_the_pod_in_the_same_form() {
        assert_eq!(
            compile_step_path("kubepods-burstable-pod1.slice:cri-containerd:abc", "abc"),
            "kubepods-burstable.slice:bulwark-compile:abc"
        );
        assert_eq!(
            compile_step_path("/kubepods/burstable/pod1/abc", "abc"),
            "/kubepods/burstable/bulwark-compile-abc"
        );
        assert_eq!(
            compile_step_path("tests/pod1/abc", "abc"),
            "tests/bulwark-compile-abc"
        );
        assert_eq!(compile_step_path("pod1/abc", "abc"), "bulwark-compile-abc");
        assert_eq!(
            compile_step_path("/pod1/abc", "abc"),
            "/bulwark-compile-abc"
        );
    }
}
