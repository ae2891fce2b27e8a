//! The reconciler against a recording [`MapWriter`], and [`plan`] on hand-built models.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
};

use lb_common::{IPPROTO_TCP, IPPROTO_UDP, map_names};

use super::*;
use crate::model::{Endpoint, Frontend, FrontendKind, Model, Policy, Protocol, ServiceName};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    PutBackend(BackendId),
    PutSlot(SlotKey),
    PutService(FrontendKey),
    DeleteBackend(BackendId),
    DeleteSlot(SlotKey),
    DeleteService(FrontendKey),
    PutMaglev(u32),
    DeleteMaglev(u32),
    PutSourceRange(SourceRange),
    DeleteSourceRange(SourceRange),
    PutClusterIp(IpAddr),
    DeleteClusterIp(IpAddr),
}

/// Maps in memory, recording every write in order. Deleting an absent key fails as it does on a
/// BPF hash map (ENOENT); `backend_capacity` makes the backend map refuse new keys when full.
#[derive(Debug, Default)]
struct Recorder {
    state: Programmed,
    ops: Vec<Op>,
    backend_capacity: Option<usize>,
    /// Makes every slot delete fail, as a kernel refusal would.
    refuse_slot_deletes: bool,
    /// The Maglev tables written, by service id.
    tables: BTreeMap<u32, Vec<BackendId>>,
}

impl Recorder {
    fn with_backend_capacity(capacity: usize) -> Self {
        Self {
            backend_capacity: Some(capacity),
            ..Self::default()
        }
    }

    fn take_ops(&mut self) -> Vec<Op> {
        std::mem::take(&mut self.ops)
    }
}

fn missing(map: &'static str) -> MapError {
    MapError {
        map,
        message: "no such key (ENOENT)".into(),
    }
}

impl MapWriter for Recorder {
    fn put_backend(&mut self, id: BackendId, backend: &BackendEntry) -> Result<(), MapError> {
        if let Some(capacity) = self.backend_capacity
            && !self.state.backends.contains_key(&id)
            && self.state.backends.len() >= capacity
        {
            return Err(MapError {
                map: map_names::BACKENDS,
                message: "map is full (E2BIG)".into(),
            });
        }
        self.ops.push(Op::PutBackend(id));
        self.state.backends.insert(id, *backend);
        Ok(())
    }

    fn put_slot(&mut self, key: SlotKey, id: BackendId) -> Result<(), MapError> {
        self.ops.push(Op::PutSlot(key));
        self.state.slots.insert(key, id);
        Ok(())
    }

    fn put_service(&mut self, key: FrontendKey, info: ServiceInfo) -> Result<(), MapError> {
        self.ops.push(Op::PutService(key));
        self.state.services.insert(key, info);
        Ok(())
    }

    fn delete_backend(&mut self, id: BackendId, backend: &BackendEntry) -> Result<(), MapError> {
        if self.state.backends.get(&id) != Some(backend) {
            return Err(missing(map_names::BACKENDS));
        }
        self.state.backends.remove(&id);
        self.ops.push(Op::DeleteBackend(id));
        Ok(())
    }

    fn delete_slot(&mut self, key: SlotKey) -> Result<(), MapError> {
        if self.refuse_slot_deletes {
            return Err(MapError {
                map: map_names::BACKEND_SLOTS,
                message: "refused (EPERM)".into(),
            });
        }
        self.state
            .slots
            .remove(&key)
            .ok_or_else(|| missing(map_names::BACKEND_SLOTS))?;
        self.ops.push(Op::DeleteSlot(key));
        Ok(())
    }

    fn delete_service(&mut self, key: FrontendKey) -> Result<(), MapError> {
        self.state
            .services
            .remove(&key)
            .ok_or_else(|| missing(map_names::SERVICES))?;
        self.ops.push(Op::DeleteService(key));
        Ok(())
    }

    /// Keeps the table itself, and as state what it was built from as far as a table shows it:
    /// its size and the backends in it.
    fn put_maglev(&mut self, service_id: u32, table: &[BackendId]) -> Result<(), MapError> {
        let mut backends = table.to_vec();
        backends.sort_unstable();
        backends.dedup();
        self.ops.push(Op::PutMaglev(service_id));
        self.tables.insert(service_id, table.to_vec());
        self.state.maglev.insert(
            service_id,
            MaglevInput {
                size: table.len() as u32,
                backends,
            },
        );
        Ok(())
    }

    fn delete_maglev(&mut self, service_id: u32) -> Result<(), MapError> {
        self.state
            .maglev
            .remove(&service_id)
            .ok_or_else(|| missing(map_names::MAGLEV))?;
        self.tables.remove(&service_id);
        self.ops.push(Op::DeleteMaglev(service_id));
        Ok(())
    }

    fn put_source_range(&mut self, range: SourceRange) -> Result<(), MapError> {
        self.ops.push(Op::PutSourceRange(range));
        self.state.source_ranges.insert(range);
        Ok(())
    }

    fn delete_source_range(&mut self, range: SourceRange) -> Result<(), MapError> {
        if !self.state.source_ranges.remove(&range) {
            return Err(missing(map_names::SOURCE_RANGES));
        }
        self.ops.push(Op::DeleteSourceRange(range));
        Ok(())
    }

    fn put_next_id(&mut self, kind: IdKind, next: u32) -> Result<(), MapError> {
        match kind {
            IdKind::Service => self.state.next_ids.service = next,
            IdKind::Backend => self.state.next_ids.backend = next,
        }
        Ok(())
    }

    fn put_cluster_ip(&mut self, addr: IpAddr, frontends: u32) -> Result<(), MapError> {
        self.ops.push(Op::PutClusterIp(addr));
        self.state.cluster_ips.insert(addr, frontends);
        Ok(())
    }

    fn delete_cluster_ip(&mut self, addr: IpAddr) -> Result<(), MapError> {
        self.state
            .cluster_ips
            .remove(&addr)
            .ok_or_else(|| missing(map_names::CLUSTER_IPS))?;
        self.ops.push(Op::DeleteClusterIp(addr));
        Ok(())
    }
}

/// Applies and checks that the reconciler's idea of the maps is what the maps hold.
fn apply(
    reconciler: &mut Reconciler,
    desired: &BTreeMap<FrontendKey, DesiredService>,
    maps: &mut Recorder,
) -> Report {
    let report = reconciler.apply(desired, maps);
    assert_eq!(
        &maps.state,
        reconciler.programmed(),
        "after apply, the maps should hold exactly what the reconciler believes they hold"
    );
    report
}

fn key(last_octet: u8, port: u16) -> FrontendKey {
    FrontendKey {
        addr: [10, 96, 0, last_octet].into(),
        port,
        proto: IPPROTO_TCP,
    }
}

fn backend(last_octet: u8) -> SocketAddr {
    ([10, 0, 0, last_octet], 8080).into()
}

fn desired(services: &[(FrontendKey, &str, Vec<SocketAddr>)]) -> BTreeMap<FrontendKey, DesiredService> {
    services
        .iter()
        .map(|(key, name, backends)| {
            (
                *key,
                DesiredService {
                    name: (*name).to_owned(),
                    cluster_ip: true,
                    backends: backends.clone(),
                    draining: Vec::new(),
                    maglev: None,
                    affinity_timeout: None,
                    external: None,
                },
            )
        })
        .collect()
}

fn position(ops: &[Op], op: Op) -> usize {
    ops.iter()
        .position(|o| *o == op)
        .unwrap_or_else(|| panic!("{op:?} should have been written; ops were {ops:?}"))
}

fn service_info(programmed: &Programmed, key: FrontendKey) -> ServiceInfo {
    *programmed
        .services
        .get(&key)
        .unwrap_or_else(|| panic!("{key:?} should be programmed"))
}

/// The backend id behind each address of a service, read through its slots.
fn backend_ids(programmed: &Programmed, key: FrontendKey) -> BTreeMap<SocketAddr, BackendId> {
    let info = service_info(programmed, key);
    (0..info.backend_count)
        .map(|slot| {
            let slot_key = SlotKey {
                service_id: info.id,
                slot,
            };
            let id = *programmed
                .slots
                .get(&slot_key)
                .unwrap_or_else(|| panic!("slot {slot_key:?} should be programmed"));
            let backend = programmed
                .backends
                .get(&id)
                .unwrap_or_else(|| panic!("backend {id} named by {slot_key:?} should be programmed"));
            assert_eq!(
                backend.service_id, info.id,
                "backend {id} should belong to service {}",
                info.id
            );
            (backend.addr, id)
        })
        .collect()
}

#[test]
fn add_writes_backends_then_slots_then_the_service_entry() {
    let (web, api) = (key(10, 80), key(11, 443));
    let want = desired(&[
        (web, "default/web:80", vec![backend(1), backend(2), backend(3)]),
        (api, "default/api:443", vec![backend(4)]),
    ]);
    let mut maps = Recorder::default();
    let mut reconciler = Reconciler::new(Programmed::default());
    let report = apply(&mut reconciler, &want, &mut maps);
    assert!(
        report.failed.is_empty(),
        "nothing should fail: {:?}",
        report.failed
    );
    assert_eq!(
        report.writes,
        3 + 3 + 1 + 1 + 1 + 1 + 2,
        "backends, slots and entries of both services, and their ClusterIPs"
    );
    assert_eq!(report.deletes, 0);

    let ops = maps.take_ops();
    for key in [web, api] {
        let info = service_info(reconciler.programmed(), key);
        let ids = backend_ids(reconciler.programmed(), key);
        let service_at = position(&ops, Op::PutService(key));
        let slots: Vec<usize> = (0..info.backend_count)
            .map(|slot| {
                position(
                    &ops,
                    Op::PutSlot(SlotKey {
                        service_id: info.id,
                        slot,
                    }),
                )
            })
            .collect();
        let backends: Vec<usize> = ids
            .values()
            .map(|id| position(&ops, Op::PutBackend(*id)))
            .collect();
        let last_backend = *backends.iter().max().expect("the service has backends");
        let (first_slot, last_slot) = (*slots.iter().min().unwrap(), *slots.iter().max().unwrap());
        assert!(
            last_backend < first_slot,
            "{key:?}: every backend before any slot: {ops:?}"
        );
        assert!(
            last_slot < service_at,
            "{key:?}: every slot before the service entry: {ops:?}"
        );
    }
    let web_ids = backend_ids(reconciler.programmed(), web);
    assert_eq!(
        web_ids.keys().copied().collect::<Vec<_>>(),
        vec![backend(1), backend(2), backend(3)]
    );
    let web_info = service_info(reconciler.programmed(), web);
    assert_eq!(web_info.backend_count, 3);
    assert_ne!(
        web_info.id,
        service_info(reconciler.programmed(), api).id,
        "each frontend gets its own service id"
    );
    let proto = reconciler
        .programmed()
        .backends
        .values()
        .map(|b| b.proto)
        .collect::<Vec<_>>();
    assert!(
        proto.iter().all(|p| *p == IPPROTO_TCP),
        "backends carry the frontend's protocol"
    );
}

#[test]
fn service_without_backends_gets_an_entry_with_zero_count() {
    let web = key(10, 80);
    let mut maps = Recorder::default();
    let mut reconciler = Reconciler::new(Programmed::default());
    let report = apply(
        &mut reconciler,
        &desired(&[(web, "default/web:80", vec![])]),
        &mut maps,
    );
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(
        maps.take_ops(),
        vec![Op::PutClusterIp(web.addr), Op::PutService(web)]
    );
    assert_eq!(service_info(&maps.state, web).backend_count, 0);
}

/// A backend that starts terminating keeps its id and entry (so its flows still resolve) but
/// leaves the slots, and is flagged only once the slots no longer name it; when it goes away
/// for good, it is deleted.
#[test]
fn a_backend_that_starts_draining_keeps_its_id_and_leaves_the_slots_first() {
    let web = key(10, 80);
    let mut want = desired(&[(web, "default/web:80", vec![backend(1), backend(2), backend(3)])]);
    let mut maps = Recorder::default();
    let mut reconciler = Reconciler::new(Programmed::default());
    apply(&mut reconciler, &want, &mut maps);
    let before = backend_ids(reconciler.programmed(), web);
    maps.take_ops();

    let service = want.get_mut(&web).unwrap();
    service.backends = vec![backend(1), backend(2)];
    service.draining = vec![backend(3)];
    let report = apply(&mut reconciler, &want, &mut maps);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let ops = maps.take_ops();
    let draining_id = before[&backend(3)];
    let drained = reconciler.programmed().backends[&draining_id];
    assert_eq!(drained.flags, backend_flags::DRAINING);
    assert_eq!(drained.addr, backend(3));
    assert_eq!(
        service_info(reconciler.programmed(), web).backend_count,
        2,
        "only ready backends are in slots"
    );
    assert!(
        !reconciler
            .programmed()
            .slots
            .values()
            .any(|id| *id == draining_id),
        "no slot names the draining backend"
    );
    assert!(
        !ops.contains(&Op::DeleteBackend(draining_id)),
        "its entry stays: {ops:?}"
    );
    let flagged_at = position(&ops, Op::PutBackend(draining_id));
    let service_at = position(&ops, Op::PutService(web));
    assert!(
        service_at < flagged_at,
        "flagged after the service stopped counting it: {ops:?}"
    );

    // Unchanged: nothing written. Ready again: back in a slot under the same id.
    assert_eq!(apply(&mut reconciler, &want, &mut maps).writes, 0);
    let service = want.get_mut(&web).unwrap();
    service.backends = vec![backend(1), backend(2), backend(3)];
    service.draining = vec![];
    apply(&mut reconciler, &want, &mut maps);
    assert_eq!(backend_ids(reconciler.programmed(), web), before);
    assert_eq!(reconciler.programmed().backends[&draining_id].flags, 0);

    // Gone from the endpoints: deleted.
    want.get_mut(&web).unwrap().backends = vec![backend(1), backend(2)];
    maps.take_ops();
    apply(&mut reconciler, &want, &mut maps);
    assert!(maps.take_ops().contains(&Op::DeleteBackend(draining_id)));
}

/// Each ClusterIP is marked before its frontends are written, and unmarked only after the last
/// of them is gone.
#[test]
fn cluster_ips_are_marked_before_their_frontends_and_unmarked_after() {
    let (web_http, web_https) = (key(10, 80), key(10, 443));
    let mut want = desired(&[
        (web_http, "default/web:80", vec![backend(1)]),
        (web_https, "default/web:443", vec![backend(1)]),
    ]);
    let mut maps = Recorder::default();
    let mut reconciler = Reconciler::new(Programmed::default());
    apply(&mut reconciler, &want, &mut maps);
    let ops = maps.take_ops();
    let marked = position(&ops, Op::PutClusterIp(web_http.addr));
    assert!(marked < position(&ops, Op::PutService(web_http)), "{ops:?}");
    assert_eq!(reconciler.programmed().cluster_ips, [(web_http.addr, 2)].into());

    want.remove(&web_https);
    apply(&mut reconciler, &want, &mut maps);
    assert_eq!(reconciler.programmed().cluster_ips, [(web_http.addr, 1)].into());
    want.clear();
    apply(&mut reconciler, &want, &mut maps);
    let ops = maps.take_ops();
    assert!(
        position(&ops, Op::DeleteService(web_http)) < position(&ops, Op::DeleteClusterIp(web_http.addr)),
        "{ops:?}"
    );
    assert!(reconciler.programmed().cluster_ips.is_empty());
}

#[test]
fn applying_the_same_desired_state_twice_writes_nothing_the_second_time() {
    let want = desired(&[
        (key(10, 80), "default/web:80", vec![backend(1), backend(2)]),
        (key(11, 53), "default/dns:53", vec![backend(3)]),
        (key(12, 80), "default/empty:80", vec![]),
    ]);
    let mut maps = Recorder::default();
    let mut reconciler = Reconciler::new(Programmed::default());
    apply(&mut reconciler, &want, &mut maps);
    let before = reconciler.programmed().clone();
    maps.take_ops();

    let report = apply(&mut reconciler, &want, &mut maps);
    assert_eq!(
        (report.writes, report.deletes),
        (0, 0),
        "an unchanged state needs no writes"
    );
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(maps.take_ops(), vec![], "no map operation at all");
    assert_eq!(reconciler.programmed(), &before);
}

#[test]
fn removing_one_backend_updates_the_entry_before_deleting_the_slot_then_the_backend() {
    let web = key(10, 80);
    let mut maps = Recorder::default();
    let mut reconciler = Reconciler::new(Programmed::default());
    apply(
        &mut reconciler,
        &desired(&[(web, "default/web:80", vec![backend(1), backend(2), backend(3)])]),
        &mut maps,
    );
    let old_ids = backend_ids(reconciler.programmed(), web);
    let service_id = service_info(reconciler.programmed(), web).id;
    maps.take_ops();

    let report = apply(
        &mut reconciler,
        &desired(&[(web, "default/web:80", vec![backend(1), backend(3)])]),
        &mut maps,
    );
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let ops = maps.take_ops();
    let info = service_info(reconciler.programmed(), web);
    assert_eq!(info.backend_count, 2);
    assert_eq!(info.id, service_id, "the service keeps its id");
    let updated = position(&ops, Op::PutService(web));
    let slot_deleted = position(&ops, Op::DeleteSlot(SlotKey { service_id, slot: 2 }));
    let backend_deleted = position(&ops, Op::DeleteBackend(old_ids[&backend(2)]));
    assert!(
        updated < slot_deleted && slot_deleted < backend_deleted,
        "entry (count 2), then stale slot, then backend: {ops:?}"
    );
    assert!(
        !ops.iter().any(|op| matches!(op, Op::PutBackend(_))),
        "surviving backends are not rewritten: {ops:?}"
    );
    let new_ids = backend_ids(reconciler.programmed(), web);
    assert_eq!(
        new_ids[&backend(1)],
        old_ids[&backend(1)],
        "10.0.0.1 keeps its id"
    );
    assert_eq!(
        new_ids[&backend(3)],
        old_ids[&backend(3)],
        "10.0.0.3 keeps its id"
    );
    assert!(
        !reconciler
            .programmed()
            .backends
            .contains_key(&old_ids[&backend(2)]),
        "the removed backend's entry is gone"
    );
    assert_eq!(reconciler.programmed().slots.len(), 2, "no stale slot is left");
}

#[test]
fn adding_a_backend_keeps_the_existing_ids() {
    let web = key(10, 80);
    let mut maps = Recorder::default();
    let mut reconciler = Reconciler::new(Programmed::default());
    apply(
        &mut reconciler,
        &desired(&[(web, "default/web:80", vec![backend(1), backend(3)])]),
        &mut maps,
    );
    let old_ids = backend_ids(reconciler.programmed(), web);
    maps.take_ops();

    apply(
        &mut reconciler,
        &desired(&[(web, "default/web:80", vec![backend(1), backend(2), backend(3)])]),
        &mut maps,
    );
    let ops = maps.take_ops();
    let new_ids = backend_ids(reconciler.programmed(), web);
    assert_eq!(new_ids[&backend(1)], old_ids[&backend(1)]);
    assert_eq!(new_ids[&backend(3)], old_ids[&backend(3)]);
    let added = new_ids[&backend(2)];
    assert!(
        !old_ids.values().any(|id| *id == added),
        "the new backend gets a fresh id"
    );
    assert!(
        position(&ops, Op::PutBackend(added)) < position(&ops, Op::PutService(web)),
        "the new backend is written before the entry that makes it reachable: {ops:?}"
    );
    assert_eq!(service_info(reconciler.programmed(), web).backend_count, 3);
}

#[test]
fn removing_a_service_deletes_its_entry_then_slots_then_backends() {
    let (web, api) = (key(10, 80), key(11, 443));
    let mut maps = Recorder::default();
    let mut reconciler = Reconciler::new(Programmed::default());
    apply(
        &mut reconciler,
        &desired(&[
            (web, "default/web:80", vec![backend(1), backend(2)]),
            (api, "default/api:443", vec![backend(3)]),
        ]),
        &mut maps,
    );
    let web_info = service_info(reconciler.programmed(), web);
    let web_ids = backend_ids(reconciler.programmed(), web);
    let api_before = backend_ids(reconciler.programmed(), api);
    maps.take_ops();

    let report = apply(
        &mut reconciler,
        &desired(&[(api, "default/api:443", vec![backend(3)])]),
        &mut maps,
    );
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(
        (report.writes, report.deletes),
        (0, 1 + 2 + 2 + 1),
        "entry, slots, backends, ClusterIP"
    );
    let ops = maps.take_ops();
    assert_eq!(ops[0], Op::DeleteService(web), "the entry goes first: {ops:?}");
    let slots: Vec<usize> = (0..2)
        .map(|slot| {
            position(
                &ops,
                Op::DeleteSlot(SlotKey {
                    service_id: web_info.id,
                    slot,
                }),
            )
        })
        .collect();
    let backends: Vec<usize> = web_ids
        .values()
        .map(|id| position(&ops, Op::DeleteBackend(*id)))
        .collect();
    assert!(
        slots.iter().max() < backends.iter().min(),
        "slots are deleted before backends: {ops:?}"
    );
    assert_eq!(
        ops.last(),
        Some(&Op::DeleteClusterIp(web.addr)),
        "its ClusterIP last: {ops:?}"
    );
    assert_eq!(ops.len(), 6, "nothing of default/api is touched: {ops:?}");
    assert_eq!(backend_ids(reconciler.programmed(), api), api_before);
    assert_eq!(reconciler.programmed().services.len(), 1);
    assert_eq!(reconciler.programmed().backends.len(), 1);
    assert_eq!(reconciler.programmed().slots.len(), 1);
}

#[test]
fn restarted_reconciler_writes_nothing_for_the_state_it_finds_and_keeps_ids() {
    let (web, api) = (key(10, 80), key(11, 443));
    let want = desired(&[
        (web, "default/web:80", vec![backend(1), backend(2)]),
        (api, "default/api:443", vec![backend(3)]),
    ]);
    let mut maps = Recorder::default();
    let mut first = Reconciler::new(Programmed::default());
    apply(&mut first, &want, &mut maps);
    let left_behind = first.programmed().clone();
    maps.take_ops();

    // A new agent reads the pinned maps back.
    let mut restarted = Reconciler::new(left_behind.clone());
    let report = apply(&mut restarted, &want, &mut maps);
    assert_eq!(
        (report.writes, report.deletes),
        (0, 0),
        "nothing changed, nothing is written"
    );
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(maps.take_ops(), vec![]);
    assert_eq!(restarted.programmed(), &left_behind, "ids and entries are kept");

    // A change after the restart keeps the existing ids and allocates unused ones.
    let grown = desired(&[
        (web, "default/web:80", vec![backend(1), backend(2), backend(4)]),
        (api, "default/api:443", vec![backend(3)]),
        (key(12, 80), "default/new:80", vec![backend(5)]),
    ]);
    apply(&mut restarted, &grown, &mut maps);
    let ids = backend_ids(restarted.programmed(), web);
    let old = backend_ids(&left_behind, web);
    assert_eq!(ids[&backend(1)], old[&backend(1)]);
    assert_eq!(ids[&backend(2)], old[&backend(2)]);
    assert!(
        !left_behind.backends.contains_key(&ids[&backend(4)]),
        "a new backend must not take an id found in the maps"
    );
    let new_service = service_info(restarted.programmed(), key(12, 80));
    assert!(
        !left_behind.services.values().any(|s| s.id == new_service.id),
        "a new service must not take a service id found in the maps"
    );
    assert_eq!(
        service_info(restarted.programmed(), web).id,
        service_info(&left_behind, web).id
    );
}

#[test]
fn new_ids_are_never_zero_nor_in_use_even_when_the_counter_wraps() {
    // State as a previous agent left it: the highest ids are in use, so counting wraps to 0.
    let old = key(10, 80);
    let mut found = Programmed::default();
    found.services.insert(
        old,
        ServiceInfo {
            id: u32::MAX,
            backend_count: 2,
            ..ServiceInfo::default()
        },
    );
    for (slot, id) in [(0, 1), (1, u32::MAX)] {
        found.slots.insert(
            SlotKey {
                service_id: u32::MAX,
                slot,
            },
            id,
        );
        found.backends.insert(
            id,
            BackendEntry {
                addr: backend(slot as u8 + 1),
                proto: IPPROTO_TCP,
                flags: 0,
                service_id: u32::MAX,
            },
        );
    }
    let mut maps = Recorder {
        state: found.clone(),
        ..Recorder::default()
    };
    let mut reconciler = Reconciler::new(found.clone());
    let report = apply(
        &mut reconciler,
        &desired(&[
            (old, "default/old:80", vec![backend(1), backend(2)]),
            (
                key(11, 80),
                "default/new:80",
                vec![backend(7), backend(8), backend(9)],
            ),
        ]),
        &mut maps,
    );
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let new_info = service_info(reconciler.programmed(), key(11, 80));
    assert_ne!(new_info.id, 0, "0 is never a service id");
    assert_ne!(new_info.id, u32::MAX, "u32::MAX is in use");
    let new_ids: Vec<BackendId> = backend_ids(reconciler.programmed(), key(11, 80))
        .into_values()
        .collect();
    for id in &new_ids {
        assert_ne!(*id, 0, "0 is never a backend id: {new_ids:?}");
        assert!(
            !found.backends.contains_key(id),
            "backend id {id} was in use: {new_ids:?}"
        );
    }
    let mut distinct = new_ids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "three distinct new ids: {new_ids:?}");
    assert_eq!(
        backend_ids(reconciler.programmed(), old),
        backend_ids(&found, old),
        "the existing service keeps its ids"
    );
}

#[test]
fn ids_freed_by_a_removed_service_are_not_handed_out_again_at_once() {
    let (web, api) = (key(10, 80), key(11, 80));
    let mut maps = Recorder::default();
    let mut reconciler = Reconciler::new(Programmed::default());
    apply(
        &mut reconciler,
        &desired(&[(web, "default/web:80", vec![backend(1), backend(2)])]),
        &mut maps,
    );
    let web_info = service_info(reconciler.programmed(), web);
    let web_ids = backend_ids(reconciler.programmed(), web);
    apply(&mut reconciler, &desired(&[]), &mut maps);
    assert_eq!(
        reconciler.programmed(),
        &Programmed {
            next_ids: reconciler.programmed().next_ids,
            ..Programmed::default()
        },
        "everything was removed"
    );

    apply(
        &mut reconciler,
        &desired(&[(api, "default/api:80", vec![backend(1), backend(2)])]),
        &mut maps,
    );
    let api_info = service_info(reconciler.programmed(), api);
    assert_ne!(
        api_info.id, web_info.id,
        "conntrack may still name the removed service's id"
    );
    for id in backend_ids(reconciler.programmed(), api).values() {
        assert!(
            !web_ids.values().any(|old| old == id),
            "backend id {id} was just freed and may still be named by conntrack"
        );
    }
}

#[test]
fn a_full_backend_map_fails_only_the_service_that_does_not_fit() {
    let (fits, too_big) = (key(10, 80), key(20, 80));
    let mut maps = Recorder::with_backend_capacity(4);
    let mut reconciler = Reconciler::new(Programmed::default());
    let report = apply(
        &mut reconciler,
        &desired(&[
            (fits, "default/fits:80", vec![backend(1), backend(2)]),
            (
                too_big,
                "default/too-big:80",
                vec![backend(3), backend(4), backend(5)],
            ),
        ]),
        &mut maps,
    );
    assert_eq!(
        report.failed.len(),
        1,
        "one service should fail: {:?}",
        report.failed
    );
    let (name, error) = &report.failed[0];
    assert_eq!(name, "default/too-big:80", "the failure names the service");
    assert_eq!(
        error.map,
        map_names::BACKENDS,
        "the failure names the map: {error}"
    );
    assert_eq!(
        service_info(&maps.state, fits).backend_count,
        2,
        "the other service is programmed fully"
    );
    assert_eq!(backend_ids(&maps.state, fits).len(), 2);
    assert!(
        !maps.state.services.contains_key(&too_big),
        "a service whose backends could not all be written must not be reachable"
    );
}

#[test]
fn a_failed_update_leaves_the_previous_entry_in_place_and_a_later_apply_completes_it() {
    let web = key(10, 80);
    let mut maps = Recorder::with_backend_capacity(2);
    let mut reconciler = Reconciler::new(Programmed::default());
    apply(
        &mut reconciler,
        &desired(&[(web, "default/web:80", vec![backend(1)])]),
        &mut maps,
    );
    let before = service_info(reconciler.programmed(), web);

    let grown = desired(&[(web, "default/web:80", vec![backend(1), backend(2), backend(3)])]);
    let report = apply(&mut reconciler, &grown, &mut maps);
    assert_eq!(report.failed.len(), 1, "{:?}", report.failed);
    assert_eq!(report.failed[0].0, "default/web:80");
    assert_eq!(
        service_info(&maps.state, web),
        before,
        "the previous entry (one backend) stays in effect"
    );
    assert_eq!(backend_ids(&maps.state, web).len(), 1);

    maps.backend_capacity = None;
    let report = apply(&mut reconciler, &grown, &mut maps);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(service_info(&maps.state, web).backend_count, 3);
    assert_eq!(
        maps.state.backends.len(),
        3,
        "no backend entry is left over: {:?}",
        maps.state.backends
    );
    assert_eq!(service_info(&maps.state, web).id, before.id);
}

// --- plan ----------------------------------------------------------------------------------

fn frontend(
    name: &str,
    kind: FrontendKind,
    address: &str,
    port: u16,
    protocol: Protocol,
    backends: &[&str],
) -> Frontend {
    let (namespace, name) = name.split_once('/').expect("namespace/name");
    Frontend {
        service: ServiceName {
            namespace: namespace.into(),
            name: name.into(),
        },
        port_name: String::new(),
        kind,
        address: address.parse().expect("frontend address"),
        port,
        protocol,
        algorithm: None,
        backends: backends
            .iter()
            .map(|b| {
                let (address, port) = b.rsplit_once(':').expect("address:port");
                Endpoint {
                    address: address
                        .trim_matches(['[', ']'])
                        .parse::<IpAddr>()
                        .expect("backend address"),
                    port: port.parse().expect("backend port"),
                    pod: format!("pod-{b}"),
                    node_name: None,
                    zone: None,
                    terminating: false,
                    zone_hints: Vec::new(),
                    node_hints: Vec::new(),
                }
            })
            .collect(),
        draining: Vec::new(),
        policy: Policy::default(),
    }
}

#[test]
fn plan_maps_ipv4_cluster_ip_frontends_to_service_keys() {
    let model = Model {
        frontends: vec![
            frontend(
                "default/web",
                FrontendKind::ClusterIp,
                "10.96.0.10",
                80,
                Protocol::Tcp,
                &["10.0.0.2:8080", "10.0.0.1:8080"],
            ),
            frontend(
                "kube-system/dns",
                FrontendKind::ClusterIp,
                "10.96.0.53",
                53,
                Protocol::Udp,
                &["10.0.0.53:5353"],
            ),
            frontend(
                "default/empty",
                FrontendKind::ClusterIp,
                "10.96.0.11",
                8080,
                Protocol::Tcp,
                &[],
            ),
        ],
        warnings: vec![],
    };
    let planned = plan(&model, &PlanOptions::default());
    let tcp = key(10, 80);
    let udp = FrontendKey {
        proto: IPPROTO_UDP,
        ..key(53, 53)
    };
    let empty = key(11, 8080);
    assert_eq!(planned.keys().copied().collect::<Vec<_>>(), {
        let mut keys = vec![tcp, udp, empty];
        keys.sort();
        keys
    });
    assert_eq!(
        planned[&tcp],
        DesiredService {
            name: "default/web:80".into(),
            cluster_ip: true,
            backends: vec![backend(2), backend(1)],
            draining: Vec::new(),
            maglev: Some(lb_common::DEFAULT_MAGLEV_TABLE_SIZE),
            affinity_timeout: None,
            external: None,
        },
        "backends keep the model's order"
    );
    assert_eq!(
        planned[&udp],
        DesiredService {
            name: "kube-system/dns:53".into(),
            cluster_ip: true,
            backends: vec![([10, 0, 0, 53], 5353).into()],
            draining: Vec::new(),
            maglev: Some(lb_common::DEFAULT_MAGLEV_TABLE_SIZE),
            affinity_timeout: None,
            external: None,
        }
    );
    assert_eq!(
        planned[&empty].backends,
        vec![],
        "a frontend without endpoints is still planned"
    );
}

#[test]
fn plan_keys_frontends_of_both_families_and_external_ones_with_their_policy() {
    let load_balancer = |address| {
        let mut lb = frontend(
            "default/web",
            FrontendKind::LoadBalancer,
            address,
            80,
            Protocol::Tcp,
            &[],
        );
        lb.policy.external_local = true;
        lb.policy.source_ranges = vec!["203.0.113.9/24".into(), "2001:db8::1/32".into(), "junk".into()];
        lb
    };
    let model = Model {
        frontends: vec![
            frontend(
                "default/web",
                FrontendKind::ClusterIp,
                "10.96.0.10",
                80,
                Protocol::Tcp,
                &["10.0.0.1:8080"],
            ),
            frontend(
                "default/web",
                FrontendKind::ClusterIp,
                "fd00::10",
                80,
                Protocol::Tcp,
                &["[fd00:10::1]:8080"],
            ),
            frontend(
                "default/web",
                FrontendKind::NodePort,
                "0.0.0.0",
                30080,
                Protocol::Tcp,
                &["10.0.0.1:8080"],
            ),
            frontend(
                "default/web",
                FrontendKind::NodePort,
                "::",
                30080,
                Protocol::Tcp,
                &["[fd00:10::1]:8080"],
            ),
            frontend(
                "default/web",
                FrontendKind::ExternalIp,
                "192.0.2.1",
                80,
                Protocol::Tcp,
                &["10.0.0.1:8080"],
            ),
            load_balancer("198.51.100.7"),
            load_balancer("2001:db8:7::7"),
        ],
        warnings: vec![],
    };
    let planned = plan(&model, &PlanOptions::default());
    let key = |addr: &str, port| FrontendKey {
        addr: addr.parse().unwrap(),
        port,
        proto: IPPROTO_TCP,
    };
    assert_eq!(planned.len(), 7, "every frontend is planned: {planned:?}");
    let cluster_ip6 = &planned[&key("fd00::10", 80)];
    assert_eq!(cluster_ip6.name, "default/web:80");
    assert!(cluster_ip6.cluster_ip);
    assert_eq!(cluster_ip6.backends, vec!["[fd00:10::1]:8080".parse().unwrap()]);
    assert_eq!(cluster_ip6.external, None);
    assert_eq!(planned[&key("10.96.0.10", 80)].backends, vec![backend(1)]);
    for any in ["0.0.0.0", "::"] {
        let node_port = &planned[&key(any, 30080)];
        assert_eq!(node_port.name, "default/web:30080 (NodePort)");
        assert_eq!(
            node_port.external,
            Some(External::default()),
            "externalTrafficPolicy Cluster, no source ranges (they are for LoadBalancer IPs only)"
        );
    }
    assert_eq!(planned[&key("192.0.2.1", 80)].external, Some(External::default()));
    assert_eq!(
        planned[&key("198.51.100.7", 80)].external,
        Some(External {
            local: true,
            source_ranges: Some(vec![([203, 0, 113, 0].into(), 24)]),
        }),
        "IPv6 and unparsable ranges admit no IPv4 client"
    );
    assert_eq!(
        planned[&key("2001:db8:7::7", 80)].external,
        Some(External {
            local: true,
            source_ranges: Some(vec![("2001:db8::".parse().unwrap(), 32)]),
        }),
        "IPv4 and unparsable ranges admit no IPv6 client; the range is masked to its prefix"
    );
}

#[test]
fn source_ranges_are_written_before_their_service_and_removed_after_it() {
    let lb = key(7, 80);
    let mut service = DesiredService {
        name: "default/lb:80 (LoadBalancer)".into(),
        backends: vec![backend(1)],
        external: Some(External {
            local: false,
            source_ranges: Some(vec![([192, 0, 2, 0].into(), 24), ([198, 51, 100, 0].into(), 24)]),
        }),
        ..DesiredService::default()
    };
    let mut maps = Recorder::default();
    let mut reconciler = Reconciler::new(Programmed::default());
    apply(
        &mut reconciler,
        &BTreeMap::from([(lb, service.clone())]),
        &mut maps,
    );
    let ops = maps.take_ops();
    let put_service = ops.iter().position(|op| *op == Op::PutService(lb)).unwrap();
    let ranges: Vec<usize> = ops
        .iter()
        .enumerate()
        .filter(|(_, op)| matches!(op, Op::PutSourceRange(_)))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(ranges.len(), 2);
    assert!(ranges.iter().all(|&i| i < put_service), "ranges first: {ops:?}");
    let info = maps.state.services[&lb];
    assert_eq!(
        info.flags & (service_flags::SOURCE_RANGES | service_flags::EXTERNAL_SNAT),
        service_flags::SOURCE_RANGES | service_flags::EXTERNAL_SNAT
    );

    // One range goes: only it is deleted.
    service.external.as_mut().unwrap().source_ranges = Some(vec![([192, 0, 2, 0].into(), 24)]);
    apply(&mut reconciler, &BTreeMap::from([(lb, service)]), &mut maps);
    let gone = SourceRange {
        service_id: info.id,
        addr: [198, 51, 100, 0].into(),
        prefix_len: 24,
    };
    assert_eq!(maps.take_ops(), vec![Op::DeleteSourceRange(gone)]);

    apply(&mut reconciler, &BTreeMap::new(), &mut maps);
    let ops = maps.take_ops();
    assert_eq!(ops[0], Op::DeleteService(lb), "the entry first: {ops:?}");
    assert!(maps.state.source_ranges.is_empty(), "{ops:?}");
}

#[test]
fn plan_of_a_built_model_drives_the_reconciler() {
    let service: k8s_openapi::api::core::v1::Service = serde_yaml_ng::from_str(
        r#"
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
"#,
    )
    .expect("Service YAML should deserialize");
    let pod: k8s_openapi::api::core::v1::Pod = serde_yaml_ng::from_str(
        r#"
metadata: {name: web-1, namespace: shop, labels: {app: web}}
status:
  podIP: 10.0.0.1
  conditions: [{type: Ready, status: "True"}]
"#,
    )
    .expect("Pod YAML should deserialize");
    let planned = plan(&crate::model::build(&[service], &[pod]), &PlanOptions::default());
    let key = key(10, 80);
    assert_eq!(
        planned.get(&key),
        Some(&DesiredService {
            name: "shop/web:80".into(),
            cluster_ip: true,
            backends: vec![backend(1)],
            draining: Vec::new(),
            maglev: Some(lb_common::DEFAULT_MAGLEV_TABLE_SIZE),
            affinity_timeout: None,
            external: None,
        })
    );
    let mut maps = Recorder::default();
    let mut reconciler = Reconciler::new(Programmed::default());
    let report = apply(&mut reconciler, &planned, &mut maps);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(service_info(&maps.state, key).backend_count, 1);
}

#[test]
fn a_new_service_that_fails_part_way_leaves_no_backend_behind() {
    let mut reconciler = Reconciler::new(Programmed::default());
    let mut maps = Recorder::with_backend_capacity(4);
    let services = desired(&[
        (key(1, 80), "default/fits:80", vec![backend(1), backend(2)]),
        (
            key(2, 80),
            "default/too-big:80",
            vec![backend(3), backend(4), backend(5)],
        ),
    ]);
    let report = apply(&mut reconciler, &services, &mut maps);
    assert_eq!(report.failed.len(), 1, "too-big does not fit");
    assert_eq!(
        maps.state.backends.len(),
        2,
        "the backends too-big wrote before failing were removed: {:?}",
        maps.state.backends
    );

    maps.backend_capacity = None;
    apply(&mut reconciler, &services, &mut maps);
    apply(&mut reconciler, &BTreeMap::new(), &mut maps);
    assert!(
        maps.state.backends.is_empty() && maps.state.slots.is_empty(),
        "nothing leaks: {:?}",
        maps.state
    );
}

#[test]
fn orphans_left_in_the_pinned_maps_are_removed_on_the_first_apply() {
    let mut maps = Recorder::default();
    let orphan = BackendEntry {
        addr: backend(1),
        proto: IPPROTO_TCP,
        flags: 0,
        service_id: 42,
    };
    maps.state.backends.insert(7, orphan);
    maps.state.slots.insert(
        SlotKey {
            service_id: 42,
            slot: 0,
        },
        7,
    );
    let mut reconciler = Reconciler::new(maps.state.clone());
    apply(&mut reconciler, &BTreeMap::new(), &mut maps);
    assert!(maps.state.backends.is_empty() && maps.state.slots.is_empty());
}

#[test]
fn a_slot_whose_delete_failed_is_still_known_and_deleted_later() {
    let mut reconciler = Reconciler::new(Programmed::default());
    let mut maps = Recorder::default();
    apply(
        &mut reconciler,
        &desired(&[(key(1, 80), "default/web:80", vec![backend(1), backend(2)])]),
        &mut maps,
    );
    maps.refuse_slot_deletes = true;
    let shrunk = desired(&[(key(1, 80), "default/web:80", vec![backend(1)])]);
    let report = apply(&mut reconciler, &shrunk, &mut maps);
    assert_eq!(report.failed.len(), 1, "the refused delete is reported");
    maps.refuse_slot_deletes = false;
    apply(&mut reconciler, &shrunk, &mut maps);
    assert_eq!(
        maps.state.slots.len(),
        1,
        "the stale slot was deleted on the next pass: {:?}",
        maps.state.slots
    );
}

fn with_maglev(
    mut services: BTreeMap<FrontendKey, DesiredService>,
    size: u32,
) -> BTreeMap<FrontendKey, DesiredService> {
    for service in services.values_mut() {
        service.maglev = Some(size);
    }
    services
}

#[test]
fn a_maglev_table_is_written_after_the_backends_and_before_the_entry_that_uses_it() {
    let mut reconciler = Reconciler::new(Programmed::default());
    let mut maps = Recorder::default();
    let services = with_maglev(
        desired(&[(
            key(1, 80),
            "default/web:80",
            vec![backend(1), backend(2), backend(3)],
        )]),
        251,
    );
    apply(&mut reconciler, &services, &mut maps);
    let ops = maps.take_ops();
    let info = service_info(&maps.state, key(1, 80));
    assert_eq!((info.flags, info.maglev_table_size), (service_flags::MAGLEV, 251));
    let table = position(&ops, Op::PutMaglev(info.id));
    assert!(
        ops[..table]
            .iter()
            .filter(|op| matches!(op, Op::PutSlot(_)))
            .count()
            == 3,
        "slots first: {ops:?}"
    );
    assert!(
        table < position(&ops, Op::PutService(key(1, 80))),
        "table before the entry: {ops:?}"
    );
    let written = &maps.tables[&info.id];
    assert_eq!(written.len(), 251);
    for id in backend_ids(&maps.state, key(1, 80)).values() {
        assert!(written.contains(id), "every backend owns positions");
    }

    assert_eq!(
        apply(&mut reconciler, &services, &mut maps).writes,
        0,
        "an unchanged table is not rewritten"
    );
    let restarted = &mut Reconciler::new(reconciler.programmed().clone());
    assert_eq!(
        apply(restarted, &services, &mut maps).writes,
        0,
        "nor after a restart"
    );
}

#[test]
fn a_backend_change_swaps_in_one_new_table_that_keeps_most_positions() {
    let mut reconciler = Reconciler::new(Programmed::default());
    let mut maps = Recorder::default();
    let before: Vec<SocketAddr> = (1..=10).map(backend).collect();
    apply(
        &mut reconciler,
        &with_maglev(desired(&[(key(1, 80), "default/web:80", before.clone())]), 4093),
        &mut maps,
    );
    let id = service_info(&maps.state, key(1, 80)).id;
    let old_table = maps.tables[&id].clone();
    let removed = backend_ids(&maps.state, key(1, 80))[&backend(5)];
    maps.take_ops();

    let after: Vec<SocketAddr> = before.into_iter().filter(|b| *b != backend(5)).collect();
    apply(
        &mut reconciler,
        &with_maglev(desired(&[(key(1, 80), "default/web:80", after)]), 4093),
        &mut maps,
    );
    let ops = maps.take_ops();
    assert_eq!(
        ops.iter().filter(|op| matches!(op, Op::PutMaglev(_))).count(),
        1,
        "{ops:?}"
    );
    assert!(
        position(&ops, Op::PutMaglev(id)) < position(&ops, Op::DeleteBackend(removed)),
        "no table names a deleted backend: {ops:?}"
    );
    let new_table = &maps.tables[&id];
    let moved = old_table
        .iter()
        .zip(new_table)
        .filter(|(old, new)| **old != removed && old != new)
        .count();
    assert!(
        moved as f64 / 4093.0 <= 0.11,
        "flows of surviving backends mostly stay: {moved} positions moved"
    );
}

#[test]
fn switching_algorithms_orders_the_entry_and_the_table_safely() {
    let mut reconciler = Reconciler::new(Programmed::default());
    let mut maps = Recorder::default();
    let random = desired(&[(key(1, 80), "default/web:80", vec![backend(1), backend(2)])]);
    let maglev = with_maglev(random.clone(), 251);
    apply(&mut reconciler, &random, &mut maps);
    let id = service_info(&maps.state, key(1, 80)).id;
    maps.take_ops();

    apply(&mut reconciler, &maglev, &mut maps);
    let ops = maps.take_ops();
    assert!(
        position(&ops, Op::PutMaglev(id)) < position(&ops, Op::PutService(key(1, 80))),
        "table first: {ops:?}"
    );

    apply(&mut reconciler, &random, &mut maps);
    let ops = maps.take_ops();
    assert!(
        position(&ops, Op::PutService(key(1, 80))) < position(&ops, Op::DeleteMaglev(id)),
        "entry first: {ops:?}"
    );
    assert_eq!(service_info(&maps.state, key(1, 80)).flags, 0);

    apply(&mut reconciler, &maglev, &mut maps);
    apply(&mut reconciler, &BTreeMap::new(), &mut maps);
    let ops = maps.take_ops();
    assert!(
        position(&ops, Op::DeleteService(key(1, 80))) < position(&ops, Op::DeleteMaglev(id)),
        "{ops:?}"
    );
    assert!(maps.tables.is_empty());
}

#[test]
fn session_affinity_is_a_flag_and_a_timeout_on_the_service_entry() {
    let mut reconciler = Reconciler::new(Programmed::default());
    let mut maps = Recorder::default();
    let mut services = desired(&[(key(1, 80), "default/web:80", vec![backend(1)])]);
    services.get_mut(&key(1, 80)).unwrap().affinity_timeout = Some(60);
    apply(&mut reconciler, &services, &mut maps);
    let info = service_info(&maps.state, key(1, 80));
    assert_eq!(
        (info.flags & service_flags::AFFINITY, info.affinity_timeout_s),
        (service_flags::AFFINITY, 60)
    );

    services.get_mut(&key(1, 80)).unwrap().affinity_timeout = None;
    let report = apply(&mut reconciler, &services, &mut maps);
    assert_eq!(
        report.writes, 1,
        "switching affinity off rewrites the entry alone"
    );
    assert_eq!(
        service_info(&maps.state, key(1, 80)).flags & service_flags::AFFINITY,
        0
    );
}

#[test]
fn a_restarted_reconciler_rewrites_nothing_of_external_frontends() {
    let mut desired = BTreeMap::new();
    desired.insert(
        FrontendKey {
            addr: [0; 4].into(),
            ..key(0, 30080)
        },
        DesiredService {
            name: "default/web:30080 (NodePort)".into(),
            backends: vec![backend(1), backend(2)],
            maglev: Some(31),
            external: Some(External::default()),
            ..DesiredService::default()
        },
    );
    desired.insert(
        key(7, 80),
        DesiredService {
            name: "default/web:80 (LoadBalancer)".into(),
            backends: vec![backend(1)],
            external: Some(External {
                local: true,
                source_ranges: Some(vec![([192, 0, 2, 0].into(), 24)]),
            }),
            ..DesiredService::default()
        },
    );
    let mut maps = Recorder::default();
    apply(&mut Reconciler::new(Programmed::default()), &desired, &mut maps);
    maps.take_ops();
    let mut restarted = Reconciler::new(maps.state.clone());
    let report = apply(&mut restarted, &desired, &mut maps);
    assert_eq!((report.writes, report.deletes), (0, 0), "{:?}", maps.take_ops());
}

#[test]
fn an_sctp_frontend_is_planned_under_its_protocol_number() {
    let model = Model {
        frontends: vec![frontend(
            "default/sig",
            FrontendKind::ClusterIp,
            "fd00::20",
            3868,
            Protocol::Sctp,
            &["[fd00:10::1]:3868"],
        )],
        warnings: vec![],
    };
    let planned = plan(&model, &PlanOptions::default());
    let key = FrontendKey {
        addr: "fd00::20".parse().unwrap(),
        port: 3868,
        proto: lb_common::IPPROTO_SCTP,
    };
    assert_eq!(planned.keys().collect::<Vec<_>>(), [&key]);
    assert_eq!(key.to_string(), "[fd00::20]:3868/SCTP");
}

// --- IPv6 and dual-stack --------------------------------------------------------------------

fn key6(last: u16, port: u16) -> FrontendKey {
    FrontendKey {
        addr: Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, last).into(),
        port,
        proto: IPPROTO_TCP,
    }
}

fn backend6(last: u16) -> SocketAddr {
    (Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, last), 8080).into()
}

/// The same write order as IPv4: ClusterIP, backends, slots, entry on add; entry, slots,
/// backends, ClusterIP on removal.
#[test]
fn an_ipv6_service_is_written_and_removed_in_the_same_order() {
    let web = key6(0x10, 80);
    let mut maps = Recorder::default();
    let mut reconciler = Reconciler::new(Programmed::default());
    let want = desired(&[(web, "default/web:80", vec![backend6(1), backend6(2)])]);
    let report = apply(&mut reconciler, &want, &mut maps);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let ops = maps.take_ops();
    let info = service_info(&maps.state, web);
    let ids = backend_ids(&maps.state, web);
    assert_eq!(
        ids.keys().copied().collect::<Vec<_>>(),
        [backend6(1), backend6(2)]
    );
    let marked = position(&ops, Op::PutClusterIp(web.addr));
    let last_backend = ids
        .values()
        .map(|id| position(&ops, Op::PutBackend(*id)))
        .max()
        .unwrap();
    let slots: Vec<usize> = (0..2)
        .map(|slot| {
            position(
                &ops,
                Op::PutSlot(SlotKey {
                    service_id: info.id,
                    slot,
                }),
            )
        })
        .collect();
    let entry = position(&ops, Op::PutService(web));
    assert!(
        marked < last_backend && last_backend < slots[0] && slots[1] < entry,
        "ClusterIP, backends, slots, entry: {ops:?}"
    );
    assert_eq!(maps.state.cluster_ips, [(web.addr, 1)].into());

    apply(&mut reconciler, &BTreeMap::new(), &mut maps);
    let ops = maps.take_ops();
    assert_eq!(ops[0], Op::DeleteService(web), "the entry goes first: {ops:?}");
    let last_slot = (0..2)
        .map(|slot| {
            position(
                &ops,
                Op::DeleteSlot(SlotKey {
                    service_id: info.id,
                    slot,
                }),
            )
        })
        .max()
        .unwrap();
    let first_backend = ids
        .values()
        .map(|id| position(&ops, Op::DeleteBackend(*id)))
        .min()
        .unwrap();
    assert!(last_slot < first_backend, "slots before backends: {ops:?}");
    assert_eq!(
        ops.last(),
        Some(&Op::DeleteClusterIp(web.addr)),
        "its ClusterIP last"
    );
    assert_eq!(
        maps.state,
        Programmed {
            next_ids: maps.state.next_ids,
            ..Programmed::default()
        },
        "nothing is left"
    );
}

/// A dual-stack Service's frontends share one space of service ids and one of backend ids:
/// no two entries of either family get the same id, a restarted reconciler keeps them all and
/// writes nothing, and a new frontend after the restart takes no id in use by either family.
#[test]
fn both_families_share_one_id_space_that_survives_a_restart() {
    let (web4, web6, api6) = (key(10, 80), key6(0x10, 80), key6(0x11, 80));
    let want = desired(&[
        (web4, "default/web:80", vec![backend(1), backend(2)]),
        (web6, "default/web:80", vec![backend6(1), backend6(2)]),
    ]);
    let mut maps = Recorder::default();
    apply(&mut Reconciler::new(Programmed::default()), &want, &mut maps);
    let found = maps.state.clone();
    let (info4, info6) = (service_info(&found, web4), service_info(&found, web6));
    assert_ne!(
        info4.id, info6.id,
        "one service id per frontend, whatever its family"
    );
    let (ids4, ids6) = (backend_ids(&found, web4), backend_ids(&found, web6));
    assert!(
        ids4.values().all(|id| !ids6.values().any(|other| other == id)),
        "backend ids are unique across families: {ids4:?} {ids6:?}"
    );
    assert_eq!(
        found.cluster_ips.len(),
        2,
        "one ClusterIP per family: {:?}",
        found.cluster_ips
    );

    let mut restarted = Reconciler::new(found.clone());
    let report = apply(&mut restarted, &want, &mut maps);
    assert_eq!((report.writes, report.deletes), (0, 0), "{:?}", maps.take_ops());
    let grown = desired(&[
        (web4, "default/web:80", vec![backend(1), backend(2), backend(3)]),
        (web6, "default/web:80", vec![backend6(1), backend6(2)]),
        (api6, "default/api:80", vec![backend6(3)]),
    ]);
    apply(&mut restarted, &grown, &mut maps);
    let api = service_info(restarted.programmed(), api6);
    assert!(
        ![info4.id, info6.id].contains(&api.id),
        "a new service id is free in both families"
    );
    let new_ids = [
        backend_ids(restarted.programmed(), api6)[&backend6(3)],
        backend_ids(restarted.programmed(), web4)[&backend(3)],
    ];
    for id in new_ids {
        assert!(
            !found.backends.contains_key(&id),
            "backend id {id} was in use by one of the families"
        );
    }
    assert_eq!(
        backend_ids(restarted.programmed(), web6),
        ids6,
        "IPv6 ids are kept"
    );
    assert_eq!(
        backend_ids(restarted.programmed(), web4)[&backend(1)],
        ids4[&backend(1)]
    );
}

/// Removing a dual-stack Service's IPv6 frontend (the Service made single-stack) touches
/// nothing of its IPv4 one.
#[test]
fn removing_the_ipv6_frontend_leaves_the_ipv4_one_alone() {
    let (web4, web6) = (key(10, 80), key6(0x10, 80));
    let mut want = desired(&[
        (web4, "default/web:80", vec![backend(1)]),
        (web6, "default/web:80", vec![backend6(1)]),
    ]);
    let mut maps = Recorder::default();
    let mut reconciler = Reconciler::new(Programmed::default());
    apply(&mut reconciler, &want, &mut maps);
    let before4 = (service_info(&maps.state, web4), backend_ids(&maps.state, web4));
    let id6 = backend_ids(&maps.state, web6)[&backend6(1)];
    let info6 = service_info(&maps.state, web6);
    maps.take_ops();

    want.remove(&web6);
    apply(&mut reconciler, &want, &mut maps);
    assert_eq!(
        maps.take_ops(),
        vec![
            Op::DeleteService(web6),
            Op::DeleteSlot(SlotKey {
                service_id: info6.id,
                slot: 0
            }),
            Op::DeleteBackend(id6),
            Op::DeleteClusterIp(web6.addr),
        ]
    );
    assert_eq!(
        (service_info(&maps.state, web4), backend_ids(&maps.state, web4)),
        before4
    );
}

/// A terminating IPv6 endpoint drains as an IPv4 one does: same id, flagged, in no slot.
#[test]
fn an_ipv6_backend_drains_under_its_id() {
    let web = key6(0x10, 80);
    let mut want = desired(&[(web, "default/web:80", vec![backend6(1), backend6(2)])]);
    let mut maps = Recorder::default();
    let mut reconciler = Reconciler::new(Programmed::default());
    apply(&mut reconciler, &want, &mut maps);
    let id = backend_ids(&maps.state, web)[&backend6(2)];
    let service = want.get_mut(&web).unwrap();
    service.backends = vec![backend6(1)];
    service.draining = vec![backend6(2)];
    apply(&mut reconciler, &want, &mut maps);
    let drained = maps.state.backends[&id];
    assert_eq!(
        (drained.addr, drained.flags),
        (backend6(2), backend_flags::DRAINING)
    );
    assert!(!maps.state.slots.values().any(|slot| *slot == id), "in no slot");
    assert_eq!(service_info(&maps.state, web).backend_count, 1);
}

/// A backend or source range of the other family could not be reached through the frontend's
/// maps: the frontend is refused with a clear error and nothing of it is written.
#[test]
fn a_backend_of_the_other_family_is_refused_before_anything_is_written() {
    let web = key6(0x10, 80);
    let mut maps = Recorder::default();
    let mut reconciler = Reconciler::new(Programmed::default());
    let want = desired(&[
        (web, "default/web:80", vec![backend6(1), backend(1)]),
        (key(10, 80), "default/web:80", vec![backend(1)]),
    ]);
    let report = apply(&mut reconciler, &want, &mut maps);
    assert_eq!(report.failed.len(), 1, "{:?}", report.failed);
    let (name, error) = &report.failed[0];
    assert_eq!(name, "default/web:80");
    assert_eq!(error.map, map_names::BACKENDS6);
    assert_eq!(
        error.message,
        "10.0.0.1 is not of the address family of the frontend [fd00:96::10]:80/TCP"
    );
    assert!(!maps.state.services.contains_key(&web), "{:?}", maps.state);
    assert_eq!(maps.state.backends.len(), 1, "the IPv4 frontend's backend alone");

    let lb = DesiredService {
        backends: vec![backend6(1)],
        external: Some(External {
            local: false,
            source_ranges: Some(vec![([192, 0, 2, 0].into(), 24)]),
        }),
        ..DesiredService::default()
    };
    let report = apply(&mut reconciler, &BTreeMap::from([(web, lb)]), &mut maps);
    assert_eq!(report.failed.len(), 1, "{:?}", report.failed);
    assert!(maps.state.source_ranges.is_empty());
}

/// Maglev tables of IPv4 backends are the ones earlier builds made (the identity stays the
/// address's 4 bytes and the port): positions pinned before IPv6 was added. An IPv6 service's
/// table is built alike from its 16-byte addresses.
#[test]
fn ipv4_maglev_tables_are_unchanged_and_ipv6_ones_are_built_alike() {
    let mut reconciler = Reconciler::new(Programmed::default());
    let mut maps = Recorder::default();
    let services = with_maglev(
        desired(&[
            (
                key(1, 80),
                "default/web:80",
                vec![backend(1), backend(2), backend(3)],
            ),
            (
                key6(1, 80),
                "default/web:80",
                vec![backend6(1), backend6(2), backend6(3)],
            ),
        ]),
        lb_common::DEFAULT_MAGLEV_TABLE_SIZE,
    );
    apply(&mut reconciler, &services, &mut maps);
    let owners = |key: FrontendKey| -> Vec<SocketAddr> {
        let table = &maps.tables[&service_info(&maps.state, key).id];
        table.iter().map(|id| maps.state.backends[id].addr).collect()
    };
    let pinned = [
        1, 2, 2, 3, 1, 1, 3, 2, 3, 2, 2, 1, 1, 1, 3, 1, 2, 2, 2, 1, 3, 3, 3, 1,
    ]
    .map(backend);
    assert_eq!(owners(key(1, 80))[..pinned.len()], pinned);
    let table6 = owners(key6(1, 80));
    for backend in [backend6(1), backend6(2), backend6(3)] {
        let share = table6.iter().filter(|owner| **owner == backend).count();
        let fair = lb_common::DEFAULT_MAGLEV_TABLE_SIZE as usize / 3;
        assert!(
            share.abs_diff(fair) * 100 <= fair * 3,
            "{backend} owns {share} of the positions, about a third"
        );
    }
}

#[test]
fn sync_changed_touches_only_the_services_it_is_given_and_removes_an_empty_one() {
    let options = PlanOptions {
        default_algorithm: crate::model::LbAlgorithm::Random,
        ..PlanOptions::default()
    };
    let web = frontend(
        "shop/web",
        FrontendKind::ClusterIp,
        "10.96.0.10",
        80,
        Protocol::Tcp,
        &["10.0.0.1:80"],
    );
    let db = frontend(
        "shop/db",
        FrontendKind::ClusterIp,
        "10.96.0.11",
        80,
        Protocol::Tcp,
        &["10.0.0.2:80"],
    );
    let all: ServiceFrontends = [
        (web.service.clone(), vec![web.clone()]),
        (db.service.clone(), vec![db.clone()]),
    ]
    .into();
    let mut maps = Recorder::default();
    let mut reconciler = Reconciler::new(Programmed::default());
    let report = reconciler.sync_all(&all, &options, &mut maps);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(maps.state.services.len(), 2);
    maps.take_ops();

    let web2 = frontend(
        "shop/web",
        FrontendKind::ClusterIp,
        "10.96.0.10",
        80,
        Protocol::Tcp,
        &["10.0.0.3:80"],
    );
    let changed: ServiceFrontends = [(web.service.clone(), vec![web2])].into();
    reconciler.sync_changed(&changed, &options, &mut maps);
    let ops = maps.take_ops();
    assert!(
        ops.iter().all(|op| *op != Op::PutService(key(11, 80))),
        "db was not given, so it is not rewritten: {ops:?}"
    );
    assert_eq!(
        service_info(&maps.state, key(11, 80)).backend_count,
        1,
        "db stays"
    );
    assert!(backend_ids(&maps.state, key(10, 80)).contains_key(&"10.0.0.3:80".parse().unwrap()));

    let removed: ServiceFrontends = [(db.service.clone(), Vec::new())].into();
    reconciler.sync_changed(&removed, &options, &mut maps);
    assert!(maps.state.services.contains_key(&key(10, 80)), "web stays");
    assert!(!maps.state.services.contains_key(&key(11, 80)), "db is removed");
}
