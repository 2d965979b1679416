//! The ttrpc task service of one shim process.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use containerd_shim::api::{self, Empty};
use containerd_shim::monitor::{ExitEvent, Subject, Topic, monitor_subscribe};
use containerd_shim::protos::events::task::{TaskCreate, TaskDelete, TaskExit, TaskStart};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{ExitSignal, TtrpcContext, TtrpcResult};

use crate::bundle::{ContentStore, remove_files, unmount_rootfs};
use crate::container::CreateError;
use crate::container::native::NativeContainer;

use super::state::{Container, Exit, Kind, Phase, State};

/// How long Delete waits for a created-but-never-started container's process to go.
const DELETE_WAIT: Duration = Duration::from_secs(10);
/// How long after its last container's delete the shim waits for containerd's Shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

pub(super) type TtrpcError = containerd_shim::protos::ttrpc::Error;

pub(super) fn not_found(id: &str) -> TtrpcError {
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
    pub(super) content: ContentStore,
    events: Arc<Events>,
    pub(super) state: Arc<(Mutex<State>, Condvar)>,
    shutdown: Arc<ExitSignal>,
    /// The shim's own id: its pod's sandbox, the first container it was started for.
    sandbox: String,
}

pub(super) fn error(code: Code, message: impl Into<String>) -> TtrpcError {
    let mut status = containerd_shim::protos::ttrpc::Status::new();
    status.set_code(code);
    status.set_message(message.into());
    containerd_shim::protos::ttrpc::Error::RpcStatus(status)
}

pub(super) fn timestamp(at: SystemTime) -> Timestamp {
    let since = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let mut ts = Timestamp::new();
    ts.seconds = since.as_secs() as i64;
    ts.nanos = since.subsec_nanos() as i32;
    ts
}

impl TaskService {
    pub(super) fn new(
        content: ContentStore,
        publisher: RemotePublisher,
        shutdown: Arc<ExitSignal>,
        sandbox: String,
    ) -> TaskService {
        let state = Arc::new((
            Mutex::new(State {
                containers: HashMap::new(),
                creating: HashSet::new(),
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

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
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
                if state.0.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
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

pub(super) fn exit_event(id: &str, pid: u32, exit: Exit) -> TaskExit {
    let mut event = TaskExit::new();
    event.container_id = id.to_owned();
    event.id = id.to_owned();
    event.pid = pid;
    event.exit_status = exit.code;
    event.exited_at = MessageField::some(timestamp(exit.at));
    event
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
        // The id is taken under the lock, so that a second Create of it is refused, not
        // run alongside the first.
        if !self.lock().reserve(&req.id) {
            return Err(error(
                Code::ALREADY_EXISTS,
                format!("container {} already exists", req.id),
            ));
        }
        let created = self.create_container(&req);
        let mut state = self.lock();
        state.creating.remove(&req.id);
        let container = created.map_err(|failure| {
            log::warn!("refused container {}: {failure}", req.id);
            let code = match failure {
                CreateError::Refused(_) => Code::INVALID_ARGUMENT,
                CreateError::NodeUnfit(_) => Code::FAILED_PRECONDITION,
                CreateError::Failed(_) => Code::INTERNAL,
            };
            error(code, failure.to_string())
        })?;
        let pid = container.pid;
        let exited = state.insert(&req.id, container);
        drop(state);
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
            Kind::Wasm { gate, .. } => {
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
            super::stats::metrics(&usage).map_err(|e| error(Code::INTERNAL, e.to_string()))?;
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
        let remaining = self.lock().len();
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
