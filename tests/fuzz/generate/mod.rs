//! Inputs: frames of real service flows in both families, of everything else a pod's or an
//! external interface carries, and mutations of both (`mutate`), written by `frames`. They depend
//! on the seed alone, never on the datapath's answers, so a seed replays the same inputs.
mod frames;
mod mutate;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use frames::{
    ETH_LEN, ETHERTYPE_ARP, ETHERTYPE_QINQ, ETHERTYPE_VLAN, IPV6_AUTHENTICATION, IPV6_DESTINATION_OPTIONS,
    IPV6_FRAGMENT, IPV6_HOP_BY_HOP, IPV6_NO_NEXT_HEADER, IPV6_ROUTING, addr_at, fix_ipv4_checksum,
    insert_ipv4_options, insert_ipv6_header, l4_checksum, push_ethernet, write_ip,
};
use lb_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

use crate::topology::{
    CLIENT_MAC, CLIENT_PORTS, CLIENTS, EXTERNAL_CLIENTS, EXTERNAL_PORTS, Endpoint, Family, NODE_ADDRS,
    OTHER_ADDRS, SNAT_ADDR, SNAT_PORTS, Service, services,
};

const TCP_SYN: u8 = 0x02;
const TCP_PSH_ACK: u8 = 0x18;
/// Frames stay well inside what BPF_PROG_TEST_RUN takes for an skb (a page with room around).
const MAX_PAYLOAD: usize = 1400;
/// Frames cut at every offset are cut to this length first (what follows is payload): past an
/// IPv6 header, a few extension headers and a TCP header.
const SWEPT_LEN: usize = 160;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Program {
    /// TC ingress on a pod's interface.
    FromPod,
    /// TC egress on a pod's interface.
    ToPod,
    /// XDP on an external interface.
    Nodeport,
    /// TC ingress on an external interface.
    NodeportTc,
    /// TC egress on an external interface.
    NodeportEgress,
}

impl Program {
    pub const ALL: [Self; 5] = [
        Self::FromPod,
        Self::ToPod,
        Self::Nodeport,
        Self::NodeportTc,
        Self::NodeportEgress,
    ];

    pub fn name(self) -> &'static str {
        use lb_common::program_names;
        match self {
            Self::FromPod => program_names::FROM_POD,
            Self::ToPod => program_names::TO_POD,
            Self::Nodeport => program_names::NODEPORT_XDP,
            Self::NodeportTc => program_names::NODEPORT_TC,
            Self::NodeportEgress => program_names::NODEPORT_EGRESS,
        }
    }

    pub fn is_xdp(self) -> bool {
        self == Self::Nodeport
    }
}

/// splitmix64: tiny, fast, and good enough to pick fuzz inputs.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`; `n` > 0.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn percent(&mut self, p: usize) -> bool {
        self.below(100) < p
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }

    pub fn fill(&mut self, bytes: &mut [u8]) {
        for chunk in bytes.chunks_mut(8) {
            let random = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&random[..chunk.len()]);
        }
    }

    /// Mostly short payloads, sometimes up to a full MTU.
    fn payload_len(&mut self) -> usize {
        match self.below(10) {
            0..3 => 0,
            3..9 => self.below(64),
            _ => self.below(MAX_PAYLOAD),
        }
    }
}

/// A TCP or UDP packet's header fields, before it is written.
#[derive(Clone, Copy)]
struct Segment {
    src: Endpoint,
    dst: Endpoint,
    proto: u8,
    tcp_flags: u8,
    /// UDP only: send without a checksum (0).
    no_udp_checksum: bool,
}

/// Walks every prefix of one frame: "truncated at every offset".
struct Sweep {
    frame: Vec<u8>,
    next_len: usize,
    program: Program,
}

pub struct Generator {
    rng: Rng,
    sweep: Option<Sweep>,
    /// The family of the current input's addresses: each input picks one.
    family: Family,
    l4: Vec<u8>,
}

impl Generator {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: Rng::new(seed),
            sweep: None,
            family: Family::Ipv4,
            l4: Vec::with_capacity(2048),
        }
    }

    /// Writes the next input into `frame` and says which program it goes through.
    pub fn next(&mut self, frame: &mut Vec<u8>) -> Program {
        frame.clear();
        if let Some(sweep) = &mut self.sweep {
            frame.extend_from_slice(&sweep.frame[..sweep.next_len]);
            sweep.next_len += 1;
            let program = sweep.program;
            if sweep.next_len > sweep.frame.len() {
                self.sweep = None;
            }
            return program;
        }
        self.family = *self.rng.pick(&Family::ALL);
        let program = match self.rng.below(100) {
            0..14 => self.service_request(frame),
            14..23 => self.backend_reply(frame),
            23..34 => self.external_request(frame),
            34..40 => self.forwarded(frame),
            40..44 => self.snat_reply(frame),
            44..48 => self.external_reply(frame),
            48..51 => self.hairpin(frame),
            51..57 => self.mixed(frame),
            57..60 => self.icmp_error(frame),
            60..63 => self.fragment(frame),
            63..66 => self.vlan(frame),
            66..68 => self.ipv4_mapped(frame),
            68..70 => self.arp(frame),
            70..75 => self.garbage(frame),
            75..99 => {
                let program = self.service_packet(frame);
                mutate::mutate(&mut self.rng, frame);
                program
            }
            // A sweep yields a packet per byte: rare, and over frames of up to 160 bytes, so
            // that sweeps are about a fifth of all packets.
            _ if self.rng.percent(70) => self.service_packet(frame),
            _ => {
                let program = self.service_packet(frame);
                frame.truncate(SWEPT_LEN);
                self.sweep = Some(Sweep {
                    frame: frame.clone(),
                    next_len: 0,
                    program,
                });
                return self.next(frame);
            }
        };
        // Every kind of frame also goes the "wrong" way now and then.
        if self.rng.percent(10) {
            self.other(program)
        } else {
            program
        }
    }

    /// Any program but `program`.
    fn other(&mut self, program: Program) -> Program {
        loop {
            let other = *self.rng.pick(&Program::ALL);
            if other != program {
                return other;
            }
        }
    }

    fn service_packet(&mut self, frame: &mut Vec<u8>) -> Program {
        match self.rng.below(11) {
            0..3 => self.service_request(frame),
            3..5 => self.backend_reply(frame),
            5..7 => self.external_request(frame),
            7 => self.forwarded(frame),
            8 => self.snat_reply(frame),
            9 => self.hairpin(frame),
            _ => self.external_reply(frame),
        }
    }

    /// This input's family's twin of the IPv4 address `v4`.
    fn at(&self, v4: [u8; 4]) -> IpAddr {
        self.family.addr(v4)
    }

    /// One of `table`'s addresses, in this input's family.
    fn pick_addr(&mut self, table: &[[u8; 4]]) -> IpAddr {
        let v4 = *self.rng.pick(table);
        self.family.addr(v4)
    }

    fn client(&mut self) -> Endpoint {
        let port = CLIENT_PORTS.start + self.rng.below(CLIENT_PORTS.len()) as u16;
        (self.pick_addr(&CLIENTS), port)
    }

    fn external_client(&mut self) -> Endpoint {
        (self.pick_addr(&EXTERNAL_CLIENTS), *self.rng.pick(&EXTERNAL_PORTS))
    }

    /// Where a packet to `service` is sent: a NodePort on one of the node's addresses, now and
    /// then on another address (where it must not answer; over IPv6 also a node's IPv4 address,
    /// IPv4-mapped).
    fn frontend_of(&mut self, service: &Service) -> Endpoint {
        let (addr, port) = service.frontend;
        if !addr.is_unspecified() {
            (addr, port)
        } else if self.rng.percent(85) {
            (self.pick_addr(&NODE_ADDRS), port)
        } else if self.family == Family::Ipv6 && self.rng.percent(25) {
            (ipv4_mapped(*self.rng.pick(&NODE_ADDRS)), port)
        } else {
            (self.pick_addr(&OTHER_ADDRS), port)
        }
    }

    /// XDP first, TC when XDP is not there (or passed the packet on).
    fn external_ingress(&mut self) -> Program {
        if self.rng.percent(50) {
            Program::Nodeport
        } else {
            Program::NodeportTc
        }
    }

    /// Any service of this input's family.
    fn service(&mut self) -> &'static Service {
        self.rng.pick(services(self.family))
    }

    fn service_where(&mut self, wanted: impl Fn(&Service) -> bool) -> &'static Service {
        loop {
            let service = self.service();
            if wanted(service) {
                return service;
            }
        }
    }

    fn external_service(&mut self) -> &'static Service {
        self.service_where(Service::is_external)
    }

    fn snat_service(&mut self) -> &'static Service {
        self.service_where(|s| s.snats() && !s.backends.is_empty())
    }

    fn service_with_backends(&mut self) -> &'static Service {
        self.service_where(|s| !s.backends.is_empty())
    }

    /// An outside client's SYN, data segment or datagram to an external frontend (now and then
    /// to a ClusterIP), arriving on the external interface.
    fn external_request(&mut self, frame: &mut Vec<u8>) -> Program {
        let service = if self.rng.percent(90) {
            self.external_service()
        } else {
            self.service()
        };
        let client = self.external_client();
        let frontend = self.frontend_of(service);
        let segment = self.segment(client, frontend, service.proto);
        self.write_segment(frame, &segment);
        self.between_headers(frame);
        self.maybe_pad(frame);
        self.external_ingress()
    }

    /// An external flow as DNATed on the way in, leaving the node for its backend on another
    /// node: source NAT when the flow was tracked with externalTrafficPolicy Cluster.
    fn forwarded(&mut self, frame: &mut Vec<u8>) -> Program {
        let service = self.snat_service();
        let backend = *self.rng.pick(&service.backends);
        let client = self.external_client();
        let segment = self.segment(client, backend, service.proto);
        self.write_segment(frame, &segment);
        self.maybe_pad(frame);
        Program::NodeportEgress
    }

    /// A backend on another node answering a source-NATed flow: to the node's address, on the
    /// port the client kept (or a probed one, or another address of the node).
    fn snat_reply(&mut self, frame: &mut Vec<u8>) -> Program {
        let service = self.snat_service();
        let backend = *self.rng.pick(&service.backends);
        let port = if self.rng.percent(85) {
            *self.rng.pick(&EXTERNAL_PORTS)
        } else {
            SNAT_PORTS.start + self.rng.below(SNAT_PORTS.len()) as u16
        };
        let addr = if self.rng.percent(90) {
            SNAT_ADDR
        } else {
            *self.rng.pick(&NODE_ADDRS)
        };
        let segment = self.segment(backend, (self.at(addr), port), service.proto);
        self.write_segment(frame, &segment);
        self.maybe_pad(frame);
        self.external_ingress()
    }

    /// A backend answering an outside client, on its way out of the external interface.
    fn external_reply(&mut self, frame: &mut Vec<u8>) -> Program {
        let service = self.service_where(|s| s.is_external() && !s.backends.is_empty());
        let backend = *self.rng.pick(&service.backends);
        let client = self.external_client();
        let segment = self.segment(backend, client, service.proto);
        self.write_segment(frame, &segment);
        self.maybe_pad(frame);
        Program::NodeportEgress
    }

    fn segment(&mut self, src: Endpoint, dst: Endpoint, proto: u8) -> Segment {
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
        }
    }

    /// A client's SYN, data segment or datagram to a frontend, the way a pod sends it: sometimes
    /// with IP options or IPv6 extension headers, or Ethernet padding.
    fn service_request(&mut self, frame: &mut Vec<u8>) -> Program {
        let service = self.service();
        let client = self.client();
        let frontend = self.frontend_of(service);
        let segment = self.segment(client, frontend, service.proto);
        self.write_segment(frame, &segment);
        self.between_headers(frame);
        self.maybe_pad(frame);
        Program::FromPod
    }

    /// A backend answering a client: part of a tracked flow when the client and port match one.
    fn backend_reply(&mut self, frame: &mut Vec<u8>) -> Program {
        let service = self.service_with_backends();
        let backend = *self.rng.pick(&service.backends);
        let client = self.client();
        let segment = self.segment(backend, client, service.proto);
        self.write_segment(frame, &segment);
        self.between_headers(frame);
        self.maybe_pad(frame);
        Program::ToPod
    }

    /// A backend pod reaching its own Service (given itself now and then), or answering such a
    /// connection: to the hairpin address, on a client port.
    fn hairpin(&mut self, frame: &mut Vec<u8>) -> Program {
        let service = self.service_with_backends();
        let pod = *self.rng.pick(&service.backends);
        let port = CLIENT_PORTS.start + self.rng.below(CLIENT_PORTS.len()) as u16;
        let segment = if self.rng.percent(50) {
            let frontend = self.frontend_of(service);
            self.segment((pod.0, port), frontend, service.proto)
        } else {
            self.segment(pod, (self.family.hairpin(), port), service.proto)
        };
        self.write_segment(frame, &segment);
        self.maybe_pad(frame);
        Program::FromPod
    }

    /// IP between any of the addresses around (or random ones), any protocol (SCTP included,
    /// which no frontend has yet), ports that are sometimes a frontend's.
    fn mixed(&mut self, frame: &mut Vec<u8>) -> Program {
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
        if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
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
                    crate::checksum::of(crate::checksum::add(0, &self.l4))
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

    fn address(&mut self) -> IpAddr {
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

    fn port(&mut self) -> u16 {
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
    fn icmp_error(&mut self, frame: &mut Vec<u8>) -> Program {
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
            crate::checksum::of(crate::checksum::add(0, &self.l4))
        } else {
            l4_checksum(from, sender, proto, &self.l4)
        };
        self.l4[2..4].copy_from_slice(&sum.to_be_bytes());
        write_ip(frame, from, sender, proto, 0, &self.l4);
        self.other(program)
    }

    /// A service packet cut into a first fragment (More Fragments) or a later one (an offset;
    /// what would be ports is payload), and over IPv6 also an atomic fragment (offset 0, no more
    /// fragments), which the datapath does not look into either.
    fn fragment(&mut self, frame: &mut Vec<u8>) -> Program {
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
        program
    }

    /// A service packet inside an 802.1Q tag, or two (QinQ).
    fn vlan(&mut self, frame: &mut Vec<u8>) -> Program {
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
    fn ipv4_mapped(&mut self, frame: &mut Vec<u8>) -> Program {
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
    fn arp(&mut self, frame: &mut Vec<u8>) -> Program {
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
    fn garbage(&mut self, frame: &mut Vec<u8>) -> Program {
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

    /// What may lie between the IP and the transport header, on one packet in ten (IPv4
    /// options) or five (IPv6 extension headers).
    fn between_headers(&mut self, frame: &mut Vec<u8>) {
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
    fn extension_headers(&mut self, frame: &mut Vec<u8>) {
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

    fn maybe_pad(&mut self, frame: &mut Vec<u8>) {
        // Short frames are padded to Ethernet's 60-byte minimum; the IP length excludes it.
        if self.rng.percent(10) && frame.len() < 60 {
            frame.resize(60, 0);
        }
    }

    fn random_bytes(&mut self, len: usize) {
        let start = self.l4.len();
        self.l4.resize(start + len, 0);
        self.rng.fill(&mut self.l4[start..]);
    }

    /// A complete, correct Ethernet + IP + TCP/UDP frame of the segment's family.
    fn write_segment(&mut self, frame: &mut Vec<u8>, segment: &Segment) {
        self.l4.clear();
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
        let id = self.rng.next_u64() as u16;
        write_ip(frame, segment.src.0, segment.dst.0, segment.proto, id, &self.l4);
    }
}

/// `::ffff:a.b.c.d`.
fn ipv4_mapped(v4: [u8; 4]) -> IpAddr {
    IpAddr::V6(Ipv4Addr::from(v4).to_ipv6_mapped())
}
