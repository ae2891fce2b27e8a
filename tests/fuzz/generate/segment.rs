//! Writing a TCP, UDP or SCTP packet as a whole frame (correct but for an SCTP CRC32c meant to
//! be wrong), and what may lie between its IP and transport headers.
use lb_common::{IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

use super::{
    Generator, Segment,
    frames::{
        IPV6_AUTHENTICATION, IPV6_DESTINATION_OPTIONS, IPV6_FRAGMENT, IPV6_HOP_BY_HOP, IPV6_ROUTING,
        insert_ipv4_options, insert_ipv6_header, l4_checksum, write_ip,
    },
};
use crate::topology::{Endpoint, Family};

const TCP_SYN: u8 = 0x02;
const TCP_PSH_ACK: u8 = 0x18;

impl Generator {
    pub(super) fn segment(&mut self, src: Endpoint, dst: Endpoint, proto: u8) -> Segment {
        Segment {
            src,
            dst,
            proto,
            tcp_flags: if self.rng.percent(40) {
                TCP_SYN
            } else {
                TCP_PSH_ACK
            },
            no_udp_checksum: self.rng.percent(20),
            sctp_chunk: self.sctp_chunk(),
            sctp_crc: self.sctp_crc(),
        }
    }

    /// A complete Ethernet + IP + TCP/UDP/SCTP frame of the segment's family.
    pub(super) fn write_segment(&mut self, frame: &mut Vec<u8>, segment: &Segment) {
        self.l4.clear();
        if segment.proto == IPPROTO_SCTP {
            self.write_sctp(segment);
        } else {
            self.write_tcp_or_udp(segment);
        }
        let id = self.rng.next_u64() as u16;
        write_ip(frame, segment.src.0, segment.dst.0, segment.proto, id, &self.l4);
    }

    /// A TCP segment or UDP datagram with a right checksum (or none, for UDP) into `l4`.
    fn write_tcp_or_udp(&mut self, segment: &Segment) {
        self.l4.extend_from_slice(&segment.src.1.to_be_bytes());
        self.l4.extend_from_slice(&segment.dst.1.to_be_bytes());
        let payload = self.rng.payload_len();
        let checksum_at = if segment.proto == IPPROTO_TCP {
            let seq = self.rng.next_u64() as u32;
            self.l4.extend_from_slice(&seq.to_be_bytes());
            self.l4.extend_from_slice(&(seq ^ 0x5555).to_be_bytes());
            self.l4
                .extend_from_slice(&[5 << 4, segment.tcp_flags, 0xfa, 0xf0, 0, 0, 0, 0]);
            16
        } else {
            self.l4.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
            self.l4.extend_from_slice(&[0, 0]);
            6
        };
        self.random_bytes(payload);
        let mut sum = l4_checksum(segment.src.0, segment.dst.0, segment.proto, &self.l4);
        if segment.proto == IPPROTO_UDP {
            // 0 means "no checksum"; a computed 0 is sent as 0xffff.
            sum = if segment.no_udp_checksum {
                0
            } else if sum == 0 {
                0xffff
            } else {
                sum
            };
        }
        self.l4[checksum_at..checksum_at + 2].copy_from_slice(&sum.to_be_bytes());
    }

    /// What may lie between the IP and the transport header, on one packet in ten (IPv4
    /// options) or five (IPv6 extension headers).
    pub(super) fn between_headers(&mut self, frame: &mut Vec<u8>) {
        match self.family {
            Family::Ipv4 if self.rng.percent(10) => {
                insert_ipv4_options(frame, 4 * (1 + self.rng.below(10)));
            }
            Family::Ipv6 if self.rng.percent(20) => self.extension_headers(frame),
            _ => {}
        }
    }

    /// A chain of IPv6 extension headers: mostly one to four the datapath walks past
    /// (hop-by-hop, routing with no segments left, destination options, 8 to 32 bytes each), and
    /// sometimes more than it walks, a routing header with segments left, a fragment header or
    /// AH.
    pub(super) fn extension_headers(&mut self, frame: &mut Vec<u8>) {
        let count = match self.rng.below(10) {
            0..8 => 1 + self.rng.below(4),
            _ => 5 + self.rng.below(2),
        };
        for _ in 0..count {
            let kind = match self.rng.below(20) {
                0 => IPV6_FRAGMENT,
                1 => IPV6_AUTHENTICATION,
                _ => *self
                    .rng
                    .pick(&[IPV6_HOP_BY_HOP, IPV6_ROUTING, IPV6_DESTINATION_OPTIONS]),
            };
            let units = self.rng.below(4);
            let mut header = vec![0; (units + 1) * 8];
            match kind {
                IPV6_FRAGMENT => {
                    header.truncate(8);
                    self.rng.fill(&mut header[2..]);
                }
                IPV6_AUTHENTICATION => {
                    // AH counts its length in 4-byte units, less 2.
                    header[1] = (header.len() / 4 - 2) as u8;
                    self.rng.fill(&mut header[2..]);
                }
                IPV6_ROUTING => {
                    header[1] = units as u8;
                    header[2] = self.rng.below(5) as u8;
                    header[3] = if self.rng.percent(80) {
                        0
                    } else {
                        1 + self.rng.below(3) as u8
                    };
                    self.rng.fill(&mut header[4..]);
                }
                // Options: Pad1 (zero bytes) only.
                _ => header[1] = units as u8,
            }
            insert_ipv6_header(frame, kind, header);
        }
    }

    pub(super) fn random_bytes(&mut self, len: usize) {
        let start = self.l4.len();
        self.l4.resize(start + len, 0);
        self.rng.fill(&mut self.l4[start..]);
    }
}
