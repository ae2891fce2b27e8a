//! The churn: every few hundred milliseconds one change to the manifests, the way a cluster
//! changes under load. A pod's servers start before it becomes an endpoint and stop only once
//! the maps have dropped it and a grace period (longer than any request) has passed, as a
//! pod's process outlives its endpoint; so a request can only fail if the datapath fails it.
use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use lb_userspace::{
    datapath::maps::ServiceMaps,
    lab::{SliceEndpoint, servers},
};

use crate::{
    lab::{self, Cluster, ServiceSpec},
    load::Shared,
    topology::{self, DNS, Frontend, HTTP, POOL, SERVICES},
};

/// Between two changes.
const PAUSE: (u64, u64) = (150, 400);
/// How long a removed pod keeps serving after the maps dropped it.
const GRACE: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Absent,
    Ready,
    Terminating,
}

struct Pod {
    name: String,
    ip: std::net::Ipv4Addr,
    stage: Stage,
    /// Its HTTP and UDP servers while it runs.
    servers: Option<[servers::Server; 2]>,
    stop_at: Option<Instant>,
}

#[derive(Default)]
struct Tally {
    added: u64,
    terminating: u64,
    removed: u64,
    affinity: u64,
    algorithm: u64,
    ports: u64,
}

pub struct Churn<'a> {
    cluster: &'a Cluster,
    shared: Arc<Shared>,
    pods: Vec<Vec<Pod>>,
    specs: Vec<ServiceSpec>,
    rng: u64,
    tally: Tally,
}

impl<'a> Churn<'a> {
    /// Two ready pods per Service, Maglev, no affinity, no `alt` port; programmed before it
    /// returns.
    pub fn start(cluster: &'a Cluster, shared: Arc<Shared>, seed: u64) -> anyhow::Result<Self> {
        let pods = (0..SERVICES.len())
            .map(|service| {
                (0..POOL)
                    .map(|index| {
                        let (name, ip) = topology::pod(service, index);
                        Pod {
                            name,
                            ip,
                            stage: Stage::Absent,
                            servers: None,
                            stop_at: None,
                        }
                    })
                    .collect()
            })
            .collect();
        let spec = ServiceSpec {
            affinity: false,
            maglev: true,
            alt: false,
        };
        let mut churn = Self {
            cluster,
            shared,
            pods,
            specs: vec![spec; SERVICES.len()],
            rng: seed | 1,
            tally: Tally::default(),
        };
        for service in 0..SERVICES.len() {
            for index in 0..2 {
                churn.add(service, index)?;
            }
        }
        // Every frontend whole: the agent writes them one after the other, each after its
        // backends.
        churn.cluster.wait_for("the first endpoints", |maps| {
            (0..SERVICES.len()).all(|service| {
                [Frontend::http(service), Frontend::dns(service)]
                    .into_iter()
                    .flat_map(|frontend| [frontend, frontend.in_ipv6(true)])
                    .all(|frontend| lab::backend_count(maps, frontend) == Some(2))
            })
        })?;
        churn.cluster.wait_until_serving()?;
        churn.tally = Tally::default();
        Ok(churn)
    }

    pub fn run_until(&mut self, end: Instant) -> anyhow::Result<()> {
        while Instant::now() < end {
            let service = self.below(SERVICES.len() as u64) as usize;
            match self.below(10) {
                0..=2 => self.add_one(service)?,
                3..=4 => self.terminate_one(service)?,
                5..=6 => self.remove_one(service)?,
                7 => self.toggle_affinity(service)?,
                8 => self.toggle_algorithm(service)?,
                _ => self.toggle_alt(service)?,
            }
            self.stop_expired();
            self.shared.record_occupancy(self.cluster.occupancy()?);
            let pause = PAUSE.0 + self.below(PAUSE.1 - PAUSE.0);
            std::thread::sleep(Duration::from_millis(pause));
        }
        Ok(())
    }

    pub fn summary(&self) -> String {
        let t = &self.tally;
        let changes = t.added + t.terminating + t.removed + t.affinity + t.algorithm + t.ports;
        format!(
            "{changes} changes: {} pods added, {} marked terminating, {} removed; affinity switched {} times, algorithm {} times, a port added or removed {} times",
            t.added, t.terminating, t.removed, t.affinity, t.algorithm, t.ports
        )
    }

    fn add_one(&mut self, service: usize) -> anyhow::Result<()> {
        match self.pick(service, |pod| pod.stage == Stage::Absent) {
            Some(index) => self.add(service, index),
            None => Ok(()),
        }
    }

    fn add(&mut self, service: usize, index: usize) -> anyhow::Result<()> {
        let pod = &mut self.pods[service][index];
        let started = pod.servers.is_none();
        if started {
            let ns = &self.cluster.lab.pod(&pod.name).ns;
            pod.servers = Some([
                servers::http_server(ns, &pod.name, HTTP.1)?,
                servers::udp_server(ns, &pod.name, DNS.1)?,
            ]);
        }
        pod.stop_at = None;
        pod.stage = Stage::Ready;
        // An endpoint from the moment it is written: the agent may program it at once.
        self.shared.gone.lock().unwrap().remove(&pod.name);
        self.tally.added += 1;
        let what = if started {
            "its servers started"
        } else {
            "its servers still running"
        };
        let name = pod.name.clone();
        self.write()?;
        self.record(service, format!("{name} added, ready ({what})"));
        Ok(())
    }

    fn terminate_one(&mut self, service: usize) -> anyhow::Result<()> {
        let Some(index) = self.pick(service, |pod| pod.stage == Stage::Ready) else {
            return Ok(());
        };
        self.pods[service][index].stage = Stage::Terminating;
        self.tally.terminating += 1;
        self.write()?;
        self.record(
            service,
            format!("{} marked terminating", self.pods[service][index].name),
        );
        Ok(())
    }

    /// Removes a terminating pod, or now and then a ready one at once (a pod deleted without a
    /// grace period), keeping at least one endpoint: a Service without any refuses, which is
    /// right but is no test of the churn.
    fn remove_one(&mut self, service: usize) -> anyhow::Result<()> {
        let live = self.pods[service]
            .iter()
            .filter(|pod| pod.stage != Stage::Absent)
            .count();
        if live < 2 {
            return Ok(());
        }
        let abrupt = self.below(4) == 0;
        let Some(index) = self.pick(service, |pod| {
            pod.stage == Stage::Terminating || (abrupt && pod.stage == Stage::Ready)
        }) else {
            return Ok(());
        };
        let pod = &mut self.pods[service][index];
        let was = if pod.stage == Stage::Ready {
            "ready"
        } else {
            "terminating"
        };
        pod.stage = Stage::Absent;
        let (name, ip) = (pod.name.clone(), pod.ip);
        self.tally.removed += 1;
        self.write()?;
        self.record(service, format!("{name} removed (it was {was})"));
        self.cluster.wait_for(&format!("the removal of {name}"), |maps| {
            !lab::has_backend(maps, ip)
        })?;
        let now = Instant::now();
        self.record(service, format!("{name} gone from the maps"));
        self.shared.gone.lock().unwrap().insert(name, now);
        self.pods[service][index].stop_at = Some(now + GRACE);
        Ok(())
    }

    fn toggle_affinity(&mut self, service: usize) -> anyhow::Result<()> {
        self.specs[service].affinity = !self.specs[service].affinity;
        self.tally.affinity += 1;
        self.write()?;
        let now = if self.specs[service].affinity {
            "ClientIP"
        } else {
            "None"
        };
        self.record(service, format!("session affinity {now}"));
        Ok(())
    }

    fn toggle_algorithm(&mut self, service: usize) -> anyhow::Result<()> {
        self.specs[service].maglev = !self.specs[service].maglev;
        self.tally.algorithm += 1;
        self.write()?;
        let now = if self.specs[service].maglev {
            "maglev"
        } else {
            "random"
        };
        self.record(service, format!("algorithm {now}"));
        Ok(())
    }

    /// Adds or removes the `alt` port, and waits until the maps have the change: with the agent
    /// starved, a removal may still be pending when the port is added again, and the old
    /// frontend would pass for the new one. Its clients are told before it goes and after it is
    /// programmed, so they only count requests made while it was there.
    fn toggle_alt(&mut self, service: usize) -> anyhow::Result<()> {
        let state = &self.shared.alt[service];
        let alt = Frontend::alt(service);
        let in_maps = |maps: &ServiceMaps, ipv6| lab::backend_count(maps, alt.in_ipv6(ipv6)).is_some();
        let programmed = |maps: &ServiceMaps| in_maps(maps, false) && in_maps(maps, true);
        let removed = |maps: &ServiceMaps| !in_maps(maps, false) && !in_maps(maps, true);
        self.tally.ports += 1;
        if self.specs[service].alt {
            state.fetch_add(1, Ordering::SeqCst);
            self.specs[service].alt = false;
            self.write()?;
            self.record(service, "alt port removed".to_owned());
            self.cluster.wait_for("the removal of the alt port", removed)?;
            self.record(service, "alt port gone from the maps".to_owned());
        } else {
            self.specs[service].alt = true;
            self.write()?;
            self.record(service, "alt port added".to_owned());
            self.cluster.wait_for("the alt port", programmed)?;
            state.fetch_add(1, Ordering::SeqCst);
            self.record(service, "alt port programmed".to_owned());
        }
        Ok(())
    }

    /// Stops the servers of pods removed more than [`GRACE`] ago.
    fn stop_expired(&mut self) {
        let now = Instant::now();
        for (service, pods) in self.pods.iter_mut().enumerate() {
            for pod in pods {
                if pod.stop_at.is_some_and(|at| at <= now) {
                    pod.stop_at = None;
                    pod.servers = None;
                    self.shared.stops[service].fetch_add(1, Ordering::SeqCst);
                    let at = self.shared.clock.now();
                    let what = format!("{} {}'s servers stopped", SERVICES[service].0, pod.name);
                    self.shared.events.record(at, what);
                }
            }
        }
    }

    /// Notes a change to `service` on the timeline.
    fn record(&self, service: usize, what: String) {
        let at = self.shared.clock.now();
        self.shared
            .events
            .record(at, format!("{} {what}", SERVICES[service].0));
    }

    fn write(&self) -> anyhow::Result<()> {
        let endpoints: Vec<Vec<SliceEndpoint<'_>>> = self
            .pods
            .iter()
            .map(|pods| {
                pods.iter()
                    .filter_map(|pod| match pod.stage {
                        Stage::Absent => None,
                        Stage::Ready => Some(SliceEndpoint::ready(&pod.name, pod.ip)),
                        Stage::Terminating => Some(SliceEndpoint::terminating(&pod.name, pod.ip)),
                    })
                    .collect()
            })
            .collect();
        self.cluster.write(&self.specs, &endpoints)
    }

    /// A random pod of `service` that `fits`.
    fn pick(&mut self, service: usize, fits: impl Fn(&Pod) -> bool) -> Option<usize> {
        let candidates: Vec<usize> = (0..POOL).filter(|&i| fits(&self.pods[service][i])).collect();
        if candidates.is_empty() {
            return None;
        }
        Some(candidates[self.below(candidates.len() as u64) as usize])
    }

    /// xorshift64: enough randomness for choosing changes, and replayable from the seed.
    fn below(&mut self, bound: u64) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % bound
    }
}
