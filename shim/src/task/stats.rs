//! Stats in the shape containerd expects: cgroups v1 or v2 `Metrics`, so that CRI
//! ContainerStats (`kubectl top`) shows a Wasm container's memory and CPU.

use containerd_shim::protos::cgroups::metrics as v1;
use containerd_shim::protos::cgroups_v2::metrics as v2;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};

use crate::cgroup::{Usage, is_unified};

/// Encodes usage as the Metrics of the host's cgroup version.
pub fn metrics(usage: &Usage) -> Result<Any, containerd_shim::protos::protobuf::Error> {
    let mut any = Any::new();
    if is_unified() {
        let mut metrics = v2::Metrics::new();
        let mut memory = v2::MemoryStat::new();
        memory.usage = usage.memory_bytes;
        memory.usage_limit = usage.memory_limit.unwrap_or(u64::MAX);
        metrics.memory = MessageField::some(memory);
        let mut cpu = v2::CPUStat::new();
        cpu.usage_usec = usage.cpu_nanos / 1000;
        metrics.cpu = MessageField::some(cpu);
        let mut pids = v2::PidsStat::new();
        pids.current = usage.pids;
        metrics.pids = MessageField::some(pids);
        any.type_url = "io.containerd.cgroups.v2.Metrics".into();
        any.value = metrics.write_to_bytes()?;
    } else {
        let mut metrics = v1::Metrics::new();
        let mut entry = v1::MemoryEntry::new();
        entry.usage = usage.memory_bytes;
        entry.limit = usage.memory_limit.unwrap_or(u64::MAX);
        let mut memory = v1::MemoryStat::new();
        memory.usage = MessageField::some(entry);
        metrics.memory = MessageField::some(memory);
        let mut cpu_usage = v1::CPUUsage::new();
        cpu_usage.total = usage.cpu_nanos;
        let mut cpu = v1::CPUStat::new();
        cpu.usage = MessageField::some(cpu_usage);
        metrics.cpu = MessageField::some(cpu);
        let mut pids = v1::PidsStat::new();
        pids.current = usage.pids;
        metrics.pids = MessageField::some(pids);
        any.type_url = "io.containerd.cgroups.v1.Metrics".into();
        any.value = metrics.write_to_bytes()?;
    }
    Ok(any)
}
