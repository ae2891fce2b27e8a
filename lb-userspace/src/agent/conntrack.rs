//! The conntrack garbage collector the agent runs beside its loop: finished flows and stale
//! affinity entries deleted every interval, and a full conntrack map said once per pass.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use lb_common::{Stat, map_names};

use crate::{
    datapath::{
        conntrack_gc::{self, Timeouts},
        maps::{self, ServiceMaps},
    },
    observe::metrics::{AgentMetrics, ReasonLabel},
};

/// Deletes finished flows and stale affinity entries every `interval`, off the async threads (a
/// full map is a quarter million lookups), and says once per pass when the conntrack map is full.
pub async fn collect(pin_dir: PathBuf, interval: Duration, timeouts: Timeouts, metrics: Arc<AgentMetrics>) {
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
