//! End to end on network namespaces: a node namespace running the real `switchboard` binary,
//! pod namespaces on veths with real TCP and UDP servers, and a client pod dialling ClusterIPs.
mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use common::{PinDir, agent, require_root};
use lb_common::{IPPROTO_TCP, ServiceKey};
use lb_userspace::{
    datapath::maps::ServiceMaps,
    lab::{self, Lab, servers},
};

const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NOBODY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const PODS: [(&str, Ipv4Addr); 3] = [
    ("web-0", Ipv4Addr::new(10, 244, 1, 10)),
    ("web-1", Ipv4Addr::new(10, 244, 1, 11)),
    ("web-2", Ipv4Addr::new(10, 244, 1, 12)),
];
const CLIENT: (&str, Ipv4Addr) = ("client", Ipv4Addr::new(10, 244, 1, 20));
/// How long an answer that should come at once may take on a loaded machine.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A lab with three `app=web` pods serving HTTP on 3000 and UDP on 5353, a client pod, Service
/// `web` (10.96.0.10: 80/TCP → 3000, 53/UDP → 5353), Service `nobody` whose selector matches no
/// pod, and the agent running in the node namespace.
struct Cluster {
    agent: Child,
    http: Vec<servers::Server>,
    udp: Vec<servers::Server>,
    _lines: Vec<servers::Server>,
    manifests: tempfile::TempDir,
    pins: PinDir,
    lab: Lab,
}

impl Cluster {
    fn start(tag: &str) -> Self {
        Self::start_with(tag, &[])
    }

    /// Endpoints from EndpointSlices (`web`'s three pods ready) instead of the pods' labels.
    fn start_on_slices(tag: &str) -> Self {
        Self::start_with(tag, &["--endpoints-from", "slices"])
    }

    fn start_with(tag: &str, agent_args: &[&str]) -> Self {
        Self::start_logging(tag, agent_args, Stdio::inherit())
    }

    /// With the agent's JSON log events, for tests of what it reports.
    fn start_with_logs(tag: &str, agent_args: &[&str]) -> (Self, mpsc::Receiver<serde_json::Value>) {
        let mut cluster = Self::start_logging(tag, agent_args, Stdio::piped());
        let events = log_events(&mut cluster.agent);
        (cluster, events)
    }

    fn start_logging(tag: &str, agent_args: &[&str], logs: Stdio) -> Self {
        require_root();
        let prefix = format!("{tag}{}", std::process::id() % 100_000);
        let mut lab = Lab::new(&prefix).unwrap();
        let manifests = tempfile::tempdir().unwrap();
        let (mut http, mut udp) = (Vec::new(), Vec::new());
        let mut lines = Vec::new();
        for (name, ip) in PODS {
            let ns = &lab.add_pod(name, ip).unwrap().ns;
            http.push(servers::http_server(ns, name, 3000).unwrap());
            udp.push(servers::udp_server(ns, name, 5353).unwrap());
            lines.push(servers::line_server(ns, name, 7000).unwrap());
        }
        lab.add_pod(CLIENT.0, CLIENT.1).unwrap();
        write_pods(manifests.path(), &PODS);
        let services = [
            lab::service_manifest(
                "web",
                WEB,
                &[("app", "web")],
                &[
                    ("http", "TCP", 80, 3000),
                    ("dns", "UDP", 53, 5353),
                    ("lines", "TCP", 7000, 7000),
                ],
            ),
            lab::service_manifest(
                "nobody",
                NOBODY,
                &[("app", "nothing")],
                &[("http", "TCP", 80, 3000), ("dns", "UDP", 53, 5353)],
            ),
        ];
        std::fs::write(manifests.path().join("services.yaml"), services.join("---\n")).unwrap();
        let ready: Vec<_> = PODS
            .iter()
            .map(|(name, ip)| lab::SliceEndpoint::ready(name, *ip))
            .collect();
        write_web_slice(manifests.path(), &ready);

        let pins = PinDir::new("sbtest", tag);
        let agent = agent::spawn(&lab, manifests.path(), pins.path(), logs, agent_args);
        let cluster = Self {
            agent,
            http,
            udp,
            _lines: lines,
            manifests,
            pins,
            lab,
        };
        agent::wait_until_attached(&cluster.lab, cluster.pins.path(), None);
        cluster.wait_for_backends(3);
        cluster
    }

    fn client(&self) -> &lab::NetNs {
        &self.lab.pod(CLIENT.0).ns
    }

    /// Waits until the web service's TCP frontend has `count` backends in the kernel's maps.
    /// Waits until every frontend of the web service has `count` backends in the kernel's maps
    /// (the agent writes them one after the other).
    fn wait_for_backends(&self, count: u32) {
        let frontends = [
            (80, IPPROTO_TCP),
            (53, lb_common::IPPROTO_UDP),
            (7000, IPPROTO_TCP),
        ];
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let maps = ServiceMaps::open(self.pins.path()).ok();
            let programmed: Vec<Option<u32>> = frontends
                .iter()
                .map(|&(port, proto)| {
                    let key = ServiceKey {
                        addr: WEB.octets(),
                        port,
                        proto,
                        pad: 0,
                    };
                    maps.as_ref()?
                        .services
                        .get(&key, 0)
                        .ok()
                        .map(|info| info.backends.count)
                })
                .collect();
            if programmed.iter().all(|p| *p == Some(count)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not program {count} backends (has {programmed:?})"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the kernel's maps satisfy `done`.
    fn wait_for_maps(&self, what: &str, done: impl Fn(&ServiceMaps) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ServiceMaps::open(self.pins.path()).is_ok_and(|maps| done(&maps)) {
            assert!(Instant::now() < deadline, "the agent did not program {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

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

/// The agent's JSON log events, line by line, from its piped stderr.
fn log_events(agent: &mut Child) -> mpsc::Receiver<serde_json::Value> {
    let stderr = agent.stderr.take().expect("stderr is piped");
    let (events, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(event) = serde_json::from_str(&line) {
                let _ = events.send(event);
            }
        }
    });
    received
}

fn write_pods(dir: &Path, pods: &[(&str, Ipv4Addr)]) {
    let yaml: Vec<String> = pods
        .iter()
        .map(|(name, ip)| lab::pod_manifest(name, *ip, &[("app", "web")], 3000))
        .collect();
    let client = lab::pod_manifest(CLIENT.0, CLIENT.1, &[("app", "client")], 3000);
    agent::write_manifest(dir, "pods.yaml", &[yaml.join("---\n"), client].join("---\n"));
}

/// The `web` Service's EndpointSlice (used with `--endpoints-from slices`), written atomically.
fn write_web_slice(dir: &Path, endpoints: &[lab::SliceEndpoint<'_>]) {
    let slice = lab::endpoint_slice_manifest(
        "web",
        &[
            ("http", "TCP", 3000),
            ("dns", "UDP", 5353),
            ("lines", "TCP", 7000),
        ],
        endpoints,
    );
    agent::write_manifest(dir, "slices.yaml", &slice);
}

#[test]
fn tcp_connections_to_a_cluster_ip_are_spread_over_every_backend() {
    let cluster = Cluster::start("nt");
    let mut by_pod: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..60 {
        let reply = servers::http_get(cluster.client(), WEB, 80, TIMEOUT)
            .unwrap_or_else(|e| panic!("connection {i}: {e:#}"));
        assert_eq!(
            reply.from,
            SocketAddr::from((WEB, 80)),
            "the reply comes from the ClusterIP"
        );
        *by_pod.entry(reply.pod).or_default() += 1;
    }
    assert_eq!(by_pod.values().sum::<usize>(), 60);
    assert_eq!(
        by_pod.len(),
        3,
        "every backend answered at least once: {by_pod:?}"
    );
    assert_eq!(
        Cluster::answered(&cluster.http),
        by_pod,
        "the servers saw exactly the connections the client made"
    );
}

#[test]
fn udp_requests_to_a_cluster_ip_are_spread_over_every_backend() {
    let cluster = Cluster::start("nu");
    let mut by_pod: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..60 {
        let reply = servers::udp_request(cluster.client(), WEB, 53, TIMEOUT)
            .unwrap_or_else(|e| panic!("request {i}: {e:#}"));
        assert_eq!(
            reply.from,
            SocketAddr::from((WEB, 53)),
            "the answer comes from the ClusterIP"
        );
        *by_pod.entry(reply.pod).or_default() += 1;
    }
    assert_eq!(
        by_pod.len(),
        3,
        "every backend answered at least once: {by_pod:?}"
    );
    assert_eq!(Cluster::answered(&cluster.udp), by_pod);
}

#[test]
fn a_backend_removed_from_the_manifests_gets_no_new_connection() {
    let cluster = Cluster::start("nr");
    for _ in 0..15 {
        servers::http_get(cluster.client(), WEB, 80, TIMEOUT).unwrap();
    }
    write_pods(cluster.manifests.path(), &PODS[..2]);
    cluster.wait_for_backends(2);
    let removed_before = cluster.http[2].answered();
    for i in 0..40 {
        let reply = servers::http_get(cluster.client(), WEB, 80, TIMEOUT)
            .unwrap_or_else(|e| panic!("connection {i} after the removal: {e:#}"));
        assert_ne!(reply.pod, "web-2");
    }
    assert_eq!(
        cluster.http[2].answered(),
        removed_before,
        "web-2 received no connection after its removal"
    );
    assert!(cluster.http[0].answered() > 0 && cluster.http[1].answered() > 0);
}

#[test]
fn a_service_whose_selector_matches_no_pod_refuses_at_once() {
    let cluster = Cluster::start("nn");
    common::assert_tcp_refused_at_once(cluster.client(), (NOBODY, 80).into());
    // A connected UDP socket hears of the ICMP port unreachable: refused too.
    common::assert_udp_refused(cluster.client(), (NOBODY, 53).into());
    let answered: usize = cluster
        .http
        .iter()
        .chain(&cluster.udp)
        .map(servers::Server::answered)
        .sum();
    assert_eq!(answered, 0, "no pod answered");
}

#[test]
fn a_broken_manifest_is_reported_and_the_rest_keeps_working() {
    let cluster = Cluster::start("nb");
    std::fs::write(
        cluster.manifests.path().join("broken.yaml"),
        "kind: Service\nmetadata: {name: x}\nspec:\n  ports: [{port: eighty}]\n",
    )
    .unwrap();
    // The good pods file changes too, so the agent visibly re-reads after the broken file appeared.
    write_pods(cluster.manifests.path(), &PODS[..2]);
    cluster.wait_for_backends(2);
    for _ in 0..10 {
        servers::http_get(cluster.client(), WEB, 80, TIMEOUT).unwrap();
    }
}

#[test]
fn a_pod_added_after_the_agent_started_is_balanced_to_and_from() {
    let mut cluster = Cluster::start("na");
    let late = ("web-3", Ipv4Addr::new(10, 244, 1, 13));
    let ns = &cluster.lab.add_pod(late.0, late.1).unwrap().ns;
    let server = servers::http_server(ns, late.0, 3000).unwrap();
    let mut pods = PODS.to_vec();
    pods.push(late);
    write_pods(cluster.manifests.path(), &pods);
    cluster.wait_for_backends(4);
    // The agent attaches to the new pod's interface when netlink announces it: the pod can use
    // the service itself…
    let deadline = Instant::now() + Duration::from_secs(30);
    let late_ns = &cluster.lab.pod(late.0).ns;
    while let Err(error) = servers::http_get(late_ns, WEB, 80, Duration::from_millis(500)) {
        assert!(
            Instant::now() < deadline,
            "the late pod never reached the ClusterIP: {error:#}"
        );
    }
    // …and it is a backend like the others.
    while server.answered() == 0 {
        assert!(Instant::now() < deadline, "the late pod never got a connection");
        servers::http_get(cluster.client(), WEB, 80, TIMEOUT).unwrap();
    }
}

/// A client connecting to the web Service over and over, counting what succeeds and fails.
#[derive(Default)]
struct Load {
    stop: AtomicBool,
    ok: AtomicUsize,
    failed: AtomicUsize,
}

impl Load {
    /// Keeps connecting from `client` until [`Load::stop`].
    fn run(&self, client: &lab::NetNs) {
        while !self.stop.load(Ordering::SeqCst) {
            match servers::http_get(client, WEB, 80, TIMEOUT) {
                Ok(_) => self.ok.fetch_add(1, Ordering::SeqCst),
                Err(_) => self.failed.fetch_add(1, Ordering::SeqCst),
            };
        }
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    /// Waits until more than `than` connections have succeeded.
    fn wait_for_more(&self, what: &str, than: usize) {
        agent::wait_until(what, || self.ok() > than);
    }

    /// No connection failed `across` what happened, and the client kept connecting.
    fn assert_unbroken(&self, across: &str) {
        assert_eq!(
            self.failed.load(Ordering::SeqCst),
            0,
            "no connection failed {across}"
        );
        assert!(
            self.ok() >= 50,
            "the client kept connecting: {} connections",
            self.ok()
        );
    }
}

#[test]
fn an_agent_killed_and_restarted_under_load_loses_no_connection_and_rewrites_nothing() {
    let mut cluster = Cluster::start("nk");
    let load = Load::default();
    let first_sync = std::thread::scope(|scope| {
        let client = &cluster.lab.pod(CLIENT.0).ns;
        scope.spawn(|| load.run(client));
        load.wait_for_more("the load to get going", 0);
        // kill -9: no cleanup at all. The pinned links and maps keep the datapath serving.
        cluster.agent.kill().unwrap();
        cluster.agent.wait().unwrap();
        load.wait_for_more("connections with no agent running", load.ok());

        cluster.agent = agent::spawn(
            &cluster.lab,
            cluster.manifests.path(),
            cluster.pins.path(),
            Stdio::piped(),
            &[],
        );
        let events = log_events(&mut cluster.agent);
        let first_sync = events
            .iter()
            .find(|event| event["fields"]["message"] == "maps in sync")
            .expect("the restarted agent synced");
        // Its programs replace the old ones once verified; connections go on across the swap.
        events
            .iter()
            .find(|event| event["fields"]["message"] == "serving")
            .expect("the restarted agent serves");
        load.wait_for_more("connections after the swap", load.ok());
        load.stop();
        first_sync
    });
    load.assert_unbroken("across the kill and restart");
    let fields = &first_sync["fields"];
    assert_eq!(
        (fields["writes"].as_u64(), fields["deletes"].as_u64()),
        (Some(0), Some(0)),
        "the restarted agent rewrote nothing that did not change: {first_sync}"
    );
}

/// GET `path` from the agent's metrics endpoint (loopback of the node namespace).
fn scrape(cluster: &Cluster, path: &'static str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let mut stream = cluster
        .lab
        .node
        .run(|| std::net::TcpStream::connect("127.0.0.1:10249"))
        .unwrap()
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    (
        status,
        response.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned(),
    )
}

fn metric(body: &str, name: &str) -> u64 {
    body.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{body}"))
}

#[test]
fn metrics_count_the_connections_made_and_health_is_reported() {
    let cluster = Cluster::start("nm");
    // Healthy once serving: the programs attached (the socket hooks last) and the maps in sync.
    agent::wait_until("a healthy /healthz", || scrape(&cluster, "/healthz").0 == 200);
    let (_, before) = scrape(&cluster, "/metrics");
    let flows_before = metric(&before, "switchboard_datapath_new_flows_total");
    for _ in 0..25 {
        servers::http_get(cluster.client(), WEB, 80, TIMEOUT).unwrap();
    }
    let (status, after) = scrape(&cluster, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(
        metric(&after, "switchboard_datapath_new_flows_total") - flows_before,
        25,
        "one new flow per connection"
    );
    assert!(
        metric(&after, "switchboard_datapath_reply_packets_total") >= 25 * 2,
        "SYN-ACK and reply at least"
    );
    assert_eq!(
        metric(&after, "switchboard_frontends_without_endpoints"),
        2,
        "the `nobody` service's two ports"
    );
    assert!(metric(&after, "switchboard_syncs_total") >= 1);
    assert_eq!(scrape(&cluster, "/nope").0, 404);
}

#[test]
fn keep_datapath_serves_after_the_agent_exits_and_uninstall_detaches_it() {
    let mut cluster = Cluster::start("nu2");
    // A rollout's agent: started with --keep-datapath, stopped with SIGTERM.
    cluster.agent.kill().unwrap();
    cluster.agent.wait().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    command
        .args([
            "run",
            "--keep-datapath",
            "--interfaces",
            &cluster.lab.interface_pattern(),
            "--manifests",
        ])
        .arg(cluster.manifests.path())
        .arg("--pin-dir")
        .arg(cluster.pins.path());
    cluster.agent = cluster.lab.node.spawn(&mut command).unwrap();
    // Stopped once it runs (its metrics port answers), whatever it is doing then: a SIGTERM
    // during startup must end in a clean exit too.
    agent::wait_until("the new agent's metrics port", || {
        let connected = cluster
            .lab
            .node
            .run(|| std::net::TcpStream::connect("127.0.0.1:10249"));
        connected.is_ok_and(|stream| stream.is_ok())
    });
    let pid = nix::unistd::Pid::from_raw(cluster.agent.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(cluster.agent.wait().unwrap().success(), "a clean exit");
    for _ in 0..10 {
        servers::http_get(cluster.client(), WEB, 80, TIMEOUT)
            .expect("the datapath keeps serving after the agent exited");
    }

    let output = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("uninstall")
        .arg("--pin-dir")
        .arg(cluster.pins.path())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!cluster.pins.path().exists(), "the pins are gone");
    // bpffs drops a removed pin's reference after an RCU grace period: detaching is not instant.
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Ok(reply) = servers::http_get(cluster.client(), WEB, 80, Duration::from_millis(300)) {
        assert!(
            Instant::now() < deadline,
            "the ClusterIP is still served after uninstall: {reply:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Maglev, the agent's default: with conntrack flushed mid-stream (a node that lost its state,
/// or a flow arriving at another node), an established connection keeps its backend.
#[test]
fn an_established_connection_survives_a_conntrack_flush() {
    use std::io::{BufRead as _, BufReader, Write as _};
    let cluster = Cluster::start("nf");
    let target = SocketAddr::from((WEB, 7000));
    let stream = cluster
        .client()
        .run(move || std::net::TcpStream::connect_timeout(&target, TIMEOUT))
        .unwrap()
        .unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut ask = || {
        writeln!(writer, "who?").unwrap();
        let mut pod = String::new();
        reader.read_line(&mut pod).expect("the connection still answers");
        pod.trim().to_owned()
    };
    let first = ask();
    let mut conntrack = ServiceMaps::open(cluster.pins.path()).unwrap().conntrack;
    let keys: Vec<_> = conntrack.keys().map(Result::unwrap).collect();
    assert!(!keys.is_empty(), "the flow was tracked");
    for key in keys {
        conntrack.remove(&key).unwrap();
    }
    for _ in 0..5 {
        assert_eq!(ask(), first, "the flow is hashed to the same backend again");
    }
}

/// sessionAffinity ClientIP, end to end: 50 connections of one client all reach one pod.
#[test]
fn with_client_ip_affinity_every_connection_of_a_client_reaches_one_pod() {
    let cluster = Cluster::start("ns");
    const STICKY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
    let sticky = lab::service_manifest("sticky", STICKY, &[("app", "web")], &[("http", "TCP", 80, 3000)])
        .replace(
            "  type: ClusterIP\n",
            "  type: ClusterIP\n  sessionAffinity: ClientIP\n",
        );
    std::fs::write(cluster.manifests.path().join("sticky.yaml"), sticky).unwrap();
    let key = ServiceKey {
        addr: STICKY.octets(),
        port: 80,
        proto: IPPROTO_TCP,
        pad: 0,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while ServiceMaps::open(cluster.pins.path())
        .unwrap()
        .services
        .get(&key, 0)
        .is_err()
    {
        assert!(Instant::now() < deadline, "the sticky service was not programmed");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pods: BTreeSet<String> = (0..50)
        .map(|i| {
            servers::http_get(cluster.client(), STICKY, 80, TIMEOUT)
                .unwrap_or_else(|e| panic!("connection {i}: {e:#}"))
                .pod
        })
        .collect();
    assert_eq!(
        pods.len(),
        1,
        "all connections of the client reached one pod: {pods:?}"
    );
}

/// One long-lived TCP connection to the line servers behind `WEB:7000`.
struct LineConnection {
    reader: BufReader<std::net::TcpStream>,
    writer: std::net::TcpStream,
}

impl LineConnection {
    fn open(cluster: &Cluster) -> Self {
        let target = SocketAddr::from((WEB, 7000));
        let stream = cluster
            .client()
            .run(move || std::net::TcpStream::connect_timeout(&target, TIMEOUT))
            .unwrap()
            .unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        Self {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        }
    }

    /// The pod at the other end, asked over the same connection.
    fn ask(&mut self) -> String {
        use std::io::Write as _;
        writeln!(self.writer, "who?").unwrap();
        let mut pod = String::new();
        self.reader
            .read_line(&mut pod)
            .expect("the connection still answers");
        assert!(!pod.is_empty(), "the connection was closed");
        pod.trim().to_owned()
    }
}

/// `web`'s pods as EndpointSlice endpoints, `terminating` marked so and the others ready.
fn slice_with_terminating(terminating: &str) -> Vec<lab::SliceEndpoint<'static>> {
    PODS.iter()
        .map(|(name, ip)| {
            if *name == terminating {
                lab::SliceEndpoint::terminating(name, *ip)
            } else {
                lab::SliceEndpoint::ready(name, *ip)
            }
        })
        .collect()
}

fn pod_index(name: &str) -> usize {
    PODS.iter().position(|(pod, _)| *pod == name).unwrap()
}

/// A pod being deleted (EndpointSlice: terminating, still serving) keeps the connection it has,
/// while every new connection goes to the ready pods.
#[test]
fn a_terminating_pod_keeps_its_connection_while_new_ones_go_to_ready_pods() {
    let cluster = Cluster::start_on_slices("nd");
    let mut line = LineConnection::open(&cluster);
    let old = line.ask();
    write_web_slice(cluster.manifests.path(), &slice_with_terminating(&old));
    cluster.wait_for_backends(2);
    for _ in 0..5 {
        assert_eq!(line.ask(), old, "the established connection stays on its pod");
    }
    let served_before = cluster.http[pod_index(&old)].answered();
    for i in 0..30 {
        let reply = servers::http_get(cluster.client(), WEB, 80, TIMEOUT)
            .unwrap_or_else(|e| panic!("connection {i}: {e:#}"));
        assert_ne!(reply.pod, old, "a new connection went to the terminating pod");
    }
    assert_eq!(cluster.http[pod_index(&old)].answered(), served_before);
    assert_eq!(line.ask(), old, "and the old connection still works");
}

/// The kube-proxy stale-conntrack failure must not happen: a DNS-like client, always sending
/// from the same socket, keeps getting answers while its backend terminates, is replaced by a
/// new pod and stops answering.
#[test]
fn a_udp_client_keeps_getting_answers_while_its_backend_is_replaced() {
    let mut cluster = Cluster::start_on_slices("nq");
    let flow = servers::UdpFlow::connect(cluster.client(), SocketAddr::from((WEB, 53)), TIMEOUT).unwrap();
    let ask = || flow.ask().expect("every query is answered");
    let old = ask();

    write_web_slice(cluster.manifests.path(), &slice_with_terminating(&old));
    cluster.wait_for_backends(2);
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
        .map(|(name, ip)| lab::SliceEndpoint::ready(name, *ip))
        .collect();
    endpoints.push(lab::SliceEndpoint::ready(new.0, new.1));
    write_web_slice(cluster.manifests.path(), &endpoints);
    cluster.wait_for_backends(3);
    let old_ip = PODS[pod_index(&old)].1.octets();
    cluster.wait_for_maps("the old pod's removal", |maps| {
        maps.backends
            .iter()
            .filter_map(Result::ok)
            .all(|(_, backend)| backend.addr != old_ip)
    });
    // The old pod's socket is closed once the drop returns: a query sent there now would be
    // refused, not answered.
    drop(cluster.udp.remove(pod_index(&old)));
    for _ in 0..10 {
        assert_ne!(ask(), old, "the client moved to a live pod");
    }
}

/// A UDP client whose pod's port closed (the pod still an endpoint) hears "connection
/// refused": the pod's ICMP port unreachable quotes the datagram as DNATed, and reaches the
/// client's socket only translated back to the ClusterIP it is connected to.
#[test]
fn a_udp_client_hears_connection_refused_when_its_pods_port_closes() {
    let mut cluster = Cluster::start("ni");
    let flow = servers::UdpFlow::connect(cluster.client(), SocketAddr::from((WEB, 53)), TIMEOUT).unwrap();
    let pod = flow.ask().expect("answered");
    // The server's socket is closed once the drop returns.
    drop(cluster.udp.remove(pod_index(&pod)));
    let error = flow
        .ask_retrying(3)
        .expect_err("nothing listens on the pod's port any more");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused, "{error}");
}

/// The agent forgets finished connections: with short timeouts, the flows of 20 closed HTTP
/// connections leave the conntrack map and are counted as collected.
#[test]
fn closed_connections_are_garbage_collected_from_conntrack() {
    let cluster = Cluster::start_with(
        "ng",
        &[
            "--conntrack-gc-interval",
            "1s",
            "--conntrack-tcp-closing-timeout",
            "1s",
        ],
    );
    for _ in 0..20 {
        servers::http_get(cluster.client(), WEB, 80, TIMEOUT).unwrap();
    }
    let (_, body) = scrape(&cluster, "/metrics");
    assert!(metric(&body, "switchboard_conntrack_flows") >= 20, "{body}");
    let collected = "switchboard_conntrack_gc_collected_total{reason=\"tcp_closed\"}";
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let (_, body) = scrape(&cluster, "/metrics");
        if metric(&body, collected) >= 20 && metric(&body, "switchboard_conntrack_flows") == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "closed flows were not collected:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    servers::http_get(cluster.client(), WEB, 80, TIMEOUT).expect("the service still works");
}

/// A ClusterIP dialled on a port its Service does not define: refused at once, for TCP and UDP,
/// as a closed port would be (kube-proxy rejects these too), while its defined ports work.
#[test]
fn a_cluster_ip_on_a_port_its_service_does_not_define_refuses_at_once() {
    let cluster = Cluster::start("np");
    common::assert_tcp_refused_at_once(cluster.client(), (WEB, 81).into());
    // 80 is the Service's port for TCP only.
    common::assert_udp_refused(cluster.client(), (WEB, 80).into());
    servers::http_get(cluster.client(), WEB, 80, TIMEOUT).expect("port 80/TCP still works");
}

#[test]
fn a_pod_reaches_itself_through_its_own_service() {
    let cluster = Cluster::start("hp");
    let (name, _) = PODS[0];
    let pod = &cluster.lab.pod(name).ns;
    let mut answered = BTreeSet::new();
    for i in 0..30 {
        let reply = servers::http_get(pod, WEB, 80, TIMEOUT)
            .unwrap_or_else(|e| panic!("connection {i} from {name} to its own Service: {e:#}"));
        assert_eq!(
            reply.from,
            SocketAddr::from((WEB, 80)),
            "the reply comes from the ClusterIP"
        );
        answered.insert(reply.pod);
    }
    assert!(
        answered.contains(name),
        "30 connections never reached the pod itself: {answered:?}"
    );
    for i in 0..30 {
        servers::udp_request(pod, WEB, 53, TIMEOUT)
            .unwrap_or_else(|e| panic!("datagram {i} from {name} to its own Service: {e:#}"));
    }
}
/// The value of `name` (labels included), or 0 when the scrape does not have it yet.
fn metric_or_zero(body: &str, name: &str) -> u64 {
    body.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// Per-service counters: each frontend's new-flows counter moves by exactly the connections
/// made to it, packets and bytes move with them, and `get services` shows the same counts.
#[test]
fn per_service_metrics_count_each_frontends_connections() {
    let cluster = Cluster::start("oc");
    let tcp = r#"{service="default/web",frontend="10.96.0.10:80/TCP"}"#;
    let udp = r#"{service="default/web",frontend="10.96.0.10:53/UDP"}"#;
    let counter = |body: &str, name: &str, labels: &str| {
        metric_or_zero(body, &format!("switchboard_service_{name}_total{labels}"))
    };
    let (_, before) = scrape(&cluster, "/metrics");
    const CONNECTIONS: u64 = 20;
    const REQUESTS: u64 = 7;
    for _ in 0..CONNECTIONS {
        servers::http_get(cluster.client(), WEB, 80, TIMEOUT).unwrap();
    }
    for _ in 0..REQUESTS {
        servers::udp_request(cluster.client(), WEB, 53, TIMEOUT).unwrap();
    }
    let (_, after) = scrape(&cluster, "/metrics");
    let moved = |name: &str, labels: &str| counter(&after, name, labels) - counter(&before, name, labels);
    assert_eq!(
        moved("new_flows", tcp),
        CONNECTIONS,
        "one flow per connection:\n{after}"
    );
    assert_eq!(
        moved("new_flows", udp),
        REQUESTS,
        "one flow per request:\n{after}"
    );
    // SYN, ACK, request and FIN at least, each with Ethernet, IPv4 and TCP headers.
    let packets = moved("packets", tcp);
    assert!(
        packets >= 4 * CONNECTIONS,
        "{packets} packets for {CONNECTIONS} connections"
    );
    assert!(moved("bytes", tcp) >= packets * 54, "bytes count whole packets");
    assert!(
        moved("reply_packets", tcp) >= 2 * CONNECTIONS,
        "SYN-ACK and answer at least"
    );
    assert!(moved("reply_bytes", tcp) > 0);
    assert_eq!(moved("packets", udp), REQUESTS);
    assert_eq!(moved("reply_packets", udp), REQUESTS);
    assert!(
        !after.contains(r#"frontend="10.96.0.11:80/TCP""#),
        "a frontend without traffic has no counters yet"
    );
    assert!(
        metric(&after, r#"switchboard_map_entries{map="SB_CONNTRACK"}"#) >= 2 * (CONNECTIONS + REQUESTS),
        "both directions of every flow are tracked"
    );
    assert_eq!(
        metric(&after, r#"switchboard_map_capacity{map="SB_CONNTRACK"}"#),
        u64::from(lb_common::capacity::CONNTRACK)
    );

    let output = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["get", "services", "-o", "json", "--manifests"])
        .arg(cluster.manifests.path())
        .arg("--pin-dir")
        .arg(cluster.pins.path())
        .output()
        .unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
    let row = |frontend: &str| {
        rows.iter()
            .find(|r| r["frontend"] == frontend)
            .unwrap_or_else(|| panic!("no row for {frontend}: {rows:?}"))
    };
    assert_eq!(
        row("10.96.0.10:80/TCP")["traffic"]["new_flows"],
        counter(&after, "new_flows", tcp),
        "get services shows the datapath's counters"
    );
    assert_eq!(
        row("10.96.0.10:53/UDP")["traffic"]["packets"],
        counter(&after, "packets", udp)
    );
    assert_eq!(row("10.96.0.11:80/TCP")["traffic"]["packets"], 0);
}

/// The program each pinned link under `pins` runs, by pin name (`<ifindex>-<program>`).
/// An upgrade: the agent is replaced by one loading a rebuilt datapath object (`--bpf-object`)
/// while a client keeps connecting. No connection fails, the pinned links now run the new
/// programs, and those use the same pinned maps (so conntrack and counters carry over).
#[test]
fn a_rebuilt_datapath_object_replaces_the_running_programs_without_failing_a_connection() {
    let mut cluster = Cluster::start("ou");
    // The rebuilt object: this build's datapath as an operator ships it, a file beside the agent.
    let build = tempfile::tempdir().unwrap();
    let object = build.path().join("lb-ebpf.o");
    std::fs::write(&object, lb_userspace::datapath::OBJECT).unwrap();
    let before = agent::linked_programs(cluster.pins.path());
    let pod_links = before
        .keys()
        .filter(|link| link.ends_with("from_pod") || link.ends_with("to_pod"))
        .count();
    assert_eq!(
        pod_links,
        2 * (PODS.len() + 1),
        "from_pod and to_pod on every pod"
    );
    let pinned_maps: Vec<u32> = lb_common::map_names::ALL
        .iter()
        .filter_map(|name| aya::maps::MapInfo::from_pin(cluster.pins.path().join(name)).ok())
        .map(|info| info.id())
        .collect();
    let conntrack_map =
        aya::maps::MapInfo::from_pin(cluster.pins.path().join(lb_common::map_names::CONNTRACK))
            .unwrap()
            .id();

    let load = Load::default();
    std::thread::scope(|scope| {
        let client = &cluster.lab.pod(CLIENT.0).ns;
        scope.spawn(|| load.run(client));
        load.wait_for_more("the load to get going", 0);
        // The old version goes as a DaemonSet rollout stops it; its links stay pinned.
        cluster.agent.kill().unwrap();
        cluster.agent.wait().unwrap();
        cluster.agent = agent::spawn(
            &cluster.lab,
            cluster.manifests.path(),
            cluster.pins.path(),
            Stdio::piped(),
            &["--bpf-object", object.to_str().unwrap()],
        );
        let events = log_events(&mut cluster.agent);
        let mut from_file = false;
        for event in events.iter() {
            let message = &event["fields"]["message"];
            from_file |= message.as_str().is_some_and(|m| m.contains("object file"))
                && event["fields"]["object"] == object.display().to_string();
            if message == "serving" {
                break;
            }
        }
        assert!(from_file, "the new agent said it loaded {}", object.display());
        load.wait_for_more("connections after the upgrade", load.ok());
        load.stop();
    });
    load.assert_unbroken("across the upgrade");

    let after = agent::linked_programs(cluster.pins.path());
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>(),
        "the same links, updated in place"
    );
    let loaded: BTreeMap<u32, aya::programs::ProgramInfo> = aya::programs::loaded_programs()
        .map(Result::unwrap)
        .map(|info| (info.id(), info))
        .collect();
    for (link, program) in &after {
        assert_ne!(*program, before[link], "{link} runs a newly loaded program");
        let info = &loaded[program];
        // The kernel keeps the first 15 bytes of a program's name.
        assert!(
            link.rsplit_once('-')
                .unwrap()
                .1
                .starts_with(info.name_as_str().unwrap()),
            "{link} runs program {:?}",
            info.name_as_str()
        );
        let maps = info.map_ids().unwrap().unwrap();
        if link.ends_with("from_pod") || link.ends_with("to_pod") {
            assert!(
                maps.contains(&conntrack_map),
                "{link}'s new program uses the pinned conntrack map"
            );
        } else {
            assert!(
                maps.iter().any(|id| pinned_maps.contains(id)),
                "{link}'s new program uses the pinned maps"
            );
        }
    }
    // Nothing holds the old programs any more: the kernel frees them (after an RCU grace period).
    let deadline = Instant::now() + Duration::from_secs(30);
    while aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .any(|info| before.values().any(|id| *id == info.id()))
    {
        assert!(Instant::now() < deadline, "the old programs are still loaded");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn log_level(cluster: &Cluster, level: &str) {
    let output = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["log-level", level, "--pin-dir"])
        .arg(cluster.pins.path())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        String::from_utf8_lossy(&output.stdout)
            .to_lowercase()
            .contains(level),
        "it says the new level: {}",
        String::from_utf8_lossy(&output.stdout)
    );
}

/// The datapath's aya-log output, switched at run time: off by default; with
/// `switchboard log-level info` a connection to a service makes the agent print a line naming
/// the flow and its backend, and `off` silences it again. Connections made while logging is off
/// go to another frontend, so the first datapath line the agent prints tells which were logged.
#[test]
fn switching_datapath_logging_on_makes_a_connection_print_its_backend() {
    let mut cluster = Cluster::start("ol");
    cluster.agent.kill().unwrap();
    cluster.agent.wait().unwrap();
    cluster.agent = agent::spawn(
        &cluster.lab,
        cluster.manifests.path(),
        cluster.pins.path(),
        Stdio::piped(),
        &[],
    );
    let events = log_events(&mut cluster.agent);
    let datapath_line = || {
        events
            .iter()
            .find(|event| event["target"].as_str().is_some_and(|t| t.starts_with("lb_ebpf")))
            .expect("the agent prints a datapath line")
    };
    // Serving: its own programs swapped in, whose log lines it reads.
    assert!(
        events.iter().any(|event| event["fields"]["message"] == "serving"),
        "the agent serves"
    );
    let other_frontend = || servers::udp_request(cluster.client(), WEB, 53, TIMEOUT).unwrap();
    for _ in 0..5 {
        other_frontend();
    }
    log_level(&cluster, "info");
    let reply = servers::http_get(cluster.client(), WEB, 80, TIMEOUT).unwrap();
    let line = datapath_line();
    let message = line["fields"]["message"].as_str().unwrap();
    let backend = PODS.iter().find(|(pod, _)| *pod == reply.pod).unwrap().1;
    assert!(
        message.contains(&format!("{}:", CLIENT.1))
            && message.contains("-> 10.96.0.10:80 ")
            && message.contains(&format!("backend {backend}:3000")),
        "the first datapath line is the connection made after switching on, to {backend}: {line}"
    );

    log_level(&cluster, "off");
    for _ in 0..5 {
        other_frontend();
    }
    log_level(&cluster, "info");
    servers::http_get(cluster.client(), WEB, 80, TIMEOUT).unwrap();
    let line = datapath_line();
    assert!(
        line["fields"]["message"]
            .as_str()
            .unwrap()
            .contains("-> 10.96.0.10:80 "),
        "nothing was logged while off: {line}"
    );
}

/// Messages of the events received so far at `level` (drains `events`).
fn messages(events: &mpsc::Receiver<serde_json::Value>, level: &str) -> Vec<String> {
    events
        .try_iter()
        .filter(|event| event["level"] == level)
        .filter_map(|event| event["fields"]["message"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn a_removed_manifest_directory_keeps_the_programmed_state_and_is_caught_up_when_back() {
    let cluster = Cluster::start("ng");
    let dir = cluster.manifests.path();
    let away = dir.with_extension("away");
    std::fs::rename(dir, &away).unwrap();
    // Edited while the agent cannot see it: nothing changes until the directory is back.
    write_pods(&away, &PODS[..2]);
    // For 1.5 s, which the agent spends looking for the directory (every second), and for at
    // least 5 rounds however slow the machine.
    let until = Instant::now() + Duration::from_millis(1500);
    let mut answered = 0;
    while answered < 5 || Instant::now() < until {
        servers::http_get(cluster.client(), WEB, 80, TIMEOUT).expect("TCP served without manifests");
        servers::udp_request(cluster.client(), WEB, 53, TIMEOUT).expect("UDP served without manifests");
        answered += 1;
    }
    cluster.wait_for_backends(3);

    std::fs::rename(&away, dir).unwrap();
    cluster.wait_for_backends(2);
    let removed_before = cluster.http[2].answered();
    for _ in 0..20 {
        assert_ne!(
            servers::http_get(cluster.client(), WEB, 80, TIMEOUT).unwrap().pod,
            "web-2"
        );
    }
    assert_eq!(cluster.http[2].answered(), removed_before);
    // Watched again: later edits are seen, also in a directory put in place of the old one.
    write_pods(dir, &PODS);
    cluster.wait_for_backends(3);
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::create_dir(dir).unwrap();
    std::fs::write(
        dir.join("services.yaml"),
        lab::service_manifest(
            "web",
            WEB,
            &[("app", "web")],
            &[
                ("http", "TCP", 80, 3000),
                ("dns", "UDP", 53, 5353),
                ("lines", "TCP", 7000, 7000),
            ],
        ),
    )
    .unwrap();
    write_pods(dir, &PODS[1..]);
    cluster.wait_for_backends(2);
    write_pods(dir, &PODS[..1]);
    cluster.wait_for_backends(1);
}

#[test]
fn a_full_conntrack_map_still_balances_new_flows_and_is_reported_once_per_pass() {
    let (cluster, events) = Cluster::start_with_logs(
        "nf",
        &["--conntrack-capacity", "16", "--conntrack-gc-interval", "1s"],
    );
    let started = Instant::now();
    let mut by_pod: BTreeMap<String, usize> = BTreeMap::new();
    let mut connections = 0;
    while connections < 100 || started.elapsed() < Duration::from_secs(4) {
        let reply = servers::http_get(cluster.client(), WEB, 80, TIMEOUT)
            .unwrap_or_else(|e| panic!("connection {connections} with a full conntrack map: {e:#}"));
        assert_eq!(reply.from, SocketAddr::from((WEB, 80)));
        *by_pod.entry(reply.pod).or_default() += 1;
        connections += 1;
    }
    let elapsed = started.elapsed();
    assert_eq!(by_pod.len(), 3, "new flows reach every backend: {by_pod:?}");
    let maps = ServiceMaps::open(cluster.pins.path()).unwrap();
    assert_eq!(maps.conntrack_capacity().unwrap(), 16);
    let entries = maps.conntrack.keys().count();
    assert!(entries <= 16, "{entries} entries in a map of 16");

    let full: Vec<String> = messages(&events, "WARN")
        .into_iter()
        .filter(|m| m.starts_with("the conntrack map is full"))
        .collect();
    // One report per garbage collection pass (1 s), not one per connection or packet.
    assert!(!full.is_empty(), "the agent never said the map was full");
    assert!(
        full.len() as u64 <= elapsed.as_secs() + 2,
        "{} reports in {elapsed:?} for {connections} connections",
        full.len()
    );
    let (_, body) = scrape(&cluster, "/metrics");
    assert!(metric(&body, "switchboard_conntrack_full_total") >= 1, "{body}");
}

#[test]
fn frontends_beyond_a_full_services_map_are_reported_by_name_and_the_rest_keep_working() {
    // `web`'s three frontends fit (the reconciler writes them in address order); `nobody`'s
    // two do not.
    let (cluster, events) = Cluster::start_with_logs("ns", &["--services-capacity", "3"]);
    for _ in 0..10 {
        servers::http_get(cluster.client(), WEB, 80, TIMEOUT).unwrap();
        servers::udp_request(cluster.client(), WEB, 53, TIMEOUT).unwrap();
    }
    let maps = ServiceMaps::open(cluster.pins.path()).unwrap();
    assert_eq!(maps.services.keys().count(), 3);
    let errors = messages(&events, "ERROR");
    for port in [80, 53] {
        let name = format!("default/nobody:{port}");
        assert!(
            errors
                .iter()
                .any(|m| m.starts_with(&format!("cannot program {name}: SB_SERVICES: the map is full"))),
            "no error names {name}: {errors:?}"
        );
        let (_, body) = scrape(&cluster, "/metrics");
        let line = format!("switchboard_programming_failures_total{{service=\"{name}\"}}");
        assert!(metric(&body, &line) >= 1, "{body}");
    }
    assert!(
        !errors.iter().any(|m| m.contains("default/web")),
        "web was programmed: {errors:?}"
    );
}
