//! Fragmented datagrams through every path that translates: on crafted fragments run by
//! BPF_PROG_TEST_RUN, and end to end on network namespaces.
//!
//! Crafted: a datagram is built whole by etherparse (its checksum computed from scratch), cut
//! into fragments the way a sender's kernel cuts it, and each fragment goes through the
//! programs; what comes out must be, byte for byte, the fragment of the datagram as translated
//! whole (built the same way), and the fragments that came out, reassembled by etherparse, must
//! hold a datagram whose checksum is right.
//!
//! End to end: a UDP request and its reply, each of 3200 bytes, between real sockets over links
//! of MTU 1500, so the kernels of the client and the pod cut them into fragments; through a
//! ClusterIP and through a NodePort, over IPv4 and IPv6. Nothing in the node's namespace
//! reassembles them (the tests check its counters): each fragment crosses the datapath alone.
#[macro_use]
mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use common::{
    Loaded, PinDir, agent, frontend,
    packets::{Endpoint, Family, sctp, sctp_chunk, udp, v6},
    run_on,
    verdict::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_PASS},
};
use etherparse::{
    IpFragOffset, IpNumber, Ipv4Header, Ipv6FragmentHeader, Ipv6Header, SlicedPacket, defrag::IpDefragPool,
};
use lb_common::{IPPROTO_SCTP, IPPROTO_UDP, Ipv4, Ipv6, ServiceKey, program_names};
use lb_userspace::{
    datapath::load_program,
    lab::{self, Lab, NetNs},
    reconcile::{DesiredService, External},
};

const DNS: u16 = 53;
const NODE_PORT: u16 = 30_053;
/// BPF_PROG_TEST_RUN runs TC programs on the loopback device (index 1): the interface whose
/// source NAT address the crafted tests set.
const LOOPBACK_INDEX: u32 = 1;
/// The bytes a crafted datagram carries: cut into three fragments on a 1500-byte link.
const LONG: usize = 3000;

/// The addresses of the crafted tests, and how each family cuts a datagram.
trait Net: Family {
    const CLIENT: Endpoint<Self>;
    const CLUSTER_IP: Self;
    /// A pod of this node, serving DNS on 5353.
    const BACKEND: Endpoint<Self>;
    /// A pod of another node.
    const REMOTE_BACKEND: Endpoint<Self>;
    const NODE: Self;
    /// A client outside the cluster.
    const OUTSIDE: Endpoint<Self>;
    /// The most transport bytes one fragment carries on a 1500-byte link (a multiple of 8).
    const CHUNK: usize;
    /// Whether a first fragment to a Service without endpoints is answered (a port
    /// unreachable) rather than dropped: an IPv6 one has an extension header (its fragment
    /// header), and packets with extension headers are dropped.
    const REFUSES_FIRST_FRAGMENT: bool;
    /// `frame` (Ethernet, a plain IP header, a whole datagram) cut as its sender would on a
    /// 1500-byte link, every fragment with identification `id`.
    fn fragments(frame: &[u8], id: u32) -> Vec<Vec<u8>>;
}

impl Net for Ipv4 {
    const CLIENT: Endpoint<Self> = ([10, 244, 0, 20], 33_000);
    const CLUSTER_IP: Self = [10, 96, 0, 10];
    const BACKEND: Endpoint<Self> = ([10, 244, 0, 10], 5353);
    const REMOTE_BACKEND: Endpoint<Self> = ([10, 244, 2, 10], 5353);
    const NODE: Self = [192, 168, 50, 2];
    const OUTSIDE: Endpoint<Self> = ([203, 0, 113, 5], 40_000);
    const CHUNK: usize = 1500 - 20;
    const REFUSES_FIRST_FRAGMENT: bool = true;

    fn fragments(frame: &[u8], id: u32) -> Vec<Vec<u8>> {
        let (header, datagram) = Ipv4Header::from_slice(&frame[14..]).unwrap();
        cut::<Self>(datagram, |offset, chunk, more| {
            let mut fragment = Ipv4Header {
                total_len: (20 + chunk) as u16,
                identification: id as u16,
                dont_fragment: false,
                more_fragments: more,
                fragment_offset: IpFragOffset::try_new((offset / 8) as u16).unwrap(),
                ..header.clone()
            };
            fragment.header_checksum = fragment.calc_header_checksum();
            let mut bytes = frame[..14].to_vec();
            bytes.extend_from_slice(&fragment.to_bytes());
            bytes
        })
    }
}

impl Net for Ipv6 {
    const CLIENT: Endpoint<Self> = (v6(Ipv4::CLIENT.0), 33_000);
    const CLUSTER_IP: Self = v6(Ipv4::CLUSTER_IP);
    const BACKEND: Endpoint<Self> = (v6(Ipv4::BACKEND.0), 5353);
    const REMOTE_BACKEND: Endpoint<Self> = (v6(Ipv4::REMOTE_BACKEND.0), 5353);
    const NODE: Self = v6(Ipv4::NODE);
    const OUTSIDE: Endpoint<Self> = (v6(Ipv4::OUTSIDE.0), 40_000);
    const CHUNK: usize = (1500 - 40 - 8) / 8 * 8;
    const REFUSES_FIRST_FRAGMENT: bool = false;

    fn fragments(frame: &[u8], id: u32) -> Vec<Vec<u8>> {
        let (header, datagram) = Ipv6Header::from_slice(&frame[14..]).unwrap();
        cut::<Self>(datagram, |offset, chunk, more| {
            let fragment = Ipv6Header {
                payload_length: (8 + chunk) as u16,
                next_header: IpNumber::IPV6_FRAGMENTATION_HEADER,
                ..header.clone()
            };
            let offset = IpFragOffset::try_new((offset / 8) as u16).unwrap();
            let extension = Ipv6FragmentHeader::new(header.next_header, offset, more, id);
            let mut bytes = frame[..14].to_vec();
            bytes.extend_from_slice(&fragment.to_bytes());
            bytes.extend_from_slice(&extension.to_bytes());
            bytes
        })
    }
}

/// `datagram` in pieces of `A::CHUNK` bytes, each after the headers `headers(offset, length,
/// more fragments)` writes.
fn cut<A: Net>(datagram: &[u8], headers: impl Fn(usize, usize, bool) -> Vec<u8>) -> Vec<Vec<u8>> {
    datagram
        .chunks(A::CHUNK)
        .enumerate()
        .map(|(i, chunk)| {
            let offset = i * A::CHUNK;
            let mut fragment = headers(offset, chunk.len(), offset + chunk.len() < datagram.len());
            fragment.extend_from_slice(chunk);
            fragment
        })
        .collect()
}

for_each_family!(
    a_fragmented_datagram_and_its_fragmented_reply_cross_a_cluster_ip,
    a_later_fragment_without_its_first_passes_untouched,
    fragments_to_a_service_without_endpoints_are_never_answered_as_datagrams,
    a_pod_reaching_itself_with_a_fragmented_datagram_is_hairpinned_fragment_by_fragment,
    fragments_of_a_node_port_flow_to_another_node_are_dnated_snated_and_restored,
    sctp_fragments_pass_untouched,
);

/// Bytes that differ from one offset to the next, so a misplaced fragment shows.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

fn service<A: Net>(backends: &[Endpoint<A>], external: bool) -> DesiredService {
    DesiredService {
        name: "test/dns".into(),
        cluster_ip: !external,
        backends: backends.iter().map(|&b| SocketAddr::from(b)).collect(),
        external: external.then_some(External {
            local: false,
            source_ranges: None,
            in_cluster: None,
        }),
        ..DesiredService::default()
    }
}

/// A datapath with `services` programmed, the node's address and its source NAT address set,
/// and every packet program loaded.
fn loaded<A: Net>(tag: &str, services: &[(ServiceKey<A>, DesiredService)]) -> Loaded {
    let mut loaded = Loaded::new(tag);
    loaded.apply(&services.iter().cloned().collect());
    loaded.maps.set_node_addrs(&BTreeSet::from([A::NODE])).unwrap();
    let snat = BTreeMap::from([(LOOPBACK_INDEX, A::NODE)]);
    loaded.maps.set_snat_addrs(&snat).unwrap();
    load_program(|| loaded.xdp(program_names::NODEPORT_XDP).load()).unwrap();
    for name in [
        program_names::FROM_POD,
        program_names::TO_POD,
        program_names::NODEPORT_TC,
        program_names::NODEPORT_EGRESS,
    ] {
        load_program(|| loaded.tc(name).load()).unwrap();
    }
    loaded
}

/// Runs each fragment through `program`, asserting `verdict`: what came out, in order.
fn run_all(loaded: &mut Loaded, program: &str, fragments: &[Vec<u8>], verdict: u32) -> Vec<Vec<u8>> {
    fragments
        .iter()
        .enumerate()
        .map(|(i, fragment)| {
            let (got, out) = if program == program_names::NODEPORT_XDP {
                run_on(loaded.xdp(program), program, fragment)
            } else {
                run_on(loaded.tc(program), program, fragment)
            };
            assert_eq!(got, verdict, "fragment {i} through {program}");
            out
        })
        .collect()
}

/// Asserts that `got` are the fragments of the UDP datagram from `src` to `dst` carrying
/// `payload`, cut with identification `id` (and with the MAC addresses swapped when
/// `bounced`), and that etherparse reassembles them into a datagram whose checksum is right.
fn assert_fragments_of<A: Net>(
    got: &[Vec<u8>],
    (src, dst): (Endpoint<A>, Endpoint<A>),
    payload: &[u8],
    id: u32,
    bounced: bool,
) {
    let mut expected = A::fragments(&udp(src, dst, payload), id);
    if bounced {
        for fragment in &mut expected {
            let (destination, source) = fragment.split_at_mut(6);
            destination.swap_with_slice(&mut source[..6]);
        }
    }
    assert_eq!(got.len(), expected.len(), "as many fragments");
    for (i, (got, expected)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(
            got, expected,
            "fragment {i} is that of the datagram {src:?} → {dst:?}"
        );
    }
    let (ends, datagram) = reassembled::<A>(got);
    assert_eq!(ends, (src.0, dst.0));
    let (udp_header, data) = etherparse::UdpHeader::from_slice(&datagram).unwrap();
    assert_eq!(
        (udp_header.source_port, udp_header.destination_port),
        (src.1, dst.1)
    );
    assert_eq!(data, payload);
    let checksum = match (src.0.into(), dst.0.into()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => udp_header.calc_checksum_ipv4_raw(s.octets(), d.octets(), data),
        (IpAddr::V6(s), IpAddr::V6(d)) => udp_header.calc_checksum_ipv6_raw(s.octets(), d.octets(), data),
        _ => unreachable!("one family"),
    };
    assert_eq!(
        udp_header.checksum,
        checksum.unwrap(),
        "the reassembled datagram's UDP checksum"
    );
}

/// The addresses and transport bytes of the datagram etherparse reassembles from `fragments`.
fn reassembled<A: Net>(fragments: &[Vec<u8>]) -> ((A, A), Vec<u8>) {
    let mut pool = IpDefragPool::<(), ()>::new();
    let mut whole = None;
    for fragment in fragments {
        let sliced = SlicedPacket::from_ethernet(fragment).unwrap();
        if let Some(payload) = pool.process_sliced_packet(&sliced, (), ()).unwrap() {
            whole = Some(payload.payload);
        }
    }
    let headers = etherparse::PacketHeaders::from_ethernet_slice(&fragments[0]).unwrap();
    let ends = A::addresses(headers.net.as_ref().unwrap()).unwrap();
    (ends, whole.expect("the fragments make a whole datagram"))
}

/// A 3000-byte DNS answer, cut in three on its way both ways: each fragment of the request gets
/// the backend as destination, each fragment of the reply the ClusterIP as source, the first
/// with the ports and the UDP checksum of the whole datagram, the others their addresses only.
fn a_fragmented_datagram_and_its_fragmented_reply_cross_a_cluster_ip<A: Net>() {
    let dns = frontend(A::CLUSTER_IP, DNS, IPPROTO_UDP);
    let mut lb = loaded("frag-cip", &[(dns, service(&[A::BACKEND], false))]);
    let question = payload(LONG);
    let request = A::fragments(&udp(A::CLIENT, (A::CLUSTER_IP, DNS), &question), 0x1234);
    assert_eq!(request.len(), 3, "a long datagram is cut in three");
    let out = run_all(&mut lb, program_names::FROM_POD, &request, TC_ACT_OK);
    assert_fragments_of(&out, (A::CLIENT, A::BACKEND), &question, 0x1234, false);

    let answer = payload(LONG + 200);
    let reply = A::fragments(&udp(A::BACKEND, A::CLIENT, &answer), 0xbeef);
    let out = run_all(&mut lb, program_names::TO_POD, &reply, TC_ACT_OK);
    assert_fragments_of(&out, ((A::CLUSTER_IP, DNS), A::CLIENT), &answer, 0xbeef, false);
}

/// A later fragment whose first fragment was never seen (lost, or overtaken on the way) holds no
/// ports to find its flow by: it passes untouched, and its datagram is lost at reassembly as it
/// would be without the datapath. Once its first fragment comes, the rest are translated.
fn a_later_fragment_without_its_first_passes_untouched<A: Net>() {
    let dns = frontend(A::CLUSTER_IP, DNS, IPPROTO_UDP);
    let mut lb = loaded("frag-late", &[(dns, service(&[A::BACKEND], false))]);
    let question = payload(LONG);
    let request = A::fragments(&udp(A::CLIENT, (A::CLUSTER_IP, DNS), &question), 7);
    let (verdict, out) = run_on(
        lb.tc(program_names::FROM_POD),
        program_names::FROM_POD,
        &request[1],
    );
    assert_eq!((verdict, &out), (TC_ACT_OK, &request[1]), "passed untouched");

    let translated = A::fragments(&udp(A::CLIENT, A::BACKEND, &question), 7);
    let out = run_all(&mut lb, program_names::FROM_POD, &request, TC_ACT_OK);
    assert_eq!(
        out, translated,
        "with its first fragment seen, every one is translated"
    );
}

/// A datagram to a Service without endpoints: its first fragment is refused as a datagram is
/// (a port unreachable over IPv4; over IPv6 its fragment header makes it a packet with extension
/// headers, which is dropped), the later ones are dropped, never answered (RFC 1122 §3.2.2: no
/// ICMP error about a fragment other than the first), and none leaks to the ClusterIP.
fn fragments_to_a_service_without_endpoints_are_never_answered_as_datagrams<A: Net>() {
    let dns = frontend(A::CLUSTER_IP, DNS, IPPROTO_UDP);
    let mut lb = loaded("frag-none", &[(dns, service::<A>(&[], false))]);
    let request = A::fragments(&udp(A::CLIENT, (A::CLUSTER_IP, DNS), &payload(LONG)), 0x77);
    let first_verdict = if A::REFUSES_FIRST_FRAGMENT {
        TC_ACT_REDIRECT
    } else {
        TC_ACT_SHOT
    };
    run_all(&mut lb, program_names::FROM_POD, &request[..1], first_verdict);
    run_all(&mut lb, program_names::FROM_POD, &request[1..], TC_ACT_SHOT);
}

/// A pod reaching itself through its Service with a long datagram, and answering it: every
/// fragment is masqueraded and bounced straight back, as the unfragmented packets are.
fn a_pod_reaching_itself_with_a_fragmented_datagram_is_hairpinned_fragment_by_fragment<A: Net>() {
    let dns = frontend(A::CLUSTER_IP, DNS, IPPROTO_UDP);
    let itself = (A::CLIENT.0, 5353);
    let mut lb = loaded("frag-hairpin", &[(dns, service(&[itself], false))]);
    let masqueraded = (A::HAIRPIN, A::CLIENT.1);
    let question = payload(LONG);
    let request = A::fragments(&udp(A::CLIENT, (A::CLUSTER_IP, DNS), &question), 21);
    let out = run_all(&mut lb, program_names::FROM_POD, &request, TC_ACT_REDIRECT);
    assert_fragments_of(&out, (masqueraded, itself), &question, 21, true);

    let answer = payload(LONG + 8);
    let reply = A::fragments(&udp(itself, masqueraded, &answer), 22);
    let out = run_all(&mut lb, program_names::FROM_POD, &reply, TC_ACT_REDIRECT);
    assert_fragments_of(&out, ((A::CLUSTER_IP, DNS), A::CLIENT), &answer, 22, true);
}

/// A NodePort flow to a pod of another node, fragmented both ways: DNAT at ingress (XDP),
/// source NAT at egress, the client restored at ingress (here by TC) and the frontend at egress.
fn fragments_of_a_node_port_flow_to_another_node_are_dnated_snated_and_restored<A: Net>() {
    let node_port = frontend(A::UNSPECIFIED, NODE_PORT, IPPROTO_UDP);
    let mut lb = loaded("frag-np", &[(node_port, service(&[A::REMOTE_BACKEND], true))]);
    let question = payload(LONG);
    let request = A::fragments(&udp(A::OUTSIDE, (A::NODE, NODE_PORT), &question), 0x5151);
    let dnated = run_all(&mut lb, program_names::NODEPORT_XDP, &request, XDP_PASS);
    assert_fragments_of(&dnated, (A::OUTSIDE, A::REMOTE_BACKEND), &question, 0x5151, false);
    let leaving = run_all(&mut lb, program_names::NODEPORT_EGRESS, &dnated, TC_ACT_OK);
    let snatted = (A::NODE, A::OUTSIDE.1);
    assert_fragments_of(&leaving, (snatted, A::REMOTE_BACKEND), &question, 0x5151, false);

    let answer = payload(LONG + 100);
    let reply = A::fragments(&udp(A::REMOTE_BACKEND, snatted, &answer), 0x6161);
    let restored = run_all(&mut lb, program_names::NODEPORT_TC, &reply, TC_ACT_OK);
    assert_fragments_of(&restored, (A::REMOTE_BACKEND, A::OUTSIDE), &answer, 0x6161, false);
    let out = run_all(&mut lb, program_names::NODEPORT_EGRESS, &restored, TC_ACT_OK);
    assert_fragments_of(&out, ((A::NODE, NODE_PORT), A::OUTSIDE), &answer, 0x6161, false);
}

/// SCTP fragments are not translated: SCTP keeps its packets within the path MTU itself, and
/// its CRC32c covers the whole packet, which no fragment holds for a port change to be followed.
/// They pass untouched, as before; the ports they would need are not even remembered.
fn sctp_fragments_pass_untouched<A: Net>() {
    const DIAMETER: u16 = 3868;
    let diameter = frontend(A::CLUSTER_IP, DIAMETER, IPPROTO_SCTP);
    let backend = (A::BACKEND.0, DIAMETER + 1);
    let mut lb = loaded("frag-sctp", &[(diameter, service(&[backend], false))]);
    let data = sctp(
        A::CLIENT,
        (A::CLUSTER_IP, DIAMETER),
        sctp_chunk::DATA,
        &payload(LONG),
    );
    let fragments = A::fragments(&data, 3);
    let out = run_all(&mut lb, program_names::FROM_POD, &fragments, TC_ACT_OK);
    assert_eq!(out, fragments, "passed untouched");
}

// End to end.

/// The Service of the end-to-end tests: DNS on a dual-stack ClusterIP and on NodePort 30053.
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 10);
const BACKEND_POD: (&str, Ipv4Addr) = ("dns-0", Ipv4Addr::new(10, 244, 7, 10));
const CLIENT_POD: (&str, Ipv4Addr) = ("client", Ipv4Addr::new(10, 244, 7, 20));
/// The node's address on the link to the outside client, and the client's, in each family.
const NODE_OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 168, 70, 1);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 168, 70, 100);
const NODE_OUTSIDE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x70, 0, 0, 0, 0, 0, 0x1);
const OUTSIDE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x70, 0, 0, 0, 0, 0, 0x100);
/// What each side sends: more than two 1500-byte fragments' worth.
const E2E_LONG: usize = 3200;
/// How long an answer that should come at once may take on a loaded machine.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A node with one DNS pod answering on 5353 (both families), a client pod, an outside client on
/// a link to the node's external interface, the Service `dns` (ClusterIP and NodePort), and the
/// agent.
struct Cluster {
    agent: Child,
    _server: Echo,
    _manifests: tempfile::TempDir,
    pins: PinDir,
    outside: NetNs,
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
        common::require_root();
        let prefix = format!("{tag}{}", std::process::id() % 100_000);
        let mut lab = Lab::new(&prefix).unwrap();
        let server = Echo::start(&lab.add_pod(BACKEND_POD.0, BACKEND_POD.1).unwrap().ns, 5353);
        lab.add_pod(CLIENT_POD.0, CLIENT_POD.1).unwrap();
        let external = format!("{prefix}-ext");
        let outside = plug_outside(&lab, &external);

        let manifests = tempfile::tempdir().unwrap();
        let pod = lab::pod_manifest(BACKEND_POD.0, BACKEND_POD.1, &[("app", "dns")], 5353);
        let cluster_ips = [IpAddr::from(CLUSTER_IP), lab::ipv6_of(CLUSTER_IP).into()];
        let service = lab::multi_family_service_manifest(
            "dns",
            &cluster_ips,
            &[("app", "dns")],
            &[("dns", "UDP", DNS, 5353)],
        )
        .replace("type: ClusterIP", "type: NodePort")
        .replace(
            "targetPort: 5353",
            &format!("targetPort: 5353\n    nodePort: {NODE_PORT}"),
        );
        agent::write_manifest(manifests.path(), "pods.yaml", &pod);
        agent::write_manifest(manifests.path(), "services.yaml", &service);

        let pins = PinDir::new("sbtest", tag);
        let agent = agent::spawn(
            &lab,
            manifests.path(),
            pins.path(),
            Stdio::inherit(),
            &["--external-interfaces", &external],
        );
        agent::wait_until_attached(&lab, pins.path(), Some(&external));
        let cluster = Self {
            agent,
            _server: server,
            _manifests: manifests,
            pins,
            outside,
            lab,
        };
        cluster.wait_until_programmed();
        cluster
    }

    /// Until every frontend of `dns` has its backend: both ClusterIPs and the NodePort of each
    /// family.
    fn wait_until_programmed(&self) {
        let six = lab::ipv6_of(CLUSTER_IP).octets();
        agent::wait_until("the dns frontends", || {
            let Ok(maps) = lb_userspace::datapath::maps::ServiceMaps::open(self.pins.path()) else {
                return false;
            };
            let count4 = |addr: [u8; 4], port| {
                let key = frontend(addr, port, IPPROTO_UDP);
                maps.services.get(&key, 0).map(|info| info.backends.count).ok()
            };
            let count6 = |addr: [u8; 16], port| {
                let key = frontend(addr, port, IPPROTO_UDP);
                maps.services6.get(&key, 0).map(|info| info.backends.count).ok()
            };
            [
                count4(CLUSTER_IP.octets(), DNS),
                count4([0; 4], NODE_PORT),
                count6(six, DNS),
                count6([0; 16], NODE_PORT),
            ]
            .iter()
            .all(|count| *count == Some(1))
        });
    }
}

/// A namespace outside the node, on a link (MTU 1500) to its interface `external`.
fn plug_outside(lab: &Lab, external: &str) -> NetNs {
    let outside = NetNs::create(&format!("{}-out", lab.prefix)).unwrap();
    lab.node.add_veth(external, &outside, "eth0").unwrap();
    let sides = [
        (&lab.node, external, NODE_OUTSIDE, NODE_OUTSIDE6),
        (&outside, "eth0", OUTSIDE, OUTSIDE6),
    ];
    for (ns, interface, address, address6) in sides {
        ns.ip(&["addr", "add", &format!("{address}/24"), "dev", interface])
            .unwrap();
        ns.ip(&[
            "addr",
            "add",
            &format!("{address6}/64"),
            "dev",
            interface,
            "nodad",
        ])
        .unwrap();
        ns.ip(&["link", "set", interface, "up"]).unwrap();
    }
    outside
}

/// A UDP server in a pod answering each datagram with the pod's name, a newline and the datagram
/// itself. Stops when dropped.
struct Echo(Arc<AtomicBool>);

impl Echo {
    fn start(ns: &NetNs, port: u16) -> Self {
        let socket = ns
            .run(move || UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port)))
            .unwrap()
            .unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            let mut buffer = vec![0u8; 65_536];
            while !stopped.load(Ordering::SeqCst) {
                if let Ok((n, peer)) = socket.recv_from(&mut buffer) {
                    let mut answer = format!("{}\n", BACKEND_POD.0).into_bytes();
                    answer.extend_from_slice(&buffer[..n]);
                    let _ = socket.send_to(&answer, peer);
                }
            }
        });
        Self(stop)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Sends `E2E_LONG` bytes from a new socket in `ns` to `target` and asserts the answer: the pod's
/// name and the same bytes, from `target` itself.
fn assert_long_exchange(ns: &NetNs, target: SocketAddr) {
    let any: IpAddr = if target.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let socket = ns.run(move || UdpSocket::bind((any, 0))).unwrap().unwrap();
    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
    let question = payload(E2E_LONG);
    let mut buffer = vec![0u8; 65_536];
    // UDP may lose a datagram on a busy machine: a few tries, each one waited for.
    let (n, from) = (0..3)
        .find_map(|_| {
            socket.send_to(&question, target).unwrap();
            socket.recv_from(&mut buffer).ok()
        })
        .unwrap_or_else(|| panic!("no answer from {target} to {E2E_LONG} bytes"));
    assert_eq!(from, target, "the answer comes from the address dialled");
    let mut expected = format!("{}\n", BACKEND_POD.0).into_bytes();
    expected.extend_from_slice(&question);
    assert_eq!(n, expected.len(), "the answer from {target} is whole");
    assert!(buffer[..n] == expected[..], "the answer from {target} is intact");
}

/// (IPv4 reassemblies, IPv6 reassemblies) a namespace's kernel has started: `ReasmReqds` of
/// /proc/net/snmp and `Ip6ReasmReqds` of /proc/net/snmp6.
fn reassemblies(ns: &NetNs) -> (u64, u64) {
    ns.run(|| {
        let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap();
        let mut lines = snmp.lines().filter(|line| line.starts_with("Ip: "));
        let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
        let at = names
            .split_whitespace()
            .position(|name| name == "ReasmReqds")
            .unwrap();
        let ipv4 = values.split_whitespace().nth(at).unwrap().parse().unwrap();
        let snmp6 = std::fs::read_to_string("/proc/thread-self/net/snmp6").unwrap();
        let ipv6 = snmp6
            .lines()
            .find_map(|line| line.strip_prefix("Ip6ReasmReqds"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        (ipv4, ipv6)
    })
    .unwrap()
}

#[test]
fn long_udp_datagrams_cross_a_cluster_ip_both_ways_in_both_families() {
    let cluster = Cluster::start("frc");
    let client = &cluster.lab.pod(CLIENT_POD.0).ns;
    for cluster_ip in [IpAddr::from(CLUSTER_IP), lab::ipv6_of(CLUSTER_IP).into()] {
        assert_long_exchange(client, SocketAddr::new(cluster_ip, DNS));
    }
    let pod = &cluster.lab.pod(BACKEND_POD.0).ns;
    let (ipv4, ipv6) = reassemblies(pod);
    assert!(
        ipv4 > 0 && ipv6 > 0,
        "the pod reassembled fragments of both families: {ipv4}, {ipv6}"
    );
    assert_eq!(
        reassemblies(&cluster.lab.node),
        (0, 0),
        "the node reassembled nothing: each fragment crossed the datapath alone"
    );
}

#[test]
fn long_udp_datagrams_cross_a_node_port_both_ways_in_both_families() {
    let cluster = Cluster::start("frn");
    for node in [IpAddr::from(NODE_OUTSIDE), NODE_OUTSIDE6.into()] {
        assert_long_exchange(&cluster.outside, SocketAddr::new(node, NODE_PORT));
    }
    assert_eq!(
        reassemblies(&cluster.lab.node),
        (0, 0),
        "the node reassembled nothing: each fragment crossed the datapath alone"
    );
    let (ipv4, ipv6) = reassemblies(&cluster.outside);
    assert!(
        ipv4 > 0 && ipv6 > 0,
        "the outside client reassembled the answers: {ipv4}, {ipv6}"
    );
}
