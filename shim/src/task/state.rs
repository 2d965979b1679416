//! The pod's containers as the shim tracks them: their phase, process and exit.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::time::SystemTime;

use containerd_shim::protos::events::task::{TaskExit, TaskOOM};

use crate::cgroup::{Cgroup, OomCount};
use crate::container::native::NativeContainer;
use crate::egress::watch::EgressWatch;
use crate::process::workload::parent::Gated;

use super::service::{TtrpcError, exit_event, not_found};
use super::stdio::StdioPaths;

/// How many exits of processes no container claimed (yet) are remembered.
const UNCLAIMED_EXITS: usize = 64;

/// Where a container is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Created,
    /// Start is under way outside the lock (runc start).
    Starting,
    Running,
    Stopped,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Exit {
    pub(super) code: u32,
    pub(super) at: SystemTime,
}

pub(super) enum Kind {
    /// The pod sandbox: its holder process.
    Sandbox,
    /// A Wasm workload, whose process waits at its gate until Start, and the reading of
    /// its egress filter (where one is attached) for as long as it lives.
    Wasm {
        gate: Option<Gated>,
        _egress: Option<EgressWatch>,
    },
    /// A native container (where the node allows them), run by runc.
    Native(NativeContainer),
}

pub(super) struct Container {
    /// Its name in the pod (CRI's), if it has one (the sandbox has none).
    pub(super) name: Option<String>,
    pub(super) bundle: PathBuf,
    pub(super) kind: Kind,
    pub(super) status: Phase,
    /// The container's process, from Create on.
    pub(super) pid: u32,
    pub(super) exit: Option<Exit>,
    /// Its cgroup (for a native container, runc's, read for Stats).
    pub(super) cgroup: Option<Cgroup>,
    /// A Wasm container's cgroup's OOM kills at Create, before its workload could run
    /// (the sandbox reports none; runc reports a native container's own).
    pub(super) oom_start: Option<OomCount>,
    pub(super) stdio: StdioPaths,
    /// Read ends of its output FIFOs, held while it lives (see [`hold_output_fifos`]).
    pub(super) _output_readers: Vec<std::fs::File>,
}

impl Container {
    /// Records the exit and returns the event that announces it.
    pub(super) fn stopped(&mut self, id: &str, exit: Exit) -> TaskExit {
        self.status = Phase::Stopped;
        self.exit = Some(exit);
        exit_event(id, self.pid, exit)
    }
}

/// The containers of this shim, and the exits of processes no container claimed yet (a
/// process that dies between its start and its container's entry here).
pub(super) struct State {
    pub(super) containers: HashMap<String, Container>,
    /// Ids whose Create is under way (outside the lock).
    pub(super) creating: HashSet<String>,
    pub(super) unclaimed: VecDeque<(u32, Exit)>,
}

impl State {
    /// Takes `id` for a Create under way; `false` if a container has it already (or is
    /// being created with it).
    pub(super) fn reserve(&mut self, id: &str) -> bool {
        !self.containers.contains_key(id) && self.creating.insert(id.to_owned())
    }

    /// The names of the pod's containers this shim has created.
    pub(super) fn names(&self) -> Vec<String> {
        self.containers
            .values()
            .filter_map(|container| container.name.clone())
            .collect()
    }

    /// Containers, those being created included.
    pub(super) fn len(&self) -> usize {
        self.containers.len() + self.creating.len()
    }

    /// Whether the shim has no container at all, none being created either.
    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(super) fn get(&self, id: &str) -> Result<&Container, TtrpcError> {
        self.containers.get(id).ok_or_else(|| not_found(id))
    }

    pub(super) fn get_mut(&mut self, id: &str) -> Result<&mut Container, TtrpcError> {
        self.containers.get_mut(id).ok_or_else(|| not_found(id))
    }

    /// The container whose process `pid` just exited records it; else it waits to be
    /// claimed. Returns the events to publish: a TaskOOM first when the kernel's OOM killer
    /// ended it (so kubelet reports `OOMKilled`, as for a runc container), then its TaskExit.
    pub(super) fn process_exited(
        &mut self,
        pid: u32,
        exit: Exit,
    ) -> Option<(Option<TaskOOM>, TaskExit)> {
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
    pub(super) fn insert(&mut self, id: &str, mut container: Container) -> Option<TaskExit> {
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
