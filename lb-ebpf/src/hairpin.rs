//! Hairpin: a pod that reaches itself through its own Service. Delivered as is, the pod would
//! get a packet from its own address from outside and drop it as a martian, so the flow is
//! masqueraded: the pod sees it come from `HAIRPIN_ADDR`, and both directions go straight back
//! into the pod.
use aya_ebpf::{bindings::TC_ACT_SHOT, programs::TcContext};
use lb_common::{Backend, HAIRPIN_ADDR, Stat};

use crate::{
    conntrack,
    maps::{self, count},
    nat,
    packet::Flow,
    reject,
};

/// Whether `backend` is the client itself.
#[inline(always)]
pub fn is_hairpin(flow: &Flow, backend: &Backend) -> bool {
    backend.addr == flow.src_addr
}

/// A packet of the pod to its own Service, given itself as backend.
#[inline(always)]
pub fn forward(ctx: &TcContext, flow: &Flow, backend: &Backend) -> i32 {
    let rewritten = nat::rewrite_destination(ctx, flow, backend.addr, backend.port)
        .and_then(|()| nat::rewrite_source(ctx, flow, HAIRPIN_ADDR, flow.src_port));
    rewritten
        .ok()
        .and_then(|()| reject::bounce(ctx))
        .unwrap_or(TC_ACT_SHOT)
}

/// The pod's reply to a hairpinned connection (to `HAIRPIN_ADDR`): it comes back from the
/// frontend. `None`: not such a reply.
#[inline(always)]
pub fn reply(ctx: &TcContext, flow: &Flow) -> Option<i32> {
    if flow.dst_addr != HAIRPIN_ADDR {
        return None;
    }
    let frontend = conntrack::reply(flow)?;
    count(Stat::ReplyPackets);
    maps::count_service_reply(frontend.service_id, ctx.len());
    let rewritten = nat::rewrite_source(ctx, flow, frontend.nat_addr, frontend.nat_port)
        .and_then(|()| nat::rewrite_destination(ctx, flow, flow.src_addr, flow.dst_port));
    Some(
        rewritten
            .ok()
            .and_then(|()| reject::bounce(ctx))
            .unwrap_or(TC_ACT_SHOT),
    )
}
