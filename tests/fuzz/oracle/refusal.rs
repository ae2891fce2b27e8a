//! A connection to a frontend without endpoints is refused as a closed port would refuse it: a
//! pure SYN gets a RST|ACK, a UDP datagram or SCTP INIT an ICMP (ICMPv6) port unreachable, from
//! the frontend, sent back; anything else, a packet with IPv4 options or IPv6 extension headers
//! and a later fragment included, is dropped.
use lb_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP};

use super::{
    Outcome, Run, TC_ACT_REDIRECT, TC_ACT_SHOT,
    parse::{ETH_LEN, Packet, Side, addr_from, fixed_header_len},
};
use crate::{checksum, topology::Family};

const RST_ACK: u8 = 0x14;
const ICMP_HEADER_LEN: usize = 8;
/// An ICMPv6 error quotes as much of the packet as keeps it within IPv6's minimum MTU (RFC 4443
/// §2.4); an ICMP error the IP header and 8 bytes (RFC 792).
const ICMPV6_REPLY_MAX: usize = 1280;
const ICMP_QUOTE_MAX: usize = 20 + 8;

pub fn check_reject(packet: &Packet, run: &Run) -> Result<Outcome, String> {
    let input = run.input;
    let pure_syn = packet.is_pure_syn(input);
    let refused = match packet.proto {
        IPPROTO_TCP => pure_syn,
        IPPROTO_SCTP => packet.opens(input),
        _ => true,
    };
    // No answer about a fragment other than the first (RFC 1122 §3.2.2).
    if !packet.has_plain_header() || !packet.has_transport_header() || !refused {
        run.expect(TC_ACT_SHOT)?;
        return Ok(Outcome::Dropped);
    }
    run.expect(TC_ACT_REDIRECT)?;
    let family = packet.family;
    let header_len = fixed_header_len(family);
    let quote_len = (packet.end - ETH_LEN).min(match family {
        Family::Ipv4 => ICMP_QUOTE_MAX,
        Family::Ipv6 => ICMPV6_REPLY_MAX - header_len - ICMP_HEADER_LEN,
    });
    let (proto, l4_len) = match (pure_syn, family) {
        (true, _) => (IPPROTO_TCP, 20),
        (false, Family::Ipv4) => (IPPROTO_ICMP, ICMP_HEADER_LEN + quote_len),
        (false, Family::Ipv6) => (IPPROTO_ICMPV6, ICMP_HEADER_LEN + quote_len),
    };
    let output = run.output;
    if output.len() != ETH_LEN + header_len + l4_len {
        return Err(format!("reply of {} bytes", output.len()));
    }
    if output[..6] != input[6..12] || output[6..12] != input[..6] || output[12..14] != input[12..14] {
        return Err("reply's Ethernet header is not the request's, swapped".into());
    }
    check_ip_header(packet, &output[ETH_LEN..ETH_LEN + header_len], proto, l4_len)?;
    let l4 = &output[ETH_LEN + header_len..];
    let pseudo = checksum::pseudo_header(
        &input[packet.addr_at(Side::Destination)],
        &input[packet.addr_at(Side::Source)],
        proto,
        l4_len as u16,
    );
    if pure_syn {
        let seq = u32::from_be_bytes(input[packet.l4 + 4..packet.l4 + 8].try_into().unwrap());
        let ports = (
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        );
        if ports != (packet.dst.1, packet.src.1) {
            return Err(format!("RST's ports {ports:?} are not the SYN's swapped"));
        }
        if l4[12] >> 4 != 5 || l4[13] != RST_ACK || l4[8..12] != seq.wrapping_add(1).to_be_bytes() {
            return Err("not a RST|ACK acknowledging the SYN".into());
        }
        if checksum::fold(checksum::add(pseudo, l4)) != 0xffff {
            return Err("RST's TCP checksum is wrong".into());
        }
        return Ok(Outcome::Reset);
    }
    // ICMP's checksum covers the message alone, ICMPv6's a pseudo-header too.
    let (kind, start) = match family {
        Family::Ipv4 => ([3, 3], 0),
        Family::Ipv6 => ([1, 4], pseudo),
    };
    if l4[..2] != kind || checksum::fold(checksum::add(start, l4)) != 0xffff {
        return Err("not a port unreachable with a right checksum".into());
    }
    if l4[ICMP_HEADER_LEN..] != input[ETH_LEN..ETH_LEN + quote_len] {
        return Err(format!(
            "the port unreachable does not quote the first {quote_len} bytes of the datagram"
        ));
    }
    Ok(Outcome::PortUnreachable)
}

/// The reply's IP header: no options, not a fragment, a hop limit, from the frontend to the
/// client, carrying `l4_len` bytes of `proto`.
fn check_ip_header(packet: &Packet, ip: &[u8], proto: u8, l4_len: usize) -> Result<(), String> {
    let (well_formed, src, dst) = match packet.family {
        Family::Ipv4 => (
            ip[0] == 0x45
                && usize::from(u16::from_be_bytes([ip[2], ip[3]])) == 20 + l4_len
                && u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff == 0
                && ip[8] != 0
                && ip[9] == proto
                && checksum::fold(checksum::add(0, ip)) == 0xffff,
            &ip[12..16],
            &ip[16..20],
        ),
        Family::Ipv6 => (
            ip[0] >> 4 == 6
                && usize::from(u16::from_be_bytes([ip[4], ip[5]])) == l4_len
                && ip[6] == proto
                && ip[7] != 0,
            &ip[8..24],
            &ip[24..40],
        ),
    };
    if !well_formed {
        return Err(format!("reply's {} header is malformed", packet.family.name()));
    }
    if (addr_from(src), addr_from(dst)) != (packet.dst.0, packet.src.0) {
        return Err("reply does not go from the frontend to the client".into());
    }
    Ok(())
}
