//! Service lookup and backend choice.
use aya_ebpf::{
    btf_maps::lpm_trie::Key,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
};
use lb_common::{
    AffinityEntry, AffinityKey, Backend, BackendId, ClusterIpKey, ServiceInfo, ServiceKey, SourceRangeKey,
    backend_flags, service_flags,
};

use crate::{family::Family, maps::table_entry, packet::Flow};

/// Whether `addr` is a ClusterIP: a packet to it that matched no frontend is for a port its
/// Service does not define.
#[inline(always)]
pub fn is_cluster_ip<A: Family>(addr: A) -> bool {
    // SAFETY: only the presence is read.
    unsafe { A::cluster_ips().get(ClusterIpKey { addr }) }.is_some()
}

#[inline(always)]
fn lookup<A: Family>(frontend: &ServiceKey<A>) -> Option<ServiceInfo> {
    // SAFETY: copied out at once; the agent replaces entries whole.
    unsafe { A::services().get(frontend).copied() }
}

/// Whether `addr` is one of this node's addresses.
#[inline(always)]
pub fn is_node_addr<A: Family>(addr: A) -> bool {
    // SAFETY: only presence is read.
    unsafe { A::node_addrs().get(addr).is_some() }
}

/// The service whose frontend `flow` is addressed to: a ClusterIP, LoadBalancer IP or
/// externalIP with its port, or a NodePort on any of this node's addresses; balanced over the
/// backends of clients in the cluster (pods, the node itself).
#[inline(always)]
pub fn lookup_frontend<A: Family>(flow: &Flow<A>) -> Option<ServiceInfo> {
    // NodePorts are keyed with the unspecified address (0.0.0.0, ::): a packet to it must not
    // match one.
    if flow.dst_addr == A::UNSPECIFIED {
        return None;
    }
    let mut frontend = ServiceKey {
        addr: flow.dst_addr,
        port: flow.dst_port,
        proto: flow.proto,
        pad: 0,
    };
    if let Some(service) = lookup(&frontend) {
        return Some(service);
    }
    if !is_node_addr(flow.dst_addr) {
        return None;
    }
    frontend.addr = A::UNSPECIFIED;
    lookup(&frontend)
}

/// [`lookup_frontend`] for a client from outside the node: balanced over its own backends
/// (this node's only, with `externalTrafficPolicy: Local`).
#[inline(always)]
pub fn lookup_frontend_from_outside<A: Family>(flow: &Flow<A>) -> Option<ServiceInfo> {
    let mut service = lookup_frontend(flow)?;
    service.for_outside_clients();
    Some(service)
}

/// Whether a LoadBalancer frontend with source ranges admits a new flow from `client`.
#[inline(always)]
pub fn source_allowed<A: Family>(service: &ServiceInfo, client: A) -> bool {
    if service.flags & service_flags::SOURCE_RANGES == 0 {
        return true;
    }
    let key = SourceRangeKey {
        service_id: service.id.to_be_bytes(),
        addr: client,
    };
    // The whole key: the service id's bits and every bit of the client address.
    let key = Key::new((8 * size_of::<SourceRangeKey<A>>()) as u32, key);
    A::source_ranges().get(&key).is_some()
}

/// The backend behind `id` if it still belongs to `service`'s backend set (draining or not).
/// Ids are per set and recycled only after wrapping, so the owner check catches a flow whose
/// backend was removed.
#[inline(always)]
pub fn backend<A: Family>(service: &ServiceInfo, id: BackendId) -> Option<Backend<A>> {
    // SAFETY: copied out at once.
    let backend = unsafe { A::backends().get(id).copied() }?;
    (backend.set_id == service.backends.id).then_some(backend)
}

/// The backend for a new flow. With session affinity, the one the client had, if it still
/// takes new flows and the timeout has not run out (each new connection restarts the timeout).
/// Otherwise by Maglev consistent hashing of the 5-tuple when the set has a Maglev table (every
/// node picks the same one), else at random among the set's backends.
#[inline(always)]
pub fn choose_backend<A: Family>(service: &ServiceInfo, flow: &Flow<A>) -> Option<(BackendId, Backend<A>)> {
    if service.backends.count == 0 {
        return None;
    }
    if service.flags & service_flags::AFFINITY == 0 {
        return balance(service, flow);
    }
    let key = AffinityKey {
        service_id: service.id,
        client_addr: flow.src_addr,
    };
    // SAFETY: a plain helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let timeout_ns = u64::from(service.affinity_timeout_s) * 1_000_000_000;
    // SAFETY: copied out at once.
    let affinity = A::affinity();
    let sticky = unsafe { affinity.get(key).copied() }
        .filter(|entry| now.wrapping_sub(entry.last_used_ns) < timeout_ns)
        .and_then(|entry| Some((entry.backend_id, backend(service, entry.backend_id)?)))
        .filter(|(_, backend)| backend.flags & backend_flags::DRAINING == 0);
    let chosen = match sticky {
        Some(chosen) => chosen,
        // A new client, an expired one, or one whose backend has gone or is draining.
        None => balance(service, flow)?,
    };
    let entry = AffinityEntry {
        backend_id: chosen.0,
        pad: 0,
        last_used_ns: now,
    };
    // A full LRU map evicts; a failed insert only means the next connection chooses anew.
    let _ = affinity.insert(key, entry, 0);
    Some(chosen)
}

/// Maglev when the set has a table, else random. Random rather than round-robin: a shared
/// cursor would race across CPUs and cost an atomic per flow.
#[inline(always)]
fn balance<A: Family>(service: &ServiceInfo, flow: &Flow<A>) -> Option<(BackendId, Backend<A>)> {
    let set = &service.backends;
    if set.maglev_size != 0
        && let Some(chosen) = maglev(service, flow)
    {
        return Some(chosen);
    }
    // checked: a division the compiler cannot prove safe would leave a panic path, which the
    // verifier refuses.
    // SAFETY: a plain helper call without arguments.
    let slot = unsafe { bpf_get_prandom_u32() }.checked_rem(set.count)?;
    let id = table_entry(set.table.wrapping_add(slot))?;
    Some((id, backend(service, id)?))
}

#[inline(always)]
fn maglev<A: Family>(service: &ServiceInfo, flow: &Flow<A>) -> Option<(BackendId, Backend<A>)> {
    let set = &service.backends;
    let position = flow.hash().checked_rem(set.maglev_size)?;
    // Tables are written whole before a frontend points at them, and never written in place.
    let id = table_entry(set.table.wrapping_add(set.count).wrapping_add(position))?;
    Some((id, backend(service, id)?))
}
