//! Address and port rewriting with incremental checksum updates (RFC 1624).
//!
//! The kernel helpers do the arithmetic: they also handle `CHECKSUM_PARTIAL` skbs, which locally
//! generated traffic on veth carries, where the L4 field holds only the pseudo-header sum.
use aya_ebpf::bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR};

use crate::{
    context::Packet,
    packet::{Flow, IPV4_CSUM_OFF, IPV4_DST_OFF, IPV4_SRC_OFF},
};

/// Rewrites the destination to `addr:port` (DNAT towards a backend).
#[inline(always)]
pub fn rewrite_destination(ctx: &impl Packet, flow: &Flow, addr: [u8; 4], port: u16) -> Result<(), i64> {
    rewrite(
        ctx,
        flow,
        IPV4_DST_OFF,
        flow.dst_addr,
        addr,
        flow.l4_off + 2,
        flow.dst_port,
        port,
    )
}

/// Rewrites the source to `addr:port` (reverse NAT of a reply).
#[inline(always)]
pub fn rewrite_source(ctx: &impl Packet, flow: &Flow, addr: [u8; 4], port: u16) -> Result<(), i64> {
    rewrite(
        ctx,
        flow,
        IPV4_SRC_OFF,
        flow.src_addr,
        addr,
        flow.l4_off,
        flow.src_port,
        port,
    )
}

#[expect(clippy::too_many_arguments, reason = "one address and one port, old and new")]
#[inline(always)]
fn rewrite(
    ctx: &impl Packet,
    flow: &Flow,
    addr_off: usize,
    old_addr: [u8; 4],
    new_addr: [u8; 4],
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Result<(), i64> {
    // UDP: a zero checksum means "none" and stays zero; a result of zero is sent as 0xffff.
    let mangled_0 = if flow.is_udp() {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    if old_addr != new_addr {
        let (from, to) = (u32::from_ne_bytes(old_addr), u32::from_ne_bytes(new_addr));
        let pseudo_hdr = u64::from(BPF_F_PSEUDO_HDR) | mangled_0 | 4;
        ctx.l4_csum_replace(flow.l4_csum_off, from, to, pseudo_hdr)?;
        ctx.l3_csum_replace(IPV4_CSUM_OFF, from, to)?;
        ctx.store(addr_off, &new_addr)?;
    }
    if old_port != new_port {
        let (from, to) = (old_port.to_be(), new_port.to_be());
        ctx.l4_csum_replace(flow.l4_csum_off, from.into(), to.into(), mangled_0 | 2)?;
        ctx.store(port_off, &to)?;
    }
    Ok(())
}
