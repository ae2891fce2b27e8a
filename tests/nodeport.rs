//! Traffic from outside the node through the nodeport programs, on crafted packets run by
//! BPF_PROG_TEST_RUN: XDP ingress (`nodeport`), TC ingress (`nodeport_tc`) and TC egress
//! (`nodeport_egress`), with maps programmed by the real reconciler.
mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{
    Loaded, frontend,
    packets::{Endpoint, addresses_with_valid_checksums, tcp_data, tcp_syn, udp},
    run_on,
};
use lb_common::{IPPROTO_TCP, IPPROTO_UDP, ServiceKey, Stat, program_names};
use lb_userspace::reconcile::{DesiredService, External};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;

const NODE: [u8; 4] = [192, 168, 50, 2];
/// The address flows leaving for other nodes take. BPF_PROG_TEST_RUN runs TC programs on the
/// loopback device (index 1), so that is where it is configured.
const SNAT: [u8; 4] = [192, 168, 50, 2];
const LOOPBACK_INDEX: u32 = 1;
const CLIENT: Endpoint = ([203, 0, 113, 5], 40_000);
const LB_IP: [u8; 4] = [198, 51, 100, 7];
const NODE_PORT: u16 = 30_080;
const BACKEND: Endpoint = ([10, 244, 2, 10], 3000);

fn service(external: External, backends: &[Endpoint]) -> DesiredService {
    DesiredService {
        name: "test/web".into(),
        backends: backends.iter().map(|&b| b.into()).collect(),
        external: Some(external),
        ..DesiredService::default()
    }
}

/// A datapath with the node's address and its SNAT address set, `services` programmed and the
/// three programs loaded.
fn loaded(tag: &str, services: &[(ServiceKey, DesiredService)]) -> Loaded {
    let mut loaded = Loaded::new(tag);
    loaded.apply(&services.iter().cloned().collect());
    loaded.maps.set_node_addrs(&BTreeSet::from([NODE])).unwrap();
    loaded
        .maps
        .set_snat_addrs(&BTreeMap::from([(LOOPBACK_INDEX, SNAT)]))
        .unwrap();
    loaded.xdp(program_names::NODEPORT_XDP).load().unwrap();
    for name in [program_names::NODEPORT_TC, program_names::NODEPORT_EGRESS] {
        loaded.tc(name).load().unwrap();
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

#[test]
fn node_port_flow_to_another_node_is_dnated_snated_and_its_reply_restored() {
    let node_port = frontend([0; 4], NODE_PORT, IPPROTO_TCP);
    let mut loaded = loaded(
        "np-snat",
        &[(node_port, service(External::default(), &[BACKEND]))],
    );

    // In: DNAT at XDP, with checksums updated by plain arithmetic.
    let (verdict, forwarded) = ingress(&mut loaded, &tcp_syn(CLIENT, (NODE, NODE_PORT)));
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(addresses_with_valid_checksums(&forwarded), (CLIENT, BACKEND));

    // Out towards the other node: the node's address as source, the client's port kept.
    let (verdict, leaving) = egress(&mut loaded, &forwarded);
    assert_eq!(verdict, TC_ACT_OK);
    let snatted = (SNAT, CLIENT.1);
    assert_eq!(addresses_with_valid_checksums(&leaving), (snatted, BACKEND));
    let (_, more) = ingress(&mut loaded, &tcp_data(CLIENT, (NODE, NODE_PORT), b"more"));
    let (_, again) = egress(&mut loaded, &more);
    assert_eq!(
        addresses_with_valid_checksums(&again),
        (snatted, BACKEND),
        "every packet alike"
    );

    // The reply: the client back as destination at ingress, the frontend as source at egress.
    let (verdict, returned) = ingress(&mut loaded, &tcp_data(BACKEND, snatted, b"hello"));
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(addresses_with_valid_checksums(&returned), (BACKEND, CLIENT));
    let (verdict, reply) = egress(&mut loaded, &returned);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        addresses_with_valid_checksums(&reply),
        ((NODE, NODE_PORT), CLIENT)
    );
}

#[test]
fn a_second_client_on_the_same_port_gets_another_source_port() {
    let node_port = frontend([0; 4], NODE_PORT, IPPROTO_UDP);
    let mut loaded = loaded(
        "np-port",
        &[(node_port, service(External::default(), &[BACKEND]))],
    );
    let other = ([203, 0, 113, 6], CLIENT.1);
    let mut sources = Vec::new();
    for client in [CLIENT, other] {
        let (_, forwarded) = ingress(&mut loaded, &udp(client, (NODE, NODE_PORT), b"q"));
        let (_, leaving) = egress(&mut loaded, &forwarded);
        let (source, destination) = addresses_with_valid_checksums(&leaving);
        assert_eq!((source.0, destination), (SNAT, BACKEND));
        sources.push(source);
    }
    assert_ne!(
        sources[0], sources[1],
        "two flows, one backend: distinct node ports"
    );
    for (client, source) in [CLIENT, other].into_iter().zip(sources) {
        let (_, returned) = ingress(&mut loaded, &udp(BACKEND, source, b"a"));
        assert_eq!(addresses_with_valid_checksums(&returned), (BACKEND, client));
    }
}

#[test]
fn external_traffic_policy_local_keeps_the_client_and_drops_without_local_endpoints() {
    let with = frontend([0; 4], NODE_PORT, IPPROTO_TCP);
    let without = frontend([0; 4], NODE_PORT + 1, IPPROTO_TCP);
    let local = External {
        local: true,
        source_ranges: None,
    };
    let mut loaded = loaded(
        "np-local",
        &[
            (with, service(local.clone(), &[BACKEND])),
            (without, service(local, &[])),
        ],
    );
    let (verdict, forwarded) = ingress(&mut loaded, &tcp_syn(CLIENT, (NODE, NODE_PORT)));
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(addresses_with_valid_checksums(&forwarded), (CLIENT, BACKEND));
    let (_, leaving) = egress(&mut loaded, &forwarded);
    assert_eq!(leaving, forwarded, "no source NAT: the backend sees the client");

    let (verdict, _) = ingress(&mut loaded, &tcp_syn(CLIENT, (NODE, NODE_PORT + 1)));
    assert_eq!(verdict, XDP_DROP, "no local endpoint: dropped, not refused");
    assert_eq!(loaded.maps.stat(Stat::NoBackend).unwrap(), 1);
}

#[test]
fn load_balancer_source_ranges_admit_only_their_clients() {
    let lb = frontend(LB_IP, 80, IPPROTO_TCP);
    let ranges = External {
        local: false,
        source_ranges: Some(vec![([203, 0, 113, 0].into(), 24)]),
    };
    let mut loaded = loaded("np-ranges", &[(lb, service(ranges, &[BACKEND]))]);
    let (verdict, forwarded) = ingress(&mut loaded, &tcp_syn(CLIENT, (LB_IP, 80)));
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(addresses_with_valid_checksums(&forwarded).1, BACKEND);

    let outsider = ([192, 0, 2, 9], 40_000);
    let (verdict, _) = ingress(&mut loaded, &tcp_syn(outsider, (LB_IP, 80)));
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(loaded.maps.stat(Stat::SourceRangeDrops).unwrap(), 1);
}

#[test]
fn a_syn_to_a_node_port_without_endpoints_is_refused_by_tc() {
    let node_port = frontend([0; 4], NODE_PORT, IPPROTO_TCP);
    let mut loaded = loaded("np-refuse", &[(node_port, service(External::default(), &[]))]);
    let syn = tcp_syn(CLIENT, (NODE, NODE_PORT));
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
        ((NODE, NODE_PORT), CLIENT)
    );
}

#[test]
fn node_ports_answer_only_on_node_addresses_and_other_traffic_passes_untouched() {
    let node_port = frontend([0; 4], NODE_PORT, IPPROTO_TCP);
    let mut loaded = loaded(
        "np-other",
        &[(node_port, service(External::default(), &[BACKEND]))],
    );
    for packet in [
        tcp_syn(CLIENT, ([192, 168, 50, 3], NODE_PORT)),
        // The NodePort's own key (0.0.0.0) is no node address either: found by the fuzzer.
        tcp_syn(CLIENT, ([0; 4], NODE_PORT)),
        tcp_syn(CLIENT, (NODE, NODE_PORT + 1)),
        udp(CLIENT, (NODE, NODE_PORT), b"udp is another frontend"),
        tcp_data(BACKEND, CLIENT, b"no flow"),
    ] {
        let (verdict, out) = ingress(&mut loaded, &packet);
        assert_eq!((verdict, &out), (XDP_PASS, &packet));
        let (verdict, out) = egress(&mut loaded, &packet);
        assert_eq!((verdict, &out), (TC_ACT_OK, &packet));
    }
}

#[test]
fn a_restarted_agent_reads_external_frontends_back_and_rewrites_nothing() {
    let ranges = External {
        local: false,
        source_ranges: Some(vec![([203, 0, 113, 0].into(), 24), ([10, 0, 0, 0].into(), 8)]),
    };
    let services = [
        (
            frontend([0; 4], NODE_PORT, IPPROTO_TCP),
            service(External::default(), &[BACKEND]),
        ),
        (frontend(LB_IP, 80, IPPROTO_TCP), service(ranges, &[BACKEND])),
    ];
    let services = services.map(|(key, service)| {
        let maglev = Some(31);
        (key, DesiredService { maglev, ..service })
    });
    let loaded = loaded("np-restart", &services);
    let desired = services
        .iter()
        .map(|(key, service)| ((*key).into(), service.clone()))
        .collect();
    let mut restarted = lb_userspace::reconcile::Reconciler::new(loaded.maps.read_programmed().unwrap());
    let mut maps = loaded.datapath.maps().unwrap();
    let report = restarted.apply(&desired, &mut maps);
    assert_eq!((report.writes, report.deletes, report.failed.len()), (0, 0, 0));
}
