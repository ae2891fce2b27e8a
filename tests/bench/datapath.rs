//! Datapath cost per packet: `from_pod` (TC) and `nodeport` (XDP) run by BPF_PROG_TEST_RUN on
//! crafted packets, with 1, 1k, 10k and 100k services programmed (10 backends each). Both
//! programs meet the same frontends, so their rows compare TC and XDP on the same work.
//!
//! Each service count gets its own loaded datapath with its own maps, all created with the same
//! capacities (so hash tables have the same bucket counts and only their occupancy differs), and
//! the rounds visit them in rotating order: the ratio to 1 service compares runs taken
//! seconds apart, not minutes.
//!
//! Three packets, as the issue lists them:
//! * an established flow: BPF_PROG_TEST_RUN hands the *same* skb to every repetition, so after
//!   one DNAT the next repetition would see a packet for the backend. The measured flow therefore
//!   goes to a pair of frontends that are each other's only backend (A → B, B → A): every
//!   repetition finds the flow in conntrack and does the full rewrite.
//! * a new flow: a conntrack miss happens once per 5-tuple, so each SYN gets its own source and
//!   its own BPF_PROG_TEST_RUN with repeat = 1. Those timings include the kernel's per-run timer
//!   reads; the report gives that floor (a non-service packet run the same way) beside them.
//! * a non-service packet: to a pod address, which misses the service map and passes.
//!
//! `from_pod` runs as on a node with the agent's defaults: its reverse-path check is on, and each
//! run is given a pod interface (in a network namespace of the bench's) whose routes lead back to
//! every client, so a packet that opens a connection includes the check's FIB lookup (a new
//! flow's SYN does; an established flow's segments are not checked).
//!
//! Every packet is measured twice in each round, as IPv4 and as IPv6 (the same addresses'
//! [`ipv6_of`](lb_userspace::lab::ipv6_of) twins): each instance carries its N services in both
//! families, in the twin maps the same programs dispatch to on the EtherType. What serving IPv6
//! costs the IPv4 path (that branch) is not measured: there is no IPv4-only build to compare to.
use lb_userspace::datapath::load_program;
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context as _, bail, ensure};
use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions, TestRunResult, Xdp};
use etherparse::PacketBuilder;
use lb_common::{Stat, program_names};
use lb_userspace::{
    datapath::{Capacity, Datapath, maps::ServiceMaps},
    lab::NetNs,
    reconcile::Reconciler,
};
use serde::Serialize;

use crate::{
    kube_proxy_rules::{Protocol, ServicePort},
    scratch::{PIN_OWNER, PinDir},
    services::{self, ENDPOINTS_PER_SERVICE, Family},
    stats,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const XDP_PASS: u32 = 2;
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
/// Frontend for new flows: a service with ten backends.
const NEW_FLOW_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The ping-pong pair for established flows (see the module comment).
const PING: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 96, 0, 20), 80);
const PONG: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 96, 0, 21), 8080);
/// A pod: not a frontend.
const POD: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 244, 0, 10), 8080);

#[derive(Clone)]
pub struct Settings {
    pub service_counts: Vec<usize>,
    pub rounds: usize,
    /// Repetitions per BPF_PROG_TEST_RUN for the established and non-service packets.
    pub repeat: u32,
    /// Distinct new flows per round and service count.
    pub new_flows: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PacketKind {
    Established,
    NewFlow,
    NonService,
    XdpEstablished,
    XdpNewFlow,
    XdpNonService,
}

impl PacketKind {
    pub const ALL: [PacketKind; 6] = [
        Self::Established,
        Self::NewFlow,
        Self::NonService,
        Self::XdpEstablished,
        Self::XdpNewFlow,
        Self::XdpNonService,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Established => "established flow",
            Self::NewFlow => "first packet of a new flow",
            Self::NonService => "non-service packet",
            Self::XdpEstablished => "XDP: established flow",
            Self::XdpNewFlow => "XDP: first packet of a new flow",
            Self::XdpNonService => "XDP: non-service packet",
        }
    }

    /// The program that handles this packet.
    fn hook(self) -> Hook {
        match self {
            Self::Established | Self::NewFlow | Self::NonService => Hook::Tc,
            Self::XdpEstablished | Self::XdpNewFlow | Self::XdpNonService => Hook::Xdp,
        }
    }

    /// The same packet at the other hook.
    pub fn tc_twin(self) -> Self {
        match self {
            Self::XdpEstablished => Self::Established,
            Self::XdpNewFlow => Self::NewFlow,
            Self::XdpNonService => Self::NonService,
            tc => tc,
        }
    }
}

/// `from_pod` at TC ingress of a pod interface, or `nodeport` at XDP on an external one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    Tc,
    Xdp,
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub services: usize,
    pub family: Family,
    pub packet: PacketKind,
    pub ns_per_packet: f64,
    /// Median over rounds of (this count's time / 1 service's time in the same round), within
    /// the family.
    pub ratio_to_one_service: f64,
    /// IPv6 rows: median over rounds of (this time / the same IPv4 packet's time in the same
    /// round and instance).
    pub ratio_to_ipv4: Option<f64>,
    pub samples_ns: Vec<f64>,
}

#[derive(Debug, Serialize)]
pub struct Results {
    pub repeat: u32,
    pub rounds: usize,
    pub new_flows_per_round: usize,
    /// The cost of one BPF_PROG_TEST_RUN with repeat = 1 beyond the program itself (timer reads),
    /// as the difference between a non-service packet run once and run `repeat` times.
    pub single_run_overhead_ns: f64,
    pub rows: Vec<Row>,
}

/// One loaded datapath holding `services` services.
struct Instance {
    services: usize,
    datapath: Datapath,
    maps: ServiceMaps,
    /// The `__sk_buff` BPF_PROG_TEST_RUN gives `from_pod`: on the pod interface.
    skb: Vec<u8>,
    _pins: PinDir,
}

/// The pod interface `from_pod` runs on: in a network namespace of its own, routing the
/// measured clients (10.244.0.0/16, the new flows' 10.200.0.0/16, and their IPv6 twins) back out
/// of it, with forwarding on, as a node's pod interface does.
const POD_INTERFACE: &str = "sbbench-pod";
/// A client no route leads back to: its SYN is dropped as spoofed.
const NOWHERE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

pub fn run(settings: &Settings) -> anyhow::Result<Results> {
    let node = NetNs::create(&format!("sbbench-dp{}", std::process::id() % 100_000))?;
    node.sysctl("net.ipv4.ip_forward", "1")?;
    node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    node.ip(&[
        "link",
        "add",
        POD_INTERFACE,
        "type",
        "veth",
        "peer",
        "name",
        "sbbench-peer",
    ])?;
    for interface in [POD_INTERFACE, "sbbench-peer"] {
        node.ip(&["link", "set", interface, "up"])?;
    }
    // The IPv6 twins: `ipv6_of` writes a.b.c.d as fd00:a:b:c::d.
    for prefix in [
        "10.244.0.0/16",
        "10.200.0.0/16",
        "fd00:10:244::/48",
        "fd00:10:200::/48",
    ] {
        node.ip(&["route", "add", prefix, "dev", POD_INTERFACE])?;
    }
    let ifindex = node.run(|| nix::net::if_::if_nametoindex(POD_INTERFACE))??;
    let settings = settings.clone();
    node.run(move || measure(&settings, ifindex))?
}

/// The section, in the bench's node namespace, `from_pod` running on interface `ifindex`.
fn measure(settings: &Settings, ifindex: u32) -> anyhow::Result<Results> {
    let largest = settings.service_counts.iter().copied().max().unwrap_or(1);
    // Each family has a map of services and one of backends.
    let capacity = Capacity {
        services: (largest + 16) as u32,
        backends: (largest * ENDPOINTS_PER_SERVICE + 64) as u32,
        ..Capacity::default()
    };
    let mut instances = Vec::new();
    for &count in &settings.service_counts {
        let started = std::time::Instant::now();
        instances.push(Instance::new(count, capacity, ifindex)?);
        eprintln!(
            "[datapath] {count} services programmed in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }

    // samples[instance][family][kind][round]
    let mut samples = vec![vec![vec![Vec::new(); PacketKind::ALL.len()]; Family::ALL.len()]; instances.len()];
    let mut overhead = Vec::new();
    let mut next_flow = 0u32;
    let indexes: Vec<usize> = (0..instances.len()).collect();
    for round in 0..settings.rounds {
        for i in stats::rotated(&indexes, round) {
            let instance = &mut instances[i];
            // The families alternate which goes first, like everything else compared.
            for f in stats::rotated(&[0, 1], round) {
                for (k, &kind) in PacketKind::ALL.iter().enumerate() {
                    let ns = instance.measure(Family::ALL[f], kind, settings, &mut next_flow)?;
                    samples[i][f][k].push(ns);
                }
            }
            let non_service = PacketKind::ALL.iter().position(|k| *k == PacketKind::NonService);
            let repeated = samples[i][0][non_service.expect("a kind of ALL")][round];
            overhead.push(instance.non_service_single_runs(settings.new_flows)? - repeated);
        }
    }

    let baseline = instances
        .iter()
        .position(|i| i.services == settings.service_counts[0])
        .expect("the first count is loaded");
    let mut rows = Vec::new();
    for (i, instance) in instances.iter().enumerate() {
        for (f, &family) in Family::ALL.iter().enumerate() {
            for (k, kind) in PacketKind::ALL.iter().enumerate() {
                let ns = stats::median(&samples[i][f][k]);
                let ratio = stats::paired_ratio(&samples[i][f][k], &samples[baseline][f][k]);
                let ratio_to_ipv4 = (family != Family::Ipv4)
                    .then(|| stats::paired_ratio(&samples[i][f][k], &samples[i][0][k]));
                eprintln!(
                    "[datapath] {:>6} services, {} {:<27} {:>7.1} ns/packet  ×{ratio:.3} of {} service(s){}",
                    instance.services,
                    family.label(),
                    kind.label(),
                    ns,
                    settings.service_counts[0],
                    ratio_to_ipv4.map_or(String::new(), |r| format!("  ×{r:.3} of IPv4")),
                );
                rows.push(Row {
                    services: instance.services,
                    family,
                    packet: *kind,
                    ns_per_packet: ns,
                    ratio_to_one_service: ratio,
                    ratio_to_ipv4,
                    samples_ns: samples[i][f][k].clone(),
                });
            }
        }
    }
    Ok(Results {
        repeat: settings.repeat,
        rounds: settings.rounds,
        new_flows_per_round: settings.new_flows,
        single_run_overhead_ns: stats::median(&overhead),
        rows,
    })
}

/// The measured frontends: the ping-pong pair and the new-flow service, as service ports.
fn measured() -> Vec<ServicePort> {
    let port = |name: &str, (ip, port): (Ipv4Addr, u16), endpoints: Vec<(Ipv4Addr, u16)>| ServicePort {
        namespace: "bench".into(),
        name: name.into(),
        port_name: "p".into(),
        cluster_ip: ip,
        port,
        protocol: Protocol::Tcp,
        endpoints,
    };
    let pods = (0..ENDPOINTS_PER_SERVICE as u8)
        .map(|j| (Ipv4Addr::new(10, 244, 0, 10 + j), 8080))
        .collect();
    vec![
        port("ping", PING, vec![PONG]),
        port("pong", PONG, vec![PING]),
        port("new-flows", (NEW_FLOW_VIP, 80), pods),
    ]
}

impl Instance {
    /// A datapath with the measured frontends and `services - 1` fillers (what programming
    /// them costs is the control-plane section's business).
    fn new(services: usize, capacity: Capacity, ifindex: u32) -> anyhow::Result<Self> {
        let pins = PinDir::new(PIN_OWNER, &format!("dp{services}"));
        let mut datapath = Datapath::load_with_capacity(pins.path(), capacity)?;
        let mut maps = datapath.maps()?;
        // As the agent sets it by default.
        maps.set_source_check(true)?;
        let all = services::with_fillers(&measured(), services.saturating_sub(1));
        write_services(&mut maps, &all)?;
        drop(all);
        let from_pod = tc_program(&mut datapath)?;
        load_program(|| from_pod.load()).context("the kernel refused from_pod")?;
        let nodeport = xdp_program(&mut datapath)?;
        load_program(|| nodeport.load()).context("the kernel refused nodeport")?;
        let mut instance = Self {
            services,
            datapath,
            maps,
            skb: skb_on(ifindex),
            _pins: pins,
        };
        instance.check_paths()?;
        Ok(instance)
    }

    /// Makes sure each packet takes the path it is named for, by the datapath's own counters.
    fn check_paths(&mut self) -> anyhow::Result<()> {
        for (family, hook) in Family::ALL
            .into_iter()
            .flat_map(|family| [(family, Hook::Tc), (family, Hook::Xdp)])
        {
            // Two runs set up both directions of the ping-pong flow.
            let packet = tcp_packet(family, ping_client(hook), PING, false);
            self.test_run(hook, &packet, 2)?;
            let flows = self.maps.stat(Stat::NewFlows)?;
            let packets = self.maps.stat(Stat::ServicePackets)?;
            self.test_run(hook, &packet, 100)?;
            ensure!(
                self.maps.stat(Stat::NewFlows)? == flows,
                "the {} established-flow packet created flows at {hook:?}: it is not measuring an established flow",
                family.label()
            );
            ensure!(
                self.maps.stat(Stat::ServicePackets)? == packets + 100,
                "the {} established-flow packet did not reach its service at {hook:?}",
                family.label()
            );
            let packets = self.maps.stat(Stat::ServicePackets)?;
            self.test_run(hook, &tcp_packet(family, (CLIENT, 40000), POD, false), 100)?;
            ensure!(
                self.maps.stat(Stat::ServicePackets)? == packets,
                "the {} non-service packet was treated as a service packet at {hook:?}",
                family.label()
            );
        }
        // The reverse-path check runs: a SYN from a client no route leads back to is dropped.
        for family in Family::ALL {
            let spoofed = self.maps.stat(Stat::SpoofedSource)?;
            let syn = tcp_packet(family, (NOWHERE, 40000), (NEW_FLOW_VIP, 80), true);
            let verdict = self.run_once(Hook::Tc, &syn, 1)?.return_value;
            ensure!(
                verdict == TC_ACT_SHOT && self.maps.stat(Stat::SpoofedSource)? == spoofed + 1,
                "from_pod did not check the {} SYN's source (verdict {verdict})",
                family.label()
            );
        }
        Ok(())
    }

    /// One sample of `kind` in `family`; new flows take their sources from `next_flow` on.
    fn measure(
        &mut self,
        family: Family,
        kind: PacketKind,
        settings: &Settings,
        next_flow: &mut u32,
    ) -> anyhow::Result<f64> {
        let hook = kind.hook();
        match kind {
            PacketKind::Established | PacketKind::XdpEstablished => {
                self.established(family, hook, settings.repeat)
            }
            PacketKind::NewFlow | PacketKind::XdpNewFlow => {
                let ns = self.new_flows(family, hook, *next_flow, settings.new_flows)?;
                *next_flow += settings.new_flows as u32;
                Ok(ns)
            }
            PacketKind::NonService | PacketKind::XdpNonService => {
                self.non_service(family, hook, settings.repeat)
            }
        }
    }

    fn established(&mut self, family: Family, hook: Hook, repeat: u32) -> anyhow::Result<f64> {
        self.test_run(hook, &tcp_packet(family, ping_client(hook), PING, false), repeat)
    }

    fn non_service(&mut self, family: Family, hook: Hook, repeat: u32) -> anyhow::Result<f64> {
        self.test_run(hook, &tcp_packet(family, (CLIENT, 40000), POD, false), repeat)
    }

    /// The median time of `count` runs of one IPv4 non-service packet each: the repeat = 1
    /// floor.
    fn non_service_single_runs(&mut self, count: usize) -> anyhow::Result<f64> {
        let packet = tcp_packet(Family::Ipv4, (CLIENT, 40000), POD, false);
        let times: Vec<f64> = (0..count)
            .map(|_| self.test_run(Hook::Tc, &packet, 1))
            .collect::<Result<_, _>>()?;
        Ok(stats::median(&times))
    }

    /// The median time of `count` SYNs, each from a source never used before.
    fn new_flows(&mut self, family: Family, hook: Hook, first: u32, count: usize) -> anyhow::Result<f64> {
        let before = self.maps.stat(Stat::NewFlows)?;
        let mut times = Vec::with_capacity(count);
        for flow in first..first + count as u32 {
            // 10.200.0.0/16 × 1000 ports: unique for 65M flows.
            let source = Ipv4Addr::from(u32::from_be_bytes([10, 200, 0, 0]) + flow / 1000);
            let source = (source, 20000 + (flow % 1000) as u16);
            let packet = tcp_packet(family, source, (NEW_FLOW_VIP, 80), true);
            times.push(self.test_run(hook, &packet, 1)?);
        }
        let created = self.maps.stat(Stat::NewFlows)? - before;
        ensure!(
            created == count as u64,
            "{count} SYNs created {created} flows: not every one was a new flow"
        );
        Ok(stats::median(&times))
    }

    /// `repeat` runs of the program at `hook` on `packet` (TC: on the pod interface).
    fn run_once(&mut self, hook: Hook, packet: &[u8], repeat: u32) -> anyhow::Result<TestRunResult> {
        let options = TestRunOptions {
            data_in: Some(packet),
            repeat,
            ..Default::default()
        };
        let result = match hook {
            Hook::Tc => tc_program(&mut self.datapath)?.test_run(TestRunOptions {
                ctx_in: Some(&self.skb),
                ..options
            }),
            Hook::Xdp => xdp_program(&mut self.datapath)?.test_run(options),
        };
        result.with_context(|| format!("BPF_PROG_TEST_RUN at {hook:?} failed"))
    }

    /// Nanoseconds per run of the program at `hook` on `packet`, as the kernel timed it.
    fn test_run(&mut self, hook: Hook, packet: &[u8], repeat: u32) -> anyhow::Result<f64> {
        let pass = match hook {
            Hook::Tc => TC_ACT_OK,
            Hook::Xdp => XDP_PASS,
        };
        let result = self.run_once(hook, packet, repeat)?;
        if result.return_value != pass {
            bail!(
                "the program at {hook:?} returned {} instead of passing the packet",
                result.return_value
            );
        }
        // The kernel reports the mean time per repetition.
        Ok(result.duration.as_nanos() as f64)
    }
}

/// The `struct __sk_buff` BPF_PROG_TEST_RUN builds its skb from: all zero (the kernel's
/// defaults) but `ifindex`, the device the packet arrives on. It is the eleventh `u32` of the
/// struct (after len, pkt_type, mark, queue_mapping, protocol, vlan_present, vlan_tci,
/// vlan_proto, priority and ingress_ifindex); the kernel takes a prefix of the struct.
fn skb_on(ifindex: u32) -> Vec<u8> {
    const IFINDEX_AT: usize = 10 * 4;
    let mut skb = vec![0; IFINDEX_AT + 4];
    skb[IFINDEX_AT..].copy_from_slice(&ifindex.to_ne_bytes());
    skb
}

/// The ping-pong client: one per hook, so each hook's flow is its own.
fn ping_client(hook: Hook) -> (Ipv4Addr, u16) {
    match hook {
        Hook::Tc => (CLIENT, 40000),
        Hook::Xdp => (CLIENT, 40001),
    }
}

fn tc_program(datapath: &mut Datapath) -> anyhow::Result<&mut SchedClassifier> {
    Ok(datapath
        .ebpf
        .program_mut(program_names::FROM_POD)
        .context("from_pod is missing from the datapath object")?
        .try_into()?)
}

fn xdp_program(datapath: &mut Datapath) -> anyhow::Result<&mut Xdp> {
    Ok(datapath
        .ebpf
        .program_mut(program_names::NODEPORT_XDP)
        .context("nodeport is missing from the datapath object")?
        .try_into()?)
}

/// Programs `ports` in both families through the reconciler, random backend choice.
fn write_services(maps: &mut ServiceMaps, ports: &[ServicePort]) -> anyhow::Result<()> {
    let mut reconciler = Reconciler::new(maps.read_programmed()?);
    let report = reconciler.apply(&services::desired(ports, &Family::ALL), maps);
    anyhow::ensure!(
        report.failed.is_empty(),
        "cannot program the services: {:?}",
        report.failed
    );
    Ok(())
}

/// An Ethernet/IP/TCP packet in `family`: a SYN, or an ACK carrying 64 bytes.
fn tcp_packet(family: Family, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), syn: bool) -> Vec<u8> {
    let ethernet = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1]);
    let ip = match (family.address(src.0), family.address(dst.0)) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ethernet.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => ethernet.ipv6(s.octets(), d.octets(), 64),
        _ => unreachable!("both addresses are in one family"),
    };
    let builder = ip.tcp(src.1, dst.1, 1000, 64240);
    let (builder, payload): (_, &[u8]) = if syn {
        (builder.syn(), &[])
    } else {
        (builder.ack(1).psh(), &[0x42; 64])
    };
    let mut packet = Vec::new();
    builder.write(&mut packet, payload).expect("a valid packet");
    packet
}
