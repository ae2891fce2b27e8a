//! Switchboard's datapath. One small entry function per attach point, dispatching on the
//! address family; the work is written once over `family::Family` and split by concern the way
//! Cilium's `bpf/lib` is: packet parsing, service lookup and backend choice, conntrack, NAT.
#![no_std]
#![no_main]

mod checksum;
mod conntrack;
mod context;
mod external;
mod family;
mod fragment;
mod hairpin;
mod icmp;
mod log;
mod maps;
mod nat;
mod packet;
mod pod;
mod reject;
mod service;
mod sock;
mod source_check;

use aya_ebpf::{
    bindings::{TC_ACT_OK, xdp_action},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use lb_common::{Ipv4, Ipv6};

use crate::family::Family;

/// TC ingress on a pod's host-side interface: packets the pod sends. A packet addressed to a
/// service frontend is DNATed to the flow's backend, chosen on the flow's first packet.
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    match packet::ether_type(&ctx) {
        Some(Ipv4::ETHER_TYPE) => pod::from_pod::<Ipv4>(&ctx),
        Some(Ipv6::ETHER_TYPE) => pod::from_pod::<Ipv6>(&ctx),
        _ => TC_ACT_OK,
    }
}

/// TC egress on a pod's host-side interface: packets delivered to the pod. A reply from a backend
/// gets the frontend the client dialled as its source again.
#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    match packet::ether_type(&ctx) {
        Some(Ipv4::ETHER_TYPE) => pod::to_pod::<Ipv4>(&ctx),
        Some(Ipv6::ETHER_TYPE) => pod::to_pod::<Ipv6>(&ctx),
        _ => TC_ACT_OK,
    }
}

/// XDP on an external interface: traffic from outside the node, translated before the kernel
/// builds an skb for it. What needs an skb (refusing a connection) is passed on to `nodeport_tc`.
#[xdp]
pub fn nodeport(ctx: XdpContext) -> u32 {
    match packet::ether_type(&ctx) {
        Some(Ipv4::ETHER_TYPE) => external::xdp_ingress::<Ipv4>(&ctx),
        Some(Ipv6::ETHER_TYPE) => external::xdp_ingress::<Ipv6>(&ctx),
        _ => xdp_action::XDP_PASS,
    }
}

/// TC ingress on an external interface: what `nodeport` does, for interfaces without XDP and
/// for what it passed on.
#[classifier]
pub fn nodeport_tc(ctx: TcContext) -> i32 {
    match packet::ether_type(&ctx) {
        Some(Ipv4::ETHER_TYPE) => external::tc_ingress::<Ipv4>(&ctx),
        Some(Ipv6::ETHER_TYPE) => external::tc_ingress::<Ipv6>(&ctx),
        _ => TC_ACT_OK,
    }
}

/// TC egress on an external interface: source NAT towards other nodes' backends, and the
/// frontend restored on replies to external clients.
#[classifier]
pub fn nodeport_egress(ctx: TcContext) -> i32 {
    match packet::ether_type(&ctx) {
        Some(Ipv4::ETHER_TYPE) => external::tc_egress::<Ipv4>(&ctx),
        Some(Ipv6::ETHER_TYPE) => external::tc_egress::<Ipv6>(&ctx),
        _ => TC_ACT_OK,
    }
}

/// cgroup connect4: a socket of the node connecting to a service connects to a backend.
#[cgroup_sock_addr(connect4)]
pub fn sock_connect(ctx: SockAddrContext) -> i32 {
    i32::from(sock::translate_destination4(&ctx))
}

/// cgroup sendmsg4: a datagram a socket of the node sends to a service goes to a backend.
#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg(ctx: SockAddrContext) -> i32 {
    i32::from(sock::translate_destination4(&ctx))
}

/// cgroup recvmsg4: a datagram from a backend reads as coming from the service.
#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg(ctx: SockAddrContext) -> i32 {
    sock::restore_peer4(&ctx);
    1
}

/// cgroup getpeername4: a connected socket's peer reads as the service.
#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername(ctx: SockAddrContext) -> i32 {
    sock::restore_peer4(&ctx);
    1
}

/// cgroup connect6: connect4 for IPv6 sockets, IPv4-mapped addresses included.
#[cgroup_sock_addr(connect6)]
pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
    i32::from(sock::translate_destination6(&ctx))
}

/// cgroup sendmsg6: sendmsg4 for IPv6 sockets.
#[cgroup_sock_addr(sendmsg6)]
pub fn sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    i32::from(sock::translate_destination6(&ctx))
}

/// cgroup recvmsg6: recvmsg4 for IPv6 sockets.
#[cgroup_sock_addr(recvmsg6)]
pub fn sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::restore_peer6(&ctx);
    1
}

/// cgroup getpeername6: getpeername4 for IPv6 sockets.
#[cgroup_sock_addr(getpeername6)]
pub fn sock_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::restore_peer6(&ctx);
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
