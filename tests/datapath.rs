//! The datapath on crafted packets, through BPF_PROG_TEST_RUN: the real programs, verifier and
//! helpers, with maps programmed by the real reconciler. Checksums are verified by etherparse,
//! which computes them independently from scratch.
mod common;

use std::collections::BTreeSet;

use aya::programs::{TestRun as _, TestRunOptions};
use common::{
    Loaded, frontend,
    packets::{addresses_with_valid_checksums, tcp_close, tcp_data, tcp_syn, udp},
    run_on,
};
use etherparse::{
    IpHeaders, Ipv4Header, Ipv4Options, NetHeaders, PacketBuilder, PacketHeaders, TransportHeader,
};
use lb_common::{
    CtEntry, IPPROTO_TCP, IPPROTO_UDP, RejectLimit, Stat, ct_direction, ct_flags, program_names,
};
use lb_userspace::{datapath::conntrack_gc, reconcile::DesiredService};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
/// Ethernet header + IPv4 header without options.
const MIN_IPV4_FRAME: usize = 14 + 20;

const CLIENT: [u8; 4] = [10, 244, 0, 20];
const CLUSTER_IP: [u8; 4] = [10, 96, 0, 10];
const BACKENDS: [([u8; 4], u16); 3] = [
    ([10, 244, 0, 10], 3000),
    ([10, 244, 0, 11], 3000),
    ([10, 244, 0, 12], 3000),
];
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 20];
const GATEWAY_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

/// A datapath with TCP and UDP frontends on CLUSTER_IP:80 and :53, three backends each.
fn loaded(tag: &str) -> Loaded {
    let mut loaded = Loaded::new(tag);
    loaded.program(&[
        (frontend(CLUSTER_IP, 80, IPPROTO_TCP), &BACKENDS),
        (
            frontend(CLUSTER_IP, 53, IPPROTO_UDP),
            &[([10, 244, 0, 10], 5353), ([10, 244, 0, 11], 5353)],
        ),
    ]);
    for name in [program_names::FROM_POD, program_names::TO_POD] {
        loaded.tc(name).load().unwrap();
    }
    loaded
}

fn run(loaded: &mut Loaded, name: &str, packet: &[u8]) -> (u32, Vec<u8>) {
    run_on(loaded.tc(name), name, packet)
}

#[test]
fn tcp_syn_to_cluster_ip_goes_to_a_backend_and_the_reply_comes_from_the_cluster_ip() {
    let mut lb = loaded("tcp");
    let (verdict, out) = run(
        &mut lb,
        program_names::FROM_POD,
        &tcp_syn((CLIENT, 40000), (CLUSTER_IP, 80)),
    );
    assert_eq!(verdict, TC_ACT_OK);
    let (src, backend) = addresses_with_valid_checksums(&out);
    assert_eq!(src, (CLIENT, 40000), "the source is untouched");
    assert!(
        BACKENDS.contains(&backend),
        "DNATed to a backend:targetPort, got {backend:?}"
    );

    let (verdict, out) = run(
        &mut lb,
        program_names::TO_POD,
        &tcp_data(backend, (CLIENT, 40000), b"hello"),
    );
    assert_eq!(verdict, TC_ACT_OK);
    let (src, dst) = addresses_with_valid_checksums(&out);
    assert_eq!(
        src,
        (CLUSTER_IP, 80),
        "the reply comes from the frontend the client dialled"
    );
    assert_eq!(dst, (CLIENT, 40000));
    assert_eq!(lb.maps.stat(Stat::NewFlows).unwrap(), 1);
    assert_eq!(lb.maps.stat(Stat::ReplyPackets).unwrap(), 1);
}

#[test]
fn udp_datagram_to_cluster_ip_goes_to_a_backend_and_the_reply_comes_back() {
    let mut lb = loaded("udp");
    let (verdict, out) = run(
        &mut lb,
        program_names::FROM_POD,
        &udp((CLIENT, 33000), (CLUSTER_IP, 53), b"query"),
    );
    assert_eq!(verdict, TC_ACT_OK);
    let (_, backend) = addresses_with_valid_checksums(&out);
    assert!(
        [([10, 244, 0, 10], 5353), ([10, 244, 0, 11], 5353)].contains(&backend),
        "got {backend:?}"
    );

    let mut reply = udp(backend, (CLIENT, 33000), b"answer");
    let (verdict, out) = run(&mut lb, program_names::TO_POD, &reply);
    assert_eq!(verdict, TC_ACT_OK);
    let (src, dst) = addresses_with_valid_checksums(&out);
    assert_eq!((src, dst), ((CLUSTER_IP, 53), (CLIENT, 33000)));

    // A zero UDP checksum means "none" and must stay zero through NAT.
    let checksum_at = reply.len() - b"answer".len() - 2;
    reply[checksum_at..checksum_at + 2].copy_from_slice(&[0, 0]);
    let (_, out) = run(&mut lb, program_names::TO_POD, &reply);
    assert_eq!(
        &out[checksum_at..checksum_at + 2],
        &[0, 0],
        "a zero UDP checksum stays zero"
    );
    let (src, _) = addresses_with_valid_checksums(&out);
    assert_eq!(src, (CLUSTER_IP, 53));
}

#[test]
fn every_packet_of_a_flow_goes_to_the_same_backend_and_flows_spread() {
    let mut lb = loaded("sticky");
    let first = addresses_with_valid_checksums(
        &run(
            &mut lb,
            program_names::FROM_POD,
            &tcp_syn((CLIENT, 40001), (CLUSTER_IP, 80)),
        )
        .1,
    )
    .1;
    for _ in 0..20 {
        let (_, out) = run(
            &mut lb,
            program_names::FROM_POD,
            &tcp_data((CLIENT, 40001), (CLUSTER_IP, 80), b"more"),
        );
        assert_eq!(
            addresses_with_valid_checksums(&out).1,
            first,
            "conntrack keeps the flow on its backend"
        );
    }
    let chosen: BTreeSet<_> = (0..60u16)
        .map(|port| {
            let (_, out) = run(
                &mut lb,
                program_names::FROM_POD,
                &tcp_syn((CLIENT, 41000 + port), (CLUSTER_IP, 80)),
            );
            addresses_with_valid_checksums(&out).1
        })
        .collect();
    assert_eq!(
        chosen.len(),
        3,
        "60 new flows reach all three backends, got {chosen:?}"
    );
}

#[test]
fn a_flow_whose_backend_was_removed_is_rebalanced_not_black_holed() {
    let mut lb = loaded("rebalance");
    let (_, out) = run(
        &mut lb,
        program_names::FROM_POD,
        &udp((CLIENT, 34000), (CLUSTER_IP, 53), b"q1"),
    );
    let first = addresses_with_valid_checksums(&out).1;
    let survivor = [([10, 244, 0, 10], 5353), ([10, 244, 0, 11], 5353)]
        .into_iter()
        .find(|b| *b != first)
        .unwrap();
    lb.program(&[
        (frontend(CLUSTER_IP, 80, IPPROTO_TCP), &BACKENDS),
        (frontend(CLUSTER_IP, 53, IPPROTO_UDP), &[survivor]),
    ]);

    let (verdict, out) = run(
        &mut lb,
        program_names::FROM_POD,
        &udp((CLIENT, 34000), (CLUSTER_IP, 53), b"q2"),
    );
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        addresses_with_valid_checksums(&out).1,
        survivor,
        "the flow moved to the live backend"
    );
    assert_eq!(lb.maps.stat(Stat::Rebalanced).unwrap(), 1);
    let (_, reply) = run(
        &mut lb,
        program_names::TO_POD,
        &udp(survivor, (CLIENT, 34000), b"a2"),
    );
    assert_eq!(
        addresses_with_valid_checksums(&reply).0,
        (CLUSTER_IP, 53),
        "replies of the moved flow are translated"
    );
}

/// UDP to a service without endpoints is answered with an ICMP port unreachable from the
/// frontend, quoting the datagram, as a closed port would; it never leaks to the ClusterIP.
#[test]
fn udp_to_a_service_without_endpoints_gets_a_port_unreachable_back() {
    const TC_ACT_REDIRECT: u32 = 7;
    let mut lb = loaded("empty");
    lb.program(&[(frontend(CLUSTER_IP, 53, IPPROTO_UDP), &[])]);
    let query = udp((CLIENT, 40002), (CLUSTER_IP, 53), b"a question of some length");
    let (verdict, out) = run(&mut lb, program_names::FROM_POD, &query);
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent back towards the pod");
    assert_eq!(lb.maps.stat(Stat::NoBackend).unwrap(), 1);
    let headers = PacketHeaders::from_ethernet_slice(&out).unwrap();
    let Some(NetHeaders::Ipv4(ip, _)) = &headers.net else {
        panic!("not IPv4")
    };
    assert_eq!(ip.header_checksum, ip.calc_header_checksum());
    assert_eq!((ip.source, ip.destination), (CLUSTER_IP, CLIENT));
    let Some(TransportHeader::Icmpv4(icmp)) = &headers.transport else {
        panic!("not ICMP: {headers:?}")
    };
    assert_eq!(
        icmp.icmp_type,
        etherparse::Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port)
    );
    let payload = headers.payload.slice();
    assert_eq!(
        icmp.checksum,
        icmp.icmp_type.calc_checksum(payload),
        "ICMP checksum"
    );
    assert_eq!(
        payload,
        &query[14..14 + 28],
        "quotes the datagram's IP header and first 8 bytes"
    );
}

#[test]
fn packets_that_are_not_service_traffic_pass_byte_identical() {
    let mut lb = loaded("other");
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
            .ipv4(CLIENT, CLUSTER_IP, 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut packet, b"ping")
            .unwrap();
        packet
    };
    let cases: [(&str, Vec<u8>); 5] = [
        (
            "another destination",
            tcp_syn((CLIENT, 40000), ([10, 244, 0, 11], 80)),
        ),
        (
            "a reply of no tracked flow",
            tcp_data(([10, 244, 0, 10], 3000), (CLIENT, 49999), b"x"),
        ),
        ("ARP", arp),
        ("IPv6", ipv6),
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
fn truncated_packets_pass_byte_identical_at_every_length() {
    let mut lb = loaded("truncated");
    // With payloads, some cuts leave every header whole but the packet shorter than its IPv4
    // total length says: cut on the way, and not to be rewritten either.
    for packet in [
        tcp_syn((CLIENT, 40003), (CLUSTER_IP, 80)),
        udp((CLIENT, 40003), (CLUSTER_IP, 53), b""),
        tcp_data((CLIENT, 40003), (CLUSTER_IP, 80), b"cut in the payload"),
        udp((CLIENT, 40003), (CLUSTER_IP, 53), b"cut in the payload"),
    ] {
        for len in 0..packet.len() {
            let truncated = &packet[..len];
            // BPF_PROG_TEST_RUN builds no skb for a frame shorter than Ethernet + an IPv4 header
            // when the EtherType says IPv4 (EINVAL): the kernel's rule, asserted so that a kernel
            // that starts accepting them makes this test exercise those lengths too.
            if len < MIN_IPV4_FRAME {
                let mut out = vec![0u8; 64];
                let refused = lb
                    .tc(program_names::FROM_POD)
                    .test_run(TestRunOptions {
                        data_in: Some(truncated),
                        data_out: Some(&mut out),
                        ..Default::default()
                    })
                    .is_err();
                assert!(refused, "the kernel refuses a {len}-byte IPv4 frame");
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

#[test]
fn ipv4_options_are_honoured() {
    let mut lb = loaded("options");
    let mut ip = Ipv4Header::new(0, 64, etherparse::IpNumber::TCP, CLIENT, CLUSTER_IP).unwrap();
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
        BACKENDS.contains(&backend),
        "the ports were found after the options: {backend:?}"
    );
}

#[test]
fn ip_fragments_pass_untouched() {
    let mut lb = loaded("fragments");
    let mut first_fragment = udp((CLIENT, 40005), (CLUSTER_IP, 53), &[7; 64]);
    // More Fragments set, offset 0; the IPv4 checksum is not checked by the datapath.
    first_fragment[20] |= 0x20;
    let (verdict, out) = run(&mut lb, program_names::FROM_POD, &first_fragment);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, first_fragment, "fragments are left to the kernel");
}

/// The maps carry BTF, so `bpftool map dump` prints field names: the documented way to debug.
#[test]
fn bpftool_prints_the_pinned_maps_with_field_names() {
    let lb = loaded("bpftool");
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
    assert_eq!(web["formatted"]["key"]["addr"], serde_json::json!(CLUSTER_IP));
    assert_eq!(web["formatted"]["value"]["backend_count"], 3);
}

/// Maglev: the backend is a function of the flow alone, so two separately loaded datapaths fed
/// the same backends (two nodes) pick the same backend for every flow, with no shared state.
#[test]
fn two_datapaths_with_the_same_backends_pick_the_same_backend_for_every_flow() {
    let maglev = Some(lb_common::DEFAULT_MAGLEV_TABLE_SIZE);
    let mut nodes = [Loaded::new("maglev-a"), Loaded::new("maglev-b")];
    for (node, backends) in nodes
        .iter_mut()
        .zip([BACKENDS.to_vec(), BACKENDS.iter().rev().copied().collect()])
    {
        // The second node lists the backends in another order: ids differ, choices must not.
        node.program_with(&[(frontend(CLUSTER_IP, 80, IPPROTO_TCP), &backends)], maglev);
        node.tc(program_names::FROM_POD).load().unwrap();
    }
    let mut chosen = BTreeSet::new();
    for port in 0..200u16 {
        let syn = tcp_syn((CLIENT, 30000 + port), (CLUSTER_IP, 80));
        let [a, b] = nodes
            .each_mut()
            .map(|node| addresses_with_valid_checksums(&run(node, program_names::FROM_POD, &syn).1).1);
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
    let flow = tcp_data((CLIENT, 30007), (CLUSTER_IP, 80), b"mid-stream");
    let before = addresses_with_valid_checksums(&run(&mut nodes[0], program_names::FROM_POD, &flow).1).1;
    let keys: Vec<_> = nodes[0].maps.conntrack.keys().map(Result::unwrap).collect();
    for key in keys {
        nodes[0].maps.conntrack.remove(&key).unwrap();
    }
    let after = addresses_with_valid_checksums(&run(&mut nodes[0], program_names::FROM_POD, &flow).1).1;
    assert_eq!(
        before, after,
        "a flow keeps its backend when conntrack is flushed"
    );
}

/// sessionAffinity ClientIP: every new connection of a client goes to the backend it had; other
/// clients are balanced as usual; a client whose backend went away is given a live one.
#[test]
fn with_client_ip_affinity_a_client_sticks_to_its_backend() {
    let mut lb = Loaded::new("affinity");
    lb.program_all(
        &[(frontend(CLUSTER_IP, 80, IPPROTO_TCP), &BACKENDS)],
        None,
        Some(10_800),
    );
    lb.tc(program_names::FROM_POD).load().unwrap();
    let backend_of = |lb: &mut Loaded, client: [u8; 4], port: u16| {
        addresses_with_valid_checksums(
            &run(
                lb,
                program_names::FROM_POD,
                &tcp_syn((client, port), (CLUSTER_IP, 80)),
            )
            .1,
        )
        .1
    };
    let first = backend_of(&mut lb, CLIENT, 20000);
    for port in 20001..20050 {
        assert_eq!(
            backend_of(&mut lb, CLIENT, port),
            first,
            "connection from port {port} sticks"
        );
    }
    let others: BTreeSet<_> = (1..=30u8)
        .map(|i| backend_of(&mut lb, [10, 244, 9, i], 20000))
        .collect();
    assert!(others.len() > 1, "different clients are still spread: {others:?}");

    // The client's backend is removed: its next connection goes to a live one, and sticks there.
    let survivors: Vec<_> = BACKENDS.iter().copied().filter(|b| *b != first).collect();
    lb.program_all(
        &[(frontend(CLUSTER_IP, 80, IPPROTO_TCP), &survivors)],
        None,
        Some(10_800),
    );
    let moved = backend_of(&mut lb, CLIENT, 21000);
    assert!(
        survivors.contains(&moved),
        "re-chosen among live backends: {moved:?}"
    );
    for port in 21001..21010 {
        assert_eq!(backend_of(&mut lb, CLIENT, port), moved);
    }

    // Switched off live: the same client is balanced again.
    lb.program_all(&[(frontend(CLUSTER_IP, 80, IPPROTO_TCP), &survivors)], None, None);
    let spread: BTreeSet<_> = (22000..22040)
        .map(|port| backend_of(&mut lb, CLIENT, port))
        .collect();
    assert_eq!(
        spread.len(),
        2,
        "without affinity the client's connections spread again"
    );
}

/// A terminating backend (draining): the flows it has keep reaching it, new flows never do, and
/// a client with affinity to it is given a ready one.
#[test]
fn a_draining_backend_keeps_its_flows_and_gets_no_new_one() {
    let mut lb = Loaded::new("draining");
    let web = frontend(CLUSTER_IP, 80, IPPROTO_TCP);
    let mut desired = std::collections::BTreeMap::from([(
        web,
        DesiredService {
            name: "test/web".into(),
            cluster_ip: true,
            backends: BACKENDS.map(Into::into).to_vec(),
            draining: Vec::new(),
            maglev: Some(lb_common::DEFAULT_MAGLEV_TABLE_SIZE),
            affinity_timeout: Some(10_800),
            external: None,
        },
    )]);
    lb.apply(&desired);
    lb.tc(program_names::FROM_POD).load().unwrap();
    let backend_of = |lb: &mut Loaded, packet: &[u8]| {
        addresses_with_valid_checksums(&run(lb, program_names::FROM_POD, packet).1).1
    };
    let established = (CLIENT, 40100);
    let old = backend_of(&mut lb, &tcp_syn(established, (CLUSTER_IP, 80)));

    let service = desired.get_mut(&web).unwrap();
    service.backends.retain(|b| *b != old.into());
    service.draining = vec![old.into()];
    lb.apply(&desired);
    for _ in 0..5 {
        assert_eq!(
            backend_of(&mut lb, &tcp_data(established, (CLUSTER_IP, 80), b"more")),
            old,
            "the established flow stays on its draining backend"
        );
    }
    for port in 0..60u16 {
        let new = backend_of(&mut lb, &tcp_syn((CLIENT, 41100 + port), (CLUSTER_IP, 80)));
        assert_ne!(
            new, old,
            "the client's affinity to a draining backend is not honoured"
        );
        let other = backend_of(
            &mut lb,
            &tcp_syn(([10, 244, 9, port as u8], 41100), (CLUSTER_IP, 80)),
        );
        assert_ne!(other, old, "no new flow goes to the draining backend");
    }
    assert_eq!(lb.maps.stat(Stat::Rebalanced).unwrap(), 0);

    // Gone for good: the connection it has still reaches it (see the next test).
    desired.get_mut(&web).unwrap().draining.clear();
    lb.apply(&desired);
    assert_eq!(
        backend_of(&mut lb, &tcp_data(established, (CLUSTER_IP, 80), b"again")),
        old,
        "the open connection stays with its pod"
    );
    assert_eq!(lb.maps.stat(Stat::Rebalanced).unwrap(), 0);
}

/// A backend that leaves its service while a connection to it is open (its pod deleted, no
/// longer ready, or relabelled away; the soak's churn found this): the connection keeps going
/// to it both ways, since any other backend could only reset it, as kube-proxy keeps it. A new
/// connection on the same tuple is balanced among the live backends.
#[test]
fn an_open_connection_keeps_its_backend_after_the_backend_left_the_service() {
    let mut lb = loaded("left");
    let client = (CLIENT, 40200);
    let backend_of = |lb: &mut Loaded, packet: &[u8]| {
        let (verdict, out) = run(lb, program_names::FROM_POD, packet);
        assert_eq!(verdict, TC_ACT_OK);
        addresses_with_valid_checksums(&out).1
    };
    let old = backend_of(&mut lb, &tcp_syn(client, (CLUSTER_IP, 80)));
    let live: Vec<([u8; 4], u16)> = BACKENDS.into_iter().filter(|b| *b != old).collect();
    lb.program(&[(frontend(CLUSTER_IP, 80, IPPROTO_TCP), &live)]);

    for segment in [
        tcp_data(client, (CLUSTER_IP, 80), b"GET / HTTP/1.1"),
        tcp_close(client, (CLUSTER_IP, 80), false),
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
        ((CLUSTER_IP, 80), client),
        "its replies still come from the frontend"
    );
    assert_eq!(lb.maps.stat(Stat::Rebalanced).unwrap(), 0);

    let reopened = backend_of(&mut lb, &tcp_syn(client, (CLUSTER_IP, 80)));
    assert!(
        live.contains(&reopened),
        "a new connection on the tuple goes to a live backend, got {reopened:?}"
    );
    assert_eq!(lb.maps.stat(Stat::Rebalanced).unwrap(), 1);
    let (_, out) = run(&mut lb, program_names::TO_POD, &tcp_data(reopened, client, b"ok"));
    assert_eq!(
        addresses_with_valid_checksums(&out).0,
        (CLUSTER_IP, 80),
        "the new connection's replies are translated"
    );
}

#[test]
fn affinity_expires_after_its_timeout() {
    let mut lb = Loaded::new("affinity-timeout");
    lb.program_all(
        &[(frontend(CLUSTER_IP, 80, IPPROTO_TCP), &BACKENDS)],
        None,
        Some(1),
    );
    lb.tc(program_names::FROM_POD).load().unwrap();
    let mut choices = BTreeSet::new();
    // Each round waits out the 1 s timeout, so each first connection is balanced anew.
    for round in 0..6u16 {
        let syn = tcp_syn((CLIENT, 23000 + round), (CLUSTER_IP, 80));
        choices.insert(addresses_with_valid_checksums(&run(&mut lb, program_names::FROM_POD, &syn).1).1);
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    assert!(
        choices.len() > 1,
        "after the timeout the client is balanced again: {choices:?}"
    );
}

/// A ClusterIP reached on a port its Service does not define is refused as a closed port would
/// be (TCP and UDP), never routed on; once no Service has the address, it passes untouched.
#[test]
fn a_cluster_ip_on_a_port_no_service_defines_is_refused() {
    const TC_ACT_REDIRECT: u32 = 7;
    let mut lb = loaded("undefined");
    let syn = tcp_syn((CLIENT, 40020), (CLUSTER_IP, 81));
    let (verdict, out) = run(&mut lb, program_names::FROM_POD, &syn);
    assert_eq!(verdict, TC_ACT_REDIRECT, "answered, back towards the pod");
    let headers = PacketHeaders::from_ethernet_slice(&out).unwrap();
    let Some(TransportHeader::Tcp(tcp)) = &headers.transport else {
        panic!("not TCP: {headers:?}")
    };
    assert!(tcp.rst && tcp.ack, "RST|ACK");
    assert_eq!(
        addresses_with_valid_checksums(&out),
        ((CLUSTER_IP, 81), (CLIENT, 40020))
    );

    // UDP to a port the Service has only for TCP.
    let (verdict, out) = run(
        &mut lb,
        program_names::FROM_POD,
        &udp((CLIENT, 40021), (CLUSTER_IP, 80), b"x"),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let headers = PacketHeaders::from_ethernet_slice(&out).unwrap();
    assert!(
        matches!(&headers.transport, Some(TransportHeader::Icmpv4(icmp)) if icmp.icmp_type
            == etherparse::Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port)),
        "ICMP port unreachable: {headers:?}"
    );

    let (verdict, _) = run(
        &mut lb,
        program_names::FROM_POD,
        &tcp_data((CLIENT, 40022), (CLUSTER_IP, 81), b"x"),
    );
    assert_eq!(verdict, TC_ACT_SHOT, "mid-stream: dropped, not routed");
    assert_eq!(lb.maps.stat(Stat::UndefinedPort).unwrap(), 3);
    assert_eq!(lb.maps.stat(Stat::NewFlows).unwrap(), 0);

    lb.program::<lb_common::Ipv4>(&[]);
    let (verdict, out) = run(&mut lb, program_names::FROM_POD, &syn);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, syn, "no longer a ClusterIP: untouched");
}

/// A SYN to a service without endpoints is answered at once with a RST from the frontend, sent
/// back towards the pod, so the client sees "connection refused" instead of a timeout.
#[test]
fn a_syn_to_a_service_without_endpoints_gets_a_reset_back() {
    const TC_ACT_REDIRECT: u32 = 7;
    let mut lb = loaded("reset");
    lb.program(&[(frontend(CLUSTER_IP, 80, IPPROTO_TCP), &[])]);
    let syn = tcp_syn((CLIENT, 40010), (CLUSTER_IP, 80));
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
        ((CLUSTER_IP, 80), (CLIENT, 40010)),
        "from the frontend the client dialled"
    );
    let Some(TransportHeader::Tcp(tcp)) = headers.transport else {
        panic!("not TCP")
    };
    assert!(tcp.rst && tcp.ack && !tcp.syn, "RST|ACK");
    assert_eq!(tcp.acknowledgment_number, 1001, "acknowledges the SYN (seq 1000)");
    assert_eq!(out.len(), 54);

    // Not a pure SYN (here: an ACK of no known flow): dropped, never answered.
    let (verdict, _) = run(
        &mut lb,
        program_names::FROM_POD,
        &tcp_data((CLIENT, 40011), (CLUSTER_IP, 80), b"x"),
    );
    assert_eq!(verdict, TC_ACT_SHOT);
}

/// The conntrack entries of the flow from `client`, by direction: (forward, reply).
fn flow_entries(lb: &Loaded, client: ([u8; 4], u16)) -> (Option<CtEntry>, Option<CtEntry>) {
    let mut entries = (None, None);
    for (key, entry) in lb.maps.conntrack.iter().map(Result::unwrap) {
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
#[test]
fn fin_or_rst_from_either_side_marks_a_flow_closing() {
    let mut lb = loaded("closing");
    let closing = |entry: Option<CtEntry>| entry.expect("the entry exists").flags & ct_flags::CLOSING != 0;

    let client = (CLIENT, 42000);
    let (_, out) = run(
        &mut lb,
        program_names::FROM_POD,
        &tcp_syn(client, (CLUSTER_IP, 80)),
    );
    let backend = addresses_with_valid_checksums(&out).1;
    run(
        &mut lb,
        program_names::FROM_POD,
        &tcp_data(client, (CLUSTER_IP, 80), b"GET"),
    );
    let (forward, reply) = flow_entries(&lb, client);
    assert!(
        !closing(forward) && !closing(reply),
        "an open flow is not closing"
    );
    let (verdict, out) = run(
        &mut lb,
        program_names::FROM_POD,
        &tcp_close(client, (CLUSTER_IP, 80), false),
    );
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        addresses_with_valid_checksums(&out).1,
        backend,
        "the FIN reaches the backend"
    );
    assert!(closing(flow_entries(&lb, client).0), "the client's FIN marks it");
    run(
        &mut lb,
        program_names::FROM_POD,
        &tcp_syn(client, (CLUSTER_IP, 80)),
    );
    assert!(
        !closing(flow_entries(&lb, client).0),
        "a new SYN on the tuple reopens it"
    );

    // The backend closes: its FIN, then a RST of another flow, through to_pod.
    for (port, reset) in [(42001, false), (42002, true)] {
        let client = (CLIENT, port);
        let (_, out) = run(
            &mut lb,
            program_names::FROM_POD,
            &tcp_syn(client, (CLUSTER_IP, 80)),
        );
        let backend = addresses_with_valid_checksums(&out).1;
        let (verdict, out) = run(&mut lb, program_names::TO_POD, &tcp_close(backend, client, reset));
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(
            addresses_with_valid_checksums(&out).0,
            (CLUSTER_IP, 80),
            "still translated"
        );
        let (forward, reply) = flow_entries(&lb, client);
        assert!(
            !closing(forward) && closing(reply),
            "the backend's FIN/RST marks its side"
        );
    }
}

/// Two frontends with the same backend, dialled one after the other from the same client port:
/// their flows share the reply entry (backend → client), which the later one rewrites. A new
/// connection reusing the earlier flow's tuple must make it its own again, or its SYN-ACK comes
/// back from the other frontend and the client never connects (the soak's churn found this).
#[test]
fn a_new_connection_on_a_closed_tuple_gets_replies_from_its_own_frontend() {
    let mut lb = loaded("reused");
    let backend = BACKENDS[0];
    lb.program(&[
        (frontend(CLUSTER_IP, 80, IPPROTO_TCP), &[backend]),
        (frontend(CLUSTER_IP, 8080, IPPROTO_TCP), &[backend]),
    ]);
    let client = (CLIENT, 40300);
    let reply_source = |lb: &mut Loaded, port: u16| {
        let (_, out) = run(lb, program_names::FROM_POD, &tcp_syn(client, (CLUSTER_IP, port)));
        assert_eq!(addresses_with_valid_checksums(&out).1, backend);
        let (verdict, out) = run(lb, program_names::TO_POD, &tcp_data(backend, client, b""));
        assert_eq!(verdict, TC_ACT_OK);
        addresses_with_valid_checksums(&out).0
    };
    for port in [80, 8080, 80] {
        assert_eq!(
            reply_source(&mut lb, port),
            (CLUSTER_IP, port),
            "the reply comes from the frontend this connection dialled"
        );
        run(
            &mut lb,
            program_names::FROM_POD,
            &tcp_close(client, (CLUSTER_IP, port), false),
        );
    }
}

/// The agent's garbage collection on the real map: each kind of flow is deleted, both
/// directions, once idle past its own timeout, and not before.
#[test]
fn conntrack_gc_deletes_each_kind_of_flow_after_its_timeout() {
    let mut lb = loaded("gc");
    let now = conntrack_gc::monotonic_now_ns();
    let (open, closed, dns) = ((CLIENT, 43000), (CLIENT, 43001), (CLIENT, 43002));
    for client in [open, closed] {
        run(
            &mut lb,
            program_names::FROM_POD,
            &tcp_syn(client, (CLUSTER_IP, 80)),
        );
    }
    run(
        &mut lb,
        program_names::FROM_POD,
        &tcp_close(closed, (CLUSTER_IP, 80), true),
    );
    run(
        &mut lb,
        program_names::FROM_POD,
        &udp(dns, (CLUSTER_IP, 53), b"q"),
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

/// Refusals are rate-limited: beyond the burst (and what the rate earns meanwhile) a SYN or
/// datagram to a service without endpoints is dropped, not answered, and counted.
#[test]
fn refusals_beyond_the_rate_limit_are_dropped() {
    const TC_ACT_REDIRECT: u32 = 7;
    // The buckets are per CPU: stay on one, so every packet meets the same bucket.
    let mut one_cpu = nix::sched::CpuSet::new();
    one_cpu.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one_cpu).unwrap();
    let mut lb = loaded("ratelimit");
    lb.program(&[
        (frontend(CLUSTER_IP, 80, IPPROTO_TCP), &[]),
        (frontend(CLUSTER_IP, 53, IPPROTO_UDP), &[]),
    ]);
    lb.datapath
        .set_reject_limit(RejectLimit::per_second(1, 5))
        .unwrap();
    let started = std::time::Instant::now();
    let mut answered = 0;
    for i in 0..30u16 {
        let packet = if i % 2 == 0 {
            tcp_syn((CLIENT, 44000 + i), (CLUSTER_IP, 80))
        } else {
            udp((CLIENT, 44000 + i), (CLUSTER_IP, 53), b"q")
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
/// HAIRPIN_ADDR, its reply comes back from the ClusterIP, and both go straight back into the pod.
#[test]
fn a_pod_reaching_itself_through_its_service_is_masqueraded_and_bounced_back() {
    const TC_ACT_REDIRECT: u32 = 7;
    let mut lb = Loaded::new("hairpin");
    let itself = (CLIENT, 3000);
    lb.program(&[(frontend(CLUSTER_IP, 80, IPPROTO_TCP), &[itself])]);
    lb.tc(program_names::FROM_POD).load().unwrap();
    let client = (CLIENT, 40200);
    let hairpin = (lb_common::HAIRPIN_ADDR, client.1);

    let syn = tcp_syn(client, (CLUSTER_IP, 80));
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
    assert_eq!(addresses_with_valid_checksums(&out), ((CLUSTER_IP, 80), client));
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
    lb.program(&[(frontend(CLUSTER_IP, 80, IPPROTO_TCP), &BACKENDS)]);
    for name in [program_names::FROM_POD, program_names::TO_POD] {
        lb.tc(name).load().unwrap();
    }
    let mut chosen = BTreeSet::new();
    for port in 0..200u16 {
        let client = (CLIENT, 41000 + port);
        let (verdict, out) = run(
            &mut lb,
            program_names::FROM_POD,
            &tcp_syn(client, (CLUSTER_IP, 80)),
        );
        assert_eq!(verdict, TC_ACT_OK);
        let (src, backend) = addresses_with_valid_checksums(&out);
        assert_eq!(src, client);
        assert!(BACKENDS.contains(&backend), "flow {port} went to {backend:?}");
        chosen.insert(backend);
        // The newest flow is tracked: its reply is translated back to the ClusterIP.
        let (_, reply) = run(
            &mut lb,
            program_names::TO_POD,
            &tcp_data(backend, client, b"hello"),
        );
        assert_eq!(
            addresses_with_valid_checksums(&reply),
            ((CLUSTER_IP, 80), client),
            "the reply of flow {port} comes from the ClusterIP"
        );
    }
    assert_eq!(chosen.len(), 3, "new flows reach every backend: {chosen:?}");
    let entries = lb.maps.conntrack.keys().count();
    assert!(entries <= 8, "the map holds at most its capacity, has {entries}");
    assert_eq!(lb.maps.conntrack_capacity().unwrap(), 8);
}
