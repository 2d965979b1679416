//! Bulwark's runtime: the engine and the policy, with no containerd in sight.
//!
//! - [`config::NodeConfig`]: the admin's defaults and ceilings (`/etc/bulwark/config.toml`).
//! - [`policy::Request`] and [`policy::Policy`]: what a workload asks for (annotations or
//!   CLI flags) held against the node's ceilings.
//! - [`run::Runtime`]: Wasmtime engines per limit flavor, the [`cache::ModuleCache`] of
//!   precompiled modules, and [`run::Loaded::run`], which runs a WASI preview 1 module or
//!   preview 2 command under a policy and returns an [`run::Outcome`] with the exit code
//!   and reason of the contract.
//! - [`usage::Usage`]: what a run or a request used (wall, CPU, fuel, memory), the line a
//!   platform bills on.
//! - [`serve::Service`]: serving mode, a `wasi:http/proxy` component as an HTTP service with
//!   a fresh instance per request and per-request limits.
//!
//! The shim and the `bulwark` CLI both build on this crate, so a policy tried on a laptop
//! is the policy a pod gets.

pub mod cache;
pub mod compile;
pub mod config;
pub mod egress;
pub mod engine;
pub mod image;
pub mod policy;
pub mod run;
pub mod serve;
pub mod units;
pub mod usage;

pub use config::NodeConfig;
pub use policy::{Policy, PolicyError, Request};
pub use run::{Outcome, Runtime, RuntimeOptions, Workload};
