//! From the model to map contents: [`plan`] says what the maps should hold, [`Reconciler`] writes
//! only the difference, in an order that never shows a packet a half-written service.
mod entries;
mod ids;
pub mod maglev;
mod plan;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use self::ids::IdCounter;
use lb_common::{BackendId, ServiceInfo, SlotKey, backend_flags, map_names, service_flags};

pub use self::{
    entries::{
        BackendEntry, FrontendKey, MaglevInput, MapError, MapWriter, NextIds, Programmed, SourceRange,
    },
    ids::IdKind,
    maglev::is_prime,
    plan::{DesiredService, External, PlanOptions, plan, plan_frontends},
};
use crate::model::{Frontend, ServiceName};

/// Each Service's frontends as the model computes them: the unit the agent hands the
/// reconciler. A Service with no frontends (gone, or no longer proxied) is removed.
pub type ServiceFrontends = BTreeMap<ServiceName, Vec<Frontend>>;

/// What one [`Reconciler::apply`] did.
#[derive(Debug, Default)]
pub struct Report {
    pub writes: usize,
    pub deletes: usize,
    /// Services that could not be (fully) programmed, with why. Their previous state stays.
    pub failed: Vec<(String, MapError)>,
}

pub struct Reconciler {
    programmed: Programmed,
    /// Every Service's desired frontends, as last given to [`Reconciler::sync_all`] and
    /// [`Reconciler::sync_changed`].
    desired: BTreeMap<FrontendKey, DesiredService>,
    frontends_of: HashMap<ServiceName, Vec<FrontendKey>>,
    /// What each frontend was last programmed from, successfully: an unchanged frontend costs a
    /// comparison, so one endpoint change does not revisit every service.
    applied: HashMap<FrontendKey, DesiredService>,
    /// Whether entries of no service may exist: at start (recovered maps) and after a failure.
    orphans_possible: bool,
    service_ids: IdCounter,
    backend_ids: IdCounter,
}

impl Reconciler {
    /// Starts from what the maps already hold, so ids stay stable across agent restarts and
    /// unchanged entries are not rewritten.
    pub fn new(programmed: Programmed) -> Self {
        let service_ids = IdCounter::new(
            IdKind::Service,
            programmed.next_ids.service,
            programmed.services.values().map(|s| s.id).max(),
        );
        let backend_ids = IdCounter::new(
            IdKind::Backend,
            programmed.next_ids.backend,
            programmed.backends.keys().copied().max(),
        );
        Self {
            programmed,
            desired: BTreeMap::new(),
            frontends_of: HashMap::new(),
            applied: HashMap::new(),
            orphans_possible: true,
            service_ids,
            backend_ids,
        }
    }

    pub fn programmed(&self) -> &Programmed {
        &self.programmed
    }

    /// Makes the maps hold exactly `services` (the first sync, or a full resync): whatever no
    /// Service claims is removed.
    pub fn sync_all(
        &mut self,
        services: &ServiceFrontends,
        options: &PlanOptions,
        maps: &mut impl MapWriter,
    ) -> Report {
        self.desired.clear();
        self.frontends_of.clear();
        self.sync_changed(services, options, maps)
    }

    /// Applies the Services that changed since the last sync, each with all its frontends (none:
    /// removed); the others stay as they are.
    pub fn sync_changed(
        &mut self,
        changed: &ServiceFrontends,
        options: &PlanOptions,
        maps: &mut impl MapWriter,
    ) -> Report {
        for (name, frontends) in changed {
            for key in self.frontends_of.remove(name).unwrap_or_default() {
                self.desired.remove(&key);
            }
            let planned = plan_frontends(frontends, options);
            if !planned.is_empty() {
                self.frontends_of
                    .insert(name.clone(), planned.keys().copied().collect());
            }
            self.desired.extend(planned);
        }
        let desired = std::mem::take(&mut self.desired);
        let report = self.apply(&desired, maps);
        self.desired = desired;
        report
    }

    /// Makes the maps hold `desired`. Per service: backends, then slots, then the service entry;
    /// then draining backends, stale slots and stale backends. Removed services: the service entry first.
    pub fn apply(
        &mut self,
        desired: &BTreeMap<FrontendKey, DesiredService>,
        maps: &mut impl MapWriter,
    ) -> Report {
        let mut report = Report::default();
        // ClusterIPs first, so a new Service's undefined ports are refused from its first packet
        // on; a removed one's addresses last, so they stay refused until its frontends are gone.
        let cluster_ips = cluster_ips(desired);
        if let Err(error) = self.put_cluster_ips(&cluster_ips, maps, &mut report) {
            report.failed.push(("ClusterIPs".to_owned(), error));
        }
        // Built on first need: an apply that changes nothing never scans the backends.
        let mut index: Option<Index> = None;
        for (key, service) in desired {
            if self.applied.get(key) == Some(service) {
                continue;
            }
            let index = index.get_or_insert_with(|| Index::new(&self.programmed));
            let (writes, deletes) = (report.writes, report.deletes);
            match self.apply_service(*key, service, index, maps, &mut report) {
                Ok(()) => {
                    tracing::debug!(
                        frontend = service.name,
                        writes = report.writes - writes,
                        deletes = report.deletes - deletes,
                        "frontend applied"
                    );
                    self.applied.insert(*key, service.clone());
                }
                Err(error) => {
                    self.applied.remove(key);
                    report.failed.push((service.name.clone(), error));
                }
            }
        }
        let removed: Vec<FrontendKey> = self
            .programmed
            .services
            .keys()
            .filter(|key| !desired.contains_key(key))
            .copied()
            .collect();
        for key in removed {
            self.applied.remove(&key);
            let index = index.get_or_insert_with(|| Index::new(&self.programmed));
            if let Err(error) = self.remove_service(key, index, maps, &mut report) {
                report.failed.push((format!("removed frontend {key}"), error));
            }
        }
        if let Err(error) = self.delete_cluster_ips(&cluster_ips, maps, &mut report) {
            report.failed.push(("removed ClusterIPs".to_owned(), error));
        }
        if self.orphans_possible || !report.failed.is_empty() {
            match self.remove_orphans(maps, &mut report) {
                Ok(()) => self.orphans_possible = !report.failed.is_empty(),
                Err(error) => report.failed.push(("entries of no service".to_owned(), error)),
            }
        }
        report
    }

    fn put_cluster_ips(
        &mut self,
        wanted: &BTreeMap<IpAddr, u32>,
        maps: &mut impl MapWriter,
        report: &mut Report,
    ) -> Result<(), MapError> {
        for (&addr, &frontends) in wanted {
            if self.programmed.cluster_ips.get(&addr) != Some(&frontends) {
                maps.put_cluster_ip(addr, frontends)?;
                self.programmed.cluster_ips.insert(addr, frontends);
                report.writes += 1;
            }
        }
        Ok(())
    }

    fn delete_cluster_ips(
        &mut self,
        wanted: &BTreeMap<IpAddr, u32>,
        maps: &mut impl MapWriter,
        report: &mut Report,
    ) -> Result<(), MapError> {
        let stale: Vec<IpAddr> = self
            .programmed
            .cluster_ips
            .keys()
            .filter(|addr| !wanted.contains_key(*addr))
            .copied()
            .collect();
        for addr in stale {
            maps.delete_cluster_ip(addr)?;
            self.programmed.cluster_ips.remove(&addr);
            report.deletes += 1;
        }
        Ok(())
    }

    /// Tables, slots and backends whose service has no entry: what a new service that failed part-way
    /// (a full map) wrote, or what an interrupted run left in the pinned maps. Nothing can reach
    /// them, and they hold capacity.
    fn remove_orphans(&mut self, maps: &mut impl MapWriter, report: &mut Report) -> Result<(), MapError> {
        let live: HashSet<u32> = self.programmed.services.values().map(|s| s.id).collect();
        let tables: Vec<u32> = self
            .programmed
            .maglev
            .keys()
            .filter(|id| !live.contains(id))
            .copied()
            .collect();
        for service_id in tables {
            self.delete_maglev(service_id, maps, report)?;
        }
        let slots: Vec<SlotKey> = self
            .programmed
            .slots
            .keys()
            .filter(|k| !live.contains(&k.service_id))
            .copied()
            .collect();
        for key in slots {
            maps.delete_slot(key)?;
            self.programmed.slots.remove(&key);
            report.deletes += 1;
        }
        let ranges: Vec<SourceRange> = self
            .programmed
            .source_ranges
            .iter()
            .filter(|r| !live.contains(&r.service_id))
            .copied()
            .collect();
        self.delete_source_ranges(ranges, maps, report)?;
        let backends: Vec<BackendId> = self
            .programmed
            .backends
            .iter()
            .filter(|(_, b)| !live.contains(&b.service_id))
            .map(|(id, _)| *id)
            .collect();
        self.delete_backends(backends, maps, report)
    }

    fn apply_service(
        &mut self,
        key: FrontendKey,
        service: &DesiredService,
        index: &mut Index,
        maps: &mut impl MapWriter,
        report: &mut Report,
    ) -> Result<(), MapError> {
        check_families(&key, service)?;
        let old = self.programmed.services.get(&key).copied();
        let service_id = match old {
            Some(info) => info.id,
            None => {
                let id = self
                    .service_ids
                    .allocate(|id| index.service_ids.contains(&id), &mut |kind, next| {
                        maps.put_next_id(kind, next)
                    })?;
                self.programmed.next_ids.service = self.service_ids.reserved_until();
                maps.forget_service_stats(id);
                id
            }
        };
        index.service_ids.insert(service_id);
        // The ids the service's backends have, by address: a backend keeps its id, so the flows
        // tracked on it keep resolving.
        let known: HashMap<SocketAddr, BackendId> = index
            .backends_of(service_id)
            .iter()
            .filter_map(|id| Some((self.programmed.backends.get(id)?.addr, *id)))
            .collect();
        let mut ids = Vec::with_capacity(service.backends.len());
        for &addr in &service.backends {
            ids.push(self.put_backend(service_id, key.proto, addr, 0, &known, maps, report)?);
        }
        for (slot, &id) in ids.iter().enumerate() {
            let slot_key = SlotKey {
                service_id,
                slot: slot as u32,
            };
            if self.programmed.slots.get(&slot_key) != Some(&id) {
                maps.put_slot(slot_key, id)?;
                self.programmed.slots.insert(slot_key, id);
                report.writes += 1;
            }
        }
        // The table before the entry that points packets at it.
        let maglev_size = service.maglev.filter(|_| !ids.is_empty());
        if let Some(size) = maglev_size {
            self.write_maglev(service_id, size, service, &ids, maps, report)?;
        }
        // The ranges before the entry that makes packets check them.
        let ranges: BTreeSet<SourceRange> = service
            .external
            .iter()
            .flat_map(|e| e.source_ranges.iter().flatten())
            .map(|&(addr, prefix_len)| SourceRange {
                service_id,
                addr,
                prefix_len,
            })
            .collect();
        for range in &ranges {
            if !self.programmed.source_ranges.contains(range) {
                maps.put_source_range(*range)?;
                self.programmed.source_ranges.insert(*range);
                report.writes += 1;
            }
        }
        let mut flags = 0;
        if maglev_size.is_some() {
            flags |= service_flags::MAGLEV;
        }
        if service.affinity_timeout.is_some() {
            flags |= service_flags::AFFINITY;
        }
        match &service.external {
            Some(External { local: true, .. }) => flags |= service_flags::EXTERNAL_LOCAL,
            Some(External { local: false, .. }) => flags |= service_flags::EXTERNAL_SNAT,
            None => {}
        }
        if service
            .external
            .as_ref()
            .is_some_and(|e| e.source_ranges.is_some())
        {
            flags |= service_flags::SOURCE_RANGES;
        }
        let info = ServiceInfo {
            id: service_id,
            backend_count: ids.len() as u32,
            flags,
            maglev_table_size: maglev_size.unwrap_or(0),
            affinity_timeout_s: service.affinity_timeout.unwrap_or(0),
        };
        if old != Some(info) {
            maps.put_service(key, info)?;
            self.programmed.services.insert(key, info);
            report.writes += 1;
        }
        // Draining backends after the slots and the table: a backend demoted here is already
        // out of both, so no new flow is sent to it while its own flows keep resolving.
        let mut kept = ids.clone();
        for &backend in service.draining.iter().filter(|b| !service.backends.contains(b)) {
            kept.push(self.put_backend(
                service_id,
                key.proto,
                backend,
                backend_flags::DRAINING,
                &known,
                maps,
                report,
            )?);
        }
        if maglev_size.is_none() {
            self.delete_maglev(service_id, maps, report)?;
        }
        let stale = self
            .source_ranges_of(service_id)
            .filter(|r| !ranges.contains(r))
            .collect();
        self.delete_source_ranges(stale, maps, report)?;
        self.delete_slots(service_id, ids.len() as u32, maps, report)?;
        let stale: Vec<BackendId> = index
            .backends_of(service_id)
            .iter()
            .filter(|id| !kept.contains(id))
            .copied()
            .collect();
        self.delete_backends(stale, maps, report)
    }

    /// Writes one backend of `service_id` unless it is already as wanted; its id is the one it
    /// had (in `known`), so flows tracked on it keep resolving.
    #[expect(clippy::too_many_arguments, reason = "the backend, and the apply's state")]
    fn put_backend(
        &mut self,
        service_id: u32,
        proto: u8,
        addr: SocketAddr,
        flags: u8,
        known: &HashMap<SocketAddr, BackendId>,
        maps: &mut impl MapWriter,
        report: &mut Report,
    ) -> Result<BackendId, MapError> {
        let backend = BackendEntry {
            addr,
            proto,
            flags,
            service_id,
        };
        let id = match known.get(&addr) {
            Some(&id) => id,
            None => self.allocate_backend_id(maps)?,
        };
        if self.programmed.backends.get(&id) != Some(&backend) {
            maps.put_backend(id, &backend)?;
            self.programmed.backends.insert(id, backend);
            report.writes += 1;
        }
        Ok(id)
    }

    /// Builds and swaps in the service's Maglev table, unless the one in place was built from the
    /// same backends and size.
    fn write_maglev(
        &mut self,
        service_id: u32,
        size: u32,
        service: &DesiredService,
        ids: &[BackendId],
        maps: &mut impl MapWriter,
        report: &mut Report,
    ) -> Result<(), MapError> {
        let mut sorted = ids.to_vec();
        sorted.sort_unstable();
        let input = MaglevInput {
            size,
            backends: sorted,
        };
        if self.programmed.maglev.get(&service_id) == Some(&input) {
            return Ok(());
        }
        // Identity for hashing is the address and port, the same on every node; the table
        // stores this node's ids for them.
        let identities: Vec<Vec<u8>> = service.backends.iter().map(|b| maglev::identity(*b)).collect();
        let weighted: Vec<(&[u8], u32)> = identities.iter().map(|id| (id.as_slice(), 1)).collect();
        let table: Vec<BackendId> = maglev::table(&weighted, size)
            .into_iter()
            .map(|i| ids[i])
            .collect();
        maps.put_maglev(service_id, &table)?;
        self.programmed.maglev.insert(service_id, input);
        report.writes += 1;
        Ok(())
    }

    fn delete_maglev(
        &mut self,
        service_id: u32,
        maps: &mut impl MapWriter,
        report: &mut Report,
    ) -> Result<(), MapError> {
        if self.programmed.maglev.contains_key(&service_id) {
            maps.delete_maglev(service_id)?;
            self.programmed.maglev.remove(&service_id);
            report.deletes += 1;
        }
        Ok(())
    }

    fn remove_service(
        &mut self,
        key: FrontendKey,
        index: &Index,
        maps: &mut impl MapWriter,
        report: &mut Report,
    ) -> Result<(), MapError> {
        let Some(info) = self.programmed.services.get(&key).copied() else {
            return Ok(());
        };
        maps.delete_service(key)?;
        self.programmed.services.remove(&key);
        report.deletes += 1;
        maps.forget_service_stats(info.id);
        self.delete_maglev(info.id, maps, report)?;
        let ranges = self.source_ranges_of(info.id).collect();
        self.delete_source_ranges(ranges, maps, report)?;
        self.delete_slots(info.id, 0, maps, report)?;
        self.delete_backends(index.backends_of(info.id).to_vec(), maps, report)
    }

    /// Deletes the service's slots from `first` on: everything past its backend count, whatever
    /// a previous pass left (a failed delete is retried here).
    fn delete_slots(
        &mut self,
        service_id: u32,
        first: u32,
        maps: &mut impl MapWriter,
        report: &mut Report,
    ) -> Result<(), MapError> {
        let stale: Vec<SlotKey> = self
            .programmed
            .slots
            .range(
                SlotKey {
                    service_id,
                    slot: first,
                }..=SlotKey {
                    service_id,
                    slot: u32::MAX,
                },
            )
            .map(|(key, _)| *key)
            .collect();
        for key in stale {
            // The map first: if the delete fails, the slot is still known and tried again.
            maps.delete_slot(key)?;
            self.programmed.slots.remove(&key);
            report.deletes += 1;
        }
        Ok(())
    }

    fn delete_backends(
        &mut self,
        ids: Vec<BackendId>,
        maps: &mut impl MapWriter,
        report: &mut Report,
    ) -> Result<(), MapError> {
        for id in ids {
            let Some(backend) = self.programmed.backends.get(&id) else {
                continue;
            };
            maps.delete_backend(id, backend)?;
            self.programmed.backends.remove(&id);
            report.deletes += 1;
        }
        Ok(())
    }

    fn source_ranges_of(&self, service_id: u32) -> impl Iterator<Item = SourceRange> + use<'_> {
        // The smallest range of the service: IPv4 ranges sort before IPv6 ones.
        let first = SourceRange {
            service_id,
            addr: Ipv4Addr::UNSPECIFIED.into(),
            prefix_len: 0,
        };
        self.programmed
            .source_ranges
            .range(first..)
            .take_while(move |r| r.service_id == service_id)
            .copied()
    }

    fn delete_source_ranges(
        &mut self,
        ranges: Vec<SourceRange>,
        maps: &mut impl MapWriter,
        report: &mut Report,
    ) -> Result<(), MapError> {
        for range in ranges {
            maps.delete_source_range(range)?;
            self.programmed.source_ranges.remove(&range);
            report.deletes += 1;
        }
        Ok(())
    }

    /// Ids count up and wrap, skipping 0 and ids in use, so a just-freed id is not handed out
    /// again while conntrack entries may still name it.
    fn allocate_backend_id(&mut self, maps: &mut impl MapWriter) -> Result<BackendId, MapError> {
        let backends = &self.programmed.backends;
        let id = self
            .backend_ids
            .allocate(|id| backends.contains_key(&id), &mut |kind, next| {
                maps.put_next_id(kind, next)
            })?;
        self.programmed.next_ids.backend = self.backend_ids.reserved_until();
        Ok(id)
    }
}

/// A backend or source range of the other family than its frontend's would land in the other
/// family's maps, where no packet of the frontend looks: refused before anything is written.
/// The model never plans one (it picks endpoints by family); this guards every other caller.
fn check_families(key: &FrontendKey, service: &DesiredService) -> Result<(), MapError> {
    let ipv4 = key.addr.is_ipv4();
    let backends = service
        .backends
        .iter()
        .chain(&service.draining)
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

/// Each ClusterIP of `desired`, with how many of its frontends it has.
fn cluster_ips(desired: &BTreeMap<FrontendKey, DesiredService>) -> BTreeMap<IpAddr, u32> {
    let mut ips = BTreeMap::new();
    for key in desired.iter().filter(|(_, s)| s.cluster_ip).map(|(key, _)| key) {
        *ips.entry(key.addr).or_default() += 1;
    }
    ips
}

/// What one apply looks up per service, built once from the programmed state so that an apply
/// costs O(backends), not O(services × backends).
struct Index {
    /// Service id → the ids of its backends, as programmed when the apply began.
    backends: HashMap<u32, Vec<BackendId>>,
    /// Ids of programmed services, and of those given out during this apply.
    service_ids: HashSet<u32>,
}

impl Index {
    fn new(programmed: &Programmed) -> Self {
        let mut backends: HashMap<u32, Vec<BackendId>> = HashMap::with_capacity(programmed.services.len());
        for (&id, backend) in &programmed.backends {
            backends.entry(backend.service_id).or_default().push(id);
        }
        Self {
            backends,
            service_ids: programmed.services.values().map(|s| s.id).collect(),
        }
    }

    fn backends_of(&self, service_id: u32) -> &[BackendId] {
        self.backends.get(&service_id).map_or(&[], Vec::as_slice)
    }
}

#[cfg(test)]
mod tests;
