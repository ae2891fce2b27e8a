//! Switchboard's datapath. One small entry function per attach point; the work is split by concern
//! the way Cilium's `bpf/lib` is: packet parsing, service lookup and backend choice, conntrack, NAT.
#![no_std]
#![no_main]

mod conntrack;
mod context;
mod external;
mod hairpin;
mod log;
mod maps;
mod nat;
mod packet;
mod reject;
mod service;
mod sock;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use lb_common::Stat;

use crate::{conntrack::Forward, external::Verdict, maps::count};

/// TC ingress on a pod's host-side interface: packets the pod sends. A packet addressed to a
/// service frontend is DNATed to the flow's backend, chosen on the flow's first packet.
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    let Some(flow) = packet::parse_ipv4(&ctx) else {
        return TC_ACT_OK;
    };
    if let Some(verdict) = hairpin::reply(&ctx, &flow) {
        return verdict;
    }
    let Some(service) = service::lookup_frontend(&flow) else {
        if service::is_cluster_ip(flow.dst_addr) {
            // A port the Service does not define: refused, never routed to the ClusterIP.
            count(Stat::UndefinedPort);
            return reject::refuse(&ctx, &flow);
        }
        return TC_ACT_OK;
    };
    let backend = match conntrack::forward(&flow, &service) {
        Forward::Established(backend) => backend,
        Forward::New => match service::choose_backend(&service, &flow) {
            Some((id, backend)) => {
                conntrack::track(&flow, &service, id, &backend);
                maps::count_service_flow(service.id);
                log::new_flow(&ctx, &flow, service.id, &backend);
                backend
            }
            None => {
                count(Stat::NoBackend);
                log::refused(&ctx, &flow, service.id);
                return reject::refuse(&ctx, &flow);
            }
        },
    };
    count(Stat::ServicePackets);
    maps::count_service_packet(service.id, ctx.len());
    if hairpin::is_hairpin(&flow, &backend) {
        return hairpin::forward(&ctx, &flow, &backend);
    }
    match nat::rewrite_destination(&ctx, &flow, backend.addr, backend.port) {
        Ok(()) => TC_ACT_OK,
        // The packet was checked to hold every field written, so this is a kernel refusal; a
        // half-rewritten packet must not leave.
        Err(_) => TC_ACT_SHOT,
    }
}

/// TC egress on a pod's host-side interface: packets delivered to the pod. A reply from a backend
/// gets the frontend the client dialled as its source again.
#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    let Some(flow) = packet::parse_ipv4(&ctx) else {
        return TC_ACT_OK;
    };
    let Some(frontend) = conntrack::reply(&flow) else {
        return TC_ACT_OK;
    };
    count(Stat::ReplyPackets);
    maps::count_service_reply(frontend.service_id, ctx.len());
    match nat::rewrite_source(&ctx, &flow, frontend.nat_addr, frontend.nat_port) {
        Ok(()) => TC_ACT_OK,
        Err(_) => TC_ACT_SHOT,
    }
}

/// XDP on an external interface: traffic from outside the node, translated before the kernel
/// builds an skb for it. What needs an skb (refusing a connection) is passed on to `nodeport_tc`.
#[xdp]
pub fn nodeport(ctx: XdpContext) -> u32 {
    let Some(flow) = packet::parse_ipv4(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    match external::ingress(&ctx, &flow) {
        Verdict::Pass | Verdict::Refuse => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
    }
}

/// TC ingress on an external interface: what `nodeport` does, for interfaces without XDP and
/// for what it passed on.
#[classifier]
pub fn nodeport_tc(ctx: TcContext) -> i32 {
    let Some(flow) = packet::parse_ipv4(&ctx) else {
        return TC_ACT_OK;
    };
    match external::ingress(&ctx, &flow) {
        Verdict::Pass => TC_ACT_OK,
        Verdict::Drop => TC_ACT_SHOT,
        Verdict::Refuse => reject::refuse(&ctx, &flow),
    }
}

/// TC egress on an external interface: source NAT towards other nodes' backends, and the
/// frontend restored on replies to external clients.
#[classifier]
pub fn nodeport_egress(ctx: TcContext) -> i32 {
    let Some(flow) = packet::parse_ipv4(&ctx) else {
        return TC_ACT_OK;
    };
    // SAFETY: the context pointer the kernel passed in is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    match external::egress(&ctx, &flow, ifindex) {
        Verdict::Drop => TC_ACT_SHOT,
        Verdict::Pass | Verdict::Refuse => TC_ACT_OK,
    }
}

/// cgroup connect4: a socket of the node connecting to a service connects to a backend.
#[cgroup_sock_addr(connect4)]
pub fn sock_connect(ctx: SockAddrContext) -> i32 {
    i32::from(sock::translate_destination(&ctx))
}

/// cgroup sendmsg4: a datagram a socket of the node sends to a service goes to a backend.
#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg(ctx: SockAddrContext) -> i32 {
    i32::from(sock::translate_destination(&ctx))
}

/// cgroup recvmsg4: a datagram from a backend reads as coming from the service.
#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg(ctx: SockAddrContext) -> i32 {
    sock::restore_peer(&ctx);
    1
}

/// cgroup getpeername4: a connected socket's peer reads as the service.
#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername(ctx: SockAddrContext) -> i32 {
    sock::restore_peer(&ctx);
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
