//! Traffic from outside the cluster, end to end on network namespaces: two nodes, each running
//! the real agent with pods of its own, and an external client, all on one LAN (a bridge). The
//! client dials NodePorts on either node, a LoadBalancer IP and an externalIP routed to node A.
mod common;

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{PinDir, require_root};
use lb_common::{IPPROTO_TCP, ServiceKey};
use lb_userspace::{
    datapath::maps::ServiceMaps,
    lab::{self, Lab, NetNs, servers},
};

const NODE_A: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
const NODE_B: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 3);
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 100);
const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 7);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 8);
/// `solo`'s LoadBalancer IP, routed to node B (which has no `solo` pod).
const SOLO_LB_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 9);
const SOLO_NODE_PORT: u16 = 30_081;
const POD_A: (&str, Ipv4Addr) = ("web-a", Ipv4Addr::new(10, 244, 1, 10));
const POD_B: (&str, Ipv4Addr) = ("web-b", Ipv4Addr::new(10, 244, 2, 10));
/// `web`: externalTrafficPolicy Cluster, HTTP on NodePort 30080 and the LB and external IPs.
const WEB_NODE_PORT: u16 = 30_080;
/// `local`: externalTrafficPolicy Local, UDP on NodePort 30053.
const LOCAL_NODE_PORT: u16 = 30_053;
/// How long an answer that should come at once may take on a loaded machine.
const TIMEOUT: Duration = Duration::from_secs(10);

const SERVICES: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  externalIPs: [192.168.60.8]
  selector: {app: web}
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 3000, nodePort: 30080}]
status:
  loadBalancer:
    ingress: [{ip: 192.168.60.7}]
---
apiVersion: v1
kind: Service
metadata: {name: local, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.11
  externalTrafficPolicy: Local
  selector: {app: web}
  ports: [{name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30053}]
---
apiVersion: v1
kind: Service
metadata: {name: solo, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.12
  externalTrafficPolicy: Local
  healthCheckNodePort: 32001
  selector: {side: a}
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 3000, nodePort: 30081}]
status:
  loadBalancer:
    ingress: [{ip: 192.168.60.9}]
";
/// `solo`'s health check port: only node A has a `solo` pod.
const SOLO_HEALTH_CHECK: u16 = 32_001;

/// One node: its namespace and pod (a [`Lab`]), its LAN interface, and its agent.
struct Node {
    lab: Lab,
    agent: Child,
    pins: PinDir,
    external: String,
    name: String,
    _servers: Vec<servers::Server>,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.agent.kill();
        let _ = self.agent.wait();
    }
}

struct Cluster {
    // Dropped first: the agents stop before their namespaces go.
    nodes: Vec<Node>,
    client: NetNs,
    _lan: NetNs,
    manifests: tempfile::TempDir,
}

impl Cluster {
    fn start(tag: &str) -> Self {
        require_root();
        let id = std::process::id() % 100_000;
        let lan = NetNs::create(&format!("{tag}{id}-lan")).unwrap();
        lan.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
        lan.ip(&["link", "set", "br0", "up"]).unwrap();
        let client = NetNs::create(&format!("{tag}{id}-cli")).unwrap();
        plug(&lan, &client, "eth0", &format!("{tag}{id}c"), CLIENT);
        for (vip, node) in [(LB_IP, NODE_A), (EXTERNAL_IP, NODE_A), (SOLO_LB_IP, NODE_B)] {
            client
                .ip(&["route", "add", &format!("{vip}/32"), "via", &node.to_string()])
                .unwrap();
        }

        let manifests = tempfile::tempdir().unwrap();
        std::fs::write(manifests.path().join("services.yaml"), SERVICES).unwrap();
        let mut pods = Vec::new();
        let mut nodes = Vec::new();
        let sides = [
            ("a", NODE_A, POD_A, NODE_B, POD_B),
            ("b", NODE_B, POD_B, NODE_A, POD_A),
        ];
        for (side, address, (pod, pod_ip), peer, (_, peer_pod_ip)) in sides {
            let prefix = format!("{tag}{side}{id}");
            let mut lab = Lab::new(&prefix).unwrap();
            let ns = &lab.add_pod(pod, pod_ip).unwrap().ns;
            let servers = vec![
                servers::http_server(ns, pod, 3000).unwrap(),
                servers::udp_peer_server(ns, pod, 5353).unwrap(),
            ];
            let external = format!("{prefix}-ext");
            plug(&lan, &lab.node, &external, &format!("{prefix}l"), address);
            lab.node
                .ip(&[
                    "route",
                    "add",
                    &format!("{peer_pod_ip}/32"),
                    "via",
                    &peer.to_string(),
                ])
                .unwrap();
            let manifest = lab::pod_manifest(pod, pod_ip, &[("app", "web"), ("side", side)], 3000);
            pods.push(manifest.replace("spec:\n", &format!("spec:\n  nodeName: node-{side}\n")));
            let pins = PinDir::new("sbtest", &format!("ext-{tag}{side}"));
            let agent = spawn_agent(
                &lab,
                &external,
                &format!("node-{side}"),
                manifests.path(),
                pins.path(),
            );
            nodes.push(Node {
                lab,
                agent,
                pins,
                external,
                name: format!("node-{side}"),
                _servers: servers,
            });
        }
        std::fs::write(manifests.path().join("pods.yaml"), pods.join("---\n")).unwrap();
        let cluster = Self {
            nodes,
            client,
            _lan: lan,
            manifests,
        };
        for node in &cluster.nodes {
            common::agent::wait_until_attached(&node.lab, node.pins.path(), Some(&node.external));
            node.wait_until_programmed();
        }
        cluster
    }

    /// The pods that answered `requests` HTTP GETs to `addr:port` from the client.
    fn http_answers(&self, addr: Ipv4Addr, port: u16, requests: usize) -> BTreeSet<String> {
        (0..requests)
            .map(|i| {
                servers::http_get(&self.client, addr, port, TIMEOUT)
                    .unwrap_or_else(|e| panic!("request {i} to {addr}:{port}: {e:#}"))
                    .pod
            })
            .collect()
    }
}

/// A veth from `ns` (named `inside`, holding `address`/24) to the LAN bridge.
fn plug(lan: &NetNs, ns: &NetNs, inside: &str, outside: &str, address: Ipv4Addr) {
    lan.add_veth(outside, ns, inside).unwrap();
    lan.ip(&["link", "set", outside, "master", "br0"]).unwrap();
    lan.ip(&["link", "set", outside, "up"]).unwrap();
    ns.ip(&["addr", "add", &format!("{address}/24"), "dev", inside])
        .unwrap();
    ns.ip(&["link", "set", inside, "up"]).unwrap();
}

fn spawn_agent(lab: &Lab, external: &str, node_name: &str, manifests: &Path, pins: &Path) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    command
        .args(["run", "--interfaces", &lab.interface_pattern()])
        .args(["--external-interfaces", external, "--node-name", node_name])
        .arg("--manifests")
        .arg(manifests)
        .arg("--pin-dir")
        .arg(pins)
        .stderr(Stdio::inherit());
    lab.node.spawn(&mut command).unwrap()
}

impl Node {
    /// Waits until the agent programmed the pods: the reconciler writes frontends in key order
    /// in one pass, so once the last one (the externalIP) has both backends, all have theirs.
    fn wait_until_programmed(&self) {
        self.wait_for_frontend(EXTERNAL_IP.octets(), 80, IPPROTO_TCP, 2);
    }

    /// Waits until the frontend `addr:port/proto` has `count` backends in this node's maps.
    fn wait_for_frontend(&self, addr: [u8; 4], port: u16, proto: u8, count: u32) {
        let key = ServiceKey {
            addr,
            port,
            proto,
            pad: 0,
        };
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let programmed = ServiceMaps::open(self.pins.path())
                .ok()
                .and_then(|maps| maps.services.get(&key, 0).ok())
                .map(|info| info.backends.count);
            if programmed == Some(count) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {} did not program {key:?} with {count} backends (has {programmed:?})",
                self.lab.prefix
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn node_ports_lb_ips_and_external_ips_reach_pods_on_both_nodes() {
    let cluster = Cluster::start("xc");
    let both: BTreeSet<String> = [POD_A.0, POD_B.0].map(String::from).into();
    for (addr, port) in [
        (NODE_A, WEB_NODE_PORT),
        (NODE_B, WEB_NODE_PORT),
        (LB_IP, 80),
        (EXTERNAL_IP, 80),
    ] {
        // Maglev spreads client ports across both backends; 40 connections miss one with a
        // probability of 2^-39.
        assert_eq!(
            cluster.http_answers(addr, port, 40),
            both,
            "{addr}:{port} is served by the pods of both nodes"
        );
    }
}

#[test]
fn external_traffic_policy_local_keeps_the_client_address_and_only_local_pods_answer() {
    let cluster = Cluster::start("xl");
    for (node, pod) in [(NODE_A, POD_A.0), (NODE_B, POD_B.0)] {
        for _ in 0..10 {
            let reply = servers::udp_request(&cluster.client, node, LOCAL_NODE_PORT, TIMEOUT)
                .unwrap_or_else(|e| panic!("UDP to {node}:{LOCAL_NODE_PORT}: {e:#}"));
            assert_eq!(
                reply.pod,
                format!("{pod} {CLIENT}"),
                "only the local pod answers, and it sees the client's own address"
            );
            assert_eq!(
                reply.from,
                (node, LOCAL_NODE_PORT).into(),
                "the answer comes from the NodePort"
            );
        }
    }
}

#[test]
fn health_check_node_port_says_which_node_has_local_endpoints() {
    let cluster = Cluster::start("xh");
    for (node, status, count) in [(NODE_A, 200, 1), (NODE_B, 503, 0)] {
        let deadline = Instant::now() + Duration::from_secs(30);
        let (got, body) = loop {
            match http_status(&cluster.client, node, SOLO_HEALTH_CHECK) {
                Ok(answer) => break answer,
                Err(error) if Instant::now() < deadline => {
                    eprintln!("{node}:{SOLO_HEALTH_CHECK} not answering yet: {error:#}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(error) => panic!("{node}:{SOLO_HEALTH_CHECK}: {error:#}"),
            }
        };
        assert_eq!(got, status, "{node}: {body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["localEndpoints"], count, "{node}: {body}");
        assert_eq!(body["service"]["name"], "solo");
    }
}

/// externalTrafficPolicy Local restricts only clients from outside the node, as kube-proxy
/// does: on node B, which has no `solo` pod, a pod and the node itself reach solo's NodePort and
/// LoadBalancer IP (served by node A's pod), while an outside client sending there is dropped.
#[test]
fn external_traffic_policy_local_restricts_only_clients_from_outside() {
    let cluster = Cluster::start("xp");
    let node_b = &cluster.nodes[1];
    // Pods and the node use every endpoint: node A's.
    node_b.wait_for_frontend(SOLO_LB_IP.octets(), 80, IPPROTO_TCP, 1);
    let pod_b = &node_b.lab.pods[0];
    assert_eq!(pod_b.name, POD_B.0);
    for (addr, port) in [(NODE_B, SOLO_NODE_PORT), (SOLO_LB_IP, 80)] {
        for (client, who) in [
            (&pod_b.ns, "a pod of node B"),
            (&node_b.lab.node, "node B itself"),
        ] {
            let reply = servers::http_get(client, addr, port, TIMEOUT)
                .unwrap_or_else(|e| panic!("{who} to {addr}:{port}: {e:#}"));
            assert_eq!(
                reply.pod, POD_A.0,
                "{who} to {addr}:{port} reaches the other node's pod"
            );
            assert_eq!(
                reply.from,
                (addr, port).into(),
                "the answer comes from the frontend"
            );
        }
        let outside = servers::http_get(&cluster.client, addr, port, Duration::from_millis(500));
        assert!(
            outside.is_err(),
            "an outside client at {addr}:{port} (node B) is dropped: {outside:?}"
        );
    }
}

/// `GET /` to `addr:port` from `ns`: the status code and the body.
fn http_status(ns: &NetNs, addr: Ipv4Addr, port: u16) -> anyhow::Result<(u16, String)> {
    let target = (addr, port).into();
    let mut stream = ns.run(move || TcpStream::connect_timeout(&target, TIMEOUT))??;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: switchboard\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("not HTTP: {response:?}"))?;
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    Ok((status, body))
}

#[test]
fn the_node_itself_reaches_cluster_ips_and_node_ports_including_localhost() {
    let cluster = Cluster::start("xs");
    let node = &cluster.nodes[0].lab.node;
    let both: BTreeSet<String> = [POD_A.0, POD_B.0].map(String::from).into();
    let web_cluster_ip = Ipv4Addr::new(10, 96, 0, 10);
    for (addr, port) in [
        (web_cluster_ip, 80),
        (NODE_A, WEB_NODE_PORT),
        (Ipv4Addr::LOCALHOST, WEB_NODE_PORT),
    ] {
        let mut answered = BTreeSet::new();
        for i in 0..40 {
            let reply = servers::http_get(node, addr, port, TIMEOUT)
                .unwrap_or_else(|e| panic!("request {i} from the node to {addr}:{port}: {e:#}"));
            assert_eq!(
                reply.from,
                (addr, port).into(),
                "the socket's peer is the service"
            );
            answered.insert(reply.pod);
        }
        assert_eq!(
            answered, both,
            "{addr}:{port} from the node reaches the pods of both nodes"
        );
    }
    let local_cluster_ip = Ipv4Addr::new(10, 96, 0, 11);
    for (addr, port) in [
        (local_cluster_ip, 53),
        (NODE_A, LOCAL_NODE_PORT),
        (Ipv4Addr::LOCALHOST, LOCAL_NODE_PORT),
    ] {
        let reply = servers::udp_request(node, addr, port, TIMEOUT)
            .unwrap_or_else(|e| panic!("UDP from the node to {addr}:{port}: {e:#}"));
        assert!(reply.pod.starts_with("web-"), "{reply:?}");
        assert_eq!(
            reply.from,
            (addr, port).into(),
            "the datagram reads as coming from the service"
        );
    }
    // A port the Service does not define: refused at connect().
    let nowhere = servers::http_get(node, web_cluster_ip, 81, TIMEOUT).unwrap_err();
    let refused = nowhere.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
    });
    assert!(refused, "{nowhere:#}");
}

#[test]
fn external_traffic_survives_the_agent_killed_and_restarted() {
    let mut cluster = Cluster::start("xr");
    let both: BTreeSet<String> = [POD_A.0, POD_B.0].map(String::from).into();
    let node = &mut cluster.nodes[0];
    let before = ServiceMaps::open(node.pins.path())
        .unwrap()
        .read_programmed()
        .unwrap();
    let links = common::agent::linked_programs(node.pins.path());
    node.agent.kill().unwrap();
    node.agent.wait().unwrap();
    assert_eq!(
        cluster.http_answers(NODE_A, WEB_NODE_PORT, 20),
        both,
        "the pinned XDP and TC links keep serving without the agent"
    );
    let node = &mut cluster.nodes[0];
    node.agent = spawn_agent(
        &node.lab,
        &node.external,
        &node.name,
        cluster.manifests.path(),
        node.pins.path(),
    );
    common::agent::wait_for_new_programs(node.pins.path(), &links);
    node.wait_until_programmed();
    let after = ServiceMaps::open(node.pins.path())
        .unwrap()
        .read_programmed()
        .unwrap();
    assert_eq!(before, after, "the restarted agent programs what was there");
    // The restarted agent swapped its programs into the pinned links; traffic never stopped.
    assert_eq!(cluster.http_answers(NODE_A, WEB_NODE_PORT, 20), both);
}
