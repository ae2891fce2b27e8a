//! Traffic between the node's external interfaces and the outside: NodePorts, LoadBalancer IPs
//! and externalIPs, with source NAT for `externalTrafficPolicy: Cluster`.
//!
//! Translation happens where netfilter would do it, so the kernel never sees a packet with one of
//! its own addresses as the source arriving from outside (it would drop it as a martian):
//! * ingress (XDP, then TC): DNAT to the backend; a reply to a source-NATed flow gets its
//!   client back as destination. The kernel then routes the packet, to a local pod or out again.
//! * egress (TC): a flow leaving for another node's backend takes this node's address as source;
//!   a reply on its way to an external client gets the frontend back as source.
//!
//! The handlers are not inlined into the entry functions, so each family has a stack frame of
//! its own: both families' code in one frame would not fit the 512 bytes the verifier allows.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    programs::{TcContext, XdpContext},
};
use lb_common::{Stat, service_flags};

use crate::{
    conntrack::{self, Forward},
    context::Packet,
    family::Family,
    maps::{self, count},
    nat,
    packet::{self, Flow},
    reject, service,
};

/// XDP on an external interface: traffic from outside the node, translated before the kernel
/// builds an skb for it. What needs an skb (refusing a connection) is passed on to TC.
#[inline(never)]
pub fn xdp_ingress<A: Family>(ctx: &XdpContext) -> u32 {
    let Some(flow) = packet::parse::<A>(ctx) else {
        return xdp_action::XDP_PASS;
    };
    match ingress(ctx, &flow) {
        Verdict::Pass | Verdict::Refuse => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
    }
}

/// TC ingress on an external interface: what XDP does, for interfaces without it and for what
/// it passed on.
#[inline(never)]
pub fn tc_ingress<A: Family>(ctx: &TcContext) -> i32 {
    let Some(flow) = packet::parse::<A>(ctx) else {
        return TC_ACT_OK;
    };
    match ingress(ctx, &flow) {
        Verdict::Pass => TC_ACT_OK,
        Verdict::Drop => TC_ACT_SHOT,
        Verdict::Refuse => reject::refuse(ctx, &flow),
    }
}

/// TC egress on an external interface.
#[inline(never)]
pub fn tc_egress<A: Family>(ctx: &TcContext) -> i32 {
    let Some(flow) = packet::parse::<A>(ctx) else {
        return TC_ACT_OK;
    };
    // SAFETY: the context pointer the kernel passed in is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    match egress(ctx, &flow, ifindex) {
        Verdict::Drop => TC_ACT_SHOT,
        Verdict::Pass | Verdict::Refuse => TC_ACT_OK,
    }
}

enum Verdict {
    /// On to the kernel, rewritten or not.
    Pass,
    Drop,
    /// A connection to a frontend without endpoints, to be refused as a closed port would.
    Refuse,
}

/// DNAT of new and established flows to external frontends; the client restored as the
/// destination of replies to source-NATed ones.
#[inline(always)]
fn ingress<A: Family>(ctx: &impl Packet, flow: &Flow<A>) -> Verdict {
    if service::is_node_addr(flow.dst_addr)
        && let Some((client_addr, client_port)) = conntrack::snat_in(flow)
    {
        // Counted as a reply at egress, where its source becomes the frontend.
        return done(nat::rewrite_destination(ctx, flow, client_addr, client_port));
    }
    let Some(service) = service::lookup_frontend_from_outside(flow) else {
        return Verdict::Pass;
    };
    let backend = match conntrack::forward(flow, &service) {
        Forward::Established(backend) => backend,
        Forward::New => {
            if !service::source_allowed(&service, flow.src_addr) {
                count(Stat::SourceRangeDrops);
                return Verdict::Drop;
            }
            let Some((id, backend)) = service::choose_backend(&service, flow) else {
                count(Stat::NoBackend);
                // externalTrafficPolicy Local without a local endpoint: dropped, so the load
                // balancer's health check moves clients to another node.
                return if service.flags & service_flags::EXTERNAL_LOCAL != 0 {
                    Verdict::Drop
                } else {
                    Verdict::Refuse
                };
            };
            conntrack::track(flow, &service, id, &backend);
            maps::count_service_flow(service.id);
            if service.flags & service_flags::EXTERNAL_SNAT != 0 {
                conntrack::expect_snat(flow, &service, id, &backend);
            }
            backend
        }
    };
    count(Stat::ServicePackets);
    maps::count_service_packet(service.id, ctx.len() as u32);
    done(nat::rewrite_destination(ctx, flow, backend.addr, backend.port))
}

/// Source NAT of flows leaving for another node's backend; the frontend restored as the source
/// of replies to external clients.
#[inline(always)]
fn egress<A: Family>(ctx: &impl Packet, flow: &Flow<A>, ifindex: u32) -> Verdict {
    if let Some(frontend) = conntrack::reply(flow) {
        count(Stat::ReplyPackets);
        maps::count_service_reply(frontend.service_id, ctx.len() as u32);
        return done(nat::rewrite_source(
            ctx,
            flow,
            frontend.nat_addr,
            frontend.nat_port,
        ));
    }
    match conntrack::snat_out(flow, ifindex) {
        Some((addr, port)) => done(nat::rewrite_source(ctx, flow, addr, port)),
        None => Verdict::Pass,
    }
}

/// A rewrite that failed after the packet was checked to hold every field is a kernel refusal;
/// a half-rewritten packet must not leave.
#[inline(always)]
fn done(rewritten: Result<(), i64>) -> Verdict {
    match rewritten {
        Ok(()) => Verdict::Pass,
        Err(_) => Verdict::Drop,
    }
}
