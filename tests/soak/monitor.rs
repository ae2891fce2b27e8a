//! A sampler that reads, every few tens of milliseconds, what a failure is later explained
//! with: the datapath's refusal and rebalancing counters, every frontend as the services map
//! has it, and whether the machine left the agent (and the soak itself) without a CPU.
use std::{
    path::PathBuf,
    sync::{Arc, Mutex, atomic::Ordering},
    thread::JoinHandle,
    time::Duration,
};

use lb_common::{ServiceInfo, Stat};
use lb_userspace::datapath::maps::ServiceMaps;

use crate::{
    load::Shared,
    topology::{self, Frontend},
};

const INTERVAL: Duration = Duration::from_millis(50);

/// The datapath counters a failed request may have moved.
pub const COUNTERS: [(Stat, &str); 4] = [
    (Stat::NoBackend, "no_backend_drops"),
    (Stat::UndefinedPort, "undefined_port_drops"),
    (Stat::Rebalanced, "rebalanced_flows"),
    (Stat::CtInsertFailed, "conntrack_insert_failures"),
];

#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Duration,
    /// How much later than asked for this sample was taken: the soak's own threads waiting
    /// for a CPU.
    pub lag: Duration,
    /// [`COUNTERS`], summed over CPUs.
    pub counters: [u64; COUNTERS.len()],
    /// Each of [`topology::frontends`] as the services map holds it (`None`: not there).
    pub frontends: Vec<Option<ServiceInfo>>,
    /// How long the agent's threads have waited for a CPU while runnable, so far.
    pub agent_waited: Duration,
    /// How long some task of the machine has waited for a CPU, so far (`/proc/pressure/cpu`).
    pub cpu_stalled: Duration,
}

/// How starved the machine was during a window.
#[derive(Clone, Copy, Debug, Default)]
pub struct Starvation {
    pub window: Duration,
    pub max_lag: Duration,
    pub agent_waited: Duration,
    pub cpu_stalled: Duration,
}

impl std::fmt::Display for Starvation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let share = |d: Duration| 100.0 * d.as_secs_f64() / self.window.as_secs_f64().max(1e-9);
        write!(
            f,
            "over {:.1}s the agent waited {:.0} ms for a CPU, some task of the machine was stalled {:.0}% of the time, and the soak's sampler ran up to {:.0} ms late",
            self.window.as_secs_f64(),
            self.agent_waited.as_secs_f64() * 1e3,
            share(self.cpu_stalled),
            self.max_lag.as_secs_f64() * 1e3
        )
    }
}

#[derive(Default)]
pub struct Monitor {
    samples: Mutex<Vec<Sample>>,
}

impl Monitor {
    /// Samples every [`INTERVAL`] until the load stops.
    pub fn start(
        self: &Arc<Self>,
        pins: PathBuf,
        agent: u32,
        shared: Arc<Shared>,
    ) -> anyhow::Result<JoinHandle<()>> {
        let maps = ServiceMaps::open(&pins)?;
        let monitor = self.clone();
        Ok(std::thread::spawn(move || {
            let clock = &shared.clock;
            let mut due = clock.now();
            while !shared.stop.load(Ordering::SeqCst) {
                let at = clock.now();
                if let Ok(sample) = take(&maps, agent, at, at.saturating_sub(due)) {
                    monitor.samples.lock().unwrap().push(sample);
                }
                due = at + INTERVAL;
                std::thread::sleep(due.saturating_sub(clock.now()));
            }
        }))
    }

    /// The last sample taken at or before `at` (the first one if none was).
    fn sample_at(&self, at: Duration) -> Option<Sample> {
        let samples = self.samples.lock().unwrap();
        let after = samples.partition_point(|s| s.at <= at);
        samples.get(after.saturating_sub(1)).cloned()
    }

    /// How much each of [`COUNTERS`] grew between `from` and `to`.
    pub fn counters_moved(&self, from: Duration, to: Duration) -> [u64; COUNTERS.len()] {
        let (Some(first), Some(last)) = (self.sample_at(from), self.sample_at(to)) else {
            return [0; COUNTERS.len()];
        };
        std::array::from_fn(|i| last.counters[i].saturating_sub(first.counters[i]))
    }

    /// Frontend `index` of [`topology::frontends`] as it was at `from`, then each time it changed
    /// until `to`.
    pub fn frontend_history(
        &self,
        index: usize,
        from: Duration,
        to: Duration,
    ) -> Vec<(Duration, Option<ServiceInfo>)> {
        let samples = self.samples.lock().unwrap();
        let first = samples.partition_point(|s| s.at <= from).saturating_sub(1);
        let mut history: Vec<(Duration, Option<ServiceInfo>)> = Vec::new();
        for sample in samples[first..].iter().take_while(|s| s.at <= to) {
            let state = sample.frontends[index];
            if history.last().is_none_or(|(_, last)| *last != state) {
                history.push((sample.at, state));
            }
        }
        history
    }

    /// How starved the machine was between `from` and `to`.
    pub fn starvation(&self, from: Duration, to: Duration) -> Starvation {
        let samples = self.samples.lock().unwrap();
        let window: Vec<&Sample> = samples.iter().filter(|s| (from..=to).contains(&s.at)).collect();
        let (Some(first), Some(last)) = (window.first(), window.last()) else {
            return Starvation::default();
        };
        Starvation {
            window: last.at - first.at,
            max_lag: window.iter().map(|s| s.lag).max().unwrap_or_default(),
            agent_waited: last.agent_waited.saturating_sub(first.agent_waited),
            cpu_stalled: last.cpu_stalled.saturating_sub(first.cpu_stalled),
        }
    }
}

fn take(maps: &ServiceMaps, agent: u32, at: Duration, lag: Duration) -> anyhow::Result<Sample> {
    let mut counters = [0; COUNTERS.len()];
    for (count, (stat, _)) in counters.iter_mut().zip(COUNTERS) {
        *count = maps.stat(stat)?;
    }
    Ok(Sample {
        at,
        lag,
        counters,
        frontends: topology::frontends()
            .iter()
            .map(|frontend| maps.service(&frontend.key()))
            .collect(),
        agent_waited: run_queue_wait(agent),
        cpu_stalled: cpu_pressure(),
    })
}

/// The time every thread of process `pid` spent runnable but not running (the second field of
/// each thread's `schedstat`).
fn run_queue_wait(pid: u32) -> Duration {
    let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    let waited_ns: u64 = threads
        .filter_map(Result::ok)
        .filter_map(|thread| std::fs::read_to_string(thread.path().join("schedstat")).ok())
        .filter_map(|text| text.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(waited_ns)
}

/// `total` of the `some` line of `/proc/pressure/cpu`: how long at least one task waited for a
/// CPU (zero where the kernel has no PSI).
fn cpu_pressure() -> Duration {
    let text = std::fs::read_to_string("/proc/pressure/cpu").unwrap_or_default();
    let micros = text
        .lines()
        .find(|line| line.starts_with("some"))
        .and_then(|line| {
            line.split_whitespace()
                .find_map(|field| field.strip_prefix("total="))
        })
        .and_then(|total| total.parse().ok())
        .unwrap_or(0);
    Duration::from_micros(micros)
}

/// The frontend as the report prints it: `id 7, 2 backends, maglev, affinity 3s` or `absent`.
pub fn describe(info: Option<ServiceInfo>) -> String {
    let Some(info) = info else {
        return "absent (no frontend)".to_owned();
    };
    let mut text = format!("id {}, {} backends", info.id, info.backends.count);
    if info.backends.maglev_size != 0 {
        text.push_str(", maglev");
    } else {
        text.push_str(", random");
    }
    if info.flags & lb_common::service_flags::AFFINITY != 0 {
        text.push_str(&format!(", affinity {}s", info.affinity_timeout_s));
    }
    text
}

/// Where `frontend` is in [`topology::frontends`], the order samples keep frontends in.
pub fn frontend_index(frontend: &Frontend) -> usize {
    topology::frontends()
        .iter()
        .position(|f| f == frontend)
        .expect("every frontend is one of topology::frontends()")
}
