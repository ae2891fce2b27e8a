//! Parsing: just enough of Ethernet, IPv4 or IPv6 and TCP/UDP/SCTP to find a flow's 5-tuple and
//! the offsets NAT rewrites. Whatever cannot be parsed in full is not ours and passes untouched.
//! A fragment other than the first has no transport header: its ports are those its datagram's
//! first fragment carried (see [`fragment`](crate::fragment)).
use lb_common::{
    IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, Ipv4, Ipv6, SCTP_CHECKSUM_OFFSET, ct_flags, flow_hash,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::{
    context::{Aligned, Packet},
    family::Family,
    fragment::{self, Fragment},
};

const IPV4_MORE_FRAGMENTS: u8 = 0b001;

/// IPv6 extension headers walked to find the transport header (RFC 8200 §4): each starts with
/// the next header's number and its own length in 8-byte units, not counting the first 8.
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_DESTINATION_OPTIONS: u8 = 60;
/// The fragment header (RFC 8200 §4.5): 8 bytes, its offset in 8-byte units in the top 13 bits
/// of its third and fourth bytes, "more fragments" in the lowest, then the identification.
const IPV6_FRAGMENT: u8 = 44;
const IPV6_FRAGMENT_HEADER_LEN: usize = 8;
/// More extension headers than this: not ours. AH or ESP ends the walk too, as no transport
/// protocol a frontend has, and so does a fragment header followed by anything but a transport
/// header (Linux puts it last).
const IPV6_MAX_EXTENSION_HEADERS: usize = 4;

/// SCTP's common header (ports, verification tag, checksum) and the chunk header after it (RFC
/// 9260 §3): what a packet must hold at least.
const SCTP_COMMON_HEADER_LEN: usize = 12;
const SCTP_CHUNK_HEADER_LEN: usize = 4;
/// The chunk types that open and close an association (RFC 9260 §3.2).
const SCTP_INIT: u8 = 1;
const SCTP_INIT_ACK: u8 = 2;
const SCTP_ABORT: u8 = 6;
const SCTP_SHUTDOWN_COMPLETE: u8 = 14;

/// The EtherType of the frame, as `EthHdr::ether_type` holds it.
#[inline(always)]
pub fn ether_type(ctx: &impl Packet) -> Option<u16> {
    ctx.load::<EthHdr>(0).map(|eth| eth.ether_type)
}

/// A whole network header, with where its transport header starts and its packet ends.
pub struct Network<A> {
    pub src_addr: A,
    pub dst_addr: A,
    /// The transport protocol (after any extension headers).
    pub proto: u8,
    pub l4_off: usize,
    /// Offset just past the IP packet as its header gives its length (link-layer padding
    /// after it excluded).
    pub end: usize,
    /// Set when the packet is a fragment of a longer datagram (an IPv6 atomic fragment, offset
    /// 0 with no more to come, is a whole packet).
    pub fragment: Option<Fragment>,
}

/// What of its datagram a packet holds.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// All of it: an unfragmented packet.
    Whole,
    /// The first fragment: the transport header, the rest of the datagram to follow.
    First,
    /// A later fragment: payload only, its ports found by its datagram.
    Later,
}

pub struct Flow<A> {
    pub src_addr: A,
    pub dst_addr: A,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// TCP header flags as on the wire (`lb_common::ct_flags::TCP_*`); for SCTP, the flags its
    /// first chunk stands for (see [`sctp`]); 0 for UDP.
    pub tcp_flags: u8,
    /// Offset of the L4 header (IPv4 options and IPv6 extension headers honoured); of the
    /// payload in a later fragment.
    pub l4_off: usize,
    /// Offset of the L4 checksum (meaningless in a later fragment).
    pub l4_csum_off: usize,
    /// Offset just past the IP packet.
    pub end: usize,
    /// What of its datagram the packet holds.
    pub piece: Piece,
}

impl<A: Family> Flow<A> {
    pub fn is_udp(&self) -> bool {
        self.proto == IPPROTO_UDP
    }

    pub fn is_sctp(&self) -> bool {
        self.proto == IPPROTO_SCTP
    }

    /// A TCP connection or an SCTP association: it has a beginning and an end, which conntrack
    /// follows, and it stays with its backend.
    pub fn is_connection(&self) -> bool {
        self.proto == IPPROTO_TCP || self.is_sctp()
    }

    /// Whether the packet opens a connection: a TCP SYN, or an SCTP INIT.
    #[inline(always)]
    pub fn opens_connection(&self) -> bool {
        self.is_connection() && self.tcp_flags & (ct_flags::TCP_SYN | ct_flags::TCP_ACK) == ct_flags::TCP_SYN
    }

    /// The 5-tuple's hash, the same on every node (see `lb_common::flow_hash`).
    #[inline(always)]
    pub fn hash(&self) -> u32 {
        flow_hash(
            self.src_addr,
            self.dst_addr,
            self.src_port,
            self.dst_port,
            self.proto,
        )
    }

    /// Whether nothing lies between the fixed network header and the transport header (no IPv4
    /// options, no IPv6 extension headers).
    #[inline(always)]
    pub fn has_plain_header(&self) -> bool {
        self.l4_off == EthHdr::LEN + A::HEADER_LEN
    }

    /// Whether the packet holds the transport header: all but a later fragment.
    #[inline(always)]
    pub fn has_transport_header(&self) -> bool {
        self.piece != Piece::Later
    }
}

/// The transport header's ports, checksum offset and length.
struct Transport {
    src_port: [u8; 2],
    dst_port: [u8; 2],
    csum_off: usize,
    /// The TCP header with its options, the whole UDP datagram as its header says, or SCTP's
    /// headers up to the first chunk's.
    len: usize,
    /// What of it a first fragment must hold: all but UDP's payload.
    header_len: usize,
    tcp_flags: u8,
}

/// The flow of a frame of family `A` (the caller matched its EtherType). Another transport
/// protocol is one more arm giving its `Transport`.
#[inline(always)]
pub fn parse<A: Family>(ctx: &impl Packet) -> Option<Flow<A>> {
    let network = A::parse_network(ctx)?;
    if !matches!(network.proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) {
        return None;
    }
    let piece = match network.fragment {
        None => Piece::Whole,
        // An SCTP packet's CRC32c covers all of it, so no fragment of one can have a port
        // rewritten; SCTP cuts its messages to fit the path MTU itself (RFC 9260 §6.9).
        Some(_) if network.proto == IPPROTO_SCTP => return None,
        Some(fragment) if fragment.first => Piece::First,
        Some(fragment) => return later_fragment(&network, fragment),
    };
    let l4_off = network.l4_off;
    let transport = match network.proto {
        IPPROTO_TCP => tcp(ctx, l4_off)?,
        IPPROTO_UDP => udp(ctx, l4_off)?,
        _ => sctp(ctx, l4_off)?,
    };
    // The TCP header with its options, the UDP datagram as long as its header says, or SCTP's
    // first chunk header must fit in the IP packet (the loads above only checked that the fixed
    // header is in the frame); in a first fragment, the headers.
    let len = match piece {
        Piece::Whole => transport.len,
        _ => transport.header_len,
    };
    if l4_off + len > network.end {
        return None;
    }
    if let Some(fragment) = network.fragment {
        fragment::remember(&network, fragment, transport.src_port, transport.dst_port);
    }
    Some(Flow {
        src_addr: network.src_addr,
        dst_addr: network.dst_addr,
        src_port: u16::from_be_bytes(transport.src_port),
        dst_port: u16::from_be_bytes(transport.dst_port),
        proto: network.proto,
        tcp_flags: transport.tcp_flags,
        l4_off,
        l4_csum_off: transport.csum_off,
        end: network.end,
        piece,
    })
}

/// A later fragment of a datagram whose first fragment was seen, with that one's ports.
#[inline(always)]
fn later_fragment<A: Family>(network: &Network<A>, fragment: Fragment) -> Option<Flow<A>> {
    // Its headers must fit in the packet, as a transport header must.
    if network.l4_off > network.end {
        return None;
    }
    let (src_port, dst_port) = fragment::ports(network, fragment)?;
    Some(Flow {
        src_addr: network.src_addr,
        dst_addr: network.dst_addr,
        src_port,
        dst_port,
        proto: network.proto,
        tcp_flags: 0,
        l4_off: network.l4_off,
        l4_csum_off: network.l4_off,
        end: network.end,
        piece: Piece::Later,
    })
}

#[inline(always)]
fn tcp(ctx: &impl Packet, l4_off: usize) -> Option<Transport> {
    let tcp: TcpHdr = ctx.load(l4_off)?;
    let len = usize::from(tcp.doff()) * 4;
    if len < TcpHdr::LEN {
        return None;
    }
    let flags = tcp.fin() | tcp.syn() << 1 | tcp.rst() << 2 | tcp.ack() << 4;
    Some(Transport {
        src_port: tcp.source,
        dst_port: tcp.dest,
        csum_off: l4_off + 16,
        len,
        header_len: len,
        tcp_flags: flags as u8,
    })
}

/// A UDP checksum of zero is translated and stays zero: "none" over IPv4; over IPv6 invalid
/// unless the receiver allows it (RFC 6935), and a middlebox forwards it all the same (RFC 6936
/// §5), as netfilter's NAT does.
#[inline(always)]
fn udp(ctx: &impl Packet, l4_off: usize) -> Option<Transport> {
    let udp: UdpHdr = ctx.load(l4_off)?;
    let len = usize::from(udp.len());
    if len < UdpHdr::LEN {
        return None;
    }
    Some(Transport {
        src_port: udp.src,
        dst_port: udp.dst,
        csum_off: l4_off + 6,
        len,
        header_len: UdpHdr::LEN,
        tcp_flags: 0,
    })
}

/// SCTP's common header, and its first chunk's type standing for TCP flags, so that conntrack
/// follows an association as a connection: INIT opens it (a SYN), INIT ACK answers (SYN+ACK),
/// ABORT resets it (RST), SHUTDOWN COMPLETE ends it (FIN); anything else is traffic on it (ACK).
#[inline(always)]
fn sctp(ctx: &impl Packet, l4_off: usize) -> Option<Transport> {
    let header: [u8; SCTP_COMMON_HEADER_LEN + SCTP_CHUNK_HEADER_LEN] = ctx.load(l4_off)?;
    let flags = match header[SCTP_COMMON_HEADER_LEN] {
        SCTP_INIT => ct_flags::TCP_SYN,
        SCTP_INIT_ACK => ct_flags::TCP_SYN | ct_flags::TCP_ACK,
        SCTP_ABORT => ct_flags::TCP_RST,
        SCTP_SHUTDOWN_COMPLETE => ct_flags::TCP_FIN | ct_flags::TCP_ACK,
        _ => ct_flags::TCP_ACK,
    };
    Some(Transport {
        src_port: [header[0], header[1]],
        dst_port: [header[2], header[3]],
        csum_off: l4_off + SCTP_CHECKSUM_OFFSET,
        len: header.len(),
        header_len: header.len(),
        tcp_flags: flags,
    })
}

/// The packet an ICMP error quotes: its addresses, transport protocol and where its transport
/// header starts (the quote may end anywhere after that).
pub struct Quoted<A> {
    pub src_addr: A,
    pub dst_addr: A,
    pub proto: u8,
    pub l4_off: usize,
}

/// A quoted IPv4 header at `at` (IHL honoured), unless it quotes a fragment other than the first.
#[inline(always)]
pub fn ipv4_quoted(ctx: &impl Packet, at: usize) -> Option<Quoted<Ipv4>> {
    let ip: Ipv4Hdr = ctx.load(at)?;
    let ihl = usize::from(ip.ihl());
    if ip.version() != 4 || ihl < Ipv4Hdr::LEN || ip.frag_offset() != 0 {
        return None;
    }
    Some(Quoted {
        src_addr: ip.src_addr,
        dst_addr: ip.dst_addr,
        proto: ip.proto,
        l4_off: at + ihl,
    })
}

/// A quoted IPv6 header at `at`; its transport header right after it (a sender's extension
/// headers are not walked in a quote).
#[inline(always)]
pub fn ipv6_quoted(ctx: &impl Packet, at: usize) -> Option<Quoted<Ipv6>> {
    let Aligned(ip) = ctx.load_aligned::<Ipv6Hdr>(at)?;
    if ip.version() != 6 {
        return None;
    }
    Some(Quoted {
        src_addr: ip.src_addr,
        dst_addr: ip.dst_addr,
        proto: ip.next_hdr,
        l4_off: at + Ipv6Hdr::LEN,
    })
}

/// An IPv4 header (IHL honoured), unless the packet is cut shorter than its total length.
#[inline(always)]
pub fn ipv4_network(ctx: &impl Packet) -> Option<Network<Ipv4>> {
    let ip: Ipv4Hdr = ctx.load(EthHdr::LEN)?;
    let ihl = usize::from(ip.ihl());
    if ip.version() != 4 || ihl < Ipv4Hdr::LEN {
        return None;
    }
    let offset = ip.frag_offset();
    let fragment = (offset != 0 || ip.frag_flags() & IPV4_MORE_FRAGMENTS != 0).then_some(Fragment {
        id: u32::from(ip.id()),
        first: offset == 0,
    });
    // A packet longer than its frame was cut on the way: not ours to rewrite (the kernel drops
    // it).
    let ip_len = usize::from(ip.tot_len());
    if ip_len < ihl || ip_len > ctx.len().saturating_sub(EthHdr::LEN) {
        return None;
    }
    Some(Network {
        src_addr: ip.src_addr,
        dst_addr: ip.dst_addr,
        proto: ip.proto,
        l4_off: EthHdr::LEN + ihl,
        end: EthHdr::LEN + ip_len,
        fragment,
    })
}

/// An IPv6 header and the extension headers after it, unless the packet is cut shorter than its
/// payload length says, or the walk meets AH, ESP, a routing header with segments left (the
/// destination is not the final one the checksum covers) or too many extension headers: then the
/// transport protocol is none a frontend has. A fragment header ends the walk: what follows it is
/// the transport header (the first fragment) or payload (a later one).
#[inline(always)]
pub fn ipv6_network(ctx: &impl Packet) -> Option<Network<Ipv6>> {
    let Aligned(ip) = ctx.load_aligned::<Ipv6Hdr>(EthHdr::LEN)?;
    if ip.version() != 6 {
        return None;
    }
    let end = EthHdr::LEN + Ipv6Hdr::LEN + usize::from(ip.payload_len());
    if end > ctx.len() {
        return None;
    }
    let mut proto = ip.next_hdr;
    let mut l4_off = EthHdr::LEN + Ipv6Hdr::LEN;
    let mut fragment = None;
    for _ in 0..IPV6_MAX_EXTENSION_HEADERS {
        if !matches!(
            proto,
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DESTINATION_OPTIONS | IPV6_FRAGMENT
        ) {
            break;
        }
        let [next, len, third, fourth]: [u8; 4] = ctx.load(l4_off)?;
        if proto == IPV6_FRAGMENT {
            let id: [u8; 4] = ctx.load(l4_off + 4)?;
            let offset = u16::from_be_bytes([third, fourth]) >> 3;
            let more = fourth & 1 != 0;
            // An atomic fragment (offset 0, no more to come) is a whole packet.
            fragment = (offset != 0 || more).then_some(Fragment {
                id: u32::from_be_bytes(id),
                first: offset == 0,
            });
            proto = next;
            l4_off += IPV6_FRAGMENT_HEADER_LEN;
            break;
        }
        if proto == IPV6_ROUTING && fourth != 0 {
            return None;
        }
        proto = next;
        l4_off += (usize::from(len) + 1) * 8;
    }
    Some(Network {
        src_addr: ip.src_addr,
        dst_addr: ip.dst_addr,
        proto,
        l4_off,
        end,
        fragment,
    })
}
