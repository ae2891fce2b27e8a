//! Inputs: frames of real service flows, of everything else a pod's or an external interface
//! carries, and mutations of both. They depend on the seed alone, never on the datapath's answers, so a seed
//! replays the same inputs.
use lb_common::{IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    checksum,
    topology::{
        CLIENT_MAC, CLIENT_PORTS, CLIENTS, EXTERNAL_CLIENTS, EXTERNAL_PORTS, Endpoint, GATEWAY_MAC,
        NODE_ADDRS, OTHER_ADDRS, SERVICES, SNAT_ADDR, SNAT_PORTS, Service,
    },
};

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88a8;
const IPPROTO_ICMP: u8 = 1;
const TCP_SYN: u8 = 0x02;
const TCP_PSH_ACK: u8 = 0x18;
/// Frames stay well inside what BPF_PROG_TEST_RUN takes for an skb (a page with room around).
const MAX_PAYLOAD: usize = 1400;
/// Frames cut at every offset are cut to this length first (what follows is payload).
const SWEPT_LEN: usize = 128;

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

    fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }

    fn fill(&mut self, bytes: &mut [u8]) {
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
    l4: Vec<u8>,
}

impl Generator {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: Rng::new(seed),
            sweep: None,
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
        let program = match self.rng.below(100) {
            0..16 => self.service_request(frame),
            16..26 => self.backend_reply(frame),
            26..38 => self.external_request(frame),
            38..44 => self.forwarded(frame),
            44..48 => self.snat_reply(frame),
            48..52 => self.external_reply(frame),
            52..58 => self.mixed_ipv4(frame),
            58..61 => self.icmp_error(frame),
            61..64 => self.fragment(frame),
            64..67 => self.vlan(frame),
            67..70 => self.ipv6(frame),
            70..72 => self.arp(frame),
            72..77 => self.garbage(frame),
            77..99 => {
                let program = self.service_packet(frame);
                self.mutate(frame);
                program
            }
            // A sweep yields a packet per byte: rare, and over frames of up to 128 bytes, so
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
        match self.rng.below(10) {
            0..3 => self.service_request(frame),
            3..5 => self.backend_reply(frame),
            5..7 => self.external_request(frame),
            7 => self.forwarded(frame),
            8 => self.snat_reply(frame),
            _ => self.external_reply(frame),
        }
    }

    fn client(&mut self) -> Endpoint {
        let port = CLIENT_PORTS.start + self.rng.below(CLIENT_PORTS.len()) as u16;
        (*self.rng.pick(&CLIENTS), port)
    }

    fn external_client(&mut self) -> Endpoint {
        (*self.rng.pick(&EXTERNAL_CLIENTS), *self.rng.pick(&EXTERNAL_PORTS))
    }

    /// Where a packet to `service` is sent: a NodePort on one of the node's addresses, now and
    /// then on another address (where it must not answer).
    fn frontend_of(&mut self, service: &Service) -> Endpoint {
        let (addr, port) = service.frontend;
        if addr != [0; 4] {
            (addr, port)
        } else if self.rng.percent(85) {
            (*self.rng.pick(&NODE_ADDRS), port)
        } else {
            (*self.rng.pick(&OTHER_ADDRS), port)
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

    fn external_service(&mut self) -> &'static Service {
        loop {
            let service = self.rng.pick(&SERVICES);
            if service.is_external() {
                return service;
            }
        }
    }

    fn snat_service(&mut self) -> &'static Service {
        loop {
            let service = self.external_service();
            if service.snats() && !service.backends.is_empty() {
                return service;
            }
        }
    }

    /// An outside client's SYN, data segment or datagram to an external frontend (now and then
    /// to a ClusterIP), arriving on the external interface.
    fn external_request(&mut self, frame: &mut Vec<u8>) -> Program {
        let service = if self.rng.percent(90) {
            self.external_service()
        } else {
            self.rng.pick(&SERVICES)
        };
        let client = self.external_client();
        let frontend = self.frontend_of(service);
        let segment = self.segment(client, frontend, service.proto);
        let options = self.options();
        self.write_segment(frame, &segment, options);
        self.maybe_pad(frame);
        self.external_ingress()
    }

    /// An external flow as DNATed on the way in, leaving the node for its backend on another
    /// node: source NAT when the flow was tracked with externalTrafficPolicy Cluster.
    fn forwarded(&mut self, frame: &mut Vec<u8>) -> Program {
        let service = self.snat_service();
        let backend = *self.rng.pick(service.backends);
        let client = self.external_client();
        let segment = self.segment(client, backend, service.proto);
        self.write_segment(frame, &segment, 0);
        self.maybe_pad(frame);
        Program::NodeportEgress
    }

    /// A backend on another node answering a source-NATed flow: to the node's address, on the
    /// port the client kept (or a probed one, or another address of the node).
    fn snat_reply(&mut self, frame: &mut Vec<u8>) -> Program {
        let service = self.snat_service();
        let backend = *self.rng.pick(service.backends);
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
        let segment = self.segment(backend, (addr, port), service.proto);
        self.write_segment(frame, &segment, 0);
        self.maybe_pad(frame);
        self.external_ingress()
    }

    /// A backend answering an outside client, on its way out of the external interface.
    fn external_reply(&mut self, frame: &mut Vec<u8>) -> Program {
        let service = loop {
            let service = self.external_service();
            if !service.backends.is_empty() {
                break service;
            }
        };
        let backend = *self.rng.pick(service.backends);
        let client = self.external_client();
        let segment = self.segment(backend, client, service.proto);
        self.write_segment(frame, &segment, 0);
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
    /// with IP options or Ethernet padding.
    fn service_request(&mut self, frame: &mut Vec<u8>) -> Program {
        let service = self.rng.pick(&SERVICES);
        let client = self.client();
        let frontend = self.frontend_of(service);
        let segment = self.segment(client, frontend, service.proto);
        let options = self.options();
        self.write_segment(frame, &segment, options);
        self.maybe_pad(frame);
        Program::FromPod
    }

    /// A backend answering a client: part of a tracked flow when the client and port match one.
    fn backend_reply(&mut self, frame: &mut Vec<u8>) -> Program {
        let service = self.service_with_backends();
        let backend = *self.rng.pick(service.backends);
        let client = self.client();
        let segment = self.segment(backend, client, service.proto);
        let options = self.options();
        self.write_segment(frame, &segment, options);
        self.maybe_pad(frame);
        Program::ToPod
    }

    fn service_with_backends(&mut self) -> &'static Service {
        loop {
            let service = self.rng.pick(&SERVICES);
            if !service.backends.is_empty() {
                return service;
            }
        }
    }

    /// IPv4 between any of the addresses around (or random ones), any protocol, ports that are
    /// sometimes a frontend's.
    fn mixed_ipv4(&mut self, frame: &mut Vec<u8>) -> Program {
        let src = (self.address(), self.port());
        let dst = (self.address(), self.port());
        let proto = *self
            .rng
            .pick(&[IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, 47, 132, 0, 255]);
        if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
            let segment = self.segment(src, dst, proto);
            self.write_segment(frame, &segment, 0);
        } else {
            // ICMP echo, GRE, SCTP...: a header whose first bytes could pass for ports.
            self.l4.clear();
            self.l4.extend_from_slice(&src.1.to_be_bytes());
            self.l4.extend_from_slice(&dst.1.to_be_bytes());
            let len = self.rng.payload_len();
            self.random_bytes(len + 4);
            if proto == IPPROTO_ICMP {
                self.l4[..4].copy_from_slice(&[8, 0, 0, 0]);
                let sum = checksum::of(checksum::add(0, &self.l4));
                self.l4[2..4].copy_from_slice(&sum.to_be_bytes());
            }
            write_ipv4(frame, src.0, dst.0, proto, &[], 0, &self.l4);
        }
        self.maybe_pad(frame);
        *self.rng.pick(&Program::ALL)
    }

    fn address(&mut self) -> [u8; 4] {
        match self.rng.below(8) {
            0 => *self.rng.pick(&CLIENTS),
            1 => self.rng.pick(&SERVICES).frontend.0,
            2 => self.service_with_backends().backends[0].0,
            3 => [10, 96, 0, self.rng.byte()],
            4 => *self.rng.pick(&NODE_ADDRS),
            5 => *self.rng.pick(&EXTERNAL_CLIENTS),
            _ => self.rng.next_u64().to_be_bytes()[..4].try_into().unwrap(),
        }
    }

    fn port(&mut self) -> u16 {
        match self.rng.below(4) {
            0 => self.rng.pick(&SERVICES).frontend.1,
            1 => CLIENT_PORTS.start + self.rng.below(CLIENT_PORTS.len()) as u16,
            2 => *self.rng.pick(&EXTERNAL_PORTS),
            _ => self.rng.next_u64() as u16,
        }
    }

    /// An ICMP error (port unreachable, fragmentation needed, time exceeded) quoting a packet of
    /// a service flow, sent towards the flow's sender.
    fn icmp_error(&mut self, frame: &mut Vec<u8>) -> Program {
        let mut quoted = Vec::new();
        let program = self.service_packet(&mut quoted);
        let (sender, receiver) = (addr_at(&quoted, 26), addr_at(&quoted, 30));
        let (kind, code) = *self.rng.pick(&[(3u8, 3u8), (3, 4), (11, 0)]);
        self.l4.clear();
        self.l4.extend_from_slice(&[kind, code, 0, 0, 0, 0, 0x05, 0xdc]);
        let quote_len = (20 + 8).min(quoted.len() - 14);
        self.l4.extend_from_slice(&quoted[14..14 + quote_len]);
        let sum = checksum::of(checksum::add(0, &self.l4));
        self.l4[2..4].copy_from_slice(&sum.to_be_bytes());
        // From the packet's destination (or a router on the way) back to its sender.
        let from = if self.rng.percent(50) {
            receiver
        } else {
            [192, 168, 0, 1]
        };
        write_ipv4(frame, from, sender, IPPROTO_ICMP, &[], 0, &self.l4);
        self.other(program)
    }

    /// A service packet cut into a first fragment (More Fragments) or a later one (an offset;
    /// what would be ports is payload), with a correct header checksum.
    fn fragment(&mut self, frame: &mut Vec<u8>) -> Program {
        let program = self.service_packet(frame);
        let offset = if self.rng.percent(50) {
            0
        } else {
            1 + self.rng.below(0x1fff) as u16
        };
        let more = if offset == 0 || self.rng.percent(50) {
            0x2000
        } else {
            0
        };
        frame[20..22].copy_from_slice(&(more | offset).to_be_bytes());
        fix_ipv4_checksum(frame);
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

    /// IPv6 TCP/UDP with a frontend's port, after a chain of extension headers (hop-by-hop,
    /// routing, fragment, destination options), to an IPv6 or IPv4-mapped address.
    fn ipv6(&mut self, frame: &mut Vec<u8>) -> Program {
        let service = self.rng.pick(&SERVICES);
        let mut dst = [0u8; 16];
        if self.rng.percent(50) {
            dst[10..12].copy_from_slice(&[0xff, 0xff]);
            dst[12..].copy_from_slice(&service.frontend.0);
        } else {
            dst[..2].copy_from_slice(&[0xfd, 0x00]);
            dst[15] = 10;
        }
        let headers: Vec<u8> = (0..self.rng.below(4))
            .map(|_| *self.rng.pick(&[0u8, 43, 44, 60]))
            .collect();
        self.l4.clear();
        for (i, _) in headers.iter().enumerate() {
            let next = headers.get(i + 1).copied().unwrap_or(service.proto);
            self.l4.extend_from_slice(&[next, 0]);
            let mut rest = [0u8; 6];
            self.rng.fill(&mut rest);
            self.l4.extend_from_slice(&rest);
        }
        let client = self.client();
        self.l4.extend_from_slice(&client.1.to_be_bytes());
        self.l4.extend_from_slice(&service.frontend.1.to_be_bytes());
        let l4_len = if service.proto == IPPROTO_TCP { 16 } else { 4 };
        let payload = self.rng.payload_len();
        self.random_bytes(l4_len + payload);
        push_ethernet(frame, ETHERTYPE_IPV6);
        frame.extend_from_slice(&[0x60, 0, 0, 0]);
        frame.extend_from_slice(&(self.l4.len() as u16).to_be_bytes());
        frame.push(headers.first().copied().unwrap_or(service.proto));
        frame.push(64);
        frame.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 20]);
        frame.extend_from_slice(&dst);
        frame.extend_from_slice(&self.l4);
        *self.rng.pick(&Program::ALL)
    }

    /// Who has a frontend's (or a client's) address?
    fn arp(&mut self, frame: &mut Vec<u8>) -> Program {
        push_ethernet(frame, ETHERTYPE_ARP);
        frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1 + self.rng.below(2) as u8]);
        frame.extend_from_slice(&CLIENT_MAC);
        let sender = *self.rng.pick(&CLIENTS);
        frame.extend_from_slice(&sender);
        frame.extend_from_slice(&[0; 6]);
        frame.extend_from_slice(&self.address());
        self.maybe_pad(frame);
        *self.rng.pick(&Program::ALL)
    }

    /// Random bytes; half of them under an IPv4 EtherType and version/IHL byte, so that they get
    /// past the first checks.
    fn garbage(&mut self, frame: &mut Vec<u8>) -> Program {
        frame.resize(self.rng.below(200), 0);
        self.rng.fill(frame);
        if frame.len() > 14 && self.rng.percent(50) {
            frame[12..15].copy_from_slice(&[0x08, 0x00, 0x45]);
        }
        *self.rng.pick(&Program::ALL)
    }

    /// One to three of: a cut, flipped bytes, zeroed or wrong checksums, a wrong IHL, total
    /// length, TCP data offset or UDP length, trailing bytes.
    fn mutate(&mut self, frame: &mut Vec<u8>) {
        for _ in 0..1 + self.rng.below(3) {
            let l4 = l4_offset(frame);
            match self.rng.below(9) {
                0 => frame.truncate(self.rng.below(frame.len() + 1)),
                1 | 2 => {
                    // Mostly in the headers, where a flip changes what the packet is.
                    let span = if self.rng.percent(80) {
                        frame.len().min(64)
                    } else {
                        frame.len()
                    };
                    if span > 0 {
                        let at = self.rng.below(span);
                        frame[at] ^= 1 << self.rng.below(8);
                    }
                }
                3 => set(frame, 24, &[0, 0]),
                4 => {
                    let csum_at = l4
                        + if frame.get(23) == Some(&IPPROTO_UDP) {
                            6
                        } else {
                            16
                        };
                    // Zero ("none" for UDP), or off by a non-zero difference.
                    let zero = self.rng.percent(50);
                    let difference = [self.rng.byte() | 1, self.rng.byte()];
                    if let Some(field) = frame.get_mut(csum_at..csum_at + 2) {
                        for (byte, d) in field.iter_mut().zip(difference) {
                            *byte = if zero { 0 } else { *byte ^ d };
                        }
                    }
                }
                5 => {
                    if let Some(byte) = frame.get_mut(14) {
                        *byte = 0x40 | self.rng.below(16) as u8;
                    }
                }
                6 => {
                    let len = match self.rng.below(3) {
                        0 => self.rng.next_u64() as u16,
                        _ => (frame.len() as u16)
                            .wrapping_sub(14)
                            .wrapping_add(self.rng.below(9) as u16)
                            .wrapping_sub(4),
                    };
                    set(frame, 16, &len.to_be_bytes());
                }
                7 => {
                    if frame.get(23) == Some(&IPPROTO_UDP) {
                        let len = self.rng.next_u64() as u16 % 64;
                        set(frame, l4 + 4, &len.to_be_bytes());
                    } else if let Some(byte) = frame.get_mut(l4 + 12) {
                        *byte = (self.rng.below(16) as u8) << 4 | (*byte & 0x0f);
                    }
                }
                _ => {
                    let extra = 1 + self.rng.below(32);
                    let start = frame.len();
                    frame.resize(start + extra, 0);
                    self.rng.fill(&mut frame[start..]);
                }
            }
        }
    }

    /// IP options (NOPs, 4 to 40 bytes) on one packet in ten.
    fn options(&mut self) -> usize {
        if self.rng.percent(10) {
            4 * (1 + self.rng.below(10))
        } else {
            0
        }
    }

    fn maybe_pad(&mut self, frame: &mut Vec<u8>) {
        // Short frames are padded to Ethernet's 60-byte minimum; the IP total length excludes it.
        if self.rng.percent(10) && frame.len() < 60 {
            frame.resize(60, 0);
        }
    }

    fn random_bytes(&mut self, len: usize) {
        let start = self.l4.len();
        self.l4.resize(start + len, 0);
        self.rng.fill(&mut self.l4[start..]);
    }

    /// A complete, correct Ethernet + IPv4 + TCP/UDP frame with `options` bytes of IP options.
    fn write_segment(&mut self, frame: &mut Vec<u8>, segment: &Segment, options: usize) {
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
        let l4_len = self.l4.len() as u16;
        let mut sum = checksum::of(checksum::add(
            checksum::pseudo_header(segment.src.0, segment.dst.0, segment.proto, l4_len),
            &self.l4,
        ));
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
        write_ipv4(
            frame,
            segment.src.0,
            segment.dst.0,
            segment.proto,
            &[1; 40][..options],
            self.rng.next_u64() as u16,
            &self.l4,
        );
    }
}

fn push_ethernet(frame: &mut Vec<u8>, ethertype: u16) {
    frame.extend_from_slice(&GATEWAY_MAC);
    frame.extend_from_slice(&CLIENT_MAC);
    frame.extend_from_slice(&ethertype.to_be_bytes());
}

/// Ethernet and an IPv4 header (Don't Fragment, correct checksum) around `l4`.
fn write_ipv4(
    frame: &mut Vec<u8>,
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    options: &[u8],
    id: u16,
    l4: &[u8],
) {
    push_ethernet(frame, ETHERTYPE_IPV4);
    let header_len = 20 + options.len();
    let total = (header_len + l4.len()) as u16;
    frame.push(0x40 | (header_len / 4) as u8);
    frame.push(0);
    frame.extend_from_slice(&total.to_be_bytes());
    frame.extend_from_slice(&id.to_be_bytes());
    frame.extend_from_slice(&[0x40, 0, 64, proto, 0, 0]);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(options);
    fix_ipv4_checksum(frame);
    frame.extend_from_slice(l4);
}

fn fix_ipv4_checksum(frame: &mut [u8]) {
    let header_len = usize::from(frame[14] & 0x0f) * 4;
    frame[24..26].copy_from_slice(&[0, 0]);
    let sum = checksum::of(checksum::add(0, &frame[14..14 + header_len]));
    frame[24..26].copy_from_slice(&sum.to_be_bytes());
}

fn l4_offset(frame: &[u8]) -> usize {
    14 + usize::from(frame.get(14).map_or(5, |b| b & 0x0f)) * 4
}

fn addr_at(frame: &[u8], at: usize) -> [u8; 4] {
    frame[at..at + 4].try_into().unwrap()
}

/// Writes `bytes` at `at` where the frame is long enough.
fn set(frame: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(field) = frame.get_mut(at..at + bytes.len()) {
        field.copy_from_slice(bytes);
    }
}
