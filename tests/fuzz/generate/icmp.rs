//! ICMP and ICMPv6 errors about a client's packet as DNATed (client → backend), on their way
//! back to the client through `to_pod`: fragmentation needed (packet too big), port unreachable,
//! time exceeded and now and then another error, from a router on the path or from the backend
//! itself. Translated when the flow is tracked; some must pass untouched all the same: a wrong
//! checksum, a quote cut short of the transport header's first 8 bytes, a tuple no flow has,
//! IPv6 extension headers, a later fragment or the other family in the quote, or a mutation.
use lb_common::{IPPROTO_ICMP, IPPROTO_ICMPV6};

use super::{
    Generator, Program,
    frames::{ETH_LEN, fix_ipv4_checksum, l4_checksum, write_ip},
    mutate::mutate,
};
use crate::{
    checksum,
    topology::{CLIENT_PORTS, Family},
};

/// A router between the node and the backend.
const ROUTER: [u8; 4] = [192, 168, 0, 1];
/// An IPv4 error quotes the IP header and 8 bytes (RFC 792), or as much as fits in 576 bytes
/// (RFC 1812 §4.3.2.3); an ICMPv6 one as much as fits in IPv6's minimum MTU (RFC 4443 §2.4).
const ICMP_ERROR_MAX: usize = 576;
const ICMPV6_ERROR_MAX: usize = 1280;
const ICMP_HEADER_LEN: usize = 8;

/// An error's type and code, and whether the backend itself (rather than a router) sends it.
struct Kind {
    kind: u8,
    code: u8,
    from_backend: bool,
}

impl Generator {
    pub(super) fn flow_icmp_error(&mut self, frame: &mut Vec<u8>) -> Program {
        let service = self.service_with_backends();
        let backend = *self.rng.pick(&service.backends);
        let mut client = if service.is_external() && self.rng.percent(50) {
            self.external_client()
        } else {
            self.client()
        };
        if self.rng.percent(5) {
            // A port no client uses: no flow has the tuple.
            client.1 = 1024 + self.rng.below(usize::from(CLIENT_PORTS.start) - 1024) as u16;
        }
        let mut quoted = Vec::new();
        let segment = self.segment(client, backend, service.proto);
        self.write_segment(&mut quoted, &segment);
        if self.rng.percent(30) {
            self.between_headers(&mut quoted);
        }
        if self.family == Family::Ipv4 && self.rng.percent(5) {
            // A fragment's: the first one's quote is translated, a later one's (no ports) not.
            let offset = if self.rng.percent(50) {
                0
            } else {
                1 + self.rng.below(0x1fff) as u16
            };
            quoted[ETH_LEN + 6..ETH_LEN + 8].copy_from_slice(&(0x2000 | offset).to_be_bytes());
            fix_ipv4_checksum(&mut quoted);
        }
        let quoted = &mut quoted[ETH_LEN..];
        if self.family == Family::Ipv4 && self.rng.percent(5) {
            // A wrong quoted header checksum, which the translation keeps as wrong.
            quoted[10] ^= 1 << self.rng.below(8);
        }
        if self.rng.percent(2) {
            // The other family's version: not a packet this error can be about.
            quoted[0] = quoted[0] & 0x0f | if self.family == Family::Ipv4 { 0x60 } else { 0x40 };
        }
        let Kind {
            kind,
            code,
            from_backend,
        } = self.error_kind();
        self.l4.clear();
        self.l4.extend_from_slice(&[kind, code, 0, 0]);
        let mtu = 1280 + self.rng.below(221) as u32;
        match (self.family, kind) {
            (Family::Ipv4, 3) if code == 4 => self.l4.extend_from_slice(&mtu.to_be_bytes()),
            (Family::Ipv6, 2) => self.l4.extend_from_slice(&mtu.to_be_bytes()),
            _ => self.l4.extend_from_slice(&[0; 4]),
        }
        let quote_len = self.quote_len(quoted);
        self.l4.extend_from_slice(&quoted[..quote_len]);
        let from = if from_backend { backend.0 } else { self.at(ROUTER) };
        let mut sum = match self.family {
            Family::Ipv4 => checksum::of(checksum::add(0, &self.l4)),
            Family::Ipv6 => l4_checksum(from, client.0, IPPROTO_ICMPV6, &self.l4),
        };
        if self.rng.percent(5) {
            sum ^= 1 << self.rng.below(16);
        }
        self.l4[2..4].copy_from_slice(&sum.to_be_bytes());
        let proto = match self.family {
            Family::Ipv4 => IPPROTO_ICMP,
            Family::Ipv6 => IPPROTO_ICMPV6,
        };
        let id = self.rng.next_u64() as u16;
        write_ip(frame, from, client.0, proto, id, &self.l4);
        if self.rng.percent(5) {
            mutate(&mut self.rng, frame);
        }
        // Every other program passes ICMP errors untouched.
        if self.rng.percent(10) {
            self.other(Program::ToPod)
        } else {
            Program::ToPod
        }
    }

    /// Mostly fragmentation needed (packet too big), port unreachable (from the backend) and
    /// time exceeded; now and then host unreachable or a parameter problem.
    fn error_kind(&mut self) -> Kind {
        let (kind, code) = match (self.family, self.rng.below(10)) {
            (Family::Ipv4, 0..3) => (3, 4),
            (Family::Ipv4, 3..6) => (3, 3),
            (Family::Ipv4, 6..8) => (11, 0),
            (Family::Ipv4, _) => *self.rng.pick(&[(3, 1), (12, 0)]),
            (Family::Ipv6, 0..3) => (2, 0),
            (Family::Ipv6, 3..6) => (1, 4),
            (Family::Ipv6, 6..8) => (3, 0),
            (Family::Ipv6, _) => *self.rng.pick(&[(1, 3), (4, 0)]),
        };
        let port_unreachable = matches!((kind, code), (3, 3) | (1, 4));
        let from_backend = self.rng.percent(if port_unreachable { 80 } else { 20 });
        Kind {
            kind,
            code,
            from_backend,
        }
    }

    /// How much of the IP packet `quoted` the error holds: the IP header and 8 bytes or as much
    /// as fits, or about a TCP header; now and then less than the header and 8 bytes (cut
    /// short), or all of it.
    fn quote_len(&mut self, quoted: &[u8]) -> usize {
        let header_len = match self.family {
            Family::Ipv4 => usize::from(quoted[0] & 0x0f) * 4,
            Family::Ipv6 => 40,
        };
        let fits = match self.family {
            Family::Ipv4 => ICMP_ERROR_MAX - 20 - ICMP_HEADER_LEN,
            Family::Ipv6 => ICMPV6_ERROR_MAX - 40 - ICMP_HEADER_LEN,
        };
        let len = match self.rng.below(20) {
            0 => self.rng.below(header_len + 8),
            1..8 if self.family == Family::Ipv4 => header_len + 8,
            // Around the end of a TCP header, whose checksum is updated only when all of it is
            // quoted.
            8..11 => header_len + 8 + self.rng.below(16),
            // The whole packet, more than the RFCs have an error quote: nothing in the rule
            // limits the quote.
            19 => quoted.len(),
            _ => fits,
        };
        len.min(quoted.len())
    }
}
