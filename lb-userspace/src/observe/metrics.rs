//! The agent's metrics. Datapath counters and conntrack occupancy are read from the pinned maps
//! at scrape time; the agent's own counters are kept here.
use std::{path::PathBuf, sync::Arc};

use lb_common::{Stat, ct_direction};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::datapath::{conntrack_gc, maps::ServiceMaps};

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
        "Flows the agent's conntrack garbage collection deleted, by reason (tcp_closed, tcp_idle, udp_idle)",
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
    registry.register_collector(Box::new(DatapathCollector { pin_dir }));
    registry
}

/// Reads the kernel's counters on each scrape.
#[derive(Debug)]
struct DatapathCollector {
    pin_dir: PathBuf,
}

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
        let flows = maps
            .conntrack
            .keys()
            .filter_map(Result::ok)
            .filter(|key| key.direction == ct_direction::FORWARD)
            .count();
        let gauge = ConstGauge::new(flows as i64);
        let metric = encoder.encode_descriptor(
            "conntrack_flows",
            "Flows tracked by the datapath (forward entries of the conntrack map)",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)
    }
}
