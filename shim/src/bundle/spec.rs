//! What the shim reads from a container's OCI bundle: containerd's world, translated into
//! the plain values the rest of the shim and the runtime crate take. No policy decisions
//! are made here.
//!
//! Paths inside the container are never turned into host path strings to be opened later:
//! [`ContainerSpec::locate`] says which trusted host directory (a volume's source or the
//! rootfs) holds them, and [`Location::open`] opens them beneath it in one step, without
//! following any symlink out of it. What is opened is what the workload gets.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, PosixRlimitType, Spec};

/// CRI's annotation naming a container's kind (`sandbox` or `container`).
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI's annotation naming a container's pod sandbox.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// CRI's annotation naming a container (`metadata.name` in the pod spec).
pub const CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
/// Where kubelet mounts the termination-message file inside a container.
pub const TERMINATION_LOG: &str = "/dev/termination-log";

/// A bundle that cannot be run, with a message fit for `kubectl describe`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

/// One bind mount of the spec, as the shim uses it to find preopened directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    /// Path inside the container.
    pub destination: String,
    /// Path on the host.
    pub source: PathBuf,
    /// Mounted read-only.
    pub read_only: bool,
}

/// The Linux namespaces a container spec names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NamespaceKind {
    /// Network: interfaces, addresses, ports.
    Network,
    /// System V IPC and POSIX message queues.
    Ipc,
    /// Host and domain name.
    Uts,
    /// Process IDs.
    Pid,
    /// Mounts.
    Mount,
    /// User and group IDs (a pod with `hostUsers: false`).
    User,
    /// The cgroup root.
    Cgroup,
    /// Clocks.
    Time,
}

impl NamespaceKind {
    /// The `clone(2)`/`setns(2)` flag.
    pub fn clone_flag(self) -> libc::c_int {
        match self {
            NamespaceKind::Network => libc::CLONE_NEWNET,
            NamespaceKind::Ipc => libc::CLONE_NEWIPC,
            NamespaceKind::Uts => libc::CLONE_NEWUTS,
            NamespaceKind::Pid => libc::CLONE_NEWPID,
            NamespaceKind::Mount => libc::CLONE_NEWNS,
            NamespaceKind::User => libc::CLONE_NEWUSER,
            NamespaceKind::Cgroup => libc::CLONE_NEWCGROUP,
            NamespaceKind::Time => 0x80, // CLONE_NEWTIME
        }
    }

    /// The name in `/proc/PID/ns/`.
    pub fn proc_name(self) -> &'static str {
        match self {
            NamespaceKind::Network => "net",
            NamespaceKind::Ipc => "ipc",
            NamespaceKind::Uts => "uts",
            NamespaceKind::Pid => "pid",
            NamespaceKind::Mount => "mnt",
            NamespaceKind::User => "user",
            NamespaceKind::Cgroup => "cgroup",
            NamespaceKind::Time => "time",
        }
    }

    fn from_oci(kind: LinuxNamespaceType) -> NamespaceKind {
        match kind {
            LinuxNamespaceType::Network => NamespaceKind::Network,
            LinuxNamespaceType::Ipc => NamespaceKind::Ipc,
            LinuxNamespaceType::Uts => NamespaceKind::Uts,
            LinuxNamespaceType::Pid => NamespaceKind::Pid,
            LinuxNamespaceType::Mount => NamespaceKind::Mount,
            LinuxNamespaceType::User => NamespaceKind::User,
            LinuxNamespaceType::Cgroup => NamespaceKind::Cgroup,
            LinuxNamespaceType::Time => NamespaceKind::Time,
        }
    }
}

/// The namespaces that make a pod: every container joins the sandbox's (or, for a
/// hostNetwork or hostIPC pod, stays in the node's).
pub const POD_NAMESPACES: [NamespaceKind; 3] = [
    NamespaceKind::Network,
    NamespaceKind::Ipc,
    NamespaceKind::Uts,
];

/// One entry of `linux.namespaces`: join the namespace at `path`, or (no path) get a new
/// one. A kind the spec does not list is shared with the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    /// Which namespace.
    pub kind: NamespaceKind,
    /// The namespace to join (`/proc/<sandbox pid>/ns/net`, `/var/run/netns/cni-...`).
    pub path: Option<PathBuf>,
}

/// One `process.rlimits` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    /// The `RLIMIT_*` resource.
    pub resource: libc::__rlimit_resource_t,
    /// Soft limit.
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
}

/// The container's user: who its process runs as.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct User {
    /// `process.user.uid` (kubelet's `runAsUser`, else the image's user).
    pub uid: u32,
    /// `process.user.gid` (`runAsGroup`, else the image's group).
    pub gid: u32,
    /// `process.user.additionalGids` (`supplementalGroups`, `fsGroup`).
    pub additional_gids: Vec<u32>,
}

/// The parts of a container's `config.json` that Bulwark uses.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    /// `process.args`: the entrypoint (a wasm file) and its arguments.
    pub args: Vec<String>,
    /// `process.env`, in order.
    pub env: Vec<(String, String)>,
    /// All annotations (pod annotations included, as containerd copies them).
    pub annotations: HashMap<String, String>,
    /// Whether this is the pod sandbox (pause) container.
    pub is_sandbox: bool,
    /// `process.terminal`.
    pub terminal: bool,
    /// `linux.cgroupsPath`.
    pub cgroups_path: Option<String>,
    /// `linux.resources.memory.limit` (bytes), kubelet's memory limit.
    pub memory_limit: Option<i64>,
    /// `linux.resources.cpu` shares, quota and period.
    pub cpu: CpuResources,
    /// `linux.resources.pids.limit`.
    pub pids_limit: Option<i64>,
    /// Bind mounts (volumes, secrets, the termination log...).
    pub mounts: Vec<BindMount>,
    /// `process.user`.
    pub user: User,
    /// `linux.namespaces`.
    pub namespaces: Vec<Namespace>,
    /// `hostname` (set in a new UTS namespace).
    pub hostname: Option<String>,
    /// `linux.sysctl` (kubelet's namespaced pod sysctls, on the sandbox).
    pub sysctls: BTreeMap<String, String>,
    /// `process.oomScoreAdj`, kubelet's QoS score.
    pub oom_score_adj: Option<i32>,
    /// `process.rlimits`.
    pub rlimits: Vec<Rlimit>,
    /// `root.readonly` (`readOnlyRootFilesystem: true`).
    pub readonly_rootfs: bool,
}

/// CPU controls kubelet derives from requests and limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuResources {
    /// cgroup v1 cpu.shares.
    pub shares: Option<u64>,
    /// CFS quota in microseconds per period.
    pub quota: Option<i64>,
    /// CFS period in microseconds.
    pub period: Option<u64>,
}

/// Where a container path lives: `rest` beneath the trusted host directory `root` (a
/// volume's source, which kubelet made, or the container's rootfs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The host directory the path is confined to.
    pub root: PathBuf,
    /// The path below it, relative.
    pub rest: PathBuf,
    /// Whether that directory is mounted read-only into the container.
    pub read_only: bool,
    /// Whether `root` is the container's rootfs (no volume covers the path).
    pub in_rootfs: bool,
}

impl ContainerSpec {
    /// Reads `<bundle>/config.json`.
    pub fn load(bundle: &Path) -> Result<ContainerSpec, SpecError> {
        let path = bundle.join("config.json");
        let spec = Spec::load(&path)
            .map_err(|error| SpecError(format!("cannot read {}: {error}", path.display())))?;
        Ok(ContainerSpec::from_spec(&spec))
    }

    /// Extracts the fields Bulwark uses.
    pub fn from_spec(spec: &Spec) -> ContainerSpec {
        let annotations = spec.annotations().clone().unwrap_or_default();
        let is_sandbox = annotations
            .get(CONTAINER_TYPE)
            .is_some_and(|kind| kind == "sandbox");
        let process = spec.process().as_ref();
        let linux = spec.linux().as_ref();
        let resources = linux.and_then(|l| l.resources().as_ref());
        ContainerSpec {
            args: process.and_then(|p| p.args().clone()).unwrap_or_default(),
            env: process.map(env_of).unwrap_or_default(),
            annotations,
            is_sandbox,
            terminal: process.and_then(|p| p.terminal()).unwrap_or(false),
            cgroups_path: linux
                .and_then(|l| l.cgroups_path().clone())
                .map(|p| p.display().to_string()),
            memory_limit: resources
                .and_then(|r| r.memory().as_ref())
                .and_then(|m| m.limit())
                .filter(|limit| *limit > 0),
            cpu: resources
                .and_then(|r| r.cpu().as_ref())
                .map(|cpu| CpuResources {
                    shares: cpu.shares(),
                    quota: cpu.quota(),
                    period: cpu.period(),
                })
                .unwrap_or_default(),
            pids_limit: resources
                .and_then(|r| r.pids().as_ref())
                .map(|pids| pids.limit())
                .filter(|limit| *limit > 0),
            mounts: bind_mounts(spec),
            user: process
                .map(|p| User {
                    uid: p.user().uid(),
                    gid: p.user().gid(),
                    additional_gids: p.user().additional_gids().clone().unwrap_or_default(),
                })
                .unwrap_or_default(),
            namespaces: linux
                .and_then(|l| l.namespaces().clone())
                .unwrap_or_default()
                .into_iter()
                .map(|ns| Namespace {
                    kind: NamespaceKind::from_oci(ns.typ()),
                    path: ns.path().clone(),
                })
                .collect(),
            hostname: spec.hostname().clone().filter(|name| !name.is_empty()),
            sysctls: linux
                .and_then(|l| l.sysctl().clone())
                .unwrap_or_default()
                .into_iter()
                .collect(),
            oom_score_adj: process.and_then(|p| p.oom_score_adj()),
            rlimits: process
                .and_then(|p| p.rlimits().clone())
                .unwrap_or_default()
                .iter()
                .map(|rlimit| Rlimit {
                    resource: rlimit_resource(rlimit.typ()),
                    soft: rlimit.soft(),
                    hard: rlimit.hard(),
                })
                .collect(),
            readonly_rootfs: spec
                .root()
                .as_ref()
                .and_then(|root| root.readonly())
                .unwrap_or(false),
        }
    }

    /// The pod this container belongs to (its own id for the sandbox itself).
    pub fn sandbox_id(&self) -> Option<&str> {
        self.annotations.get(SANDBOX_ID).map(String::as_str)
    }

    /// The container's name in its pod, for per-container annotations.
    pub fn container_name(&self) -> Option<&str> {
        self.annotations.get(CONTAINER_NAME).map(String::as_str)
    }

    /// The namespace of `kind` the spec names, if any.
    pub fn namespace(&self, kind: NamespaceKind) -> Option<&Namespace> {
        self.namespaces.iter().find(|ns| ns.kind == kind)
    }

    /// The host file kubelet mounted as the termination-message file, if any.
    pub fn termination_log(&self) -> Option<PathBuf> {
        self.mounts
            .iter()
            .find(|mount| mount.destination == TERMINATION_LOG)
            .map(|mount| mount.source.clone())
    }

    /// The namespaces of the pod, as this spec names them: what a process must join (path)
    /// or get anew (no path) to be in the pod.
    pub fn pod_namespaces(&self) -> Vec<Namespace> {
        self.namespaces
            .iter()
            .filter(|ns| POD_NAMESPACES.contains(&ns.kind))
            .cloned()
            .collect()
    }

    /// Which trusted host directory holds a container path: the bind mount that covers it
    /// (the longest destination wins), else the rootfs. `..` is refused outright.
    pub fn locate(&self, rootfs: &Path, container_path: &str) -> Result<Location, SpecError> {
        let path = Path::new(container_path);
        if path.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(SpecError(format!("{container_path}: '..' is not allowed")));
        }
        let below = |base: &str| path.strip_prefix(base).ok().map(Path::to_owned);
        let covering = self
            .mounts
            .iter()
            // A destination that is not absolute names no place in the container; an empty
            // one would otherwise cover every path.
            .filter(|mount| Path::new(&mount.destination).is_absolute())
            .filter(|mount| below(&mount.destination).is_some())
            .max_by_key(|mount| mount.destination.len());
        Ok(match covering {
            Some(mount) => Location {
                root: mount.source.clone(),
                rest: below(&mount.destination).unwrap_or_default(),
                read_only: mount.read_only,
                in_rootfs: false,
            },
            None => Location {
                root: rootfs.to_owned(),
                rest: path.strip_prefix("/").unwrap_or(path).to_owned(),
                read_only: self.readonly_rootfs,
                in_rootfs: true,
            },
        })
    }
}

impl Location {
    /// Opens the path beneath its root in one step: `openat2(2)` with `RESOLVE_IN_ROOT`, so
    /// `..` and symlinks (absolute ones included) resolve as if the root were `/` and can
    /// never lead out of it, and no magic link is followed. `flags` are `open(2)` flags;
    /// `O_CLOEXEC` is added.
    pub fn open(&self, flags: libc::c_int) -> std::io::Result<File> {
        if self.rest.as_os_str().is_empty() {
            // The mount's source itself (a file mounted on its own, such as a subPath),
            // whose host path kubelet made.
            return open_plain(&self.root, flags).map(File::from);
        }
        let root = open_plain(&self.root, libc::O_PATH | libc::O_DIRECTORY)?;
        openat2_in_root(&root, &self.rest, flags).map(File::from)
    }
}

impl Location {
    /// Opens a regular file at this location for reading, and nothing else: the last
    /// component is not followed if it is a symbolic link, and the file is first opened
    /// as a path only (which never blocks and reaches no driver), so a FIFO, a device, a
    /// socket or a directory an image put there is refused before anything reads it.
    /// `Ok(None)` when there is no such file.
    pub fn open_regular_file(&self, path: &str) -> Result<Option<File>, SpecError> {
        let opened = match self.open(libc::O_PATH | libc::O_NOFOLLOW) {
            Ok(opened) => opened,
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(error) if error.raw_os_error() == Some(libc::ELOOP) => {
                return Err(SpecError(format!(
                    "{path} is a symbolic link: name the file it points to (Bulwark follows no link to a module)"
                )));
            }
            Err(error) => return Err(SpecError(format!("{path}: {error}"))),
        };
        let file_type = opened
            .metadata()
            .map(|meta| meta.file_type())
            .map_err(|error| SpecError(format!("{path}: {error}")))?;
        if !file_type.is_file() {
            use std::os::unix::fs::FileTypeExt;
            let what = if file_type.is_fifo() {
                "a FIFO"
            } else if file_type.is_char_device() {
                "a character device"
            } else if file_type.is_block_device() {
                "a block device"
            } else if file_type.is_socket() {
                "a socket"
            } else if file_type.is_dir() {
                "a directory"
            } else if file_type.is_symlink() {
                "a symbolic link"
            } else {
                "not a regular file"
            };
            return Err(SpecError(format!(
                "{path} is {what}, not a file: the entrypoint must be a regular .wasm file"
            )));
        }
        // The very file just checked, opened for reading through its descriptor.
        use std::os::fd::AsRawFd;
        let file = File::open(format!("/proc/self/fd/{}", opened.as_raw_fd()))
            .map_err(|error| SpecError(format!("{path}: {error}")))?;
        Ok(Some(file))
    }
}

/// `open(2)` of a trusted host path (kubelet's or containerd's), close-on-exec.
fn open_plain(path: &Path, flags: libc::c_int) -> std::io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: open with a NUL-terminated path; the descriptor is owned by the result.
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `struct open_how` of openat2(2).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_IN_ROOT: u64 = 0x10;

fn openat2_in_root(root: &OwnedFd, rest: &Path, flags: libc::c_int) -> std::io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let rest = std::ffi::CString::new(rest.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 with a valid directory descriptor, a NUL-terminated path and an
    // open_how of the size passed; the descriptor is owned by the result.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            rest.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::ENOSYS) {
            return Err(std::io::Error::other(
                "this kernel has no openat2 (Linux 5.6 or later is required)",
            ));
        }
        return Err(error);
    }
    // SAFETY: fd is fresh and ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// `process.env` as `(name, value)` pairs, in order.
fn env_of(process: &oci_spec::runtime::Process) -> Vec<(String, String)> {
    process
        .env()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|entry| match entry.split_once('=') {
            Some((name, value)) => (name.to_owned(), value.to_owned()),
            None => (entry, String::new()),
        })
        .collect()
}

fn bind_mounts(spec: &Spec) -> Vec<BindMount> {
    spec.mounts()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|mount| {
            let options = mount.options().clone().unwrap_or_default();
            let is_bind = mount.typ().as_deref() == Some("bind")
                || options.iter().any(|o| o == "bind" || o == "rbind");
            let source = mount.source().clone()?;
            is_bind.then(|| BindMount {
                destination: mount.destination().display().to_string(),
                source,
                read_only: options.iter().any(|o| o == "ro"),
            })
        })
        .collect()
}

fn rlimit_resource(kind: PosixRlimitType) -> libc::__rlimit_resource_t {
    match kind {
        PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with_mounts(mounts: Vec<BindMount>) -> ContainerSpec {
        let mut spec = ContainerSpec::from_spec(&Spec::default());
        // oci-spec's default root is read-only; containerd's is not.
        spec.readonly_rootfs = false;
        spec.mounts = mounts;
        spec
    }

    fn read(location: &Location, file: &str) -> std::io::Result<String> {
        let mut location = location.clone();
        location.rest = location.rest.join(file);
        let mut text = String::new();
        std::io::Read::read_to_string(&mut location.open(libc::O_RDONLY)?, &mut text)?;
        Ok(text)
    }

    #[test]
    fn paths_are_located_under_their_mount_and_opened_beneath_it() {
        let temp = tempfile::tempdir().unwrap();
        let rootfs = temp.path().join("rootfs");
        let volume = temp.path().join("volume");
        std::fs::create_dir_all(rootfs.join("app/data")).unwrap();
        std::fs::create_dir_all(volume.join("sub")).unwrap();
        std::fs::write(rootfs.join("app/data/file"), "rootfs").unwrap();
        std::fs::write(volume.join("sub/file"), "volume").unwrap();
        std::fs::write(temp.path().join("secret"), "host").unwrap();
        std::os::unix::fs::symlink("/etc", rootfs.join("app/abs")).unwrap();
        std::os::unix::fs::symlink("../../..", volume.join("sub/up")).unwrap();
        let spec = spec_with_mounts(vec![BindMount {
            destination: "/data".into(),
            source: volume.clone(),
            read_only: true,
        }]);
        let data = spec.locate(&rootfs, "/app/data").unwrap();
        assert_eq!((data.read_only, data.in_rootfs), (false, true));
        assert_eq!(read(&data, "file").unwrap(), "rootfs");
        let sub = spec.locate(&rootfs, "/data/sub").unwrap();
        assert_eq!((sub.read_only, sub.in_rootfs), (true, false));
        assert_eq!(read(&sub, "file").unwrap(), "volume");
        // Symlinks resolve inside the root, never out of it.
        let abs = spec.locate(&rootfs, "/app/abs").unwrap();
        assert!(read(&abs, "passwd").is_err(), "the host's /etc/passwd");
        let up = spec.locate(&rootfs, "/data/sub/up").unwrap();
        assert!(read(&up, "secret").is_err(), "a file beside the volume");
        assert_eq!(read(&up, "sub/file").unwrap(), "volume");
        assert!(spec.locate(&rootfs, "/app/../../etc").is_err());
    }

    #[test]
    fn a_read_only_rootfs_makes_rootfs_paths_read_only() {
        let mut spec = spec_with_mounts(vec![BindMount {
            destination: "/scratch".into(),
            source: "/tmp".into(),
            read_only: false,
        }]);
        spec.readonly_rootfs = true;
        assert!(spec.locate(Path::new("/r"), "/app").unwrap().read_only);
        assert!(
            !spec
                .locate(Path::new("/r"), "/scratch/x")
                .unwrap()
                .read_only
        );
    }
}
