//! Which frames are service traffic, and where their fields lie.
//!
//! A frame is service traffic only if it is a whole, well-formed IPv4 or IPv6 TCP, UDP or SCTP
//! packet, untagged: its length fields fit the frame, its header length, TCP data offset and UDP
//! length are consistent with them (SCTP: its common header and a chunk header fit). IPv6
//! extension headers are walked as far as the README says the datapath does: up to four
//! hop-by-hop, routing (with no segments left: else the destination is not the final one),
//! destination options and fragment headers, the walk ending at a fragment header; AH, ESP or a
//! fifth extension header ends the walk on a protocol no frontend has.
//!
//! A TCP or UDP fragment is service traffic too (SCTP fragments are not): the first one when its
//! transport header fits (a UDP length counting the whole datagram), a later one (an IPv4 offset,
//! or an IPv6 fragment header's, not 0) with the ports its datagram's first fragment had, which
//! the model remembers; an IPv6 atomic fragment (offset 0, no more fragments) is a whole packet.
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
const IPV6_FRAGMENT: u8 = 44;
/// How many extension headers the datapath walks before giving up on a packet.
const IPV6_MAX_EXTENSION_HEADERS: usize = 4;
/// SCTP's common header and the first chunk's header, whose type opens an association (INIT).
const SCTP_HEADERS_LEN: usize = 16;
const SCTP_INIT: u8 = 1;
const SCTP_ABORT: u8 = 6;
const SCTP_SHUTDOWN_COMPLETE: u8 = 14;

/// What of its datagram a packet holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    Whole,
    /// The first fragment: the transport header, and the start of the payload.
    First,
    /// A later fragment: payload only, its ports those of its datagram's first fragment.
    Later,
}

/// Where a fragment lies in its datagram: its identification, and whether it is the first.
#[derive(Clone, Copy, Debug)]
pub struct Fragment {
    pub id: u32,
    pub first: bool,
}

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
    pub piece: Piece,
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

    /// Whether the transport header is in the packet: all but a later fragment.
    pub fn has_transport_header(&self) -> bool {
        self.piece != Piece::Later
    }

    /// Whether a translation to `got` is the one to `wanted`: of a later fragment, which shows
    /// no ports, the address.
    pub fn agrees(&self, got: Endpoint, wanted: Endpoint) -> bool {
        if self.has_transport_header() {
            got == wanted
        } else {
            got.0 == wanted.0
        }
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
        self.proto == IPPROTO_TCP && self.has_transport_header() && frame[self.l4 + 13] & 0x16 == 0x02
    }

    /// A SYN without ACK, or an SCTP INIT: it opens a connection on its tuple.
    pub fn opens(&self, frame: &[u8]) -> bool {
        if !self.has_transport_header() {
            return false;
        }
        match self.proto {
            IPPROTO_TCP => frame[self.l4 + 13] & 0x12 == 0x02,
            IPPROTO_SCTP => frame[self.l4 + 12] == SCTP_INIT,
            _ => false,
        }
    }

    /// An SCTP ABORT or SHUTDOWN COMPLETE (the first chunk): it ends the association.
    pub fn closes(&self, frame: &[u8]) -> bool {
        self.proto == IPPROTO_SCTP
            && self.has_transport_header()
            && [SCTP_ABORT, SCTP_SHUTDOWN_COMPLETE].contains(&frame[self.l4 + 12])
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

/// The packet in `frame` if it is one the datapath may translate, and where it lies in its
/// datagram if it is a fragment. A later fragment's ports are left 0: its datagram's, which the
/// model remembers, are to be filled in.
pub fn parse(frame: &[u8]) -> Option<(Packet, Option<Fragment>)> {
    let (family, proto, l4, end, fragment) = match family_of(frame)? {
        Family::Ipv4 => ipv4(frame)?,
        Family::Ipv6 => ipv6(frame)?,
    };
    if ![IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP].contains(&proto) {
        return None;
    }
    let piece = match fragment {
        None => Piece::Whole,
        Some(_) if proto == IPPROTO_SCTP => return None,
        Some(fragment) if fragment.first => Piece::First,
        Some(_) => Piece::Later,
    };
    let packet = Packet {
        family,
        src: (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        dst: (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        proto,
        l4,
        end,
        piece,
    };
    if piece == Piece::Later {
        let packet = Packet {
            src: (addr_from(&frame[packet.addr_at(Side::Source)]), 0),
            dst: (addr_from(&frame[packet.addr_at(Side::Destination)]), 0),
            ..packet
        };
        return Some((packet, fragment));
    }
    transport_len(proto, &frame[l4..end], piece == Piece::First)?;
    let packet = Packet {
        src: packet.endpoint_in(frame, Side::Source),
        dst: packet.endpoint_in(frame, Side::Destination),
        ..packet
    };
    Some((packet, fragment))
}

/// The length of the transport header (TCP), datagram (UDP) or headers (SCTP) at the start of
/// `segment`, if it is a protocol of frontends and fits; of a first fragment, the header only
/// must fit (a UDP length counts the whole datagram).
fn transport_len(proto: u8, segment: &[u8], first_fragment: bool) -> Option<usize> {
    let (len, min) = match proto {
        IPPROTO_TCP => (usize::from(segment.get(12)? >> 4) * 4, 20),
        IPPROTO_UDP => (
            usize::from(u16::from_be_bytes(segment.get(4..6)?.try_into().unwrap())),
            8,
        ),
        IPPROTO_SCTP => (SCTP_HEADERS_LEN, SCTP_HEADERS_LEN),
        _ => return None,
    };
    let fits = if first_fragment && proto == IPPROTO_UDP {
        len >= min && min <= segment.len()
    } else {
        (min..=segment.len()).contains(&len)
    };
    fits.then_some(len)
}

/// The network header's facts: (family, transport protocol, L4 offset, end of the packet, where
/// a fragment lies).
type Network = (Family, u8, usize, usize, Option<Fragment>);

/// A whole IPv4 packet (a fragment or not).
fn ipv4(frame: &[u8]) -> Option<Network> {
    let ip = &frame[ETH_LEN..];
    if ip.len() < IPV4_HEADER_LEN || ip[0] >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if header_len < IPV4_HEADER_LEN || total < header_len || total > ip.len() {
        return None;
    }
    let flags = u16::from_be_bytes([ip[6], ip[7]]);
    let fragment = (flags & 0x3fff != 0).then(|| Fragment {
        id: u32::from(u16::from_be_bytes([ip[4], ip[5]])),
        first: flags & 0x1fff == 0,
    });
    Some((
        Family::Ipv4,
        ip[9],
        ETH_LEN + header_len,
        ETH_LEN + total,
        fragment,
    ))
}

/// Likewise for IPv6, past the extension headers the datapath walks.
fn ipv6(frame: &[u8]) -> Option<Network> {
    let ip = &frame[ETH_LEN..];
    if ip.len() < IPV6_HEADER_LEN || ip[0] >> 4 != 6 {
        return None;
    }
    let end = ETH_LEN + IPV6_HEADER_LEN + usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    let packet = frame.get(..end)?;
    let (mut next, mut at) = (ip[6], ETH_LEN + IPV6_HEADER_LEN);
    let mut fragment = None;
    for _ in 0..IPV6_MAX_EXTENSION_HEADERS {
        if ![
            IPV6_HOP_BY_HOP,
            IPV6_ROUTING,
            IPV6_DESTINATION_OPTIONS,
            IPV6_FRAGMENT,
        ]
        .contains(&next)
        {
            break;
        }
        let header = packet.get(at..at + 4)?;
        if next == IPV6_FRAGMENT {
            let id = packet.get(at + 4..at + 8)?;
            let offset = u16::from_be_bytes([header[2], header[3]]) >> 3;
            let more = header[3] & 1 != 0;
            // An atomic fragment is a whole packet.
            fragment = (offset != 0 || more).then(|| Fragment {
                id: u32::from_be_bytes(id.try_into().unwrap()),
                first: offset == 0,
            });
            next = header[0];
            at += 8;
            break;
        }
        if next == IPV6_ROUTING && header[3] != 0 {
            return None;
        }
        next = header[0];
        at += (usize::from(header[1]) + 1) * 8;
    }
    (at <= end).then_some((Family::Ipv6, next, at, end, fragment))
}
