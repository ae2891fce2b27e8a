//! What the datapath says through aya-log, when asked to: `SB_CONFIG[LOG_LEVEL]` is read before
//! each message, so logging is off (and costs one array lookup) until someone switches it on
//! (`switchboard log-level`), and the agent prints what it says.
use core::net::IpAddr;

use aya_ebpf::programs::TcContext;
use aya_log_ebpf::{info, warn};
use lb_common::{Backend, config, log_level};

use crate::{family::Family, maps::SB_CONFIG, packet::Flow};

/// An address as aya-log prints either family's.
#[inline(always)]
fn ip<A: Family>(addr: A) -> IpAddr {
    addr.into()
}

#[inline(always)]
fn enabled(level: u64) -> bool {
    SB_CONFIG.get(config::LOG_LEVEL).is_some_and(|max| level <= *max)
}

/// A flow given a backend.
#[inline(always)]
pub fn new_flow<A: Family>(ctx: &TcContext, flow: &Flow<A>, service_id: u32, backend: &Backend<A>) {
    if enabled(log_level::INFO) {
        info!(
            ctx,
            "new flow {:i}:{} -> {:i}:{} proto {}: service {} backend {:i}:{}",
            ip(flow.src_addr),
            flow.src_port,
            ip(flow.dst_addr),
            flow.dst_port,
            flow.proto,
            service_id,
            ip(backend.addr),
            backend.port
        );
    }
}

/// A new flow to a frontend without a usable backend, refused.
#[inline(always)]
pub fn refused<A: Family>(ctx: &TcContext, flow: &Flow<A>, service_id: u32) {
    if enabled(log_level::WARN) {
        warn!(
            ctx,
            "refused {:i}:{} -> {:i}:{} proto {}: service {} has no backend",
            ip(flow.src_addr),
            flow.src_port,
            ip(flow.dst_addr),
            flow.dst_port,
            flow.proto,
            service_id
        );
    }
}
