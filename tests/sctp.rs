//! SCTP Services: on crafted packets through BPF_PROG_TEST_RUN (CRC32c checked from scratch), and
//! end to end on network namespaces. The lab's kernel has no SCTP module, so pods and clients
//! speak SCTP over raw IP sockets: the packets are still real ones, through the real datapath.
#[macro_use]
mod common;

use lb_userspace::datapath::load_program;
use std::{
    collections::{BTreeMap, BTreeSet},
    mem::MaybeUninit,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{
    Loaded, PinDir, agent, frontend,
    packets::{Endpoint, Family, parse_sctp, sctp, sctp_chunk, sctp_packet, sctp_with_valid_checksums, v6},
    run_on,
    verdict::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
};
use etherparse::{NetHeaders, PacketHeaders, TransportHeader};
use lb_common::{CtEntry, CtKey, IPPROTO_SCTP, Ipv4, Ipv6, Stat, ct_direction, ct_flags, program_names};
use lb_userspace::{
    lab::{self, Lab, NetNs},
    reconcile::{DesiredService, FrontendKey},
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Diameter's port, rewritten to another target port, and SIGTRAN's M3UA port, kept.
const DIAMETER: u16 = 3868;
const DIAMETER_TARGET: u16 = 3869;
const M3UA: u16 = 2905;

/// The addresses of the crafted-packet tests, in each family.
trait Net: Family {
    const CLIENT: Self;
    const CLUSTER_IP: Self;
    const POD_ADDRS: [Self; 3];
    fn conntrack(lb: &Loaded) -> Vec<(CtKey<Self>, CtEntry<Self>)>;
}

impl Net for Ipv4 {
    const CLIENT: Self = [10, 244, 0, 20];
    const CLUSTER_IP: Self = [10, 96, 0, 30];
    const POD_ADDRS: [Self; 3] = [[10, 244, 0, 10], [10, 244, 0, 11], [10, 244, 0, 12]];

    fn conntrack(lb: &Loaded) -> Vec<(CtKey<Self>, CtEntry<Self>)> {
        lb.maps.conntrack.iter().map(Result::unwrap).collect()
    }
}

impl Net for Ipv6 {
    const CLIENT: Self = v6(Ipv4::CLIENT);
    const CLUSTER_IP: Self = v6(Ipv4::CLUSTER_IP);
    const POD_ADDRS: [Self; 3] = [
        v6(Ipv4::POD_ADDRS[0]),
        v6(Ipv4::POD_ADDRS[1]),
        v6(Ipv4::POD_ADDRS[2]),
    ];

    fn conntrack(lb: &Loaded) -> Vec<(CtKey<Self>, CtEntry<Self>)> {
        lb.maps.conntrack6.iter().map(Result::unwrap).collect()
    }
}

for_each_family!(
    an_init_is_dnated_with_its_crc_updated_and_the_answer_comes_from_the_frontend,
    with_port_equal_to_target_port_the_sctp_packet_is_left_as_it_was,
    associations_spread_and_each_keeps_its_backend,
    an_association_keeps_a_backend_that_left_and_a_new_init_is_rebalanced,
    abort_or_shutdown_complete_marks_the_association_closing,
    an_init_to_a_service_without_endpoints_gets_a_port_unreachable,
    truncated_sctp_packets_pass_byte_identical,
);

fn backends<A: Net>(port: u16) -> Vec<Endpoint<A>> {
    A::POD_ADDRS.iter().map(|&addr| (addr, port)).collect()
}

fn cluster_ip(backends: &[Endpoint<impl Net>]) -> DesiredService {
    DesiredService {
        name: "test/sctp".into(),
        cluster_ip: true,
        backends: backends.iter().map(|&backend| backend.into()).collect(),
        ..DesiredService::default()
    }
}

/// CLUSTER_IP:3868/SCTP → pods:3869 and CLUSTER_IP:2905/SCTP → pods:2905, with `pods` of the
/// three.
fn services<A: Net>(pods: &[A]) -> BTreeMap<FrontendKey, DesiredService> {
    let on = |port| pods.iter().map(|&addr| (addr, port)).collect::<Vec<_>>();
    BTreeMap::from([
        (
            frontend(A::CLUSTER_IP, DIAMETER, IPPROTO_SCTP).into(),
            cluster_ip(&on(DIAMETER_TARGET)),
        ),
        (
            frontend(A::CLUSTER_IP, M3UA, IPPROTO_SCTP).into(),
            cluster_ip(&on(M3UA)),
        ),
    ])
}

fn loaded<A: Net>(tag: &str) -> Loaded {
    let mut loaded = Loaded::new(tag);
    loaded.apply(&services(&A::POD_ADDRS));
    for name in [program_names::FROM_POD, program_names::TO_POD] {
        load_program(|| loaded.tc(name).load()).unwrap();
    }
    loaded
}

fn run(lb: &mut Loaded, name: &str, packet: &[u8]) -> (u32, Vec<u8>) {
    run_on(lb.tc(name), name, packet)
}

/// Sends a chunk from `client` to the frontend `port` through `from_pod`: the backend it went
/// to, after checking the source and the chunk are untouched and the CRC32c valid.
fn sent_to<A: Net>(lb: &mut Loaded, client: Endpoint<A>, port: u16, chunk_type: u8) -> Endpoint<A> {
    let (verdict, out) = run(
        lb,
        program_names::FROM_POD,
        &sctp(client, (A::CLUSTER_IP, port), chunk_type, b"hello"),
    );
    assert_eq!(verdict, TC_ACT_OK);
    let (src, backend, chunk) = sctp_with_valid_checksums::<A>(&out);
    assert_eq!((src, chunk), (client, chunk_type), "only the destination changes");
    backend
}

fn an_init_is_dnated_with_its_crc_updated_and_the_answer_comes_from_the_frontend<A: Net>() {
    let mut lb = loaded::<A>("sctp-dnat");
    let client = (A::CLIENT, 40_000);
    let backend = sent_to(&mut lb, client, DIAMETER, sctp_chunk::INIT);
    assert!(
        backends::<A>(DIAMETER_TARGET).contains(&backend),
        "DNATed to a pod's targetPort, got {backend:?}"
    );

    let answer = sctp(backend, client, sctp_chunk::INIT_ACK, b"welcome");
    let (verdict, out) = run(&mut lb, program_names::TO_POD, &answer);
    assert_eq!(verdict, TC_ACT_OK);
    let (src, dst, chunk) = sctp_with_valid_checksums::<A>(&out);
    assert_eq!(
        (src, dst, chunk),
        ((A::CLUSTER_IP, DIAMETER), client, sctp_chunk::INIT_ACK),
        "the answer comes from the frontend the client dialled"
    );
    assert_eq!(lb.maps.stat(Stat::NewFlows).unwrap(), 1);
}

/// Without a port rewrite the CRC32c, which does not cover the addresses, is not touched.
fn with_port_equal_to_target_port_the_sctp_packet_is_left_as_it_was<A: Net>() {
    let mut lb = loaded::<A>("sctp-same-port");
    let init = sctp(
        (A::CLIENT, 40_000),
        (A::CLUSTER_IP, M3UA),
        sctp_chunk::INIT,
        b"hi",
    );
    let (verdict, out) = run(&mut lb, program_names::FROM_POD, &init);
    assert_eq!(verdict, TC_ACT_OK);
    let (_, (backend, port), _) = sctp_with_valid_checksums::<A>(&out);
    assert!(A::POD_ADDRS.contains(&backend) && port == M3UA);
    let sctp_at = out.len() - sctp_packet(0, 0, 0, b"hi").len();
    assert_eq!(
        out[sctp_at..],
        init[sctp_at..],
        "the SCTP packet is byte-identical"
    );
}

fn associations_spread_and_each_keeps_its_backend<A: Net>() {
    let mut lb = loaded::<A>("sctp-spread");
    let mut used = BTreeSet::new();
    for port in 40_000..40_060 {
        let client = (A::CLIENT, port);
        let backend = sent_to(&mut lb, client, DIAMETER, sctp_chunk::INIT);
        for _ in 0..3 {
            assert_eq!(
                sent_to(&mut lb, client, DIAMETER, sctp_chunk::DATA),
                backend,
                "every chunk of an association goes to its backend"
            );
        }
        used.insert(backend);
    }
    assert_eq!(used.len(), 3, "60 associations use every backend: {used:?}");
}

/// As a TCP connection does: the pod finishes what it has, or aborts it; any other pod would
/// abort it for sure.
fn an_association_keeps_a_backend_that_left_and_a_new_init_is_rebalanced<A: Net>() {
    let mut lb = loaded::<A>("sctp-left");
    let client = (A::CLIENT, 40_000);
    let backend = sent_to(&mut lb, client, DIAMETER, sctp_chunk::INIT);
    let staying: Vec<A> = A::POD_ADDRS.into_iter().filter(|&pod| pod != backend.0).collect();
    lb.apply(&services(&staying));

    assert_eq!(
        sent_to(&mut lb, client, DIAMETER, sctp_chunk::DATA),
        backend,
        "the open association stays"
    );
    let again = sent_to(&mut lb, client, DIAMETER, sctp_chunk::INIT);
    assert!(
        staying.contains(&again.0),
        "a new INIT on the tuple goes to a pod still in the service, got {again:?}"
    );
    assert_eq!(lb.maps.stat(Stat::Rebalanced).unwrap(), 1);
}

fn abort_or_shutdown_complete_marks_the_association_closing<A: Net>() {
    let mut lb = loaded::<A>("sctp-close");
    let aborted = (A::CLIENT, 40_000);
    sent_to(&mut lb, aborted, DIAMETER, sctp_chunk::INIT);
    sent_to(&mut lb, aborted, DIAMETER, sctp_chunk::ABORT);
    // Shut down by the pod: its SHUTDOWN COMPLETE is reverse-translated on the way back.
    let shut = (A::CLIENT, 40_001);
    let backend = sent_to(&mut lb, shut, DIAMETER, sctp_chunk::INIT);
    let complete = sctp(backend, shut, sctp_chunk::SHUTDOWN_COMPLETE, b"");
    assert_eq!(run(&mut lb, program_names::TO_POD, &complete).0, TC_ACT_OK);
    let open = (A::CLIENT, 40_002);
    sent_to(&mut lb, open, DIAMETER, sctp_chunk::INIT);
    sent_to(&mut lb, open, DIAMETER, sctp_chunk::DATA);

    let closing = |client: Endpoint<A>, direction: u8| {
        let entries = A::conntrack(&lb);
        let (_, entry) = entries
            .iter()
            .find(|(key, _)| {
                key.direction == direction
                    && if direction == ct_direction::FORWARD {
                        (key.src_addr, key.src_port) == client
                    } else {
                        (key.dst_addr, key.dst_port) == client
                    }
            })
            .unwrap_or_else(|| panic!("no entry of {client:?} in direction {direction}"));
        entry.flags & ct_flags::CLOSING != 0
    };
    assert!(closing(aborted, ct_direction::FORWARD), "ABORT from the client");
    assert!(
        closing(shut, ct_direction::REPLY),
        "SHUTDOWN COMPLETE from the pod"
    );
    assert!(!closing(open, ct_direction::FORWARD), "DATA leaves it open");
}

fn an_init_to_a_service_without_endpoints_gets_a_port_unreachable<A: Net>() {
    let mut lb = loaded::<A>("sctp-refuse");
    lb.apply(&services::<A>(&[]));
    let client = (A::CLIENT, 40_000);
    let init = sctp(client, (A::CLUSTER_IP, DIAMETER), sctp_chunk::INIT, b"hello");
    let (verdict, out) = run(&mut lb, program_names::FROM_POD, &init);
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent back towards the pod");
    let headers = PacketHeaders::from_ethernet_slice(&out).unwrap();
    let (src, dst) = A::addresses(headers.net.as_ref().unwrap()).unwrap();
    assert_eq!((src, dst), (A::CLUSTER_IP, A::CLIENT));
    let unreachable = match (&headers.net, &headers.transport) {
        (Some(NetHeaders::Ipv4(..)), Some(TransportHeader::Icmpv4(icmp))) => {
            icmp.icmp_type
                == etherparse::Icmpv4Type::DestinationUnreachable(
                    etherparse::icmpv4::DestUnreachableHeader::Port,
                )
        }
        (Some(NetHeaders::Ipv6(..)), Some(TransportHeader::Icmpv6(icmp))) => {
            icmp.icmp_type
                == etherparse::Icmpv6Type::DestinationUnreachable(
                    etherparse::icmpv6::DestUnreachableCode::Port,
                )
        }
        other => panic!("not an ICMP error: {other:?}"),
    };
    assert!(unreachable, "a port unreachable: {headers:?}");
    let sctp_header = &init[init.len() - sctp_packet(0, 0, 0, b"hello").len()..][..8];
    let quote = headers.payload.slice();
    assert!(
        quote.windows(8).any(|window| window == sctp_header),
        "it quotes the INIT's ports and tag"
    );

    let data = sctp(client, (A::CLUSTER_IP, DIAMETER), sctp_chunk::DATA, b"late");
    assert_eq!(
        run(&mut lb, program_names::FROM_POD, &data).0,
        TC_ACT_SHOT,
        "a chunk of no association is dropped, not answered"
    );
}

/// An SCTP packet too short for its common header and a chunk header is not ours: it passes
/// to the kernel as it came, at every length.
fn truncated_sctp_packets_pass_byte_identical<A: Net>() {
    let mut lb = loaded::<A>("sctp-truncated");
    let init = sctp(
        (A::CLIENT, 40_000),
        (A::CLUSTER_IP, DIAMETER),
        sctp_chunk::INIT,
        b"",
    );
    let sctp_at = init.len() - 16;
    for len in sctp_at..sctp_at + 16 {
        let mut cut = init[..len].to_vec();
        // The IP header says the packet ends where the frame does.
        let ip_len = len - 14;
        if A::POD_ADDRS[0].as_ref().len() == 4 {
            cut[16..18].copy_from_slice(&(ip_len as u16).to_be_bytes());
            cut[24..26].fill(0);
            let checksum = etherparse::Ipv4HeaderSlice::from_slice(&cut[14..34])
                .unwrap()
                .to_header()
                .calc_header_checksum();
            cut[24..26].copy_from_slice(&checksum.to_be_bytes());
        } else {
            cut[18..20].copy_from_slice(&((ip_len - 40) as u16).to_be_bytes());
        }
        for name in [program_names::FROM_POD, program_names::TO_POD] {
            let (verdict, out) = run(&mut lb, name, &cut);
            assert_eq!(verdict, TC_ACT_OK, "{len} bytes through {name}");
            assert_eq!(out, cut, "{len} bytes through {name} are byte-identical");
        }
    }
    assert_eq!(lb.maps.stat(Stat::NewFlows).unwrap(), 0);
}

// End to end.

const PODS: [(&str, Ipv4Addr); 3] = [
    ("sig-0", Ipv4Addr::new(10, 244, 3, 10)),
    ("sig-1", Ipv4Addr::new(10, 244, 3, 11)),
    ("sig-2", Ipv4Addr::new(10, 244, 3, 12)),
];
const CLIENT: (&str, Ipv4Addr) = ("client", Ipv4Addr::new(10, 244, 3, 20));
const SIG: Ipv4Addr = Ipv4Addr::new(10, 96, 3, 10);
const NOBODY: Ipv4Addr = Ipv4Addr::new(10, 96, 3, 11);
/// How long an answer that should come at once may take on a loaded machine.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Three `app=sig` pods answering SCTP on 3869 and 2905 over raw sockets, a client pod, the
/// dual-stack Service `sig` (3868/SCTP → 3869, 2905/SCTP), Service `nobody` selecting no pod,
/// and the agent in the node namespace.
struct Cluster {
    _agent: Agent,
    _responders: Vec<Responder>,
    _pins: PinDir,
    lab: Lab,
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Cluster {
    fn start(tag: &str) -> (Self, tempfile::TempDir) {
        common::require_root();
        let prefix = format!("{tag}{}", std::process::id() % 100_000);
        let mut lab = Lab::new(&prefix).unwrap();
        let mut responders = Vec::new();
        let mut pods = Vec::new();
        for (name, ip) in PODS {
            let pod = lab.add_pod(name, ip).unwrap();
            for family in [Domain::IPV4, Domain::IPV6] {
                responders.push(Responder::start(&pod.ns, name, family));
            }
            pods.push(lab::pod_manifest(name, ip, &[("app", "sig")], DIAMETER_TARGET));
        }
        lab.add_pod(CLIENT.0, CLIENT.1).unwrap();
        pods.push(lab::pod_manifest(CLIENT.0, CLIENT.1, &[("app", "client")], 1));
        let manifests = tempfile::tempdir().unwrap();
        let ports = [
            ("diameter", "SCTP", DIAMETER, DIAMETER_TARGET),
            ("m3ua", "SCTP", M3UA, M3UA),
        ];
        let services = [
            lab::multi_family_service_manifest(
                "sig",
                &[SIG.into(), lab::ipv6_of(SIG).into()],
                &[("app", "sig")],
                &ports,
            ),
            lab::multi_family_service_manifest(
                "nobody",
                &[NOBODY.into(), lab::ipv6_of(NOBODY).into()],
                &[("app", "nothing")],
                &ports,
            ),
        ];
        agent::write_manifest(manifests.path(), "pods.yaml", &pods.join("---\n"));
        agent::write_manifest(manifests.path(), "services.yaml", &services.join("---\n"));
        let pins = PinDir::new("sbtest", tag);
        let agent = Agent(agent::spawn(
            &lab,
            manifests.path(),
            pins.path(),
            Stdio::inherit(),
            &[],
        ));
        agent::wait_until_attached(&lab, pins.path(), None);
        let cluster = Self {
            _agent: agent,
            _responders: responders,
            _pins: pins,
            lab,
        };
        for addr in cluster.sig() {
            agent::wait_until(&format!("SCTP answers from {addr}"), || {
                cluster.associate(addr, DIAMETER, 39_999).is_ok()
            });
        }
        (cluster, manifests)
    }

    /// Service `sig`'s ClusterIPs.
    fn sig(&self) -> [IpAddr; 2] {
        [SIG.into(), lab::ipv6_of(SIG).into()]
    }

    fn client(&self) -> &NetNs {
        &self.lab.pod(CLIENT.0).ns
    }

    /// An INIT from the client's `src_port` to `addr:port`, and what the INIT ACK back says.
    fn associate(&self, addr: IpAddr, port: u16, src_port: u16) -> anyhow::Result<Answer> {
        let socket = raw_socket(self.client(), domain(addr), IPPROTO_SCTP)?;
        let init = sctp_packet(src_port, port, sctp_chunk::INIT, b"");
        socket.send_to(&init, &SocketAddr::new(addr, 0).into())?;
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            let Some((from, packet)) = receive(&socket, domain(addr))? else {
                continue;
            };
            let (src, dst, chunk, value) = parse_sctp(&packet);
            if dst != src_port || chunk != sctp_chunk::INIT_ACK {
                continue;
            }
            let value = String::from_utf8(value)?;
            let words: Vec<&str> = value.trim_end_matches('\0').split(' ').collect();
            let [pod, peer, pod_port] = words[..] else {
                anyhow::bail!("unexpected answer {value:?}");
            };
            return Ok(Answer {
                from: SocketAddr::new(from, src),
                pod: pod.to_owned(),
                peer: peer.parse()?,
                pod_port: pod_port.parse()?,
            });
        }
        anyhow::bail!("no INIT ACK from {addr}:{port} within {TIMEOUT:?}")
    }
}

/// What the client saw of an INIT ACK: where it came from, and what the pod said it saw.
#[derive(Debug)]
struct Answer {
    from: SocketAddr,
    pod: String,
    /// The client address the pod saw.
    peer: IpAddr,
    /// The port the INIT reached the pod on.
    pod_port: u16,
}

fn domain(addr: IpAddr) -> Domain {
    if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    }
}

fn raw_socket(ns: &NetNs, domain: Domain, protocol: u8) -> anyhow::Result<Socket> {
    let socket =
        ns.run(move || Socket::new(domain, Type::RAW, Some(Protocol::from(i32::from(protocol)))))??;
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    Ok(socket)
}

/// One packet from a raw socket: its source and its payload after the IP header (which only an
/// IPv4 raw socket hands over). `None` when nothing came in time.
fn receive(socket: &Socket, domain: Domain) -> anyhow::Result<Option<(IpAddr, Vec<u8>)>> {
    let mut buffer = [MaybeUninit::<u8>::uninit(); 2048];
    let (len, from) = match socket.recv_from(&mut buffer) {
        Ok(received) => received,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    // SAFETY: the kernel wrote the first `len` bytes.
    let packet: Vec<u8> = buffer[..len]
        .iter()
        .map(|byte| unsafe { byte.assume_init() })
        .collect();
    let from = from
        .as_socket()
        .map(|addr| addr.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let payload = if domain == Domain::IPV4 {
        packet[usize::from(packet[0] & 0x0f) * 4..].to_vec()
    } else {
        packet
    };
    Ok(Some((from, payload)))
}

/// A pod's SCTP endpoint over a raw socket: answers every INIT with an INIT ACK carrying
/// `<pod> <client address> <port it arrived on>`, and checks every packet's CRC32c first.
struct Responder(Arc<AtomicBool>);

impl Responder {
    fn start(ns: &NetNs, pod: &str, domain: Domain) -> Self {
        let socket = raw_socket(ns, domain, IPPROTO_SCTP).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (stopped, pod) = (stop.clone(), pod.to_owned());
        std::thread::spawn(move || {
            while !stopped.load(Ordering::SeqCst) {
                let Ok(Some((peer, packet))) = receive(&socket, domain) else {
                    continue;
                };
                // A bad CRC would panic here and the client would see no answer.
                let (src, dst, chunk, _) = parse_sctp(&packet);
                if chunk == sctp_chunk::INIT {
                    let said = format!("{pod} {peer} {dst}");
                    let answer = sctp_packet(dst, src, sctp_chunk::INIT_ACK, said.as_bytes());
                    let _ = socket.send_to(&answer, &SockAddr::from(SocketAddr::new(peer, 0)));
                }
            }
        });
        Self(stop)
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Both ClusterIPs of a dual-stack SCTP Service: every association answered by a pod of the
/// Service through the port rewrite, the answer from the ClusterIP and port the client dialled,
/// the client's own address seen by the pod, and every pod used.
#[test]
fn sctp_associations_through_both_cluster_ips_reach_every_pod() {
    let (cluster, _manifests) = Cluster::start("sctp");
    for addr in cluster.sig() {
        let client: IpAddr = if addr.is_ipv4() {
            CLIENT.1.into()
        } else {
            lab::ipv6_of(CLIENT.1).into()
        };
        let mut pods = BTreeSet::new();
        for src_port in 40_000..40_030 {
            for (port, target) in [(DIAMETER, DIAMETER_TARGET), (M3UA, M3UA)] {
                let answer = cluster.associate(addr, port, src_port).unwrap();
                assert_eq!(answer.from, SocketAddr::new(addr, port), "{answer:?}");
                assert_eq!((answer.peer, answer.pod_port), (client, target), "{answer:?}");
                pods.insert(answer.pod);
            }
        }
        assert_eq!(pods.len(), 3, "60 associations to {addr} use every pod: {pods:?}");
    }
}

/// A Service without endpoints answers an INIT with a port unreachable from its ClusterIP, at
/// once.
#[test]
fn an_sctp_service_without_endpoints_answers_with_a_port_unreachable() {
    let (cluster, _manifests) = Cluster::start("sctpr");
    for addr in [IpAddr::from(NOBODY), lab::ipv6_of(NOBODY).into()] {
        let (icmp, port_unreachable) = if addr.is_ipv4() { (1, [3, 3]) } else { (58, [1, 4]) };
        let errors = raw_socket(cluster.client(), domain(addr), icmp).unwrap();
        let socket = raw_socket(cluster.client(), domain(addr), IPPROTO_SCTP).unwrap();
        let init = sctp_packet(41_000, DIAMETER, sctp_chunk::INIT, b"");
        let sent = Instant::now();
        socket.send_to(&init, &SocketAddr::new(addr, 0).into()).unwrap();
        let refused = loop {
            assert!(sent.elapsed() < TIMEOUT, "no port unreachable from {addr}");
            if let Some((from, message)) = receive(&errors, domain(addr)).unwrap()
                && message[..2] == port_unreachable
                && message.windows(8).any(|window| window == &init[..8])
            {
                break from;
            }
        };
        assert_eq!(refused, addr, "refused by the ClusterIP");
        assert!(sent.elapsed() < Duration::from_millis(100), "refused at once");
    }
}
