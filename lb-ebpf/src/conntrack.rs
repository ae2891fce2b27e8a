//! Connection tracking: a flow keeps its backend for its whole life. Each flow has two entries,
//! one keyed as the client sends (→ backend) and one keyed as the backend replies (→ frontend).
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns};
use lb_common::{
    Backend, BackendId, CtEntry, CtKey, ServiceInfo, Stat, backend_flags, ct_direction, ct_flags,
};

use crate::{family::Family, hairpin, maps::count, packet::Flow, service};

/// How often an established flow's `last_seen_ns` is refreshed: writing it on every packet
/// would bounce the entry's cache line between CPUs.
const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

pub enum Forward<A: Family> {
    Established(Backend<A>),
    New,
}

#[inline(always)]
fn forward_key<A: Family>(flow: &Flow<A>) -> CtKey<A> {
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

/// The flow's backend. One that left `service` (its pod no longer ready, relabelled away or
/// deleted) keeps the TCP connections (and SCTP associations) it has, as with kube-proxy: their
/// segments still go to the address recorded at their first packet, where the pod finishes them
/// if it still runs and resets them if it does not; any other backend would reset them for
/// sure. A UDP flow whose
/// backend left, or a new connection on the tuple, counts as new: it is re-balanced rather than
/// black-holed.
#[inline(always)]
pub fn forward<A: Family>(flow: &Flow<A>, service: &ServiceInfo) -> Forward<A> {
    let Some(entry) = A::conntrack().get_ptr_mut(forward_key(flow)) else {
        return Forward::New;
    };
    // SAFETY: the pointer comes from a successful lookup; copied out at once.
    let recorded = unsafe { *entry };
    if recorded.service_id == service.id {
        let opening = flow.opens_connection();
        let backend = service::backend(service, recorded.backend_id).or_else(|| {
            (flow.is_connection() && !opening).then_some(Backend {
                addr: recorded.nat_addr,
                port: recorded.nat_port,
                proto: flow.proto,
                flags: backend_flags::DRAINING,
                set_id: service.backends.id,
            })
        });
        if let Some(backend) = backend {
            seen(entry, flow);
            if opening {
                reclaim_reply(flow, &backend, recorded);
            }
            return Forward::Established(backend);
        }
    }
    count(Stat::Rebalanced);
    Forward::New
}

/// A SYN (or SCTP INIT) on a tracked tuple: a new connection reusing a closed one's client port, or a SYN sent
/// again. The reply entry (backend → client) is shared by every frontend's flow from that
/// client port to that backend port, so a flow to another frontend may have taken it since;
/// it is made this flow's again, or the backend's answer would come back from the other
/// frontend and the client would never connect.
#[inline(always)]
fn reclaim_reply<A: Family>(flow: &Flow<A>, backend: &Backend<A>, forward: CtEntry<A>) {
    let opened = CtEntry {
        flags: 0,
        // SAFETY: a plain helper call without arguments.
        last_seen_ns: unsafe { bpf_ktime_get_ns() },
        ..forward
    };
    let (key, reply) = reply_of(flow, backend, opened);
    if A::conntrack().insert(key, reply, 0).is_err() {
        count(Stat::CtInsertFailed);
    }
}

/// Records a packet of the flow on one of its entries: when it was last seen, for the agent's
/// garbage collection, and whether a FIN or RST is closing it.
#[inline(always)]
fn seen<A: Family>(entry: *mut CtEntry<A>, flow: &Flow<A>) {
    // SAFETY: a plain helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: the pointer comes from a successful lookup; fields are read and written whole,
    // and a racing writer can only store another recent time or the same flag.
    unsafe {
        if now.wrapping_sub((*entry).last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
            (*entry).last_seen_ns = now;
        }
        if flow.is_connection() {
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
pub fn track<A: Family>(flow: &Flow<A>, service: &ServiceInfo, backend_id: BackendId, backend: &Backend<A>) {
    // SAFETY: a plain helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // A flow first met mid-stream (conntrack lost, or a flow from another node) may already be
    // closing.
    let flags = if flow.is_connection() {
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
        pad: Default::default(),
        last_seen_ns: now,
    };
    let (reply_key, reply) = reply_of(flow, backend, forward);
    let conntrack = A::conntrack();
    let inserted = conntrack
        .insert(forward_key(flow), forward, 0)
        .and_then(|()| conntrack.insert(reply_key, reply, 0));
    if inserted.is_err() {
        count(Stat::CtInsertFailed);
    } else {
        count(Stat::NewFlows);
    }
}

/// The reply entry of a flow to `backend` whose forward entry is `forward`: keyed as the
/// backend answers, it restores the frontend the client dialled.
#[inline(always)]
fn reply_of<A: Family>(flow: &Flow<A>, backend: &Backend<A>, forward: CtEntry<A>) -> (CtKey<A>, CtEntry<A>) {
    // A pod reaching itself (hairpin) sees the connection come from the family's hairpin
    // address, and replies there.
    let client_at_backend = if hairpin::is_hairpin(flow, backend) {
        A::HAIRPIN
    } else {
        flow.src_addr
    };
    let key = CtKey {
        src_addr: backend.addr,
        dst_addr: client_at_backend,
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
    (key, reply)
}

/// The frontend to restore as the source of a backend's reply, if `flow` is one.
#[inline(always)]
pub fn reply<A: Family>(flow: &Flow<A>) -> Option<CtEntry<A>> {
    let entry = A::conntrack().get_ptr_mut(keyed(flow, ct_direction::REPLY))?;
    seen(entry, flow);
    // SAFETY: the pointer comes from a successful lookup; copied out at once.
    Some(unsafe { *entry })
}

/// The entry restoring the frontend of the flow whose backend `backend` answers `client`,
/// without counting a packet of the flow (an ICMP error about it is none).
#[inline(always)]
pub fn frontend_of<A: Family>(backend: (A, u16), client: (A, u16), proto: u8) -> Option<CtEntry<A>> {
    let key = CtKey {
        src_addr: backend.0,
        dst_addr: client.0,
        src_port: backend.1,
        dst_port: client.1,
        proto,
        direction: ct_direction::REPLY,
        pad: [0; 2],
    };
    // SAFETY: copied out at once.
    unsafe { A::conntrack().get(key).copied() }
}

#[inline(always)]
fn keyed<A: Family>(flow: &Flow<A>, direction: u8) -> CtKey<A> {
    CtKey {
        direction,
        ..forward_key(flow)
    }
}

/// Marks a new external flow (as DNATed: client → backend) to be source-NATed if it leaves the
/// node, which only a flow to a backend on another node does.
#[inline(always)]
pub fn expect_snat<A: Family>(
    flow: &Flow<A>,
    service: &ServiceInfo,
    backend_id: BackendId,
    backend: &Backend<A>,
) {
    let key = CtKey {
        dst_addr: backend.addr,
        dst_port: backend.port,
        ..keyed(flow, ct_direction::SNAT_OUT)
    };
    let entry = CtEntry {
        service_id: service.id,
        backend_id,
        // SAFETY: a plain helper call without arguments.
        last_seen_ns: unsafe { bpf_ktime_get_ns() },
        ..CtEntry::default()
    };
    if A::conntrack().insert(key, entry, 0).is_err() {
        count(Stat::CtInsertFailed);
    }
}

/// How many source ports a flow leaving for another node tries before giving up.
const SNAT_PROBES: u16 = 8;
/// Where probed source ports lie: the kernel's default ephemeral range.
const SNAT_PORT_BASE: u16 = 32_768;
const SNAT_PORT_SPAN: u32 = 28_232;

/// The node address and port a DNATed external flow (client → backend) leaving through
/// `ifindex` takes as its source: given on its first packet out, the client's own port when free.
/// `None` for flows that are not such (nothing to do), or when none could be given.
#[inline(always)]
pub fn snat_out<A: Family>(flow: &Flow<A>, ifindex: u32) -> Option<(A, u16)> {
    let conntrack = A::conntrack();
    let entry = conntrack.get_ptr_mut(keyed(flow, ct_direction::SNAT_OUT))?;
    seen(entry, flow);
    // SAFETY: from a successful lookup; fields are read and written whole.
    let (service_id, backend_id, port) =
        unsafe { ((*entry).service_id, (*entry).backend_id, (*entry).nat_port) };
    if port != 0 {
        // SAFETY: as above.
        return Some((unsafe { (*entry).nat_addr }, port));
    }
    // A later fragment gets no port of its own: its first fragment, which would have been
    // given one, never left.
    if !flow.has_transport_header() {
        return None;
    }
    // SAFETY: copied out at once.
    let Some(addr) = (unsafe { A::snat_addrs().get(ifindex).copied() }) else {
        count(Stat::SnatFailed);
        return None;
    };
    let hash = flow.hash();
    let back = CtEntry {
        service_id,
        backend_id,
        nat_addr: flow.src_addr,
        nat_port: flow.src_port,
        flags: 0,
        pad: Default::default(),
        // SAFETY: a plain helper call without arguments.
        last_seen_ns: unsafe { bpf_ktime_get_ns() },
    };
    for probe in 0..SNAT_PROBES {
        let port = if probe == 0 && flow.src_port >= 1024 {
            flow.src_port
        } else {
            let offset = hash.wrapping_add(u32::from(probe).wrapping_mul(0x9e37_79b9)) % SNAT_PORT_SPAN;
            SNAT_PORT_BASE + offset as u16
        };
        let in_key = CtKey {
            src_addr: flow.dst_addr,
            dst_addr: addr,
            src_port: flow.dst_port,
            dst_port: port,
            proto: flow.proto,
            direction: ct_direction::SNAT_IN,
            pad: [0; 2],
        };
        // Another CPU may have given this flow the port a moment ago: then it is ours too.
        // SAFETY: copied out at once.
        let taken = unsafe { conntrack.get(in_key).copied() };
        let ours = match taken {
            Some(other) => other.nat_addr == flow.src_addr && other.nat_port == flow.src_port,
            None => conntrack.insert(in_key, back, u64::from(BPF_NOEXIST)).is_ok(),
        };
        if ours {
            // SAFETY: as above.
            unsafe {
                (*entry).nat_addr = addr;
                (*entry).nat_port = port;
            }
            return Some((addr, port));
        }
    }
    count(Stat::SnatFailed);
    None
}

/// The client to restore as the destination of a reply to a source-NATed flow, if `flow` is one.
#[inline(always)]
pub fn snat_in<A: Family>(flow: &Flow<A>) -> Option<(A, u16)> {
    let entry = A::conntrack().get_ptr_mut(keyed(flow, ct_direction::SNAT_IN))?;
    seen(entry, flow);
    // SAFETY: from a successful lookup.
    Some(unsafe { ((*entry).nat_addr, (*entry).nat_port) })
}
