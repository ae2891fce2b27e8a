//! Traffic from outside the node through the nodeport programs, on crafted packets run by
//! BPF_PROG_TEST_RUN: XDP ingress (`nodeport`), TC ingress (`nodeport_tc`) and TC egress
//! (`nodeport_egress`), with maps programmed by the real reconciler. Each test is written once
//! over the address family and run for each (`test_name::ipv4`, `test_name::ipv6`).
#[macro_use]
mod common;

use lb_userspace::datapath::load_program;
use std::collections::{BTreeMap, BTreeSet};

use common::{
    Loaded, frontend,
    packets::{
        Endpoint, Family, addresses_with_valid_checksums, sctp, sctp_chunk, sctp_with_valid_checksums,
        tcp_data, tcp_syn, udp, v6,
    },
    run_on,
    verdict::{TC_ACT_OK, TC_ACT_REDIRECT, XDP_DROP, XDP_PASS},
};
use lb_common::{IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, Ipv4, Ipv6, ServiceKey, Stat, program_names};
use lb_userspace::reconcile::{DesiredService, External, FrontendKey, MaglevSize, Reconciler};

const NODE_PORT: u16 = 30_080;
/// BPF_PROG_TEST_RUN runs TC programs on the loopback device (index 1), so that is where the
/// address flows leaving for other nodes take is configured.
const LOOPBACK_INDEX: u32 = 1;

/// The addresses the tests use, in each family.
trait Net: Family {
    /// The node's address, which flows leaving for other nodes also take.
    const NODE: Self;
    /// Another node's address.
    const OTHER_NODE: Self;
    const CLIENT: Endpoint<Self>;
    /// A second client, on the same port.
    const OTHER_CLIENT: Endpoint<Self>;
    /// The clients' network, and a client outside it.
    const CLIENT_RANGE: (Self, u8);
    const OUTSIDER: Endpoint<Self>;
    const LB_IP: Self;
    const BACKEND: Endpoint<Self>;
}

impl Net for Ipv4 {
    const NODE: Self = [192, 168, 50, 2];
    const OTHER_NODE: Self = [192, 168, 50, 3];
    const CLIENT: Endpoint<Self> = ([203, 0, 113, 5], 40_000);
    const OTHER_CLIENT: Endpoint<Self> = ([203, 0, 113, 6], 40_000);
    const CLIENT_RANGE: (Self, u8) = ([203, 0, 113, 0], 24);
    const OUTSIDER: Endpoint<Self> = ([192, 0, 2, 9], 40_000);
    const LB_IP: Self = [198, 51, 100, 7];
    const BACKEND: Endpoint<Self> = ([10, 244, 2, 10], 3000);
}

impl Net for Ipv6 {
    const NODE: Self = v6(Ipv4::NODE);
    const OTHER_NODE: Self = v6(Ipv4::OTHER_NODE);
    const CLIENT: Endpoint<Self> = (v6(Ipv4::CLIENT.0), 40_000);
    const OTHER_CLIENT: Endpoint<Self> = (v6(Ipv4::OTHER_CLIENT.0), 40_000);
    const CLIENT_RANGE: (Self, u8) = (v6(Ipv4::CLIENT_RANGE.0), 96 + 24);
    const OUTSIDER: Endpoint<Self> = (v6(Ipv4::OUTSIDER.0), 40_000);
    const LB_IP: Self = v6(Ipv4::LB_IP);
    const BACKEND: Endpoint<Self> = (v6(Ipv4::BACKEND.0), 3000);
}

for_each_family!(
    node_port_flow_to_another_node_is_dnated_snated_and_its_reply_restored,
    a_second_client_on_the_same_port_gets_another_source_port,
    sctp_associations_through_a_node_port_keep_valid_checksums_both_ways,
    external_traffic_policy_local_keeps_the_client_and_drops_without_local_endpoints,
    load_balancer_source_ranges_admit_only_their_clients,
    a_syn_to_a_node_port_without_endpoints_is_refused_by_tc,
    node_ports_answer_only_on_node_addresses_and_other_traffic_passes_untouched,
);

/// An external frontend with `backends`: `externalTrafficPolicy: Local` or not, and its source
/// ranges.
fn service<A: Net>(
    local: bool,
    source_ranges: Option<Vec<(A, u8)>>,
    backends: &[Endpoint<A>],
) -> DesiredService {
    let source_ranges = source_ranges.map(|ranges| {
        let ranges = ranges.into_iter();
        ranges.map(|(addr, len)| (addr.into(), len)).collect()
    });
    DesiredService {
        name: "test/web".into(),
        backends: backends.iter().map(|&backend| backend.into()).collect(),
        external: Some(External {
            local,
            source_ranges,
            ..External::default()
        }),
        ..DesiredService::default()
    }
}

/// A NodePort frontend of `proto` with policy Cluster and `backends`.
fn node_port<A: Net>(proto: u8, backends: &[Endpoint<A>]) -> (ServiceKey<A>, DesiredService) {
    (
        frontend(A::UNSPECIFIED, NODE_PORT, proto),
        service(false, None, backends),
    )
}

/// A datapath with the node's address and its SNAT address set, `services` programmed and the
/// three programs loaded.
fn loaded<A: Net>(tag: &str, services: &[(ServiceKey<A>, DesiredService)]) -> Loaded {
    let mut loaded = Loaded::new(tag);
    loaded.apply(&services.iter().cloned().collect());
    loaded.maps.set_node_addrs(&BTreeSet::from([A::NODE])).unwrap();
    let snat = BTreeMap::from([(LOOPBACK_INDEX, A::NODE)]);
    loaded.maps.set_snat_addrs(&snat).unwrap();
    load_program(|| loaded.xdp(program_names::NODEPORT_XDP).load()).unwrap();
    for name in [program_names::NODEPORT_TC, program_names::NODEPORT_EGRESS] {
        load_program(|| loaded.tc(name).load()).unwrap();
    }
    loaded
}

/// XDP ingress: the verdict and the frame as the program left it.
fn ingress(loaded: &mut Loaded, packet: &[u8]) -> (u32, Vec<u8>) {
    let name = program_names::NODEPORT_XDP;
    run_on(loaded.xdp(name), name, packet)
}

/// A TC program: the verdict and the packet as the program left it.
fn run_tc(loaded: &mut Loaded, name: &str, packet: &[u8]) -> (u32, Vec<u8>) {
    run_on(loaded.tc(name), name, packet)
}

fn egress(loaded: &mut Loaded, packet: &[u8]) -> (u32, Vec<u8>) {
    run_tc(loaded, program_names::NODEPORT_EGRESS, packet)
}

fn node_port_flow_to_another_node_is_dnated_snated_and_its_reply_restored<A: Net>() {
    let mut loaded = loaded("np-snat", &[node_port(IPPROTO_TCP, &[A::BACKEND])]);

    // In: DNAT at XDP, with checksums updated by plain arithmetic.
    let (verdict, forwarded) = ingress(&mut loaded, &tcp_syn(A::CLIENT, (A::NODE, NODE_PORT)));
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(
        addresses_with_valid_checksums(&forwarded),
        (A::CLIENT, A::BACKEND)
    );

    // Out towards the other node: the node's address as source, the client's port kept.
    let (verdict, leaving) = egress(&mut loaded, &forwarded);
    assert_eq!(verdict, TC_ACT_OK);
    let snatted = (A::NODE, A::CLIENT.1);
    assert_eq!(addresses_with_valid_checksums(&leaving), (snatted, A::BACKEND));
    let (_, more) = ingress(&mut loaded, &tcp_data(A::CLIENT, (A::NODE, NODE_PORT), b"more"));
    let (_, again) = egress(&mut loaded, &more);
    assert_eq!(
        addresses_with_valid_checksums(&again),
        (snatted, A::BACKEND),
        "every packet alike"
    );

    // The reply: the client back as destination at ingress, the frontend as source at egress.
    let (verdict, returned) = ingress(&mut loaded, &tcp_data(A::BACKEND, snatted, b"hello"));
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(addresses_with_valid_checksums(&returned), (A::BACKEND, A::CLIENT));
    let (verdict, reply) = egress(&mut loaded, &returned);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        addresses_with_valid_checksums(&reply),
        ((A::NODE, NODE_PORT), A::CLIENT)
    );
}

fn a_second_client_on_the_same_port_gets_another_source_port<A: Net>() {
    let mut loaded = loaded("np-port", &[node_port(IPPROTO_UDP, &[A::BACKEND])]);
    let mut sources = Vec::new();
    for client in [A::CLIENT, A::OTHER_CLIENT] {
        let (_, forwarded) = ingress(&mut loaded, &udp(client, (A::NODE, NODE_PORT), b"q"));
        let (_, leaving) = egress(&mut loaded, &forwarded);
        let (source, destination) = addresses_with_valid_checksums(&leaving);
        assert_eq!((source.0, destination), (A::NODE, A::BACKEND));
        sources.push(source);
    }
    assert_ne!(
        sources[0], sources[1],
        "two flows, one backend: distinct node ports"
    );
    for (client, source) in [A::CLIENT, A::OTHER_CLIENT].into_iter().zip(sources) {
        let (_, returned) = ingress(&mut loaded, &udp(A::BACKEND, source, b"a"));
        assert_eq!(addresses_with_valid_checksums(&returned), (A::BACKEND, client));
    }
}

/// SCTP's CRC32c covers the ports, not the addresses: it is updated for the DNAT to the target
/// port, for a source port the SNAT had to change, and for both on the way back.
fn sctp_associations_through_a_node_port_keep_valid_checksums_both_ways<A: Net>() {
    let mut loaded = loaded("np-sctp", &[node_port(IPPROTO_SCTP, &[A::BACKEND])]);
    let mut sources = Vec::new();
    for client in [A::CLIENT, A::OTHER_CLIENT] {
        let init = sctp(client, (A::NODE, NODE_PORT), sctp_chunk::INIT, b"hello");
        let (verdict, forwarded) = ingress(&mut loaded, &init);
        assert_eq!(verdict, XDP_PASS);
        let (_, to, _) = sctp_with_valid_checksums(&forwarded);
        assert_eq!(to, A::BACKEND);
        let (_, leaving) = egress(&mut loaded, &forwarded);
        let (source, to, chunk) = sctp_with_valid_checksums(&leaving);
        assert_eq!((source.0, to, chunk), (A::NODE, A::BACKEND, sctp_chunk::INIT));
        sources.push(source);
    }
    assert_ne!(sources[0].1, sources[1].1, "the second client's port was changed");
    for (client, source) in [A::CLIENT, A::OTHER_CLIENT].into_iter().zip(sources) {
        let answer = sctp(A::BACKEND, source, sctp_chunk::INIT_ACK, b"welcome");
        let (_, returned) = ingress(&mut loaded, &answer);
        let (_, restored, _) = sctp_with_valid_checksums(&returned);
        assert_eq!(restored, client);
        let (_, reply) = egress(&mut loaded, &returned);
        let (from, to, chunk) = sctp_with_valid_checksums(&reply);
        assert_eq!(
            (from, to, chunk),
            ((A::NODE, NODE_PORT), client, sctp_chunk::INIT_ACK)
        );
    }
}

fn external_traffic_policy_local_keeps_the_client_and_drops_without_local_endpoints<A: Net>() {
    let with = frontend(A::UNSPECIFIED, NODE_PORT, IPPROTO_TCP);
    let without = frontend(A::UNSPECIFIED, NODE_PORT + 1, IPPROTO_TCP);
    let mut loaded = loaded(
        "np-local",
        &[
            (with, service(true, None, &[A::BACKEND])),
            (without, service::<A>(true, None, &[])),
        ],
    );
    let (verdict, forwarded) = ingress(&mut loaded, &tcp_syn(A::CLIENT, (A::NODE, NODE_PORT)));
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(
        addresses_with_valid_checksums(&forwarded),
        (A::CLIENT, A::BACKEND)
    );
    let (_, leaving) = egress(&mut loaded, &forwarded);
    assert_eq!(leaving, forwarded, "no source NAT: the backend sees the client");

    let (verdict, _) = ingress(&mut loaded, &tcp_syn(A::CLIENT, (A::NODE, NODE_PORT + 1)));
    assert_eq!(verdict, XDP_DROP, "no local endpoint: dropped, not refused");
    assert_eq!(loaded.maps.stat(Stat::NoBackend).unwrap(), 1);
}

fn load_balancer_source_ranges_admit_only_their_clients<A: Net>() {
    let lb = frontend(A::LB_IP, 80, IPPROTO_TCP);
    let ranges = Some(vec![A::CLIENT_RANGE]);
    let mut loaded = loaded("np-ranges", &[(lb, service(false, ranges, &[A::BACKEND]))]);
    let (verdict, forwarded) = ingress(&mut loaded, &tcp_syn(A::CLIENT, (A::LB_IP, 80)));
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(addresses_with_valid_checksums(&forwarded).1, A::BACKEND);

    let (verdict, _) = ingress(&mut loaded, &tcp_syn(A::OUTSIDER, (A::LB_IP, 80)));
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(loaded.maps.stat(Stat::SourceRangeDrops).unwrap(), 1);
}

fn a_syn_to_a_node_port_without_endpoints_is_refused_by_tc<A: Net>() {
    let mut loaded = loaded("np-refuse", &[node_port::<A>(IPPROTO_TCP, &[])]);
    let syn = tcp_syn(A::CLIENT, (A::NODE, NODE_PORT));
    let (verdict, passed) = ingress(&mut loaded, &syn);
    assert_eq!(
        (verdict, &passed),
        (XDP_PASS, &syn),
        "XDP leaves the refusal to TC"
    );
    let (verdict, reset) = run_tc(&mut loaded, program_names::NODEPORT_TC, &syn);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        addresses_with_valid_checksums(&reset),
        ((A::NODE, NODE_PORT), A::CLIENT)
    );
}

fn node_ports_answer_only_on_node_addresses_and_other_traffic_passes_untouched<A: Net>() {
    let mut loaded = loaded("np-other", &[node_port(IPPROTO_TCP, &[A::BACKEND])]);
    for packet in [
        tcp_syn(A::CLIENT, (A::OTHER_NODE, NODE_PORT)),
        // The NodePort's own key (0.0.0.0, ::) is no node address either: found by the fuzzer.
        tcp_syn(A::CLIENT, (A::UNSPECIFIED, NODE_PORT)),
        tcp_syn(A::CLIENT, (A::NODE, NODE_PORT + 1)),
        udp(A::CLIENT, (A::NODE, NODE_PORT), b"udp is another frontend"),
        tcp_data(A::BACKEND, A::CLIENT, b"no flow"),
    ] {
        let (verdict, out) = ingress(&mut loaded, &packet);
        assert_eq!((verdict, &out), (XDP_PASS, &packet));
        let (verdict, out) = egress(&mut loaded, &packet);
        assert_eq!((verdict, &out), (TC_ACT_OK, &packet));
    }
}

#[test]
fn a_restarted_agent_reads_external_frontends_back_and_rewrites_nothing() {
    let ranges = Some(vec![([203, 0, 113, 0], 24), ([10, 0, 0, 0], 8)]);
    let services = [
        node_port(IPPROTO_TCP, &[Ipv4::BACKEND]),
        (
            frontend(Ipv4::LB_IP, 80, IPPROTO_TCP),
            service(false, ranges, &[Ipv4::BACKEND]),
        ),
    ];
    let services = services.map(|(key, service)| {
        let maglev = Some(MaglevSize::Fixed(31));
        (key, DesiredService { maglev, ..service })
    });
    let loaded = loaded("np-restart", &services);
    let desired: BTreeMap<FrontendKey, DesiredService> = services
        .iter()
        .map(|(key, service)| ((*key).into(), service.clone()))
        .collect();
    let mut restarted = Reconciler::new(loaded.maps.read_programmed().unwrap());
    let mut maps = loaded.datapath.maps().unwrap();
    let report = restarted.apply(&desired, &mut maps);
    assert_eq!((report.writes, report.deletes, report.failed.len()), (0, 0, 0));
}
