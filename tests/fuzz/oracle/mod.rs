//! What the datapath must have done with each input, decided from the input alone and a model of
//! the flows it has seen, never from the datapath's own code: `parse` says what is service
//! traffic (everything else must come out byte-identical, from every program), `rewrite` how a
//! translated packet may differ from its input, `refusal` how a connection to a frontend without
//! endpoints is refused, `icmp_error` how an ICMP error about a tracked flow is translated back
//! to its client, `associations` what the conntrack entries of SCTP flows must say at the end. The rules are the same for IPv4 and IPv6; the families' flows never meet.
//!
//! The programs share their maps, as on a node: a flow a pod started is the same flow when its
//! packets show up on the external interface, and the other way round.
mod associations;
mod icmp_error;
mod parse;
mod refusal;
mod rewrite;

use std::{collections::HashMap, net::IpAddr};

pub use associations::{Associations, Direction};
use lb_common::IPPROTO_SCTP;
use parse::{Fragment, Packet, Side, parse};
pub use parse::{Tuple, addr_from, family_of};
use refusal::check_reject;
use rewrite::{check_hairpin, check_rewrite};

use crate::{
    checksum,
    generate::Program,
    topology::{
        Endpoint, Family, NODE_ADDRS, SNAT_ADDR, SNAT_PORTS, Service, in_family, is_cluster_ip, service_at,
    },
};

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

/// What the datapath did, once checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Passed byte-identical.
    Untouched,
    /// DNATed to a backend (`from_pod`, `nodeport`, `nodeport_tc`).
    Dnat,
    /// Source restored to the frontend (`to_pod`, `nodeport_egress`).
    ReverseNat,
    /// A pod's packet to its own Service, or its reply: both addresses rewritten and sent
    /// straight back into the pod (`from_pod`).
    Hairpin,
    /// Source-NATed to the node on its way to another node's backend (`nodeport_egress`).
    Snat,
    /// A reply to a source-NATed flow, its client restored as destination (`nodeport`,
    /// `nodeport_tc`).
    SnatReply,
    /// A SYN to a service without endpoints, answered with a RST.
    Reset,
    /// A datagram to a service without endpoints, answered with an ICMP port unreachable.
    PortUnreachable,
    /// Other packets to a service without endpoints.
    Dropped,
    /// A new flow to a LoadBalancer IP from outside its source ranges, dropped.
    SourceRangeDropped,
    /// A new flow to an externalTrafficPolicy Local frontend without endpoints, dropped.
    LocalDropped,
    /// A connection to be refused, passed on untouched by XDP for TC to refuse.
    LeftToTc,
    /// An ICMP (ICMPv6) error about a tracked flow's packet, translated back for its client
    /// (`to_pod`).
    IcmpErrorTranslated,
}

impl Outcome {
    pub const ALL: [Self; 13] = [
        Self::Untouched,
        Self::Dnat,
        Self::ReverseNat,
        Self::Hairpin,
        Self::Snat,
        Self::SnatReply,
        Self::Reset,
        Self::PortUnreachable,
        Self::Dropped,
        Self::SourceRangeDropped,
        Self::LocalDropped,
        Self::LeftToTc,
        Self::IcmpErrorTranslated,
    ];

    /// The translations.
    pub const REWRITES: [Self; 5] = [
        Self::Dnat,
        Self::ReverseNat,
        Self::Snat,
        Self::SnatReply,
        Self::Hairpin,
    ];
}

/// How an SCTP packet's CRC32c came in, for the report: translations must keep it so.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SctpCrc {
    Right,
    Wrong,
    /// Left to checksum offload.
    Zero,
}

impl SctpCrc {
    pub const ALL: [Self; 3] = [Self::Right, Self::Wrong, Self::Zero];
}

/// The family and checksum of `frame` if it is an SCTP packet the datapath reads.
pub fn sctp_of(frame: &[u8]) -> Option<(Family, SctpCrc)> {
    let (packet, _) = parse(frame).filter(|(packet, _)| packet.proto == IPPROTO_SCTP)?;
    let field = &frame[packet.l4_checksum_at()];
    let crc = if field == [0; 4] {
        SctpCrc::Zero
    } else if field == checksum::sctp_crc(packet.l4_bytes(frame)) {
        SctpCrc::Right
    } else {
        SctpCrc::Wrong
    };
    Some((packet.family, crc))
}

/// The family of `frame` and whether it is the first fragment (`true`) or a later one, if it is
/// a TCP or UDP fragment the datapath reads.
pub fn fragment_of(frame: &[u8]) -> Option<(Family, bool)> {
    let (packet, fragment) = parse(frame)?;
    Some((packet.family, fragment?.first))
}

/// The flows the datapath has been seen to create, as its conntrack and affinity maps hold them,
/// and the counters it should have kept.
#[derive(Default)]
pub struct Model {
    /// Client → frontend tuple → backend.
    forward: HashMap<Tuple, Endpoint>,
    /// Backend → client tuple → frontend.
    reply: HashMap<Tuple, Endpoint>,
    /// (frontend, client address) → backend, for services with affinity.
    affinity: HashMap<(Endpoint, IpAddr), Endpoint>,
    /// External flows of eTP Cluster frontends, as DNATed (client → backend) → the node address
    /// and port they leave with, once given.
    snat_out: HashMap<Tuple, Option<Endpoint>>,
    /// The replies of those (backend → node address and port) → the client.
    snat_in: HashMap<Tuple, Endpoint>,
    /// Fragmented datagrams, as the first fragment of each showed them to any program (source,
    /// destination, protocol, identification) → its ports, for the later fragments.
    fragments: HashMap<(IpAddr, IpAddr, u8, u32), (u16, u16)>,
    pub associations: Associations,
    pub counts: Counts,
}

#[derive(Default, Debug, PartialEq, Eq)]
pub struct Counts {
    pub service_packets: u64,
    pub new_flows: u64,
    pub no_backend: u64,
    pub undefined_port: u64,
    pub reply_packets: u64,
    pub source_range_drops: u64,
    pub fragments_without_first: u64,
}

impl Model {
    /// Checks one run of `program` on `input` that returned `verdict` and left `output`.
    pub fn check(
        &mut self,
        program: Program,
        input: &[u8],
        verdict: u32,
        output: &[u8],
    ) -> Result<Outcome, String> {
        let run = Run {
            program,
            input,
            verdict,
            output,
        };
        if program == Program::ToPod
            && let Some(error) = icmp_error::parse(input)
            && let Some(frontend) = self.reply.get(&error.reply_tuple())
        {
            return icmp_error::check_translation(&error, &run, *frontend);
        }
        let Some((packet, fragment)) = parse(input) else {
            return run.untouched();
        };
        let Some(packet) = self.with_datagram_ports(packet, fragment) else {
            return run.untouched();
        };
        match program {
            Program::FromPod => self.pod_request(&run, &packet),
            Program::ToPod => match self.reply.get(&packet.tuple()) {
                Some(frontend) => self.reverse_nat(&run, &packet, *frontend),
                None => run.untouched(),
            },
            Program::Nodeport | Program::NodeportTc => self.external_ingress(&run, &packet),
            Program::NodeportEgress => self.external_egress(&run, &packet),
        }
    }

    /// Every program remembers a first fragment's ports under its datagram's identity; a later
    /// fragment gets them, and without them (its first fragment unseen) passes untouched.
    fn with_datagram_ports(&mut self, packet: Packet, fragment: Option<Fragment>) -> Option<Packet> {
        let Some(fragment) = fragment else {
            return Some(packet);
        };
        let datagram = (packet.src.0, packet.dst.0, packet.proto, fragment.id);
        if fragment.first {
            self.fragments.insert(datagram, (packet.src.1, packet.dst.1));
            return Some(packet);
        }
        let Some(&(src_port, dst_port)) = self.fragments.get(&datagram) else {
            self.counts.fragments_without_first += 1;
            return None;
        };
        Some(Packet {
            src: (packet.src.0, src_port),
            dst: (packet.dst.0, dst_port),
            ..packet
        })
    }

    /// Datagrams whose first fragment the model remembers.
    pub fn datagrams(&self) -> usize {
        self.fragments.len()
    }

    /// To a frontend: DNAT to a backend, or the reject path. A pod is inside every source
    /// range, and refused (not dropped) by an eTP Local frontend without endpoints.
    fn pod_request(&mut self, run: &Run, packet: &Packet) -> Result<Outcome, String> {
        if packet.dst.0 == packet.family.hairpin()
            && let Some(frontend) = self.reply.get(&packet.tuple()).copied()
        {
            // A pod's reply to a connection it made to itself: from the frontend, back in.
            check_hairpin(packet, run, (frontend, (packet.src.0, packet.dst.1)))?;
            self.associations.reply(packet, run.input);
            self.counts.reply_packets += 1;
            return Ok(Outcome::Hairpin);
        }
        match service_at(packet.dst.0, packet.dst.1, packet.proto) {
            Some(service) if service.backends.is_empty() => {
                self.counts.no_backend += 1;
                check_reject(packet, run)
            }
            Some(service) => self.check_dnat(service, packet, run),
            None if is_cluster_ip(packet.dst.0) => {
                self.counts.undefined_port += 1;
                check_reject(packet, run)
            }
            None => run.untouched(),
        }
    }

    /// The reply of a tracked flow: the source becomes the frontend the client dialled.
    fn reverse_nat(&mut self, run: &Run, packet: &Packet, frontend: Endpoint) -> Result<Outcome, String> {
        run.expect(run.pass())?;
        let source = check_rewrite(packet, run, Side::Source)?;
        if !packet.agrees(source, frontend) {
            return Err(format!(
                "reply's source became {source:?}, not the frontend {frontend:?}"
            ));
        }
        self.associations.reply(packet, run.input);
        self.counts.reply_packets += 1;
        Ok(Outcome::ReverseNat)
    }

    /// From outside, on the external interface (XDP or TC): a reply to a source-NATed flow gets
    /// its client back; a new flow from outside a source range, or to an eTP Local frontend
    /// without endpoints, is dropped; to a frontend without endpoints otherwise, refused (by TC:
    /// XDP passes it on untouched).
    fn external_ingress(&mut self, run: &Run, packet: &Packet) -> Result<Outcome, String> {
        if in_family(packet.family, NODE_ADDRS).contains(&packet.dst.0)
            && let Some(client) = self.snat_in.get(&packet.tuple()).copied()
        {
            run.expect(run.pass())?;
            let destination = check_rewrite(packet, run, Side::Destination)?;
            if !packet.agrees(destination, client) {
                return Err(format!(
                    "reply to a source-NATed flow sent to {destination:?}, not its client {client:?}"
                ));
            }
            // Counted as a reply at egress, where its source becomes the frontend.
            return Ok(Outcome::SnatReply);
        }
        let Some(service) = service_at(packet.dst.0, packet.dst.1, packet.proto) else {
            return run.untouched();
        };
        if self.forward.contains_key(&packet.tuple()) {
            return self.check_dnat(service, packet, run);
        }
        if !service.admits(packet.src.0) {
            self.counts.source_range_drops += 1;
            run.expect(run.drop())?;
            return Ok(Outcome::SourceRangeDropped);
        }
        if service.backends.is_empty() {
            self.counts.no_backend += 1;
            if service.is_local() {
                run.expect(run.drop())?;
                return Ok(Outcome::LocalDropped);
            }
            if run.program.is_xdp() {
                run.untouched()?;
                return Ok(Outcome::LeftToTc);
            }
            return check_reject(packet, run);
        }
        let outcome = self.check_dnat(service, packet, run)?;
        if service.snats() {
            let backend = self.forward[&packet.tuple()];
            // A new flow's expectation replaces any older one of the same client and backend.
            self.snat_out.insert((packet.src, backend, packet.proto), None);
        }
        Ok(outcome)
    }

    /// Out of the external interface: a reply gets its frontend back as source; an eTP Cluster
    /// flow leaving for its backend gets the node's address, with the client's port when no
    /// other client of that backend holds it, else one from the ephemeral range.
    fn external_egress(&mut self, run: &Run, packet: &Packet) -> Result<Outcome, String> {
        if let Some(frontend) = self.reply.get(&packet.tuple()).copied() {
            return self.reverse_nat(run, packet, frontend);
        }
        let Some(given) = self.snat_out.get(&packet.tuple()).copied() else {
            return run.untouched();
        };
        if given.is_none() && !packet.has_transport_header() {
            // A later fragment gets no source port of its own: its first fragment never left.
            return run.untouched();
        }
        run.expect(TC_ACT_OK)?;
        let source = check_rewrite(packet, run, Side::Source)?;
        if let Some(given) = given {
            if !packet.agrees(source, given) {
                return Err(format!("source-NATed to {source:?}, earlier to {given:?}"));
            }
            return Ok(Outcome::Snat);
        }
        let (client, backend) = (packet.src, packet.dst);
        let snat_addr = packet.family.addr(SNAT_ADDR);
        if source.0 != snat_addr {
            return Err(format!(
                "source-NATed to {source:?}, not to the node's {snat_addr:?}"
            ));
        }
        let holder = |port: u16| {
            self.snat_in
                .get(&(backend, (snat_addr, port), packet.proto))
                .filter(|holder| **holder != client)
        };
        if client.1 >= 1024 && holder(client.1).is_none() {
            if source.1 != client.1 {
                return Err(format!(
                    "source port {} given though the client's {} was free",
                    source.1, client.1
                ));
            }
        } else if !SNAT_PORTS.contains(&source.1) {
            return Err(format!("source port {} outside {SNAT_PORTS:?}", source.1));
        }
        if let Some(holder) = holder(source.1) {
            return Err(format!("source port {} already held by {holder:?}", source.1));
        }
        self.snat_in.insert((backend, source, packet.proto), client);
        self.snat_out.insert(packet.tuple(), Some(source));
        Ok(Outcome::Snat)
    }

    fn check_dnat(&mut self, service: &Service, packet: &Packet, run: &Run) -> Result<Outcome, String> {
        // A pod given itself as backend is masqueraded and bounced back (`from_pod` only).
        let hairpin = run.program == Program::FromPod && run.verdict == TC_ACT_REDIRECT;
        let backend = if hairpin {
            let backend = if packet.has_transport_header() {
                (packet.src.0, packet.endpoint_in(run.output, Side::Destination).1)
            } else {
                service.backend_at(packet.src.0)?
            };
            let masqueraded = (packet.family.hairpin(), packet.src.1);
            check_hairpin(packet, run, (masqueraded, backend))?;
            backend
        } else {
            run.expect(run.pass())?;
            let rewritten = check_rewrite(packet, run, Side::Destination)?;
            if packet.has_transport_header() {
                rewritten
            } else {
                // A later fragment shows its new address only: the backend's port is the one
                // its address has among the service's backends.
                service.backend_at(rewritten.0)?
            }
        };
        if run.program == Program::FromPod && backend.0 == packet.src.0 && !hairpin {
            return Err(format!("{backend:?} reached itself without hairpin masquerading"));
        }
        let outcome = if hairpin { Outcome::Hairpin } else { Outcome::Dnat };
        if backend == packet.dst {
            return Err("a service packet passed untranslated".into());
        }
        if !service.backends.contains(&backend) {
            return Err(format!(
                "DNATed to {backend:?}, not a backend of {:?}",
                service.frontend
            ));
        }
        self.counts.service_packets += 1;
        if let Some(tracked) = self.forward.get(&packet.tuple()) {
            if *tracked != backend {
                return Err(format!("flow moved from its backend {tracked:?} to {backend:?}"));
            }
            // A SYN opens a connection on the tuple anew: the reply entry, which flows from the
            // same client port to other frontends of the same backend share, is its own again.
            if packet.opens(run.input) {
                self.reply.insert(reply_tuple(packet, backend), packet.dst);
            }
            self.associations
                .forward(packet, run.input, reply_tuple(packet, backend));
            return Ok(outcome);
        }
        if service.affinity {
            let client = (service.frontend, packet.src.0);
            if let Some(sticky) = self.affinity.insert(client, backend)
                && sticky != backend
            {
                return Err(format!("client with affinity to {sticky:?} sent to {backend:?}"));
            }
        }
        self.counts.new_flows += 1;
        self.forward.insert(packet.tuple(), backend);
        self.reply.insert(reply_tuple(packet, backend), packet.dst);
        self.associations
            .track(packet, run.input, reply_tuple(packet, backend));
        Ok(outcome)
    }
}

/// How the reply of `packet`'s flow to `backend` is keyed: from the backend to the client, or to
/// the hairpin address when the client is the backend itself.
fn reply_tuple(packet: &Packet, backend: Endpoint) -> Tuple {
    let client = if backend.0 == packet.src.0 {
        (packet.family.hairpin(), packet.src.1)
    } else {
        packet.src
    };
    (backend, client, packet.proto)
}

/// One run of a program: what went in and what came out.
pub struct Run<'a> {
    program: Program,
    input: &'a [u8],
    verdict: u32,
    output: &'a [u8],
}

impl Run<'_> {
    pub fn expect(&self, expected: u32) -> Result<(), String> {
        if self.verdict == expected {
            Ok(())
        } else {
            Err(format!("verdict {}, expected {expected}", self.verdict))
        }
    }

    fn pass(&self) -> u32 {
        if self.program.is_xdp() {
            XDP_PASS
        } else {
            TC_ACT_OK
        }
    }

    fn drop(&self) -> u32 {
        if self.program.is_xdp() {
            XDP_DROP
        } else {
            TC_ACT_SHOT
        }
    }

    /// Passed on byte-identical.
    pub fn untouched(&self) -> Result<Outcome, String> {
        self.expect(self.pass())?;
        if self.output != self.input {
            return Err("not service traffic, yet changed".into());
        }
        Ok(Outcome::Untouched)
    }
}
