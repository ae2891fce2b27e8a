//! The reverse-path check of a pod's packets: their source must route back out of the interface
//! they came in on (asked of the kernel's FIB, so no CNI knowledge is needed). Without it a pod
//! could write another pod's address and port as its source and, through the conntrack entries
//! that tuple keys, take over that pod's replies (a SYN to another frontend of the same backend)
//! or close its flow (a RST).
//!
//! Checked are the packets that create or change flow state, and nothing else: those that open or
//! close a connection (a TCP SYN, FIN or RST; an SCTP INIT, ABORT or SHUTDOWN COMPLETE) to a
//! frontend or to the hairpin address, and the first packet of any new flow. A packet of an
//! established flow changes nothing but the time it was last seen, and carries nothing the pod
//! could not send to the backend's own address, so it costs no FIB lookup; traffic that is no
//! service's is the kernel's (`rp_filter`) to judge, not the datapath's.
//!
//! A FIB lookup costs about as much as the rest of a new flow's work, and a pod opens its
//! connections from one address: each CPU remembers, per interface, the source it last found to
//! route back out of it, for [`VERIFIED_FOR_NS`]. A route that moves is so noticed within that
//! time; a source found spoofed is looked up again on every packet.
use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_BLACKHOLE, BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_PROHIBIT,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LKUP_RET_UNREACHABLE, BPF_FIB_LOOKUP_SKIP_NEIGH, bpf_fib_lookup,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_ktime_get_ns},
    programs::TcContext,
};
use lb_common::{Stat, config, ct_flags};

use crate::{
    family::Family,
    maps::{SB_CONFIG, SB_VERIFIED_SOURCES, VERIFIED_SOURCE_SLOTS, count},
    packet::Flow,
    service,
};

/// How long a source found to route back out of its interface is taken as such without
/// another FIB lookup.
pub const VERIFIED_FOR_NS: u64 = 1_000_000_000;

/// A source found to route back out of interface `ifindex`, at `verified_ns`: an IPv4 address in
/// the first 4 bytes of `addr`, or an IPv6 one.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VerifiedSource {
    pub ifindex: u32,
    pub family: u32,
    pub addr: [u8; 16],
    pub verified_ns: u64,
}

/// The TCP flags (and the SCTP chunks standing for them) that open or close a connection.
const OPEN_OR_CLOSE: u8 = ct_flags::TCP_SYN | ct_flags::TCP_FIN | ct_flags::TCP_RST;

/// Whether `flow`'s packet opens or closes a connection to a frontend or to the hairpin address
/// from a source that does not route back out of its interface: counted, to be dropped.
#[inline(always)]
pub fn refuses_connection_change<A: Family>(ctx: &TcContext, flow: &Flow<A>) -> bool {
    flow.tcp_flags & OPEN_OR_CLOSE != 0
        && refuses(ctx, flow, || {
            flow.dst_addr == A::HAIRPIN || service::lookup_frontend(flow).is_some()
        })
}

/// Whether the first packet of a new service flow comes from a source that does not route back
/// out of its interface (one that opens a connection was checked already): counted, to be
/// dropped.
#[inline(always)]
pub fn refuses_new_flow<A: Family>(ctx: &TcContext, flow: &Flow<A>) -> bool {
    flow.tcp_flags & OPEN_OR_CLOSE == 0 && refuses(ctx, flow, || true)
}

/// Whether the check is on, `checked` says the packet is one to check, and its source, not
/// verified lately, does not route back out of its interface (counted).
#[inline(always)]
fn refuses<A: Family>(ctx: &TcContext, flow: &Flow<A>, checked: impl FnOnce() -> bool) -> bool {
    if SB_CONFIG.get(config::SOURCE_CHECK).copied().unwrap_or(0) == 0 {
        return false;
    }
    // SAFETY: the context pointer the kernel passed in is valid for the program's run.
    let ingress = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: a plain helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(slot) = SB_VERIFIED_SOURCES.get_ptr_mut(ingress % VERIFIED_SOURCE_SLOTS) else {
        return false;
    };
    let mut addr = [0u8; 16];
    addr[..size_of::<A>()].copy_from_slice(flow.src_addr.as_ref());
    let source = VerifiedSource {
        ifindex: ingress,
        family: u32::from(A::ADDRESS_FAMILY),
        addr,
        verified_ns: now,
    };
    // SAFETY: this CPU's slot; nothing else on this CPU runs while this program does.
    let known = unsafe { *slot };
    if (known.ifindex, known.family, known.addr) == (source.ifindex, source.family, source.addr)
        && now.wrapping_sub(known.verified_ns) < VERIFIED_FOR_NS
        || !checked()
    {
        return false;
    }
    if routes_back(ctx, flow, ingress) {
        // SAFETY: as above.
        unsafe { *slot = source };
        return false;
    }
    count(Stat::SpoofedSource);
    true
}

/// Whether the kernel's FIB sends a packet to `flow`'s source out of interface `ingress`. Not
/// when it sends it out of another, or nowhere (no route, a blackhole, unreachable, prohibited,
/// or a local address of the node); when it cannot say (forwarding off on the interface, a
/// tunnel route), the packet is given the benefit of the doubt.
#[inline(always)]
fn routes_back<A: Family>(ctx: &TcContext, flow: &Flow<A>, ingress: u32) -> bool {
    // SAFETY: a plain C struct, for which all zeroes is a valid value.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = A::ADDRESS_FAMILY;
    params.l4_protocol = flow.proto;
    // The way back: from the destination to the source.
    params.sport = flow.dst_port.to_be();
    params.dport = flow.src_port.to_be();
    params.ifindex = ingress;
    // A length that fits any MTU, so the lookup does not compare this packet's with the way
    // back's.
    params.__bindgen_anon_1.tot_len = A::HEADER_LEN as u16;
    // SAFETY: the unions hold 16 bytes; an address is 4 or 16.
    unsafe {
        let source = core::ptr::addr_of_mut!(params.__bindgen_anon_3).cast::<A>();
        source.write_unaligned(flow.dst_addr);
        let destination = core::ptr::addr_of_mut!(params.__bindgen_anon_4).cast::<A>();
        destination.write_unaligned(flow.src_addr);
    }
    // SAFETY: the context's own skb, and a parameter block of the size given.
    let verdict = unsafe {
        fib_lookup(
            ctx.skb.skb.cast(),
            &mut params,
            size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    match verdict as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => params.ifindex == ingress,
        BPF_FIB_LKUP_RET_BLACKHOLE
        | BPF_FIB_LKUP_RET_UNREACHABLE
        | BPF_FIB_LKUP_RET_PROHIBIT
        | BPF_FIB_LKUP_RET_NOT_FWDED => false,
        _ => true,
    }
}
