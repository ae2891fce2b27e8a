//! Switchboard's datapath. One small entry function per attach point; the work is split by concern
//! the way Cilium's `bpf/lib` is: packet parsing, service lookup and backend choice, conntrack, NAT.
#![no_std]
#![no_main]

mod conntrack;
mod maps;
mod nat;
mod packet;
mod reject;
mod service;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use lb_common::{ServiceKey, Stat};

use crate::{conntrack::Forward, maps::count};

/// TC ingress on a pod's host-side interface: packets the pod sends. A packet addressed to a
/// service frontend is DNATed to the flow's backend, chosen on the flow's first packet.
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    let Some(flow) = packet::parse_ipv4(&ctx) else {
        return TC_ACT_OK;
    };
    let frontend = ServiceKey {
        addr: flow.dst_addr,
        port: flow.dst_port,
        proto: flow.proto,
        pad: 0,
    };
    let Some(service) = service::lookup(&frontend) else {
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
                backend
            }
            None => {
                count(Stat::NoBackend);
                return reject::refuse(&ctx, &flow);
            }
        },
    };
    count(Stat::ServicePackets);
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
    match nat::rewrite_source(&ctx, &flow, frontend.nat_addr, frontend.nat_port) {
        Ok(()) => TC_ACT_OK,
        Err(_) => TC_ACT_SHOT,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
