//! The packets the datapath answers with when it refuses a connection (a TCP RST, an ICMP or
//! ICMPv6 port unreachable), built as plain bytes so the host's tests check what it sends.
use crate::{Address, IPPROTO_TCP, Ipv4, Ipv6, checksum_add, checksum_fold};

/// Hop limit (TTL) of the replies.
const HOP_LIMIT: u8 = 64;

/// The sum over the pseudo-header that TCP, UDP and ICMPv6 checksums cover (RFC 793 for IPv4,
/// RFC 8200 §8.1 for IPv6), not yet folded. Both families' pseudo-headers sum alike: the two
/// addresses, the protocol and the length (IPv6 carries the length in 32 bits, whose upper half
/// is zero for any length a `u16` holds).
#[inline(always)]
pub fn pseudo_header_sum<A: Address>(src: A, dst: A, proto: u8, len: u16) -> u32 {
    let addresses = checksum_add(checksum_add(0, src.as_ref()), dst.as_ref());
    addresses + u32::from(proto) + u32::from(len)
}

/// A TCP RST|ACK segment (a 20-byte header, no payload) from `src` to `dst` acknowledging
/// `acknowledged`, with its checksum.
#[inline(always)]
pub fn tcp_reset<A: Address>(src: (A, u16), dst: (A, u16), acknowledged: u32) -> [u8; 20] {
    const RST_ACK: u8 = 0x14;
    let mut segment = [0u8; 20];
    segment[0..2].copy_from_slice(&src.1.to_be_bytes());
    segment[2..4].copy_from_slice(&dst.1.to_be_bytes());
    segment[8..12].copy_from_slice(&acknowledged.to_be_bytes());
    segment[12] = 5 << 4; // data offset: 5 words
    segment[13] = RST_ACK;
    let pseudo_header = pseudo_header_sum(src.0, dst.0, IPPROTO_TCP, segment.len() as u16);
    let check = checksum_fold(checksum_add(pseudo_header, &segment));
    segment[16..18].copy_from_slice(&check.to_be_bytes());
    segment
}

/// An IPv4 header without options from `src` to `dst` for `payload_len` bytes of `proto`:
/// Don't Fragment, TTL 64, with its checksum.
#[inline(always)]
pub fn ipv4_header(src: Ipv4, dst: Ipv4, proto: u8, payload_len: u16) -> [u8; 20] {
    let mut ip = [0u8; 20];
    ip[0] = 0x45; // version 4, 5 words
    ip[2..4].copy_from_slice(&(20 + payload_len).to_be_bytes());
    ip[6] = 0x40; // Don't Fragment
    ip[8] = HOP_LIMIT;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let check = checksum_fold(checksum_add(0, &ip));
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    ip
}

/// An IPv6 header from `src` to `dst` for `payload_len` bytes of `next_header`: hop limit 64, no
/// traffic class or flow label.
#[inline(always)]
pub fn ipv6_header(src: Ipv6, dst: Ipv6, next_header: u8, payload_len: u16) -> [u8; 40] {
    let mut ip = [0u8; 40];
    ip[0] = 0x60; // version 6
    ip[4..6].copy_from_slice(&payload_len.to_be_bytes());
    ip[6] = next_header;
    ip[7] = HOP_LIMIT;
    ip[8..24].copy_from_slice(&src);
    ip[24..40].copy_from_slice(&dst);
    ip
}

/// An ICMP or ICMPv6 error header: `kind` (type and code), the checksum, 4 unused bytes. `rest`
/// is the unfolded sum of everything else the checksum covers: the quoted packet, and for
/// ICMPv6 the pseudo-header.
#[inline(always)]
pub fn icmp_error_header(kind: [u8; 2], rest: u32) -> [u8; 8] {
    let mut header = [kind[0], kind[1], 0, 0, 0, 0, 0, 0];
    let check = checksum_fold(checksum_add(rest, &header));
    header[2..4].copy_from_slice(&check.to_be_bytes());
    header
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::vec::Vec;

    use etherparse::{
        Icmpv4Type, Icmpv6Type, IpNumber, Ipv4Header, Ipv6Header, TcpHeader, icmpv4::DestUnreachableHeader,
        icmpv6::DestUnreachableCode,
    };

    use super::*;
    use crate::{IPPROTO_ICMPV6, IPPROTO_UDP};

    const CLIENT6: Ipv6 = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20];
    const SERVICE6: Ipv6 = [0xfd, 0, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];

    /// The pseudo-header sums agree with etherparse's checksums, which compute them from scratch:
    /// a UDP datagram over each family.
    #[test]
    fn pseudo_header_sums_match_an_independent_checksum() {
        let payload = b"an odd-length payload";
        let udp_len = 8 + payload.len() as u16;
        let mut datagram = Vec::from([0x9c, 0x40, 0, 53]);
        datagram.extend_from_slice(&udp_len.to_be_bytes());
        datagram.extend_from_slice(&[0, 0]);
        datagram.extend_from_slice(payload);

        let pseudo = pseudo_header_sum(CLIENT6, SERVICE6, IPPROTO_UDP, udp_len);
        let ours = checksum_fold(checksum_add(pseudo, &datagram));
        let udp = etherparse::UdpHeader::with_ipv6_checksum(40000, 53, &ipv6(IPPROTO_UDP, udp_len), payload)
            .unwrap();
        assert_eq!(ours, udp.checksum, "IPv6");

        let (client, service) = ([10, 244, 0, 20], [10, 96, 0, 10]);
        let pseudo = pseudo_header_sum(client, service, IPPROTO_UDP, udp_len);
        let ours = checksum_fold(checksum_add(pseudo, &datagram));
        let ip = Ipv4Header::new(udp_len, 64, IpNumber::UDP, client, service).unwrap();
        let udp = etherparse::UdpHeader::with_ipv4_checksum(40000, 53, &ip, payload).unwrap();
        assert_eq!(ours, udp.checksum, "IPv4");
    }

    fn ipv6(next_header: u8, payload_len: u16) -> Ipv6Header {
        Ipv6Header {
            payload_length: payload_len,
            next_header: IpNumber(next_header),
            hop_limit: 64,
            source: CLIENT6,
            destination: SERVICE6,
            ..Default::default()
        }
    }

    #[test]
    fn a_reset_over_ipv6_is_well_formed() {
        let header = ipv6_header(SERVICE6, CLIENT6, IPPROTO_TCP, 20);
        let (ip, rest) = Ipv6Header::from_slice(&header).unwrap();
        assert!(rest.is_empty());
        assert_eq!(
            (
                ip.source,
                ip.destination,
                ip.next_header,
                ip.payload_length,
                ip.hop_limit
            ),
            (SERVICE6, CLIENT6, IpNumber::TCP, 20, 64)
        );
        let segment = tcp_reset((SERVICE6, 80), (CLIENT6, 40000), 1001);
        let (tcp, _) = TcpHeader::from_slice(&segment).unwrap();
        assert!(tcp.rst && tcp.ack && !tcp.syn);
        assert_eq!(
            (tcp.source_port, tcp.destination_port, tcp.acknowledgment_number),
            (80, 40000, 1001)
        );
        assert_eq!(tcp.checksum, tcp.calc_checksum_ipv6(&ip, &[]).unwrap());
    }

    #[test]
    fn a_reset_over_ipv4_is_well_formed() {
        let (service, client) = ([10, 96, 0, 10], [10, 244, 0, 20]);
        let header = ipv4_header(service, client, IPPROTO_TCP, 20);
        let (ip, _) = Ipv4Header::from_slice(&header).unwrap();
        assert_eq!(ip.header_checksum, ip.calc_header_checksum());
        assert!(ip.dont_fragment);
        assert_eq!((ip.source, ip.destination, ip.total_len), (service, client, 40));
        let segment = tcp_reset((service, 80), (client, 40000), 7);
        let (tcp, _) = TcpHeader::from_slice(&segment).unwrap();
        assert_eq!(tcp.checksum, tcp.calc_checksum_ipv4(&ip, &[]).unwrap());
    }

    /// An ICMPv6 port unreachable quoting a datagram of odd length: its checksum covers the
    /// pseudo-header and the whole quote.
    #[test]
    fn an_icmpv6_port_unreachable_checksum_covers_the_pseudo_header_and_the_quote() {
        let quote: Vec<u8> = (0..101u8).collect();
        let len = (8 + quote.len()) as u16;
        let rest = pseudo_header_sum(SERVICE6, CLIENT6, IPPROTO_ICMPV6, len) + checksum_add(0, &quote);
        let header = icmp_error_header([1, 4], rest);
        let icmp = etherparse::Icmpv6Header::from_slice(&header).unwrap().0;
        assert_eq!(
            icmp.icmp_type,
            Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Port)
        );
        let expected = icmp.icmp_type.calc_checksum(SERVICE6, CLIENT6, &quote).unwrap();
        assert_eq!(icmp.checksum, expected);
    }

    #[test]
    fn an_icmp_port_unreachable_checksum_covers_the_quote() {
        let quote = [0x45u8; 28];
        let header = icmp_error_header([3, 3], checksum_add(0, &quote));
        let icmp = etherparse::Icmpv4Header::from_slice(&header).unwrap().0;
        assert_eq!(
            icmp.icmp_type,
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port)
        );
        assert_eq!(icmp.checksum, icmp.icmp_type.calc_checksum(&quote));
    }
}
