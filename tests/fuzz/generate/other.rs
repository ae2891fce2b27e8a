//! Everything else an interface carries: other traffic between the same addresses, ICMP errors
//! quoting service packets, fragments, VLAN tags, IPv4-mapped addresses, ARP and random bytes.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

use super::{
    Generator, Program,
    frames::{
        ETH_LEN, ETHERTYPE_ARP, ETHERTYPE_QINQ, ETHERTYPE_VLAN, IPV6_FIXED_END, IPV6_FRAGMENT,
        IPV6_NO_NEXT_HEADER, addr_at, fix_ipv4_checksum, insert_ipv6_header, l4_checksum, push_ethernet,
        write_ip,
    },
};
use crate::{
    checksum,
    topology::{CLIENT_MAC, CLIENT_PORTS, CLIENTS, EXTERNAL_CLIENTS, EXTERNAL_PORTS, Family, NODE_ADDRS},
};

impl Generator {
    /// IP between any of the addresses around (or random ones), any protocol, ports that are
    /// sometimes a frontend's; SCTP as the generator writes it or as random bytes (any first
    /// chunk type, a CRC32c that is almost surely wrong).
    pub(super) fn mixed(&mut self, frame: &mut Vec<u8>) -> Program {
        let src = (self.address(), self.port());
        let dst = (self.address(), self.port());
        let icmp = match self.family {
            Family::Ipv4 => IPPROTO_ICMP,
            Family::Ipv6 => IPPROTO_ICMPV6,
        };
        let proto = *self.rng.pick(&[
            IPPROTO_TCP,
            IPPROTO_UDP,
            icmp,
            47,
            IPPROTO_SCTP,
            0,
            IPV6_NO_NEXT_HEADER,
            255,
        ]);
        if proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP && self.rng.percent(50) {
            let segment = self.segment(src, dst, proto);
            self.write_segment(frame, &segment);
        } else {
            // ICMP echo, GRE, SCTP...: a header whose first bytes could pass for ports.
            self.l4.clear();
            self.l4.extend_from_slice(&src.1.to_be_bytes());
            self.l4.extend_from_slice(&dst.1.to_be_bytes());
            let len = self.rng.payload_len();
            self.random_bytes(len + 4);
            if proto == icmp {
                let echo = if icmp == IPPROTO_ICMP { 8 } else { 128 };
                self.l4[..4].copy_from_slice(&[echo, 0, 0, 0]);
                let sum = if icmp == IPPROTO_ICMP {
                    checksum::of(checksum::add(0, &self.l4))
                } else {
                    l4_checksum(src.0, dst.0, icmp, &self.l4)
                };
                self.l4[2..4].copy_from_slice(&sum.to_be_bytes());
            }
            write_ip(frame, src.0, dst.0, proto, 0, &self.l4);
        }
        self.maybe_pad(frame);
        *self.rng.pick(&Program::ALL)
    }

    pub(super) fn address(&mut self) -> IpAddr {
        match self.rng.below(9) {
            0 => self.pick_addr(&CLIENTS),
            1 => self.service().frontend.0,
            2 => self.service_with_backends().backends[0].0,
            3 => {
                let last = self.rng.byte();
                self.at([10, 96, 0, last])
            }
            4 => self.pick_addr(&NODE_ADDRS),
            5 => self.pick_addr(&EXTERNAL_CLIENTS),
            6 => self.family.hairpin(),
            _ => match self.family {
                Family::Ipv4 => Ipv4Addr::from(self.rng.next_u64() as u32).into(),
                Family::Ipv6 => {
                    Ipv6Addr::from(u128::from(self.rng.next_u64()) << 64 | u128::from(self.rng.next_u64()))
                        .into()
                }
            },
        }
    }

    pub(super) fn port(&mut self) -> u16 {
        match self.rng.below(4) {
            0 => self.service().frontend.1,
            1 => CLIENT_PORTS.start + self.rng.below(CLIENT_PORTS.len()) as u16,
            2 => *self.rng.pick(&EXTERNAL_PORTS),
            _ => self.rng.next_u64() as u16,
        }
    }

    /// An ICMP or ICMPv6 error (port unreachable, fragmentation needed or packet too big, time
    /// exceeded) quoting a packet of a service flow (a translated one too), sent towards the
    /// packet's sender.
    pub(super) fn icmp_error(&mut self, frame: &mut Vec<u8>) -> Program {
        let mut quoted = Vec::new();
        let program = self.service_packet(&mut quoted);
        let (sender, receiver, quote_max, kinds, proto) = match self.family {
            Family::Ipv4 => (
                addr_at(&quoted, ETH_LEN + 12, 4),
                addr_at(&quoted, ETH_LEN + 16, 4),
                20 + 8,
                [(3u8, 3u8), (3, 4), (11, 0)],
                IPPROTO_ICMP,
            ),
            Family::Ipv6 => (
                addr_at(&quoted, ETH_LEN + 8, 16),
                addr_at(&quoted, ETH_LEN + 24, 16),
                1280 - 48,
                [(1, 4), (2, 0), (3, 0)],
                IPPROTO_ICMPV6,
            ),
        };
        let (kind, code) = *self.rng.pick(&kinds);
        self.l4.clear();
        self.l4.extend_from_slice(&[kind, code, 0, 0, 0, 0, 0x05, 0xdc]);
        let quote_len = quote_max.min(quoted.len() - ETH_LEN);
        self.l4.extend_from_slice(&quoted[ETH_LEN..ETH_LEN + quote_len]);
        // From the packet's destination (or a router on the way) back to its sender.
        let from = if self.rng.percent(50) {
            receiver
        } else {
            self.at([192, 168, 0, 1])
        };
        let sum = if proto == IPPROTO_ICMP {
            checksum::of(checksum::add(0, &self.l4))
        } else {
            l4_checksum(from, sender, proto, &self.l4)
        };
        self.l4[2..4].copy_from_slice(&sum.to_be_bytes());
        write_ip(frame, from, sender, proto, 0, &self.l4);
        self.other(program)
    }

    /// A service packet cut into a first fragment (More Fragments) or a later one (an offset;
    /// what would be ports is payload), and over IPv6 also an atomic fragment (offset 0, no more
    /// fragments), a whole packet. Half the later fragments follow the last first fragment (its
    /// addresses, protocol and identification), through the same program as a rule: the
    /// datagram's rest, translated as it was.
    pub(super) fn fragment(&mut self, frame: &mut Vec<u8>) -> Program {
        if self.rng.percent(50)
            && let Some((first, program)) = self.last_first_fragment.clone()
        {
            self.family = if first[12..14] == [0x08, 0x00] {
                Family::Ipv4
            } else {
                Family::Ipv6
            };
            self.later_fragment_of(&first, frame);
            return program;
        }
        let program = self.service_packet(frame);
        let offset = if self.rng.percent(50) {
            0
        } else {
            1 + self.rng.below(0x1fff) as u16
        };
        let more = match self.family {
            Family::Ipv6 if offset == 0 && self.rng.percent(30) => false,
            _ => offset == 0 || self.rng.percent(50),
        };
        match self.family {
            Family::Ipv4 => {
                let flags = if more { 0x2000 } else { 0 };
                frame[18..20].copy_from_slice(&(self.rng.next_u64() as u16).to_be_bytes());
                frame[20..22].copy_from_slice(&(flags | offset).to_be_bytes());
                fix_ipv4_checksum(frame);
            }
            Family::Ipv6 => {
                let mut header = vec![0; 8];
                header[2..4].copy_from_slice(&(offset << 3 | u16::from(more)).to_be_bytes());
                self.rng.fill(&mut header[4..]);
                insert_ipv6_header(frame, IPV6_FRAGMENT, header);
            }
        }
        if offset == 0 && more {
            self.last_first_fragment = Some((frame.clone(), program));
        }
        program
    }

    /// A later fragment of the datagram whose first fragment is `first`: its headers with an
    /// offset, then payload.
    fn later_fragment_of(&mut self, first: &[u8], frame: &mut Vec<u8>) {
        let offset = 1 + self.rng.below(0x1fff) as u16;
        let more = self.rng.percent(50);
        let payload_len = 8 * self.rng.below(20) + self.rng.below(8);
        match self.family {
            Family::Ipv4 => {
                let headers = ETH_LEN + usize::from(first[ETH_LEN] & 0x0f) * 4;
                frame.extend_from_slice(&first[..headers]);
                let flags = if more { 0x2000 } else { 0 };
                frame[20..22].copy_from_slice(&(flags | offset).to_be_bytes());
                let total = (headers - ETH_LEN + payload_len) as u16;
                frame[16..18].copy_from_slice(&total.to_be_bytes());
                self.l4.clear();
                self.random_bytes(payload_len);
                frame.extend_from_slice(&self.l4);
                fix_ipv4_checksum(frame);
            }
            Family::Ipv6 => {
                // The fragment header is the first extension header (`fragment` put it there).
                let headers = IPV6_FIXED_END + 8;
                frame.extend_from_slice(&first[..headers]);
                frame[IPV6_FIXED_END + 2..IPV6_FIXED_END + 4]
                    .copy_from_slice(&(offset << 3 | u16::from(more)).to_be_bytes());
                frame[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&((8 + payload_len) as u16).to_be_bytes());
                self.l4.clear();
                self.random_bytes(payload_len);
                frame.extend_from_slice(&self.l4);
            }
        }
    }

    /// A service packet inside an 802.1Q tag, or two (QinQ).
    pub(super) fn vlan(&mut self, frame: &mut Vec<u8>) -> Program {
        let program = self.service_packet(frame);
        let mut tags = Vec::with_capacity(8);
        if self.rng.percent(30) {
            tags.extend_from_slice(&ETHERTYPE_QINQ.to_be_bytes());
            tags.extend_from_slice(&(self.rng.next_u64() as u16 & 0x0fff).to_be_bytes());
        }
        tags.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
        tags.extend_from_slice(&(self.rng.next_u64() as u16 & 0x0fff).to_be_bytes());
        frame.splice(12..12, tags);
        program
    }

    /// IPv6 TCP/UDP to a frontend's IPv4 address, IPv4-mapped: not an IPv6 frontend (only the
    /// socket hooks map such addresses), so not translated.
    pub(super) fn ipv4_mapped(&mut self, frame: &mut Vec<u8>) -> Program {
        self.family = Family::Ipv4;
        let service = self.service();
        self.family = Family::Ipv6;
        let IpAddr::V4(frontend) = service.frontend.0 else {
            unreachable!("an IPv4 service")
        };
        let client = self.client();
        let dst = (ipv4_mapped(frontend.octets()), service.frontend.1);
        let segment = self.segment(client, dst, service.proto);
        self.write_segment(frame, &segment);
        self.between_headers(frame);
        *self.rng.pick(&Program::ALL)
    }

    /// Who has a frontend's (or a client's) address?
    pub(super) fn arp(&mut self, frame: &mut Vec<u8>) -> Program {
        push_ethernet(frame, ETHERTYPE_ARP);
        frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1 + self.rng.below(2) as u8]);
        frame.extend_from_slice(&CLIENT_MAC);
        frame.extend_from_slice(&self.rng.pick(&CLIENTS)[..]);
        frame.extend_from_slice(&[0; 6]);
        self.family = Family::Ipv4;
        let IpAddr::V4(target) = self.address() else {
            unreachable!("an IPv4 address")
        };
        frame.extend_from_slice(&target.octets());
        self.maybe_pad(frame);
        *self.rng.pick(&Program::ALL)
    }

    /// Random bytes; two thirds of them under an IPv4 (IPv6) EtherType and version byte, so
    /// that they get past the first checks.
    pub(super) fn garbage(&mut self, frame: &mut Vec<u8>) -> Program {
        frame.resize(self.rng.below(200), 0);
        self.rng.fill(frame);
        if frame.len() > ETH_LEN {
            match self.rng.below(3) {
                0 => frame[12..15].copy_from_slice(&[0x08, 0x00, 0x45]),
                1 => frame[12..15].copy_from_slice(&[0x86, 0xdd, 0x60]),
                _ => {}
            }
        }
        *self.rng.pick(&Program::ALL)
    }
}

/// `::ffff:a.b.c.d`.
pub(super) fn ipv4_mapped(v4: [u8; 4]) -> IpAddr {
    IpAddr::V6(Ipv4Addr::from(v4).to_ipv6_mapped())
}
