//! IPv6 and dual-stack Services end to end on network namespaces, as `netns.rs` does for IPv4:
//! the real `switchboard` binary in a node namespace, dual-stack pods with real TCP and UDP
//! servers, and clients dialling IPv6 ClusterIPs (and IPv4 ones from IPv6 sockets).
mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    process::{Child, Stdio},
    time::Duration,
};

use common::{PinDir, agent, require_root};
use lb_common::{IPPROTO_TCP, IPPROTO_UDP};
use lb_userspace::{
    datapath::maps::ServiceMaps,
    lab::{self, Lab, SliceEndpoint, servers},
    reconcile::FrontendKey,
};

/// `web6`, IPv6 only: fd00:10:96::10.
const WEB: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);
/// `nobody6`, whose selector matches no pod: fd00:10:96::11.
const NOBODY: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x11);
/// `sticky6`, with `sessionAffinity: ClientIP`: fd00:10:96::12.
const STICKY: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x12);
/// `dual`, RequireDualStack: 10.96.0.20 and fd00:10:96::20.
const DUAL4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const DUAL6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x20);
const PODS: [(&str, Ipv4Addr); 3] = [
    ("web-0", Ipv4Addr::new(10, 244, 1, 10)),
    ("web-1", Ipv4Addr::new(10, 244, 1, 11)),
    ("web-2", Ipv4Addr::new(10, 244, 1, 12)),
];
const CLIENT: (&str, Ipv4Addr) = ("client", Ipv4Addr::new(10, 244, 1, 20));
/// Every Service's ports: 80/TCP → 3000 (HTTP) and 53/UDP → 5353.
const PORTS: [(&str, &str, u16, u16); 2] = [("http", "TCP", 80, 3000), ("dns", "UDP", 53, 5353)];
const SLICE_PORTS: [(&str, &str, u16); 2] = [("http", "TCP", 3000), ("dns", "UDP", 5353)];
/// How long an answer that should come at once may take on a loaded machine.
const TIMEOUT: Duration = Duration::from_secs(10);
/// The node's own global IPv6 address (on its loopback): fd00:1::1.
const NODE: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x1, 0, 0, 0, 0, 0, 0x1);
/// The node's address on the link to the outside client, and the client's: fd00:50::2 and
/// fd00:50::100.
const NODE_OUTSIDE: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 0x2);
const OUTSIDE: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 0x100);
/// `edge6`, an IPv6 NodePort Service: 30080/TCP → 3000 and 30053/UDP → 5353 on the web pods.
const EDGE: &str = "apiVersion: v1
kind: Service
metadata: {name: edge6, namespace: default}
spec:
  type: NodePort
  clusterIP: \"fd00:10:96::30\"
  clusterIPs: [\"fd00:10:96::30\"]
  ipFamilies: [IPv6]
  ipFamilyPolicy: SingleStack
  selector: {app: web}
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: 3000, nodePort: 30080}
  - {name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30053}
";

/// A lab of three dual-stack `app=web` pods serving HTTP on 3000 and UDP on 5353 (both
/// families), a client pod, the Services above and the agent in the node namespace.
struct Cluster {
    agent: Child,
    http: Vec<servers::Server>,
    udp: Vec<servers::Server>,
    manifests: tempfile::TempDir,
    pins: PinDir,
    /// The outside client's namespace, when the lab has one.
    outside: Option<lab::NetNs>,
    lab: Lab,
}

impl Cluster {
    /// Endpoints from the pods' labels and `podIPs`.
    fn start(tag: &str) -> Self {
        let cluster = Self::start_with(tag, &[], false);
        for service in [IpAddr::from(WEB), DUAL4.into(), DUAL6.into(), STICKY.into()] {
            cluster.wait_for_backends(service, 3);
        }
        cluster.wait_for_backends(NOBODY, 0);
        cluster
    }

    /// Endpoints from EndpointSlices, which each test writes: none yet.
    fn start_on_slices(tag: &str) -> Self {
        Self::start_with(tag, &["--endpoints-from", "slices"], false)
    }

    /// With an outside client namespace on a link to the node's external interface, IPv6 only:
    /// the node is [`NODE_OUTSIDE`] there, the client [`OUTSIDE`].
    fn start_with_outside(tag: &str) -> Self {
        Self::start_with(tag, &[], true)
    }

    fn start_with(tag: &str, agent_args: &[&str], with_outside: bool) -> Self {
        require_root();
        let prefix = format!("{tag}{}", std::process::id() % 100_000);
        let mut lab = Lab::new(&prefix).unwrap();
        // A node has a global IPv6 address (its InternalIP). With only the gateway's fe80::1, its
        // own sockets would speak link-local, and a pod answers a link-local peer from its own
        // link-local address, which no backend has: the node's datagrams would come back from
        // an address no service translation knows.
        lab.node
            .ip(&["addr", "add", &format!("{NODE}/128"), "dev", "lo", "nodad"])
            .unwrap();
        let manifests = tempfile::tempdir().unwrap();
        let (mut http, mut udp) = (Vec::new(), Vec::new());
        let mut pods = Vec::new();
        for (name, ip) in PODS {
            let ns = &lab.add_pod(name, ip).unwrap().ns;
            http.push(servers::http_server(ns, name, 3000).unwrap());
            udp.push(servers::udp_server(ns, name, 5353).unwrap());
            pods.push(lab::pod_manifest(name, ip, &[("app", "web")], 3000));
        }
        lab.add_pod(CLIENT.0, CLIENT.1).unwrap();
        pods.push(lab::pod_manifest(CLIENT.0, CLIENT.1, &[("app", "client")], 3000));
        agent::write_manifest(manifests.path(), "pods.yaml", &pods.join("---\n"));
        let web = [("app", "web")];
        let services = [
            lab::multi_family_service_manifest("web6", &[WEB.into()], &web, &PORTS),
            lab::multi_family_service_manifest("nobody6", &[NOBODY.into()], &[("app", "nothing")], &PORTS),
            lab::multi_family_service_manifest("sticky6", &[STICKY.into()], &web, &PORTS).replace(
                "  type: ClusterIP\n",
                "  type: ClusterIP\n  sessionAffinity: ClientIP\n",
            ),
            lab::multi_family_service_manifest("dual", &[DUAL4.into(), DUAL6.into()], &web, &PORTS),
        ];
        agent::write_manifest(manifests.path(), "services.yaml", &services.join("---\n"));
        let mut agent_args = agent_args.to_vec();
        let external = format!("{prefix}-ext");
        let outside = with_outside.then(|| {
            agent_args.extend(["--external-interfaces", &external]);
            plug_outside(&lab, &external)
        });
        let pins = PinDir::new("sbtest", tag);
        let agent = agent::spawn(&lab, manifests.path(), pins.path(), Stdio::inherit(), &agent_args);
        agent::wait_until_attached(&lab, pins.path(), with_outside.then_some(external.as_str()));
        Self {
            agent,
            http,
            udp,
            manifests,
            pins,
            outside,
            lab,
        }
    }

    fn client(&self) -> &lab::NetNs {
        &self.lab.pod(CLIENT.0).ns
    }

    /// Waits until both frontends of the ClusterIP `addr` (80/TCP, 53/UDP) have `count` backends
    /// in the kernel's maps.
    fn wait_for_backends(&self, addr: impl Into<IpAddr>, count: u32) {
        let addr = addr.into();
        self.wait_for_frontends(&[(addr, 80, IPPROTO_TCP), (addr, 53, IPPROTO_UDP)], count);
    }

    /// Waits until each of `frontends` (address, port, protocol) has `count` backends in the
    /// kernel's maps.
    fn wait_for_frontends(&self, frontends: &[(IpAddr, u16, u8)], count: u32) {
        agent::wait_until(&format!("{count} backends behind {frontends:?}"), || {
            let Ok(maps) = ServiceMaps::open(self.pins.path()) else {
                return false;
            };
            frontends.iter().all(|&(addr, port, proto)| {
                let key = FrontendKey { addr, port, proto };
                maps.service(&key)
                    .is_some_and(|info| info.backends.count == count)
            })
        });
    }

    /// How many requests each pod's servers in `servers` answered.
    fn answered(servers: &[servers::Server]) -> BTreeMap<String, usize> {
        servers.iter().map(|s| (s.pod.clone(), s.answered())).collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.agent.kill();
        let _ = self.agent.wait();
    }
}

/// A namespace outside the node, linked to its interface `external`: the node has
/// [`NODE_OUTSIDE`] on it, the namespace [`OUTSIDE`].
fn plug_outside(lab: &Lab, external: &str) -> lab::NetNs {
    let outside = lab::NetNs::create(&format!("{}-out", lab.prefix)).unwrap();
    lab.node.add_veth(external, &outside, "eth0").unwrap();
    // No duplicate address detection, so the addresses work at once.
    for (ns, interface, address) in [(&lab.node, external, NODE_OUTSIDE), (&outside, "eth0", OUTSIDE)] {
        ns.ip(&["addr", "add", &format!("{address}/64"), "dev", interface, "nodad"])
            .unwrap();
        ns.ip(&["link", "set", interface, "up"]).unwrap();
    }
    outside
}

/// Writes `service`'s EndpointSlice of the family of `endpoints` (one file per family).
fn write_slice(dir: &Path, service: &str, endpoints: &[SliceEndpoint<'_>]) {
    let family = if endpoints[0].ip.is_ipv4() { "v4" } else { "v6" };
    let slice = lab::endpoint_slice_manifest(service, &SLICE_PORTS, endpoints);
    agent::write_manifest(dir, &format!("{service}-{family}-slice.yaml"), &slice);
}

/// The three web pods, ready, as IPv4 endpoints.
fn ready4() -> Vec<SliceEndpoint<'static>> {
    PODS.iter()
        .map(|&(name, ip)| SliceEndpoint::ready(name, ip))
        .collect()
}

/// The three web pods, ready, as IPv6 endpoints.
fn ready6() -> Vec<SliceEndpoint<'static>> {
    PODS.iter()
        .map(|&(name, ip)| SliceEndpoint::ready(name, lab::ipv6_of(ip)))
        .collect()
}

/// The IPv6 address of a pod of the lab.
fn ipv6_of_pod(pod: (&str, Ipv4Addr)) -> IpAddr {
    lab::ipv6_of(pod.1).into()
}

/// How many of `replies` each pod gave.
fn count_by_pod(replies: impl IntoIterator<Item = servers::Reply>) -> BTreeMap<String, usize> {
    let mut by_pod = BTreeMap::new();
    for reply in replies {
        *by_pod.entry(reply.pod).or_default() += 1;
    }
    by_pod
}

/// `count` HTTP GETs from `client` to `addr:port`, each asserted to come back from `addr:port`.
fn http_gets(client: &lab::NetNs, addr: impl Into<IpAddr>, port: u16, count: usize) -> Vec<servers::Reply> {
    let service = SocketAddr::new(addr.into(), port);
    (0..count)
        .map(|i| {
            let reply = servers::http_get(client, service.ip(), port, TIMEOUT)
                .unwrap_or_else(|e| panic!("connection {i} to {service}: {e:#}"));
            assert_eq!(reply.from, service, "the reply comes from the service");
            reply
        })
        .collect()
}

/// `count` UDP requests (each from a new socket) from `client` to `addr:port`, each asserted to
/// be answered from `addr:port`.
fn udp_requests(
    client: &lab::NetNs,
    addr: impl Into<IpAddr>,
    port: u16,
    count: usize,
) -> Vec<servers::Reply> {
    let service = SocketAddr::new(addr.into(), port);
    (0..count)
        .map(|i| {
            let reply = servers::udp_request(client, service.ip(), port, TIMEOUT)
                .unwrap_or_else(|e| panic!("request {i} to {service}: {e:#}"));
            assert_eq!(reply.from, service, "the answer comes from the service");
            reply
        })
        .collect()
}

#[test]
fn tcp_connections_to_an_ipv6_cluster_ip_reach_every_pod_with_the_client_address() {
    let cluster = Cluster::start("d6t");
    // The servers listen on 3000 only: an answer proves port 80 was rewritten to the targetPort.
    let by_pod = count_by_pod(http_gets(cluster.client(), WEB, 80, 60));
    assert_eq!(by_pod.len(), 3, "every pod answered at least once: {by_pod:?}");
    assert_eq!(
        Cluster::answered(&cluster.http),
        by_pod,
        "the servers saw exactly the connections the client made"
    );
    for server in &cluster.http {
        assert_eq!(
            server.clients(),
            BTreeSet::from([ipv6_of_pod(CLIENT)]),
            "{} sees the client's own address",
            server.pod
        );
    }
}

#[test]
fn udp_requests_to_an_ipv6_cluster_ip_reach_every_pod_with_the_client_address() {
    let cluster = Cluster::start("d6u");
    let by_pod = count_by_pod(udp_requests(cluster.client(), WEB, 53, 60));
    assert_eq!(by_pod.len(), 3, "every pod answered at least once: {by_pod:?}");
    assert_eq!(Cluster::answered(&cluster.udp), by_pod);
    for server in &cluster.udp {
        assert_eq!(
            server.clients(),
            BTreeSet::from([ipv6_of_pod(CLIENT)]),
            "{} sees the client's own address",
            server.pod
        );
    }
}

/// Each ClusterIP of a dual-stack Service balances over its own family's EndpointSlice: a pod
/// left out of the IPv6 slice gets no more IPv6 connections, and still its IPv4 ones.
#[test]
fn each_cluster_ip_of_a_dual_stack_service_balances_over_its_own_family() {
    let cluster = Cluster::start_on_slices("d6d");
    write_slice(cluster.manifests.path(), "dual", &ready4());
    write_slice(cluster.manifests.path(), "dual", &ready6());
    cluster.wait_for_backends(DUAL4, 3);
    cluster.wait_for_backends(DUAL6, 3);
    let client = cluster.client();
    for (addr, client_addr) in [
        (IpAddr::from(DUAL4), IpAddr::from(CLIENT.1)),
        (DUAL6.into(), ipv6_of_pod(CLIENT)),
    ] {
        let by_pod = count_by_pod(http_gets(client, addr, 80, 60));
        assert_eq!(by_pod.len(), 3, "{addr} reaches every pod: {by_pod:?}");
        let udp = count_by_pod(udp_requests(client, addr, 53, 60));
        assert_eq!(udp.len(), 3, "{addr} reaches every pod over UDP: {udp:?}");
        for server in cluster.http.iter().chain(&cluster.udp) {
            assert!(
                server.clients().contains(&client_addr),
                "{} was reached over {addr}'s family",
                server.pod
            );
        }
    }

    let (left_out, _) = PODS[2];
    let others: Vec<_> = PODS[..2]
        .iter()
        .map(|&(name, ip)| SliceEndpoint::ready(name, lab::ipv6_of(ip)))
        .collect();
    write_slice(cluster.manifests.path(), "dual", &others);
    cluster.wait_for_backends(DUAL6, 2);
    let http6 = count_by_pod(http_gets(client, DUAL6, 80, 60));
    let udp6 = count_by_pod(udp_requests(client, DUAL6, 53, 60));
    assert!(
        !http6.contains_key(left_out) && !udp6.contains_key(left_out),
        "{left_out}, out of the IPv6 slice, got IPv6 traffic: {http6:?} {udp6:?}"
    );
    assert_eq!((http6.len(), udp6.len()), (2, 2), "the other two share it");
    cluster.wait_for_backends(DUAL4, 3);
    let http4 = count_by_pod(http_gets(client, DUAL4, 80, 60));
    let udp4 = count_by_pod(udp_requests(client, DUAL4, 53, 60));
    assert!(
        http4.contains_key(left_out) && udp4.contains_key(left_out),
        "{left_out} still gets IPv4 traffic: {http4:?} {udp4:?}"
    );
}

#[test]
fn an_ipv6_service_without_endpoints_refuses_at_once() {
    let cluster = Cluster::start("d6n");
    common::assert_tcp_refused_at_once(cluster.client(), (NOBODY, 80).into());
    common::assert_udp_refused(cluster.client(), (NOBODY, 53).into());
    let answered: usize = cluster
        .http
        .iter()
        .chain(&cluster.udp)
        .map(servers::Server::answered)
        .sum();
    assert_eq!(answered, 0, "no pod answered");
}

/// An IPv6 ClusterIP on a port (or protocol) its Service does not define: refused at once, as
/// a closed port would be, while its defined ports work.
#[test]
fn an_ipv6_cluster_ip_on_a_port_its_service_does_not_define_refuses_at_once() {
    let cluster = Cluster::start("d6p");
    common::assert_tcp_refused_at_once(cluster.client(), (WEB, 81).into());
    // 80 is the Service's port for TCP only.
    common::assert_udp_refused(cluster.client(), (WEB, 80).into());
    http_gets(cluster.client(), WEB, 80, 1);
    udp_requests(cluster.client(), WEB, 53, 1);
}

/// sessionAffinity ClientIP over IPv6: 50 connections of one client all reach one pod.
#[test]
fn with_client_ip_affinity_every_ipv6_connection_of_a_client_reaches_one_pod() {
    let cluster = Cluster::start("d6a");
    let pods: BTreeSet<String> = http_gets(cluster.client(), STICKY, 80, 50)
        .into_iter()
        .map(|reply| reply.pod)
        .collect();
    assert_eq!(
        pods.len(),
        1,
        "all connections of the client reached one pod: {pods:?}"
    );
}

/// A pod reaching itself through its own IPv6 Service sees the connection come from the IPv6
/// hairpin address (its own would be a martian); the other pods see the pod's address.
#[test]
fn a_pod_reaches_itself_through_its_own_ipv6_service_from_the_hairpin_address() {
    let cluster = Cluster::start("d6h");
    let (name, _) = PODS[0];
    let pod = &cluster.lab.pod(name).ns;
    let hairpin = IpAddr::from(Ipv6Addr::from(lb_common::HAIRPIN_ADDR6));
    let tcp = count_by_pod(http_gets(pod, WEB, 80, 60));
    let udp = count_by_pod(udp_requests(pod, WEB, 53, 60));
    assert!(
        tcp.contains_key(name) && udp.contains_key(name),
        "the pod itself answered some of 60 connections and 60 datagrams: {tcp:?} {udp:?}"
    );
    for server in cluster.http.iter().chain(&cluster.udp) {
        let expected = if server.pod == name {
            hairpin
        } else {
            ipv6_of_pod(PODS[0])
        };
        if server.answered() > 0 {
            assert_eq!(
                server.clients(),
                BTreeSet::from([expected]),
                "what {} saw",
                server.pod
            );
        }
    }
}

/// Processes of the node itself (its namespace: socket-level translation at connect() and
/// sendmsg()) reach IPv6 ClusterIPs, balanced, and see the service as their peer; an IPv4
/// ClusterIP dialled as `::ffff:a.b.c.d` from an IPv6 socket works too. The pods see the
/// node's own addresses.
#[test]
fn the_node_reaches_ipv6_cluster_ips_and_ipv4_ones_through_mapped_addresses() {
    let cluster = Cluster::start("d6s");
    let node = &cluster.lab.node;
    for addr in [IpAddr::from(WEB), DUAL4.to_ipv6_mapped().into()] {
        let tcp = count_by_pod(http_gets(node, addr, 80, 60));
        let udp = count_by_pod(udp_requests(node, addr, 53, 60));
        assert_eq!(
            (tcp.len(), udp.len()),
            (3, 3),
            "{addr} is balanced: {tcp:?} {udp:?}"
        );
    }
    // Nothing masquerades the node: the pods see its own addresses (the IPv4 one is the
    // gateway's, the only one it has).
    let node_addresses = BTreeSet::from([IpAddr::from(NODE), lab::GATEWAY.into()]);
    for server in cluster.http.iter().chain(&cluster.udp) {
        assert_eq!(server.clients(), node_addresses, "what {} saw", server.pod);
    }
}

/// The kube-proxy stale-conntrack failure, over IPv6: a DNS-like client always sending from the
/// same socket keeps getting answers while its backend terminates, is replaced and stops.
/// An IPv6 UDP client whose pod's port closed hears "connection refused": the pod's ICMPv6
/// port unreachable reaches its socket translated back to the ClusterIP.
#[test]
fn an_ipv6_udp_client_hears_connection_refused_when_its_pods_port_closes() {
    let mut cluster = Cluster::start("d6i");
    let flow = servers::UdpFlow::connect(cluster.client(), SocketAddr::from((WEB, 53)), TIMEOUT).unwrap();
    let pod = flow.ask().expect("answered");
    let index = PODS.iter().position(|(name, _)| *name == pod).unwrap();
    // The server's socket is closed once the drop returns.
    drop(cluster.udp.remove(index));
    let error = flow
        .ask_retrying(3)
        .expect_err("nothing listens on the pod's port any more");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused, "{error}");
}

#[test]
fn an_ipv6_udp_client_keeps_getting_answers_while_its_backend_is_replaced() {
    let mut cluster = Cluster::start_on_slices("d6q");
    write_slice(cluster.manifests.path(), "web6", &ready6());
    cluster.wait_for_backends(WEB, 3);
    let flow = servers::UdpFlow::connect(cluster.client(), SocketAddr::from((WEB, 53)), TIMEOUT).unwrap();
    let ask = || flow.ask().expect("every query is answered");
    let old = ask();
    let old_index = PODS.iter().position(|(name, _)| *name == old).unwrap();
    let with_old_terminating = PODS.map(|(name, ip)| {
        let endpoint = if name == old {
            SliceEndpoint::terminating
        } else {
            SliceEndpoint::ready
        };
        endpoint(name, lab::ipv6_of(ip))
    });
    write_slice(cluster.manifests.path(), "web6", &with_old_terminating);
    cluster.wait_for_backends(WEB, 2);
    for _ in 0..5 {
        assert_eq!(ask(), old, "a terminating pod still answers its client");
    }

    // Replaced: a new pod is ready and the old one leaves the slice, then stops.
    let new = ("web-3", Ipv4Addr::new(10, 244, 1, 13));
    let ns = &cluster.lab.add_pod(new.0, new.1).unwrap().ns;
    let _new_server = servers::udp_server(ns, new.0, 5353).unwrap();
    let mut endpoints: Vec<_> = PODS
        .iter()
        .filter(|(name, _)| *name != old)
        .map(|&(name, ip)| SliceEndpoint::ready(name, lab::ipv6_of(ip)))
        .collect();
    endpoints.push(SliceEndpoint::ready(new.0, lab::ipv6_of(new.1)));
    write_slice(cluster.manifests.path(), "web6", &endpoints);
    cluster.wait_for_backends(WEB, 3);
    let old_ip = lab::ipv6_of(PODS[old_index].1).octets();
    agent::wait_until("the old pod's removal", || {
        ServiceMaps::open(cluster.pins.path()).is_ok_and(|maps| {
            maps.backends6
                .iter()
                .filter_map(Result::ok)
                .all(|(_, backend)| backend.addr != old_ip)
        })
    });
    // The old pod's socket is closed once the drop returns: a query sent there now would be
    // refused, not answered.
    drop(cluster.udp.remove(old_index));
    for _ in 0..10 {
        assert_ne!(ask(), old, "the client moved to a live pod");
    }
}

/// An IPv6 NodePort from a client outside the node, end to end: DNAT at the external interface,
/// the reply translated back, every pod used; the local pods see the client's own address.
#[test]
fn an_outside_client_reaches_every_pod_through_an_ipv6_node_port() {
    let cluster = Cluster::start_with_outside("d6x");
    agent::write_manifest(cluster.manifests.path(), "edge.yaml", EDGE);
    let any = IpAddr::from(Ipv6Addr::UNSPECIFIED);
    cluster.wait_for_frontends(&[(any, 30080, IPPROTO_TCP), (any, 30053, IPPROTO_UDP)], 3);
    let outside = cluster.outside.as_ref().expect("the lab has an outside client");
    let tcp = count_by_pod(http_gets(outside, NODE_OUTSIDE, 30080, 60));
    let udp = count_by_pod(udp_requests(outside, NODE_OUTSIDE, 30053, 60));
    assert_eq!(
        (tcp.len(), udp.len()),
        (3, 3),
        "every pod answered: {tcp:?} {udp:?}"
    );
    for server in cluster.http.iter().chain(&cluster.udp) {
        assert_eq!(
            server.clients(),
            BTreeSet::from([IpAddr::from(OUTSIDE)]),
            "{} sees the outside client's own address",
            server.pod
        );
    }
}
