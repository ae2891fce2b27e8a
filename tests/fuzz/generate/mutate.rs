//! Mutations of a written frame, at every layer and in both families.
use lb_common::{IPPROTO_SCTP, IPPROTO_UDP};

use super::{
    Rng,
    frames::{ETH_LEN, IPV6_FIXED_END, set, transport_of},
    sctp,
};

/// One to three of: a cut, flipped bytes, zeroed or wrong checksums (SCTP's CRC32c too), a wrong
/// IHL (IPv4) or version, next header or extension header length (IPv6), total or payload length,
/// TCP data offset, UDP length or SCTP first chunk type, trailing bytes.
pub fn mutate(rng: &mut Rng, frame: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(3) {
        let ipv6 = frame.get(12..14) == Some(&[0x86, 0xdd]);
        let (l4, proto) = transport_of(frame);
        match rng.below(9) {
            0 => frame.truncate(rng.below(frame.len() + 1)),
            1 | 2 => {
                // Mostly in the headers, where a flip changes what the packet is.
                let span = if rng.percent(80) {
                    frame.len().min(l4 + 20)
                } else {
                    frame.len()
                };
                if span > 0 {
                    let at = rng.below(span);
                    frame[at] ^= 1 << rng.below(8);
                }
            }
            3 if ipv6 => {
                let next = *rng.pick(&[0u8, 6, 17, 43, 44, 50, 51, 58, 59, 60, 132]);
                set(frame, ETH_LEN + 6, &[next]);
            }
            3 => set(frame, ETH_LEN + 10, &[0, 0]),
            4 => {
                let (csum_at, csum_len) = match proto {
                    IPPROTO_UDP => (l4 + 6, 2),
                    IPPROTO_SCTP => (l4 + 8, 4),
                    _ => (l4 + 16, 2),
                };
                // Zero ("none" for UDP, left to offload for SCTP), or off by a non-zero
                // difference.
                let zero = rng.percent(50);
                let difference = [rng.byte() | 1, rng.byte(), rng.byte(), rng.byte()];
                if let Some(field) = frame.get_mut(csum_at..csum_at + csum_len) {
                    for (byte, d) in field.iter_mut().zip(difference) {
                        *byte = if zero { 0 } else { *byte ^ d };
                    }
                }
            }
            5 if ipv6 && l4 > IPV6_FIXED_END && rng.percent(50) => {
                // The first extension header's length.
                set(frame, IPV6_FIXED_END + 1, &[rng.below(8) as u8]);
            }
            5 => {
                let version = if ipv6 { 0x60 } else { 0x40 };
                if let Some(byte) = frame.get_mut(ETH_LEN) {
                    *byte = if rng.percent(70) {
                        version | rng.below(16) as u8
                    } else {
                        (rng.byte() & 0xf0) | (*byte & 0x0f)
                    };
                }
            }
            6 => {
                // The total length (IPv4) or payload length (IPv6), random or near the frame's.
                let (at, header) = if ipv6 { (ETH_LEN + 4, 40) } else { (ETH_LEN + 2, 0) };
                let len = match rng.below(3) {
                    0 => rng.next_u64() as u16,
                    _ => (frame.len() as u16)
                        .wrapping_sub((ETH_LEN + header) as u16)
                        .wrapping_add(rng.below(9) as u16)
                        .wrapping_sub(4),
                };
                set(frame, at, &len.to_be_bytes());
            }
            7 => {
                if proto == IPPROTO_UDP {
                    let len = rng.next_u64() as u16 % 64;
                    set(frame, l4 + 4, &len.to_be_bytes());
                } else if proto == IPPROTO_SCTP {
                    // The first chunk's type, which conntrack reads: an INIT may become DATA,
                    // DATA an ABORT.
                    set(frame, l4 + 12, &[*rng.pick(&sctp::CHUNKS)]);
                } else if let Some(byte) = frame.get_mut(l4 + 12) {
                    *byte = (rng.below(16) as u8) << 4 | (*byte & 0x0f);
                }
            }
            _ => {
                let extra = 1 + rng.below(32);
                let start = frame.len();
                frame.resize(start + extra, 0);
                rng.fill(&mut frame[start..]);
            }
        }
    }
}
