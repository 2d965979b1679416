//! The container's cgroup (cgroupfs driver, v1 and v2): created from `linux.cgroupsPath`
//! with the spec's resources, joined by the workload process before it runs a single
//! instruction of the guest, read for Stats, removed at Delete.
//!
//! A relative `cgroupsPath` nests under the shim's own cgroup, controller by controller,
//! as runc does; an absolute one is taken from each hierarchy's root.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::spec::CpuResources;

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
    /// A `slice:prefix:name` path: the systemd cgroup driver, which needs a transient
    /// scope created through systemd and is not implemented yet.
    #[error(
        "linux.cgroupsPath {0:?} is in the systemd driver's form, which this version of Bulwark does not support yet; run kubelet and containerd with the cgroupfs driver"
    )]
    SystemdDriver(String),
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
}

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

impl Cgroup {
    /// Creates the cgroup for `cgroups_path` and applies `resources`.
    pub fn create(cgroups_path: &str, resources: &Resources) -> Result<Cgroup, CgroupError> {
        let relative = !cgroups_path.starts_with('/');
        if relative && cgroups_path.split(':').count() == 3 {
            return Err(CgroupError::SystemdDriver(cgroups_path.to_owned()));
        }
        let own = own_paths();
        let cgroup = if is_unified() {
            let base = Path::new(CGROUP_ROOT);
            let parent = if relative {
                own.iter()
                    .find(|(controllers, _)| controllers.is_empty())
                    .map(|(_, path)| path.trim_start_matches('/').to_owned())
                    .unwrap_or_default()
            } else {
                String::new()
            };
            let dir = base.join(parent).join(cgroups_path.trim_start_matches('/'));
            Cgroup {
                unified: true,
                dirs: vec![(String::new(), dir)],
            }
        } else {
            let dirs = V1_CONTROLLERS
                .iter()
                .map(|controller| {
                    let mount = Path::new(CGROUP_ROOT).join(controller);
                    let parent = if relative {
                        own.iter()
                            .find(|(controllers, _)| {
                                controllers.split(',').any(|c| c == *controller)
                            })
                            .map(|(_, path)| path.trim_start_matches('/').to_owned())
                            .unwrap_or_default()
                    } else {
                        String::new()
                    };
                    (
                        controller.to_string(),
                        mount
                            .join(parent)
                            .join(cgroups_path.trim_start_matches('/')),
                    )
                })
                .collect();
            Cgroup {
                unified: false,
                dirs,
            }
        };
        for (_, dir) in &cgroup.dirs {
            fs::create_dir_all(dir).map_err(io(dir, "create"))?;
        }
        if cgroup.unified {
            cgroup.enable_v2_controllers()?;
        }
        cgroup.apply(resources)?;
        Ok(cgroup)
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

    fn apply(&self, resources: &Resources) -> Result<(), CgroupError> {
        let cpu = resources.cpu;
        if self.unified {
            if let Some(limit) = resources.memory_limit {
                self.write("memory", "memory.max", &limit.to_string())?;
            }
            if let Some(shares) = cpu.shares {
                // The conversion runc and the kernel docs use from shares to weight.
                let weight = 1 + ((shares.clamp(2, 262_144) - 2) * 9999) / 262_142;
                self.write("cpu", "cpu.weight", &weight.to_string())?;
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

    /// Removes the cgroup directories (after its processes have exited).
    pub fn remove(&self) -> Result<(), CgroupError> {
        for (_, dir) in &self.dirs {
            match fs::remove_dir(dir) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(io(dir, "remove")(error)),
            }
        }
        Ok(())
    }
}
