//! Inputs: frames of real service flows in both families, of everything else a pod's or an
//! external interface carries, and mutations of both (`mutate`), written by `frames`. They depend
//! on the seed alone, never on the datapath's answers, so a seed replays the same inputs.
mod flows;
mod frames;
mod icmp;
mod mutate;
mod other;
mod sctp;
mod segment;

use std::net::IpAddr;

use other::ipv4_mapped;

use crate::topology::{
    CLIENT_PORTS, CLIENTS, EXTERNAL_CLIENTS, EXTERNAL_PORTS, Endpoint, Family, NODE_ADDRS, OTHER_ADDRS,
    Service, services,
};

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

/// A TCP, UDP or SCTP packet's header fields, before it is written.
#[derive(Clone, Copy)]
struct Segment {
    src: Endpoint,
    dst: Endpoint,
    proto: u8,
    tcp_flags: u8,
    /// UDP only: send without a checksum (0).
    no_udp_checksum: bool,
    /// SCTP only: the first chunk's type.
    sctp_chunk: u8,
    /// SCTP only: the CRC32c as sent.
    sctp_crc: sctp::Crc,
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
    /// The last first fragment of a datagram written, and its program: its later fragments
    /// follow now and then.
    last_first_fragment: Option<(Vec<u8>, Program)>,
}

impl Generator {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: Rng::new(seed),
            sweep: None,
            family: Family::Ipv4,
            l4: Vec::with_capacity(2048),
            last_first_fragment: None,
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
            75..95 => {
                let program = self.service_packet(frame);
                mutate::mutate(&mut self.rng, frame);
                program
            }
            95..99 => self.flow_icmp_error(frame),
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

    fn maybe_pad(&mut self, frame: &mut Vec<u8>) {
        // Short frames are padded to Ethernet's 60-byte minimum; the IP length excludes it.
        if self.rng.percent(10) && frame.len() < 60 {
            frame.resize(60, 0);
        }
    }
}
