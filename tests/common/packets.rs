//! Crafted frames for BPF_PROG_TEST_RUN, of either address family, and checks on what comes
//! out, with checksums verified by etherparse, which computes them from scratch.
use std::fmt::Debug;

use etherparse::{
    Ethernet2Header, IpHeaders, IpNumber, NetHeaders, PacketBuilder, PacketBuilderStep, PacketHeaders,
    TransportHeader,
};

/// An address and a port.
pub type Endpoint<A = [u8; 4]> = (A, u16);

const SRC_MAC: [u8; 6] = [2, 0, 0, 0, 0, 20];
const DST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

/// `fd00::a.b.c.d`: the IPv6 twin of an IPv4 address of the tests.
pub const fn v6(v4: [u8; 4]) -> [u8; 16] {
    let [a, b, c, d] = v4;
    [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, a, b, c, d]
}

/// An address family as the tests build its packets (`[u8; 4]` or `[u8; 16]`) and program its
/// maps.
pub trait Family: lb_userspace::datapath::maps::Family + Debug {
    /// Ethernet and this family's IP header, from `src` to `dst`.
    fn ip(ethernet: PacketBuilderStep<Ethernet2Header>, src: Self, dst: Self)
    -> PacketBuilderStep<IpHeaders>;
    /// The (source, destination) of a header of this family.
    fn addresses(net: &NetHeaders) -> Option<(Self, Self)>;
}

impl Family for [u8; 4] {
    fn ip(
        ethernet: PacketBuilderStep<Ethernet2Header>,
        src: Self,
        dst: Self,
    ) -> PacketBuilderStep<IpHeaders> {
        ethernet.ipv4(src, dst, 64)
    }

    fn addresses(net: &NetHeaders) -> Option<(Self, Self)> {
        match net {
            NetHeaders::Ipv4(ip, _) => Some((ip.source, ip.destination)),
            _ => None,
        }
    }
}

impl Family for [u8; 16] {
    fn ip(
        ethernet: PacketBuilderStep<Ethernet2Header>,
        src: Self,
        dst: Self,
    ) -> PacketBuilderStep<IpHeaders> {
        ethernet.ipv6(src, dst, 64)
    }

    fn addresses(net: &NetHeaders) -> Option<(Self, Self)> {
        match net {
            NetHeaders::Ipv6(ip, _) => Some((ip.source, ip.destination)),
            _ => None,
        }
    }
}

fn builder<A: Family>(src: A, dst: A) -> PacketBuilderStep<IpHeaders> {
    A::ip(PacketBuilder::ethernet2(SRC_MAC, DST_MAC), src, dst)
}

fn written(builder: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut packet = Vec::new();
    builder(&mut packet);
    packet
}

pub fn tcp_syn<A: Family>(src: Endpoint<A>, dst: Endpoint<A>) -> Vec<u8> {
    let builder = builder(src.0, dst.0).tcp(src.1, dst.1, 1000, 64240).syn();
    written(|packet| builder.write(packet, &[]).unwrap())
}

pub fn tcp_data<A: Family>(src: Endpoint<A>, dst: Endpoint<A>, payload: &[u8]) -> Vec<u8> {
    let builder = A::ip(PacketBuilder::ethernet2(DST_MAC, SRC_MAC), src.0, dst.0)
        .tcp(src.1, dst.1, 5000, 64240)
        .ack(1001)
        .psh();
    written(|packet| builder.write(packet, payload).unwrap())
}

/// A FIN|ACK, or a RST, closing a flow.
pub fn tcp_close<A: Family>(src: Endpoint<A>, dst: Endpoint<A>, reset: bool) -> Vec<u8> {
    let builder = builder(src.0, dst.0).tcp(src.1, dst.1, 5000, 64240);
    let builder = if reset {
        builder.rst()
    } else {
        builder.fin().ack(1001)
    };
    written(|packet| builder.write(packet, &[]).unwrap())
}

pub fn udp<A: Family>(src: Endpoint<A>, dst: Endpoint<A>, payload: &[u8]) -> Vec<u8> {
    let builder = builder(src.0, dst.0).udp(src.1, dst.1);
    written(|packet| builder.write(packet, payload).unwrap())
}

/// SCTP chunk types (RFC 9260 §3.2) the tests send.
pub mod sctp_chunk {
    pub const DATA: u8 = 0;
    pub const INIT: u8 = 1;
    pub const INIT_ACK: u8 = 2;
    pub const ABORT: u8 = 6;
    pub const SHUTDOWN_COMPLETE: u8 = 14;
}

const CASTAGNOLI: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// An SCTP packet (common header and one chunk of `chunk_type` carrying `value`) with its CRC32c,
/// which covers the SCTP packet alone (RFC 9260 §6.8).
pub fn sctp_packet(src_port: u16, dst_port: u16, chunk_type: u8, value: &[u8]) -> Vec<u8> {
    let mut packet = Vec::new();
    packet.extend_from_slice(&src_port.to_be_bytes());
    packet.extend_from_slice(&dst_port.to_be_bytes());
    // The verification tag; an INIT carries 0.
    let tag: u32 = if chunk_type == sctp_chunk::INIT {
        0
    } else {
        0x5eed_5eed
    };
    packet.extend_from_slice(&tag.to_be_bytes());
    packet.extend_from_slice(&[0; 4]);
    packet.extend_from_slice(&[chunk_type, 0]);
    packet.extend_from_slice(&((4 + value.len()) as u16).to_be_bytes());
    packet.extend_from_slice(value);
    packet.resize(packet.len().next_multiple_of(4), 0);
    let crc = CASTAGNOLI.checksum(&packet);
    packet[8..12].copy_from_slice(&crc.to_le_bytes());
    packet
}

/// An SCTP packet's (source port, destination port, first chunk type, chunk value), after
/// asserting that its CRC32c is what a computation from scratch gives.
pub fn parse_sctp(packet: &[u8]) -> (u16, u16, u8, Vec<u8>) {
    assert!(packet.len() >= 16, "an SCTP packet holds a chunk: {packet:?}");
    let mut zeroed = packet.to_vec();
    zeroed[8..12].fill(0);
    assert_eq!(
        packet[8..12],
        CASTAGNOLI.checksum(&zeroed).to_le_bytes(),
        "SCTP CRC32c"
    );
    // The chunk's length counts its 4-byte header.
    let chunk_end = 12 + usize::from(u16::from_be_bytes([packet[14], packet[15]]));
    (
        u16::from_be_bytes([packet[0], packet[1]]),
        u16::from_be_bytes([packet[2], packet[3]]),
        packet[12],
        packet[16..chunk_end.clamp(16, packet.len())].to_vec(),
    )
}

/// A frame carrying an SCTP packet with one chunk.
pub fn sctp<A: Family>(src: Endpoint<A>, dst: Endpoint<A>, chunk_type: u8, value: &[u8]) -> Vec<u8> {
    let payload = sctp_packet(src.1, dst.1, chunk_type, value);
    written(|packet| {
        builder(src.0, dst.0)
            .write(packet, IpNumber::SCTP, &payload)
            .unwrap()
    })
}

/// A frame's SCTP (source, destination, first chunk type), after asserting its IPv4 header
/// checksum and SCTP CRC32c.
pub fn sctp_with_valid_checksums<A: Family>(frame: &[u8]) -> (Endpoint<A>, Endpoint<A>, u8) {
    let (headers, src, dst) = ip_with_valid_checksum::<A>(frame);
    let (src_port, dst_port, chunk_type, _) = parse_sctp(headers.payload.slice());
    ((src, src_port), (dst, dst_port), chunk_type)
}

/// Where an IPv6 frame's next header field and payload length lie, and its extension headers
/// start.
const IPV6_PAYLOAD_LEN: usize = 14 + 4;
const IPV6_NEXT_HEADER: usize = 14 + 6;
const IPV6_EXTENSIONS: usize = 14 + 40;

/// `packet` (IPv6, without extension headers) with extension headers of the given (type, length
/// in 8-byte units after the first 8) inserted after its fixed header, each filled with `0x01`
/// bytes (PadN-like options) and, for a routing header, `segments_left` in its fourth byte. The
/// L4 checksum stays valid: the pseudo-header does not cover extension headers.
pub fn with_ipv6_extensions(packet: &[u8], headers: &[(u8, u8)], segments_left: u8) -> Vec<u8> {
    let mut next = packet[IPV6_NEXT_HEADER];
    let mut inserted = Vec::new();
    for &(kind, len) in headers.iter().rev() {
        let mut header = vec![0x01; (usize::from(len) + 1) * 8];
        header[0] = next;
        header[1] = len;
        if kind == 43 {
            header[2] = 0; // routing type 0
            header[3] = segments_left;
        } else {
            // A PadN option filling the header: type 1, its length, then zeros.
            header[2] = 1;
            header[3] = (header.len() - 4) as u8;
            header[4..].fill(0);
        }
        header.extend_from_slice(&inserted);
        inserted = header;
        next = kind;
    }
    let mut out = packet[..IPV6_EXTENSIONS].to_vec();
    out[IPV6_NEXT_HEADER] = next;
    let payload_len = u16::from_be_bytes([out[IPV6_PAYLOAD_LEN], out[IPV6_PAYLOAD_LEN + 1]]);
    let payload_len = payload_len + inserted.len() as u16;
    out[IPV6_PAYLOAD_LEN..IPV6_PAYLOAD_LEN + 2].copy_from_slice(&payload_len.to_be_bytes());
    out.extend_from_slice(&inserted);
    out.extend_from_slice(&packet[IPV6_EXTENSIONS..]);
    out
}

/// The packet's (source, destination), after asserting that its IP header (IPv4) and L4
/// checksums are what etherparse computes from scratch.
pub fn addresses_with_valid_checksums<A: Family>(packet: &[u8]) -> (Endpoint<A>, Endpoint<A>) {
    let (headers, src, dst) = ip_with_valid_checksum::<A>(packet);
    let net = headers.net.as_ref().expect("an IP packet");
    let payload = headers.payload.slice();
    let (src_port, dst_port) = match &headers.transport {
        Some(TransportHeader::Tcp(tcp)) => {
            let expected = match net {
                NetHeaders::Ipv4(ip, _) => tcp.calc_checksum_ipv4(ip, payload),
                NetHeaders::Ipv6(ip, _) => tcp.calc_checksum_ipv6(ip, payload),
                NetHeaders::Arp(_) => unreachable!(),
            };
            assert_eq!(tcp.checksum, expected.unwrap(), "TCP checksum");
            (tcp.source_port, tcp.destination_port)
        }
        Some(TransportHeader::Udp(udp)) => {
            let expected = match net {
                // Zero: no checksum, which only IPv4 allows.
                NetHeaders::Ipv4(_, _) if udp.checksum == 0 => Ok(0),
                NetHeaders::Ipv4(ip, _) => udp.calc_checksum_ipv4(ip, payload),
                NetHeaders::Ipv6(ip, _) => udp.calc_checksum_ipv6(ip, payload),
                NetHeaders::Arp(_) => unreachable!(),
            };
            assert_eq!(udp.checksum, expected.unwrap(), "UDP checksum");
            (udp.source_port, udp.destination_port)
        }
        other => panic!("unexpected transport {other:?}"),
    };
    ((src, src_port), (dst, dst_port))
}

/// A frame's headers and its (source, destination) addresses, after asserting that it is of
/// family `A` and, for IPv4, that its header checksum is right.
fn ip_with_valid_checksum<A: Family>(frame: &[u8]) -> (PacketHeaders<'_>, A, A) {
    let headers = PacketHeaders::from_ethernet_slice(frame).expect("the output parses");
    let net = headers.net.as_ref().expect("an IP packet");
    let (src, dst) = A::addresses(net).unwrap_or_else(|| panic!("not of the expected family: {net:?}"));
    if let NetHeaders::Ipv4(ip, _) = net {
        assert_eq!(
            ip.header_checksum,
            ip.calc_header_checksum(),
            "IPv4 header checksum"
        );
    }
    (headers, src, dst)
}
