//! A pod sending packets with another pod's address as their source, end to end on network
//! namespaces: the real agent, a victim pod holding a connection through a ClusterIP, and an
//! attacker pod writing spoofed segments with a raw socket. The datapath's reverse-path check
//! (the source must route back out of the interface the packet came in on) keeps the attacker
//! from taking the victim's reply entries over with a SYN, or closing its flow with a RST.
mod common;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::{PinDir, agent, require_root};
use etherparse::PacketBuilder;
use lb_common::{CtEntry, CtKey, IPPROTO_TCP, Stat, ct_direction};
use lb_userspace::{
    datapath::maps::ServiceMaps,
    lab::{self, Lab, NetNs, servers},
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// `web`, and `other`: a second Service over the same pod, on another ClusterIP.
const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 5, 10);
const OTHER: Ipv4Addr = Ipv4Addr::new(10, 96, 5, 11);
const LINES: u16 = 7000;
const SERVER: (&str, Ipv4Addr) = ("web-0", Ipv4Addr::new(10, 244, 5, 10));
const VICTIM: (&str, Ipv4Addr) = ("victim", Ipv4Addr::new(10, 244, 5, 20));
const ATTACKER: (&str, Ipv4Addr) = ("attacker", Ipv4Addr::new(10, 244, 5, 30));
/// How long an answer that should come at once may take on a loaded machine.
const TIMEOUT: Duration = Duration::from_secs(10);
const IPPROTO_RAW: i32 = 255;

struct Cluster {
    agent: Child,
    _server: servers::Server,
    _manifests: tempfile::TempDir,
    pins: PinDir,
    lab: Lab,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.agent.kill();
        let _ = self.agent.wait();
    }
}

impl Cluster {
    fn start(tag: &str) -> Self {
        require_root();
        let prefix = format!("{tag}{}", std::process::id() % 100_000);
        let mut lab = Lab::new(&prefix).unwrap();
        let server =
            servers::line_server(&lab.add_pod(SERVER.0, SERVER.1).unwrap().ns, SERVER.0, LINES).unwrap();
        lab.add_pod(VICTIM.0, VICTIM.1).unwrap();
        lab.add_pod(ATTACKER.0, ATTACKER.1).unwrap();
        let manifests = tempfile::tempdir().unwrap();
        let pod = lab::pod_manifest(SERVER.0, SERVER.1, &[("app", "web")], LINES);
        let services: Vec<String> = [("web", WEB), ("other", OTHER)]
            .into_iter()
            .map(|(name, ip)| {
                lab::multi_family_service_manifest(
                    name,
                    &[ip.into(), lab::ipv6_of(ip).into()],
                    &[("app", "web")],
                    &[("lines", "TCP", LINES, LINES)],
                )
            })
            .collect();
        agent::write_manifest(manifests.path(), "pods.yaml", &pod);
        agent::write_manifest(manifests.path(), "services.yaml", &services.join("---\n"));
        let pins = PinDir::new("sbtest", tag);
        let agent = agent::spawn(&lab, manifests.path(), pins.path(), Stdio::inherit(), &[]);
        agent::wait_until_attached(&lab, pins.path(), None);
        let cluster = Self {
            agent,
            _server: server,
            _manifests: manifests,
            pins,
            lab,
        };
        agent::wait_until("both Services in both families", || {
            cluster
                .maps()
                .is_some_and(|maps| maps.services.iter().count() == 2 && maps.services6.iter().count() == 2)
        });
        cluster
    }

    fn maps(&self) -> Option<ServiceMaps> {
        ServiceMaps::open(self.pins.path()).ok()
    }

    fn stat(&self, stat: Stat) -> u64 {
        self.maps().unwrap().stat(stat).unwrap()
    }

    fn pod(&self, pod: (&str, Ipv4Addr)) -> &NetNs {
        &self.lab.pod(pod.0).ns
    }
}

/// A pod's address in the family of `family`.
fn address(pod: Ipv4Addr, family: IpAddr) -> IpAddr {
    match family {
        IpAddr::V4(_) => pod.into(),
        IpAddr::V6(_) => lab::ipv6_of(pod).into(),
    }
}

/// A connection to a line server, kept open: each line sent is answered with the pod's name.
struct Lines(BufReader<TcpStream>);

impl Lines {
    fn connect(ns: &NetNs, target: SocketAddr) -> Self {
        let stream = ns
            .run(move || TcpStream::connect_timeout(&target, TIMEOUT))
            .unwrap()
            .unwrap_or_else(|e| panic!("connect to {target}: {e}"));
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        Self(BufReader::new(stream))
    }

    fn ask(&mut self) -> std::io::Result<String> {
        self.0.get_mut().write_all(b"who are you?\n")?;
        let mut line = String::new();
        self.0.read_line(&mut line)?;
        Ok(line.trim().to_owned())
    }

    fn local(&self) -> SocketAddr {
        self.0.get_ref().local_addr().unwrap()
    }
}

/// A TCP segment from `src` to `dst` (a SYN, or a RST), written whole, IP header included, by a
/// raw socket in `ns`: the kernel sends it as it is, whatever its source.
fn send_raw(ns: &NetNs, src: SocketAddr, dst: SocketAddr, reset: bool) {
    let builder = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
        _ => unreachable!("one family"),
    };
    let builder = builder.tcp(src.port(), dst.port(), 0x5eed, 64240);
    let builder = if reset { builder.rst() } else { builder.syn() };
    let mut packet = Vec::new();
    builder.write(&mut packet, &[]).unwrap();
    let domain = if dst.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
    let socket = ns
        .run(move || Socket::new(domain, Type::RAW, Some(Protocol::from(IPPROTO_RAW))))
        .unwrap()
        .unwrap();
    // The port of a raw socket's address must be 0.
    let target = SockAddr::from(SocketAddr::new(dst.ip(), 0));
    socket.send_to(&packet, &target).unwrap();
}

/// The victim's two conntrack entries: (forward, reply), of its connection from `client` to
/// `frontend` answered by `server`.
fn victim_entries(
    maps: &ServiceMaps,
    client: SocketAddr,
    frontend: SocketAddr,
    server: SocketAddr,
) -> [Option<(IpAddr, u16, u16)>; 2] {
    fn find<A: lb_common::Address + Into<IpAddr>>(
        entries: impl Iterator<Item = (CtKey<A>, CtEntry<A>)>,
        (src, dst): (SocketAddr, SocketAddr),
        direction: u8,
    ) -> Option<(IpAddr, u16, u16)> {
        entries
            .filter(|(key, _)| {
                key.direction == direction
                    && key.proto == IPPROTO_TCP
                    && (key.src_addr.into(), key.src_port) == (src.ip(), src.port())
                    && (key.dst_addr.into(), key.dst_port) == (dst.ip(), dst.port())
            })
            .map(|(_, entry)| (entry.nat_addr.into(), entry.nat_port, entry.flags))
            .next()
    }
    let forward = (client, frontend);
    let reply = (server, client);
    if client.is_ipv4() {
        let entries = || maps.conntrack.iter().map(Result::unwrap);
        [
            find(entries(), forward, ct_direction::FORWARD),
            find(entries(), reply, ct_direction::REPLY),
        ]
    } else {
        let entries = || maps.conntrack6.iter().map(Result::unwrap);
        [
            find(entries(), forward, ct_direction::FORWARD),
            find(entries(), reply, ct_direction::REPLY),
        ]
    }
}

#[test]
fn a_pod_spoofing_another_pods_address_neither_takes_over_nor_closes_its_connection() {
    let cluster = Cluster::start("spf");
    let (victim, attacker) = (cluster.pod(VICTIM), cluster.pod(ATTACKER));
    let mut dropped = 0;
    for family in [IpAddr::from(WEB), lab::ipv6_of(WEB).into()] {
        let web = SocketAddr::new(address(WEB, family), LINES);
        let other = SocketAddr::new(address(OTHER, family), LINES);
        let server = SocketAddr::new(address(SERVER.1, family), LINES);
        let mut connection = Lines::connect(victim, web);
        assert_eq!(connection.ask().unwrap(), SERVER.0);
        let client = connection.local();
        assert_eq!(client.ip(), address(VICTIM.1, family));

        // The victim's port towards the other Service, which has the same pod: a SYN would
        // point the victim's reply entry at the other ClusterIP. A RST would close the flow. A
        // SYN to no service (the pod itself, from another port of the victim's) is not the
        // datapath's to judge (the kernel's rp_filter is): it is neither counted nor dropped.
        let elsewhere = SocketAddr::new(client.ip(), client.port() + 1);
        send_raw(attacker, elsewhere, server, false);
        send_raw(attacker, client, other, false);
        send_raw(attacker, client, web, true);
        dropped += 2;
        agent::wait_until("the spoofed segments to be dropped", || {
            cluster.stat(Stat::SpoofedSource) == dropped
        });

        let maps = cluster.maps().unwrap();
        let [forward, reply] = victim_entries(&maps, client, web, server);
        assert_eq!(
            forward,
            Some((server.ip(), server.port(), 0)),
            "the victim's flow keeps its backend and is not closing"
        );
        assert_eq!(
            reply,
            Some((web.ip(), web.port(), 0)),
            "the victim's replies still come from the ClusterIP it dialled"
        );
        assert_eq!(
            connection.ask().unwrap(),
            SERVER.0,
            "the victim's connection goes on"
        );
        // The attacker's own traffic is served.
        assert_eq!(Lines::connect(attacker, web).ask().unwrap(), SERVER.0);
        assert_eq!(
            cluster.stat(Stat::SpoofedSource),
            dropped,
            "only the spoofed segments to services were dropped"
        );
    }
    let status = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["status", "--pin-dir"])
        .arg(cluster.pins.path())
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status
            .lines()
            .any(|line| line.split_whitespace().eq(["spoofed_source_drops", "4"])),
        "status shows the drops: {status}"
    );
}
