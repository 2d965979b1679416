//! `containerd-shim-bulwark-v1`: runs a pod's Wasm containers for containerd, each in a
//! workload process of its own inside the container's cgroup, under the Policy the
//! runtime crate resolves from the pod's `bulwark.dev/*` annotations and the node
//! configuration. This crate translates containerd's world; it holds no policy.

pub mod cgroup;
pub mod content;
pub mod options;
pub mod seccomp;
pub mod service;
pub mod spec;
pub mod stats;
pub mod workload;
