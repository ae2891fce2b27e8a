//! Connection tracking: a flow keeps its backend for its whole life. Each flow has two entries,
//! one keyed as the client sends (→ backend) and one keyed as the backend replies (→ frontend).
use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{Backend, BackendId, CtEntry, CtKey, ServiceInfo, Stat, ct_direction};

use crate::{maps::SB_CONNTRACK, maps::count, packet::Flow, service};

/// How often an established flow's `last_seen_ns` is refreshed: writing it on every packet
/// would bounce the entry's cache line between CPUs.
const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

pub enum Forward {
    Established(Backend),
    New,
}

fn forward_key(flow: &Flow) -> CtKey {
    CtKey {
        src_addr: flow.src_addr,
        dst_addr: flow.dst_addr,
        src_port: flow.src_port,
        dst_port: flow.dst_port,
        proto: flow.proto,
        direction: ct_direction::FORWARD,
        pad: [0; 2],
    }
}

/// The flow's backend if it has one that still serves `service`. A flow whose backend was
/// removed counts as new, so it is re-balanced rather than black-holed.
#[inline(always)]
pub fn forward(flow: &Flow, service: &ServiceInfo) -> Forward {
    let Some(entry) = SB_CONNTRACK.get_ptr_mut(forward_key(flow)) else {
        return Forward::New;
    };
    // SAFETY: the pointer comes from a successful lookup; fields are read and written whole.
    let (service_id, backend_id, last_seen) =
        unsafe { ((*entry).service_id, (*entry).backend_id, (*entry).last_seen_ns) };
    if service_id == service.id
        && let Some(backend) = service::backend(service, backend_id)
    {
        // SAFETY: a plain helper call without arguments.
        let now = unsafe { bpf_ktime_get_ns() };
        if now.wrapping_sub(last_seen) > LAST_SEEN_GRANULARITY_NS {
            // SAFETY: as above; a racing writer can only store another recent time.
            unsafe { (*entry).last_seen_ns = now };
        }
        return Forward::Established(backend);
    }
    count(Stat::Rebalanced);
    Forward::New
}

/// Records a new flow in both directions.
#[inline(always)]
pub fn track(flow: &Flow, service: &ServiceInfo, backend_id: BackendId, backend: &Backend) {
    // SAFETY: a plain helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let forward = CtEntry {
        service_id: service.id,
        backend_id,
        nat_addr: backend.addr,
        nat_port: backend.port,
        flags: 0,
        last_seen_ns: now,
    };
    let reply_key = CtKey {
        src_addr: backend.addr,
        dst_addr: flow.src_addr,
        src_port: backend.port,
        dst_port: flow.src_port,
        proto: flow.proto,
        direction: ct_direction::REPLY,
        pad: [0; 2],
    };
    let reply = CtEntry {
        nat_addr: flow.dst_addr,
        nat_port: flow.dst_port,
        ..forward
    };
    let inserted = SB_CONNTRACK
        .insert(forward_key(flow), forward, 0)
        .and_then(|()| SB_CONNTRACK.insert(reply_key, reply, 0));
    if inserted.is_err() {
        count(Stat::CtInsertFailed);
    } else {
        count(Stat::NewFlows);
    }
}

/// The frontend to restore as the source of a backend's reply, if `flow` is one.
#[inline(always)]
pub fn reply(flow: &Flow) -> Option<CtEntry> {
    let key = CtKey {
        src_addr: flow.src_addr,
        dst_addr: flow.dst_addr,
        src_port: flow.src_port,
        dst_port: flow.dst_port,
        proto: flow.proto,
        direction: ct_direction::REPLY,
        pad: [0; 2],
    };
    // SAFETY: copied out at once.
    unsafe { SB_CONNTRACK.get(key).copied() }
}
