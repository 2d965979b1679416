//! The containerd task service: containerd's requests translated into containers, each
//! backed by a process of its own from Create on — the pod sandbox's holder
//! ([`crate::sandbox`]), a Wasm workload process waiting at its gate ([`crate::workload`]),
//! or a native container's init (runc) — and their exits reported back as events.
//!
//! One shim process serves a whole pod: `start` groups containers by their CRI sandbox id.
//! The pod's lock guards bookkeeping only: starting processes, D-Bus calls to systemd and
//! runc all happen outside it, so one container's slow Create or Start never stalls the
//! calls about the pod's other containers.

use std::collections::{HashMap, VecDeque};
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use containerd_shim::api::{self, Empty};
use containerd_shim::monitor::{ExitEvent, Subject, Topic, monitor_subscribe};
use containerd_shim::protos::events::task::{TaskCreate, TaskDelete, TaskExit, TaskOOM, TaskStart};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{
    Config, DeleteResponse, ExitSignal, Flags, StartOpts, TtrpcContext, TtrpcResult,
};

use bulwark_runtime::config::{DEFAULT_CONFIG_PATH, NodeConfig};

use crate::cgroup::{Cgroup, OomCount};
use crate::container::{ARTIFACT_MODULE_FILE, ContentStore, PLAN_FILE, Prepared};
use crate::native::{NativeContainer, NativeStdio};
use crate::options::config_path_from_options;
use crate::spawn::ProcessLimits;
use crate::spec::ContainerSpec;
use crate::workload::Gated;

/// How long Delete waits for a created-but-never-started container's process to go.
const DELETE_WAIT: Duration = Duration::from_secs(10);
/// How long after its last container's delete the shim waits for containerd's Shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// How long the ttrpc server may take to stop once the shim is told to exit.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How many exits of processes no container claimed (yet) are remembered.
const UNCLAIMED_EXITS: usize = 64;

type TtrpcError = containerd_shim::protos::ttrpc::Error;

/// The shim: containerd's `start`/`delete` actions and the daemon's task service.
pub struct BulwarkShim {
    exit: Arc<ExitSignal>,
    namespace: String,
    containerd_address: String,
    socket: String,
    id: String,
}

impl containerd_shim::Shim for BulwarkShim {
    type T = TaskService;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        BulwarkShim {
            exit: Arc::new(ExitSignal::default()),
            namespace: args.namespace.clone(),
            containerd_address: args.address.clone(),
            socket: args.socket.clone(),
            id: args.id.clone(),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // containerd runs `start` in the bundle: all containers of one pod share a shim.
        let grouping = ContainerSpec::load(Path::new("."))
            .ok()
            .and_then(|spec| spec.sandbox_id().map(str::to_owned))
            .unwrap_or_else(|| opts.id.clone());
        let (_, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        containerd_shim::util::write_address(&address)?;
        // Reply and exit here rather than returning: containerd-shim would next drop its
        // signal-hook iterator, and a SIGCHLD from the daemon we just spawned (which exits
        // at once when the pod's shim already serves) arriving during that drop makes the
        // handler spin on the closed pipe. Seen as `start` hanging until containerd kills
        // it, about once in sixty pod starts.
        let mut stdout = std::io::stdout().lock();
        if let Err(err) = write!(stdout, "{address}").and_then(|()| stdout.flush()) {
            eprintln!("cannot write the shim address: {err}");
            std::process::exit(1);
        }
        std::process::exit(0);
    }

    fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        // containerd calls this when the shim died: clean up what it may have left.
        let bundle = std::env::current_dir().unwrap_or_default();
        clean_up_after_dead_shim(&bundle, &self.id);
        let mut response = DeleteResponse::new();
        response.set_exit_status(137);
        response.exited_at = MessageField::some(timestamp(SystemTime::now()));
        Ok(response)
    }

    fn wait(&mut self) {
        self.exit.wait();
        // containerd-shim next stops its ttrpc server, which waits for every connection's
        // threads; a shim whose pod is gone must not outlive it if one of them never ends.
        std::thread::spawn(|| {
            std::thread::sleep(STOP_GRACE);
            log::warn!("the ttrpc server did not stop within {STOP_GRACE:?}; exiting");
            std::process::exit(0);
        });
        // containerd-shim removes the socket by reading the `address` file in the bundle,
        // which containerd may already have deleted with the sandbox: remove it here.
        if let Some(path) = self.socket.strip_prefix("unix://") {
            let _ = std::fs::remove_file(path);
        }
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        TaskService::new(
            ContentStore {
                address: self.containerd_address.clone(),
                namespace: self.namespace.clone(),
            },
            publisher,
            self.exit.clone(),
            self.id.clone(),
        )
    }
}

/// What a shim that died may have left of one container: its processes (the workload,
/// the holder, a native container), its cgroup or scope, its files, its rootfs mount.
fn clean_up_after_dead_shim(bundle: &Path, id: &str) {
    if let Err(err) = crate::native::delete_after_shim_died(id, bundle) {
        log::warn!("{err}");
    }
    let cgroup = ContainerSpec::load(bundle)
        .ok()
        .and_then(|spec| spec.cgroups_path)
        .and_then(|path| Cgroup::locate(&path).ok());
    if let Some(cgroup) = cgroup {
        if !cgroup.kill_all(Duration::from_secs(5)) {
            log::warn!("processes of {id} survived SIGKILL");
        }
        if let Err(err) = cgroup.remove() {
            log::warn!("{err}");
        }
    }
    remove_files(bundle);
    unmount_rootfs(bundle);
    remove_dead_socket(bundle);
}

/// The shim's socket, named in the bundle's `address` file, once nothing listens on it
/// any more: a SIGKILLed shim cannot remove it itself. (containerd also runs `delete` when
/// one container failed to start while the shim serves the pod's others: then it answers.)
fn remove_dead_socket(bundle: &Path) {
    let Ok(address) = std::fs::read_to_string(bundle.join("address")) else {
        return;
    };
    let Some(path) = address.trim().strip_prefix("unix://") else {
        return;
    };
    let refused = matches!(
        std::os::unix::net::UnixStream::connect(path),
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused
    );
    if refused && let Err(err) = std::fs::remove_file(path) {
        log::warn!("cannot remove the dead shim's socket {path}: {err}");
    }
}

/// Where a container is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Created,
    /// Start is under way outside the lock (runc start).
    Starting,
    Running,
    Stopped,
}

#[derive(Debug, Clone, Copy)]
struct Exit {
    code: u32,
    at: SystemTime,
}

enum Kind {
    /// The pod sandbox: its holder process.
    Sandbox,
    /// A Wasm workload, whose process waits at its gate until Start.
    Wasm { gate: Option<Gated> },
    /// A native container (where the node allows them), run by runc.
    Native(NativeContainer),
}

#[derive(Clone, Default)]
struct StdioPaths {
    stdin: String,
    stdout: String,
    stderr: String,
}

struct Container {
    bundle: PathBuf,
    kind: Kind,
    status: Phase,
    /// The container's process, from Create on.
    pid: u32,
    exit: Option<Exit>,
    /// Its cgroup (for a native container, runc's, read for Stats).
    cgroup: Option<Cgroup>,
    /// A Wasm container's cgroup's OOM kills at Create, before its workload could run
    /// (the sandbox reports none; runc reports a native container's own).
    oom_start: Option<OomCount>,
    stdio: StdioPaths,
    /// Read ends of its output FIFOs, held while it lives (see [`hold_output_fifos`]).
    _output_readers: Vec<std::fs::File>,
}

impl Container {
    /// Records the exit and returns the event that announces it.
    fn stopped(&mut self, id: &str, exit: Exit) -> TaskExit {
        self.status = Phase::Stopped;
        self.exit = Some(exit);
        exit_event(id, self.pid, exit)
    }
}

/// The containers of this shim, and the exits of processes no container claimed yet (a
/// process that dies between its start and its container's entry here).
struct State {
    containers: HashMap<String, Container>,
    unclaimed: VecDeque<(u32, Exit)>,
}

impl State {
    fn get(&self, id: &str) -> Result<&Container, TtrpcError> {
        self.containers.get(id).ok_or_else(|| not_found(id))
    }

    fn get_mut(&mut self, id: &str) -> Result<&mut Container, TtrpcError> {
        self.containers.get_mut(id).ok_or_else(|| not_found(id))
    }

    /// The container whose process `pid` just exited records it; else it waits to be
    /// claimed. Returns the events to publish: a TaskOOM first when the kernel's OOM killer
    /// ended it (so kubelet reports `OOMKilled`, as for a runc container), then its TaskExit.
    fn process_exited(&mut self, pid: u32, exit: Exit) -> Option<(Option<TaskOOM>, TaskExit)> {
        let found = self
            .containers
            .iter_mut()
            .find(|(_, c)| c.pid == pid && c.status != Phase::Stopped);
        match found {
            Some((id, container)) => {
                // A Wasm container's cgroup holds its workload alone: a kill counted there
                // was the workload's (runc's containers report their own OOMs to runc).
                let oom = (exit.code == 128 + libc::SIGKILL as u32
                    && container
                        .cgroup
                        .as_ref()
                        .zip(container.oom_start)
                        .is_some_and(|(cgroup, start)| cgroup.oom_killed_since(start)))
                .then(|| {
                    log::warn!("container {id} was killed by the kernel's OOM killer");
                    let mut event = TaskOOM::new();
                    event.container_id = id.clone();
                    event
                });
                Some((oom, container.stopped(id, exit)))
            }
            None => {
                if self.unclaimed.len() == UNCLAIMED_EXITS {
                    self.unclaimed.pop_front();
                }
                self.unclaimed.push_back((pid, exit));
                None
            }
        }
    }

    /// Adds a container whose process may already have exited; returns the exit event then.
    fn insert(&mut self, id: &str, mut container: Container) -> Option<TaskExit> {
        let claimed = self
            .unclaimed
            .iter()
            .position(|(pid, _)| *pid == container.pid)
            .and_then(|index| self.unclaimed.remove(index));
        let event = claimed.map(|(_, exit)| container.stopped(id, exit));
        self.containers.insert(id.to_owned(), container);
        event
    }
}

fn not_found(id: &str) -> TtrpcError {
    error(Code::NOT_FOUND, format!("container {id} not found"))
}

/// Task events to containerd, from the service and from the exit watcher.
struct Events {
    namespace: String,
    publisher: Mutex<RemotePublisher>,
}

impl Events {
    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let publisher = self.publisher.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(err) = publisher.publish(
            containerd_shim::Context::default(),
            topic,
            &self.namespace,
            event,
        ) {
            log::error!("cannot publish {topic}: {err}");
        }
    }
}

/// The ttrpc task service of one shim process.
pub struct TaskService {
    content: ContentStore,
    events: Arc<Events>,
    state: Arc<(Mutex<State>, Condvar)>,
    shutdown: Arc<ExitSignal>,
    /// The shim's own id: its pod's sandbox, the first container it was started for.
    sandbox: String,
}

fn error(code: Code, message: impl Into<String>) -> TtrpcError {
    let mut status = containerd_shim::protos::ttrpc::Status::new();
    status.set_code(code);
    status.set_message(message.into());
    containerd_shim::protos::ttrpc::Error::RpcStatus(status)
}

fn timestamp(at: SystemTime) -> Timestamp {
    let since = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let mut ts = Timestamp::new();
    ts.seconds = since.as_secs() as i64;
    ts.nanos = since.subsec_nanos() as i32;
    ts
}

impl TaskService {
    fn new(
        content: ContentStore,
        publisher: RemotePublisher,
        shutdown: Arc<ExitSignal>,
        sandbox: String,
    ) -> TaskService {
        let state = Arc::new((
            Mutex::new(State {
                containers: HashMap::new(),
                unclaimed: VecDeque::new(),
            }),
            Condvar::new(),
        ));
        let service = TaskService {
            events: Arc::new(Events {
                namespace: content.namespace.clone(),
                publisher: Mutex::new(publisher),
            }),
            content,
            state,
            shutdown,
            sandbox,
        };
        service.watch_exits();
        service
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        self.events.publish(topic, event);
    }

    /// Once the last container is deleted, the pod sandbox (always the first to come) is
    /// gone and nothing can join the pod any more; containerd's Shutdown normally follows
    /// at once. Once in thousands of pod lifecycles it was never seen here (containerd
    /// ignores a closed connection), and containerd 2.x sends none after the delete of a
    /// container that belongs to a sandbox, which may come after the sandbox's own: the
    /// shim exits on its own after a grace rather than outlive its pod.
    fn exit_unless_shut_down(&self) {
        let state = self.state.clone();
        let shutdown = self.shutdown.clone();
        let sandbox = self.sandbox.clone();
        let spawned = std::thread::Builder::new()
            .name("orphaned".into())
            .spawn(move || {
                std::thread::sleep(SHUTDOWN_GRACE);
                if state.0.lock().unwrap_or_else(|e| e.into_inner()).containers.is_empty() {
                    log::warn!(
                        "no Shutdown {SHUTDOWN_GRACE:?} after the last container of pod sandbox {sandbox} was deleted; exiting"
                    );
                    shutdown.signal();
                }
            });
        if let Err(err) = spawned {
            log::warn!("cannot watch for a missing Shutdown: {err}");
        }
    }

    /// The shim reaps its children (containerd-shim's reaper); exits arrive here by pid.
    fn watch_exits(&self) {
        let subscription = monitor_subscribe(Topic::Pid).expect("the exit monitor is available");
        let state = self.state.clone();
        let events = self.events.clone();
        std::thread::Builder::new()
            .name("exits".into())
            .spawn(move || {
                while let Ok(ExitEvent { subject, exit_code }) = subscription.rx.recv() {
                    let Subject::Pid(pid) = subject else { continue };
                    let exit = Exit {
                        code: exit_code as u32,
                        at: SystemTime::now(),
                    };
                    let (lock, condvar) = &*state;
                    let event = lock
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .process_exited(pid as u32, exit);
                    if let Some((oom, exit)) = event {
                        condvar.notify_all();
                        if let Some(oom) = oom {
                            events.publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(oom));
                        }
                        events.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(exit));
                    }
                }
            })
            .expect("cannot start the exit watcher");
    }

    /// Creates the container of `req` and its process; no lock is held.
    fn create_container(&self, req: &api::CreateTaskRequest) -> Result<Container, String> {
        if req.terminal {
            return Err("bulwark runs WebAssembly without a terminal: tty is not supported (set tty: false)".into());
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec = ContainerSpec::load(&bundle).map_err(|e| e.to_string())?;
        let config = match config_path_from_options(req.options.as_ref()) {
            Ok(Some(path)) => NodeConfig::load_required(&path),
            Ok(None) => NodeConfig::load(Path::new(DEFAULT_CONFIG_PATH)),
            Err(error) => return Err(error.to_string()),
        }
        .map_err(|e| e.to_string())?;
        mount_rootfs(&bundle, &req.rootfs)?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
        };
        let created = if spec.is_sandbox {
            create_sandbox(&bundle, &spec)
        } else {
            match crate::container::prepare(&bundle, &spec, &config, &self.content) {
                Ok(Prepared::Wasm(wasm)) => create_wasm(wasm, &spec, &stdio),
                Ok(Prepared::Native) => create_native(&req.id, &bundle, &spec, &stdio),
                Err(message) => Err(message),
            }
        };
        match created {
            Ok((kind, pid, cgroup)) => Ok(Container {
                oom_start: cgroup
                    .as_ref()
                    .filter(|_| matches!(kind, Kind::Wasm { .. }))
                    .map(Cgroup::oom_count),
                bundle,
                kind,
                status: Phase::Created,
                pid,
                exit: None,
                cgroup,
                _output_readers: hold_output_fifos(&stdio),
                stdio,
            }),
            Err(message) => {
                remove_files(&bundle);
                unmount_rootfs(&bundle);
                Err(message)
            }
        }
    }

    /// Waits until container `id` has exited, at most `timeout` (`None`: forever).
    fn wait_for_exit(
        &self,
        id: &str,
        timeout: Option<Duration>,
    ) -> Result<Option<Exit>, TtrpcError> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let (_, condvar) = &*self.state;
        let mut state = self.lock();
        loop {
            match state.containers.get(id) {
                None => return Err(not_found(id)),
                Some(Container {
                    exit: Some(exit), ..
                }) => return Ok(Some(*exit)),
                Some(_) => {}
            }
            state = match deadline {
                None => condvar.wait(state).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    condvar
                        .wait_timeout(state, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    /// runc start of a native container, outside the lock.
    fn start_native(&self, id: &str, native: NativeContainer) -> Result<u32, TtrpcError> {
        let started = native.start();
        let mut state = self.lock();
        let container = state.get_mut(id)?;
        match started {
            Ok(()) => {
                // The init may already have run to its end (the watcher saw it).
                if container.status == Phase::Starting {
                    container.status = Phase::Running;
                }
                Ok(container.pid)
            }
            Err(err) => {
                if container.status == Phase::Starting {
                    container.status = Phase::Created;
                }
                Err(error(Code::INTERNAL, err.to_string()))
            }
        }
    }
}

type Created = (Kind, u32, Option<Cgroup>);

/// The pod sandbox: its holder process in the pod's namespaces and the sandbox's cgroup.
fn create_sandbox(bundle: &Path, spec: &ContainerSpec) -> Result<Created, String> {
    let pid = crate::sandbox::start(bundle, spec)?;
    let placed = crate::container::create_cgroup(spec).and_then(|cgroup| {
        if let Some(cgroup) = &cgroup {
            cgroup.place(pid).map_err(|e| e.to_string())?;
        }
        ProcessLimits::of(spec).apply(pid)?;
        Ok(cgroup)
    });
    match placed {
        Ok(cgroup) => Ok((Kind::Sandbox, pid, cgroup)),
        Err(message) => {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            Err(message)
        }
    }
}

/// A Wasm container: its workload process, started and waiting at its gate.
fn create_wasm(
    wasm: Box<crate::container::WasmContainer>,
    spec: &ContainerSpec,
    stdio: &StdioPaths,
) -> Result<Created, String> {
    let wasm = *wasm;
    let started = open_stdio(stdio).and_then(|stdio| {
        crate::workload::start_gated(
            wasm.launch,
            stdio,
            wasm.cgroup.as_ref(),
            &ProcessLimits::of(spec),
        )
    });
    match started {
        Ok(gated) => {
            let pid = gated.pid;
            Ok((Kind::Wasm { gate: Some(gated) }, pid, wasm.cgroup))
        }
        Err(message) => {
            if let Some(cgroup) = &wasm.cgroup
                && let Err(err) = cgroup.remove()
            {
                log::warn!("{err}");
            }
            Err(message)
        }
    }
}

/// A native container on a node that allows them: created by runc now, so that its pid is
/// known at Create, as containerd expects.
fn create_native(
    id: &str,
    bundle: &Path,
    spec: &ContainerSpec,
    stdio: &StdioPaths,
) -> Result<Created, String> {
    let [stdin, stdout, stderr] = open_stdio(stdio)?;
    let (container, init_pid) = NativeContainer::create(
        id,
        bundle,
        NativeStdio {
            stdin,
            stdout,
            stderr,
        },
    )
    .map_err(|e| e.to_string())?;
    let cgroup = spec
        .cgroups_path
        .as_deref()
        .and_then(|path| Cgroup::locate(path).ok());
    log::info!("native container {id} created by runc, pid {init_pid}");
    Ok((Kind::Native(container), init_pid, cgroup))
}

fn exit_event(id: &str, pid: u32, exit: Exit) -> TaskExit {
    let mut event = TaskExit::new();
    event.container_id = id.to_owned();
    event.id = id.to_owned();
    event.pid = pid;
    event.exit_status = exit.code;
    event.exited_at = MessageField::some(timestamp(exit.at));
    event
}

/// Opens the FIFOs containerd created for the container's stdio (`/dev/null` if none).
fn open_stdio(paths: &StdioPaths) -> Result<[Stdio; 3], String> {
    Ok([
        open_fifo(&paths.stdin, false)?,
        open_fifo(&paths.stdout, true)?,
        open_fifo(&paths.stderr, true)?,
    ])
}

fn open_fifo(path: &str, write: bool) -> Result<Stdio, String> {
    if path.is_empty() {
        return Ok(Stdio::null());
    }
    let file = if write {
        OpenOptions::new().write(true).open(path)
    } else {
        // Opening a FIFO for reading blocks until a writer appears; do not wait for one.
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .inspect(|file| {
                use std::os::fd::AsRawFd;
                // SAFETY: fcntl on a descriptor we own.
                unsafe {
                    let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
                    libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
                }
            })
    };
    file.map(Stdio::from)
        .map_err(|e| format!("cannot open {path}: {e}"))
}

/// Opens (and the container keeps) a read end of its stdout and stderr FIFOs, as runc's
/// shim does: while containerd restarts nobody else reads them, and a FIFO without a reader
/// fails the container's writes with EPIPE. Held, the output waits in the FIFO until
/// containerd is back and drains it into the log.
fn hold_output_fifos(stdio: &StdioPaths) -> Vec<std::fs::File> {
    [&stdio.stdout, &stdio.stderr]
        .into_iter()
        .filter(|path| !path.is_empty())
        .filter_map(|path| {
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(path)
                .inspect_err(|err| log::warn!("cannot hold {path} open: {err}"))
                .ok()
        })
        .collect()
}

/// The files the shim wrote into a bundle.
fn remove_files(bundle: &Path) {
    for file in [PLAN_FILE, ARTIFACT_MODULE_FILE] {
        let _ = std::fs::remove_file(bundle.join(file));
    }
}

fn mount_rootfs(
    bundle: &Path,
    mounts: &[containerd_shim::protos::types::mount::Mount],
) -> Result<(), String> {
    if mounts.is_empty() {
        return Ok(());
    }
    let target = bundle.join("rootfs");
    std::fs::create_dir_all(&target)
        .map_err(|e| format!("cannot create {}: {e}", target.display()))?;
    for mount in mounts {
        containerd_shim::mount::mount_rootfs(
            Some(mount.type_.as_str()).filter(|t| !t.is_empty()),
            Some(mount.source.as_str()).filter(|s| !s.is_empty()),
            &mount.options,
            &target,
        )
        .map_err(|e| format!("cannot mount the rootfs: {e}"))?;
    }
    Ok(())
}

fn unmount_rootfs(bundle: &Path) {
    let target = bundle.join("rootfs");
    if let Some(target) = target.to_str()
        && let Err(err) = containerd_shim::mount::umount_recursive(Some(target), libc::MNT_DETACH)
    {
        log::warn!("cannot unmount {target}: {err}");
    }
}

/// kill(2) of a container's process; a process that is already gone is not an error.
fn signal(id: &str, pid: u32, signal: u32) -> Result<(), TtrpcError> {
    // SAFETY: kill(2) on our own child's pid; it is not reaped until it exits.
    if unsafe { libc::kill(pid as libc::pid_t, signal as libc::c_int) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ESRCH) {
            return Err(error(Code::INTERNAL, format!("cannot signal {id}: {err}")));
        }
    }
    Ok(())
}

impl containerd_shim::Task for TaskService {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        if self.lock().containers.contains_key(&req.id) {
            return Err(error(
                Code::ALREADY_EXISTS,
                format!("container {} already exists", req.id),
            ));
        }
        let container = self.create_container(&req).map_err(|message| {
            log::warn!("refused container {}: {message}", req.id);
            error(Code::INVALID_ARGUMENT, message)
        })?;
        let pid = container.pid;
        let exited = self.lock().insert(&req.id, container);
        let mut event = TaskCreate::new();
        event.container_id = req.id.clone();
        event.bundle = req.bundle.clone();
        event.pid = pid;
        self.publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(event));
        if let Some(exit) = exited {
            self.state.1.notify_all();
            self.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(exit));
        }
        let mut response = api::CreateTaskResponse::new();
        response.pid = pid;
        Ok(response)
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        if !req.exec_id.is_empty() {
            return Err(error(
                Code::UNIMPLEMENTED,
                "exec is not supported by Bulwark: a Wasm container has no shell to run commands in",
            ));
        }
        let mut state = self.lock();
        let container = state.get_mut(&req.id)?;
        if container.status != Phase::Created {
            return Err(error(
                Code::FAILED_PRECONDITION,
                format!("container {} was already started", req.id),
            ));
        }
        let pid = match &mut container.kind {
            Kind::Sandbox => {
                container.status = Phase::Running;
                container.pid
            }
            Kind::Wasm { gate } => {
                // A pipe write of one byte: quick enough to do under the lock, which keeps
                // the workload's exit from arriving before its container is Running.
                let gate = gate.take().ok_or_else(|| {
                    error(
                        Code::FAILED_PRECONDITION,
                        "the workload was already released",
                    )
                })?;
                gate.release().map_err(|e| {
                    error(
                        Code::INTERNAL,
                        format!(
                            "the workload process of {} is gone before it started: {e}",
                            req.id
                        ),
                    )
                })?;
                container.status = Phase::Running;
                container.pid
            }
            Kind::Native(native) => {
                let native = native.clone();
                container.status = Phase::Starting;
                drop(state);
                self.start_native(&req.id, native)?
            }
        };
        let mut event = TaskStart::new();
        event.container_id = req.id.clone();
        event.pid = pid;
        self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(event));
        let mut response = api::StartResponse::new();
        response.pid = pid;
        Ok(response)
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<Empty> {
        let state = self.lock();
        let container = state.get(&req.id)?;
        if container.status != Phase::Stopped {
            signal(&req.id, container.pid, req.signal)?;
        }
        Ok(Empty::new())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let exit = self
            .wait_for_exit(&req.id, None)?
            .expect("waiting without a timeout ends with an exit");
        let mut response = api::WaitResponse::new();
        response.exit_status = exit.code;
        response.exited_at = MessageField::some(timestamp(exit.at));
        Ok(response)
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let state = self.lock();
        let container = state.get(&req.id)?;
        match container.status {
            Phase::Running | Phase::Starting => {
                return Err(error(
                    Code::FAILED_PRECONDITION,
                    format!("container {} is still running", req.id),
                ));
            }
            // Created but never started: its process waits; end it first.
            Phase::Created => {
                signal(&req.id, container.pid, libc::SIGKILL as u32)?;
                drop(state);
                if self.wait_for_exit(&req.id, Some(DELETE_WAIT))?.is_none() {
                    return Err(error(
                        Code::DEADLINE_EXCEEDED,
                        format!("the process of {} did not exit after SIGKILL", req.id),
                    ));
                }
            }
            Phase::Stopped => drop(state),
        }
        let mut state = self.lock();
        let container = state
            .containers
            .remove(&req.id)
            .ok_or_else(|| not_found(&req.id))?;
        let remaining = state.containers.len();
        drop(state);
        if let Kind::Native(native) = &container.kind
            && let Err(err) = native.delete()
        {
            log::warn!("{err}");
        }
        if let (false, Some(cgroup)) =
            (matches!(container.kind, Kind::Native(_)), &container.cgroup)
            && let Err(err) = cgroup.remove()
        {
            log::warn!("{err}");
        }
        remove_files(&container.bundle);
        unmount_rootfs(&container.bundle);
        let exit = container.exit.unwrap_or(Exit {
            code: 0,
            at: SystemTime::now(),
        });
        let mut event = TaskDelete::new();
        event.container_id = req.id.clone();
        event.id = req.id.clone();
        event.pid = container.pid;
        event.exit_status = exit.code;
        event.exited_at = MessageField::some(timestamp(exit.at));
        self.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(event));
        log::info!("deleted {}; {remaining} containers left", req.id);
        if remaining == 0 {
            self.exit_unless_shut_down();
        }
        let mut response = api::DeleteResponse::new();
        response.pid = container.pid;
        response.exit_status = exit.code;
        response.exited_at = MessageField::some(timestamp(exit.at));
        Ok(response)
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let state = self.lock();
        let container = state.get(&req.id)?;
        let mut response = api::StateResponse::new();
        response.id = req.id.clone();
        response.bundle = container.bundle.display().to_string();
        response.pid = container.pid;
        response.status = match container.status {
            Phase::Created | Phase::Starting => api::Status::CREATED,
            Phase::Running => api::Status::RUNNING,
            Phase::Stopped => api::Status::STOPPED,
        }
        .into();
        response.stdin = container.stdio.stdin.clone();
        response.stdout = container.stdio.stdout.clone();
        response.stderr = container.stdio.stderr.clone();
        if let Some(exit) = container.exit {
            response.exit_status = exit.code;
            response.exited_at = MessageField::some(timestamp(exit.at));
        }
        Ok(response)
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let state = self.lock();
        let container = state.get(&req.id)?;
        let mut response = api::PidsResponse::new();
        if container.status != Phase::Stopped && container.pid != 0 {
            let mut info = containerd_shim::protos::types::task::ProcessInfo::new();
            info.pid = container.pid;
            response.processes.push(info);
        }
        Ok(response)
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let cgroup = self.lock().get(&req.id)?.cgroup.clone();
        let usage = cgroup.map(|cgroup| cgroup.usage()).unwrap_or_default();
        let any =
            crate::stats::metrics(&usage).map_err(|e| error(Code::INTERNAL, e.to_string()))?;
        let mut response = api::StatsResponse::new();
        response.stats = MessageField::some(any);
        Ok(response)
    }

    fn exec(&self, _ctx: &TtrpcContext, _req: api::ExecProcessRequest) -> TtrpcResult<Empty> {
        Err(error(
            Code::UNIMPLEMENTED,
            "exec is not supported by Bulwark: a Wasm container has no shell or processes to run commands in",
        ))
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, _req: api::ResizePtyRequest) -> TtrpcResult<Empty> {
        Err(error(
            Code::UNIMPLEMENTED,
            "tty is not supported for Wasm containers",
        ))
    }

    fn close_io(&self, _ctx: &TtrpcContext, _req: api::CloseIORequest) -> TtrpcResult<Empty> {
        Ok(Empty::new())
    }

    fn update(&self, _ctx: &TtrpcContext, _req: api::UpdateTaskRequest) -> TtrpcResult<Empty> {
        Err(error(
            Code::UNIMPLEMENTED,
            "updating a running Wasm container's resources is not supported: recreate the pod",
        ))
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let state = self.lock();
        let mut response = api::ConnectResponse::new();
        response.shim_pid = std::process::id();
        response.task_pid = state.containers.get(&req.id).map_or(0, |c| c.pid);
        Ok(response)
    }

    fn shutdown(&self, _ctx: &TtrpcContext, req: api::ShutdownRequest) -> TtrpcResult<Empty> {
        let remaining = self.lock().containers.len();
        if remaining == 0 {
            log::info!("shutdown after {}: no containers left, exiting", req.id);
            self.shutdown.signal();
        } else {
            log::info!(
                "shutdown after {} ignored: {remaining} containers left",
                req.id
            );
        }
        Ok(Empty::new())
    }
}
