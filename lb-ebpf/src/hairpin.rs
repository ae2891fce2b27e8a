//! Hairpin: a pod that reaches itself through its own Service. Delivered as is, the pod would
//! get a packet from its own address from outside and drop it as a martian, so the flow is
//! masqueraded: the pod sees it come from the family's hairpin address (`Address::HAIRPIN`), and
//! both directions go straight back into the pod.
use aya_ebpf::{bindings::TC_ACT_SHOT, programs::TcContext};
use lb_common::{Backend, Stat};

use crate::{
    conntrack,
    family::Family,
    maps::{self, count},
    nat,
    packet::Flow,
    reject,
};

/// Whether `backend` is the client itself.
#[inline(always)]
pub fn is_hairpin<A: Family>(flow: &Flow<A>, backend: &Backend<A>) -> bool {
    backend.addr == flow.src_addr
}

/// A packet of the pod to its own Service, given itself as backend.
#[inline(always)]
pub fn forward<A: Family>(ctx: &TcContext, flow: &Flow<A>, backend: &Backend<A>) -> i32 {
    let rewritten = nat::rewrite_destination(ctx, flow, backend.addr, backend.port)
        .and_then(|()| nat::rewrite_source(ctx, flow, A::HAIRPIN, flow.src_port));
    rewritten
        .ok()
        .and_then(|()| reject::bounce(ctx))
        .unwrap_or(TC_ACT_SHOT)
}

/// The pod's reply to a hairpinned connection (to the hairpin address): it comes back from the
/// frontend. `None`: not such a reply.
#[inline(always)]
pub fn reply<A: Family>(ctx: &TcContext, flow: &Flow<A>) -> Option<i32> {
    if flow.dst_addr != A::HAIRPIN {
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
