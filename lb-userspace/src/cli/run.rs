//! `switchboard run`: the agent's flags, handed to [`crate::agent::run`].
use std::{path::PathBuf, process::ExitCode, time::Duration};

use lb_common::RejectLimit;

use super::{PinDir, source::SourceArgs};
use crate::{
    agent::{self, Settings, Source, interfaces::Hooks},
    datapath::{Capacity, attach::XdpChoice, conntrack_gc::Timeouts},
    model::LbAlgorithm,
    reconcile::{self, MaglevSize, PlanOptions},
};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Glob matching the host-side interfaces of pods, e.g. 'veth*' or 'cali*'. Interfaces that
    /// appear later are attached too.
    #[arg(long, env = "SWITCHBOARD_INTERFACES", value_name = "PATTERN")]
    pub interfaces: String,
    /// Glob matching the node's external interfaces, e.g. 'eth0' or 'ens*': NodePorts,
    /// LoadBalancer IPs and externalIPs are served to traffic arriving on them. Without it,
    /// only pods reach services.
    #[arg(long, env = "SWITCHBOARD_EXTERNAL_INTERFACES", value_name = "PATTERN")]
    pub external_interfaces: Option<String>,
    /// XDP on the external interfaces: auto (native where the driver has it, else generic, said
    /// per interface), native, generic, or off (TC ingress only).
    #[arg(long, env = "SWITCHBOARD_XDP_MODE", value_enum, default_value_t = XdpChoice::Auto)]
    pub xdp_mode: XdpChoice,
    /// The cgroup (v2) whose processes in the agent's network namespace (host processes and
    /// hostNetwork pods) reach ClusterIPs and NodePorts, 127.0.0.1:<nodePort> included, through
    /// connect()-time translation. Default: the root of the cgroup v2 hierarchy. `off`: none.
    #[arg(long, env = "SWITCHBOARD_HOST_CGROUP", value_name = "PATH|off")]
    pub host_cgroup: Option<String>,
    /// On SIGTERM/SIGINT leave the programs attached (the links stay pinned), so traffic keeps
    /// flowing until the next agent takes over, as a DaemonSet rollout wants. Without it the
    /// agent detaches on exit. A killed agent always leaves them attached.
    #[arg(long, env = "SWITCHBOARD_KEEP_DATAPATH")]
    pub keep_datapath: bool,
    /// Where to serve /metrics (Prometheus), /healthz and /livez. Loopback by default: expose it
    /// deliberately (port 0 picks a free one).
    #[arg(long, env = "SWITCHBOARD_METRICS_ADDRESS", default_value = "127.0.0.1:10249")]
    pub metrics_address: std::net::SocketAddr,
    /// Backend selection for Services without the `switchboard.io/lb-algorithm` annotation.
    #[arg(long, env = "SWITCHBOARD_LB_ALGORITHM", value_enum, default_value_t = LbAlgorithm::Maglev)]
    pub lb_algorithm: LbAlgorithm,
    /// Positions in each Maglev table. `auto`: scaled to the Service's backends, the smallest of
    /// 1021, 2039, 4093, … 1048573 (primes, each about twice the last) with 100 positions per
    /// backend, so each backend owns its share within about 1% (1021 up to 10 backends: 4 KiB).
    /// A prime: that size for every table, whatever its backends. A table takes 4 bytes per
    /// position, once per Service port and family (its frontends share it).
    #[arg(long, env = "SWITCHBOARD_MAGLEV_TABLE_SIZE", default_value = "auto", value_parser = maglev_size)]
    pub maglev_table_size: MaglevSize,
    /// Load the datapath from this eBPF object (built from the same sources, e.g. by `cargo
    /// xtask build-ebpf`) instead of the one built into the binary. Its programs replace the
    /// running ones atomically and reuse the pinned maps, like any agent upgrade.
    #[arg(long, env = "SWITCHBOARD_BPF_OBJECT", value_name = "PATH")]
    pub bpf_object: Option<PathBuf>,
    /// How often the agent deletes finished flows from the conntrack map.
    #[arg(long, env = "SWITCHBOARD_CONNTRACK_GC_INTERVAL", default_value = "30s", value_parser = duration)]
    pub conntrack_gc_interval: Duration,
    /// How long an established TCP flow (or SCTP association) may stay idle before it is
    /// forgotten (a later packet of it is balanced anew; with Maglev to the same backend).
    #[arg(long, env = "SWITCHBOARD_CONNTRACK_TCP_TIMEOUT", default_value = "24h", value_parser = duration)]
    pub conntrack_tcp_timeout: Duration,
    /// How long a TCP flow that has seen a FIN or RST (an SCTP association an ABORT or SHUTDOWN
    /// COMPLETE) is kept after its last packet.
    #[arg(long, env = "SWITCHBOARD_CONNTRACK_TCP_CLOSING_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub conntrack_tcp_closing_timeout: Duration,
    /// How long a UDP flow may stay idle before it is forgotten.
    #[arg(long, env = "SWITCHBOARD_CONNTRACK_UDP_TIMEOUT", default_value = "60s", value_parser = duration)]
    pub conntrack_udp_timeout: Duration,
    /// Entries the conntrack map holds (a flow takes two: client side and reply side). When it
    /// is full the oldest flows are evicted, and the agent says so once per
    /// --conntrack-gc-interval. A map pinned by an earlier run keeps its size: run `switchboard
    /// uninstall` first to change it.
    #[arg(long, env = "SWITCHBOARD_CONNTRACK_CAPACITY", default_value_t = lb_common::capacity::CONNTRACK, value_parser = clap::value_parser!(u32).range(1..))]
    pub conntrack_capacity: u32,
    /// Frontends (ClusterIP, NodePort, … × port × protocol) each family's services map holds,
    /// and ClusterIPs. Frontends beyond it are not programmed: logged by name and counted in
    /// switchboard_programming_failures_total. Memory follows the entries in use (about 120
    /// bytes each); the capacity itself costs 16 bytes per entry.
    #[arg(long, env = "SWITCHBOARD_SERVICES_CAPACITY", default_value_t = lb_common::capacity::SERVICES, value_parser = clap::value_parser!(u32).range(1..))]
    pub services_capacity: u32,
    /// Backend entries each family's backends map holds: every endpoint once per backend set it
    /// is in (a Service port's frontends share one set; an eTP=Local one has a second for
    /// outside clients). Default: 4 × --services-capacity (1048576). Beyond it, Services are not
    /// programmed and are reported as above. Memory follows the entries in use (about 80 bytes
    /// each); the capacity costs 16 bytes per entry.
    #[arg(long, env = "SWITCHBOARD_BACKENDS_CAPACITY", value_parser = clap::value_parser!(u32).range(1..))]
    pub backends_capacity: Option<u32>,
    /// RST / ICMP unreachable replies (connections refused for want of an endpoint or port)
    /// each CPU may send per second; beyond it, and a burst of --reject-burst, the packets are
    /// dropped. 0: no limit.
    #[arg(long, env = "SWITCHBOARD_REJECT_RATE", default_value_t = 1000)]
    pub reject_rate: u32,
    /// Replies each CPU may send at once above --reject-rate.
    #[arg(long, env = "SWITCHBOARD_REJECT_BURST", default_value_t = 200)]
    pub reject_burst: u32,
    /// Drop a pod's packets that would open, close or create a service flow from a source
    /// address that does not route back out of the pod's interface (a reverse-path check
    /// through the kernel's FIB), so that no pod can take over or close another's flows by
    /// spoofing its address. `off` for pods that legitimately send from addresses routed
    /// elsewhere (counted as spoofed_source_drops otherwise).
    #[arg(long, env = "SWITCHBOARD_SOURCE_CHECK", value_enum, default_value_t = Switch::On)]
    pub source_check: Switch,
    #[command(flatten)]
    pub pin_dir: PinDir,
}

/// A feature switched on or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(agent::run(args.settings()))?;
    Ok(ExitCode::SUCCESS)
}

impl Args {
    fn settings(self) -> Settings {
        let endpoints_from = self.source.endpoints_from();
        let source = match self.source.manifests {
            Some(dir) => Source::Manifests(dir),
            None => Source::Kubernetes(self.source.connection),
        };
        Settings {
            source,
            endpoints_from,
            node_name: self.source.node_name,
            zone: self.source.zone,
            hooks: Hooks {
                pods: self.interfaces,
                external: self.external_interfaces,
                xdp_mode: self.xdp_mode,
                host_cgroup: self.host_cgroup,
            },
            keep_datapath: self.keep_datapath,
            metrics_address: self.metrics_address,
            plan: PlanOptions {
                default_algorithm: self.lb_algorithm,
                maglev_table_size: self.maglev_table_size,
            },
            bpf_object: self.bpf_object,
            conntrack_gc_interval: self.conntrack_gc_interval,
            timeouts: Timeouts {
                tcp: self.conntrack_tcp_timeout,
                tcp_closing: self.conntrack_tcp_closing_timeout,
                udp: self.conntrack_udp_timeout,
            },
            capacity: Capacity {
                services: self.services_capacity,
                backends: self
                    .backends_capacity
                    .unwrap_or(self.services_capacity.saturating_mul(4)),
                conntrack: self.conntrack_capacity,
                ..Capacity::default()
            },
            reject_limit: RejectLimit::per_second(self.reject_rate, self.reject_burst),
            source_check: self.source_check == Switch::On,
            pin_dir: self.pin_dir.pin_dir,
        }
    }
}

/// `10s`, `5m`, `24h` or plain seconds.
fn duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, ""), |at| text.split_at(at));
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 10s, 5m or 24h"))?;
    let seconds = match unit {
        "" | "s" => number,
        "m" => number * 60,
        "h" => number * 3600,
        _ => return Err(format!("{text:?}: the unit must be s, m or h")),
    };
    if seconds == 0 {
        return Err("a duration must be positive".into());
    }
    Ok(Duration::from_secs(seconds))
}

/// `auto`, or a prime.
fn maglev_size(text: &str) -> Result<MaglevSize, String> {
    if text == "auto" {
        return Ok(MaglevSize::Scaled);
    }
    let size: u32 = text
        .parse()
        .map_err(|e| format!("{text:?} is neither auto nor a number: {e}"))?;
    if reconcile::is_prime(size) && size > 2 {
        Ok(MaglevSize::Fixed(size))
    } else {
        Err(format!("{size} is not a prime (try auto, 16381, 4093 or 65537)"))
    }
}
