//! Refusing a connection to a service without endpoints the way a closed port does: a TCP SYN
//! gets a RST back, a UDP datagram an ICMP port unreachable, at once, so the client sees
//! "connection refused" instead of a timeout. Both are sent back out of the interface the packet
//! came in on, towards the pod. Replies are rate-limited per CPU (`SB_REJECT_LIMIT`).
use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::{bpf_ktime_get_ns, bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use lb_common::{IPPROTO_TCP, IPPROTO_UDP, Stat, checksum_add, checksum_fold, tcp_ipv4_checksum};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr};

use crate::{
    maps::{SB_REJECT_LIMIT, SB_REJECT_TOKENS, count},
    packet::Flow,
};

/// Whether one more reply may be generated now; a refused one is counted, and its packet is
/// dropped: a flood towards a dead service must not turn into a flood of replies.
#[inline(always)]
fn within_rate() -> bool {
    let limit = SB_REJECT_LIMIT.get(0).copied().unwrap_or_default();
    let Some(bucket) = SB_REJECT_TOKENS.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a plain helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: this CPU's bucket; nothing else on this CPU runs while this program does.
    if unsafe { (*bucket).take(&limit, now) } {
        return true;
    }
    count(Stat::RejectRateLimited);
    false
}

const RST_ACK: u8 = 0x14;
/// Ethernet, a 20-byte IPv4 header, a 20-byte TCP header.
const RST_LEN: u32 = 54;
/// Ethernet, IPv4, the ICMP header, and the quoted IPv4 header with the first 8 bytes after it.
const UNREACHABLE_LEN: u32 = 14 + 20 + 8 + 20 + 8;
const IPPROTO_ICMP: u8 = 1;

/// Refuses the packet as a closed port would: a SYN gets a RST, a UDP datagram an ICMP port
/// unreachable; anything else (a mid-stream TCP segment) is dropped.
#[inline(always)]
pub fn refuse(ctx: &TcContext, flow: &Flow) -> i32 {
    tcp_reset(ctx, flow)
        .or_else(|| port_unreachable(ctx, flow))
        .unwrap_or(TC_ACT_SHOT)
}

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
    if !within_rate() {
        return Some(TC_ACT_SHOT);
    }
    let eth: EthHdr = ctx.load(0).ok()?;
    let acknowledged = u32::from_be_bytes(tcp.seq).wrapping_add(1);

    let ip = reply_ipv4_header(flow, IPPROTO_TCP, 20);

    let mut segment = [0u8; 20];
    segment[0..2].copy_from_slice(&flow.dst_port.to_be_bytes());
    segment[2..4].copy_from_slice(&flow.src_port.to_be_bytes());
    segment[8..12].copy_from_slice(&acknowledged.to_be_bytes());
    segment[12] = 5 << 4;
    segment[13] = RST_ACK;
    let tcp_check = tcp_ipv4_checksum(flow.dst_addr, flow.src_addr, &segment);
    segment[16..18].copy_from_slice(&tcp_check.to_be_bytes());

    resize(ctx, RST_LEN)?;
    ctx.store(0, &swapped_macs(&eth), 0).ok()?;
    ctx.store(EthHdr::LEN, &ip, 0).ok()?;
    ctx.store(flow.l4_off, &segment, 0).ok()?;
    Some(back_to_the_pod(ctx))
}

/// Rewrites a UDP datagram (plain 20-byte IPv4 header) into the ICMP port unreachable the
/// frontend would answer with, quoting the datagram's IP header and first 8 bytes.
#[inline(always)]
pub fn port_unreachable(ctx: &TcContext, flow: &Flow) -> Option<i32> {
    if flow.proto != IPPROTO_UDP || flow.l4_off != EthHdr::LEN + Ipv4Hdr::LEN {
        return None;
    }
    if !within_rate() {
        return Some(TC_ACT_SHOT);
    }
    let eth: EthHdr = ctx.load(0).ok()?;
    let quoted_ip: [u8; 20] = ctx.load(EthHdr::LEN).ok()?;
    let quoted_udp: [u8; 8] = ctx.load(flow.l4_off).ok()?;
    let ip = reply_ipv4_header(flow, IPPROTO_ICMP, 8 + 20 + 8);
    // Type 3 (destination unreachable), code 3 (port unreachable), checksum, unused.
    let mut icmp = [3u8, 3, 0, 0, 0, 0, 0, 0];
    let sum = checksum_add(checksum_add(checksum_add(0, &icmp), &quoted_ip), &quoted_udp);
    icmp[2..4].copy_from_slice(&checksum_fold(sum).to_be_bytes());

    resize(ctx, UNREACHABLE_LEN)?;
    ctx.store(0, &swapped_macs(&eth), 0).ok()?;
    ctx.store(EthHdr::LEN, &ip, 0).ok()?;
    ctx.store(flow.l4_off, &icmp, 0).ok()?;
    ctx.store(flow.l4_off + 8, &quoted_ip, 0).ok()?;
    ctx.store(flow.l4_off + 28, &quoted_udp, 0).ok()?;
    Some(back_to_the_pod(ctx))
}

/// An IPv4 header from the frontend the client dialled back to the client.
#[inline(always)]
fn reply_ipv4_header(flow: &Flow, proto: u8, payload_len: u16) -> [u8; 20] {
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(20 + payload_len).to_be_bytes());
    ip[6] = 0x40; // Don't Fragment
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&flow.dst_addr);
    ip[16..20].copy_from_slice(&flow.src_addr);
    let check = checksum_fold(checksum_add(0, &ip));
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    ip
}

#[inline(always)]
fn swapped_macs(eth: &EthHdr) -> [u8; 12] {
    let mut macs = [0u8; 12];
    macs[0..6].copy_from_slice(&eth.src_addr);
    macs[6..12].copy_from_slice(&eth.dst_addr);
    macs
}

#[inline(always)]
fn resize(ctx: &TcContext, len: u32) -> Option<()> {
    // SAFETY: the context's own skb; the helper checks the length.
    (unsafe { bpf_skb_change_tail(ctx.skb.skb, len, 0) } == 0).then_some(())
}

/// Out of the pod's host-side interface it came in on: straight back into the pod.
#[inline(always)]
fn back_to_the_pod(ctx: &TcContext) -> i32 {
    // SAFETY: the context's own skb.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: a plain helper call.
    unsafe { bpf_redirect(ifindex, 0) };
    TC_ACT_REDIRECT as i32
}
