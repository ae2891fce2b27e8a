//! Connection tracking: a flow keeps its backend for its whole life. Each flow has two entries,
//! one keyed as the client sends (→ backend) and one keyed as the backend replies (→ frontend).
use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{Backend, BackendId, CtEntry, CtKey, IPPROTO_TCP, ServiceInfo, Stat, ct_direction, ct_flags};

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
    let (service_id, backend_id) = unsafe { ((*entry).service_id, (*entry).backend_id) };
    if service_id == service.id
        && let Some(backend) = service::backend(service, backend_id)
    {
        seen(entry, flow);
        return Forward::Established(backend);
    }
    count(Stat::Rebalanced);
    Forward::New
}

/// Records a packet of the flow on one of its entries: when it was last seen, for the agent's
/// garbage collection, and whether a FIN or RST is closing it.
#[inline(always)]
fn seen(entry: *mut CtEntry, flow: &Flow) {
    // SAFETY: a plain helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: the pointer comes from a successful lookup; fields are read and written whole,
    // and a racing writer can only store another recent time or the same flag.
    unsafe {
        if now.wrapping_sub((*entry).last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
            (*entry).last_seen_ns = now;
        }
        if flow.proto == IPPROTO_TCP {
            let flags = (*entry).flags;
            let updated = ct_flags::after_tcp_segment(flags, flow.tcp_flags);
            if updated != flags {
                (*entry).flags = updated;
            }
        }
    }
}

/// Records a new flow in both directions.
#[inline(always)]
pub fn track(flow: &Flow, service: &ServiceInfo, backend_id: BackendId, backend: &Backend) {
    // SAFETY: a plain helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // A flow first met mid-stream (conntrack lost, or a flow from another node) may already be
    // closing.
    let flags = if flow.proto == IPPROTO_TCP {
        ct_flags::after_tcp_segment(0, flow.tcp_flags)
    } else {
        0
    };
    let forward = CtEntry {
        service_id: service.id,
        backend_id,
        nat_addr: backend.addr,
        nat_port: backend.port,
        flags,
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
    let entry = SB_CONNTRACK.get_ptr_mut(key)?;
    seen(entry, flow);
    // SAFETY: the pointer comes from a successful lookup; copied out at once.
    Some(unsafe { *entry })
}
