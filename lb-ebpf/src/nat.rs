//! Address and port rewriting with incremental checksum updates (RFC 1624).
//!
//! The kernel helpers do the arithmetic: they also handle `CHECKSUM_PARTIAL` skbs, which locally
//! generated traffic on veth carries, where the L4 field holds only the pseudo-header sum. An
//! address enters the L4 checksum through the pseudo-header (and IPv4's header checksum), one
//! 32-bit word at a time: one word for IPv4, up to four for IPv6.
//!
//! SCTP's checksum is a CRC32c over the SCTP packet alone: an address change leaves it valid, a
//! port change updates it (`lb_common::sctp_checksum_after_port_change`).
//!
//! A fragment of a longer datagram: the first one holds the transport header, whose checksum
//! covers the whole datagram and is updated the same way. A later one holds payload only: its
//! addresses change, and the IPv4 header checksum with them. (SCTP fragments are not
//! translated: see `packet::parse`.)
use aya_ebpf::bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR};
use lb_common::sctp_checksum_after_port_change;

use crate::{context::Packet, family::Family, packet::Flow};

/// Rewrites the destination to `addr:port` (DNAT towards a backend).
#[inline(always)]
pub fn rewrite_destination<A: Family>(
    ctx: &impl Packet,
    flow: &Flow<A>,
    addr: A,
    port: u16,
) -> Result<(), i64> {
    rewrite_address(ctx, flow, A::DST_OFF, flow.dst_addr, addr)?;
    rewrite_port(ctx, flow, flow.l4_off + 2, flow.dst_port, port)
}

/// Rewrites the source to `addr:port` (reverse NAT of a reply).
#[inline(always)]
pub fn rewrite_source<A: Family>(ctx: &impl Packet, flow: &Flow<A>, addr: A, port: u16) -> Result<(), i64> {
    rewrite_address(ctx, flow, A::SRC_OFF, flow.src_addr, addr)?;
    rewrite_port(ctx, flow, flow.l4_off, flow.src_port, port)
}

/// UDP: a zero checksum stays zero (see `packet::udp`); a result of zero is sent as 0xffff.
#[inline(always)]
fn udp_flag<A: Family>(flow: &Flow<A>) -> u64 {
    if flow.is_udp() {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    }
}

#[inline(always)]
fn rewrite_address<A: Family>(
    ctx: &impl Packet,
    flow: &Flow<A>,
    offset: usize,
    old: A,
    new: A,
) -> Result<(), i64> {
    if old == new {
        return Ok(());
    }
    let pseudo_hdr = u64::from(BPF_F_PSEUDO_HDR) | udp_flag(flow) | 4;
    let l4_checksum = !flow.is_sctp() && flow.has_transport_header();
    let (old_words, new_words) = (old.as_ref().as_chunks::<4>().0, new.as_ref().as_chunks::<4>().0);
    for (from, to) in old_words.iter().zip(new_words) {
        let (from, to) = (u32::from_ne_bytes(*from), u32::from_ne_bytes(*to));
        if from != to {
            if l4_checksum {
                ctx.l4_csum_replace(flow.l4_csum_off, from, to, pseudo_hdr)?;
            }
            if let Some(header_csum_off) = A::HEADER_CHECKSUM_OFF {
                ctx.l3_csum_replace(header_csum_off, from, to)?;
            }
        }
    }
    ctx.store(offset, &new)
}

#[inline(always)]
fn rewrite_port<A: Family>(
    ctx: &impl Packet,
    flow: &Flow<A>,
    offset: usize,
    old: u16,
    new: u16,
) -> Result<(), i64> {
    if old == new || !flow.has_transport_header() {
        return Ok(());
    }
    let (from, to) = (old.to_be(), new.to_be());
    if flow.is_sctp() {
        let field: [u8; 4] = ctx.load(flow.l4_csum_off).ok_or(-1i64)?;
        let updated = sctp_checksum(
            u32::from_ne_bytes(field),
            (offset - flow.l4_off) as u32,
            (flow.end - flow.l4_off) as u32,
            old,
            new,
        );
        ctx.store(flow.l4_csum_off, &updated.to_ne_bytes())?;
    } else {
        ctx.l4_csum_replace(flow.l4_csum_off, from.into(), to.into(), udp_flag(flow) | 2)?;
    }
    ctx.store(offset, &to)
}

/// The SCTP checksum field after a port change. A few hundred steps of bounded loops, in a
/// global function: the verifier checks it once, on its own, whatever the number of paths
/// that call it (a static function is checked anew on each).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn sctp_checksum(field: u32, port_offset: u32, len: u32, old: u16, new: u16) -> u32 {
    let field =
        sctp_checksum_after_port_change(field.to_ne_bytes(), port_offset as usize, len as usize, old, new);
    u32::from_ne_bytes(field)
}
