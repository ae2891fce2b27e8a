//! Refusing a connection to a service without endpoints the way a closed port does: a TCP SYN
//! gets a RST back, a UDP datagram or an SCTP INIT an ICMP (ICMPv6) port unreachable (as
//! kube-proxy's REJECT rule answers SCTP too), at once, so the client sees
//! "connection refused" instead of a timeout. Both are sent back out of the interface the packet
//! came in on, towards the pod. Replies are rate-limited per CPU (`SB_REJECT_LIMIT`).
//!
//! The reply is built in the packet itself, from fixed offsets: the headers come from
//! `lb_common`'s builders, only the quoted datagram stays where it was.
use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::{bpf_ktime_get_ns, bpf_redirect, bpf_skb_change_head, bpf_skb_change_tail},
    programs::TcContext,
};
use lb_common::{IPPROTO_TCP, Stat, icmp_error_header, tcp_reset as reset_segment};
use network_types::{eth::EthHdr, tcp::TcpHdr};

use crate::{
    checksum::sum_from,
    family::Family,
    maps::{SB_REJECT_LIMIT, SB_REJECT_TOKENS, count},
    packet::Flow,
};

/// The ICMP and ICMPv6 error header: type, code, checksum, 4 unused bytes.
const ICMP_HEADER_LEN: usize = 8;

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

/// Refuses the packet as a closed port would: a SYN gets a RST, a UDP datagram or an SCTP INIT a
/// port unreachable; anything else (a mid-stream TCP segment or SCTP chunk, a packet with IPv4
/// options or IPv6 extension headers, a fragment other than the first, which no ICMP error may be
/// about: RFC 1122 §3.2.2) is dropped.
#[inline(always)]
pub fn refuse<A: Family>(ctx: &TcContext, flow: &Flow<A>) -> i32 {
    if !flow.has_plain_header() || !flow.has_transport_header() {
        return TC_ACT_SHOT;
    }
    tcp_reset(ctx, flow)
        .or_else(|| port_unreachable(ctx, flow))
        .unwrap_or(TC_ACT_SHOT)
}

/// Rewrites a pure SYN (no ACK, no RST) into the RST|ACK its destination would answer with and
/// sends it back towards the pod. `None`: not such a SYN, left to the caller (which drops it).
#[inline(always)]
fn tcp_reset<A: Family>(ctx: &TcContext, flow: &Flow<A>) -> Option<i32> {
    if flow.proto != IPPROTO_TCP {
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
    let segment = reset_segment(
        (flow.dst_addr, flow.dst_port),
        (flow.src_addr, flow.src_port),
        acknowledged,
    );
    let ip = A::reply_header(flow.dst_addr, flow.src_addr, IPPROTO_TCP, segment.len() as u16);

    resize(ctx, EthHdr::LEN + A::HEADER_LEN + segment.len())?;
    ctx.store(0, &reply_ethernet::<A>(&eth), 0).ok()?;
    ctx.store(EthHdr::LEN, &ip, 0).ok()?;
    ctx.store(EthHdr::LEN + A::HEADER_LEN, &segment, 0).ok()?;
    Some(back_to_the_pod(ctx))
}

/// Turns a UDP datagram or SCTP INIT into the port unreachable the frontend would answer with,
/// quoting the packet from its IP header on, as far as `A::QUOTE_MAX` allows. `None`: neither.
#[inline(always)]
fn port_unreachable<A: Family>(ctx: &TcContext, flow: &Flow<A>) -> Option<i32> {
    if !(flow.is_udp() || flow.is_sctp() && flow.opens_connection()) {
        return None;
    }
    if !within_rate() {
        return Some(TC_ACT_SHOT);
    }
    let eth: EthHdr = ctx.load(0).ok()?;
    let quote_len = (flow.end - EthHdr::LEN).min(A::QUOTE_MAX);
    // The frame is cut to the quote (dropping the rest and any link-layer padding), and room for
    // the reply's IP and ICMP headers is made in front of it: the old Ethernet header's place
    // is taken by those, and a new one goes before them.
    resize(ctx, EthHdr::LEN + quote_len)?;
    let quote_sum = sum_from(ctx, EthHdr::LEN)?;
    let headers_len = A::HEADER_LEN + ICMP_HEADER_LEN;
    // SAFETY: the context's own skb; the helper checks the length.
    if unsafe { bpf_skb_change_head(ctx.skb.skb, headers_len as u32, 0) } != 0 {
        return None;
    }
    let icmp_len = (ICMP_HEADER_LEN + quote_len) as u16;
    let checksum_start = A::icmp_checksum_start(flow.dst_addr, flow.src_addr, icmp_len);
    let icmp = icmp_error_header(A::PORT_UNREACHABLE, checksum_start + quote_sum);
    let ip = A::reply_header(flow.dst_addr, flow.src_addr, A::ICMP, icmp_len);
    ctx.store(0, &reply_ethernet::<A>(&eth), 0).ok()?;
    ctx.store(EthHdr::LEN, &ip, 0).ok()?;
    ctx.store(EthHdr::LEN + A::HEADER_LEN, &icmp, 0).ok()?;
    Some(back_to_the_pod(ctx))
}

/// The reply's Ethernet header: the MAC addresses swapped as the host would have set them.
#[inline(always)]
fn reply_ethernet<A: Family>(eth: &EthHdr) -> EthHdr {
    EthHdr {
        dst_addr: eth.src_addr,
        src_addr: eth.dst_addr,
        ether_type: A::ETHER_TYPE,
    }
}

#[inline(always)]
fn resize(ctx: &TcContext, len: usize) -> Option<()> {
    // SAFETY: the context's own skb; the helper checks the length.
    (unsafe { bpf_skb_change_tail(ctx.skb.skb, len as u32, 0) } == 0).then_some(())
}

/// Sends the packet (already rewritten) straight back into the pod it came from, with the MAC
/// addresses swapped as the host would have set them: no routing, so no martian or reverse-path
/// check meets an address the pod itself uses.
#[inline(always)]
pub fn bounce(ctx: &TcContext) -> Option<i32> {
    let eth: EthHdr = ctx.load(0).ok()?;
    let macs = [eth.src_addr, eth.dst_addr];
    ctx.store(0, &macs, 0).ok()?;
    Some(back_to_the_pod(ctx))
}

/// Out of the pod's host-side interface it came in on: straight back into the pod.
#[inline(always)]
fn back_to_the_pod(ctx: &TcContext) -> i32 {
    // SAFETY: the context's own skb.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: a plain helper call.
    unsafe { bpf_redirect(ifindex, 0) };
    TC_ACT_REDIRECT
}
