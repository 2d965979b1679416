//! Where a workload may connect: the node's ceiling on network grants.
//!
//! A grant (`bulwark.dev/network`, `--network`) names exact `IP:PORT` destinations. The node
//! bounds them: with `ceilings.network` (`["10.0.0.0/8:443", "192.168.7.0/24:5432-5440"]`)
//! every grant must fall inside one of its ranges; without it, a grant may name anything but
//! the places a pod must never reach by default: loopback (the node's own services, the
//! kubelet on 127.0.0.1:10250), link-local (169.254.169.254, cloud metadata; fe80::/10) and
//! the node's own addresses.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// A range of destinations: an address block and a range of ports (`10.0.0.0/8:443`,
/// `[fd00::]/8:8000-8099`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetworkRange {
    /// The block's first address (the host bits are zero).
    pub network: IpAddr,
    /// The prefix length in bits.
    pub prefix: u8,
    /// The lowest port in the range.
    pub first_port: u16,
    /// The highest port in the range.
    pub last_port: u16,
}

/// What `CIDR:PORT[-PORT]` looks like, for errors.
pub const RANGE_SYNTAX: &str =
    "CIDR:PORT or CIDR:PORT-PORT (10.0.0.0/8:443, 192.168.7.0/24:5432-5440, [fd00::]/8:80)";

impl NetworkRange {
    /// Parses `CIDR:PORT[-PORT]`; an address without `/prefix` is the one address.
    pub fn parse(text: &str) -> Result<NetworkRange, String> {
        let text = text.trim();
        let (block, ports) = text
            .rsplit_once(':')
            .ok_or_else(|| format!("{text:?} has no :PORT"))?;
        let (first_port, last_port) = match ports.split_once('-') {
            Some((first, last)) => (parse_port(first)?, parse_port(last)?),
            None => {
                let port = parse_port(ports)?;
                (port, port)
            }
        };
        if first_port > last_port {
            return Err(format!("the ports {ports:?} run backwards"));
        }
        let (address, prefix) = match block.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (block, None),
        };
        let address = address.trim_start_matches('[').trim_end_matches(']');
        let address: IpAddr = address
            .parse()
            .map_err(|_| format!("{address:?} is not an IP address"))?;
        let bits = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|prefix| *prefix <= bits)
                .ok_or_else(|| format!("/{prefix} is not a prefix length of 0 to {bits}"))?,
            None => bits,
        };
        Ok(NetworkRange {
            network: mask(address, prefix),
            prefix,
            first_port,
            last_port,
        })
    }

    /// Whether `destination` lies inside the range (an IPv4-mapped IPv6 address counts as
    /// its IPv4 address).
    pub fn contains(&self, destination: &SocketAddr) -> bool {
        let port = destination.port();
        self.first_port <= port
            && port <= self.last_port
            && same_family(canonical(destination.ip()), self.network)
            && mask(canonical(destination.ip()), self.prefix) == self.network
    }
}

impl fmt::Display for NetworkRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.network {
            IpAddr::V4(address) => write!(f, "{address}/{}", self.prefix)?,
            IpAddr::V6(address) => write!(f, "[{address}]/{}", self.prefix)?,
        }
        if self.first_port == self.last_port {
            write!(f, ":{}", self.first_port)
        } else {
            write!(f, ":{}-{}", self.first_port, self.last_port)
        }
    }
}

fn parse_port(text: &str) -> Result<u16, String> {
    text.parse::<u16>()
        .ok()
        .filter(|port| *port != 0)
        .ok_or_else(|| format!("{text:?} is not a port (1 to 65535)"))
}

fn same_family(a: IpAddr, b: IpAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
}

/// An IPv4-mapped IPv6 address (`::ffff:127.0.0.1`) is the IPv4 address it carries: the
/// kernel connects it there.
pub fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

fn mask(address: IpAddr, prefix: u8) -> IpAddr {
    match address {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let kept = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits & kept))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let kept = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & kept))
        }
    }
}

/// Why a grant is refused without a ceiling, or `None` when it may be granted: loopback,
/// link-local (cloud metadata), unspecified, or one of `node_addresses`.
pub fn forbidden_by_default(grant: &SocketAddr, node_addresses: &[IpAddr]) -> Option<&'static str> {
    let address = canonical(grant.ip());
    let link_local = match address {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    if address.is_loopback() {
        Some("a loopback address (the node's own services)")
    } else if link_local {
        Some("a link-local address (cloud metadata, 169.254.169.254)")
    } else if address.is_unspecified() {
        Some("the unspecified address (it reaches the node itself)")
    } else if node_addresses
        .iter()
        .any(|node| canonical(*node) == address)
    {
        Some("one of this node's own addresses")
    } else {
        None
    }
}

/// The addresses of this machine's network interfaces, in the network namespace of the
/// caller (the shim runs in the node's).
pub fn node_addresses() -> Vec<IpAddr> {
    let mut addresses = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we only read, then free once.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        log::warn!(
            "cannot list this node's addresses: {}",
            std::io::Error::last_os_error()
        );
        return addresses;
    }
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: `entry` is a node of the list getifaddrs returned, not yet freed.
        let current = unsafe { &*entry };
        if !current.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family says how long it is.
            let family = i32::from(unsafe { (*current.ifa_addr).sa_family });
            if family == libc::AF_INET {
                // SAFETY: an AF_INET sockaddr is a sockaddr_in.
                let v4 = unsafe { &*(current.ifa_addr as *const libc::sockaddr_in) };
                addresses.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr))));
            } else if family == libc::AF_INET6 {
                // SAFETY: an AF_INET6 sockaddr is a sockaddr_in6.
                let v6 = unsafe { &*(current.ifa_addr as *const libc::sockaddr_in6) };
                addresses.push(IpAddr::V6(Ipv6Addr::from(v6.sin6_addr.s6_addr)));
            }
        }
        entry = current.ifa_next;
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    addresses
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn ranges_parse_and_hold_their_destinations() {
        let range = NetworkRange::parse("10.0.0.0/8:443").unwrap();
        assert!(range.contains(&at("10.1.2.3:443")));
        assert!(!range.contains(&at("10.1.2.3:444")));
        assert!(!range.contains(&at("11.0.0.1:443")));
        assert!(range.contains(&at("[::ffff:10.9.9.9]:443")), "IPv4-mapped");
        assert_eq!(range.to_string(), "10.0.0.0/8:443");

        let ports = NetworkRange::parse("192.168.7.0/24:5432-5440").unwrap();
        assert!(ports.contains(&at("192.168.7.9:5440")));
        assert!(!ports.contains(&at("192.168.7.9:5441")));
        assert_eq!(ports.to_string(), "192.168.7.0/24:5432-5440");

        let host_bits = NetworkRange::parse("192.168.7.77/24:80").unwrap();
        assert_eq!(host_bits.to_string(), "192.168.7.0/24:80");

        let v6 = NetworkRange::parse("[fd00::]/8:80").unwrap();
        assert!(v6.contains(&at("[fd12::1]:80")));
        assert!(!v6.contains(&at("10.0.0.1:80")));

        let one = NetworkRange::parse("10.0.0.5:80").unwrap();
        assert!(one.contains(&at("10.0.0.5:80")) && !one.contains(&at("10.0.0.6:80")));

        let everything = NetworkRange::parse("0.0.0.0/0:1-65535").unwrap();
        assert!(everything.contains(&at("1.2.3.4:9")));
    }

    #[test]
    fn malformed_ranges_say_what_is_wrong() {
        for (text, says) in [
            ("10.0.0.0/8", "no :PORT"),
            ("10.0.0.0/33:80", "/33 is not a prefix length"),
            ("10.0.0.0/8:0", "not a port"),
            ("10.0.0.0/8:90-80", "backwards"),
            ("db.local/8:80", "not an IP address"),
            ("10.0.0.0/8:http", "not a port"),
        ] {
            let error = NetworkRange::parse(text).unwrap_err();
            assert!(error.contains(says), "{text}: {error}");
        }
    }

    #[test]
    fn the_node_and_metadata_are_forbidden_by_default() {
        let node = ["192.0.2.10".parse().unwrap()];
        for refused in [
            "127.0.0.1:10250",
            "127.9.9.9:80",
            "[::1]:80",
            "[::ffff:127.0.0.1]:80",
            "169.254.169.254:80",
            "[fe80::1]:80",
            "0.0.0.0:80",
            "192.0.2.10:22",
        ] {
            assert!(
                forbidden_by_default(&at(refused), &node).is_some(),
                "{refused} must be refused"
            );
        }
        assert_eq!(forbidden_by_default(&at("10.0.0.5:5432"), &node), None);
    }

    #[test]
    fn this_machine_has_a_loopback_address() {
        assert!(node_addresses().iter().any(IpAddr::is_loopback));
    }
}
