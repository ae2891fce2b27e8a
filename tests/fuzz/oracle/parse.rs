//! Which frames are service traffic, and where their fields lie.
//!
//! A frame is service traffic only if it is a whole, well-formed IPv4 or IPv6 TCP, UDP or SCTP
//! packet, untagged: its length fields fit the frame, its header length, TCP data offset and UDP
//! length are consistent with them (SCTP: its common header and a chunk header fit), and it is
//! not a fragment. IPv6 extension headers are walked as far as
//! the README says the datapath does: up to four hop-by-hop, routing (with no segments left: else
//! the destination is not the final one) and destination options headers; a fragment header (an
//! atomic one included), AH, ESP or a fifth extension header ends the walk on a protocol no
//! frontend has.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::Range,
};

use lb_common::{IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    checksum::SCTP_CRC_AT,
    topology::{Endpoint, Family},
};

pub const ETH_LEN: usize = 14;
const IPV4_HEADER_LEN: usize = 20;
const IPV6_HEADER_LEN: usize = 40;
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_DESTINATION_OPTIONS: u8 = 60;
/// How many extension headers the datapath walks before giving up on a packet.
const IPV6_MAX_EXTENSION_HEADERS: usize = 4;
/// SCTP's common header and the first chunk's header, whose type opens an association (INIT).
const SCTP_HEADERS_LEN: usize = 16;
const SCTP_INIT: u8 = 1;
const SCTP_ABORT: u8 = 6;
const SCTP_SHUTDOWN_COMPLETE: u8 = 14;

/// A parsed service-candidate packet.
#[derive(Clone, Copy, Debug)]
pub struct Packet {
    pub family: Family,
    pub src: Endpoint,
    pub dst: Endpoint,
    pub proto: u8,
    /// Offset of the L4 header in the frame.
    pub l4: usize,
    /// End of the IP packet in the frame (the rest is padding).
    pub end: usize,
}

pub type Tuple = (Endpoint, Endpoint, u8);

#[derive(Clone, Copy)]
pub enum Side {
    Source,
    Destination,
}

impl Packet {
    pub fn tuple(&self) -> Tuple {
        (self.src, self.dst, self.proto)
    }

    /// Where the transport checksum lies: TCP's and UDP's 16 bits, SCTP's CRC32c.
    pub fn l4_checksum_at(&self) -> Range<usize> {
        let (at, len) = match self.proto {
            IPPROTO_TCP => (16, 2),
            IPPROTO_SCTP => (SCTP_CRC_AT.start, SCTP_CRC_AT.len()),
            _ => (6, 2),
        };
        self.l4 + at..self.l4 + at + len
    }

    /// The transport packet: what SCTP's CRC32c covers (Ethernet padding left out).
    pub fn l4_bytes<'a>(&self, frame: &'a [u8]) -> &'a [u8] {
        &frame[self.l4..self.end]
    }

    /// Where `side`'s address lies in the frame.
    pub fn addr_at(&self, side: Side) -> Range<usize> {
        let (src, len) = match self.family {
            Family::Ipv4 => (ETH_LEN + 12, 4),
            Family::Ipv6 => (ETH_LEN + 8, 16),
        };
        match side {
            Side::Source => src..src + len,
            Side::Destination => src + len..src + 2 * len,
        }
    }

    pub fn port_at(&self, side: Side) -> Range<usize> {
        match side {
            Side::Source => self.l4..self.l4 + 2,
            Side::Destination => self.l4 + 2..self.l4 + 4,
        }
    }

    /// The IPv4 header checksum; IPv6 has none.
    pub fn header_checksum_at(&self) -> Option<Range<usize>> {
        (self.family == Family::Ipv4).then_some(ETH_LEN + 10..ETH_LEN + 12)
    }

    /// Whether nothing lies between the fixed IP header and the transport header (no IPv4
    /// options, no IPv6 extension headers).
    pub fn has_plain_header(&self) -> bool {
        self.l4 == ETH_LEN + fixed_header_len(self.family)
    }

    /// The address and port at `side` of `frame`, a frame laid out as this packet.
    pub fn endpoint_in(&self, frame: &[u8], side: Side) -> Endpoint {
        let port = self.port_at(side);
        (
            addr_from(&frame[self.addr_at(side)]),
            u16::from_be_bytes([frame[port.start], frame[port.start + 1]]),
        )
    }

    /// A pure SYN: SYN set, ACK and RST clear.
    pub fn is_pure_syn(&self, frame: &[u8]) -> bool {
        self.proto == IPPROTO_TCP && frame[self.l4 + 13] & 0x16 == 0x02
    }

    /// A SYN without ACK, or an SCTP INIT: it opens a connection on its tuple.
    pub fn opens(&self, frame: &[u8]) -> bool {
        match self.proto {
            IPPROTO_TCP => frame[self.l4 + 13] & 0x12 == 0x02,
            IPPROTO_SCTP => frame[self.l4 + 12] == SCTP_INIT,
            _ => false,
        }
    }

    /// An SCTP ABORT or SHUTDOWN COMPLETE (the first chunk): it ends the association.
    pub fn closes(&self, frame: &[u8]) -> bool {
        self.proto == IPPROTO_SCTP && [SCTP_ABORT, SCTP_SHUTDOWN_COMPLETE].contains(&frame[self.l4 + 12])
    }
}

pub fn fixed_header_len(family: Family) -> usize {
    match family {
        Family::Ipv4 => IPV4_HEADER_LEN,
        Family::Ipv6 => IPV6_HEADER_LEN,
    }
}

/// A 4- or 16-byte address.
pub fn addr_from(bytes: &[u8]) -> IpAddr {
    match bytes.len() {
        4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).unwrap())),
        _ => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).unwrap())),
    }
}

/// The family an untagged frame's EtherType announces, if any.
pub fn family_of(frame: &[u8]) -> Option<Family> {
    match frame.get(12..14)? {
        [0x08, 0x00] => Some(Family::Ipv4),
        [0x86, 0xdd] => Some(Family::Ipv6),
        _ => None,
    }
}

/// The packet in `frame` if it is one the datapath may translate.
pub fn parse(frame: &[u8]) -> Option<Packet> {
    let (family, proto, l4, end) = match family_of(frame)? {
        Family::Ipv4 => ipv4(frame)?,
        Family::Ipv6 => ipv6(frame)?,
    };
    let segment = &frame[l4..end];
    transport_len(proto, segment)?;
    let packet = Packet {
        family,
        src: (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        dst: (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        proto,
        l4,
        end,
    };
    Some(Packet {
        src: packet.endpoint_in(frame, Side::Source),
        dst: packet.endpoint_in(frame, Side::Destination),
        ..packet
    })
}

/// The length of the transport header (TCP), datagram (UDP) or headers (SCTP) at the start of
/// `segment`, if it is a protocol of frontends and fits.
fn transport_len(proto: u8, segment: &[u8]) -> Option<usize> {
    let (len, min) = match proto {
        IPPROTO_TCP => (usize::from(segment.get(12)? >> 4) * 4, 20),
        IPPROTO_UDP => (
            usize::from(u16::from_be_bytes(segment.get(4..6)?.try_into().unwrap())),
            8,
        ),
        IPPROTO_SCTP => (SCTP_HEADERS_LEN, SCTP_HEADERS_LEN),
        _ => return None,
    };
    (min..=segment.len()).contains(&len).then_some(len)
}

/// (family, transport protocol, L4 offset, end of the packet) of a whole, unfragmented IPv4
/// packet.
fn ipv4(frame: &[u8]) -> Option<(Family, u8, usize, usize)> {
    let ip = &frame[ETH_LEN..];
    if ip.len() < IPV4_HEADER_LEN || ip[0] >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let fragmented = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
    if header_len < IPV4_HEADER_LEN || total < header_len || total > ip.len() || fragmented {
        return None;
    }
    Some((Family::Ipv4, ip[9], ETH_LEN + header_len, ETH_LEN + total))
}

/// Likewise for IPv6, past the extension headers the datapath walks.
fn ipv6(frame: &[u8]) -> Option<(Family, u8, usize, usize)> {
    let ip = &frame[ETH_LEN..];
    if ip.len() < IPV6_HEADER_LEN || ip[0] >> 4 != 6 {
        return None;
    }
    let end = ETH_LEN + IPV6_HEADER_LEN + usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    let packet = frame.get(..end)?;
    let (mut next, mut at) = (ip[6], ETH_LEN + IPV6_HEADER_LEN);
    for _ in 0..IPV6_MAX_EXTENSION_HEADERS {
        if ![IPV6_HOP_BY_HOP, IPV6_ROUTING, IPV6_DESTINATION_OPTIONS].contains(&next) {
            break;
        }
        let header = packet.get(at..at + 4)?;
        if next == IPV6_ROUTING && header[3] != 0 {
            return None;
        }
        next = header[0];
        at += (usize::from(header[1]) + 1) * 8;
    }
    (at <= end).then_some((Family::Ipv6, next, at, end))
}
