//! Writing frames: Ethernet, an IPv4 or IPv6 header around a transport segment with right
//! checksums, and what may be put between the two afterwards (IPv4 options, IPv6 extension
//! headers), keeping the lengths and the IPv4 header checksum right.
use std::net::IpAddr;

use crate::{
    checksum,
    topology::{CLIENT_MAC, GATEWAY_MAC},
};

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
pub const ETHERTYPE_VLAN: u16 = 0x8100;
pub const ETHERTYPE_QINQ: u16 = 0x88a8;
pub const ETH_LEN: usize = 14;
pub const IPV6_FIXED_END: usize = ETH_LEN + 40;
pub const IPV6_HOP_BY_HOP: u8 = 0;
pub const IPV6_ROUTING: u8 = 43;
pub const IPV6_FRAGMENT: u8 = 44;
pub const IPV6_AUTHENTICATION: u8 = 51;
pub const IPV6_NO_NEXT_HEADER: u8 = 59;
pub const IPV6_DESTINATION_OPTIONS: u8 = 60;

pub fn push_ethernet(frame: &mut Vec<u8>, ethertype: u16) {
    frame.extend_from_slice(&GATEWAY_MAC);
    frame.extend_from_slice(&CLIENT_MAC);
    frame.extend_from_slice(&ethertype.to_be_bytes());
}

pub fn octets(addr: IpAddr) -> ([u8; 16], usize) {
    match addr {
        IpAddr::V4(addr) => {
            let mut bytes = [0; 16];
            bytes[..4].copy_from_slice(&addr.octets());
            (bytes, 4)
        }
        IpAddr::V6(addr) => (addr.octets(), 16),
    }
}

/// The checksum of `l4` (its checksum field zero) under the pseudo-header of `src` → `dst`.
pub fn l4_checksum(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> u16 {
    let ((src, len), (dst, _)) = (octets(src), octets(dst));
    let pseudo = checksum::pseudo_header(&src[..len], &dst[..len], proto, l4.len() as u16);
    checksum::of(checksum::add(pseudo, l4))
}

/// Ethernet and a plain IP header of `src`'s family around `l4`: IPv4 with Don't Fragment and
/// a correct checksum, IPv6 with `id` as its flow label.
pub fn write_ip(frame: &mut Vec<u8>, src: IpAddr, dst: IpAddr, proto: u8, id: u16, l4: &[u8]) {
    let ((src_bytes, len), (dst_bytes, _)) = (octets(src), octets(dst));
    if src.is_ipv4() {
        push_ethernet(frame, ETHERTYPE_IPV4);
        frame.push(0x45);
        frame.push(0);
        frame.extend_from_slice(&(20 + l4.len() as u16).to_be_bytes());
        frame.extend_from_slice(&id.to_be_bytes());
        frame.extend_from_slice(&[0x40, 0, 64, proto, 0, 0]);
    } else {
        push_ethernet(frame, ETHERTYPE_IPV6);
        frame.extend_from_slice(&[0x60, 0]);
        frame.extend_from_slice(&id.to_be_bytes());
        frame.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        frame.extend_from_slice(&[proto, 64]);
    }
    frame.extend_from_slice(&src_bytes[..len]);
    frame.extend_from_slice(&dst_bytes[..len]);
    if src.is_ipv4() {
        fix_ipv4_checksum(frame);
    }
    frame.extend_from_slice(l4);
}

pub fn fix_ipv4_checksum(frame: &mut [u8]) {
    let header_len = usize::from(frame[ETH_LEN] & 0x0f) * 4;
    frame[24..26].copy_from_slice(&[0, 0]);
    let sum = checksum::of(checksum::add(0, &frame[ETH_LEN..ETH_LEN + header_len]));
    frame[24..26].copy_from_slice(&sum.to_be_bytes());
}

/// `len` bytes of IPv4 options (NOPs) after a plain header.
pub fn insert_ipv4_options(frame: &mut Vec<u8>, len: usize) {
    let end = ETH_LEN + 20;
    frame.splice(end..end, std::iter::repeat_n(1, len));
    frame[ETH_LEN] = 0x40 | ((20 + len) / 4) as u8;
    add_to_length(frame, ETH_LEN + 2, len);
    fix_ipv4_checksum(frame);
}

/// `header` (its first byte to be the next header's number) as the first IPv6 extension header:
/// the fixed header's next header becomes `kind`.
pub fn insert_ipv6_header(frame: &mut Vec<u8>, kind: u8, mut header: Vec<u8>) {
    header[0] = frame[ETH_LEN + 6];
    frame[ETH_LEN + 6] = kind;
    add_to_length(frame, ETH_LEN + 4, header.len());
    frame.splice(IPV6_FIXED_END..IPV6_FIXED_END, header);
}

fn add_to_length(frame: &mut [u8], at: usize, more: usize) {
    let len = u16::from_be_bytes([frame[at], frame[at + 1]]).wrapping_add(more as u16);
    frame[at..at + 2].copy_from_slice(&len.to_be_bytes());
}

/// Where the generator put the transport header of a frame it wrote, and its protocol, as far
/// as the frame (maybe mutated) still says: what mutations aim at.
pub fn transport_of(frame: &[u8]) -> (usize, u8) {
    match frame.get(12..14) {
        Some([0x86, 0xdd]) => {
            let (mut next, mut at) = (frame.get(ETH_LEN + 6).copied().unwrap_or(0), IPV6_FIXED_END);
            for _ in 0..8 {
                let (Some(&following), Some(&len)) = (frame.get(at), frame.get(at + 1)) else {
                    break;
                };
                at += match next {
                    IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DESTINATION_OPTIONS => (usize::from(len) + 1) * 8,
                    IPV6_FRAGMENT => 8,
                    IPV6_AUTHENTICATION => (usize::from(len) + 2) * 4,
                    _ => break,
                };
                next = following;
            }
            (at, next)
        }
        _ => (
            ETH_LEN + usize::from(frame.get(ETH_LEN).map_or(5, |b| b & 0x0f)) * 4,
            frame.get(ETH_LEN + 9).copied().unwrap_or(0),
        ),
    }
}

/// The address at `at` of a frame, 4 or 16 bytes long.
pub fn addr_at(frame: &[u8], at: usize, len: usize) -> IpAddr {
    match len {
        4 => IpAddr::from(<[u8; 4]>::try_from(&frame[at..at + 4]).unwrap()),
        _ => IpAddr::from(<[u8; 16]>::try_from(&frame[at..at + 16]).unwrap()),
    }
}

/// Writes `bytes` at `at` where the frame is long enough.
pub fn set(frame: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(field) = frame.get_mut(at..at + bytes.len()) {
        field.copy_from_slice(bytes);
    }
}
