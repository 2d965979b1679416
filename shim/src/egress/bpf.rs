//! The kernel's egress filter around one Wasm container (DESIGN.md "Layers of defense",
//! item 4): the programs of `shim/bpf/egress.bpf.c` on the container's cgroup (cgroup v2)
//! let its sockets make exactly the TCP connections its grants name, refuse everything else
//! with EPERM (UDP included), count every attempt and report every denial. A guest that
//! escaped Wasmtime still reaches nothing but its grants.
//!
//! Loaded with aya 0.14 (the newest release whose MSRV, 1.87, fits the workspace's 1.95;
//! 0.15 and 0.16 need 1.98) from the object that build.rs compiles with clang into OUT_DIR.
//!
//! The programs are attached with plain `BPF_PROG_ATTACH` and `BPF_F_ALLOW_MULTI`, not with
//! aya's `CgroupSockAddr::attach`: on kernels >= 5.7 aya makes a bpf_link that is detached
//! when the link is dropped (with the `Ebpf`, or its owner's fd at process exit) unless it
//! is pinned on a bpffs. A `BPF_PROG_ATTACH` attachment is held by the cgroup itself: it
//! stays when this value is dropped and when the shim exits or crashes, and goes with the
//! cgroup (or [`EgressFilter::detach`]). The filter must never fail open because the shim
//! did. `ALLOW_MULTI` lets it coexist with node programs on ancestors (e.g. a CNI's socket
//! load balancer on the root cgroup); every program of the hierarchy must allow a connect,
//! and ours, being the deepest, runs first: it sees the address the guest asked for (a
//! Service's ClusterIP, before any rewrite), which is what grants name.

use std::fs::File;
use std::io;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, MapData, MapError, RingBuf};
use aya::programs::{CgroupSockAddr, ProgramError};
use aya::{Ebpf, EbpfError, EbpfLoader};
use bulwark_runtime::run::EgressCounts;

/// The compiled `shim/bpf/egress.bpf.c`. aya's `include_bytes_aligned!` wraps
/// `include_bytes!` to give the ELF parser the 8-byte alignment it needs (a plain
/// `include_bytes!` is only byte-aligned and may fail to parse).
fn object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress.bpf.o"))
}

/// Map names as the C file spells them (aya looks maps up by symbol name, case-sensitive).
const GRANTS: &str = "GRANTS";
const COUNTS: &str = "COUNTS";
const EVENTS: &str = "EVENTS";
/// `max_entries` of GRANTS in the C file.
const MAX_GRANTS: usize = 256;

/// Programs by function name (aya keys programs by symbol, not by section name), with
/// the kernel's `enum bpf_attach_type` value for each section.
const PROGRAMS: [(&str, u32); 4] = [
    ("egress_connect4", 10), // BPF_CGROUP_INET4_CONNECT
    ("egress_connect6", 11), // BPF_CGROUP_INET6_CONNECT
    ("egress_sendmsg4", 14), // BPF_CGROUP_UDP4_SENDMSG
    ("egress_sendmsg6", 15), // BPF_CGROUP_UDP6_SENDMSG
];

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;

/// `struct grant_key` of the C file: 24 bytes, no padding (aya checks the size against
/// the map's key_size, and the kernel hashes every byte, so padding would be a bug).
/// `addr` is in network byte order, an IPv4 address in its first 4 bytes; `port` is in
/// host byte order.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct GrantKey {
    family: u32,
    port: u32,
    addr: [u8; 16],
}

const _: () = assert!(size_of::<GrantKey>() == 24);

// SAFETY: repr(C), only integer fields, no padding (asserted above), any bit pattern valid.
unsafe impl aya::Pod for GrantKey {}

impl GrantKey {
    /// The key the programs build for `addr`: `::ffff:a.b.c.d` becomes the IPv4 key, as the
    /// program maps such destinations (a dual-stack socket reaches the IPv4 host).
    fn new(addr: SocketAddr) -> Self {
        let mut key = Self {
            family: AF_INET,
            port: u32::from(addr.port()),
            addr: [0; 16],
        };
        match addr.ip().to_canonical() {
            IpAddr::V4(ip) => key.addr[..4].copy_from_slice(&ip.octets()),
            IpAddr::V6(ip) => {
                key.family = AF_INET6;
                key.addr = ip.octets();
            }
        }
        key
    }
}

/// `struct denial_event` of the C file, 32 bytes.
const EVENT_SIZE: usize = 32;

/// The transport of a refused attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A TCP connect (or a SOCK_STREAM socket of another protocol, e.g. SCTP or MPTCP).
    Stream,
    /// A UDP connect or sendmsg: never granted.
    Datagram,
    /// Another socket type, by its `SOCK_*` number.
    Other(u32),
}

/// One refused attempt, for the pod's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denial {
    /// Where it was going (an IPv4-mapped IPv6 destination shows as IPv4).
    pub destination: SocketAddr,
    /// What kind of socket tried.
    pub transport: Transport,
    /// The process (thread group id, in the node's PID namespace) that tried.
    pub pid: u32,
}

impl Denial {
    /// Parses one ring buffer record; `None` for a record of the wrong size or family,
    /// which only a mismatched object could produce.
    fn parse(record: &[u8]) -> Option<Self> {
        if record.len() < EVENT_SIZE {
            return None;
        }
        let word = |at: usize| u32::from_ne_bytes(record[at..at + 4].try_into().unwrap());
        let addr: [u8; 16] = record[8..24].try_into().unwrap();
        let ip = match word(0) {
            AF_INET => IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3])),
            AF_INET6 => IpAddr::V6(Ipv6Addr::from(addr)),
            _ => return None,
        };
        let transport = match word(24) {
            SOCK_STREAM => Transport::Stream,
            SOCK_DGRAM => Transport::Datagram,
            other => Transport::Other(other),
        };
        Some(Self {
            destination: SocketAddr::new(ip, word(4) as u16),
            transport,
            pid: word(28),
        })
    }
}

/// Why the filter could not be put in place. The caller refuses the container (each layer
/// fails closed) unless the node's admin allowed running without this one.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// More grants than the GRANTS map holds.
    #[error("{count} network grants; the egress filter holds at most {MAX_GRANTS}")]
    TooManyGrants {
        /// Distinct grants asked for.
        count: usize,
    },
    /// The cgroup directory could not be opened.
    #[error("cannot open cgroup {}: {source}", .path.display())]
    OpenCgroup {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The directory is not on a cgroup2 file system (a v1 or hybrid node's pod cgroup).
    #[error("{} is not a cgroup v2 directory: the egress filter needs cgroup v2", .path.display())]
    NotCgroup2 {
        /// The directory.
        path: PathBuf,
    },
    /// The object did not load (the kernel lacks BTF, ring buffers (5.8) or CAP_BPF, or
    /// the object does not match this code).
    #[error("cannot load the egress filter: {0}")]
    Load(#[from] EbpfError),
    /// A map or program the object should have is missing.
    #[error("the egress filter object has no {0}")]
    Missing(&'static str),
    /// A map could not be opened or written.
    #[error("egress filter map {map}: {source}")]
    Map {
        /// The map.
        map: &'static str,
        /// Why.
        source: MapError,
    },
    /// A program could not be verified and loaded.
    #[error("egress filter program {program}: {source}")]
    Program {
        /// The program.
        program: &'static str,
        /// Why (the verifier's log is in it).
        source: ProgramError,
    },
    /// A program could not be attached to or detached from the cgroup.
    #[error(
        "cannot {action} egress filter program {program} on cgroup {}: {source}",
        .path.display()
    )]
    Attach {
        /// "attach" or "detach".
        action: &'static str,
        /// The program.
        program: &'static str,
        /// The cgroup.
        path: PathBuf,
        /// Why (EPERM: an ancestor holds a program attached without ALLOW_MULTI).
        source: io::Error,
    },
}

/// The egress filter on one container's cgroup: attached, and the shim's handle on its
/// counters and denial reports. Dropping it leaves the programs attached (see the module
/// doc); the kernel removes them with the cgroup.
pub struct EgressFilter {
    /// The programs' fds, in [`PROGRAMS`]' order, for [`EgressFilter::detach`] (the
    /// attachment needs none). The loaded object itself is not kept: a shim holds a filter
    /// for as long as its container lives, and the object's parsed form is most of what
    /// loading left in memory.
    programs: Vec<OwnedFd>,
    cgroup: File,
    cgroup_dir: PathBuf,
    /// Held, not used after attach: a later grant change would write here. (Dropping it
    /// would not empty the map: the attached programs hold it.)
    _grants: HashMap<MapData, GrantKey, u8>,
    counts: Array<MapData, u64>,
    events: RingBuf<MapData>,
}

impl EgressFilter {
    /// Loads the programs, fills GRANTS with exactly `grants` (none: every connect is
    /// refused) and attaches the programs to the cgroup at `cgroup_dir`. The grants are in
    /// place before the first program is attached, so no granted connect is ever refused;
    /// a failure after some programs are attached detaches them again.
    pub fn attach(cgroup_dir: &Path, grants: &[SocketAddr]) -> Result<EgressFilter, EgressError> {
        let mut keys: Vec<GrantKey> = grants.iter().map(|&grant| GrantKey::new(grant)).collect();
        keys.sort_by_key(|key| (key.family, key.port, key.addr));
        keys.dedup();
        if keys.len() > MAX_GRANTS {
            return Err(EgressError::TooManyGrants { count: keys.len() });
        }

        let cgroup = File::open(cgroup_dir).map_err(|source| EgressError::OpenCgroup {
            path: cgroup_dir.to_owned(),
            source,
        })?;
        if !is_cgroup2(&cgroup) {
            return Err(EgressError::NotCgroup2 {
                path: cgroup_dir.to_owned(),
            });
        }

        // Without the kernel's BTF: the programs read no kernel structure (no CO-RE
        // relocation to make). aya 0.14's `EbpfLoader::new` still parses vmlinux's BTF
        // before it can be told not to: a transient ~19 MiB, handed back to the system
        // once the object is dropped (below). Kernels before 5.11 charge BPF memory to
        // RLIMIT_MEMLOCK: raise it first there.
        let mut ebpf = EbpfLoader::new().btf(None).load(object())?;

        // Load (verify) all four before attaching any: a rejected program attaches nothing.
        // This comes before take_map on purpose: Ebpf::load already wrote the maps' fd
        // numbers into the instructions, and BPF_PROG_LOAD resolves them then, so every
        // map handle must stay open until the programs are loaded (afterwards each loaded
        // program holds its maps).
        for (name, _) in PROGRAMS {
            program(&mut ebpf, name)?
                .load()
                .map_err(|source| EgressError::Program {
                    program: name,
                    source,
                })?;
        }

        let map = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(EgressError::Missing(name))
        };
        let map_error =
            |map: &'static str| move |source: MapError| EgressError::Map { map, source };
        let mut grant_map: HashMap<MapData, GrantKey, u8> =
            HashMap::try_from(map(&mut ebpf, GRANTS)?).map_err(map_error(GRANTS))?;
        for key in &keys {
            // flags 0 = BPF_ANY. `&key` suits aya 0.14 (impl Borrow<K>) and 0.16 (&K).
            grant_map.insert(key, 1u8, 0).map_err(map_error(GRANTS))?;
        }
        let counts = Array::try_from(map(&mut ebpf, COUNTS)?).map_err(map_error(COUNTS))?;
        let events = RingBuf::try_from(map(&mut ebpf, EVENTS)?).map_err(map_error(EVENTS))?;

        let programs = PROGRAMS
            .iter()
            .map(|&(name, _)| {
                program_fd(&ebpf, name)?
                    .try_clone_to_owned()
                    .map_err(|source| EgressError::Program {
                        program: name,
                        source: ProgramError::IOError(source),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        drop(ebpf);
        // SAFETY: malloc_trim only returns free heap pages to the kernel.
        unsafe { libc::malloc_trim(0) };
        let filter = EgressFilter {
            programs,
            cgroup,
            cgroup_dir: cgroup_dir.to_owned(),
            _grants: grant_map,
            counts,
            events,
        };
        for (index, &(name, attach_type)) in PROGRAMS.iter().enumerate() {
            let program = filter.programs[index].as_fd();
            let result = prog_attach(BPF_PROG_ATTACH, program, filter.cgroup.as_fd(), attach_type)
                .map_err(|source| filter.attach_error("attach", name, source));
            if let Err(error) = result {
                for earlier in 0..index {
                    if let Err(detach) = filter.detach_one(earlier) {
                        log::warn!("rolling back the egress filter: {detach}");
                    }
                }
                return Err(error);
            }
        }
        Ok(filter)
    }

    /// The counters, read now. A counter that cannot be read shows as 0 (logged): the
    /// map exists as long as `self`, so that only happens on a kernel failure.
    pub fn counts(&self) -> EgressCounts {
        let read = |index: u32| {
            self.counts.get(&index, 0).unwrap_or_else(|error| {
                log::warn!("reading egress filter counter {index}: {error}");
                0
            })
        };
        EgressCounts {
            allowed: read(0),
            denied: read(1),
            dropped: read(2),
        }
    }

    /// Every denial reported since the last call, oldest first, without blocking. Call it
    /// when [`EgressFilter::events_fd`] polls readable, or on a timer: the ring holds about
    /// 1,600 reports, and denials past that are only counted (`EgressCounts::dropped`).
    pub fn next_denials(&mut self) -> Vec<Denial> {
        let mut denials = Vec::new();
        // Each item is consumed (the ring's reader position moves) when it is dropped.
        while let Some(record) = self.events.next() {
            match Denial::parse(&record) {
                Some(denial) => denials.push(denial),
                None => log::warn!("malformed egress filter report of {} bytes", record.len()),
            }
        }
        denials
    }

    /// The ring buffer's fd: epoll/poll report it readable when a denial is waiting, e.g.
    /// through `tokio::io::unix::AsyncFd::new(filter)` (EgressFilter is `AsRawFd`) and
    /// `readable_mut().await`, then `next_denials` and `clear_ready`.
    pub fn events_fd(&self) -> BorrowedFd<'_> {
        self.events.as_fd()
    }

    /// Takes the programs off the cgroup (not needed when the cgroup is being removed).
    pub fn detach(self) -> Result<(), EgressError> {
        let mut first = None;
        for index in 0..PROGRAMS.len() {
            if let Err(error) = self.detach_one(index) {
                first.get_or_insert(error);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Takes program `index` (of [`PROGRAMS`]) off the cgroup.
    fn detach_one(&self, index: usize) -> Result<(), EgressError> {
        let (name, attach_type) = PROGRAMS[index];
        prog_attach(
            BPF_PROG_DETACH,
            self.programs[index].as_fd(),
            self.cgroup.as_fd(),
            attach_type,
        )
        .map_err(|source| self.attach_error("detach", name, source))
    }

    fn attach_error(
        &self,
        action: &'static str,
        program: &'static str,
        source: io::Error,
    ) -> EgressError {
        EgressError::Attach {
            action,
            program,
            path: self.cgroup_dir.clone(),
            source,
        }
    }
}

impl AsRawFd for EgressFilter {
    /// The ring buffer's fd, see [`EgressFilter::events_fd`].
    fn as_raw_fd(&self) -> RawFd {
        self.events.as_raw_fd()
    }
}

/// The fd of the loaded program `name` of `ebpf`.
fn program_fd<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<BorrowedFd<'a>, EgressError> {
    let program: &CgroupSockAddr = ebpf
        .program(name)
        .ok_or(EgressError::Missing(name))?
        .try_into()
        .map_err(|source| EgressError::Program {
            program: name,
            source,
        })?;
    let fd = program.fd().map_err(|source| EgressError::Program {
        program: name,
        source,
    })?;
    Ok(fd.as_fd())
}

fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, EgressError> {
    ebpf.program_mut(name)
        .ok_or(EgressError::Missing(name))?
        .try_into()
        .map_err(|source| EgressError::Program {
            program: name,
            source,
        })
}

fn is_cgroup2(dir: &File) -> bool {
    // SAFETY: statfs is plain data, filled by fstatfs on a valid fd.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::fstatfs(dir.as_raw_fd(), &mut stat) }) == 0
        && stat.f_type == libc::CGROUP2_SUPER_MAGIC
}

const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_F_ALLOW_MULTI: u32 = 1 << 1;

/// The `BPF_PROG_ATTACH`/`BPF_PROG_DETACH` part of `union bpf_attr`; the kernel takes a
/// shorter attr and treats the rest as zero.
#[repr(C)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

/// bpf(BPF_PROG_ATTACH or BPF_PROG_DETACH) of `prog` on `cgroup`. aya 0.14 has no public
/// call for it (its `ProgAttachLink::attach` is crate-private and only used below 5.7).
/// With ALLOW_MULTI, detach names the program to remove by its fd.
fn prog_attach(
    cmd: libc::c_long,
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<()> {
    let attr = ProgAttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type,
        attach_flags: if cmd == BPF_PROG_ATTACH {
            BPF_F_ALLOW_MULTI
        } else {
            0
        },
        replace_bpf_fd: 0,
    };
    // SAFETY: attr outlives the call, and its size is passed with it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &attr as *const ProgAttachAttr,
            size_of::<ProgAttachAttr>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_ipv4_grant_is_the_ipv4_key() {
        let v4 = GrantKey::new("127.0.0.1:8080".parse().unwrap());
        let mapped = GrantKey::new("[::ffff:127.0.0.1]:8080".parse().unwrap());
        assert_eq!(v4, mapped);
        assert_eq!(v4.family, AF_INET);
        assert_eq!(v4.port, 8080);
        assert_eq!(&v4.addr[..4], &[127, 0, 0, 1]);
        assert_eq!(&v4.addr[4..], &[0; 12]);
    }

    #[test]
    fn parses_a_denial_record() {
        let mut record = Vec::new();
        for word in [AF_INET6, 53] {
            record.extend_from_slice(&word.to_ne_bytes());
        }
        record.extend_from_slice(&"::1".parse::<Ipv6Addr>().unwrap().octets());
        for word in [SOCK_DGRAM, 42] {
            record.extend_from_slice(&word.to_ne_bytes());
        }
        let denial = Denial::parse(&record).unwrap();
        assert_eq!(denial.destination, "[::1]:53".parse().unwrap());
        assert_eq!(denial.transport, Transport::Datagram);
        assert_eq!(denial.pid, 42);
    }
}
