//! What the datapath says through aya-log, when asked to: `SB_CONFIG[LOG_LEVEL]` is read before
//! each message, so logging is off (and costs one array lookup) until someone switches it on
//! (`switchboard log-level`), and the agent prints what it says.
use aya_ebpf::programs::TcContext;
use aya_log_ebpf::{info, warn};
use lb_common::{Backend, config, log_level};

use crate::{maps::SB_CONFIG, packet::Flow};

#[inline(always)]
fn enabled(level: u64) -> bool {
    SB_CONFIG.get(config::LOG_LEVEL).is_some_and(|max| level <= *max)
}

/// A flow given a backend.
#[inline(always)]
pub fn new_flow(ctx: &TcContext, flow: &Flow, service_id: u32, backend: &Backend) {
    if enabled(log_level::INFO) {
        info!(
            ctx,
            "new flow {:i}:{} -> {:i}:{} proto {}: service {} backend {:i}:{}",
            flow.src_addr,
            flow.src_port,
            flow.dst_addr,
            flow.dst_port,
            flow.proto,
            service_id,
            backend.addr,
            backend.port
        );
    }
}

/// A new flow to a frontend without a usable backend, refused.
#[inline(always)]
pub fn refused(ctx: &TcContext, flow: &Flow, service_id: u32) {
    if enabled(log_level::WARN) {
        warn!(
            ctx,
            "refused {:i}:{} -> {:i}:{} proto {}: service {} has no backend",
            flow.src_addr,
            flow.src_port,
            flow.dst_addr,
            flow.dst_port,
            flow.proto,
            service_id
        );
    }
}
