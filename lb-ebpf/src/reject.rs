//! Refusing a connection to a service without endpoints the way a closed port does: a TCP SYN
//! gets a RST back at once, so the client sees "connection refused" instead of a timeout.
use aya_ebpf::{
    bindings::TC_ACT_REDIRECT,
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use lb_common::{IPPROTO_TCP, checksum_add, checksum_fold, tcp_ipv4_checksum};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr};

use crate::packet::Flow;

const RST_ACK: u8 = 0x14;
/// Ethernet, a 20-byte IPv4 header, a 20-byte TCP header.
const RST_LEN: u32 = 54;

/// Rewrites a pure SYN (no ACK, no RST, no IP options) into the RST|ACK its destination would
/// answer with and sends it back out of the interface it came in on, towards the pod. `None`:
/// not such a SYN, left to the caller (which drops it).
#[inline(always)]
pub fn tcp_reset(ctx: &TcContext, flow: &Flow) -> Option<i32> {
    if flow.proto != IPPROTO_TCP || flow.l4_off != EthHdr::LEN + Ipv4Hdr::LEN {
        return None;
    }
    let tcp: TcpHdr = ctx.load(flow.l4_off).ok()?;
    if tcp.syn() == 0 || tcp.ack() != 0 || tcp.rst() != 0 {
        return None;
    }
    let eth: EthHdr = ctx.load(0).ok()?;
    let acknowledged = u32::from_be_bytes(tcp.seq).wrapping_add(1);

    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[6] = 0x40; // Don't Fragment
    ip[8] = 64;
    ip[9] = IPPROTO_TCP;
    ip[12..16].copy_from_slice(&flow.dst_addr);
    ip[16..20].copy_from_slice(&flow.src_addr);
    let ip_check = checksum_fold(checksum_add(0, &ip));
    ip[10..12].copy_from_slice(&ip_check.to_be_bytes());

    let mut segment = [0u8; 20];
    segment[0..2].copy_from_slice(&flow.dst_port.to_be_bytes());
    segment[2..4].copy_from_slice(&flow.src_port.to_be_bytes());
    segment[8..12].copy_from_slice(&acknowledged.to_be_bytes());
    segment[12] = 5 << 4;
    segment[13] = RST_ACK;
    let tcp_check = tcp_ipv4_checksum(flow.dst_addr, flow.src_addr, &segment);
    segment[16..18].copy_from_slice(&tcp_check.to_be_bytes());

    let mut macs = [0u8; 12];
    macs[0..6].copy_from_slice(&eth.src_addr);
    macs[6..12].copy_from_slice(&eth.dst_addr);

    // SAFETY: the context's own skb; the helper checks the length.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, RST_LEN, 0) } != 0 {
        return None;
    }
    ctx.store(0, &macs, 0).ok()?;
    ctx.store(EthHdr::LEN, &ip, 0).ok()?;
    ctx.store(flow.l4_off, &segment, 0).ok()?;
    // SAFETY: the context's own skb.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // Out of the pod's host-side interface: straight back into the pod.
    // SAFETY: a plain helper call.
    unsafe { bpf_redirect(ifindex, 0) };
    Some(TC_ACT_REDIRECT as i32)
}
