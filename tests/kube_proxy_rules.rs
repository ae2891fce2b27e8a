//! The kube-proxy rule sets the bench compares Switchboard against: each one is accepted by the
//! tool that loads it, and DNATs a real TCP connection from a client pod to a ClusterIP onto a
//! backend pod. Rules are only ever loaded inside namespaces these tests create.
mod common;

#[path = "bench/kube_proxy_rules.rs"]
mod kube_proxy_rules;

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    process::{Command, Stdio},
    time::Duration,
};

use common::require_root;
use kube_proxy_rules::{ClusterCidrs, Protocol, ServicePort};
use lb_userspace::lab::{Lab, NetNs, servers};

const CIDRS: ClusterCidrs = ClusterCidrs {
    pods: "10.240.0.0/12",
    services: "10.96.0.0/12",
};
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKENDS: [(&str, Ipv4Addr); 2] = [
    ("web-0", Ipv4Addr::new(10, 244, 2, 10)),
    ("web-1", Ipv4Addr::new(10, 244, 2, 11)),
];
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 20);

/// The web service on the two backends, plus filler services around it so the generators'
/// multi-service output is exercised too.
fn services() -> Vec<ServicePort> {
    let filler = |i: u8| ServicePort {
        namespace: "default".into(),
        name: format!("filler-{i}"),
        port_name: "http".into(),
        cluster_ip: Ipv4Addr::new(10, 97, 0, i),
        port: 80,
        protocol: if i.is_multiple_of(2) {
            Protocol::Tcp
        } else {
            Protocol::Udp
        },
        endpoints: (0..3).map(|j| (Ipv4Addr::new(10, 248, i, j), 8080)).collect(),
    };
    let web = ServicePort {
        namespace: "default".into(),
        name: "web".into(),
        port_name: "http".into(),
        cluster_ip: CLUSTER_IP,
        port: 80,
        protocol: Protocol::Tcp,
        endpoints: BACKENDS.iter().map(|(_, ip)| (*ip, 3000)).collect(),
    };
    vec![filler(1), filler(2), web, filler(3)]
}

/// Runs `program args` inside `ns` with `input` on its standard input; panics with its stderr
/// if it fails.
fn load(ns: &NetNs, program: &str, args: &[&str], input: &str) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), input).unwrap();
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(std::fs::File::open(file.path()).unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let output = ns.spawn(&mut command).unwrap().wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{program} {args:?} refused the generated rules: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn scratch_ns(tag: &str) -> NetNs {
    require_root();
    NetNs::create(&format!("{tag}{}", std::process::id() % 100_000)).unwrap()
}

#[test]
fn iptables_rules_pass_iptables_restore_test_with_both_backends() {
    let ns = scratch_ns("kpt");
    let rules = kube_proxy_rules::iptables_restore(&services(), CIDRS);
    assert!(
        rules.contains("--probability 0.5000000000"),
        "two endpoints: 1/2 then the rest"
    );
    load(&ns, "iptables-nft-restore", &["--test"], &rules);
    load(&ns, "iptables-legacy-restore", &["-w", "--test"], &rules);
}

#[test]
fn nftables_script_passes_nft_check() {
    let ns = scratch_ns("kpc");
    let script = kube_proxy_rules::nft_script(&services(), CIDRS);
    assert!(script.contains("numgen random mod 2 vmap"));
    load(&ns, "nft", &["-c", "-f", "-"], &script);
}

/// A lab with two web backends and a client; `install` loads rules into the node namespace.
/// Every connection to the ClusterIP must be answered by a backend, from the ClusterIP.
fn dnat_through(tag: &str, install: impl FnOnce(&NetNs)) {
    require_root();
    let mut lab = Lab::new(&format!("{tag}{}", std::process::id() % 100_000)).unwrap();
    let mut servers = Vec::new();
    for (name, ip) in BACKENDS {
        let ns = &lab.add_pod(name, ip).unwrap().ns;
        servers.push(servers::http_server(ns, name, 3000).unwrap());
    }
    lab.add_pod("client", CLIENT).unwrap();
    install(&lab.node);

    let mut answered_by = BTreeSet::new();
    for i in 0..20 {
        let reply = servers::http_get(&lab.pod("client").ns, CLUSTER_IP, 80, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("connection {i} to the ClusterIP: {e:#}"));
        assert_eq!(
            reply.from,
            SocketAddr::from((CLUSTER_IP, 80)),
            "de-NATed on the way back"
        );
        answered_by.insert(reply.pod);
    }
    assert_eq!(
        answered_by.len(),
        2,
        "20 connections reached both backends (a 2^-19 chance of failing by bad luck): {answered_by:?}"
    );
}

#[test]
fn iptables_nft_rules_dnat_a_connection_to_the_cluster_ip() {
    dnat_through("kpn", |node| {
        load(
            node,
            "iptables-nft-restore",
            &[],
            &kube_proxy_rules::iptables_restore(&services(), CIDRS),
        );
    });
}

#[test]
fn iptables_legacy_rules_dnat_a_connection_to_the_cluster_ip() {
    dnat_through("kpl", |node| {
        load(
            node,
            "iptables-legacy-restore",
            &["-w"],
            &kube_proxy_rules::iptables_restore(&services(), CIDRS),
        );
    });
}

#[test]
fn nftables_rules_dnat_a_connection_to_the_cluster_ip() {
    dnat_through("kpf", |node| {
        load(
            node,
            "nft",
            &["-f", "-"],
            &kube_proxy_rules::nft_script(&services(), CIDRS),
        );
    });
}
