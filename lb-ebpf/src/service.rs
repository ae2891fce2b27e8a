//! Service lookup and backend choice.
use aya_ebpf::helpers::bpf_get_prandom_u32;
use lb_common::{Backend, BackendId, ServiceInfo, ServiceKey, SlotKey, flow_hash, service_flags};

use crate::{
    maps::{SB_BACKEND_SLOTS, SB_BACKENDS, SB_MAGLEV, SB_SERVICES},
    packet::Flow,
};

#[inline(always)]
pub fn lookup(frontend: &ServiceKey) -> Option<ServiceInfo> {
    // SAFETY: copied out at once; the agent replaces entries whole.
    unsafe { SB_SERVICES.get(frontend).copied() }
}

/// The backend behind `id` if it still belongs to `service`. Ids are per service and recycled
/// only after wrapping, so the owner check catches a flow whose backend was removed.
#[inline(always)]
pub fn backend(service: &ServiceInfo, id: BackendId) -> Option<Backend> {
    // SAFETY: copied out at once.
    let backend = unsafe { SB_BACKENDS.get(id).copied() }?;
    (backend.service_id == service.id).then_some(backend)
}

/// The backend for a new flow: by Maglev consistent hashing of its 5-tuple when the service has
/// a table (every node picks the same one), else at random among the service's slots. Random
/// rather than round-robin: a shared cursor would race across CPUs and cost an atomic per flow.
#[inline(always)]
pub fn choose_backend(service: &ServiceInfo, flow: &Flow) -> Option<(BackendId, Backend)> {
    if service.backend_count == 0 {
        return None;
    }
    if service.flags & service_flags::MAGLEV != 0
        && service.maglev_table_size != 0
        && let Some(chosen) = maglev(service, flow)
    {
        return Some(chosen);
    }
    // SAFETY: a plain helper call without arguments.
    let slot = unsafe { bpf_get_prandom_u32() } % service.backend_count;
    let key = SlotKey {
        service_id: service.id,
        slot,
    };
    // SAFETY: copied out at once.
    let id = unsafe { SB_BACKEND_SLOTS.get(key).copied() }?;
    Some((id, backend(service, id)?))
}

#[inline(always)]
fn maglev(service: &ServiceInfo, flow: &Flow) -> Option<(BackendId, Backend)> {
    let hash = flow_hash(
        flow.src_addr,
        flow.dst_addr,
        flow.src_port,
        flow.dst_port,
        flow.proto,
    );
    let position = hash % service.maglev_table_size;
    // SAFETY: copied out at once; tables are replaced whole, never written in place.
    let id = unsafe { SB_MAGLEV.get_value(&service.id, &position).copied() }?;
    Some((id, backend(service, id)?))
}
