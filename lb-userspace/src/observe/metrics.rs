//! The agent's metrics. Datapath counters and conntrack occupancy are read from the pinned maps
//! at scrape time; the agent's own counters are kept here.
use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, RwLock},
};

use aya::{
    Pod,
    maps::{HashMap, IterableMap as _, MapData},
};
use lb_common::{ServiceStats, Stat, map_names};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{
    datapath::{conntrack_gc, maps::ServiceMaps},
    reconcile::FrontendKey,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: String,
}

/// A frontend's traffic counters are labelled with its Service and the frontend itself.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FrontendLabels {
    service: String,
    frontend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: &'static str,
}

/// Counters and gauges the agent updates as it works.
#[derive(Debug)]
pub struct AgentMetrics {
    pub syncs: Counter,
    pub sync_duration: Histogram,
    pub last_sync_timestamp: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub frontends: Gauge,
    pub frontends_without_endpoints: Gauge,
    pub model_warnings: Gauge,
    pub programming_failures: Family<ServiceLabel, Counter>,
    pub source_errors: Family<SourceLabel, Counter>,
    /// `namespace/name` of the Service behind each programmed frontend, for the datapath's
    /// per-service counters (the maps know frontends and ids only).
    pub service_names: RwLock<BTreeMap<FrontendKey, String>>,
    pub conntrack_collected: Family<ReasonLabel, Counter>,
    pub conntrack_full: Counter,
    pub affinity_collected: Counter,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self {
            syncs: Counter::default(),
            // 10 µs … ~10 s.
            sync_duration: Histogram::new(exponential_buckets(0.000_01, 4.0, 11)),
            last_sync_timestamp: Gauge::default(),
            frontends: Gauge::default(),
            frontends_without_endpoints: Gauge::default(),
            model_warnings: Gauge::default(),
            programming_failures: Family::default(),
            source_errors: Family::default(),
            service_names: RwLock::default(),
            conntrack_collected: {
                // Every reason from the start, so a rate over it never starts from nothing.
                let family: Family<ReasonLabel, Counter> = Family::default();
                for reason in conntrack_gc::Reason::ALL {
                    family
                        .get_or_create(&ReasonLabel {
                            reason: reason.as_str(),
                        })
                        .inc_by(0);
                }
                family
            },
            conntrack_full: Counter::default(),
            affinity_collected: Counter::default(),
        }
    }
}

impl AgentMetrics {
    pub fn source_error(&self, source: &str) {
        self.source_errors
            .get_or_create(&SourceLabel {
                source: source.to_owned(),
            })
            .inc();
    }
}

/// A registry with the agent's metrics and the datapath's, read from the maps under `pin_dir`.
pub fn registry(agent: &Arc<AgentMetrics>, pin_dir: PathBuf) -> Registry {
    let mut registry = Registry::with_prefix("switchboard");
    registry.register("syncs", "Passes of source to model to maps", agent.syncs.clone());
    registry.register(
        "sync_duration_seconds",
        "Time to compute the model and write the maps, per pass",
        agent.sync_duration.clone(),
    );
    registry.register(
        "last_sync_timestamp_seconds",
        "Unix time of the last pass that reached the maps",
        agent.last_sync_timestamp.clone(),
    );
    registry.register("frontends", "Frontends in the model", agent.frontends.clone());
    registry.register(
        "frontends_without_endpoints",
        "Frontends whose Service has no usable endpoint (connections refused)",
        agent.frontends_without_endpoints.clone(),
    );
    registry.register(
        "model_warnings",
        "Objects or fields the model passed over (invalid values, a missing ClusterIP, …), as logged",
        agent.model_warnings.clone(),
    );
    registry.register(
        "programming_failures",
        "Services that could not be written to the maps (for example a full map), by Service",
        agent.programming_failures.clone(),
    );
    registry.register(
        "source_errors",
        "Objects that could not be read and watch failures, by source",
        agent.source_errors.clone(),
    );
    registry.register(
        "conntrack_gc_collected",
        "Flows the agent's conntrack garbage collection deleted, by reason (tcp_closed, tcp_idle, udp_idle, sctp_closed, sctp_idle)",
        agent.conntrack_collected.clone(),
    );
    registry.register(
        "conntrack_full",
        "Garbage collection passes that found the conntrack map full (its oldest flows are being evicted)",
        agent.conntrack_full.clone(),
    );
    registry.register(
        "affinity_gc_collected",
        "Session affinity entries deleted because their client's timeout ran out or their frontend lost affinity",
        agent.affinity_collected.clone(),
    );
    registry.register_collector(Box::new(DatapathCollector {
        pin_dir,
        agent: agent.clone(),
    }));
    registry
}

/// Reads the kernel's counters on each scrape.
#[derive(Debug)]
struct DatapathCollector {
    pin_dir: PathBuf,
    agent: Arc<AgentMetrics>,
}

/// Metric name, help, and the field of [`ServiceStats`] it reports.
type ServiceCounter = (&'static str, &'static str, fn(&ServiceStats) -> u64);

/// The per-service counters.
const SERVICE_COUNTERS: [ServiceCounter; 5] = [
    (
        "service_packets",
        "Packets DNATed to one of the frontend's backends",
        |s| s.packets,
    ),
    (
        "service_bytes",
        "Bytes of those packets, link-layer header included",
        |s| s.bytes,
    ),
    (
        "service_new_flows",
        "Flows given one of the frontend's backends",
        |s| s.new_flows,
    ),
    (
        "service_reply_packets",
        "Backend replies translated back to the frontend",
        |s| s.reply_packets,
    ),
    ("service_reply_bytes", "Bytes of those replies", |s| s.reply_bytes),
];

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // No maps (not loaded yet, or removed): nothing to report rather than a failed scrape.
        let Ok(maps) = ServiceMaps::open(&self.pin_dir) else {
            return Ok(());
        };
        for stat in Stat::ALL {
            let Ok(value) = maps.stat(stat) else { continue };
            let counter = ConstCounter::new(value);
            let name = format!("datapath_{}", stat.name());
            let metric = encoder.encode_descriptor(&name, stat.help(), None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        self.encode_services(&maps, &mut encoder)?;
        let flows: usize = maps.flows_by_service().values().sum();
        let gauge = ConstGauge::new(flows as i64);
        let metric = encoder.encode_descriptor(
            "conntrack_flows",
            "Flows tracked by the datapath (forward entries of both conntrack maps)",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)?;
        let occupancy = [
            Occupancy::of(map_names::CONNTRACK, &maps.conntrack),
            Occupancy::of(map_names::CONNTRACK6, &maps.conntrack6),
            Occupancy::of(map_names::AFFINITY, &maps.affinity),
            Occupancy::of(map_names::AFFINITY6, &maps.affinity6),
            Occupancy::of(map_names::SERVICES, &maps.services),
            Occupancy::of(map_names::SERVICES6, &maps.services6),
            Occupancy::of(map_names::BACKENDS, &maps.backends),
            Occupancy::of(map_names::BACKENDS6, &maps.backends6),
        ];
        encode_occupancy(&occupancy, &mut encoder)
    }
}

impl DatapathCollector {
    /// Counters of every programmed frontend that has seen traffic.
    fn encode_services(
        &self,
        maps: &ServiceMaps,
        encoder: &mut DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        let Ok(stats) = maps.service_stats() else {
            return Ok(());
        };
        let names = self.agent.service_names.read().unwrap_or_else(|e| e.into_inner());
        // Counters are kept by service id; ids of frontends no longer programmed are left out.
        let frontends: Vec<(FrontendLabels, ServiceStats)> = maps
            .services()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(key, info)| {
                let labels = FrontendLabels {
                    service: names.get(&key).cloned().unwrap_or_default(),
                    frontend: key.to_string(),
                };
                Some((labels, *stats.get(&info.id)?))
            })
            .collect();
        drop(names);
        for (name, help, field) in SERVICE_COUNTERS {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (labels, stats) in &frontends {
                ConstCounter::new(field(stats)).encode(family.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}

/// A map's entries now and the entries it can hold.
struct Occupancy<'a> {
    name: &'static str,
    entries: usize,
    map: &'a MapData,
}

impl<'a> Occupancy<'a> {
    fn of<K: Pod, V: Pod>(name: &'static str, map: &'a HashMap<MapData, K, V>) -> Self {
        Self {
            name,
            entries: map.keys().filter(Result::is_ok).count(),
            map: map.map(),
        }
    }
}

/// Entries and capacity of the maps that fill with traffic (LRU maps evict their oldest entries
/// when full) or with Services, labelled by map name (each family's twin on its own).
fn encode_occupancy(maps: &[Occupancy<'_>], encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let mut entries =
        encoder.encode_descriptor("map_entries", "Entries in a pinned map", None, MetricType::Gauge)?;
    for map in maps {
        ConstGauge::new(map.entries as i64).encode(entries.encode_family(&MapLabel { map: map.name })?)?;
    }
    let mut capacity = encoder.encode_descriptor(
        "map_capacity",
        "Entries a pinned map can hold",
        None,
        MetricType::Gauge,
    )?;
    for map in maps {
        if let Ok(info) = map.map.info() {
            ConstGauge::new(i64::from(info.max_entries()))
                .encode(capacity.encode_family(&MapLabel { map: map.name })?)?;
        }
    }
    Ok(())
}
