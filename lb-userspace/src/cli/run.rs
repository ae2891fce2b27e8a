//! `switchboard run`: the agent.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use lb_common::{RejectLimit, Stat, map_names};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{Notify, watch},
};

use super::{PinDir, source::SourceArgs};
use crate::{
    datapath::{
        Capacity, Datapath, addresses,
        attach::{self, Attacher, XdpChoice},
        conntrack_gc::{self, Timeouts},
        maps::{self, ServiceMaps},
        socket::SocketHooks,
    },
    model::{self, LbAlgorithm},
    observe::{
        self,
        events::Events,
        health::Health,
        health_check::HealthChecks,
        metrics::{AgentMetrics, ReasonLabel, ServiceLabel},
        server::Observed,
    },
    reconcile::{self, FrontendKey, PlanOptions, Reconciler},
    source::{
        self, Snapshot,
        manifests::{self, ManifestDir},
    },
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
    /// Positions in each Maglev table: a prime, ideally over 100 × a Service's backends. Each
    /// table takes 4 bytes per position (64 KiB at the default).
    #[arg(long, env = "SWITCHBOARD_MAGLEV_TABLE_SIZE", default_value_t = lb_common::DEFAULT_MAGLEV_TABLE_SIZE, value_parser = prime)]
    pub maglev_table_size: u32,
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
    /// Frontends (ClusterIP, NodePort, … × port × protocol) the services map holds. Frontends
    /// beyond it are not programmed: logged by Service and counted in
    /// switchboard_programming_failures_total. A pinned map keeps its size, as above.
    #[arg(long, env = "SWITCHBOARD_SERVICES_CAPACITY", default_value_t = lb_common::capacity::SERVICES, value_parser = clap::value_parser!(u32).range(1..))]
    pub services_capacity: u32,
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

/// Interfaces are re-listed this often even without a netlink event, as a safety net.
const RESCAN_INTERVAL: Duration = Duration::from_secs(5);

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(args))?;
    Ok(ExitCode::SUCCESS)
}

async fn run(args: Args) -> anyhow::Result<()> {
    // First: a SIGTERM that comes while the datapath is loading (a rollout deleting a pod that is
    // still starting) waits for the main loop, which exits cleanly, instead of killing the agent
    // halfway.
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    if let Some(dir) = &args.source.manifests
        && !dir.is_dir()
    {
        anyhow::bail!("--manifests {}: not a directory", dir.display());
    }
    let endpoints_from = args.source.endpoints_from();
    // Connect and listen before touching the kernel, so a bad configuration fails fast and
    // changes nothing.
    let client = match &args.source.manifests {
        Some(_) => None,
        None => Some(args.source.connection.client().await?),
    };
    // In a cluster, warnings about a Service also become Events on it.
    let events = client.as_ref().map(|client| {
        let instance = args
            .source
            .node_name
            .clone()
            .or_else(|| {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
                Some(host.trim().to_owned())
            })
            .unwrap_or_else(|| "switchboard".into());
        Events::start(client.clone(), instance)
    });
    let metrics = Arc::new(AgentMetrics::default());
    let health = Arc::new(Health::default());
    let registry = observe::metrics::registry(&metrics, args.pin_dir.pin_dir.clone());
    observe::server::serve(
        args.metrics_address,
        Observed {
            registry,
            health: health.clone(),
        },
    )
    .await?;

    let capacity = Capacity {
        services: args.services_capacity,
        conntrack: args.conntrack_capacity,
        ..Capacity::default()
    };
    let mut datapath = match &args.bpf_object {
        Some(object) => Datapath::load_file(object, &args.pin_dir.pin_dir, capacity)?,
        None => Datapath::load_with_capacity(&args.pin_dir.pin_dir, capacity)?,
    };
    datapath.set_reject_limit(RejectLimit::per_second(args.reject_rate, args.reject_burst))?;
    let mut maps = datapath.maps()?;
    // Before attaching, so that no pod's packet meets the datapath without the check.
    maps.set_source_check(args.source_check == Switch::On)?;
    observe::datapath_log::forward(&mut datapath.ebpf)?;
    let mut reconciler = Reconciler::new(maps.read_programmed().context("cannot read the pinned maps")?);
    tracing::info!(
        services = reconciler.programmed().services.len(),
        "recovered the programmed state from the pinned maps"
    );
    let mut attacher = Attacher::new(&mut datapath.ebpf, &args.interfaces, &args.pin_dir.pin_dir)?;
    let mut external = match &args.external_interfaces {
        Some(pattern) => Some(Attacher::external(
            &mut datapath.ebpf,
            pattern,
            &args.pin_dir.pin_dir,
            args.xdp_mode,
        )?),
        None => None,
    };
    let sockets = match args.host_cgroup.as_deref() {
        Some("off") => None,
        Some(path) => Some(SocketHooks::attach(
            &mut datapath.ebpf,
            Some(Path::new(path)),
            &args.pin_dir.pin_dir,
        )?),
        None => match SocketHooks::attach(&mut datapath.ebpf, None, &args.pin_dir.pin_dir) {
            Ok(hooks) => Some(hooks),
            Err(error) => {
                tracing::warn!("{error:#}; processes of the node itself will not reach services");
                None
            }
        },
    };
    let timeouts = Timeouts {
        tcp: args.conntrack_tcp_timeout,
        tcp_closing: args.conntrack_tcp_closing_timeout,
        udp: args.conntrack_udp_timeout,
    };
    tokio::spawn(collect_conntrack(
        args.pin_dir.pin_dir.clone(),
        args.conntrack_gc_interval,
        timeouts,
        metrics.clone(),
    ));
    let links_changed = Arc::new(Notify::new());
    attach::watch_links(links_changed.clone())?;
    sync_interfaces(&mut datapath.ebpf, &mut attacher, external.as_mut(), &mut maps)?;
    datapath.finish_migrations()?;

    let options = PlanOptions {
        default_algorithm: args.lb_algorithm,
        maglev_table_size: args.maglev_table_size,
    };
    let (snapshots_tx, mut snapshots) = watch::channel(Snapshot::default());
    let source = match (&args.source.manifests, client) {
        (Some(dir), _) => tokio::spawn(manifests::watch(
            ManifestDir::new(dir),
            snapshots_tx,
            metrics.clone(),
        )),
        (None, Some(client)) => tokio::spawn(source::kube::watch(
            client,
            endpoints_from,
            args.source.node_name.clone(),
            snapshots_tx,
            metrics.clone(),
        )),
        (None, None) => unreachable!("a client is made whenever there is no manifest directory"),
    };
    let mut rescan = tokio::time::interval(RESCAN_INTERVAL);
    let mut notices = BTreeSet::new();
    let mut health_checks = HealthChecks::default();
    loop {
        tokio::select! {
            changed = snapshots.changed() => {
                if changed.is_err() {
                    // The source ended; its error says why. The datapath stays attached.
                    return source.await?.context("the source stopped");
                }
                health.update_received();
                let snapshot = snapshots.borrow_and_update().clone();
                let model = model::compute(&args.source.input(&snapshot));
                if let Some(events) = &events {
                    publish_events(events, &model, &snapshot.services, &notices);
                }
                sync(&model, &options, &mut reconciler, &mut maps, &metrics, &mut notices);
                health_checks.update(&model);
                health.update_applied();
            }
            () = links_changed.notified() => sync_interfaces(&mut datapath.ebpf, &mut attacher, external.as_mut(), &mut maps)?,
            _ = rescan.tick() => sync_interfaces(&mut datapath.ebpf, &mut attacher, external.as_mut(), &mut maps)?,
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    let interfaces = attacher.interfaces().len() + external.as_ref().map_or(0, |e| e.interfaces().len());
    if args.keep_datapath {
        tracing::info!(
            interfaces,
            "exiting; the datapath stays attached and keeps serving"
        );
    } else {
        attacher.detach_all();
        if let Some(external) = &mut external {
            external.detach_all();
        }
        if let Some(sockets) = sockets {
            sockets.detach();
        }
        tracing::info!(
            interfaces,
            "detached; maps stay pinned in {}",
            args.pin_dir.pin_dir.display()
        );
    }
    Ok(())
}

/// Attaches to interfaces that appeared, and writes the node's addresses (which NodePorts answer
/// on, and which external flows leaving for other nodes take as source).
fn sync_interfaces(
    ebpf: &mut aya::Ebpf,
    pods: &mut Attacher,
    external: Option<&mut Attacher>,
    maps: &mut ServiceMaps,
) -> anyhow::Result<()> {
    pods.sync(ebpf)?;
    let external_indexes = match external {
        Some(external) => {
            external.sync(ebpf)?;
            external.attached().map(|(index, _)| index).collect()
        }
        None => Vec::new(),
    };
    if let Err(error) = addresses::program(maps, external_indexes) {
        tracing::error!("{error:#}");
    }
    Ok(())
}

/// One pass of source → model → plan → maps.
fn sync(
    model: &model::Model,
    options: &PlanOptions,
    reconciler: &mut Reconciler,
    maps: &mut ServiceMaps,
    metrics: &AgentMetrics,
    notices: &mut BTreeSet<String>,
) {
    let names = model
        .frontends
        .iter()
        .map(|f| (FrontendKey::of(f), f.service.to_string()))
        .collect();
    *metrics.service_names.write().unwrap_or_else(|e| e.into_inner()) = names;
    let current: BTreeSet<String> = model
        .warnings
        .iter()
        .map(ToString::to_string)
        .chain(model.frontends.iter().filter(|f| f.backends.is_empty()).map(|f| {
            let what = if f.kind.is_external() && f.policy.external_local {
                "has no endpoint on this node (externalTrafficPolicy Local); traffic to it is dropped"
            } else {
                "has no endpoints; connections to it are refused"
            };
            format!("Service {} {} {what}", f.service, f.dialled())
        }))
        .collect();
    // Said once when it appears, not on every pass.
    for notice in current.difference(notices) {
        tracing::warn!("{notice}");
    }
    *notices = current;
    let started = std::time::Instant::now();
    let report = reconciler.sync_all(&model.by_service(), options, maps);
    let elapsed = started.elapsed();
    for (service, error) in &report.failed {
        tracing::error!("cannot program {service}: {error}; its previous state stays in effect");
        metrics
            .programming_failures
            .get_or_create(&ServiceLabel {
                service: service.clone(),
            })
            .inc();
    }
    metrics.syncs.inc();
    metrics.sync_duration.observe(elapsed.as_secs_f64());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    metrics.last_sync_timestamp.set(now.as_secs_f64());
    metrics.frontends.set(model.frontends.len() as i64);
    metrics.model_warnings.set(model.warnings.len() as i64);
    metrics
        .frontends_without_endpoints
        .set(model.frontends.iter().filter(|f| f.backends.is_empty()).count() as i64);
    tracing::info!(
        frontends = model.frontends.len(),
        writes = report.writes,
        deletes = report.deletes,
        failed = report.failed.len(),
        elapsed_us = elapsed.as_micros() as u64,
        "maps in sync"
    );
}

/// A Warning Event on each Service the model has a warning about that was not among the
/// `notices` of the previous pass: once per appearance, not on every pass.
fn publish_events(
    events: &Events,
    model: &model::Model,
    services: &[k8s_openapi::api::core::v1::Service],
    notices: &BTreeSet<String>,
) {
    for warning in model
        .warnings
        .iter()
        .filter(|w| !notices.contains(&w.to_string()))
    {
        if let Some(service) = services.iter().find(|s| is_object(s, &warning.object)) {
            events.warn(service, &warning.message);
        }
    }
}

/// Whether `object`, as a model warning names it (`Service namespace/name`), is `service`.
fn is_object(service: &k8s_openapi::api::core::v1::Service, object: &str) -> bool {
    let namespace = service.metadata.namespace.as_deref().unwrap_or("default");
    let name = service.metadata.name.as_deref().unwrap_or_default();
    object.strip_prefix("Service ") == Some(&format!("{namespace}/{name}"))
}

/// Deletes finished flows and stale affinity entries every `interval`, off the async threads (a
/// full map is a quarter million lookups), and says once per pass when the conntrack map is full.
async fn collect_conntrack(
    pin_dir: PathBuf,
    interval: Duration,
    timeouts: Timeouts,
    metrics: Arc<AgentMetrics>,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut insert_failures = None;
    // (entries left after the previous pass, new flows counted then)
    let mut previous: Option<(usize, u64)> = None;
    loop {
        ticks.tick().await;
        let pin_dir = pin_dir.clone();
        let pass = tokio::task::spawn_blocking(move || gc_pass(&pin_dir, &timeouts)).await;
        let pass = match pass {
            Ok(Ok(pass)) => pass,
            Ok(Err(error)) => {
                tracing::warn!("conntrack garbage collection failed: {error:#}");
                continue;
            }
            Err(error) => {
                tracing::warn!("conntrack garbage collection panicked: {error}");
                continue;
            }
        };
        for (reason, flows) in &pass.collected {
            metrics
                .conntrack_collected
                .get_or_create(&ReasonLabel {
                    reason: reason.as_str(),
                })
                .inc_by(*flows);
        }
        metrics.affinity_collected.inc_by(pass.affinity_collected);
        let total: u64 = pass.collected.values().sum();
        if total > 0 || pass.affinity_collected > 0 {
            tracing::debug!(
                flows = total,
                affinity = pass.affinity_collected,
                "conntrack garbage collected"
            );
        }
        // Once per pass, whatever the packet rate: a full map is a condition, not an event. New
        // flows are counted for both families together, so the maps are judged together too:
        // more new flows than room in both means one of them evicted.
        let entries: usize = pass.conntrack.iter().map(|map| map.entries).sum();
        let capacity: u32 = pass.conntrack.iter().map(|map| map.capacity).sum();
        let overflowed = previous.is_some_and(|(left, flows)| {
            conntrack_gc::overflowed(left, pass.new_flows.saturating_sub(flows), capacity)
        });
        let left = entries.saturating_sub(pass.collected.values().sum::<u64>() as usize * 2);
        previous = Some((left, pass.new_flows));
        if overflowed
            || pass
                .conntrack
                .iter()
                .any(|map| conntrack_gc::is_full(map.entries, map.capacity))
        {
            metrics.conntrack_full.inc();
            let occupancy: Vec<String> = pass
                .conntrack
                .iter()
                .map(|map| format!("{} {}/{}", map.name, map.entries, map.capacity))
                .collect();
            tracing::warn!(
                occupancy = occupancy.join(", "),
                "the conntrack map is full: its oldest flows are evicted to make room (raise --conntrack-capacity)"
            );
        }
        let refused = pass
            .insert_failures
            .saturating_sub(insert_failures.unwrap_or(pass.insert_failures));
        insert_failures = Some(pass.insert_failures);
        if refused > 0 {
            tracing::warn!(
                flows = refused,
                "the conntrack map refused new flows since the last pass; they were balanced without state"
            );
        }
    }
}

/// What one garbage collection pass did and saw.
struct GcPass {
    collected: conntrack_gc::Collected,
    affinity_collected: u64,
    /// Each family's conntrack map, before collecting.
    conntrack: [ConntrackOccupancy; 2],
    /// The datapath's count of refused conntrack inserts so far.
    insert_failures: u64,
    /// The datapath's count of new flows so far (both families).
    new_flows: u64,
}

struct ConntrackOccupancy {
    name: &'static str,
    entries: usize,
    capacity: u32,
}

impl ConntrackOccupancy {
    fn of<K: aya::Pod, V: aya::Pod>(
        name: &'static str,
        map: &aya::maps::HashMap<aya::maps::MapData, K, V>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            name,
            entries: map.keys().filter_map(Result::ok).count(),
            capacity: maps::capacity(map)?,
        })
    }
}

fn gc_pass(pin_dir: &Path, timeouts: &Timeouts) -> anyhow::Result<GcPass> {
    let mut maps = ServiceMaps::open(pin_dir)?;
    let now = conntrack_gc::monotonic_now_ns();
    // Occupancy before collecting: what the datapath had to live with since the last pass.
    let conntrack = [
        ConntrackOccupancy::of(map_names::CONNTRACK, &maps.conntrack)?,
        ConntrackOccupancy::of(map_names::CONNTRACK6, &maps.conntrack6)?,
    ];
    let mut collected = conntrack_gc::collect(&mut maps.conntrack, now, timeouts);
    for (reason, flows) in conntrack_gc::collect(&mut maps.conntrack6, now, timeouts) {
        *collected.entry(reason).or_default() += flows;
    }
    let affinity_timeouts = conntrack_gc::affinity_timeouts(maps.services()?.values());
    let affinity_collected = conntrack_gc::collect_affinity(&mut maps.affinity, &affinity_timeouts, now)
        + conntrack_gc::collect_affinity(&mut maps.affinity6, &affinity_timeouts, now);
    Ok(GcPass {
        collected,
        affinity_collected,
        conntrack,
        insert_failures: maps.stat(Stat::CtInsertFailed)?,
        new_flows: maps.stat(Stat::NewFlows)?,
    })
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

fn prime(text: &str) -> Result<u32, String> {
    let size: u32 = text.parse().map_err(|e| format!("{e}"))?;
    if reconcile::is_prime(size) && size > 2 {
        Ok(size)
    } else {
        Err(format!("{size} is not a prime (try 16381, 4093 or 65537)"))
    }
}
