//! The workload process on its own (no containerd), started the way the shim starts it
//! ([`Launch`]) with an artifact from the module cache: what it can still reach after it
//! locked itself down, who it runs as, that it fails closed where the kernel lacks
//! Landlock, and that it never holds the cache's key or a writable artifact.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use std::io::Write;

use bulwark_runtime::NodeConfig;
use bulwark_runtime::cache::{Artifact, CacheError, ModuleCache, module_digest};
use bulwark_runtime::compile::compile;
use bulwark_runtime::engine::{Facts, FlavorRequest, fingerprint_of};
use bulwark_runtime::policy::{Access, Knob, Policy, Request};
use bulwark_runtime::run::DeadlineMode;
use bulwark_shim::bundle::spec::{Namespace, NamespaceKind, User};
use bulwark_shim::process::workload::parent::Launch;
use bulwark_shim::process::workload::{LOCKDOWN_PROBE_ENV, Plan, PlannedPreopen};

fn guest(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../build/guests/{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run `make guests`",
        path.display()
    );
    path
}

/// A workload as a test sets it up: a plan in a temporary directory, the directories it
/// preopens, and how to start it.
struct Setup {
    temp: tempfile::TempDir,
    module: PathBuf,
    args: Vec<String>,
    preopens: Vec<(PathBuf, PlannedPreopen)>,
    flags: Vec<(Knob, String)>,
    config: NodeConfig,
    user: User,
    namespaces: Vec<Namespace>,
    probe: String,
}

impl Setup {
    fn new(guest_name: &str, args: &[&str]) -> Setup {
        Setup {
            temp: tempfile::tempdir().unwrap(),
            module: guest(guest_name),
            args: args.iter().map(|a| a.to_string()).collect(),
            preopens: Vec::new(),
            flags: Vec::new(),
            config: NodeConfig::default(),
            user: User::default(),
            namespaces: Vec::new(),
            probe: String::new(),
        }
    }

    fn path(&self) -> &Path {
        self.temp.path()
    }

    fn flag(mut self, knob: Knob, value: &str) -> Setup {
        self.flags.push((knob, value.to_owned()));
        self
    }

    fn preopen(mut self, host: PathBuf, guest: &str, access: Access) -> Setup {
        let planned = PlannedPreopen {
            guest: guest.into(),
            access,
        };
        self.preopens.push((host, planned));
        self
    }

    fn probe(mut self, probes: &[String]) -> Setup {
        self.probe = probes.join(":");
        self
    }

    fn policy(&self) -> Policy {
        let mut request = Request::annotations();
        for (knob, value) in &self.flags {
            request.set(*knob, value).unwrap();
        }
        Policy::resolve(&self.config, &request).unwrap()
    }

    /// The module's artifact for the policy, from a module cache in the setup's directory
    /// (compiled here, on a miss, as a compile step would).
    fn artifact(&self) -> Artifact {
        let cache = ModuleCache::open(&self.path().join("cache")).unwrap();
        let wasm = fs::read(&self.module).unwrap();
        let request = FlavorRequest::of(&self.policy(), DeadlineMode::ProcessWatchdog);
        let fingerprint =
            |facts: &Facts| Ok::<_, CacheError>(fingerprint_of(request.flavor(facts)).unwrap());
        let (artifact, _) = cache
            .get_or_compile(&module_digest(&wasm), fingerprint, |file| {
                let compiled = compile(&wasm, request, true).unwrap();
                (&*file).write_all(&compiled.artifact).unwrap();
                Ok(compiled.facts)
            })
            .unwrap();
        artifact
    }

    fn plan(&self, facts: Facts) -> PathBuf {
        let plan = Plan {
            entrypoint: "/app.wasm".into(),
            args: self.args.clone(),
            env: vec![],
            preopens: self.preopens.iter().map(|(_, p)| p.clone()).collect(),
            policy: self.policy(),
            facts,
            termination_log: true,
            egress_counts: false,
            user: self.user.clone(),
        };
        let path = self.path().join("plan.json");
        plan.write(&path).unwrap();
        path
    }

    /// The termination-message file, made (empty) as kubelet makes it.
    fn termination_log(&self) -> File {
        let path = self.path().join("termination-log");
        fs::write(&path, "").unwrap();
        File::options().write(true).open(path).unwrap()
    }

    /// The launch's command, with `extra` run in the child after the launch's own set-up.
    fn command(&self, release: bool) -> (Command, File) {
        let artifact = self.artifact();
        let launch = Launch {
            plan: self.plan(artifact.facts),
            artifact: artifact.file,
            preopens: self
                .preopens
                .iter()
                .map(|(host, _)| File::open(host).unwrap())
                .collect(),
            termination_log: Some(self.termination_log()),
            egress_counts: None,
            namespaces: self.namespaces.clone(),
        };
        let (reader, writer) = bulwark_shim::process::pipe().unwrap();
        if release {
            // Both openings of the gate: load, then start.
            (&writer).write_all(b"11").unwrap();
        }
        // What it reports of its load is the shim's business, not these tests'.
        let report = File::create("/dev/null").unwrap();
        let mut command = launch
            .command(
                &reader,
                &report,
                Path::new(env!("CARGO_BIN_EXE_bulwark-workload")),
            )
            .unwrap();
        command
            .env_clear()
            .env(LOCKDOWN_PROBE_ENV, &self.probe)
            .env("BULWARK_CACHE_DIR", self.path().join("cache"))
            .stdin(Stdio::null());
        (command, writer)
    }

    fn run(&self) -> Run {
        let (mut command, writer) = self.command(true);
        drop(writer);
        Run::of(command.output().unwrap())
    }

    fn run_unreleased(&self) -> Run {
        let (mut command, writer) = self.command(false);
        drop(writer);
        Run::of(command.output().unwrap())
    }

    fn spawn(&self) -> Child {
        let (mut command, writer) = self.command(true);
        let child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(writer);
        child
    }
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn of(output: std::process::Output) -> Run {
        Run {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    fn assert_denied(&self, probe: &str) {
        assert!(
            self.stderr.contains(&format!("probe: {probe}: denied")),
            "{probe} was not denied: {}",
            self.stderr
        );
    }

    fn assert_allowed(&self, probe: &str) {
        assert!(
            self.stderr.contains(&format!("probe: {probe}: ALLOWED")),
            "{probe} was not allowed: {}",
            self.stderr
        );
    }
}

/// Waits until the workload's `/proc/PID/status` shows the lock-down done (Seccomp: 2).
fn locked_down_status(child: &mut Child) -> String {
    let pid = child.id();
    for _ in 0..3000 {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        if status
            .lines()
            .any(|l| l.split_whitespace().eq(["Seccomp:", "2"]))
        {
            return status;
        }
        if let Ok(Some(exit)) = child.try_wait() {
            let mut stderr = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
            panic!("pid {pid} exited ({exit}) before it locked itself down: {stderr}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("pid {pid} did not lock itself down within 30 s");
}

fn status_field<'a>(status: &'a str, name: &str) -> Vec<&'a str> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name}:")))
        .map(|rest| rest.split_whitespace().collect())
        .unwrap_or_default()
}

#[test]
fn an_unreleased_workload_runs_nothing() {
    let run = Setup::new("hello", &["hello"]).run_unreleased();
    assert_eq!(run.code, Some(1));
    assert!(run.stdout.is_empty(), "the guest ran");
    assert!(
        run.stderr.contains("did not let this workload load"),
        "{}",
        run.stderr
    );
}

#[test]
fn after_lock_down_only_granted_paths_open_from_the_host_side() {
    let setup = Setup::new("hello", &["hello"]);
    let granted = setup.path().join("granted");
    fs::create_dir(&granted).unwrap();
    fs::write(granted.join("file"), "ok").unwrap();
    let cache = setup.path().join("cache");
    // SAFETY: getppid has no preconditions; the workload's parent is this test.
    let parent = std::process::id();
    let denied = [
        "/etc/passwd".to_string(),
        "/proc/self/environ".into(),
        setup.module.display().to_string(),
        setup.path().join("plan.json").display().to_string(),
        cache.join("key").display().to_string(),
        format!(">{}", cache.join("key").display()),
        format!(">{}", cache.join("forged.module").display()),
        format!(">{}", granted.join("new").display()),
        "@socket".into(),
        "@socket-unix".into(),
        "@socket-netlink".into(),
        "@socketpair".into(),
        "@fork".into(),
        "@unshare".into(),
        "@ptrace".into(),
        format!("@kill-{parent}"),
        format!("@tgkill-{parent}"),
        "@kill-1".into(),
        "@tgkill-1".into(),
    ];
    let allowed = [granted.join("file").display().to_string()];
    let probes: Vec<String> = denied.iter().chain(&allowed).cloned().collect();
    let run = setup
        .preopen(granted.clone(), "/data", Access::ReadOnly)
        .probe(&probes)
        .run();
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.stdout, "hello from bulwark\n");
    for probe in &denied {
        run.assert_denied(probe);
    }
    run.assert_allowed(&allowed[0]);
    assert!(!granted.join("new").exists());
}

#[test]
fn a_network_grant_opens_tcp_sockets_and_nothing_else() {
    let mut setup = Setup::new("hello", &["hello"]);
    setup.config.capabilities.allow_network = true;
    let run = setup
        .flag(Knob::Network, "tcp:10.0.0.1:9")
        .probe(&[
            "@socket".into(),
            "@socket-unix".into(),
            "@socket-netlink".into(),
            "@socketpair".into(),
        ])
        .run();
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    run.assert_allowed("@socket");
    run.assert_denied("@socketpair");
    run.assert_denied("@socket-unix");
    run.assert_denied("@socket-netlink");
}

/// The locked-down workload's `/proc/PID/status`, once it is checked to hold no capability
/// in any set.
fn status_without_capabilities(setup: &Setup) -> String {
    let mut child = setup.spawn();
    let status = locked_down_status(&mut child);
    child.kill().unwrap();
    child.wait().unwrap();
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            status_field(&status, set),
            ["0000000000000000"],
            "{set}: {status}"
        );
    }
    status
}

#[test]
fn a_non_root_workload_runs_as_its_user_with_no_capability_at_all() {
    let mut setup = Setup::new("sleep", &["sleep", "3000"]);
    setup.user = User {
        uid: 65532,
        gid: 65533,
        additional_gids: vec![3000, 4000],
    };
    let status = status_without_capabilities(&setup);
    assert_eq!(status_field(&status, "NoNewPrivs"), ["1"]);
    assert_eq!(status_field(&status, "Uid"), ["65532"; 4]);
    assert_eq!(status_field(&status, "Gid"), ["65533"; 4]);
    assert_eq!(status_field(&status, "Groups"), ["3000", "4000"]);
}

#[test]
fn a_root_workload_keeps_no_capability_either() {
    let status = status_without_capabilities(&Setup::new("sleep", &["sleep", "3000"]));
    assert_eq!(status_field(&status, "Uid"), ["0"; 4]);
}

#[test]
fn the_workload_holds_neither_the_cache_key_nor_a_writable_artifact() {
    let setup = Setup::new("sleep", &["sleep", "3000"]);
    let mut child = setup.spawn();
    locked_down_status(&mut child);
    let key = fs::read(setup.path().join("cache/key")).unwrap();
    assert_eq!(key.len(), 32);
    let found = memory_contains(child.id(), &key);
    // The artifact is mapped privately (a write would go to a copy, never to the file
    // other pods load), and no descriptor of it that is left is writable.
    let maps = fs::read_to_string(format!("/proc/{}/maps", child.id())).unwrap();
    let mut writable = Vec::new();
    for entry in fs::read_dir(format!("/proc/{}/fd", child.id())).unwrap() {
        let entry = entry.unwrap();
        let target = fs::read_link(entry.path()).unwrap_or_default();
        if target.to_string_lossy().ends_with(".artifact") {
            let fd = entry.file_name().to_string_lossy().into_owned();
            let info = fs::read_to_string(format!("/proc/{}/fdinfo/{fd}", child.id())).unwrap();
            let flags = info
                .lines()
                .find_map(|line| line.strip_prefix("flags:"))
                .map(|flags| u32::from_str_radix(flags.trim(), 8).unwrap())
                .unwrap();
            if flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32 {
                writable.push(fd);
            }
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!found, "the cache key is in the workload's memory");
    let mapped: Vec<&str> = maps
        .lines()
        .filter(|line| line.ends_with(".artifact"))
        .collect();
    assert!(!mapped.is_empty(), "the artifact is not mapped: {maps}");
    for line in &mapped {
        let perms = line.split_whitespace().nth(1).unwrap();
        assert!(
            perms.ends_with('p'),
            "a shared mapping of the artifact: {line}"
        );
    }
    assert!(
        writable.is_empty(),
        "writable artifact descriptors {writable:?}"
    );
}

/// Whether `needle` is anywhere in the readable memory of process `pid`.
fn memory_contains(pid: u32, needle: &[u8]) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut memory = File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut searched = 0;
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        if end - start > 1 << 30 {
            continue; // reservations (guard regions) hold nothing
        }
        let mut bytes = vec![0u8; (end - start) as usize];
        if memory.seek(SeekFrom::Start(start)).is_err() || memory.read_exact(&mut bytes).is_err() {
            continue;
        }
        searched += bytes.len();
        if bytes.windows(needle.len()).any(|window| window == needle) {
            return true;
        }
    }
    assert!(
        searched > 1 << 20,
        "read only {searched} bytes of pid {pid}"
    );
    false
}

#[test]
fn a_kernel_without_landlock_refuses_the_workload_unless_the_node_allows_it() {
    // The kernel here has Landlock: a seccomp filter that answers its calls with ENOSYS
    // makes it look like one that does not, for the workload alone.
    let without_landlock = |setup: &Setup| {
        let (mut command, writer) = setup.command(true);
        let filter = landlock_unavailable_filter();
        // SAFETY: only prctl/seccomp in the child, on a filter built before the fork.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                seccompiler::apply_filter(&filter)
                    .map_err(|_| std::io::Error::from_raw_os_error(libc::EPERM))
            });
        }
        drop(writer);
        Run::of(command.output().unwrap())
    };
    let setup = Setup::new("hello", &["hello"]);
    let run = without_landlock(&setup);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(run.stdout.is_empty(), "the guest ran: {}", run.stdout);
    assert!(
        run.stderr.contains("does not enforce Landlock")
            && run.stderr.contains("allow_without_landlock"),
        "{}",
        run.stderr
    );
    let mut allowing = Setup::new("hello", &["hello"]);
    allowing.config.capabilities.allow_without_landlock = true;
    let run = without_landlock(&allowing);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.stdout, "hello from bulwark\n");
    assert!(
        run.stderr.contains("does not enforce Landlock"),
        "{}",
        run.stderr
    );
}

fn landlock_unavailable_filter() -> seccompiler::BpfProgram {
    use seccompiler::{SeccompAction, SeccompFilter, TargetArch};
    let rules = [
        libc::SYS_landlock_create_ruleset,
        libc::SYS_landlock_add_rule,
        libc::SYS_landlock_restrict_self,
    ]
    .into_iter()
    .map(|syscall| (syscall, Vec::new()))
    .collect();
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .unwrap()
    .try_into()
    .unwrap()
}

#[test]
fn the_plan_is_readable_by_root_only() {
    use std::os::unix::fs::PermissionsExt;
    let setup = Setup::new("hello", &["hello"]);
    let path = setup.plan(setup.artifact().facts);
    assert_eq!(
        fs::metadata(path).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn a_limit_writes_the_termination_log() {
    let setup = Setup::new("loop", &["loop"]).flag(Knob::Fuel, "1000000");
    let run = setup.run();
    assert_eq!(run.code, Some(152), "{}", run.stderr);
    assert_eq!(
        fs::read_to_string(setup.path().join("termination-log")).unwrap(),
        "fuel exhausted after 1000000 units (bulwark.dev/fuel)\n"
    );
}

#[test]
fn a_missing_plan_is_a_clear_error() {
    let setup = Setup::new("hello", &["hello"]);
    let (mut command, writer) = setup.command(true);
    fs::remove_file(setup.path().join("plan.json")).unwrap();
    drop(writer);
    let run = Run::of(command.output().unwrap());
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.contains("plan.json"), "{}", run.stderr);
}

#[test]
fn the_workload_joins_the_pods_namespaces() {
    // A process in namespaces of its own stands in for the pod's sandbox.
    let mut holder = Command::new("unshare")
        .args(["--net", "--ipc", "--uts", "sleep", "30"])
        .spawn()
        .unwrap();
    let namespace = |kind: &str| PathBuf::from(format!("/proc/{}/ns/{kind}", holder.id()));
    // unshare execs sleep only once the namespaces exist.
    for _ in 0..100 {
        if fs::read_link(namespace("net")).ok() != fs::read_link("/proc/self/ns/net").ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut setup = Setup::new("sleep", &["sleep", "3000"]);
    setup.namespaces = [
        (NamespaceKind::Network, "net"),
        (NamespaceKind::Ipc, "ipc"),
        (NamespaceKind::Uts, "uts"),
    ]
    .into_iter()
    .map(|(kind, name)| Namespace {
        kind,
        path: Some(namespace(name)),
    })
    .collect();
    let mut child = setup.spawn();
    locked_down_status(&mut child);
    for kind in ["net", "ipc", "uts"] {
        let of_workload = fs::read_link(format!("/proc/{}/ns/{kind}", child.id())).unwrap();
        assert_eq!(
            of_workload,
            fs::read_link(namespace(kind)).unwrap(),
            "{kind}"
        );
    }
    child.kill().unwrap();
    child.wait().unwrap();
    holder.kill().unwrap();
    holder.wait().unwrap();

    // A namespace that is gone: the launch fails before anything starts, naming it.
    setup.namespaces = vec![Namespace {
        kind: NamespaceKind::Network,
        path: Some("/proc/999999999/ns/net".into()),
    }];
    let artifact = setup.artifact();
    let launch = Launch {
        plan: setup.plan(artifact.facts),
        artifact: artifact.file,
        preopens: vec![],
        termination_log: None,
        egress_counts: None,
        namespaces: setup.namespaces.clone(),
    };
    let (reader, writer) = bulwark_shim::process::pipe().unwrap();
    let error = launch
        .command(&reader, &writer, Path::new("/bin/true"))
        .expect_err("a missing namespace is refused");
    assert!(
        format!("{error:#}").contains("cannot open the pod's net namespace /proc/999999999"),
        "{error:#}"
    );
}
