//! End to end through network namespaces: a client pod dialling a ClusterIP served by two backend
//! pods (ten endpoint addresses between them), on veths through a node namespace, in five setups
//! built side by side so their samples can be interleaved:
//!
//! | setup | what the node namespace does |
//! |---|---|
//! | direct | nothing: the client dials the endpoints' own addresses (the limit) |
//! | Switchboard | from_pod/to_pod on the pod veths, driven in-process by the real reconciler |
//! | iptables (nf_tables) | kube-proxy's iptables rules loaded with `iptables-nft-restore` |
//! | iptables-legacy | the same rules loaded with `iptables-legacy-restore` |
//! | nftables | kube-proxy's nftables rules loaded with `nft -f` |
//!
//! Each setup carries the measured service plus `N - 1` filler services (10 endpoints each).
//! Pods are dual-stack, so direct and Switchboard are measured over IPv6 too, in the same rounds:
//! Switchboard's services get the IPv6 twin of every ClusterIP once their IPv4 programming has
//! been timed. kube-proxy's rules are generated for IPv4 only.
use std::{
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use lb_userspace::{
    datapath::{Capacity, Datapath, attach::Attacher, maps::ServiceMaps},
    lab::{Lab, ipv6_of},
    reconcile::Reconciler,
};
use serde::Serialize;

use crate::{
    kube_proxy_rules::{self, Protocol, ServicePort},
    process,
    scratch::{PIN_OWNER, PinDir, unique_prefix},
    services::{self, CIDRS, ENDPOINTS_PER_SERVICE, Family},
    stats,
    traffic::{self, Sample, Servers, Workload},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const TCP_PORT: u16 = 80;
const TCP_TARGET_PORT: u16 = 8080;
const UDP_PORT: u16 = 53;
const UDP_TARGET_PORT: u16 = 5353;
/// The endpoints: 10.244.0.10-14 on backend-0 and 10.244.0.15-19 on backend-1.
const BACKEND_PODS: usize = 2;
/// Rule loading is bounded like everything else; 10k services load in seconds.
const LOAD_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a setup may take to carry its first transaction before it is declared broken.
const WARM_UP_LIMIT: Duration = Duration::from_secs(5);

pub struct Settings {
    pub service_counts: Vec<usize>,
    pub rounds: usize,
    pub sample: Duration,
    pub warmup: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Setup {
    Direct,
    Switchboard,
    IptablesNft,
    IptablesLegacy,
    Nftables,
}

impl Setup {
    pub const ALL: [Setup; 5] = [
        Self::Direct,
        Self::Switchboard,
        Self::IptablesNft,
        Self::IptablesLegacy,
        Self::Nftables,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct to pod",
            Self::Switchboard => "Switchboard",
            Self::IptablesNft => "iptables (nf_tables)",
            Self::IptablesLegacy => "iptables-legacy",
            Self::Nftables => "nftables",
        }
    }

    fn tag(self) -> char {
        match self {
            Self::Direct => 'd',
            Self::Switchboard => 's',
            Self::IptablesNft => 'i',
            Self::IptablesLegacy => 'l',
            Self::Nftables => 'n',
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub services: usize,
    pub workload: Workload,
    pub setup: Setup,
    pub family: Family,
    /// Median over rounds.
    pub rate_per_s: f64,
    /// Medians over rounds of the per-round ratios, to the other setup in the same family.
    pub ratio_to_direct: f64,
    pub ratio_to_switchboard: f64,
    /// IPv6 rows: to the same setup's IPv4 rate, per round.
    pub ratio_to_ipv4: Option<f64>,
    pub failed_transactions: u64,
    pub samples_per_s: Vec<f64>,
}

#[derive(Debug, Serialize)]
pub struct Results {
    pub rounds: usize,
    pub sample_seconds: f64,
    pub client_threads: usize,
    pub backend_pods: usize,
    pub endpoints: usize,
    /// Seconds each setup took to program each service count (rules loaded, maps written).
    pub programming_seconds: Vec<(Setup, usize, f64)>,
    pub rows: Vec<Row>,
}

/// A setup measured in an address family: the five setups over IPv4, and over IPv6 those that
/// serve it here (kube-proxy's rule generator writes IPv4 rules only).
#[derive(Clone, Copy)]
struct Path {
    node: usize,
    family: Family,
}

const IPV6_SETUPS: [Setup; 2] = [Setup::Direct, Setup::Switchboard];

fn paths() -> Vec<Path> {
    let ipv4 = (0..Setup::ALL.len()).map(|node| Path {
        node,
        family: Family::Ipv4,
    });
    let ipv6 = IPV6_SETUPS.iter().map(|&setup| Path {
        node: index_of(setup),
        family: Family::Ipv6,
    });
    ipv4.chain(ipv6).collect()
}

pub fn run(settings: &Settings) -> anyhow::Result<Results> {
    let largest = settings.service_counts.iter().copied().max().unwrap_or(1);
    let mut nodes = Setup::ALL
        .iter()
        .map(|&setup| Node::build(setup, largest))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let paths = paths();
    let mut programming_seconds = Vec::new();
    let mut rows = Vec::new();
    for &count in &settings.service_counts {
        let ports = services::with_fillers(&measured(), count.saturating_sub(1));
        for node in &mut nodes {
            let started = Instant::now();
            node.program(&ports, &[Family::Ipv4])
                .with_context(|| format!("programming {} with {count} services", node.setup.label()))?;
            let seconds = started.elapsed().as_secs_f64();
            eprintln!(
                "[e2e] {:<22} {count:>6} services programmed in {seconds:.2} s",
                node.setup.label()
            );
            programming_seconds.push((node.setup, count, seconds));
        }
        // Switchboard's services become dual-stack: the diff adds their IPv6 frontends. Kept out
        // of the timing above, which is compared with IPv4-only rule sets.
        let switchboard = &mut nodes[index_of(Setup::Switchboard)];
        switchboard
            .program(&ports, &Family::ALL)
            .with_context(|| format!("programming the IPv6 twins of {count} services"))?;
        for path in &paths {
            for workload in Workload::ALL {
                nodes[path.node].warm_up(workload, path.family, settings.warmup)?;
            }
        }
        // samples[workload][path] over rounds, paths interleaved in rotating order.
        let mut samples = vec![vec![Vec::<Sample>::new(); paths.len()]; Workload::ALL.len()];
        let order: Vec<usize> = (0..paths.len()).collect();
        for round in 0..settings.rounds {
            for (w, &workload) in Workload::ALL.iter().enumerate() {
                for p in stats::rotated(&order, round + w) {
                    let Path { node, family } = paths[p];
                    samples[w][p].push(nodes[node].sample(workload, family, settings.sample)?);
                }
            }
        }
        for (w, &workload) in Workload::ALL.iter().enumerate() {
            let rates: Vec<Vec<f64>> = samples[w]
                .iter()
                .map(|s| s.iter().map(Sample::rate).collect())
                .collect();
            let rates_of = |setup: Setup, family: Family| {
                paths
                    .iter()
                    .position(|p| nodes[p.node].setup == setup && p.family == family)
                    .map(|p| rates[p].as_slice())
            };
            for (p, path) in paths.iter().enumerate() {
                let setup = nodes[path.node].setup;
                let ratio_to = |other: Setup, family: Family| {
                    rates_of(other, family).map_or(f64::NAN, |other| stats::paired_ratio(&rates[p], other))
                };
                let row = Row {
                    services: count,
                    workload,
                    setup,
                    family: path.family,
                    rate_per_s: stats::median(&rates[p]),
                    ratio_to_direct: ratio_to(Setup::Direct, path.family),
                    ratio_to_switchboard: ratio_to(Setup::Switchboard, path.family),
                    ratio_to_ipv4: (path.family != Family::Ipv4).then(|| ratio_to(setup, Family::Ipv4)),
                    failed_transactions: samples[w][p].iter().map(|s| s.failed).sum(),
                    samples_per_s: rates[p].clone(),
                };
                print_row(&row);
                rows.push(row);
            }
        }
    }
    Ok(Results {
        rounds: settings.rounds,
        sample_seconds: settings.sample.as_secs_f64(),
        client_threads: 1,
        backend_pods: BACKEND_PODS,
        endpoints: ENDPOINTS_PER_SERVICE,
        programming_seconds,
        rows,
    })
}

fn print_row(row: &Row) {
    eprintln!(
        "[e2e] {:>6} services  {:<5} {} {:<22} {:>8.0} {}  ×{:.3} of direct  ×{:.3} of Switchboard{}{}",
        row.services,
        match row.workload {
            Workload::TcpCrr => "TCP",
            Workload::UdpRr => "UDP",
        },
        row.family.label(),
        row.setup.label(),
        row.rate_per_s,
        row.workload.unit(),
        row.ratio_to_direct,
        row.ratio_to_switchboard,
        row.ratio_to_ipv4
            .map_or(String::new(), |r| format!("  ×{r:.3} of IPv4")),
        if row.failed_transactions > 0 {
            format!("  ({} failed)", row.failed_transactions)
        } else {
            String::new()
        }
    );
}

fn index_of(setup: Setup) -> usize {
    Setup::ALL
        .iter()
        .position(|s| *s == setup)
        .expect("every setup is built")
}

fn endpoints() -> Vec<Ipv4Addr> {
    (0..ENDPOINTS_PER_SERVICE as u8)
        .map(|i| Ipv4Addr::new(10, 244, 0, 10 + i))
        .collect()
}

/// The measured service: one TCP and one UDP port on the same ClusterIP, over every endpoint.
fn measured() -> Vec<ServicePort> {
    let port = |port_name: &str, protocol, port, target| ServicePort {
        namespace: "bench".into(),
        name: "echo".into(),
        port_name: port_name.into(),
        cluster_ip: CLUSTER_IP,
        port,
        protocol,
        endpoints: endpoints().into_iter().map(|ip| (ip, target)).collect(),
    };
    vec![
        port("tcp", Protocol::Tcp, TCP_PORT, TCP_TARGET_PORT),
        port("udp", Protocol::Udp, UDP_PORT, UDP_TARGET_PORT),
    ]
}

/// One setup's lab: the node namespace, the pods and their servers, and for Switchboard the
/// agent. Field order is drop order: servers stop, the agent detaches, then the lab goes.
struct Node {
    setup: Setup,
    _servers: Vec<Servers>,
    agent: Option<Agent>,
    lab: Lab,
}

impl Node {
    fn build(setup: Setup, largest: usize) -> anyhow::Result<Self> {
        let mut lab = Lab::new(&unique_prefix(setup.tag()))?;
        let client = lab.add_pod("client", CLIENT)?;
        // TCP_CRR leaves a TIME_WAIT socket per connection on the client: let it reuse ports
        // after a second, from the whole port range, as busy clients are tuned to.
        client.ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        client.ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        let mut servers = Vec::new();
        let per_pod = ENDPOINTS_PER_SERVICE / BACKEND_PODS;
        for (b, addresses) in endpoints().chunks(per_pod).enumerate() {
            let name = format!("backend-{b}");
            let host_interface = lab.add_pod(&name, addresses[0])?.host_interface.clone();
            let pod = lab.pod(&name);
            // The pod's other endpoint addresses in both families, as if it were several pods.
            for address in &addresses[1..] {
                let (ipv4, ipv6) = (format!("{address}/32"), format!("{}/128", ipv6_of(*address)));
                pod.ns.ip(&["addr", "add", &ipv4, "dev", "eth0"])?;
                // No duplicate address detection, so the address works at once.
                pod.ns.ip(&["addr", "add", &ipv6, "dev", "eth0", "nodad"])?;
                for address in [&ipv4, &ipv6] {
                    lab.node.ip(&["route", "add", address, "dev", &host_interface])?;
                }
            }
            servers.push(Servers::start(
                &pod.ns,
                addresses,
                TCP_TARGET_PORT,
                UDP_TARGET_PORT,
            )?);
        }
        let agent = match setup {
            Setup::Switchboard => Some(Agent::start(&lab, largest)?),
            _ => None,
        };
        Ok(Self {
            setup,
            _servers: servers,
            agent,
            lab,
        })
    }

    /// Makes the node serve exactly `ports`, in `families` where it can (the kube-proxy rule
    /// sets are IPv4).
    fn program(&mut self, ports: &[ServicePort], families: &[Family]) -> anyhow::Result<()> {
        let (program, args, rules): (&str, &[&str], String) = match self.setup {
            Setup::Direct => return Ok(()),
            Setup::Switchboard => {
                let agent = self.agent.as_mut().expect("started with the node");
                return agent.apply(ports, families);
            }
            Setup::IptablesNft => (
                "iptables-nft-restore",
                &[],
                kube_proxy_rules::iptables_restore(ports, CIDRS),
            ),
            Setup::IptablesLegacy => (
                "iptables-legacy-restore",
                &["-w"],
                kube_proxy_rules::iptables_restore(ports, CIDRS),
            ),
            Setup::Nftables => ("nft", &["-f", "-"], kube_proxy_rules::nft_script(ports, CIDRS)),
        };
        let file = process::temp_file_with(&rules)?;
        process::run(
            Some(&self.lab.node),
            Command::new(program).args(args),
            Some(file.path()),
            LOAD_TIMEOUT,
        )?;
        Ok(())
    }

    /// Runs `workload` until a transaction has gone through (neighbours resolved, rules and
    /// maps in effect), then for `duration` more, unmeasured.
    fn warm_up(&self, workload: Workload, family: Family, duration: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + WARM_UP_LIMIT;
        loop {
            let sample = self.sample(workload, family, Duration::from_millis(50))?;
            if sample.completed > 0 {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "{} over {}: not one {} transaction completed in {WARM_UP_LIMIT:?}",
                self.setup.label(),
                family.label(),
                workload.label()
            );
        }
        self.sample(workload, family, duration).map(drop)
    }

    fn sample(&self, workload: Workload, family: Family, duration: Duration) -> anyhow::Result<Sample> {
        let at = |ip, port| SocketAddr::new(family.address(ip), port);
        let targets: Vec<SocketAddr> = match (self.setup, workload) {
            (Setup::Direct, Workload::TcpCrr) => endpoints()
                .into_iter()
                .map(|ip| at(ip, TCP_TARGET_PORT))
                .collect(),
            (Setup::Direct, Workload::UdpRr) => vec![at(endpoints()[0], UDP_TARGET_PORT)],
            (_, Workload::TcpCrr) => vec![at(CLUSTER_IP, TCP_PORT)],
            (_, Workload::UdpRr) => vec![at(CLUSTER_IP, UDP_PORT)],
        };
        traffic::run(&self.lab.pod("client").ns, workload, &targets, duration)
    }
}

/// Switchboard's agent, in-process: the datapath attached to the lab's pod interfaces and the
/// reconciler writing its maps. Detaches on drop.
struct Agent {
    reconciler: Reconciler,
    maps: ServiceMaps,
    attacher: Attacher,
    _datapath: Datapath,
    _pins: PinDir,
}

impl Agent {
    fn start(lab: &Lab, largest: usize) -> anyhow::Result<Self> {
        let pins = PinDir::new(PIN_OWNER, "e2e");
        let default = Capacity::default();
        // Each family has a map of services and one of backends.
        let capacity = Capacity {
            services: default.services.max(largest as u32 + 16),
            backends: default
                .backends
                .max((largest * ENDPOINTS_PER_SERVICE) as u32 + 64),
            ..default
        };
        let mut datapath = Datapath::load_with_capacity(pins.path(), capacity)?;
        let maps = datapath.maps()?;
        let reconciler = Reconciler::new(maps.read_programmed()?);
        // Attacher::sync lists interfaces in the calling thread's namespace: run it in the node's.
        let pattern = lab.interface_pattern();
        let pin_dir = pins.path().to_owned();
        let (datapath, attacher) = lab.node.run(move || -> anyhow::Result<_> {
            let mut attacher = Attacher::new(&mut datapath.ebpf, &pattern, &pin_dir)?;
            attacher.sync(&mut datapath.ebpf)?;
            Ok((datapath, attacher))
        })??;
        let attached = attacher.interfaces().len();
        if attached != lab.pods.len() {
            bail!(
                "Switchboard attached to {attached} interfaces, the lab has {} pods",
                lab.pods.len()
            );
        }
        Ok(Self {
            reconciler,
            maps,
            attacher,
            _datapath: datapath,
            _pins: pins,
        })
    }

    fn apply(&mut self, ports: &[ServicePort], families: &[Family]) -> anyhow::Result<()> {
        let desired = services::desired(ports, families);
        let report = self.reconciler.apply(&desired, &mut self.maps);
        ensure!(report.failed.is_empty(), "map writes failed: {:?}", report.failed);
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // The links are pinned (so a real agent's restart keeps serving): unpin them to detach.
        self.attacher.detach_all();
    }
}
