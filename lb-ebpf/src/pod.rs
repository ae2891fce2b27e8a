//! Pods' traffic, on their host-side interfaces: service packets DNATed towards a backend as
//! they leave a pod, replies given their frontend back as they enter one.
//!
//! The handlers are not inlined into the entry functions, so each family has a stack frame of
//! its own: both families' code in one frame would not fit the 512 bytes the verifier allows.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use lb_common::Stat;

use crate::{
    conntrack::{self, Forward},
    family::Family,
    hairpin, icmp, log,
    maps::{self, count},
    nat, packet, reject, service, source_check,
};

/// A packet the pod sends: one addressed to a service frontend is DNATed to the flow's backend,
/// chosen on the flow's first packet.
#[inline(never)]
pub fn from_pod<A: Family>(ctx: &TcContext) -> i32 {
    let Some(flow) = packet::parse::<A>(ctx) else {
        return TC_ACT_OK;
    };
    if source_check::refuses_connection_change(ctx, &flow) {
        return TC_ACT_SHOT;
    }
    if let Some(verdict) = hairpin::reply(ctx, &flow) {
        return verdict;
    }
    let Some(service) = service::lookup_frontend(&flow) else {
        if service::is_cluster_ip(flow.dst_addr) {
            // A port the Service does not define: refused, never routed to the ClusterIP.
            count(Stat::UndefinedPort);
            return reject::refuse(ctx, &flow);
        }
        return TC_ACT_OK;
    };
    let backend = match conntrack::forward(&flow, &service) {
        Forward::Established(backend) => backend,
        Forward::New if source_check::refuses_new_flow(ctx, &flow) => return TC_ACT_SHOT,
        Forward::New => match service::choose_backend(&service, &flow) {
            Some((id, backend)) => {
                conntrack::track(&flow, &service, id, &backend);
                maps::count_service_flow(service.id);
                log::new_flow(ctx, &flow, service.id, &backend);
                backend
            }
            None => {
                count(Stat::NoBackend);
                log::refused(ctx, &flow, service.id);
                return reject::refuse(ctx, &flow);
            }
        },
    };
    count(Stat::ServicePackets);
    maps::count_service_packet(service.id, ctx.len());
    if hairpin::is_hairpin(&flow, &backend) {
        return hairpin::forward(ctx, &flow, &backend);
    }
    match nat::rewrite_destination(ctx, &flow, backend.addr, backend.port) {
        Ok(()) => TC_ACT_OK,
        // The packet was checked to hold every field written, so this is a kernel refusal; a
        // half-rewritten packet must not leave.
        Err(_) => TC_ACT_SHOT,
    }
}

/// A packet delivered to the pod: a reply from a backend gets the frontend the client dialled
/// as its source again, and so does the packet an ICMP error about the flow quotes.
#[inline(always)]
pub fn to_pod<A: Family>(ctx: &TcContext) -> i32 {
    // Called one after the other, not one from the other: each has a stack frame of its own
    // within the verifier's limit. An ICMP error goes on whether translated or not.
    reply::<A>(ctx).unwrap_or_else(|| {
        let _ = icmp::translate_error::<A>(ctx);
        TC_ACT_OK
    })
}

/// The verdict on a TCP, UDP or SCTP packet; `None` for any other.
#[inline(never)]
fn reply<A: Family>(ctx: &TcContext) -> Option<i32> {
    let flow = packet::parse::<A>(ctx)?;
    let Some(frontend) = conntrack::reply(&flow) else {
        return Some(TC_ACT_OK);
    };
    count(Stat::ReplyPackets);
    maps::count_service_reply(frontend.service_id, ctx.len());
    Some(
        match nat::rewrite_source(ctx, &flow, frontend.nat_addr, frontend.nat_port) {
            Ok(()) => TC_ACT_OK,
            Err(_) => TC_ACT_SHOT,
        },
    )
}
