//! The kernel's egress filter, below Wasmtime: a native process in a cgroup with the filter
//! attached (as a guest that escaped Wasmtime would be) connects to its grants and to
//! nothing else, the attempts are counted and the denials reported. The same connects
//! succeed without the filter, so these tests can fail. Needs root and a cgroup2 hierarchy
//! (`/sys/fs/cgroup` on a v2 node, `/sys/fs/cgroup/unified` on a hybrid one).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;

use bulwark_shim::egress::bpf::{EgressFilter, Transport};

/// A cgroup2 cgroup of the test's own, below the test process's cgroup; removed on drop.
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn new(name: &str) -> TestCgroup {
        let root = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(Path::new)
            .find(|root| root.join("cgroup.controllers").exists())
            .expect("a cgroup2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified");
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .unwrap()
            .lines()
            .find_map(|line| line.strip_prefix("0::").map(str::to_owned))
            .expect("the process's cgroup2 line");
        let dir = root
            .join(own.trim_start_matches('/'))
            .join(format!("bulwark-egress-test-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TestCgroup(dir)
    }

    /// Tries `target` (`tcp/IP/PORT` or `udp/IP/PORT`) from a shell that moved itself into
    /// the cgroup first: Ok, or the shell's error message.
    fn connect(&self, target: &str) -> Result<(), String> {
        let output = Command::new("bash")
            .arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec 3<>"/dev/$1""#)
            .arg(&self.0)
            .arg(target)
            .output()
            .unwrap();
        if output.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn listener() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    (listener, address)
}

fn tcp(address: SocketAddr) -> String {
    format!("tcp/{}/{}", address.ip(), address.port())
}

#[test]
fn a_process_in_the_cgroup_connects_only_to_its_grants() {
    let cgroup = TestCgroup::new("grants");
    let (_granted_listener, granted) = listener();
    let (_other_listener, other) = listener();
    let udp = format!("udp/127.0.0.1/{}", other.port());

    // Without the filter every one of these goes through: the checks below can fail.
    for target in [tcp(granted), tcp(other), udp.clone()] {
        assert_eq!(
            cgroup.connect(&target),
            Ok(()),
            "{target} without the filter"
        );
    }

    let mut filter = EgressFilter::attach(&cgroup.0, &[granted]).unwrap();
    assert_eq!(cgroup.connect(&tcp(granted)), Ok(()), "the grant");
    for target in [tcp(other), udp.clone()] {
        let refused = cgroup.connect(&target).unwrap_err();
        assert!(
            refused.contains("Operation not permitted"),
            "{target}: {refused}"
        );
    }
    let counts = filter.counts();
    assert_eq!((counts.allowed, counts.denied, counts.dropped), (1, 2, 0));
    let denials = filter.next_denials();
    assert_eq!(denials.len(), 2, "{denials:?}");
    assert_eq!(denials[0].destination, other);
    assert_eq!(denials[0].transport, Transport::Stream);
    assert_eq!(denials[1].transport, Transport::Datagram);
    assert!(denials.iter().all(|denial| denial.pid > 1));
    assert!(filter.next_denials().is_empty(), "each report is read once");

    // Taken off, the cgroup connects anywhere again.
    filter.detach().unwrap();
    assert_eq!(cgroup.connect(&tcp(other)), Ok(()));
}

#[test]
fn without_grants_nothing_connects_and_the_filter_outlives_its_handle() {
    let cgroup = TestCgroup::new("none");
    let (_listener, address) = listener();
    assert_eq!(cgroup.connect(&tcp(address)), Ok(()), "without the filter");
    let filter = EgressFilter::attach(&cgroup.0, &[]).unwrap();
    // The shim may exit or crash: the cgroup keeps the filter.
    drop(filter);
    let refused = cgroup.connect(&tcp(address)).unwrap_err();
    assert!(refused.contains("Operation not permitted"), "{refused}");
    let mapped = format!("tcp/::ffff:127.0.0.1/{}", address.port());
    assert!(cgroup.connect(&mapped).is_err(), "IPv4-mapped IPv6");
}

#[test]
fn an_ipv4_grant_also_holds_for_its_ipv6_mapped_form() {
    let cgroup = TestCgroup::new("mapped");
    let (_listener, address) = listener();
    let _filter = EgressFilter::attach(&cgroup.0, &[address]).unwrap();
    let mapped = format!("tcp/::ffff:127.0.0.1/{}", address.port());
    assert_eq!(cgroup.connect(&mapped), Ok(()));
}

#[test]
fn a_directory_outside_cgroup2_is_refused_with_the_reason() {
    let temp = tempfile::tempdir().unwrap();
    let error = EgressFilter::attach(temp.path(), &[])
        .err()
        .expect("not a cgroup");
    assert!(
        error.to_string().contains("not a cgroup v2 directory"),
        "{error}"
    );
}
