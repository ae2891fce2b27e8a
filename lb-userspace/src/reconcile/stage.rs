//! One pass: each group staged against what the maps hold ([`Reconciler::stage`]), then written
//! phase by phase, each phase in batches across groups ([`Reconciler::write`]):
//!
//! 1. ClusterIPs, new and changed backend entries, new tables, source ranges: nothing points
//!    at them yet;
//! 2. frontends, pointed at their sets' tables (a frontend whose set failed keeps its old entry);
//! 3. backends leaving the tables are marked draining, frontends no group wants are deleted;
//! 4. for each group whose writes all succeeded: what its frontends no longer point at (old
//!    tables, backends that left, source ranges); then ClusterIPs no frontend has.
use std::{
    collections::{BTreeSet, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use foldhash::{HashMap, HashMapExt as _};
use lb_common::{BackendId, BackendSet, ServiceInfo, backend_flags, map_names};

use super::{
    BackendEntry, Desired, FrontendKey, Group, MapError, MapWriter, Member, Reconciler, Report, SourceRange,
    check_families, maglev,
    plan::{DesiredSet, GroupPlan, PlannedFrontend},
    services_map,
    tables::Block,
};

/// A backend entry to delete: (group, set, id).
type Stale = (usize, u32, BackendId);

/// What a pass will write, in phase order, each item tagged with its group (an index into
/// `groups`).
#[derive(Default)]
pub(super) struct Pass {
    groups: Vec<Staged>,
    backend_puts: Vec<(usize, u32, (BackendId, BackendEntry))>,
    tables: Vec<TableWrite>,
    range_puts: Vec<(usize, SourceRange)>,
    frontend_puts: Vec<FrontendPut>,
    demotions: Vec<(usize, u32, (BackendId, BackendEntry))>,
    frontend_deletes: Vec<(usize, FrontendKey)>,
    /// ClusterIPs whose count may change.
    cluster_ips: BTreeSet<IpAddr>,
    /// Sets a write of failed: why. Frontends pointing at them are not written.
    broken: HashMap<u32, MapError>,
    /// Groups a write of failed that is no frontend's own: they are not cleaned up, and are
    /// tried again.
    broken_groups: HashMap<usize, MapError>,
    /// Times the table space grew.
    grew: usize,
}

/// A group as staged.
struct Staged {
    name: Arc<str>,
    desired: Option<Desired>,
    /// What the group will be once written; `None`: removed.
    group: Option<Group>,
    /// The sets it had before.
    old_sets: Vec<u32>,
    /// Entries its sets no longer want.
    stale_entries: Vec<(u32, BackendId)>,
    stale_ranges: Vec<SourceRange>,
    failed: Vec<(String, MapError)>,
}

/// A new table for a set: its live backends' ids, then the Maglev table over their addresses
/// (built when written). Placed once every group is staged, so the space grows at most once.
struct TableWrite {
    set: u32,
    block: Option<Block>,
    maglev_size: u32,
    live: Vec<BackendId>,
    addrs: Vec<SocketAddr>,
}

impl TableWrite {
    fn len(&self) -> u32 {
        self.live.len() as u32 + self.maglev_size
    }

    /// Writes the table into `to` (of [`Self::len`] positions).
    fn fill(&self, to: &mut [BackendId]) {
        let (ids, table) = to.split_at_mut(self.live.len());
        ids.copy_from_slice(&self.live);
        if self.maglev_size > 0 {
            let identities: Vec<Vec<u8>> = self.addrs.iter().map(|addr| maglev::identity(*addr)).collect();
            let weighted: Vec<(&[u8], u32)> = identities.iter().map(|i| (i.as_slice(), 1)).collect();
            for (position, index) in table.iter_mut().zip(maglev::table(&weighted, self.maglev_size)) {
                *position = self.live[index];
            }
        }
    }
}

struct FrontendPut {
    group: usize,
    key: FrontendKey,
    name: String,
    info: ServiceInfo,
    /// The new tables (indexes into `Pass::tables`) of its set of clients in the cluster, and of
    /// its set of outside clients, whose positions `info` takes once they are placed.
    tables: [Option<usize>; 2],
}

/// A set as its frontends are to point at it: its reference, and its new table if it has one.
#[derive(Clone, Copy)]
struct SetRef {
    set: BackendSet,
    table: Option<usize>,
}

impl Reconciler {
    /// Stages group `name` as `plan` wants it (`None`: removed).
    pub(super) fn stage(
        &mut self,
        name: &Arc<str>,
        plan: Option<GroupPlan>,
        digest: u64,
        desired: Option<Desired>,
        pass: &mut Pass,
        maps: &mut impl MapWriter,
    ) {
        let index = pass.groups.len();
        let old = self.groups.get(name).cloned().unwrap_or_default();
        pass.cluster_ips.extend(old.cluster_ips.iter().copied());
        for addr in &old.cluster_ips {
            if let Some(count) = self.cluster_ips.get_mut(addr) {
                *count -= 1;
            }
        }
        let mut staged = Staged {
            name: name.clone(),
            desired,
            group: None,
            old_sets: old.sets.clone(),
            stale_entries: Vec::new(),
            stale_ranges: Vec::new(),
            failed: Vec::new(),
        };
        let Some(plan) = plan else {
            for key in &old.frontends {
                pass.frontend_deletes.push((index, *key));
            }
            pass.groups.push(staged);
            return;
        };

        // The frontends this group may have: not another group's, and of one family.
        let mut claimed = Vec::with_capacity(plan.frontends.len());
        for frontend in &plan.frontends {
            if let Some(owner) = self.owners.get(&frontend.key)
                && owner != name
            {
                let message = format!("{} is programmed for {owner} already", frontend.key);
                staged.failed.push((
                    frontend.name.clone(),
                    MapError {
                        map: services_map(&frontend.key),
                        message,
                    },
                ));
                continue;
            }
            let service = &staged.desired.as_ref().expect("a plan has its desired frontends")[&frontend.key];
            if let Err(error) = check_families(&frontend.key, service) {
                staged.failed.push((frontend.name.clone(), error));
                continue;
            }
            self.owners.insert(frontend.key, name.clone());
            claimed.push(frontend);
        }

        // Each wanted set, matched to one the group (or its frontends, after a restart) holds.
        let matched = self.match_sets(name, &old, &plan, &claimed);
        let mut refs: Vec<Option<SetRef>> = vec![None; plan.sets.len()];
        let mut sets = Vec::new();
        let wanted: BTreeSet<usize> = claimed.iter().flat_map(|f| [f.backends, f.outside]).collect();
        for index_of_set in wanted {
            let want = &plan.sets[index_of_set];
            let id = match matched[index_of_set] {
                Some(id) => Ok(id),
                None => {
                    let (held, sets) = (&self.held, &self.sets);
                    self.service_ids.allocate(
                        |id| sets.contains_key(&id) || held.services.values().any(|s| s.id == id),
                        &mut |kind, next| maps.put_next_id(kind, next),
                    )
                }
            };
            let staged_set = id.and_then(|id| {
                sets.push(id);
                self.stage_set(index, name, id, want, &mut staged, pass, maps)
            });
            match staged_set {
                Ok(set) => refs[index_of_set] = Some(set),
                Err(error) => {
                    for frontend in claimed
                        .iter()
                        .filter(|f| f.backends == index_of_set || f.outside == index_of_set)
                    {
                        staged.failed.push((frontend.name.clone(), error.clone()));
                    }
                }
            }
        }
        self.held.next_ids.backend = self.backend_ids.reserved_until();

        let mut frontends = Vec::with_capacity(claimed.len());
        let mut cluster_ips = Vec::new();
        for frontend in claimed {
            frontends.push(frontend.key);
            if frontend.cluster_ip {
                cluster_ips.push(frontend.key.addr);
            }
            let (Some(backends), Some(outside)) = (refs[frontend.backends], refs[frontend.outside]) else {
                continue;
            };
            let old_info = self.held.services.get(&frontend.key).copied();
            let id = match old_info {
                Some(info) => info.id,
                None => {
                    let (held, sets) = (&self.held, &self.sets);
                    let id = self.service_ids.allocate(
                        |id| sets.contains_key(&id) || held.services.values().any(|s| s.id == id),
                        &mut |kind, next| maps.put_next_id(kind, next),
                    );
                    // Never handed out before (until the counter wraps): no counters to forget.
                    match id {
                        Ok(id) => id,
                        Err(error) => {
                            staged.failed.push((frontend.name.clone(), error));
                            continue;
                        }
                    }
                }
            };
            let ranges: BTreeSet<SourceRange> = frontend
                .source_ranges
                .iter()
                .map(|&(addr, prefix_len)| SourceRange {
                    service_id: id,
                    addr,
                    prefix_len,
                })
                .collect();
            for range in &ranges {
                if !self.held.source_ranges.contains(range) {
                    pass.range_puts.push((index, *range));
                }
            }
            staged
                .stale_ranges
                .extend(self.ranges_of(id).filter(|range| !ranges.contains(range)));
            let info = ServiceInfo {
                id,
                flags: frontend.flags,
                affinity_timeout_s: frontend.affinity_timeout_s,
                backends: backends.set,
                outside: outside.set,
            };
            let tables = [backends.table, outside.table];
            if tables.iter().any(Option::is_some) || old_info != Some(info) {
                pass.frontend_puts.push(FrontendPut {
                    group: index,
                    key: frontend.key,
                    name: frontend.name.clone(),
                    info,
                    tables,
                });
            }
        }
        self.held.next_ids.service = self.service_ids.reserved_until();
        for key in &old.frontends {
            if !frontends.contains(key) {
                pass.frontend_deletes.push((index, *key));
            }
        }
        for addr in &cluster_ips {
            *self.cluster_ips.entry(*addr).or_default() += 1;
        }
        pass.cluster_ips.extend(cluster_ips.iter().copied());
        sets.sort_unstable();
        sets.dedup();
        staged.group = Some(Group {
            frontends,
            sets,
            cluster_ips,
            digest,
        });
        pass.groups.push(staged);
    }

    /// For each of `plan`'s sets, the held set it becomes: one with the same contents if there
    /// is one, else the one the frontends using it point at now. `None`: a new set.
    fn match_sets(
        &self,
        name: &str,
        old: &Group,
        plan: &GroupPlan,
        claimed: &[&PlannedFrontend],
    ) -> Vec<Option<u32>> {
        let mut candidates: Vec<u32> = old.sets.clone();
        for frontend in claimed {
            if let Some(info) = self.held.services.get(&frontend.key) {
                for id in [info.backends.id, info.outside.id] {
                    let free = self
                        .sets
                        .get(&id)
                        .is_some_and(|set| set.owner.as_deref().is_none_or(|owner| owner == name));
                    if free && !candidates.contains(&id) {
                        candidates.push(id);
                    }
                }
            }
        }
        let mut matched: Vec<Option<u32>> = vec![None; plan.sets.len()];
        let mut taken = HashSet::new();
        for (index, want) in plan.sets.iter().enumerate() {
            if let Some(&id) = candidates
                .iter()
                .find(|id| !taken.contains(*id) && self.holds(**id, want))
            {
                matched[index] = Some(id);
                taken.insert(id);
            }
        }
        for frontend in claimed {
            let Some(info) = self.held.services.get(&frontend.key) else {
                continue;
            };
            for (index, id) in [
                (frontend.backends, info.backends.id),
                (frontend.outside, info.outside.id),
            ] {
                let fits = self
                    .sets
                    .get(&id)
                    .is_some_and(|set| set.proto == plan.sets[index].proto);
                if matched[index].is_none() && candidates.contains(&id) && !taken.contains(&id) && fits {
                    matched[index] = Some(id);
                    taken.insert(id);
                }
            }
        }
        matched
    }

    /// Whether set `id` holds exactly `want`: its table, and no other backend entry.
    fn holds(&self, id: u32, want: &DesiredSet) -> bool {
        let Some(set) = self.sets.get(&id) else {
            return false;
        };
        if set.proto != want.proto || set.members.len() != want.live.len() + want.draining.len() {
            return false;
        }
        let live_ok =
            match set.current {
                None => want.live.is_empty(),
                Some((_, maglev_size)) => {
                    maglev_size == want.maglev_size
                        && set.live.len() == want.live.len()
                        && set.live.iter().zip(&want.live).all(|(id, addr)| {
                            set.member(*id).is_some_and(|m| m.addr == *addr && m.flags == 0)
                        })
                }
            };
        live_ok
            && want.draining.iter().all(|addr| {
                set.members
                    .iter()
                    .any(|m| m.addr == *addr && m.flags == backend_flags::DRAINING)
            })
    }

    /// Stages set `id` of group `name` as `want`: its backend entries, and a new table unless the
    /// current one is right. Returns what its frontends are to point at.
    #[expect(clippy::too_many_arguments, reason = "the set, and the pass's state")]
    fn stage_set(
        &mut self,
        group: usize,
        name: &Arc<str>,
        id: u32,
        want: &DesiredSet,
        staged: &mut Staged,
        pass: &mut Pass,
        maps: &mut impl MapWriter,
    ) -> Result<SetRef, MapError> {
        let set = self.sets.entry(id).or_default();
        if set.owner.as_ref() != Some(name) {
            set.owner = Some(name.clone());
        }
        set.proto = want.proto;
        // A new set has no member; a small one is searched as it is.
        let large = set.members.len() > 16;
        let held: HashMap<SocketAddr, Member> = match large {
            true => set.members.iter().map(|m| (m.addr, *m)).collect(),
            false => HashMap::new(),
        };
        let mut live = Vec::with_capacity(want.live.len());
        for (addr, flags) in want
            .live
            .iter()
            .map(|addr| (addr, 0))
            .chain(want.draining.iter().map(|addr| (addr, backend_flags::DRAINING)))
        {
            let set = &self.sets[&id];
            let found = match large {
                true => held.get(addr).copied(),
                false => set.members.iter().find(|m| m.addr == *addr).copied(),
            };
            let backend_id = match found {
                Some(member) => member.id,
                None => {
                    let sets = &self.sets;
                    self.backend_ids.allocate(
                        |id| sets.values().any(|set| set.member(id).is_some()),
                        &mut |kind, next| maps.put_next_id(kind, next),
                    )?
                }
            };
            let entry = BackendEntry {
                addr: *addr,
                proto: want.proto,
                flags,
                set_id: id,
            };
            match found {
                Some(member) if member.flags == flags => {}
                // Out of the new table before it is marked: no new flow picks it meanwhile.
                Some(member) if flags == backend_flags::DRAINING && member.flags == 0 => {
                    pass.demotions.push((group, id, (backend_id, entry)));
                }
                _ => pass.backend_puts.push((group, id, (backend_id, entry))),
            }
            if flags == 0 {
                live.push(backend_id);
            }
        }
        let set = &self.sets[&id];
        staged.stale_entries.extend(
            set.members
                .iter()
                .filter(|m| !want.addrs().any(|wanted| *wanted == m.addr))
                .map(|m| (id, m.id)),
        );
        if live.is_empty() {
            self.sets.get_mut(&id).expect("staged above").current = None;
            return Ok(SetRef {
                set: BackendSet {
                    id,
                    ..BackendSet::default()
                },
                table: None,
            });
        }
        let mut set_ref = SetRef {
            set: BackendSet {
                id,
                count: live.len() as u32,
                table: 0,
                maglev_size: want.maglev_size,
            },
            table: None,
        };
        if let Some((block, maglev_size)) = set.current
            && maglev_size == want.maglev_size
            && set.live == live
        {
            set_ref.set.table = block.start;
            return Ok(set_ref);
        }
        set_ref.table = Some(pass.tables.len());
        pass.tables.push(TableWrite {
            set: id,
            block: None,
            maglev_size: want.maglev_size,
            live,
            addrs: want.live.clone(),
        });
        Ok(set_ref)
    }

    /// Gives every new table of `pass` its positions, growing the space once if they do not fit,
    /// and points the frontends at them.
    pub(super) fn place_tables(&mut self, pass: &mut Pass, maps: &mut impl MapWriter) {
        let mut remaining: u64 = pass.tables.iter().map(|t| u64::from(t.len())).sum();
        for index in 0..pass.tables.len() {
            let len = pass.tables[index].len();
            let mut block = self.space.allocate(len);
            if block.is_none() {
                let capacity = self
                    .space
                    .grown_capacity(remaining.min(u64::from(u32::MAX)) as u32);
                match maps.grow_tables(capacity) {
                    Ok(()) => {
                        pass.grew += 1;
                        self.space.grew(capacity);
                        self.held.table_capacity = capacity;
                        block = self.space.allocate(len);
                    }
                    Err(error) => {
                        pass.broken.insert(pass.tables[index].set, error);
                    }
                }
            }
            remaining -= u64::from(len);
            match block {
                Some(block) => pass.tables[index].block = Some(block),
                None => {
                    let table = &pass.tables[index];
                    pass.broken.entry(table.set).or_insert_with(|| MapError {
                        map: map_names::BACKEND_TABLES,
                        message: format!("no room for {len} positions"),
                    });
                }
            }
        }
        for put in &mut pass.frontend_puts {
            for (set, table) in [
                (&mut put.info.backends, put.tables[0]),
                (&mut put.info.outside, put.tables[1]),
            ] {
                if let Some(block) = table.and_then(|index| pass.tables[index].block) {
                    set.table = block.start;
                }
            }
        }
    }

    /// The source ranges programmed for frontend `id`.
    fn ranges_of(&self, id: u32) -> impl Iterator<Item = SourceRange> + use<'_> {
        let first = SourceRange {
            service_id: id,
            addr: IpAddr::from([0u8; 4]),
            prefix_len: 0,
        };
        self.held
            .source_ranges
            .range(first..)
            .take_while(move |r| r.service_id == id)
            .copied()
    }

    /// Writes `pass`, phase by phase, and keeps the bookkeeping in step with what was written.
    pub(super) fn write(&mut self, mut pass: Pass, maps: &mut impl MapWriter) -> Report {
        let mut report = Report {
            writes: pass.grew,
            ..Report::default()
        };
        let mut failed: Vec<Vec<(String, MapError)>> = pass
            .groups
            .iter_mut()
            .map(|g| std::mem::take(&mut g.failed))
            .collect();

        // 1. What nothing points at yet.
        self.put_cluster_ips(&pass.cluster_ips, maps, &mut report);
        let puts: Vec<(BackendId, BackendEntry)> = pass.backend_puts.iter().map(|(_, _, put)| *put).collect();
        for_each_batch(
            &puts,
            |batch| maps.put_backends(batch),
            |index, result| {
                let (group, set, (id, entry)) = pass.backend_puts[index];
                match result {
                    Ok(()) => {
                        report.writes += 1;
                        self.commit_backend(set, id, entry);
                    }
                    Err(error) => {
                        pass.broken.entry(set).or_insert_with(|| error.clone());
                        pass.broken_groups.entry(group).or_insert(error);
                    }
                }
            },
        );
        let mut tables: Vec<(Block, TableWrite)> = std::mem::take(&mut pass.tables)
            .into_iter()
            .filter_map(|table| {
                let block = table.block?;
                if pass.broken.contains_key(&table.set) {
                    self.space.release(block);
                    return None;
                }
                Some((block, table))
            })
            .collect();
        tables.sort_unstable_by_key(|(block, _)| block.start);
        let blocks: Vec<(u32, u32)> = tables.iter().map(|(block, _)| (block.start, block.len)).collect();
        match maps.put_tables(&blocks, &|index, to| tables[index].1.fill(to)) {
            Ok(()) => {
                for (block, table) in tables {
                    report.writes += 1;
                    let set = self.sets.get_mut(&table.set).expect("staged");
                    set.current = Some((block, table.maglev_size));
                    set.blocks.push(block);
                    set.live = table.live;
                }
            }
            Err(error) => {
                for (block, table) in tables {
                    self.space.release(block);
                    pass.broken.insert(table.set, error.clone());
                }
            }
        }
        for (group, range) in &pass.range_puts {
            match maps.put_source_range(*range) {
                Ok(()) => {
                    report.writes += 1;
                    self.held.source_ranges.insert(*range);
                }
                Err(error) => failed[*group].push((pass.groups[*group].name.to_string(), error)),
            }
        }

        // 2. The frontends, in key order (a full map keeps the first ones).
        let mut frontends: Vec<FrontendPut> = Vec::with_capacity(pass.frontend_puts.len());
        for put in std::mem::take(&mut pass.frontend_puts) {
            let broken = [put.info.backends.id, put.info.outside.id]
                .into_iter()
                .find_map(|set| pass.broken.get(&set));
            match broken {
                Some(error) => failed[put.group].push((put.name, error.clone())),
                None => frontends.push(put),
            }
        }
        frontends.sort_by_key(|put| put.key);
        let entries: Vec<(FrontendKey, ServiceInfo)> =
            frontends.iter().map(|put| (put.key, put.info)).collect();
        for_each_batch(
            &entries,
            |batch| maps.put_services(batch),
            |index, result| {
                let put = &frontends[index];
                match result {
                    Ok(()) => {
                        report.writes += 1;
                        self.held.services.insert(put.key, put.info);
                    }
                    Err(error) => failed[put.group].push((put.name.clone(), error)),
                }
            },
        );

        // 3. Backends out of the tables now, and frontends nobody wants.
        let demotions: Vec<(BackendId, BackendEntry)> =
            pass.demotions.iter().map(|(_, _, put)| *put).collect();
        for_each_batch(
            &demotions,
            |batch| maps.put_backends(batch),
            |index, result| {
                let (group, set, (id, entry)) = pass.demotions[index];
                match result {
                    Ok(()) => {
                        report.writes += 1;
                        self.commit_backend(set, id, entry);
                    }
                    Err(error) => {
                        pass.broken_groups.entry(group).or_insert(error);
                    }
                }
            },
        );
        // A frontend another group took in this pass is that group's now.
        pass.frontend_deletes
            .retain(|(_, key)| !self.owners.contains_key(key) && self.held.services.contains_key(key));
        self.delete_frontends(&pass.frontend_deletes, maps, &mut report, |group, error| {
            failed[group].push((pass.groups[group].name.to_string(), error));
        });

        // 4. What the frontends of each group that fully succeeded no longer point at.
        let mut stale_backends: Vec<(usize, u32, BackendId)> = Vec::new();
        let mut stale_ranges: Vec<(usize, SourceRange)> = Vec::new();
        // A write that is no frontend's own failed: the group reports it unless a frontend does.
        for (group, error) in std::mem::take(&mut pass.broken_groups) {
            if failed[group].is_empty() {
                failed[group].push((pass.groups[group].name.to_string(), error));
            }
        }
        for (index, staged) in pass.groups.iter().enumerate() {
            if !failed[index].is_empty() {
                continue;
            }
            let kept: &[u32] = staged.group.as_ref().map_or(&[], |g| &g.sets);
            for &(set, id) in &staged.stale_entries {
                stale_backends.push((index, set, id));
            }
            for &set in staged.old_sets.iter().filter(|set| !kept.contains(set)) {
                if let Some(held) = self.sets.get(&set) {
                    stale_backends.extend(held.members.iter().map(|m| (index, set, m.id)));
                }
            }
            stale_ranges.extend(staged.stale_ranges.iter().map(|range| (index, *range)));
        }
        self.delete_backends(&stale_backends, maps, &mut report, |group, error| {
            failed[group].push((pass.groups[group].name.to_string(), error));
        });
        for (group, range) in stale_ranges {
            match maps.delete_source_range(range) {
                Ok(()) => {
                    report.deletes += 1;
                    self.held.source_ranges.remove(&range);
                }
                Err(error) => failed[group].push((pass.groups[group].name.to_string(), error)),
            }
        }
        for (index, staged) in pass.groups.iter().enumerate() {
            if !failed[index].is_empty() {
                continue;
            }
            let kept: &[u32] = staged.group.as_ref().map_or(&[], |g| &g.sets);
            for &set in kept {
                self.release_tables(set, false);
            }
            for &set in staged.old_sets.iter().filter(|set| !kept.contains(set)) {
                self.release_tables(set, true);
            }
        }
        self.delete_cluster_ips(&pass.cluster_ips, maps, &mut report);

        // The groups' records: a group that failed is tried again, keeping every set it had.
        for (staged, failures) in pass.groups.into_iter().zip(failed) {
            if failures.is_empty() {
                match staged.group {
                    Some(group) => self.groups.insert(staged.name, group),
                    None => self.groups.remove(&staged.name),
                };
                continue;
            }
            let mut group = staged.group.unwrap_or_default();
            group.sets.extend(staged.old_sets.iter().copied());
            group.sets.sort_unstable();
            group.sets.dedup();
            group.digest = 0;
            // A removed group still owns what it could not delete.
            if staged.desired.is_none() {
                group.frontends = self
                    .groups
                    .get(&staged.name)
                    .map(|g| g.frontends.clone())
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|key| self.held.services.contains_key(key))
                    .collect();
                for key in &group.frontends {
                    self.owners.insert(*key, staged.name.clone());
                }
            }
            self.groups.insert(staged.name.clone(), group);
            self.retry.insert(staged.name, staged.desired);
            report.failed.extend(failures);
        }
        report
    }

    /// Records a backend entry as written: a new one of `set`, or one whose flags changed.
    fn commit_backend(&mut self, set: u32, id: BackendId, entry: BackendEntry) {
        let members = &mut self.sets.entry(set).or_default().members;
        let member = Member {
            addr: entry.addr,
            id,
            flags: entry.flags,
        };
        match members.iter_mut().rev().find(|m| m.id == id) {
            Some(held) => *held = member,
            None => members.push(member),
        }
    }

    /// Deletes backend entries (set, id), each failure reported to its group.
    fn delete_backends(
        &mut self,
        stale: &[(usize, u32, BackendId)],
        maps: &mut impl MapWriter,
        report: &mut Report,
        mut failed: impl FnMut(usize, MapError),
    ) {
        let (stale, entries): (Vec<Stale>, Vec<(BackendId, BackendEntry)>) = stale
            .iter()
            .filter_map(|&(group, set, id)| {
                let held = self.sets.get(&set)?;
                let member = held.member(id)?;
                let entry = BackendEntry {
                    addr: member.addr,
                    proto: held.proto,
                    flags: member.flags,
                    set_id: set,
                };
                Some(((group, set, id), (id, entry)))
            })
            .unzip();
        for_each_batch(
            &entries,
            |batch| maps.delete_backends(batch),
            |index, result| {
                let (group, set, id) = stale[index];
                match result {
                    Ok(()) => {
                        report.deletes += 1;
                        if let Some(held) = self.sets.get_mut(&set) {
                            held.members.retain(|m| m.id != id);
                        }
                    }
                    Err(error) => failed(group, error),
                }
            },
        );
    }

    /// Deletes frontends, then their source ranges.
    fn delete_frontends(
        &mut self,
        keys: &[(usize, FrontendKey)],
        maps: &mut impl MapWriter,
        report: &mut Report,
        mut failed: impl FnMut(usize, MapError),
    ) {
        let plain: Vec<FrontendKey> = keys.iter().map(|(_, key)| *key).collect();
        let mut freed = Vec::new();
        for_each_batch(
            &plain,
            |batch| maps.delete_services(batch),
            |index, result| match result {
                Ok(()) => {
                    report.deletes += 1;
                    if let Some(info) = self.held.services.remove(&plain[index]) {
                        freed.push((keys[index].0, info.id));
                    }
                }
                Err(error) => failed(keys[index].0, error),
            },
        );
        for (group, id) in freed {
            maps.forget_service_stats(id);
            let ranges: Vec<SourceRange> = self.ranges_of(id).collect();
            for range in ranges {
                match maps.delete_source_range(range) {
                    Ok(()) => {
                        report.deletes += 1;
                        self.held.source_ranges.remove(&range);
                    }
                    Err(error) => failed(group, error),
                }
            }
        }
    }

    /// Gives back the tables of set `id` other than its current one (no frontend points at
    /// them once its group's frontends were all written); `dropped`: the set is no longer used,
    /// and goes with its current table too.
    fn release_tables(&mut self, id: u32, dropped: bool) {
        let Some(set) = self.sets.get_mut(&id) else {
            return;
        };
        if dropped {
            set.current = None;
        }
        let current = set.current.map(|(block, _)| block);
        let (kept, stale): (Vec<Block>, Vec<Block>) = set.blocks.iter().partition(|b| Some(**b) == current);
        set.blocks = kept;
        if dropped {
            set.live.clear();
        }
        if dropped && set.members.is_empty() {
            self.sets.remove(&id);
        }
        for block in stale {
            self.space.release(block);
        }
    }

    /// Writes the ClusterIPs among `addrs` that are wanted with a count the map does not hold.
    fn put_cluster_ips(&mut self, addrs: &BTreeSet<IpAddr>, maps: &mut impl MapWriter, report: &mut Report) {
        let puts: Vec<(IpAddr, u32)> = addrs
            .iter()
            .filter_map(|addr| {
                let wanted = self.cluster_ips.get(addr).copied().unwrap_or(0);
                (wanted > 0 && self.held.cluster_ips.get(addr) != Some(&wanted)).then_some((*addr, wanted))
            })
            .collect();
        for_each_batch(
            &puts,
            |batch| maps.put_cluster_ips(batch),
            |index, result| match result {
                Ok(()) => {
                    report.writes += 1;
                    self.held.cluster_ips.insert(puts[index].0, puts[index].1);
                }
                Err(error) => report
                    .failed
                    .push((format!("ClusterIP {}", puts[index].0), error)),
            },
        );
    }

    /// Deletes the ClusterIPs among `addrs` no frontend has any more.
    fn delete_cluster_ips(
        &mut self,
        addrs: &BTreeSet<IpAddr>,
        maps: &mut impl MapWriter,
        report: &mut Report,
    ) {
        let mut gone = Vec::new();
        for addr in addrs {
            if self.cluster_ips.get(addr).copied().unwrap_or(0) > 0 {
                continue;
            }
            self.cluster_ips.remove(addr);
            if self.held.cluster_ips.contains_key(addr) {
                gone.push(*addr);
            }
        }
        for_each_batch(
            &gone,
            |batch| maps.delete_cluster_ips(batch),
            |index, result| match result {
                Ok(()) => {
                    report.deletes += 1;
                    self.held.cluster_ips.remove(&gone[index]);
                }
                Err(error) => report
                    .failed
                    .push((format!("removed ClusterIP {}", gone[index]), error)),
            },
        );
    }

    /// Removes what no group claims: entries found at start-up that the first full pass did not
    /// take. Returns whether all of it went.
    pub(super) fn sweep(&mut self, maps: &mut impl MapWriter, report: &mut Report) -> bool {
        let failures = report.failed.len();
        let orphans: Vec<(usize, FrontendKey)> = self
            .held
            .services
            .keys()
            .filter(|key| !self.owners.contains_key(key))
            .map(|key| (0, *key))
            .collect();
        let mut errors = Vec::new();
        self.delete_frontends(&orphans, maps, report, |_, error| errors.push(error));
        let pointed: HashSet<u32> = self
            .held
            .services
            .values()
            .flat_map(|info| [info.backends.id, info.outside.id])
            .collect();
        let unowned: Vec<u32> = self
            .sets
            .iter()
            .filter(|(id, set)| set.owner.is_none() && !pointed.contains(id))
            .map(|(id, _)| *id)
            .collect();
        let mut stale: Vec<(usize, u32, BackendId)> = Vec::new();
        for id in &unowned {
            let set = &self.sets[id];
            stale.extend(set.members.iter().map(|m| (0, *id, m.id)));
        }
        self.delete_backends(&stale, maps, report, |_, error| errors.push(error));
        for id in unowned {
            self.release_tables(id, true);
        }
        let ids: HashSet<u32> = self.held.services.values().map(|info| info.id).collect();
        let ranges: Vec<SourceRange> = self
            .held
            .source_ranges
            .iter()
            .filter(|range| !ids.contains(&range.service_id))
            .copied()
            .collect();
        for range in ranges {
            match maps.delete_source_range(range) {
                Ok(()) => {
                    report.deletes += 1;
                    self.held.source_ranges.remove(&range);
                }
                Err(error) => errors.push(error),
            }
        }
        let addrs: BTreeSet<IpAddr> = self
            .held
            .cluster_ips
            .keys()
            .chain(self.cluster_ips.keys())
            .copied()
            .collect();
        self.put_cluster_ips(&addrs, maps, report);
        self.delete_cluster_ips(&addrs, maps, report);
        let swept = errors.is_empty() && report.failed.len() == failures;
        report.failed.extend(
            errors
                .into_iter()
                .map(|error| ("entries of no service".to_owned(), error)),
        );
        swept
    }
}

/// Writes `items` by `write` in batches, calling `done` once per item in order with its result:
/// a batch stops at its first failure, which is reported, and the rest is tried again after it.
fn for_each_batch<T>(
    items: &[T],
    mut write: impl FnMut(&[T]) -> Result<(), super::BatchError>,
    mut done: impl FnMut(usize, Result<(), MapError>),
) {
    let mut at = 0;
    while at < items.len() {
        match write(&items[at..]) {
            Ok(()) => {
                for index in at..items.len() {
                    done(index, Ok(()));
                }
                return;
            }
            Err(error) => {
                let failed = at + error.index.min(items.len() - at - 1);
                for index in at..failed {
                    done(index, Ok(()));
                }
                done(failed, Err(error.error));
                at = failed + 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_batch_reports_its_failure_and_goes_on_after_it() {
        let items = [1, 2, 3, 4, 5];
        let mut seen = Vec::new();
        let mut calls = 0;
        for_each_batch(
            &items,
            |batch| {
                calls += 1;
                match batch.iter().position(|&item| item == 2 || item == 4) {
                    Some(index) => Err(super::super::BatchError {
                        index,
                        error: MapError {
                            map: "test",
                            message: format!("{} refused", batch[index]),
                        },
                    }),
                    None => Ok(()),
                }
            },
            |index, result| seen.push((items[index], result.is_ok())),
        );
        assert_eq!(seen, [(1, true), (2, false), (3, true), (4, false), (5, true)]);
        assert_eq!(calls, 3);
    }
}
