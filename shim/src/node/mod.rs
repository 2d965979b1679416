//! Setting a node up for Bulwark, and taking it off again: [`install`] edits containerd's
//! configuration and places the shim, [`restart`] restarts containerd the way the node's
//! distribution runs it, [`kube`] labels the node through the Kubernetes API.

pub mod install;
pub mod kube;
pub mod restart;
