//! What the datapath must have done with each input, decided from the input alone and a model of
//! the flows it has seen, never from the datapath's own code.
//!
//! A frame is service traffic only if it is a well-formed, unfragmented IPv4 TCP or UDP packet,
//! untagged, whole (its total length fits the frame), with a header length, TCP data offset and
//! UDP length consistent with it. Everything else must come out byte-identical, from every
//! program.
//!
//! The programs share their maps, as on a node: a flow a pod started is the same flow when its
//! packets show up on the external interface, and the other way round.
use std::collections::HashMap;

use lb_common::{HAIRPIN_ADDR, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    checksum,
    generate::Program,
    topology::{Endpoint, NODE_ADDRS, SNAT_ADDR, SNAT_PORTS, Service, is_cluster_ip, service_at},
};

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
const ETH_LEN: usize = 14;
const IPPROTO_ICMP: u8 = 1;

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
}

/// A parsed service-candidate packet.
#[derive(Clone, Copy, Debug)]
pub struct Packet {
    src: Endpoint,
    dst: Endpoint,
    proto: u8,
    /// Offset of the L4 header in the frame.
    l4: usize,
    /// End of the IP packet in the frame (the rest is padding).
    end: usize,
}

impl Packet {
    fn tuple(&self) -> Tuple {
        (self.src, self.dst, self.proto)
    }

    fn l4_checksum_at(&self) -> usize {
        self.l4 + if self.proto == IPPROTO_TCP { 16 } else { 6 }
    }
}

type Tuple = (Endpoint, Endpoint, u8);

/// The packet in `frame` if it is one the datapath may translate.
pub fn parse(frame: &[u8]) -> Option<Packet> {
    let ip = frame.get(ETH_LEN..)?;
    if frame[12..14] != [0x08, 0x00] || ip.len() < 20 || ip[0] >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let fragmented = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
    if header_len < 20 || total > ip.len() || fragmented {
        return None;
    }
    let proto = ip[9];
    let l4_len = total.checked_sub(header_len)?;
    let l4 = &ip[header_len..total];
    let fits = match proto {
        IPPROTO_TCP => {
            l4_len >= 20 && usize::from(l4[12] >> 4) * 4 >= 20 && usize::from(l4[12] >> 4) * 4 <= l4_len
        }
        IPPROTO_UDP => l4_len >= 8 && (8..=l4_len).contains(&usize::from(u16::from_be_bytes([l4[4], l4[5]]))),
        _ => false,
    };
    if !fits {
        return None;
    }
    let addr = |at: usize| -> [u8; 4] { ip[at..at + 4].try_into().unwrap() };
    let port = |at: usize| u16::from_be_bytes([l4[at], l4[at + 1]]);
    Some(Packet {
        src: (addr(12), port(0)),
        dst: (addr(16), port(2)),
        proto,
        l4: ETH_LEN + header_len,
        end: ETH_LEN + total,
    })
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
    affinity: HashMap<(Endpoint, [u8; 4]), Endpoint>,
    /// External flows of eTP Cluster frontends, as DNATed (client → backend) → the node address
    /// and port they leave with, once given.
    snat_out: HashMap<Tuple, Option<Endpoint>>,
    /// The replies of those (backend → node address and port) → the client.
    snat_in: HashMap<Tuple, Endpoint>,
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
        let Some(packet) = parse(input) else {
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

    /// To a frontend: DNAT to a backend, or the reject path. A pod is inside every source
    /// range, and refused (not dropped) by an eTP Local frontend without endpoints.
    fn pod_request(&mut self, run: &Run, packet: &Packet) -> Result<Outcome, String> {
        if packet.dst.0 == HAIRPIN_ADDR
            && let Some(frontend) = self.reply.get(&packet.tuple()).copied()
        {
            // A pod's reply to a connection it made to itself: from the frontend, back in.
            check_hairpin(packet, run, (frontend, (packet.src.0, packet.dst.1)))?;
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
        if source != frontend {
            return Err(format!(
                "reply's source became {source:?}, not the frontend {frontend:?}"
            ));
        }
        self.counts.reply_packets += 1;
        Ok(Outcome::ReverseNat)
    }

    /// From outside, on the external interface (XDP or TC): a reply to a source-NATed flow gets
    /// its client back; a new flow from outside a source range, or to an eTP Local frontend
    /// without endpoints, is dropped; to a frontend without endpoints otherwise, refused (by TC:
    /// XDP passes it on untouched).
    fn external_ingress(&mut self, run: &Run, packet: &Packet) -> Result<Outcome, String> {
        if NODE_ADDRS.contains(&packet.dst.0)
            && let Some(client) = self.snat_in.get(&packet.tuple()).copied()
        {
            run.expect(run.pass())?;
            let destination = check_rewrite(packet, run, Side::Destination)?;
            if destination != client {
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
        run.expect(TC_ACT_OK)?;
        let source = check_rewrite(packet, run, Side::Source)?;
        if let Some(given) = given {
            if source != given {
                return Err(format!("source-NATed to {source:?}, earlier to {given:?}"));
            }
            return Ok(Outcome::Snat);
        }
        let (client, backend) = (packet.src, packet.dst);
        if source.0 != SNAT_ADDR {
            return Err(format!(
                "source-NATed to {source:?}, not to the node's {SNAT_ADDR:?}"
            ));
        }
        let holder = |port: u16| {
            self.snat_in
                .get(&(backend, (SNAT_ADDR, port), packet.proto))
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
            let backend = (packet.src.0, endpoint_at(run.output, packet, Side::Destination));
            check_hairpin(packet, run, ((HAIRPIN_ADDR, packet.src.1), backend))?;
            backend
        } else {
            run.expect(run.pass())?;
            check_rewrite(packet, run, Side::Destination)?
        };
        if run.program == Program::FromPod && backend.0 == packet.src.0 && !hairpin {
            return Err(format!("{backend:?} reached itself without hairpin masquerading"));
        }
        let outcome = if hairpin { Outcome::Hairpin } else { Outcome::Dnat };
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
            if packet.proto == IPPROTO_TCP && run.input[packet.l4 + 13] & 0x12 == 0x02 {
                self.reply.insert(reply_tuple(packet, backend), packet.dst);
            }
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
        Ok(outcome)
    }
}

/// How the reply of `packet`'s flow to `backend` is keyed: from the backend to the client, or to
/// HAIRPIN_ADDR when the client is the backend itself.
fn reply_tuple(packet: &Packet, backend: Endpoint) -> Tuple {
    let client = if backend.0 == packet.src.0 {
        (HAIRPIN_ADDR, packet.src.1)
    } else {
        packet.src
    };
    (backend, client, packet.proto)
}

/// One run of a program: what went in and what came out.
struct Run<'a> {
    program: Program,
    input: &'a [u8],
    verdict: u32,
    output: &'a [u8],
}

impl Run<'_> {
    fn expect(&self, expected: u32) -> Result<(), String> {
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
    fn untouched(&self) -> Result<Outcome, String> {
        self.expect(self.pass())?;
        if self.output != self.input {
            return Err("not service traffic, yet changed".into());
        }
        Ok(Outcome::Untouched)
    }
}

#[derive(Clone, Copy)]
enum Side {
    Source,
    Destination,
}

/// Checks that `output` is `input` with one side's address and port replaced and both checksums
/// updated, and returns the new address and port. A checksum that was right must be right, one
/// that was wrong must stay exactly as wrong (the receiver still drops the packet), and a UDP
/// checksum of 0 (none) must stay 0.
fn check_rewrite(packet: &Packet, run: &Run, side: Side) -> Result<Endpoint, String> {
    let (input, output) = (run.input, run.output);
    if output.len() != input.len() {
        return Err(format!("length {} became {}", input.len(), output.len()));
    }
    let (addr_at, port_at) = match side {
        Side::Source => (ETH_LEN + 12, packet.l4),
        Side::Destination => (ETH_LEN + 16, packet.l4 + 2),
    };
    let l4_checksum_at = packet.l4_checksum_at();
    let rewritten = [
        addr_at..addr_at + 4,
        port_at..port_at + 2,
        24..26,
        l4_checksum_at..l4_checksum_at + 2,
    ];
    if let Some(at) =
        (0..input.len()).find(|at| input[*at] != output[*at] && !rewritten.iter().any(|r| r.contains(at)))
    {
        return Err(format!(
            "byte {at} changed, outside the address, port and checksums"
        ));
    }
    let header = ETH_LEN..packet.l4;
    if checksum::fold(checksum::add(0, &input[header.clone()]))
        != checksum::fold(checksum::add(0, &output[header]))
    {
        return Err("IPv4 header checksum not updated to match".into());
    }
    let udp_unchecked = packet.proto == IPPROTO_UDP && input[l4_checksum_at..l4_checksum_at + 2] == [0, 0];
    if udp_unchecked {
        if output[l4_checksum_at..l4_checksum_at + 2] != [0, 0] {
            return Err("a UDP checksum of 0 (none) was changed".into());
        }
    } else {
        if packet.proto == IPPROTO_UDP && output[l4_checksum_at..l4_checksum_at + 2] == [0, 0] {
            return Err("a UDP checksum became 0 (none)".into());
        }
        if l4_sum(packet, input) != l4_sum(packet, output) {
            return Err(format!(
                "{} checksum not updated to match",
                proto_name(packet.proto)
            ));
        }
    }
    let addr = output[addr_at..addr_at + 4].try_into().unwrap();
    Ok((addr, u16::from_be_bytes([output[port_at], output[port_at + 1]])))
}

/// The address and port at `side` of `frame`, a frame laid out as `packet`.
fn endpoint_at(frame: &[u8], packet: &Packet, side: Side) -> u16 {
    let at = match side {
        Side::Source => packet.l4,
        Side::Destination => packet.l4 + 2,
    };
    u16::from_be_bytes([frame[at], frame[at + 1]])
}

/// A hairpinned packet: sent back (MACs swapped, redirected), both addresses and ports now
/// `(source, destination)`, nothing else changed, and each checksum as right or wrong as before.
fn check_hairpin(
    packet: &Packet,
    run: &Run,
    (source, destination): (Endpoint, Endpoint),
) -> Result<(), String> {
    run.expect(TC_ACT_REDIRECT)?;
    let (input, output) = (run.input, run.output);
    if output.len() != input.len() {
        return Err(format!("length {} became {}", input.len(), output.len()));
    }
    if output[..6] != input[6..12] || output[6..12] != input[..6] {
        return Err("hairpin: MACs not swapped".into());
    }
    let src = (
        output[ETH_LEN + 12..ETH_LEN + 16].try_into().unwrap(),
        endpoint_at(output, packet, Side::Source),
    );
    let dst = (
        output[ETH_LEN + 16..ETH_LEN + 20].try_into().unwrap(),
        endpoint_at(output, packet, Side::Destination),
    );
    if (src, dst) != (source, destination) {
        return Err(format!(
            "hairpin: {src:?} → {dst:?}, expected {source:?} → {destination:?}"
        ));
    }
    let l4_checksum_at = packet.l4_checksum_at();
    let rewritten = [
        0..12,
        ETH_LEN + 10..ETH_LEN + 20,
        packet.l4..packet.l4 + 4,
        l4_checksum_at..l4_checksum_at + 2,
    ];
    if let Some(at) =
        (0..input.len()).find(|at| input[*at] != output[*at] && !rewritten.iter().any(|r| r.contains(at)))
    {
        return Err(format!("hairpin: byte {at} changed"));
    }
    let header = ETH_LEN..packet.l4;
    if checksum::fold(checksum::add(0, &input[header.clone()]))
        != checksum::fold(checksum::add(0, &output[header]))
    {
        return Err("hairpin: IPv4 header checksum not updated to match".into());
    }
    let unchecked = packet.proto == IPPROTO_UDP && input[l4_checksum_at..l4_checksum_at + 2] == [0, 0];
    if unchecked {
        if output[l4_checksum_at..l4_checksum_at + 2] != [0, 0] {
            return Err("hairpin: a UDP checksum of 0 (none) was changed".into());
        }
    } else if l4_sum(packet, input) != l4_sum(packet, output) {
        return Err("hairpin: L4 checksum not updated to match".into());
    }
    Ok(())
}

/// The folded sum over the pseudo-header and the L4 bytes the checksum covers, checksum field
/// included: 0xffff when the checksum is right.
fn l4_sum(packet: &Packet, frame: &[u8]) -> u16 {
    let l4 = &frame[packet.l4..packet.end];
    let len = if packet.proto == IPPROTO_UDP {
        usize::from(u16::from_be_bytes([l4[4], l4[5]]))
    } else {
        l4.len()
    };
    let src = frame[ETH_LEN + 12..ETH_LEN + 16].try_into().unwrap();
    let dst = frame[ETH_LEN + 16..ETH_LEN + 20].try_into().unwrap();
    checksum::fold(checksum::add(
        checksum::pseudo_header(src, dst, packet.proto, len as u16),
        &l4[..len],
    ))
}

fn proto_name(proto: u8) -> &'static str {
    if proto == IPPROTO_TCP { "TCP" } else { "UDP" }
}

/// A service without endpoints: a pure SYN (plain 20-byte IP header) is answered with a RST|ACK
/// and a datagram with an ICMP port unreachable, both from the frontend, sent back; anything
/// else is dropped.
fn check_reject(packet: &Packet, run: &Run) -> Result<Outcome, String> {
    let (input, output) = (run.input, run.output);
    let plain_header = packet.l4 == ETH_LEN + 20;
    // SYN set; ACK and RST clear.
    let pure_syn = packet.proto == IPPROTO_TCP && input[packet.l4 + 13] & 0x16 == 0x02;
    if !plain_header || (packet.proto == IPPROTO_TCP && !pure_syn) {
        run.expect(TC_ACT_SHOT)?;
        return Ok(Outcome::Dropped);
    }
    run.expect(TC_ACT_REDIRECT)?;
    let (proto, l4_len) = if pure_syn {
        (IPPROTO_TCP, 20)
    } else {
        (IPPROTO_ICMP, 8 + 28)
    };
    if output.len() != ETH_LEN + 20 + l4_len {
        return Err(format!("reply of {} bytes", output.len()));
    }
    if output[..6] != input[6..12] || output[6..12] != input[..6] || output[12..14] != [0x08, 0x00] {
        return Err("reply's Ethernet header is not the request's, swapped".into());
    }
    let ip = &output[ETH_LEN..ETH_LEN + 20];
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ip[0] != 0x45
        || total != 20 + l4_len
        || ip[9] != proto
        || ip[8] == 0
        || u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0
    {
        return Err("reply's IPv4 header is malformed".into());
    }
    if (&ip[12..16], &ip[16..20]) != (&packet.dst.0[..], &packet.src.0[..]) {
        return Err("reply does not go from the frontend to the client".into());
    }
    if checksum::fold(checksum::add(0, ip)) != 0xffff {
        return Err("reply's IPv4 header checksum is wrong".into());
    }
    let l4 = &output[ETH_LEN + 20..];
    if pure_syn {
        let seq = u32::from_be_bytes(input[packet.l4 + 4..packet.l4 + 8].try_into().unwrap());
        let ports = (
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        );
        if ports != (packet.dst.1, packet.src.1) {
            return Err(format!("RST's ports {ports:?} are not the SYN's swapped"));
        }
        if l4[12] >> 4 != 5 || l4[13] != 0x14 || l4[8..12] != seq.wrapping_add(1).to_be_bytes() {
            return Err("not a RST|ACK acknowledging the SYN".into());
        }
        let pseudo = checksum::pseudo_header(packet.dst.0, packet.src.0, IPPROTO_TCP, 20);
        if checksum::fold(checksum::add(pseudo, l4)) != 0xffff {
            return Err("RST's TCP checksum is wrong".into());
        }
        Ok(Outcome::Reset)
    } else {
        if l4[..2] != [3, 3] || checksum::fold(checksum::add(0, l4)) != 0xffff {
            return Err("not a port unreachable with a right checksum".into());
        }
        if l4[8..] != input[ETH_LEN..ETH_LEN + 28] {
            return Err("the ICMP error does not quote the datagram's IP header and 8 bytes".into());
        }
        Ok(Outcome::PortUnreachable)
    }
}
