//! The per-pod shim process: containerd's task API translated into containers, each
//! backed by a process of its own from Create on — the pod sandbox's holder
//! ([`crate::process::holder`]), a Wasm workload process waiting at its gate
//! ([`crate::process::workload`]), or a native container's init (runc) — and their exits
//! reported back as events.
//!
//! One shim process serves a whole pod: `start` groups containers by their CRI sandbox id.
//! The pod's lock guards bookkeeping only: starting processes, D-Bus calls to systemd and
//! runc all happen outside it, so one container's slow Create or Start never stalls the
//! calls about the pod's other containers.
//!
//! - [`service`]: the ttrpc task service; [`create`]: what Create makes of a bundle;
//!   [`state`]: the pod's containers and their phases; [`stdio`]: containerd's FIFOs;
//!   [`options`]: the handler's runtime options; [`stats`]: cgroup usage as containerd's
//!   metrics.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, DeleteResponse, ExitSignal, Flags, StartOpts};

use crate::bundle::spec::ContainerSpec;
use crate::bundle::{ContentStore, remove_files, unmount_rootfs};
use crate::cgroup::Cgroup;
use crate::process::binaries::{WORKLOAD_BINARY, beside_shim};
use crate::process::holder::HOLDER_BINARY;

mod create;
pub mod options;
pub mod service;
mod state;
pub mod stats;
mod stdio;

pub use service::TaskService;

/// How long the ttrpc server may take to stop once the shim is told to exit.
const STOP_GRACE: Duration = Duration::from_secs(5);

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
        response.exited_at = MessageField::some(service::timestamp(SystemTime::now()));
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
        // Opened as the shim starts: its pod's processes are of its own version even if an
        // upgrade replaces the files later.
        for name in [WORKLOAD_BINARY, HOLDER_BINARY] {
            if let Err(error) = beside_shim(name) {
                log::warn!("{error}");
            }
        }
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
    if let Err(err) = crate::container::native::delete_after_shim_died(id, bundle) {
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
