//! The containerd task service: containerd's requests translated into containers that
//! are either the pod sandbox (no process: there is nothing to pause for) or a Wasm
//! workload process, and their exits reported back as events.
//!
//! One shim process serves a whole pod: `start` groups containers by their CRI sandbox id.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};

use containerd_shim::api::{self, Empty};
use containerd_shim::monitor::{ExitEvent, Subject, Topic, monitor_subscribe};
use containerd_shim::protos::events::task::{TaskCreate, TaskDelete, TaskExit, TaskStart};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{
    Config, DeleteResponse, ExitSignal, Flags, StartOpts, TtrpcContext, TtrpcResult,
};

use bulwark_runtime::cache::DEFAULT_CACHE_DIR;
use bulwark_runtime::config::{DEFAULT_CONFIG_PATH, NodeConfig};
use bulwark_runtime::engine::detect_kind;
use bulwark_runtime::policy::{Access, Policy, Request};
use bulwark_runtime::run::Preopen;

use crate::cgroup::{Cgroup, Resources};
use crate::content::{IMAGE_NAME, fetch_wasm_layer};
use crate::native::{NativeContainer, NativeStdio};
use crate::options::config_path_from_options;
use crate::spec::{ContainerSpec, SpecError};
use crate::workload::{self, LOCKDOWN_PROBE_ENV, Plan, WORKLOAD_ARG};

/// Overrides the node cache directory (tests use a private one).
pub const CACHE_DIR_ENV: &str = "BULWARK_CACHE_DIR";

/// The shim: containerd's `start`/`delete` actions and the daemon's task service.
pub struct BulwarkShim {
    exit: Arc<ExitSignal>,
    namespace: String,
    containerd_address: String,
    socket: String,
}

impl containerd_shim::Shim for BulwarkShim {
    type T = TaskService;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        BulwarkShim {
            exit: Arc::new(ExitSignal::default()),
            namespace: args.namespace.clone(),
            containerd_address: args.address.clone(),
            socket: args.socket.clone(),
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
        unmount_rootfs(&bundle);
        let mut response = DeleteResponse::new();
        response.set_exit_status(137);
        response.exited_at = MessageField::some(now());
        Ok(response)
    }

    fn wait(&mut self) {
        self.exit.wait();
        // containerd-shim removes the socket by reading the `address` file in the bundle,
        // which containerd may already have deleted with the sandbox: remove it here.
        if let Some(path) = self.socket.strip_prefix("unix://") {
            let _ = std::fs::remove_file(path);
        }
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        TaskService::new(
            self.namespace.clone(),
            self.containerd_address.clone(),
            publisher,
            self.exit.clone(),
        )
    }
}

/// Where a container is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Created,
    Running,
    Stopped,
}

#[derive(Debug, Clone, Copy)]
struct Exit {
    code: u32,
    at: std::time::SystemTime,
}

enum Kind {
    /// The pod sandbox: no process, alive until killed.
    Sandbox,
    /// A Wasm workload, run by a workload process.
    Wasm {
        plan_path: PathBuf,
        cgroup: Option<Cgroup>,
        stdio: StdioPaths,
    },
    /// A native container (where the node allows them), run by runc; its init process
    /// exists from Create on.
    Native {
        container: NativeContainer,
        init_pid: u32,
        /// Its cgroup, which runc manages, for Stats.
        cgroup: Option<Cgroup>,
        stdio: StdioPaths,
    },
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
    pid: u32,
    exit: Option<Exit>,
}

impl Container {
    /// Records the exit and returns the event that announces it.
    fn stopped(&mut self, id: &str, exit: Exit) -> TaskExit {
        self.status = Phase::Stopped;
        self.exit = Some(exit);
        exit_event(id, self.pid, exit)
    }
}

/// The containers of this shim. `start` holds the lock from spawning a workload until its
/// pid is recorded, so the exit watcher always finds the container an exit belongs to.
struct State {
    containers: HashMap<String, Container>,
}

impl State {
    fn get(&self, id: &str) -> Result<&Container, containerd_shim::protos::ttrpc::Error> {
        self.containers.get(id).ok_or_else(|| not_found(id))
    }

    fn get_mut(
        &mut self,
        id: &str,
    ) -> Result<&mut Container, containerd_shim::protos::ttrpc::Error> {
        self.containers.get_mut(id).ok_or_else(|| not_found(id))
    }
}

fn not_found(id: &str) -> containerd_shim::protos::ttrpc::Error {
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
    namespace: String,
    containerd_address: String,
    events: Arc<Events>,
    state: Arc<(Mutex<State>, Condvar)>,
    shutdown: Arc<ExitSignal>,
}

fn error(code: Code, message: impl Into<String>) -> containerd_shim::protos::ttrpc::Error {
    let mut status = containerd_shim::protos::ttrpc::Status::new();
    status.set_code(code);
    status.set_message(message.into());
    containerd_shim::protos::ttrpc::Error::RpcStatus(status)
}

fn now() -> Timestamp {
    timestamp(std::time::SystemTime::now())
}

fn timestamp(at: std::time::SystemTime) -> Timestamp {
    let since = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let mut ts = Timestamp::new();
    ts.seconds = since.as_secs() as i64;
    ts.nanos = since.subsec_nanos() as i32;
    ts
}

impl TaskService {
    fn new(
        namespace: String,
        containerd_address: String,
        publisher: RemotePublisher,
        shutdown: Arc<ExitSignal>,
    ) -> TaskService {
        let state = Arc::new((
            Mutex::new(State {
                containers: HashMap::new(),
            }),
            Condvar::new(),
        ));
        let service = TaskService {
            events: Arc::new(Events {
                namespace: namespace.clone(),
                publisher: Mutex::new(publisher),
            }),
            namespace,
            containerd_address,
            state,
            shutdown,
        };
        service.watch_exits();
        service
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        self.events.publish(topic, event);
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
                        at: std::time::SystemTime::now(),
                    };
                    let (lock, condvar) = &*state;
                    let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
                    let found = state.containers.iter_mut().find(|(_, c)| {
                        c.pid == pid as u32
                            && c.status != Phase::Stopped
                            && !matches!(c.kind, Kind::Sandbox)
                    });
                    let Some((id, container)) = found else {
                        log::debug!("exit of pid {pid}, which runs no container");
                        continue;
                    };
                    let event = container.stopped(id, exit);
                    condvar.notify_all();
                    drop(state);
                    events.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(event));
                }
            })
            .expect("cannot start the exit watcher");
    }

    fn create_container(&self, req: &api::CreateTaskRequest) -> Result<Container, String> {
        if req.terminal {
            return Err("bulwark runs WebAssembly without a terminal: tty is not supported (set tty: false)".into());
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec = ContainerSpec::load(&bundle).map_err(|e| e.to_string())?;
        let config_path = config_path_from_options(req.options.as_ref())
            .map_err(|e| e.to_string())?
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
        let config = NodeConfig::load(&config_path).map_err(|e| e.to_string())?;
        mount_rootfs(&bundle, &req.rootfs)?;
        let result = if spec.is_sandbox {
            Ok(Kind::Sandbox)
        } else {
            self.prepare_wasm(&bundle, &spec, &config, req)
        };
        match result {
            Ok(kind) => Ok(Container {
                bundle,
                pid: match &kind {
                    Kind::Native { init_pid, .. } => *init_pid,
                    _ => 0,
                },
                kind,
                status: Phase::Created,
                exit: None,
            }),
            Err(message) => {
                unmount_rootfs(&bundle);
                Err(message)
            }
        }
    }

    fn prepare_wasm(
        &self,
        bundle: &Path,
        spec: &ContainerSpec,
        config: &NodeConfig,
        req: &api::CreateTaskRequest,
    ) -> Result<Kind, String> {
        let annotations = spec
            .annotations
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()));
        let request = Request::from_annotations(annotations).map_err(|e| e.to_string())?;
        let mut policy = Policy::resolve(config, &request).map_err(|e| e.to_string())?;
        if let Some(limit) = spec.memory_limit.filter(|limit| *limit > 0) {
            policy.bound_by_container_memory(limit as u64);
        }
        let rootfs = bundle.join("rootfs");
        let entrypoint = spec.args.first().ok_or(
            "the container has no entrypoint: set command to the wasm file, e.g. [\"/app.wasm\"]",
        )?;
        let module = self.find_module(bundle, spec, entrypoint).and_then(|path| {
            let head = read_head(&path).map_err(|e| format!("entrypoint {entrypoint}: {e}"))?;
            Ok((path, head))
        });
        let is_wasm = module
            .as_ref()
            .is_ok_and(|(_, head)| detect_kind(head).is_ok());
        if !is_wasm && policy.allow_native {
            return Self::prepare_native(bundle, spec, req);
        }
        let (module, head) = module?;
        check_module(&head, entrypoint)?;
        let mut preopens = Vec::new();
        for grant in &policy.dirs {
            let (host, read_only) = spec
                .host_path(&rootfs, &grant.path)
                .map_err(|SpecError(e)| format!("bulwark.dev/dirs: {}: {e}", grant.path))?;
            if !host.is_dir() {
                return Err(format!(
                    "bulwark.dev/dirs: {} is not a directory in the container",
                    grant.path
                ));
            }
            if read_only && grant.access == Access::ReadWrite {
                return Err(format!(
                    "bulwark.dev/dirs: {}:rw asks to write to a volume mounted read-only",
                    grant.path
                ));
            }
            preopens.push(Preopen {
                host,
                guest: grant.path.clone(),
                access: grant.access,
            });
        }
        let plan = Plan {
            module,
            args: spec.args.clone(),
            env: policy.filter_env(spec.env.clone()),
            preopens,
            cache_dir: std::env::var_os(CACHE_DIR_ENV)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_DIR)),
            termination_log: spec.termination_log(),
            uid: spec.uid,
            gid: spec.gid,
            additional_gids: spec.additional_gids.clone(),
            network_namespace: spec.network_namespace.clone(),
            policy,
        };
        let plan_path = bundle.join("bulwark-plan.json");
        plan.write(&plan_path).map_err(|e| format!("{e:#}"))?;
        let cgroup = match &spec.cgroups_path {
            Some(path) => Some(
                Cgroup::create(
                    path,
                    &Resources {
                        memory_limit: spec.memory_limit,
                        cpu: spec.cpu,
                        pids_limit: spec.pids_limit,
                    },
                )
                .map_err(|e| e.to_string())?,
            ),
            None => None,
        };
        Ok(Kind::Wasm {
            plan_path,
            cgroup,
            stdio: StdioPaths {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
            },
        })
    }

    /// The module file the entrypoint names: in the rootfs, or for a Wasm artifact, its
    /// layer from containerd's content store.
    fn find_module(
        &self,
        bundle: &Path,
        spec: &ContainerSpec,
        entrypoint: &str,
    ) -> Result<PathBuf, String> {
        let in_rootfs = match spec.host_path(&bundle.join("rootfs"), entrypoint) {
            Ok((path, _)) if path.is_file() => return Ok(path),
            other => other,
        };
        // No such file in a rootfs: the image may be a Wasm artifact, whose module is a
        // layer in containerd's content store rather than a file.
        let not_found = || {
            log::info!("entrypoint {entrypoint}: {in_rootfs:?}");
            format!(
                "entrypoint {entrypoint}: no such file in the container image (the entrypoint names the .wasm file to run, e.g. /app.wasm)"
            )
        };
        let image = spec.annotations.get(IMAGE_NAME).ok_or_else(not_found)?;
        let dest = bundle.join("bulwark-module.wasm");
        if !fetch_wasm_layer(&self.containerd_address, &self.namespace, image, &dest)? {
            return Err(not_found());
        }
        Ok(dest)
    }

    /// A native container on a node that allows them: created by runc now, so that its
    /// pid is known at Create, as containerd expects.
    fn prepare_native(
        bundle: &Path,
        spec: &ContainerSpec,
        req: &api::CreateTaskRequest,
    ) -> Result<Kind, String> {
        let stdio = NativeStdio {
            stdin: open_stdio(&req.stdin, false)?,
            stdout: open_stdio(&req.stdout, true)?,
            stderr: open_stdio(&req.stderr, true)?,
        };
        let (container, init_pid) =
            NativeContainer::create(&req.id, bundle, stdio).map_err(|e| e.to_string())?;
        let cgroup = spec
            .cgroups_path
            .as_deref()
            .and_then(|path| Cgroup::locate(path).ok());
        log::info!(
            "native container {} created by runc, pid {init_pid}",
            req.id
        );
        Ok(Kind::Native {
            container,
            init_pid,
            cgroup,
            stdio: StdioPaths {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
            },
        })
    }

    fn spawn_workload(
        plan_path: &Path,
        cgroup: Option<&Cgroup>,
        stdio: &StdioPaths,
    ) -> Result<u32, String> {
        let exe =
            std::env::current_exe().map_err(|e| format!("cannot find the shim binary: {e}"))?;
        let mut command = Command::new(exe);
        command
            .arg(WORKLOAD_ARG)
            .arg(plan_path)
            .env_clear()
            .current_dir("/")
            .stdin(open_stdio(&stdio.stdin, false)?)
            .stdout(open_stdio(&stdio.stdout, true)?)
            .stderr(open_stdio(&stdio.stderr, true)?);
        for name in [CACHE_DIR_ENV, LOCKDOWN_PROBE_ENV, "RUST_LOG"] {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        // The workload waits at its gate until it is in its cgroup (or scope), so it never
        // runs guest code outside it. Only async-signal-safe calls happen in the child.
        let (gate_reader, gate_writer) =
            workload::gate_pipe().map_err(|e| format!("cannot make the workload's gate: {e}"))?;
        workload::attach_gate(&mut command, &gate_reader);
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start the workload process: {e}"))?;
        drop(gate_reader);
        let pid = child.id();
        let placed = match cgroup {
            Some(cgroup) => cgroup.place(pid).map_err(|e| e.to_string()),
            None => Ok(()),
        };
        let released = placed.and_then(|()| {
            (&gate_writer)
                .write_all(b"1")
                .map_err(|e| format!("cannot release the workload process: {e}"))
        });
        if let Err(message) = released {
            // Closing the gate unreleased makes the workload exit without running; kill it
            // anyway so Start fails with nothing left running.
            let _ = child.kill();
            return Err(message);
        }
        Ok(pid)
    }

    fn wait_for_exit(&self, id: &str) -> Result<Exit, containerd_shim::protos::ttrpc::Error> {
        let (lock, condvar) = &*self.state;
        let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match state.containers.get(id) {
                None => return Err(not_found(id)),
                Some(Container {
                    exit: Some(exit), ..
                }) => return Ok(*exit),
                Some(_) => state = condvar.wait(state).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }
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

/// Opens a FIFO containerd created for the container's stdio (`/dev/null` if none).
fn open_stdio(path: &str, write: bool) -> Result<Stdio, String> {
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

/// The first bytes of a module file: enough to tell Wasm (a module or a component) from
/// anything else.
fn read_head(module: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut head = Vec::with_capacity(8);
    File::open(module)?.take(8).read_to_end(&mut head)?;
    Ok(head)
}

/// Refuses entrypoints that are not WebAssembly (on a node that allows no native
/// containers), with a message that says what they are.
fn check_module(head: &[u8], entrypoint: &str) -> Result<(), String> {
    match detect_kind(head) {
        Ok(_) => Ok(()),
        Err(not_wasm) if head.starts_with(b"\x7fELF") || head.starts_with(b"#!") => Err(format!(
            "entrypoint {entrypoint} is a native executable, not WebAssembly: this node runs only Wasm (capabilities.allow_native = false; {not_wasm})"
        )),
        Err(not_wasm) => Err(format!("entrypoint {entrypoint}: {not_wasm}")),
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
        let pid = std::process::id();
        self.lock().containers.insert(req.id.clone(), container);
        let mut event = TaskCreate::new();
        event.container_id = req.id.clone();
        event.bundle = req.bundle.clone();
        event.pid = pid;
        self.publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(event));
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
        let pid = match &container.kind {
            Kind::Sandbox => std::process::id(),
            Kind::Wasm {
                plan_path,
                cgroup,
                stdio,
            } => TaskService::spawn_workload(plan_path, cgroup.as_ref(), stdio)
                .map_err(|message| error(Code::INTERNAL, message))?,
            Kind::Native {
                container: native,
                init_pid,
                ..
            } => {
                native
                    .start()
                    .map_err(|e| error(Code::INTERNAL, e.to_string()))?;
                *init_pid
            }
        };
        container.pid = pid;
        container.status = Phase::Running;
        drop(state);
        let mut event = TaskStart::new();
        event.container_id = req.id.clone();
        event.pid = pid;
        self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(event));
        let mut response = api::StartResponse::new();
        response.pid = pid;
        Ok(response)
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<Empty> {
        let mut state = self.lock();
        let container = state.get_mut(&req.id)?;
        match (&container.kind, container.status) {
            (_, Phase::Stopped) => {}
            (Kind::Wasm { .. }, Phase::Running) | (Kind::Native { .. }, _) => {
                // SAFETY: kill(2) on our own child's pid; it is not reaped until it exits.
                if unsafe { libc::kill(container.pid as i32, req.signal as i32) } != 0 {
                    let err = std::io::Error::last_os_error();
                    if err.raw_os_error() != Some(libc::ESRCH) {
                        return Err(error(
                            Code::INTERNAL,
                            format!("cannot signal {}: {err}", req.id),
                        ));
                    }
                }
            }
            // The sandbox has no process; a never-started container has none yet.
            (_, _) => {
                let code = match req.signal as i32 {
                    libc::SIGTERM | libc::SIGINT if matches!(container.kind, Kind::Sandbox) => 0,
                    signal => 128 + signal as u32,
                };
                let exit = Exit {
                    code,
                    at: std::time::SystemTime::now(),
                };
                let event = container.stopped(&req.id, exit);
                self.state.1.notify_all();
                drop(state);
                self.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(event));
            }
        }
        Ok(Empty::new())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let exit = self.wait_for_exit(&req.id)?;
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
        let mut state = self.lock();
        let container = state.get(&req.id)?;
        if container.status == Phase::Running {
            return Err(error(
                Code::FAILED_PRECONDITION,
                format!("container {} is still running", req.id),
            ));
        }
        let container = state.containers.remove(&req.id).expect("just found");
        let remaining = state.containers.len();
        drop(state);
        if let Kind::Wasm {
            plan_path, cgroup, ..
        } = &container.kind
        {
            let _ = std::fs::remove_file(plan_path);
            let _ = std::fs::remove_file(container.bundle.join("bulwark-module.wasm"));
            if let Some(cgroup) = cgroup
                && let Err(err) = cgroup.remove()
            {
                log::warn!("{err}");
            }
        }
        if let Kind::Native {
            container: native, ..
        } = &container.kind
            && let Err(err) = native.delete()
        {
            log::warn!("{err}");
        }
        unmount_rootfs(&container.bundle);
        let exit = container.exit.unwrap_or(Exit {
            code: 0,
            at: std::time::SystemTime::now(),
        });
        let mut event = TaskDelete::new();
        event.container_id = req.id.clone();
        event.id = req.id.clone();
        event.pid = container.pid;
        event.exit_status = exit.code;
        event.exited_at = MessageField::some(timestamp(exit.at));
        self.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(event));
        log::info!("deleted {}; {remaining} containers left", req.id);
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
            Phase::Created => api::Status::CREATED,
            Phase::Running => api::Status::RUNNING,
            Phase::Stopped => api::Status::STOPPED,
        }
        .into();
        if let Kind::Wasm { stdio, .. } | Kind::Native { stdio, .. } = &container.kind {
            response.stdin = stdio.stdin.clone();
            response.stdout = stdio.stdout.clone();
            response.stderr = stdio.stderr.clone();
        }
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
        if container.status == Phase::Running && container.pid != 0 {
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
        let state = self.lock();
        let container = state.get(&req.id)?;
        let usage = match &container.kind {
            Kind::Wasm {
                cgroup: Some(cgroup),
                ..
            }
            | Kind::Native {
                cgroup: Some(cgroup),
                ..
            } => cgroup.usage(),
            _ => Default::default(),
        };
        drop(state);
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

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<Empty> {
        if self.lock().containers.is_empty() {
            self.shutdown.signal();
        }
        Ok(Empty::new())
    }
}
