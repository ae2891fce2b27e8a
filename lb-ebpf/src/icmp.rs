//! ICMP errors about a service flow, translated back on their way to the client, as netfilter
//! does. A router's "packet too big" or a backend's "port unreachable" quotes the packet as it
//! left the client's node, client → backend; the client's socket knows the flow as client →
//! frontend and would not recognise it. So the quote gets the frontend back (and the error's
//! source too when the backend itself reports): path-MTU discovery through a Service works,
//! and a connected UDP socket hears "connection refused" when its backend's port closes.
use aya_ebpf::programs::TcContext;
use lb_common::{CtEntry, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, checksum_fold, checksum_replace};
use network_types::eth::EthHdr;

use crate::{
    checksum::{SUM_MAX, sum_from},
    conntrack,
    family::Family,
    packet::Quoted,
};

/// The ICMP (ICMPv6) header before the quote: type, code, checksum and 4 more bytes.
const ICMP_HEADER_LEN: usize = 8;
/// The quoted transport header's first bytes, which every error carries (RFC 792, RFC 4443):
/// the ports, and UDP's checksum.
const QUOTED_L4_LEN: usize = 8;
/// A quoted TCP checksum is followed only when the quote holds the whole fixed header, as
/// netfilter does.
const TCP_HEADER_LEN: usize = 20;

/// Translates the packet if it is an ICMP error quoting the DNATed packet of a tracked flow.
/// `None`: it is not one (or could not be read), and is left as it came.
#[inline(never)]
pub fn translate_error<A: Family>(ctx: &TcContext) -> Option<()> {
    let network = A::parse_network(ctx)?;
    let icmp = network.l4_off;
    // Plain headers, no fragment, and nothing after the IP packet: the checksum is summed to the
    // frame's end.
    // A message of IPv6's minimum MTU or more (SUM_MAX) is no error a router or host sends.
    if network.proto != A::ICMP
        || network.fragment.is_some()
        || icmp != EthHdr::LEN + A::HEADER_LEN
        || network.end != ctx.len() as usize
        || network.end - icmp >= SUM_MAX
    {
        return None;
    }
    let [kind, _code]: [u8; 2] = ctx.load(icmp).ok()?;
    let len = (network.end - icmp) as u16;
    let start = A::icmp_checksum_start(network.src_addr, network.dst_addr, len);
    if !A::is_icmp_error(kind) || checksum_fold(start + sum_from(ctx, icmp)?) != 0 {
        return None;
    }
    let quoted = A::parse_quoted(ctx, icmp + ICMP_HEADER_LEN)?;
    if !matches!(quoted.proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP)
        || quoted.l4_off + QUOTED_L4_LEN > network.end
    {
        return None;
    }
    let [src_port, dst_port]: [[u8; 2]; 2] = ctx.load(quoted.l4_off).ok()?;
    let (client, backend) = (
        (quoted.src_addr, u16::from_be_bytes(src_port)),
        (quoted.dst_addr, u16::from_be_bytes(dst_port)),
    );
    let frontend = conntrack::frontend_of(backend, client, quoted.proto)?;
    rewrite_quote(ctx, &quoted, network.end, dst_port, &frontend)?;
    let source = if network.src_addr == quoted.dst_addr {
        rewrite_outer_source(ctx, network.src_addr, frontend.nat_addr)?;
        frontend.nat_addr
    } else {
        network.src_addr
    };
    // The message changed in several places: its checksum is summed anew.
    ctx.store(icmp + 2, &[0u8; 2], 0).ok()?;
    let start = A::icmp_checksum_start(source, network.dst_addr, len);
    let checksum = checksum_fold(start + sum_from(ctx, icmp)?);
    ctx.store(icmp + 2, &checksum.to_be_bytes(), 0).ok()
}

/// The quoted packet's destination becomes the frontend, its IPv4 header checksum and its
/// transport checksum following as they would in the packet itself: UDP's unless 0, TCP's if
/// its whole header is quoted. SCTP's CRC covers no address, and its port change is not
/// followed (a quote is rarely the whole packet the CRC needs).
#[inline(always)]
fn rewrite_quote<A: Family>(
    ctx: &TcContext,
    quoted: &Quoted<A>,
    end: usize,
    old_port: [u8; 2],
    frontend: &CtEntry<A>,
) -> Option<()> {
    let header = quoted.l4_off;
    let new_port = frontend.nat_port.to_be_bytes();
    let (old_addr, new_addr) = (quoted.dst_addr, frontend.nat_addr);
    // The quoted header starts right after the ICMP header, where the outer one is plain.
    let quote = EthHdr::LEN + A::HEADER_LEN + ICMP_HEADER_LEN;
    if let Some(checksum_off) = A::HEADER_CHECKSUM_OFF {
        let at = quote + checksum_off - EthHdr::LEN;
        replace_in_checksum(ctx, at, old_addr.as_ref(), new_addr.as_ref(), false)?;
    }
    let l4_checksum = match quoted.proto {
        IPPROTO_UDP => Some((header + 6, true)),
        IPPROTO_TCP if header + TCP_HEADER_LEN <= end => Some((header + 16, false)),
        _ => None,
    };
    if let Some((at, udp)) = l4_checksum {
        let zero_is_none: [u8; 2] = ctx.load(at).ok()?;
        if !(udp && zero_is_none == [0, 0]) {
            replace_in_checksum(ctx, at, old_addr.as_ref(), new_addr.as_ref(), udp)?;
            replace_in_checksum(ctx, at, &old_port, &new_port, udp)?;
        }
    }
    ctx.store(quote + A::DST_OFF - EthHdr::LEN, &new_addr, 0).ok()?;
    ctx.store(header + 2, &new_port, 0).ok()
}

/// The backend itself reported: the error comes from the frontend the client knows.
#[inline(always)]
fn rewrite_outer_source<A: Family>(ctx: &TcContext, old: A, new: A) -> Option<()> {
    if let Some(checksum_off) = A::HEADER_CHECKSUM_OFF {
        replace_in_checksum(ctx, checksum_off, old.as_ref(), new.as_ref(), false)?;
    }
    ctx.store(A::SRC_OFF, &new, 0).ok()
}

/// Updates the checksum at `at` for bytes it covers changed from `old` to `new` (RFC 1624). A
/// UDP checksum that comes out 0 is sent as 0xffff, 0 meaning "none".
#[inline(always)]
fn replace_in_checksum(ctx: &TcContext, at: usize, old: &[u8], new: &[u8], udp: bool) -> Option<()> {
    let checksum: [u8; 2] = ctx.load(at).ok()?;
    let mut updated = checksum_replace(u16::from_be_bytes(checksum), old, new);
    if udp && updated == 0 {
        updated = 0xffff;
    }
    ctx.store(at, &updated.to_be_bytes(), 0).ok()
}
