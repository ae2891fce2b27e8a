//! The datapath on crafted packets, through BPF_PROG_TEST_RUN: the real programs, verifier and
//! helpers, with maps programmed by the real reconciler. Checksums are verified by etherparse,
//! which computes them independently from scratch.
//!
//! Most tests are written once over the address family and run for each
//! (`test_name::ipv4`, `test_name::ipv6`); what only one family has is tested for it alone.
#[macro_use]
mod common;

use lb_userspace::datapath::load_program;
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use aya::programs::{TestRun as _, TestRunOptions};
use common::{
    Loaded, frontend,
    packets::{
        Endpoint, Family, addresses_with_valid_checksums, tcp_close, tcp_data, tcp_syn, udp, v6,
        with_ipv6_extensions,
    },
    run_on,
    verdict::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
};
use etherparse::{
    IpHeaders, Ipv4Header, Ipv4Options, NetHeaders, PacketBuilder, PacketHeaders, TransportHeader,
};
use lb_common::{
    CtEntry, CtKey, IPPROTO_TCP, IPPROTO_UDP, Ipv4, Ipv6, RejectLimit, Stat, ct_direction, ct_flags,
    program_names,
};
use lb_userspace::{
    datapath::conntrack_gc,
    reconcile::{DesiredService, FrontendKey, MaglevSize, Reconciler},
};

const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 20];
const GATEWAY_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

/// The addresses the tests use, in each family, and what differs in how a family is refused.
trait Net: Family {
    const CLIENT: Self;
    const CLUSTER_IP: Self;
    const BACKENDS: [Endpoint<Self>; 3];
    const DNS_BACKENDS: [Endpoint<Self>; 2];
    /// The shortest frame BPF_PROG_TEST_RUN takes under this family's EtherType: Ethernet and
    /// the fixed IP header.
    const MIN_FRAME: usize;
    /// Another pod of the node.
    fn pod(n: u8) -> Self;
    /// A port unreachable refusing a datagram: its (source, destination) and what it quotes,
    /// after asserting its type, code and checksum.
    fn port_unreachable(reply: &[u8]) -> ((Self, Self), Vec<u8>);
    /// What a port unreachable quotes of `datagram` (a frame): its IP header and 8 bytes for
    /// IPv4, the whole packet (as far as 1280 bytes allow) for IPv6.
    fn quoted(datagram: &[u8]) -> &[u8];
    /// This family's conntrack entries.
    fn conntrack(lb: &Loaded) -> Vec<(CtKey<Self>, CtEntry<Self>)>;
    /// An ICMP error from `from` to `to` quoting `quote` (an IP packet, as far as it goes): a
    /// port unreachable, or "fragmentation needed" (IPv4) or "packet too big" (IPv6).
    fn icmp_error(from: Self, to: Self, quote: &[u8], port_unreachable: bool) -> Vec<u8>;
    /// An ICMP error's (source, destination) and quote, after asserting its checksum.
    fn icmp_error_parts(frame: &[u8]) -> ((Self, Self), Vec<u8>);
}

impl Net for Ipv4 {
    const CLIENT: Self = [10, 244, 0, 20];
    const CLUSTER_IP: Self = [10, 96, 0, 10];
    const BACKENDS: [Endpoint<Self>; 3] = [
        ([10, 244, 0, 10], 3000),
        ([10, 244, 0, 11], 3000),
        ([10, 244, 0, 12], 3000),
    ];
    const DNS_BACKENDS: [Endpoint<Self>; 2] = [([10, 244, 0, 10], 5353), ([10, 244, 0, 11], 5353)];
    const MIN_FRAME: usize = 14 + 20;

    fn pod(n: u8) -> Self {
        [10, 244, 9, n]
    }

    fn port_unreachable(reply: &[u8]) -> ((Self, Self), Vec<u8>) {
        let headers = PacketHeaders::from_ethernet_slice(reply).unwrap();
        let Some(NetHeaders::Ipv4(ip, _)) = &headers.net else {
            panic!("not IPv4: {headers:?}")
        };
        assert_eq!(ip.header_checksum, ip.calc_header_checksum());
        let Some(TransportHeader::Icmpv4(icmp)) = &headers.transport else {
            panic!("not ICMP: {headers:?}")
        };
        assert_eq!(
            icmp.icmp_type,
            etherparse::Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port)
        );
        let quote = headers.payload.slice();
        assert_eq!(
            icmp.checksum,
            icmp.icmp_type.calc_checksum(quote),
            "ICMP checksum"
        );
        ((ip.source, ip.destination), quote.to_vec())
    }

    fn quoted(datagram: &[u8]) -> &[u8] {
        &datagram[14..14 + 28]
    }

    fn conntrack(lb: &Loaded) -> Vec<(CtKey<Self>, CtEntry<Self>)> {
        lb.maps.conntrack.iter().map(Result::unwrap).collect()
    }

    fn icmp_error(from: Self, to: Self, quote: &[u8], port_unreachable: bool) -> Vec<u8> {
        use etherparse::{Icmpv4Type, icmpv4::DestUnreachableHeader};
        let kind = if port_unreachable {
            DestUnreachableHeader::Port
        } else {
            DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 }
        };
        let mut packet = Vec::new();
        PacketBuilder::ethernet2(GATEWAY_MAC, CLIENT_MAC)
            .ipv4(from, to, 64)
            .icmpv4(Icmpv4Type::DestinationUnreachable(kind))
            .write(&mut packet, quote)
            .unwrap();
        packet
    }

    fn icmp_error_parts(frame: &[u8]) -> ((Self, Self), Vec<u8>) {
        let headers = PacketHeaders::from_ethernet_slice(frame).unwrap();
        let (Some(NetHeaders::Ipv4(ip, _)), Some(TransportHeader::Icmpv4(icmp))) =
            (&headers.net, &headers.transport)
        else {
            panic!("not ICMP: {headers:?}")
        };
        assert_eq!(ip.header_checksum, ip.calc_header_checksum());
        let quote = headers.payload.slice();
        assert_eq!(
            icmp.checksum,
            icmp.icmp_type.calc_checksum(quote),
            "ICMP checksum"
        );
        ((ip.source, ip.destination), quote.to_vec())
    }
}

impl Net for Ipv6 {
    const CLIENT: Self = v6(Ipv4::CLIENT);
    const CLUSTER_IP: Self = v6(Ipv4::CLUSTER_IP);
    const BACKENDS: [Endpoint<Self>; 3] = [
        (v6(Ipv4::BACKENDS[0].0), 3000),
        (v6(Ipv4::BACKENDS[1].0), 3000),
        (v6(Ipv4::BACKENDS[2].0), 3000),
    ];
    const DNS_BACKENDS: [Endpoint<Self>; 2] = [
        (v6(Ipv4::DNS_BACKENDS[0].0), 5353),
        (v6(Ipv4::DNS_BACKENDS[1].0), 5353),
    ];
    const MIN_FRAME: usize = 14 + 40;

    fn pod(n: u8) -> Self {
        v6(Ipv4::pod(n))
    }

    fn port_unreachable(reply: &[u8]) -> ((Self, Self), Vec<u8>) {
        let headers = PacketHeaders::from_ethernet_slice(reply).unwrap();
        let Some(NetHeaders::Ipv6(ip, _)) = &headers.net else {
            panic!("not IPv6: {headers:?}")
        };
        let Some(TransportHeader::Icmpv6(icmp)) = &headers.transport else {
            panic!("not ICMPv6: {headers:?}")
        };
        assert_eq!(
            icmp.icmp_type,
            etherparse::Icmpv6Type::DestinationUnreachable(etherparse::icmpv6::DestUnreachableCode::Port)
        );
        let quote = headers.payload.slice();
        let expected = icmp
            .icmp_type
            .calc_checksum(ip.source, ip.destination, quote)
            .unwrap();
        assert_eq!(icmp.checksum, expected, "ICMPv6 checksum, over the pseudo-header");
        ((ip.source, ip.destination), quote.to_vec())
    }

    fn quoted(datagram: &[u8]) -> &[u8] {
        &datagram[14..datagram.len().min(14 + 1232)]
    }

    fn conntrack(lb: &Loaded) -> Vec<(CtKey<Self>, CtEntry<Self>)> {
        lb.maps.conntrack6.iter().map(Result::unwrap).collect()
    }

    fn icmp_error(from: Self, to: Self, quote: &[u8], port_unreachable: bool) -> Vec<u8> {
        use etherparse::{Icmpv6Type, icmpv6::DestUnreachableCode};
        let kind = if port_unreachable {
            Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Port)
        } else {
            Icmpv6Type::PacketTooBig { mtu: 1280 }
        };
        let mut packet = Vec::new();
        PacketBuilder::ethernet2(GATEWAY_MAC, CLIENT_MAC)
            .ipv6(from, to, 64)
            .icmpv6(kind)
            .write(&mut packet, quote)
            .unwrap();
        packet
    }

    fn icmp_error_parts(frame: &[u8]) -> ((Self, Self), Vec<u8>) {
        let headers = PacketHeaders::from_ethernet_slice(frame).unwrap();
        let (Some(NetHeaders::Ipv6(ip, _)), Some(TransportHeader::Icmpv6(icmp))) =
            (&headers.net, &headers.transport)
        else {
            panic!("not ICMPv6: {headers:?}")
        };
        let quote = headers.payload.slice();
        let expected = icmp
            .icmp_type
            .calc_checksum(ip.source, ip.destination, quote)
            .unwrap();
        assert_eq!(icmp.checksum, expected, "ICMPv6 checksum, over the pseudo-header");
        ((ip.source, ip.destination), quote.to_vec())
    }
}

for_each_family!(
    tcp_syn_to_cluster_ip_goes_to_a_backend_and_the_reply_comes_from_the_cluster_ip,
    udp_datagram_to_cluster_ip_goes_to_a_backend_and_the_reply_comes_back,
    every_packet_of_a_flow_goes_to_the_same_backend_and_flows_spread,
    a_flow_whose_backend_was_removed_is_rebalanced_not_black_holed,
    udp_to_a_service_without_endpoints_gets_a_port_unreachable_back,
    truncated_packets_pass_byte_identical_at_every_length,
    two_datapaths_with_the_same_backends_pick_the_same_backend_for_every_flow,
    with_client_ip_affinity_a_client_sticks_to_its_backend,
    a_draining_backend_keeps_its_flows_and_gets_no_new_one,
    an_open_connection_keeps_its_backend_after_the_backend_left_the_service,
    a_departed_backends_id_is_not_given_to_a_new_pod_after_a_restart,
    a_new_connection_on_a_closed_tuple_gets_replies_from_its_own_frontend,
    a_cluster_ip_on_a_port_no_service_defines_is_refused,
    a_syn_to_a_service_without_endpoints_gets_a_reset_back,
    fin_or_rst_from_either_side_marks_a_flow_closing,
    refusals_beyond_the_rate_limit_are_dropped,
    a_pod_reaching_itself_through_its_service_is_masqueraded_and_bounced_back,
    an_icmp_error_about_a_flow_reaches_the_client_about_its_frontend,
);

/// What the reconciler is given for a ClusterIP frontend with `backends`.
fn cluster_ip<A: Net>(backends: &[Endpoint<A>]) -> DesiredService {
    DesiredService {
        name: "test/cluster-ip".into(),
        cluster_ip: true,
        backends: socket_addrs(backends),
        ..DesiredService::default()
    }
}

fn socket_addrs<A: Net>(endpoints: &[Endpoint<A>]) -> Vec<SocketAddr> {
    endpoints.iter().map(|&endpoint| endpoint.into()).collect()
}

/// The TCP frontend CLUSTER_IP:80 and the UDP one CLUSTER_IP:53 of family `A`, with `tcp` and
/// `udp` backends.
fn web_and_dns<A: Net>(tcp: &[Endpoint<A>], udp: &[Endpoint<A>]) -> BTreeMap<FrontendKey, DesiredService> {
    BTreeMap::from([
        (frontend(A::CLUSTER_IP, 80, IPPROTO_TCP).into(), cluster_ip(tcp)),
        (frontend(A::CLUSTER_IP, 53, IPPROTO_UDP).into(), cluster_ip(udp)),
    ])
}

/// A datapath with TCP and UDP frontends on CLUSTER_IP:80 and :53 of family `A`, three backends
/// and two.
fn loaded<A: Net>(tag: &str) -> Loaded {
    let mut loaded = Loaded::new(tag);
    loaded.apply(&web_and_dns(&A::BACKENDS, &A::DNS_BACKENDS));
    for name in [program_names::FROM_POD, program_names::TO_POD] {
        load_program(|| loaded.tc(name).load()).unwrap();
    }
    loaded
}

fn run(loaded: &mut Loaded, name: &str, packet: &[u8]) -> (u32, Vec<u8>) {
    run_on(loaded.tc(name), name, packet)
}

/// The backend `packet` (from a client to a frontend) is DNATed to by `from_pod`.
fn backend_of<A: Net>(lb: &mut Loaded, packet: &[u8]) -> Endpoint<A> {
    let (verdict, out) = run(lb, program_names::FROM_POD, packet);
    assert_eq!(verdict, TC_ACT_OK);
    addresses_with_valid_checksums(&out).1
}

fn tcp_syn_to_cluster_ip_goes_to_a_backend_and_the_reply_comes_from_the_cluster_ip<A: Net>() {
    let mut lb = loaded::<A>("tcp");
    let (verdict, out) = run(
        &mut lb,
        program_names::FROM_POD,
        &tcp_syn((A::CLIENT, 40000), (A::CLUSTER_IP, 80)),
    );
    assert_eq!(verdict, TC_ACT_OK);
    let (src, backend) = addresses_with_valid_checksums(&out);
    assert_eq!(src, (A::CLIENT, 40000), "the source is untouched");
    assert!(
        A::BACKENDS.contains(&backend),
        "DNATed to a backend:targetPort, got {backend:?}"
    );

    let (verdict, out) = run(
        &mut lb,
        program_names::TO_POD,
        &tcp_data(backend, (A::CLIENT, 40000), b"hello"),
    );
    assert_eq!(verdict, TC_ACT_OK);
    let (src, dst) = addresses_with_valid_checksums(&out);
    assert_eq!(
        src,
        (A::CLUSTER_IP, 80),
        "the reply comes from the frontend the client dialled"
    );
    assert_eq!(dst, (A::CLIENT, 40000));
    assert_eq!(lb.maps.stat(Stat::NewFlows).unwrap(), 1);
    assert_eq!(lb.maps.stat(Stat::ReplyPackets).unwrap(), 1);
}

fn udp_datagram_to_cluster_ip_goes_to_a_backend_and_the_reply_comes_back<A: Net>() {
    let mut lb = loaded::<A>("udp");
    let backend = backend_of(&mut lb, &udp((A::CLIENT, 33000), (A::CLUSTER_IP, 53), b"query"));
    assert!(A::DNS_BACKENDS.contains(&backend), "got {backend:?}");

    let mut reply = udp(backend, (A::CLIENT, 33000), b"answer");
    let (verdict, out) = run(&mut lb, program_names::TO_POD, &reply);
    assert_eq!(verdict, TC_ACT_OK);
    let (src, dst) = addresses_with_valid_checksums(&out);
    assert_eq!((src, dst), ((A::CLUSTER_IP, 53), (A::CLIENT, 33000)));

    // A zero UDP checksum means "none" over IPv4; over IPv6 it is invalid unless the receiver
    // allows it (RFC 6935), and a middlebox forwards it all the same (RFC 6936 §5). Either way it
    // is translated and stays zero.
    let checksum_at = reply.len() - b"answer".len() - 2;
    reply[checksum_at..checksum_at + 2].copy_from_slice(&[0, 0]);
    let (verdict, out) = run(&mut lb, program_names::TO_POD, &reply);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        &out[checksum_at..checksum_at + 2],
        &[0, 0],
        "a zero UDP checksum stays zero"
    );
    let mut expected = udp((A::CLUSTER_IP, 53), (A::CLIENT, 33000), b"answer");
    expected[checksum_at..checksum_at + 2].copy_from_slice(&[0, 0]);
    assert_eq!(out, expected, "translated, the checksum left zero");
}

fn every_packet_of_a_flow_goes_to_the_same_backend_and_flows_spread<A: Net>() {
    let mut lb = loaded::<A>("sticky");
    let first = backend_of::<A>(&mut lb, &tcp_syn((A::CLIENT, 40001), (A::CLUSTER_IP, 80)));
    for _ in 0..20 {
        assert_eq!(
            backend_of(
                &mut lb,
                &tcp_data((A::CLIENT, 40001), (A::CLUSTER_IP, 80), b"more")
            ),
            first,
            "conntrack keeps the flow on its backend"
        );
    }
    let chosen: BTreeSet<Endpoint<A>> = (0..60u16)
        .map(|port| backend_of(&mut lb, &tcp_syn((A::CLIENT, 41000 + port), (A::CLUSTER_IP, 80))))
        .collect();
    assert_eq!(
        chosen.len(),
        3,
        "60 new flows reach all three backends, got {chosen:?}"
    );
}

fn a_flow_whose_backend_was_removed_is_rebalanced_not_black_holed<A: Net>() {
    let mut lb = loaded::<A>("rebalance");
    let query = udp((A::CLIENT, 34000), (A::CLUSTER_IP, 53), b"q1");
    let first = backend_of::<A>(&mut lb, &query);
    let survivor = A::DNS_BACKENDS.into_iter().find(|b| *b != first).unwrap();
    lb.apply(&web_and_dns(&A::BACKENDS, &[survivor]));

    assert_eq!(
        backend_of(&mut lb, &udp((A::CLIENT, 34000), (A::CLUSTER_IP, 53), b"q2")),
        survivor,
        "the flow moved to the live backend"
    );
    assert_eq!(lb.maps.stat(Stat::Rebalanced).unwrap(), 1);
    let (_, reply) = run(
        &mut lb,
        program_names::TO_POD,
        &udp(survivor, (A::CLIENT, 34000), b"a2"),
    );
    assert_eq!(
        addresses_with_valid_checksums(&reply).0,
        (A::CLUSTER_IP, 53),
        "replies of the moved flow are translated"
    );
}

/// UDP to a service without endpoints is answered with a port unreachable from the frontend,
/// quoting the datagram, as a closed port would; it never leaks to the ClusterIP.
fn udp_to_a_service_without_endpoints_gets_a_port_unreachable_back<A: Net>() {
    let mut lb = loaded::<A>("empty");
    lb.apply(&web_and_dns(&A::BACKENDS, &[]));
    // Odd-length, so the checksum's padding of the last byte counts.
    let query = udp(
        (A::CLIENT, 40002),
        (A::CLUSTER_IP, 53),
        b"a question of some odd length",
    );
    let (verdict, out) = run(&mut lb, program_names::FROM_POD, &query);
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent back towards the pod");
    assert_eq!(lb.maps.stat(Stat::NoBackend).unwrap(), 1);
    assert_eq!(
        (&out[0..6], &out[6..12]),
        (&query[6..12], &query[0..6]),
        "MACs swapped"
    );
    let (addresses, quote) = A::port_unreachable(&out);
    assert_eq!(addresses, (A::CLUSTER_IP, A::CLIENT));
    assert_eq!(quote, A::quoted(&query), "quotes the datagram");
}

fn truncated_packets_pass_byte_identical_at_every_length<A: Net>() {
    let mut lb = loaded::<A>("truncated");
    // With payloads, some cuts leave every header whole but the packet shorter than its IP
    // header says: cut on the way, and not to be rewritten either.
    let (client, web, dns) = ((A::CLIENT, 40003), (A::CLUSTER_IP, 80), (A::CLUSTER_IP, 53));
    for packet in [
        tcp_syn(client, web),
        udp(client, dns, b""),
        tcp_data(client, web, b"cut in the payload"),
        udp(client, dns, b"cut in the payload"),
    ] {
        for len in 0..packet.len() {
            let truncated = &packet[..len];
            // BPF_PROG_TEST_RUN builds no skb for a frame shorter than Ethernet + the IP header
            // its EtherType says (EINVAL): the kernel's rule, asserted so that a kernel that
            // starts accepting them makes this test exercise those lengths too.
            if len < A::MIN_FRAME {
                let mut out = vec![0u8; 64];
                let refused = lb
                    .tc(program_names::FROM_POD)
                    .test_run(TestRunOptions {
                        data_in: Some(truncated),
                        data_out: Some(&mut out),
                        ..Default::default()
                    })
                    .is_err();
                assert!(refused, "the kernel refuses a {len}-byte frame");
                continue;
            }
            for name in [program_names::FROM_POD, program_names::TO_POD] {
                let (verdict, out) = run(&mut lb, name, truncated);
                assert_eq!(verdict, TC_ACT_OK, "{len} bytes through {name}");
                assert_eq!(
                    out, truncated,
                    "{len} bytes through {name} come out byte-identical"
                );
            }
        }
    }
    assert_eq!(
        lb.maps.stat(Stat::NewFlows).unwrap(),
        0,
        "no truncated packet created a flow"
    );
}

/// Maglev: the backend is a function of the flow alone, so two separately loaded datapaths fed
/// the same backends (two nodes) pick the same backend for every flow, with no shared state.
fn two_datapaths_with_the_same_backends_pick_the_same_backend_for_every_flow<A: Net>() {
    // What `auto` gives three backends.
    let maglev = Some(1021);
    let mut nodes = [Loaded::new("maglev-a"), Loaded::new("maglev-b")];
    for (node, backends) in nodes
        .iter_mut()
        .zip([A::BACKENDS.to_vec(), A::BACKENDS.iter().rev().copied().collect()])
    {
        // The second node lists the backends in another order: ids differ, choices must not.
        node.program_all(
            &[(frontend(A::CLUSTER_IP, 80, IPPROTO_TCP), &backends)],
            maglev,
            None,
        );
        load_program(|| node.tc(program_names::FROM_POD).load()).unwrap();
    }
    let mut chosen = BTreeSet::new();
    for port in 0..200u16 {
        let syn = tcp_syn((A::CLIENT, 30000 + port), (A::CLUSTER_IP, 80));
        let [a, b] = nodes.each_mut().map(|node| backend_of::<A>(node, &syn));
        assert_eq!(
            a,
            b,
            "both nodes send the flow from port {} to the same backend",
            30000 + port
        );
        chosen.insert(a);
    }
    assert_eq!(chosen.len(), 3, "flows still spread over every backend");

    // Without conntrack state (a node that lost it, or another node), the choice is the same.
    let flow = tcp_data((A::CLIENT, 30007), (A::CLUSTER_IP, 80), b"mid-stream");
    let before = backend_of::<A>(&mut nodes[0], &flow);
    let fresh = Loaded::new("maglev-c");
    let mut fresh = fresh;
    fresh.program_all(
        &[(frontend(A::CLUSTER_IP, 80, IPPROTO_TCP), &A::BACKENDS)],
        maglev,
        None,
    );
    load_program(|| fresh.tc(program_names::FROM_POD).load()).unwrap();
    assert_eq!(
        backend_of::<A>(&mut fresh, &flow),
        before,
        "a node without the flow's conntrack entry picks its backend too"
    );
}

/// sessionAffinity ClientIP: every new connection of a client goes to the backend it had; other
/// clients are balanced as usual; a client whose backend went away is given a live one.
fn with_client_ip_affinity_a_client_sticks_to_its_backend<A: Net>() {
    let mut lb = Loaded::new("affinity");
    let web = frontend(A::CLUSTER_IP, 80, IPPROTO_TCP);
    lb.program_all(&[(web, &A::BACKENDS)], None, Some(10_800));
    load_program(|| lb.tc(program_names::FROM_POD).load()).unwrap();
    let backend_for = |lb: &mut Loaded, client: A, port: u16| {
        backend_of::<A>(lb, &tcp_syn((client, port), (A::CLUSTER_IP, 80)))
    };
    let first = backend_for(&mut lb, A::CLIENT, 20000);
    for port in 20001..20050 {
        assert_eq!(
            backend_for(&mut lb, A::CLIENT, port),
            first,
            "connection from port {port} sticks"
        );
    }
    let others: BTreeSet<_> = (1..=30u8)
        .map(|i| backend_for(&mut lb, A::pod(i), 20000))
        .collect();
    assert!(others.len() > 1, "different clients are still spread: {others:?}");

    // The client's backend is removed: its next connection goes to a live one, and sticks there.
    let survivors: Vec<_> = A::BACKENDS.into_iter().filter(|b| *b != first).collect();
    lb.program_all(&[(web, &survivors)], None, Some(10_800));
    let moved = backend_for(&mut lb, A::CLIENT, 21000);
    assert!(
        survivors.contains(&moved),
        "re-chosen among live backends: {moved:?}"
    );
    for port in 21001..21010 {
        assert_eq!(backend_for(&mut lb, A::CLIENT, port), moved);
    }

    // Switched off live: the same client is balanced again.
    lb.program_all(&[(web, &survivors)], None, None);
    let spread: BTreeSet<_> = (22000..22040)
        .map(|port| backend_for(&mut lb, A::CLIENT, port))
        .collect();
    assert_eq!(
        spread.len(),
        2,
        "without affinity the client's connections spread again"
    );
}

/// A terminating backend (draining): the flows it has keep reaching it, new flows never do, and
/// a client with affinity to it is given a ready one.
fn a_draining_backend_keeps_its_flows_and_gets_no_new_one<A: Net>() {
    let mut lb = Loaded::new("draining");
    let web = frontend(A::CLUSTER_IP, 80, IPPROTO_TCP);
    let mut desired = BTreeMap::from([(
        web,
        DesiredService {
            maglev: Some(MaglevSize::Scaled),
            affinity_timeout: Some(10_800),
            ..cluster_ip(&A::BACKENDS)
        },
    )]);
    lb.apply(&desired);
    load_program(|| lb.tc(program_names::FROM_POD).load()).unwrap();
    let established = (A::CLIENT, 40100);
    let old = backend_of::<A>(&mut lb, &tcp_syn(established, (A::CLUSTER_IP, 80)));

    let service = desired.get_mut(&web).unwrap();
    service.backends.retain(|b| *b != old.into());
    service.draining = socket_addrs(&[old]);
    lb.apply(&desired);
    for _ in 0..5 {
        assert_eq!(
            backend_of(&mut lb, &tcp_data(established, (A::CLUSTER_IP, 80), b"more")),
            old,
            "the established flow stays on its draining backend"
        );
    }
    for port in 0..60u16 {
        let new = backend_of(&mut lb, &tcp_syn((A::CLIENT, 41100 + port), (A::CLUSTER_IP, 80)));
        assert_ne!(
            new, old,
            "the client's affinity to a draining backend is not honoured"
        );
        let other = backend_of(
            &mut lb,
            &tcp_syn((A::pod(port as u8), 41100), (A::CLUSTER_IP, 80)),
        );
        assert_ne!(other, old, "no new flow goes to the draining backend");
    }
    assert_eq!(lb.maps.stat(Stat::Rebalanced).unwrap(), 0);

    // Gone for good: the connection it has still reaches it (see the next test).
    desired.get_mut(&web).unwrap().draining.clear();
    lb.apply(&desired);
    assert_eq!(
        backend_of(&mut lb, &tcp_data(established, (A::CLUSTER_IP, 80), b"again")),
        old,
        "the open connection stays with its pod"
    );
    assert_eq!(lb.maps.stat(Stat::Rebalanced).unwrap(), 0);
}

/// A backend that leaves its service while a connection to it is open (its pod deleted, no
/// longer ready, or relabelled away; the soak's churn found this): the connection keeps going
/// to it both ways, since any other backend could only reset it, as kube-proxy keeps it. A new
/// connection on the same tuple is balanced among the live backends.
fn an_open_connection_keeps_its_backend_after_the_backend_left_the_service<A: Net>() {
    let mut lb = loaded::<A>("left");
    let (client, web) = ((A::CLIENT, 40200), (A::CLUSTER_IP, 80));
    let old = backend_of::<A>(&mut lb, &tcp_syn(client, web));
    let live: Vec<Endpoint<A>> = A::BACKENDS.into_iter().filter(|b| *b != old).collect();
    lb.apply(&web_and_dns(&live, &A::DNS_BACKENDS));

    for segment in [
        tcp_data(client, web, b"GET / HTTP/1.1"),
        tcp_close(client, web, false),
    ] {
        assert_eq!(
            backend_of(&mut lb, &segment),
            old,
            "a segment of the open connection reaches its own pod, not a live backend that would reset it"
        );
    }
    let (verdict, out) = run(
        &mut lb,
        program_names::TO_POD,
        &tcp_data(old, client, b"HTTP/1.1 200 OK"),
    );
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        addresses_with_valid_checksums(&out),
        (web, client),
        "its replies still come from the frontend"
    );
    assert_eq!(lb.maps.stat(Stat::Rebalanced).unwrap(), 0);

    let reopened = backend_of(&mut lb, &tcp_syn(client, web));
    assert!(
        live.contains(&reopened),
        "a new connection on the tuple goes to a live backend, got {reopened:?}"
    );
    assert_eq!(lb.maps.stat(Stat::Rebalanced).unwrap(), 1);
    let (_, out) = run(&mut lb, program_names::TO_POD, &tcp_data(reopened, client, b"ok"));
    assert_eq!(
        addresses_with_valid_checksums(&out).0,
        web,
        "the new connection's replies are translated"
    );
}

/// Issue 19, item 6: the id of a backend that left its service while a connection to it was
/// open is not handed to a new pod, not even by an agent restarted meanwhile (which finds fewer
/// ids in the maps than were ever given out). Otherwise the open connection would move to the
/// new pod, which can only reset it.
fn a_departed_backends_id_is_not_given_to_a_new_pod_after_a_restart<A: Net>() {
    let mut lb = Loaded::new("departed");
    let web = frontend(A::CLUSTER_IP, 80, IPPROTO_TCP);
    let service = |backends: &[Endpoint<A>]| BTreeMap::from([(web, cluster_ip(backends))]);
    lb.apply(&service(&A::BACKENDS));
    load_program(|| lb.tc(program_names::FROM_POD).load()).unwrap();
    // A connection to the backend given out last, whose id is the highest.
    let departed = A::BACKENDS[2];
    let client = (40_000..41_000)
        .map(|port| (A::CLIENT, port))
        .find(|&client| backend_of::<A>(&mut lb, &tcp_syn(client, (A::CLUSTER_IP, 80))) == departed)
        .expect("some client port lands on the last backend");
    lb.apply(&service(&A::BACKENDS[..2]));

    lb.reconciler = Reconciler::new(lb.maps.read_programmed().unwrap());
    let newcomer = (A::pod(7), 3000);
    lb.apply(&service(&[A::BACKENDS[0], A::BACKENDS[1], newcomer]));
    for _ in 0..3 {
        assert_eq!(
            backend_of(&mut lb, &tcp_data(client, (A::CLUSTER_IP, 80), b"more")),
            departed,
            "the open connection stays with its own pod, not the one that came after the restart"
        );
    }
}

/// Two frontends with the same backend, dialled one after the other from the same client port:
/// their flows share the reply entry (backend → client), which the later one rewrites. A new
/// connection reusing the earlier flow's tuple must make it its own again, or its SYN-ACK comes
/// back from the other frontend and the client never connects (the soak's churn found this).
fn a_new_connection_on_a_closed_tuple_gets_replies_from_its_own_frontend<A: Net>() {
    let mut lb = loaded::<A>("reused");
    let backend = A::BACKENDS[0];
    lb.program(&[
        (frontend(A::CLUSTER_IP, 80, IPPROTO_TCP), &[backend]),
        (frontend(A::CLUSTER_IP, 8080, IPPROTO_TCP), &[backend]),
    ]);
    let client = (A::CLIENT, 40300);
    let reply_source = |lb: &mut Loaded, port: u16| {
        assert_eq!(
            backend_of::<A>(lb, &tcp_syn(client, (A::CLUSTER_IP, port))),
            backend
        );
        let (verdict, out) = run(lb, program_names::TO_POD, &tcp_data(backend, client, b""));
        assert_eq!(verdict, TC_ACT_OK);
        addresses_with_valid_checksums::<A>(&out).0
    };
    for port in [80, 8080, 80] {
        assert_eq!(
            reply_source(&mut lb, port),
            (A::CLUSTER_IP, port),
            "the reply comes from the frontend this connection dialled"
        );
        run(
            &mut lb,
            program_names::FROM_POD,
            &tcp_close(client, (A::CLUSTER_IP, port), false),
        );
    }
}

/// A ClusterIP reached on a port its Service does not define is refused as a closed port would
/// be (TCP and UDP), never routed on; once no Service has the address, it passes untouched.
fn a_cluster_ip_on_a_port_no_service_defines_is_refused<A: Net>() {
    let mut lb = loaded::<A>("undefined");
    let syn = tcp_syn((A::CLIENT, 40020), (A::CLUSTER_IP, 81));
    let (verdict, out) = run(&mut lb, program_names::FROM_POD, &syn);
    assert_eq!(verdict, TC_ACT_REDIRECT, "answered, back towards the pod");
    let headers = PacketHeaders::from_ethernet_slice(&out).unwrap();
    let Some(TransportHeader::Tcp(tcp)) = &headers.transport else {
        panic!("not TCP: {headers:?}")
    };
    assert!(tcp.rst && tcp.ack, "RST|ACK");
    assert_eq!(
        addresses_with_valid_checksums(&out),
        ((A::CLUSTER_IP, 81), (A::CLIENT, 40020))
    );

    // UDP to a port the Service has only for TCP.
    let query = udp((A::CLIENT, 40021), (A::CLUSTER_IP, 80), b"x");
    let (verdict, out) = run(&mut lb, program_names::FROM_POD, &query);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(A::port_unreachable(&out).0, (A::CLUSTER_IP, A::CLIENT));

    let (verdict, _) = run(
        &mut lb,
        program_names::FROM_POD,
        &tcp_data((A::CLIENT, 40022), (A::CLUSTER_IP, 81), b"x"),
    );
    assert_eq!(verdict, TC_ACT_SHOT, "mid-stream: dropped, not routed");
    assert_eq!(lb.maps.stat(Stat::UndefinedPort).unwrap(), 3);
    assert_eq!(lb.maps.stat(Stat::NewFlows).unwrap(), 0);

    lb.apply(&BTreeMap::<FrontendKey, DesiredService>::new());
    let (verdict, out) = run(&mut lb, program_names::FROM_POD, &syn);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, syn, "no longer a ClusterIP: untouched");
}

/// A SYN to a service without endpoints is answered at once with a RST from the frontend, sent
/// back towards the pod, so the client sees "connection refused" instead of a timeout.
fn a_syn_to_a_service_without_endpoints_gets_a_reset_back<A: Net>() {
    let mut lb = loaded::<A>("reset");
    lb.apply(&web_and_dns(&[], &A::DNS_BACKENDS));
    let syn = tcp_syn((A::CLIENT, 40010), (A::CLUSTER_IP, 80));
    let (verdict, out) = run(&mut lb, program_names::FROM_POD, &syn);
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "sent back out of the interface it came in on"
    );
    let headers = PacketHeaders::from_ethernet_slice(&out).unwrap();
    let Some(etherparse::LinkHeader::Ethernet2(eth)) = headers.link else {
        panic!("no Ethernet header")
    };
    assert_eq!(
        (eth.source, eth.destination),
        (GATEWAY_MAC, CLIENT_MAC),
        "MACs swapped"
    );
    let (src, dst) = addresses_with_valid_checksums(&out);
    assert_eq!(
        (src, dst),
        ((A::CLUSTER_IP, 80), (A::CLIENT, 40010)),
        "from the frontend the client dialled"
    );
    let Some(TransportHeader::Tcp(tcp)) = headers.transport else {
        panic!("not TCP")
    };
    assert!(tcp.rst && tcp.ack && !tcp.syn, "RST|ACK");
    assert_eq!(tcp.acknowledgment_number, 1001, "acknowledges the SYN (seq 1000)");
    assert_eq!(out.len(), A::MIN_FRAME + 20, "no options, no payload");

    // Not a pure SYN (here: an ACK of no known flow): dropped, never answered.
    let (verdict, _) = run(
        &mut lb,
        program_names::FROM_POD,
        &tcp_data((A::CLIENT, 40011), (A::CLUSTER_IP, 80), b"x"),
    );
    assert_eq!(verdict, TC_ACT_SHOT);
}

/// The conntrack entries of the flow from `client`, by direction: (forward, reply).
fn flow_entries<A: Net>(lb: &Loaded, client: Endpoint<A>) -> (Option<CtEntry<A>>, Option<CtEntry<A>>) {
    let mut entries = (None, None);
    for (key, entry) in A::conntrack(lb) {
        if key.direction == ct_direction::FORWARD && (key.src_addr, key.src_port) == client {
            entries.0 = Some(entry);
        }
        if key.direction == ct_direction::REPLY && (key.dst_addr, key.dst_port) == client {
            entries.1 = Some(entry);
        }
    }
    entries
}

/// A FIN or RST from either side marks the flow closing; a new SYN on the same tuple reopens it.
fn fin_or_rst_from_either_side_marks_a_flow_closing<A: Net>() {
    let mut lb = loaded::<A>("closing");
    let closing = |entry: Option<CtEntry<A>>| entry.expect("the entry exists").flags & ct_flags::CLOSING != 0;
    let web = (A::CLUSTER_IP, 80);

    let client = (A::CLIENT, 42000);
    let backend = backend_of::<A>(&mut lb, &tcp_syn(client, web));
    run(&mut lb, program_names::FROM_POD, &tcp_data(client, web, b"GET"));
    let (forward, reply) = flow_entries(&lb, client);
    assert!(
        !closing(forward) && !closing(reply),
        "an open flow is not closing"
    );
    assert_eq!(
        backend_of(&mut lb, &tcp_close(client, web, false)),
        backend,
        "the FIN reaches the backend"
    );
    assert!(closing(flow_entries(&lb, client).0), "the client's FIN marks it");
    run(&mut lb, program_names::FROM_POD, &tcp_syn(client, web));
    assert!(
        !closing(flow_entries(&lb, client).0),
        "a new SYN on the tuple reopens it"
    );

    // The backend closes: its FIN, then a RST of another flow, through to_pod.
    for (port, reset) in [(42001, false), (42002, true)] {
        let client = (A::CLIENT, port);
        let backend = backend_of::<A>(&mut lb, &tcp_syn(client, web));
        let (verdict, out) = run(&mut lb, program_names::TO_POD, &tcp_close(backend, client, reset));
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(addresses_with_valid_checksums(&out).0, web, "still translated");
        let (forward, reply) = flow_entries(&lb, client);
        assert!(
            !closing(forward) && closing(reply),
            "the backend's FIN/RST marks its side"
        );
    }
}

/// Refusals are rate-limited: beyond the burst (and what the rate earns meanwhile) a SYN or
/// datagram to a service without endpoints is dropped, not answered, and counted.
fn refusals_beyond_the_rate_limit_are_dropped<A: Net>() {
    // The buckets are per CPU: stay on one, so every packet meets the same bucket.
    let mut one_cpu = nix::sched::CpuSet::new();
    one_cpu.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one_cpu).unwrap();
    let mut lb = loaded::<A>("ratelimit");
    lb.apply(&web_and_dns::<A>(&[], &[]));
    lb.datapath
        .set_reject_limit(RejectLimit::per_second(1, 5))
        .unwrap();
    let started = std::time::Instant::now();
    let mut answered = 0;
    for i in 0..30u16 {
        let packet = if i % 2 == 0 {
            tcp_syn((A::CLIENT, 44000 + i), (A::CLUSTER_IP, 80))
        } else {
            udp((A::CLIENT, 44000 + i), (A::CLUSTER_IP, 53), b"q")
        };
        match run(&mut lb, program_names::FROM_POD, &packet).0 {
            TC_ACT_REDIRECT => answered += 1,
            verdict => assert_eq!(verdict, TC_ACT_SHOT, "beyond the limit: dropped"),
        }
    }
    // One more reply per second that passed while sending.
    let earned = started.elapsed().as_secs() as usize + 1;
    assert!(
        (5..=5 + earned).contains(&answered),
        "the burst of 5 is answered, then about one a second: {answered}"
    );
    assert_eq!(
        lb.maps.stat(Stat::RejectRateLimited).unwrap() as usize,
        30 - answered
    );
    assert_eq!(
        lb.maps.stat(Stat::NoBackend).unwrap(),
        30,
        "every one counted as refused"
    );
}

/// A pod reaching itself through its own Service (hairpin): it sees the connection come from
/// the family's hairpin address, its reply comes back from the ClusterIP, and both go straight
/// back into the pod.
fn a_pod_reaching_itself_through_its_service_is_masqueraded_and_bounced_back<A: Net>() {
    let mut lb = Loaded::new("hairpin");
    let itself = (A::CLIENT, 3000);
    lb.program_all(
        &[(frontend(A::CLUSTER_IP, 80, IPPROTO_TCP), &[itself])],
        None,
        None,
    );
    load_program(|| lb.tc(program_names::FROM_POD).load()).unwrap();
    let client = (A::CLIENT, 40200);
    let hairpin = (A::HAIRPIN, client.1);

    let syn = tcp_syn(client, (A::CLUSTER_IP, 80));
    let (verdict, out) = run(&mut lb, program_names::FROM_POD, &syn);
    assert_eq!(verdict, TC_ACT_REDIRECT, "back into the pod, not routed");
    assert_eq!(addresses_with_valid_checksums(&out), (hairpin, itself));
    assert_eq!(
        (&out[0..6], &out[6..12]),
        (&syn[6..12], &syn[0..6]),
        "MACs swapped"
    );

    let (verdict, out) = run(
        &mut lb,
        program_names::FROM_POD,
        &tcp_data(itself, hairpin, b"hi"),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        addresses_with_valid_checksums(&out),
        ((A::CLUSTER_IP, 80), client)
    );
}

#[test]
fn packets_that_are_not_service_traffic_pass_byte_identical() {
    let mut lb = loaded::<Ipv4>("other");
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&[0; 20]);
    let ipv6 = {
        let mut packet = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
            .ipv6([0xfd; 16], [0xfe; 16], 64)
            .tcp(40000, 80, 1, 100)
            .syn()
            .write(&mut packet, &[])
            .unwrap();
        packet
    };
    let icmp = {
        let mut packet = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
            .ipv4(Ipv4::CLIENT, Ipv4::CLUSTER_IP, 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut packet, b"ping")
            .unwrap();
        packet
    };
    let cases: [(&str, Vec<u8>); 5] = [
        (
            "another destination",
            tcp_syn((Ipv4::CLIENT, 40000), ([10, 244, 0, 11], 80)),
        ),
        (
            "a reply of no tracked flow",
            tcp_data(([10, 244, 0, 10], 3000), (Ipv4::CLIENT, 49999), b"x"),
        ),
        ("ARP", arp),
        ("IPv6 to no frontend", ipv6),
        ("ICMP to the ClusterIP", icmp),
    ];
    for (what, packet) in cases {
        for name in [program_names::FROM_POD, program_names::TO_POD] {
            let (verdict, out) = run(&mut lb, name, &packet);
            assert_eq!(verdict, TC_ACT_OK, "{what} through {name}");
            assert_eq!(out, packet, "{what} through {name} is byte-identical");
        }
    }
}

#[test]
fn ipv4_options_are_honoured() {
    let mut lb = loaded::<Ipv4>("options");
    let mut ip = Ipv4Header::new(0, 64, etherparse::IpNumber::TCP, Ipv4::CLIENT, Ipv4::CLUSTER_IP).unwrap();
    ip.options = Ipv4Options::try_from(&[1u8, 1, 1, 0][..]).unwrap(); // NOP, NOP, NOP, EOL
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
        .ip(IpHeaders::Ipv4(ip, Default::default()))
        .tcp(40004, 80, 1, 100)
        .syn();
    let mut packet = Vec::new();
    builder.write(&mut packet, &[]).unwrap();
    assert_eq!(packet[14] & 0x0f, 6, "the test packet has a 24-byte IPv4 header");
    let (verdict, out) = run(&mut lb, program_names::FROM_POD, &packet);
    assert_eq!(verdict, TC_ACT_OK);
    let (_, backend) = addresses_with_valid_checksums(&out);
    assert!(
        Ipv4::BACKENDS.contains(&backend),
        "the ports were found after the options: {backend:?}"
    );
}

/// The maps carry BTF, so `bpftool map dump` prints field names: the documented way to debug.
#[test]
fn bpftool_prints_the_pinned_maps_with_field_names() {
    let lb = loaded::<Ipv4>("bpftool");
    let path = lb.pins.path().join(lb_common::map_names::SERVICES);
    let output = std::process::Command::new("bpftool")
        .args(["--json", "map", "dump", "pinned"])
        .arg(&path)
        .output()
        .expect("bpftool is installed by `cargo xtask setup`");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let entries: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let web = entries
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["formatted"]["key"]["port"] == 80)
        .unwrap_or_else(|| panic!("no entry with a named `port` field: {entries}"));
    assert_eq!(
        web["formatted"]["key"]["addr"],
        serde_json::json!(Ipv4::CLUSTER_IP)
    );
    assert_eq!(web["formatted"]["value"]["backends"]["count"], 3);
}

#[test]
fn affinity_expires_after_its_timeout() {
    let mut lb = Loaded::new("affinity-timeout");
    lb.program_all(
        &[(frontend(Ipv4::CLUSTER_IP, 80, IPPROTO_TCP), &Ipv4::BACKENDS)],
        None,
        Some(1),
    );
    load_program(|| lb.tc(program_names::FROM_POD).load()).unwrap();
    let mut choices = BTreeSet::new();
    // Each round waits out the 1 s timeout, so each first connection is balanced anew.
    for round in 0..6u16 {
        let syn = tcp_syn((Ipv4::CLIENT, 23000 + round), (Ipv4::CLUSTER_IP, 80));
        choices.insert(backend_of::<Ipv4>(&mut lb, &syn));
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    assert!(
        choices.len() > 1,
        "after the timeout the client is balanced again: {choices:?}"
    );
}

/// The agent's garbage collection on the real map: each kind of flow is deleted, both
/// directions, once idle past its own timeout, and not before.
#[test]
fn conntrack_gc_deletes_each_kind_of_flow_after_its_timeout() {
    let mut lb = loaded::<Ipv4>("gc");
    let now = conntrack_gc::monotonic_now_ns();
    let (open, closed, dns) = (
        (Ipv4::CLIENT, 43000),
        (Ipv4::CLIENT, 43001),
        (Ipv4::CLIENT, 43002),
    );
    for client in [open, closed] {
        run(
            &mut lb,
            program_names::FROM_POD,
            &tcp_syn(client, (Ipv4::CLUSTER_IP, 80)),
        );
    }
    run(
        &mut lb,
        program_names::FROM_POD,
        &tcp_close(closed, (Ipv4::CLUSTER_IP, 80), true),
    );
    run(
        &mut lb,
        program_names::FROM_POD,
        &udp(dns, (Ipv4::CLUSTER_IP, 53), b"q"),
    );
    assert_eq!(
        lb.maps.conntrack.keys().count(),
        6,
        "three flows, two entries each"
    );

    let timeouts = conntrack_gc::Timeouts::default();
    let gc_at = |lb: &mut Loaded, seconds: u64| {
        conntrack_gc::collect(&mut lb.maps.conntrack, now + seconds * 1_000_000_000, &timeouts)
    };
    let tracked = |lb: &Loaded, client| flow_entries(lb, client) != (None, None);

    assert!(gc_at(&mut lb, 5).is_empty(), "nothing has expired after 5 s");
    assert_eq!(lb.maps.conntrack.keys().count(), 6);

    let collected = gc_at(&mut lb, 12);
    assert_eq!(collected, [(conntrack_gc::Reason::TcpClosed, 1)].into());
    assert_eq!(
        flow_entries(&lb, closed),
        (None, None),
        "both directions of the reset flow"
    );
    assert!(tracked(&lb, open) && tracked(&lb, dns));

    assert_eq!(gc_at(&mut lb, 62), [(conntrack_gc::Reason::UdpIdle, 1)].into());
    assert!(tracked(&lb, open) && !tracked(&lb, dns));

    // A lone reply entry (its forward one evicted) goes with its flow too.
    let forward_key = lb
        .maps
        .conntrack
        .keys()
        .map(Result::unwrap)
        .find(|k| k.direction == ct_direction::FORWARD)
        .unwrap();
    lb.maps.conntrack.remove(&forward_key).unwrap();
    assert_eq!(
        gc_at(&mut lb, 3600),
        [].into(),
        "an established flow idle for 1 h stays"
    );
    assert_eq!(
        gc_at(&mut lb, 25 * 3600),
        [(conntrack_gc::Reason::TcpIdle, 1)].into()
    );
    assert_eq!(lb.maps.conntrack.keys().count(), 0, "nothing is left");
}

/// A conntrack map far too small for its traffic (8 entries, 200 flows): the LRU evicts the
/// oldest flows, and every new one is still balanced, tracked and translated both ways.
#[test]
fn a_full_conntrack_map_evicts_old_flows_and_keeps_balancing_new_ones() {
    let capacity = lb_userspace::datapath::Capacity {
        conntrack: 8,
        ..Default::default()
    };
    let mut lb = Loaded::with_capacity("ctfull", capacity);
    lb.program(&[(frontend(Ipv4::CLUSTER_IP, 80, IPPROTO_TCP), &Ipv4::BACKENDS)]);
    for name in [program_names::FROM_POD, program_names::TO_POD] {
        load_program(|| lb.tc(name).load()).unwrap();
    }
    let mut chosen = BTreeSet::new();
    for port in 0..200u16 {
        let client = (Ipv4::CLIENT, 41000 + port);
        let (verdict, out) = run(
            &mut lb,
            program_names::FROM_POD,
            &tcp_syn(client, (Ipv4::CLUSTER_IP, 80)),
        );
        assert_eq!(verdict, TC_ACT_OK);
        let (src, backend) = addresses_with_valid_checksums(&out);
        assert_eq!(src, client);
        assert!(
            Ipv4::BACKENDS.contains(&backend),
            "flow {port} went to {backend:?}"
        );
        chosen.insert(backend);
        // The newest flow is tracked: its reply is translated back to the ClusterIP.
        let (_, reply) = run(
            &mut lb,
            program_names::TO_POD,
            &tcp_data(backend, client, b"hello"),
        );
        assert_eq!(
            addresses_with_valid_checksums(&reply),
            ((Ipv4::CLUSTER_IP, 80), client),
            "the reply of flow {port} comes from the ClusterIP"
        );
    }
    assert_eq!(chosen.len(), 3, "new flows reach every backend: {chosen:?}");
    let entries = lb.maps.conntrack.keys().count();
    assert!(entries <= 8, "the map holds at most its capacity, has {entries}");
    assert_eq!(lb.maps.conntrack_capacity().unwrap(), 8);
}

/// IPv6 extension headers are walked to the transport header (hop-by-hop, routing without
/// segments left, destination options) and kept as they are; the packet is translated both
/// ways. A SYN behind extension headers to a service without endpoints is dropped, as one with
/// IPv4 options is: a refusal is built from a plain header only.
#[test]
fn ipv6_extension_headers_are_walked_and_kept() {
    const HOP_BY_HOP: u8 = 0;
    const ROUTING: u8 = 43;
    const DESTINATION_OPTIONS: u8 = 60;
    let mut lb = loaded::<Ipv6>("extensions");
    let headers = [(HOP_BY_HOP, 0), (ROUTING, 0), (DESTINATION_OPTIONS, 1)];
    let extensions_len = 8 + 8 + 16;
    let syn = with_ipv6_extensions(
        &tcp_syn((Ipv6::CLIENT, 40300), (Ipv6::CLUSTER_IP, 80)),
        &headers,
        0,
    );
    let (verdict, out) = run(&mut lb, program_names::FROM_POD, &syn);
    assert_eq!(verdict, TC_ACT_OK);
    let (src, backend) = addresses_with_valid_checksums::<Ipv6>(&out);
    assert_eq!(src, (Ipv6::CLIENT, 40300));
    assert!(Ipv6::BACKENDS.contains(&backend), "got {backend:?}");
    let parsed = PacketHeaders::from_ethernet_slice(&out).unwrap();
    let Some(NetHeaders::Ipv6(_, extensions)) = &parsed.net else {
        panic!("not IPv6: {parsed:?}")
    };
    // Destination options after a routing header are for the final destination.
    assert!(
        extensions.hop_by_hop_options.is_some()
            && extensions
                .routing
                .as_ref()
                .is_some_and(|routing| routing.final_destination_options.is_some()),
        "the extension headers are still there: {extensions:?}"
    );
    let extensions_at = 14 + 40..14 + 40 + extensions_len;
    assert_eq!(out[extensions_at.clone()], syn[extensions_at], "and unchanged");

    let reply = with_ipv6_extensions(&tcp_data(backend, (Ipv6::CLIENT, 40300), b"hello"), &headers, 0);
    let (verdict, out) = run(&mut lb, program_names::TO_POD, &reply);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        addresses_with_valid_checksums::<Ipv6>(&out),
        ((Ipv6::CLUSTER_IP, 80), (Ipv6::CLIENT, 40300))
    );

    lb.apply(&web_and_dns::<Ipv6>(&[], &[]));
    let refused = with_ipv6_extensions(
        &tcp_syn((Ipv6::CLIENT, 40301), (Ipv6::CLUSTER_IP, 80)),
        &[(DESTINATION_OPTIONS, 0)],
        0,
    );
    let (verdict, _) = run(&mut lb, program_names::FROM_POD, &refused);
    assert_eq!(verdict, TC_ACT_SHOT, "dropped, not answered");
}

/// IPv6 packets the datapath cannot or must not translate pass byte-identical, even to a
/// frontend: a later fragment whose first fragment it never saw (`fragments.rs` has the rest),
/// AH and ESP, a routing header with segments left (its destination is not
/// the final one the checksum covers), more than four extension headers, ICMPv6, and an
/// IPv4-mapped address (no address a packet carries).
#[test]
fn ipv6_packets_that_are_not_ours_pass_byte_identical() {
    const ROUTING: u8 = 43;
    const FRAGMENT: u8 = 44;
    const ESP: u8 = 50;
    const AH: u8 = 51;
    const DESTINATION_OPTIONS: u8 = 60;
    let mut lb = Loaded::new("v6-other");
    let mut both = web_and_dns(&Ipv6::BACKENDS, &Ipv6::DNS_BACKENDS);
    both.extend(web_and_dns(&Ipv4::BACKENDS, &Ipv4::DNS_BACKENDS));
    lb.apply(&both);
    for name in [program_names::FROM_POD, program_names::TO_POD] {
        load_program(|| lb.tc(name).load()).unwrap();
    }
    let (client, web) = ((Ipv6::CLIENT, 40400), (Ipv6::CLUSTER_IP, 80));
    let syn = tcp_syn(client, web);
    let icmp = {
        let mut packet = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
            .ipv6(Ipv6::CLIENT, Ipv6::CLUSTER_IP, 64)
            .icmpv6_echo_request(1, 1)
            .write(&mut packet, b"ping")
            .unwrap();
        packet
    };
    let mut mapped = [0u8; 16];
    mapped[10..12].copy_from_slice(&[0xff, 0xff]);
    mapped[12..].copy_from_slice(&Ipv4::CLUSTER_IP);
    let five_headers = [(DESTINATION_OPTIONS, 0); 5];
    let cases: [(&str, Vec<u8>); 7] = [
        (
            "a later fragment without its first",
            with_ipv6_extensions(&syn, &[(FRAGMENT, 0)], 0),
        ),
        ("AH", with_ipv6_extensions(&syn, &[(AH, 0)], 0)),
        ("ESP", with_ipv6_extensions(&syn, &[(ESP, 0)], 0)),
        (
            "a routing header with segments left",
            with_ipv6_extensions(&syn, &[(ROUTING, 2)], 1),
        ),
        (
            "five extension headers",
            with_ipv6_extensions(&syn, &five_headers, 0),
        ),
        ("ICMPv6 to the ClusterIP", icmp),
        ("an IPv4-mapped ClusterIP", tcp_syn(client, (mapped, 80))),
    ];
    for (what, packet) in cases {
        for name in [program_names::FROM_POD, program_names::TO_POD] {
            let (verdict, out) = run(&mut lb, name, &packet);
            assert_eq!(verdict, TC_ACT_OK, "{what} through {name}");
            assert_eq!(out, packet, "{what} through {name} is byte-identical");
        }
    }
    assert_eq!(lb.maps.stat(Stat::NewFlows).unwrap(), 0);
    // Four, the most walked (each kind etherparse can parse, to check the checksums).
    let four_headers = [
        (0, 0),
        (DESTINATION_OPTIONS, 0),
        (ROUTING, 0),
        (DESTINATION_OPTIONS, 0),
    ];
    let backend = backend_of::<Ipv6>(&mut lb, &with_ipv6_extensions(&syn, &four_headers, 0));
    assert!(
        Ipv6::BACKENDS.contains(&backend),
        "four extension headers are still walked: {backend:?}"
    );
}

/// A refused datagram too long to quote whole: its port unreachable quotes it as far as the
/// minimum IPv6 MTU allows, 1280 bytes in all.
#[test]
fn a_port_unreachable_quotes_a_long_datagram_up_to_1280_bytes() {
    let mut lb = loaded::<Ipv6>("long-quote");
    lb.apply(&web_and_dns(&Ipv6::BACKENDS, &[]));
    let query = udp((Ipv6::CLIENT, 40500), (Ipv6::CLUSTER_IP, 53), &[0x5a; 1400]);
    let (verdict, out) = run(&mut lb, program_names::FROM_POD, &query);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out.len(), 14 + 1280, "Ethernet and 1280 bytes of IPv6");
    let (addresses, quote) = Ipv6::port_unreachable(&out);
    assert_eq!(addresses, (Ipv6::CLUSTER_IP, Ipv6::CLIENT));
    assert_eq!(quote, &query[14..14 + 1232]);
}

/// A router's "packet too big" (or "fragmentation needed") about a DNATed datagram, and the
/// backend's own port unreachable, reach the client quoting the datagram as the client sent it,
/// to the frontend: its socket can match them. Errors about no tracked flow, or with a wrong
/// checksum, pass as they came.
fn an_icmp_error_about_a_flow_reaches_the_client_about_its_frontend<A: Net>() {
    let mut lb = loaded::<A>("icmp-error");
    let client = (A::CLIENT, 33000);
    let sent = udp(client, (A::CLUSTER_IP, 53), b"query");
    let (_, dnated) = run(&mut lb, program_names::FROM_POD, &sent);
    let (_, backend) = addresses_with_valid_checksums::<A>(&dnated);
    let router = A::pod(1);
    // What an error quotes: the IPv4 header and 8 bytes, the whole IPv6 packet.
    let quote_len = if A::MIN_FRAME == 14 + 20 {
        28
    } else {
        dnated.len() - 14
    };
    for (from, port_unreachable) in [(router, false), (backend.0, true)] {
        let error = A::icmp_error(from, A::CLIENT, &dnated[14..14 + quote_len], port_unreachable);
        let (verdict, out) = run(&mut lb, program_names::TO_POD, &error);
        assert_eq!(verdict, TC_ACT_OK);
        let ((source, destination), quote) = A::icmp_error_parts(&out);
        let reporter = if from == backend.0 { A::CLUSTER_IP } else { from };
        assert_eq!(
            (source, destination),
            (reporter, A::CLIENT),
            "the backend reports as the frontend"
        );
        assert_eq!(
            quote,
            sent[14..14 + quote_len],
            "the quote is the datagram as the client sent it, checksums included"
        );
    }

    let untracked = udp((A::CLIENT, 33001), backend, b"query");
    let error = A::icmp_error(router, A::CLIENT, &untracked[14..14 + quote_len], false);
    let mut wrong_checksum = A::icmp_error(router, A::CLIENT, &dnated[14..14 + quote_len], false);
    let icmp_checksum_at = A::MIN_FRAME + 2;
    wrong_checksum[icmp_checksum_at] ^= 0x40;
    for (what, error) in [("untracked", error), ("wrong checksum", wrong_checksum)] {
        let (verdict, out) = run(&mut lb, program_names::TO_POD, &error);
        assert_eq!((verdict, &out), (TC_ACT_OK, &error), "{what}: passed as it came");
    }
}
