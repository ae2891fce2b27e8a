//! From the model to map contents: [`plan`] says what each frontend should be, and the
//! [`Reconciler`] writes only the difference, Service by Service, in an order that never shows
//! a packet a half-written service.
//!
//! The frontends of one Service whose new flows go to the same endpoints (its ClusterIP,
//! NodePort, LoadBalancer and external IPs, in one family) share one backend set: one set of
//! backend entries and one table (ids, then the Maglev table) in the table space. A changed set
//! gets a new table at free positions, then its frontends are pointed at it, then what is stale
//! (the old table, backends that left) is removed; a Service whose writes failed keeps what it
//! had and is tried again on the next pass. A pass costs what its Services' changes cost, not
//! what the cluster holds.
mod entries;
mod ids;
pub mod maglev;
mod plan;
mod stage;
mod tables;

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::{DefaultHasher, Hash as _, Hasher as _},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use foldhash::{HashMap, HashMapExt as _};
use lb_common::{BackendId, ServiceInfo, map_names};

pub use self::{
    entries::{BackendEntry, BatchError, FrontendKey, MapError, MapWriter, NextIds, Programmed, SourceRange},
    ids::IdKind,
    maglev::is_prime,
    plan::{BackendAddrs, DesiredService, External, MaglevSize, PlanOptions, plan, plan_frontends},
};
use self::{
    ids::IdCounter,
    plan::GroupPlan,
    stage::Pass,
    tables::{Block, TableSpace},
};
use crate::model::{Frontend, ServiceName};

/// Each Service's frontends as the model computes them: the unit the agent hands the
/// reconciler. A Service with no frontends (gone, or no longer proxied) is removed.
pub type ServiceFrontends = BTreeMap<ServiceName, Vec<Frontend>>;

/// The frontends of one group (a Service), as [`plan_frontends`] gives them.
pub type Desired = BTreeMap<FrontendKey, DesiredService>;

/// What one pass did.
#[derive(Debug, Default)]
pub struct Report {
    pub writes: usize,
    pub deletes: usize,
    /// Frontends that could not be (fully) programmed, by name, with why. Their previous state
    /// stays, and their Service is tried again on the next pass.
    pub failed: Vec<(String, MapError)>,
}

pub struct Reconciler {
    /// What the maps hold but for backend entries and tables, which `sets` hold.
    held: Held,
    sets: HashMap<u32, Set>,
    groups: HashMap<Arc<str>, Group>,
    /// The group each programmed (or wanted) frontend belongs to.
    owners: HashMap<FrontendKey, Arc<str>>,
    /// Each ClusterIP's frontends, as the groups want them.
    cluster_ips: HashMap<IpAddr, u32>,
    /// Groups whose last pass failed, with what they wanted (`None`: removed): tried again on
    /// every pass.
    retry: BTreeMap<Arc<str>, Option<Desired>>,
    /// Whether the maps may hold entries no group claims (found at start-up): removed by the
    /// next full pass.
    unclaimed: bool,
    space: TableSpace,
    service_ids: IdCounter,
    backend_ids: IdCounter,
}

/// The maps' frontends, source ranges, ClusterIPs and the like, as programmed.
#[derive(Clone, Debug, Default)]
struct Held {
    services: BTreeMap<FrontendKey, ServiceInfo>,
    source_ranges: BTreeSet<SourceRange>,
    cluster_ips: BTreeMap<IpAddr, u32>,
    next_ids: NextIds,
    table_capacity: u32,
}

/// A backend set as the maps hold it: its backend entries, and its tables.
#[derive(Clone, Debug, Default)]
struct Set {
    /// The group whose frontends use it (`None`: found at start-up, not claimed yet).
    owner: Option<Arc<str>>,
    proto: u8,
    /// Every backend entry it owns (live, draining, or stale and not yet deleted).
    members: Vec<Member>,
    /// The ids its current table starts with, in slot order.
    live: Vec<BackendId>,
    /// The table its frontends are to point at, with its Maglev size; `None`: no live backend.
    current: Option<(Block, u32)>,
    /// Every table it holds, the current one included: an older one stays until no frontend
    /// can point at it.
    blocks: Vec<Block>,
}

/// A backend entry of a set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Member {
    addr: SocketAddr,
    id: BackendId,
    /// `lb_common::backend_flags`.
    flags: u8,
}

impl Set {
    fn member(&self, id: BackendId) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }
}

/// What a group's last successful pass programmed.
#[derive(Clone, Debug, Default)]
struct Group {
    frontends: Vec<FrontendKey>,
    sets: Vec<u32>,
    /// The addresses of its ClusterIP frontends, one per frontend.
    cluster_ips: Vec<IpAddr>,
    /// Of the desired frontends it was programmed from: an equal one changes nothing.
    digest: u64,
}

impl Reconciler {
    /// Starts from what the maps already hold, so ids stay stable across agent restarts and
    /// unchanged entries are not rewritten.
    pub fn new(programmed: Programmed) -> Self {
        let Programmed {
            services,
            backends,
            tables,
            table_capacity,
            source_ranges,
            cluster_ips,
            next_ids,
        } = programmed;
        let mut sets: HashMap<u32, Set> = HashMap::new();
        for (key, info) in &services {
            for set in [info.backends, info.outside] {
                if set.id == 0 {
                    continue;
                }
                let held = sets.entry(set.id).or_default();
                // A set's protocol is its frontends'; an empty set has no backend entry to say it.
                held.proto = key.proto;
                let block = (set.count > 0).then_some(Block {
                    start: set.table,
                    len: set.count + set.maglev_size,
                });
                if let Some(block) = block
                    && !held.blocks.contains(&block)
                {
                    held.blocks.push(block);
                    held.live = tables.get(&set.table).cloned().unwrap_or_default();
                    held.live.truncate(set.count as usize);
                }
                let current = block.map(|block| (block, set.maglev_size));
                // Frontends that disagree (an update interrupted half-way): the next pass
                // writes a table again.
                held.current = if held.blocks.len() <= 1 { current } else { None };
            }
        }
        let highest_backend = backends.keys().copied().max();
        for (id, backend) in backends {
            let set = sets.entry(backend.set_id).or_default();
            set.proto = backend.proto;
            set.members.push(Member {
                addr: backend.addr,
                id,
                flags: backend.flags,
            });
        }
        let used = sets.values().flat_map(|set| set.blocks.iter().copied());
        let space = TableSpace::new(table_capacity, used);
        let service_ids = IdCounter::new(
            IdKind::Service,
            next_ids.service,
            services.values().map(|s| s.id).chain(sets.keys().copied()).max(),
        );
        let backend_ids = IdCounter::new(IdKind::Backend, next_ids.backend, highest_backend);
        Self {
            held: Held {
                services,
                source_ranges,
                cluster_ips,
                next_ids,
                table_capacity,
            },
            sets,
            groups: HashMap::new(),
            owners: HashMap::new(),
            cluster_ips: HashMap::new(),
            retry: BTreeMap::new(),
            unclaimed: true,
            space,
            service_ids,
            backend_ids,
        }
    }

    /// What the maps hold, as [`crate::datapath::maps::ServiceMaps::read_programmed`] would read
    /// it back. Built on each call: for tests and diagnostics, not for every pass.
    pub fn programmed(&self) -> Programmed {
        let mut backends = std::collections::HashMap::new();
        let mut tables = std::collections::HashMap::new();
        for (&set_id, set) in &self.sets {
            for member in &set.members {
                let entry = BackendEntry {
                    addr: member.addr,
                    proto: set.proto,
                    flags: member.flags,
                    set_id,
                };
                backends.insert(member.id, entry);
            }
            if let Some((block, _)) = set.current {
                tables.insert(block.start, set.live.clone());
            }
        }
        Programmed {
            services: self.held.services.clone(),
            backends,
            tables,
            table_capacity: self.held.table_capacity,
            source_ranges: self.held.source_ranges.clone(),
            cluster_ips: self.held.cluster_ips.clone(),
            next_ids: self.held.next_ids,
        }
    }

    /// How many frontends the maps hold.
    pub fn frontends(&self) -> usize {
        self.held.services.len()
    }

    /// Makes the maps hold exactly `services` (the first sync, or a full resync): whatever no
    /// Service claims is removed.
    pub fn sync_all(
        &mut self,
        services: &ServiceFrontends,
        options: &PlanOptions,
        maps: &mut impl MapWriter,
    ) -> Report {
        let mut work: BTreeMap<Arc<str>, Option<Desired>> =
            self.groups.keys().map(|name| (name.clone(), None)).collect();
        for (name, frontends) in services {
            let desired = plan_frontends(frontends, options);
            work.insert(name.to_string().into(), (!desired.is_empty()).then_some(desired));
        }
        self.sync(work, true, maps)
    }

    /// Applies the Services that changed since the last sync, each with all its frontends (none:
    /// removed); the others stay as they are.
    pub fn sync_changed(
        &mut self,
        changed: &ServiceFrontends,
        options: &PlanOptions,
        maps: &mut impl MapWriter,
    ) -> Report {
        let work = changed
            .iter()
            .map(|(name, frontends)| {
                let desired = plan_frontends(frontends, options);
                (name.to_string().into(), (!desired.is_empty()).then_some(desired))
            })
            .collect();
        self.sync(work, false, maps)
    }

    /// Makes the maps hold exactly `desired`, for callers that plan frontends themselves (tests,
    /// benchmarks): frontends of the same name form a group, whose equal backend sets are shared.
    pub fn apply(&mut self, desired: &Desired, maps: &mut impl MapWriter) -> Report {
        let mut work: BTreeMap<Arc<str>, Option<Desired>> =
            self.groups.keys().map(|name| (name.clone(), None)).collect();
        for (key, service) in desired {
            work.entry(service.name.as_str().into())
                .or_insert_with(|| Some(Desired::new()))
                .get_or_insert_with(Desired::new)
                .insert(*key, service.clone());
        }
        self.sync(work, true, maps)
    }

    /// One pass over `work` (each group's frontends; `None`: removed), plus the groups that
    /// failed before. `full`: `work` names every group, and what none claims goes.
    fn sync(
        &mut self,
        mut work: BTreeMap<Arc<str>, Option<Desired>>,
        full: bool,
        maps: &mut impl MapWriter,
    ) -> Report {
        for (name, desired) in std::mem::take(&mut self.retry) {
            work.entry(name).or_insert(desired);
        }
        let mut pass = Pass::default();
        // Releases first, so that a frontend moving from one Service to another in this pass
        // is free for its new owner.
        let mut jobs = Vec::new();
        for (name, desired) in work {
            let digest = desired.as_ref().map(digest);
            let group = self.groups.get(&name);
            if group.map(|g| g.digest) == digest && digest.is_some() {
                continue;
            }
            if group.is_none() && desired.is_none() {
                continue;
            }
            let wanted: Vec<FrontendKey> = desired.iter().flat_map(|d| d.keys().copied()).collect();
            for key in group.iter().flat_map(|g| &g.frontends) {
                if !wanted.contains(key) && self.owners.get(key) == Some(&name) {
                    self.owners.remove(key);
                }
            }
            jobs.push((name, desired, digest.unwrap_or(0)));
        }
        for (name, desired, digest) in jobs {
            let plan = desired.as_ref().map(GroupPlan::new);
            self.stage(&name, plan, digest, desired, &mut pass, maps);
        }
        self.place_tables(&mut pass, maps);
        let mut report = self.write(pass, maps);
        if full && self.unclaimed {
            self.unclaimed = !self.sweep(maps, &mut report);
        }
        report
    }
}

/// A hash of a group's desired frontends: equal ones need no pass.
fn digest(desired: &Desired) -> u64 {
    let mut hasher = DefaultHasher::new();
    desired.hash(&mut hasher);
    hasher.finish()
}

/// The services map of `key`'s family, for errors.
fn services_map(key: &FrontendKey) -> &'static str {
    if key.addr.is_ipv4() {
        map_names::SERVICES
    } else {
        map_names::SERVICES6
    }
}

/// A backend or source range of the other family than its frontend's would land in the other
/// family's maps, where no packet of the frontend looks: refused before anything is written.
/// The model never plans one (it picks endpoints by family); this guards every other caller.
fn check_families(key: &FrontendKey, service: &DesiredService) -> Result<(), MapError> {
    let ipv4 = key.addr.is_ipv4();
    let in_cluster = service.external.iter().flat_map(|e| e.in_cluster.iter());
    let backends = service
        .backends
        .iter()
        .chain(&service.draining)
        .chain(in_cluster.flat_map(|a| a.backends.iter().chain(&a.draining)))
        .map(SocketAddr::ip);
    let ranges = service
        .external
        .iter()
        .flat_map(|e| e.source_ranges.iter().flatten())
        .map(|(addr, _)| *addr);
    match backends.chain(ranges).find(|addr| addr.is_ipv4() != ipv4) {
        None => Ok(()),
        Some(other) => Err(MapError {
            map: if ipv4 {
                map_names::BACKENDS
            } else {
                map_names::BACKENDS6
            },
            message: format!("{other} is not of the address family of the frontend {key}"),
        }),
    }
}

#[cfg(test)]
mod tests;
