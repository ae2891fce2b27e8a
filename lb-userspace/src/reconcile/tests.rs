//! The reconciler against a recording [`MapWriter`], and [`plan`] on hand-built models.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use lb_common::{BackendSet, IPPROTO_TCP, IPPROTO_UDP, ServiceInfo, backend_flags, map_names, service_flags};

use super::*;
use crate::model::{Endpoint, Endpoints, Frontend, FrontendKind, Model, Policy, Protocol, ServiceName};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    PutBackend(BackendId),
    DeleteBackend(BackendId),
    PutService(FrontendKey),
    DeleteService(FrontendKey),
    /// A table written at this position.
    PutTable(u32),
    GrowTables(u32),
    PutSourceRange(SourceRange),
    DeleteSourceRange(SourceRange),
    PutClusterIp(IpAddr),
    DeleteClusterIp(IpAddr),
}

/// Maps in memory, recording every write in order. Deleting an absent key fails as it does on a
/// BPF hash map (ENOENT); a capacity makes a map refuse new keys when full (E2BIG).
#[derive(Debug, Default)]
struct Recorder {
    services: BTreeMap<FrontendKey, ServiceInfo>,
    backends: BTreeMap<BackendId, BackendEntry>,
    space: Vec<BackendId>,
    ranges: BTreeSet<SourceRange>,
    cluster_ips: BTreeMap<IpAddr, u32>,
    next_ids: NextIds,
    ops: Vec<Op>,
    /// Batch calls made.
    calls: usize,
    backend_capacity: Option<usize>,
    service_capacity: Option<usize>,
}

impl Recorder {
    fn take_ops(&mut self) -> Vec<Op> {
        std::mem::take(&mut self.ops)
    }

    /// What a restarted agent reads back.
    fn programmed(&self) -> Programmed {
        let tables = self
            .services
            .values()
            .flat_map(|info| [info.backends, info.outside])
            .filter(|set| set.count > 0)
            .map(|set| {
                let start = set.table as usize;
                (set.table, self.space[start..start + set.count as usize].to_vec())
            })
            .collect();
        Programmed {
            services: self.services.clone(),
            backends: self.backends.iter().map(|(id, b)| (*id, *b)).collect(),
            tables,
            table_capacity: self.space.len() as u32,
            source_ranges: self.ranges.clone(),
            cluster_ips: self.cluster_ips.clone(),
            next_ids: self.next_ids,
        }
    }

    /// The table `set` points at: its backends' ids, then its Maglev table.
    fn table(&self, set: &BackendSet) -> &[BackendId] {
        let start = set.table as usize;
        &self.space[start..start + (set.count + set.maglev_size) as usize]
    }

    /// The addresses a frontend's set balances over, in slot order.
    fn live(&self, set: &BackendSet) -> Vec<SocketAddr> {
        self.table(set)[..set.count as usize]
            .iter()
            .map(|id| self.backends[id].addr)
            .collect()
    }
}

fn full(map: &'static str) -> MapError {
    MapError {
        map,
        message: "the map is full".into(),
    }
}

fn missing(map: &'static str) -> MapError {
    MapError {
        map,
        message: "no such key (ENOENT)".into(),
    }
}

impl MapWriter for Recorder {
    fn put_backends(&mut self, entries: &[(BackendId, BackendEntry)]) -> Result<(), BatchError> {
        self.calls += 1;
        for (index, (id, backend)) in entries.iter().enumerate() {
            let full_now = self
                .backend_capacity
                .is_some_and(|cap| self.backends.len() >= cap && !self.backends.contains_key(id));
            if full_now {
                return Err(BatchError {
                    index,
                    error: full(map_names::BACKENDS),
                });
            }
            self.backends.insert(*id, *backend);
            self.ops.push(Op::PutBackend(*id));
        }
        Ok(())
    }

    fn delete_backends(&mut self, entries: &[(BackendId, BackendEntry)]) -> Result<(), BatchError> {
        self.calls += 1;
        for (index, (id, _)) in entries.iter().enumerate() {
            if self.backends.remove(id).is_none() {
                return Err(BatchError {
                    index,
                    error: missing(map_names::BACKENDS),
                });
            }
            self.ops.push(Op::DeleteBackend(*id));
        }
        Ok(())
    }

    fn put_services(&mut self, entries: &[(FrontendKey, ServiceInfo)]) -> Result<(), BatchError> {
        self.calls += 1;
        for (index, (key, info)) in entries.iter().enumerate() {
            let full_now = self
                .service_capacity
                .is_some_and(|cap| self.services.len() >= cap && !self.services.contains_key(key));
            if full_now {
                return Err(BatchError {
                    index,
                    error: full(map_names::SERVICES),
                });
            }
            self.services.insert(*key, *info);
            self.ops.push(Op::PutService(*key));
        }
        Ok(())
    }

    fn delete_services(&mut self, keys: &[FrontendKey]) -> Result<(), BatchError> {
        self.calls += 1;
        for (index, key) in keys.iter().enumerate() {
            if self.services.remove(key).is_none() {
                return Err(BatchError {
                    index,
                    error: missing(map_names::SERVICES),
                });
            }
            self.ops.push(Op::DeleteService(*key));
        }
        Ok(())
    }

    fn put_tables(
        &mut self,
        blocks: &[(u32, u32)],
        fill: &(dyn Fn(usize, &mut [BackendId]) + Sync),
    ) -> Result<(), MapError> {
        for (index, &(start, len)) in blocks.iter().enumerate() {
            let (start, len) = (start as usize, len as usize);
            assert!(start + len <= self.space.len(), "the space holds it");
            fill(index, &mut self.space[start..start + len]);
            self.ops.push(Op::PutTable(start as u32));
        }
        Ok(())
    }

    fn grow_tables(&mut self, positions: u32) -> Result<(), MapError> {
        self.space.resize(positions as usize, 0);
        self.ops.push(Op::GrowTables(positions));
        Ok(())
    }

    fn put_cluster_ips(&mut self, entries: &[(IpAddr, u32)]) -> Result<(), BatchError> {
        self.calls += 1;
        for &(addr, frontends) in entries {
            self.cluster_ips.insert(addr, frontends);
            self.ops.push(Op::PutClusterIp(addr));
        }
        Ok(())
    }

    fn delete_cluster_ips(&mut self, addrs: &[IpAddr]) -> Result<(), BatchError> {
        self.calls += 1;
        for (index, addr) in addrs.iter().enumerate() {
            if self.cluster_ips.remove(addr).is_none() {
                return Err(BatchError {
                    index,
                    error: missing(map_names::CLUSTER_IPS),
                });
            }
            self.ops.push(Op::DeleteClusterIp(*addr));
        }
        Ok(())
    }

    fn put_source_range(&mut self, range: SourceRange) -> Result<(), MapError> {
        self.ranges.insert(range);
        self.ops.push(Op::PutSourceRange(range));
        Ok(())
    }

    fn delete_source_range(&mut self, range: SourceRange) -> Result<(), MapError> {
        if !self.ranges.remove(&range) {
            return Err(missing(map_names::SOURCE_RANGES));
        }
        self.ops.push(Op::DeleteSourceRange(range));
        Ok(())
    }

    fn put_next_id(&mut self, kind: IdKind, next: u32) -> Result<(), MapError> {
        match kind {
            IdKind::Service => self.next_ids.service = next,
            IdKind::Backend => self.next_ids.backend = next,
        }
        Ok(())
    }
}

fn key(last_octet: u8, port: u16) -> FrontendKey {
    FrontendKey {
        addr: [10, 96, 0, last_octet].into(),
        port,
        proto: IPPROTO_TCP,
    }
}

fn node_port(port: u16) -> FrontendKey {
    FrontendKey {
        addr: [0, 0, 0, 0].into(),
        port,
        proto: IPPROTO_TCP,
    }
}

fn backend(last_octet: u8) -> SocketAddr {
    ([10, 0, 0, last_octet], 8080).into()
}

fn backends(last_octets: &[u8]) -> Vec<SocketAddr> {
    last_octets.iter().map(|&o| backend(o)).collect()
}

/// A ClusterIP frontend of `name`, random choice.
fn cluster_ip(name: &str, last_octets: &[u8]) -> DesiredService {
    DesiredService {
        name: name.into(),
        cluster_ip: true,
        backends: backends(last_octets),
        ..DesiredService::default()
    }
}

/// An external frontend of `name` (a NodePort or LoadBalancer IP).
fn external(name: &str, last_octets: &[u8]) -> DesiredService {
    DesiredService {
        name: name.into(),
        backends: backends(last_octets),
        external: Some(External::default()),
        ..DesiredService::default()
    }
}

fn position(ops: &[Op], op: Op) -> usize {
    ops.iter()
        .position(|o| *o == op)
        .unwrap_or_else(|| panic!("{op:?} not in {ops:?}"))
}

fn ok(report: &Report) {
    assert!(report.failed.is_empty(), "{:?}", report.failed);
}

#[test]
fn a_service_is_written_backends_then_table_then_entry_and_removed_the_other_way() {
    let web = key(10, 80);
    let mut maps = Recorder::default();
    let mut reconciler = Reconciler::new(Programmed::default());
    let report = reconciler.apply(
        &Desired::from([(web, cluster_ip("default/web", &[1, 2]))]),
        &mut maps,
    );
    ok(&report);
    let ops = maps.take_ops();
    let info = maps.services[&web];
    assert_ne!(info.id, 0);
    assert_ne!(info.backends.id, 0, "a backend set");
    assert_eq!(info.backends, info.outside, "one set for every client");
    assert_eq!(info.backends.count, 2);
    assert_eq!(maps.live(&info.backends), backends(&[1, 2]), "slot order");
    let table = position(&ops, Op::PutTable(info.backends.table));
    for id in &maps.table(&info.backends)[..2] {
        assert!(position(&ops, Op::PutBackend(*id)) < table, "{ops:?}");
        assert_eq!(maps.backends[id].set_id, info.backends.id);
    }
    assert!(table < position(&ops, Op::PutService(web)), "{ops:?}");
    assert!(position(&ops, Op::PutClusterIp(web.addr)) < position(&ops, Op::PutService(web)));
    assert_eq!(report.writes, ops.len(), "{ops:?}");

    let report = reconciler.apply(&Desired::new(), &mut maps);
    ok(&report);
    let ops = maps.take_ops();
    assert_eq!(ops[0], Op::DeleteService(web), "the entry first: {ops:?}");
    assert_eq!(
        ops.last(),
        Some(&Op::DeleteClusterIp(web.addr)),
        "its ClusterIP last"
    );
    assert!(maps.backends.is_empty() && maps.services.is_empty(), "{ops:?}");
}

#[test]
fn frontends_of_a_service_with_the_same_backends_share_one_set_and_one_table() {
    let (web, web_np, web_lb) = (key(10, 80), node_port(30080), key(200, 80));
    let mut maps = Recorder::default();
    let mut reconciler = Reconciler::new(Programmed::default());
    let maglev = Some(MaglevSize::Scaled);
    let desired = Desired::from([
        (
            web,
            DesiredService {
                maglev,
                ..cluster_ip("default/web", &[1, 2, 3])
            },
        ),
        (
            web_np,
            DesiredService {
                maglev,
                ..external("default/web", &[1, 2, 3])
            },
        ),
        (
            web_lb,
            DesiredService {
                maglev,
                ..external("default/web", &[1, 2, 3])
            },
        ),
    ]);
    ok(&reconciler.apply(&desired, &mut maps));
    let ops = maps.take_ops();
    let sets: BTreeSet<BackendSet> = maps.services.values().map(|info| info.backends).collect();
    assert_eq!(sets.len(), 1, "one set: {:?}", maps.services);
    assert_eq!(maps.backends.len(), 3, "one entry per endpoint");
    let tables = ops.iter().filter(|op| matches!(op, Op::PutTable(_))).count();
    assert_eq!(tables, 1, "one table: {ops:?}");
    let set = *sets.first().unwrap();
    assert_eq!(
        set.maglev_size, 1021,
        "scaled: 100 positions per backend at least"
    );
    assert_eq!(maps.table(&set).len(), 3 + 1021);
    let flags: Vec<u32> = [web, web_np, web_lb]
        .iter()
        .map(|k| maps.services[k].flags)
        .collect();
    assert_eq!(
        flags,
        [0, service_flags::EXTERNAL_SNAT, service_flags::EXTERNAL_SNAT]
    );
    let ids: BTreeSet<u32> = maps.services.values().map(|info| info.id).collect();
    assert_eq!(
        ids.len(),
        3,
        "each frontend has an id of its own (counters, conntrack)"
    );
}

#[test]
fn an_external_frontend_with_policy_local_has_local_backends_for_outside_clients_only() {
    let (web, web_np) = (key(10, 80), node_port(30080));
    let local = DesiredService {
        external: Some(External {
            local: true,
            in_cluster: Some(BackendAddrs {
                backends: backends(&[1, 2, 3]),
                draining: Vec::new(),
            }),
            ..External::default()
        }),
        ..external("default/web", &[2])
    };
    let desired = Desired::from([(web, cluster_ip("default/web", &[1, 2, 3])), (web_np, local)]);
    let mut maps = Recorder::default();
    let mut reconciler = Reconciler::new(Programmed::default());
    ok(&reconciler.apply(&desired, &mut maps));
    let (cluster, np) = (maps.services[&web], maps.services[&web_np]);
    assert_eq!(
        np.backends, cluster.backends,
        "pods and the node: the ClusterIP's set"
    );
    assert_ne!(np.outside, np.backends);
    assert_eq!(
        maps.live(&np.outside),
        backends(&[2]),
        "outside clients: this node's"
    );
    assert_eq!(np.flags, service_flags::EXTERNAL_LOCAL);
    assert_eq!(
        maps.backends.len(),
        4,
        "three in the cluster set, one in the local one"
    );
}

#[test]
fn applying_the_same_state_twice_writes_nothing_the_second_time() {
    let desired = Desired::from([
        (key(10, 80), cluster_ip("default/web", &[1, 2])),
        (key(11, 53), cluster_ip("default/dns", &[3])),
    ]);
    let mut maps = Recorder::default();
    let mut reconciler = Reconciler::new(Programmed::default());
    ok(&reconciler.apply(&desired, &mut maps));
    maps.take_ops();
    maps.calls = 0;
    let report = reconciler.apply(&desired, &mut maps);
    assert_eq!((report.writes, report.deletes), (0, 0));
    assert_eq!(maps.take_ops(), []);
    assert_eq!(maps.calls, 0, "not even an empty batch");
}

#[test]
fn removing_a_backend_points_the_frontends_at_a_new_table_before_deleting_it() {
    let (web, web_np) = (key(10, 80), node_port(30080));
    let desired = |last: &[u8]| {
        Desired::from([
            (web, cluster_ip("default/web", last)),
            (web_np, external("default/web", last)),
        ])
    };
    let mut maps = Recorder::default();
    let mut reconciler = Reconciler::new(Programmed::default());
    ok(&reconciler.apply(&desired(&[1, 2, 3]), &mut maps));
    let before = maps.services[&web].backends;
    let ids: Vec<BackendId> = maps.table(&before)[..3].to_vec();
    maps.take_ops();

    ok(&reconciler.apply(&desired(&[1, 3]), &mut maps));
    let ops = maps.take_ops();
    let after = maps.services[&web].backends;
    assert_eq!(after.id, before.id, "the same set");
    assert_ne!(after.table, before.table, "a new table, at other positions");
    assert_eq!(
        maps.table(&after)[..2],
        [ids[0], ids[2]],
        "the others keep their ids"
    );
    let table = position(&ops, Op::PutTable(after.table));
    let deleted = position(&ops, Op::DeleteBackend(ids[1]));
    for frontend in [web, web_np] {
        let put = position(&ops, Op::PutService(frontend));
        assert!(
            table < put && put < deleted,
            "table, frontends, then the backend: {ops:?}"
        );
    }
    assert!(!ops.iter().any(|op| matches!(op, Op::PutBackend(_))), "{ops:?}");
}

#[test]
fn a_draining_backend_keeps_its_id_and_is_marked_after_the_frontends_leave_its_table() {
    let web = key(10, 80);
    let mut maps = Recorder::default();
    let mut reconciler = Reconciler::new(Programmed::default());
    ok(&reconciler.apply(
        &Desired::from([(web, cluster_ip("default/web", &[1, 2]))]),
        &mut maps,
    ));
    let ids = maps.table(&maps.services[&web].backends)[..2].to_vec();
    maps.take_ops();
    let draining = DesiredService {
        draining: backends(&[2]),
        ..cluster_ip("default/web", &[1])
    };
    ok(&reconciler.apply(&Desired::from([(web, draining)]), &mut maps));
    let ops = maps.take_ops();
    assert_eq!(maps.backends[&ids[1]].flags, backend_flags::DRAINING);
    assert!(
        position(&ops, Op::PutService(web)) < position(&ops, Op::PutBackend(ids[1])),
        "{ops:?}"
    );
    assert_eq!(maps.services[&web].backends.count, 1);

    // Ready again: back under its id, in a table written after it is unmarked.
    ok(&reconciler.apply(
        &Desired::from([(web, cluster_ip("default/web", &[1, 2]))]),
        &mut maps,
    ));
    let ops = maps.take_ops();
    let set = maps.services[&web].backends;
    assert_eq!(maps.table(&set)[..2], ids);
    assert_eq!(maps.backends[&ids[1]].flags, 0);
    assert!(position(&ops, Op::PutBackend(ids[1])) < position(&ops, Op::PutTable(set.table)));
}

#[test]
fn a_restarted_reconciler_writes_nothing_for_the_state_it_finds_and_keeps_ids() {
    let (web, web_np, api) = (key(10, 80), node_port(30080), key(11, 443));
    let maglev = Some(MaglevSize::Scaled);
    let desired = Desired::from([
        (
            web,
            DesiredService {
                maglev,
                draining: backends(&[9]),
                ..cluster_ip("default/web", &[1, 2])
            },
        ),
        (
            web_np,
            DesiredService {
                maglev,
                draining: backends(&[9]),
                ..external("default/web", &[1, 2])
            },
        ),
        (api, cluster_ip("default/api", &[3])),
        // No endpoints: an empty set, which the maps know only from its frontend.
        (key(13, 53), cluster_ip("default/nobody", &[])),
    ]);
    let mut maps = Recorder::default();
    let mut first = Reconciler::new(Programmed::default());
    ok(&first.apply(&desired, &mut maps));
    maps.take_ops();
    let before = maps.programmed();

    let mut restarted = Reconciler::new(maps.programmed());
    let report = restarted.apply(&desired, &mut maps);
    ok(&report);
    assert_eq!((report.writes, report.deletes), (0, 0), "{:?}", maps.ops);
    assert_eq!(maps.programmed(), before);

    // A change after the restart: new ids past every id given out before.
    let grown = Desired::from([
        (
            web,
            DesiredService {
                maglev,
                ..cluster_ip("default/web", &[1, 2, 4])
            },
        ),
        (
            web_np,
            DesiredService {
                maglev,
                ..external("default/web", &[1, 2, 4])
            },
        ),
        (key(12, 80), cluster_ip("default/new", &[5])),
    ]);
    ok(&restarted.apply(&grown, &mut maps));
    let set = maps.services[&web].backends;
    assert_eq!(set.id, before.services[&web].backends.id, "the set keeps its id");
    let old_ids = &before.tables[&before.services[&web].backends.table];
    assert_eq!(maps.table(&set)[..2], old_ids[..], "the backends keep theirs");
    let highest = before.backends.keys().max().copied().unwrap();
    assert!(maps.table(&set)[2] > highest, "a new backend takes a new id");
    let new = maps.services[&key(12, 80)];
    let used: BTreeSet<u32> = before
        .services
        .values()
        .flat_map(|i| [i.id, i.backends.id])
        .collect();
    assert!(!used.contains(&new.id) && !used.contains(&new.backends.id));
}

#[test]
fn ids_are_never_handed_out_twice_not_even_after_a_restart_that_finds_none() {
    let web = key(10, 80);
    let mut maps = Recorder::default();
    let mut reconciler = Reconciler::new(Programmed::default());
    ok(&reconciler.apply(
        &Desired::from([(web, cluster_ip("default/web", &[1, 2]))]),
        &mut maps,
    ));
    let first = maps.services[&web];
    let first_ids = maps.table(&first.backends)[..2].to_vec();
    ok(&reconciler.apply(&Desired::new(), &mut maps));
    assert!(maps.backends.is_empty());

    let mut restarted = Reconciler::new(maps.programmed());
    ok(&restarted.apply(
        &Desired::from([(web, cluster_ip("default/web", &[1, 2]))]),
        &mut maps,
    ));
    let again = maps.services[&web];
    assert_ne!(
        again.id, first.id,
        "conntrack may still name the removed frontend's id"
    );
    for id in &maps.table(&again.backends)[..2] {
        assert!(
            !first_ids.contains(id),
            "backend id {id} may still be named by conntrack"
        );
    }
}

#[test]
fn a_full_backend_map_fails_only_the_service_that_does_not_fit_and_it_is_retried() {
    let (fits, too_big) = (key(10, 80), key(20, 80));
    let mut maps = Recorder {
        backend_capacity: Some(3),
        ..Recorder::default()
    };
    let mut reconciler = Reconciler::new(Programmed::default());
    let services = ServiceFrontends::new();
    let desired = Desired::from([
        (fits, cluster_ip("default/fits:80", &[1, 2])),
        (too_big, cluster_ip("default/too-big:80", &[3, 4, 5])),
    ]);
    let report = reconciler.apply(&desired, &mut maps);
    let failed: Vec<&str> = report.failed.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(failed, ["default/too-big:80"], "{:?}", report.failed);
    assert!(
        report.failed[0].1.to_string().contains("the map is full"),
        "{:?}",
        report.failed
    );
    assert!(maps.services.contains_key(&fits));
    assert!(!maps.services.contains_key(&too_big));

    // Room again: the next pass, whatever it is given, completes it.
    maps.backend_capacity = None;
    let report = reconciler.sync_changed(&services, &PlanOptions::default(), &mut maps);
    ok(&report);
    assert_eq!(maps.services[&too_big].backends.count, 3);
    assert_eq!(maps.backends.len(), 5, "no entry left over: {:?}", maps.backends);
}

#[test]
fn frontends_beyond_a_full_services_map_are_reported_by_name_in_key_order() {
    let mut maps = Recorder {
        service_capacity: Some(2),
        ..Recorder::default()
    };
    let mut reconciler = Reconciler::new(Programmed::default());
    let desired = Desired::from([
        (key(10, 80), cluster_ip("default/a:80", &[1])),
        (key(11, 80), cluster_ip("default/b:80", &[2])),
        (key(12, 80), cluster_ip("default/c:80", &[3])),
        (key(12, 53), cluster_ip("default/c:53", &[3])),
    ]);
    let report = reconciler.apply(&desired, &mut maps);
    let failed: Vec<&str> = report.failed.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(failed, ["default/c:53", "default/c:80"]);
    assert_eq!(
        maps.services.keys().copied().collect::<Vec<_>>(),
        [key(10, 80), key(11, 80)]
    );
}

#[test]
fn a_changed_service_costs_its_own_writes_whatever_else_is_programmed() {
    let options = PlanOptions::default();
    let services: ServiceFrontends = (0..1000)
        .map(|i| {
            let frontend = model_frontend(
                &format!("default/svc-{i}"),
                FrontendKind::ClusterIp,
                &format!("10.96.{}.{}", i / 250, i % 250 + 1),
                80,
                &["10.0.0.1:8080", "10.0.0.2:8080"],
            );
            (frontend.service.clone(), vec![frontend])
        })
        .collect();
    let mut maps = Recorder::default();
    let mut reconciler = Reconciler::new(Programmed::default());
    ok(&reconciler.sync_all(&services, &options, &mut maps));
    maps.take_ops();
    maps.calls = 0;
    let name = ServiceName {
        namespace: "default".into(),
        name: "svc-500".into(),
    };
    let changed = ServiceFrontends::from([(
        name.clone(),
        vec![model_frontend(
            "default/svc-500",
            FrontendKind::ClusterIp,
            "10.96.2.1",
            80,
            &["10.0.0.1:8080", "10.0.0.3:8080"],
        )],
    )]);
    ok(&reconciler.sync_changed(&changed, &options, &mut maps));
    let ops = maps.take_ops();
    assert_eq!(
        ops.len(),
        4,
        "a backend, a table, the frontend, a delete: {ops:?}"
    );
    assert!(maps.calls <= 3, "{} batches", maps.calls);

    // The same again: nothing.
    ok(&reconciler.sync_changed(&changed, &options, &mut maps));
    assert_eq!(maps.take_ops(), []);
    // Removed.
    ok(&reconciler.sync_changed(&ServiceFrontends::from([(name, vec![])]), &options, &mut maps));
    assert_eq!(maps.services.len(), 999);
}

#[test]
fn sync_all_removes_the_services_it_is_not_given() {
    let options = PlanOptions::default();
    let service = |name: &str, address: &str| {
        let frontend = model_frontend(name, FrontendKind::ClusterIp, address, 80, &["10.0.0.1:8080"]);
        (frontend.service.clone(), vec![frontend])
    };
    let mut maps = Recorder::default();
    let mut reconciler = Reconciler::new(Programmed::default());
    let both = ServiceFrontends::from([
        service("default/a", "10.96.0.1"),
        service("default/b", "10.96.0.2"),
    ]);
    ok(&reconciler.sync_all(&both, &options, &mut maps));
    assert_eq!(maps.services.len(), 2);
    ok(&reconciler.sync_all(
        &ServiceFrontends::from([service("default/a", "10.96.0.1")]),
        &options,
        &mut maps,
    ));
    assert_eq!(
        maps.services
            .keys()
            .map(|k| k.addr.to_string())
            .collect::<Vec<_>>(),
        ["10.96.0.1"]
    );
    assert_eq!(maps.backends.len(), 1);
}

#[test]
fn a_frontend_moving_between_services_in_one_pass_is_not_deleted_after_it_was_written() {
    let options = PlanOptions::default();
    let frontend = |name: &str, backend: &str| {
        model_frontend(name, FrontendKind::ClusterIp, "10.96.0.1", 80, &[backend])
    };
    let (a, b) = (
        frontend("default/a", "10.0.0.1:8080"),
        frontend("default/b", "10.0.0.2:8080"),
    );
    let mut maps = Recorder::default();
    let mut reconciler = Reconciler::new(Programmed::default());
    ok(&reconciler.sync_all(
        &ServiceFrontends::from([(a.service.clone(), vec![a.clone()])]),
        &options,
        &mut maps,
    ));
    let moved = ServiceFrontends::from([(a.service.clone(), vec![]), (b.service.clone(), vec![b.clone()])]);
    ok(&reconciler.sync_changed(&moved, &options, &mut maps));
    let info = maps.services[&key(1, 80)];
    assert_eq!(maps.live(&info.backends), ["10.0.0.2:8080".parse().unwrap()]);
    assert_eq!(maps.backends.len(), 1, "a's backend went");
}

#[test]
fn orphans_left_in_the_pinned_maps_are_removed_by_the_first_full_pass() {
    let mut maps = Recorder::default();
    let mut old = Reconciler::new(Programmed::default());
    ok(&old.apply(
        &Desired::from([
            (key(10, 80), cluster_ip("default/web", &[1])),
            (key(11, 80), cluster_ip("default/gone", &[2, 3])),
        ]),
        &mut maps,
    ));
    // A backend entry of no set, as an interrupted run might leave.
    maps.backends.insert(
        999,
        BackendEntry {
            addr: backend(9),
            proto: IPPROTO_TCP,
            flags: 0,
            set_id: 4242,
        },
    );
    let mut restarted = Reconciler::new(maps.programmed());
    ok(&restarted.apply(
        &Desired::from([(key(10, 80), cluster_ip("default/web", &[1]))]),
        &mut maps,
    ));
    assert_eq!(maps.services.keys().copied().collect::<Vec<_>>(), [key(10, 80)]);
    assert_eq!(maps.backends.len(), 1, "{:?}", maps.backends);
    assert_eq!(
        maps.cluster_ips.keys().copied().collect::<Vec<_>>(),
        [key(10, 80).addr]
    );
}

#[test]
fn the_table_space_grows_before_a_table_that_does_not_fit_and_keeps_the_others() {
    let mut maps = Recorder::default();
    let mut reconciler = Reconciler::new(Programmed::default());
    let maglev = Some(MaglevSize::Fixed(4093));
    let one = Desired::from([(
        key(10, 80),
        DesiredService {
            maglev,
            ..cluster_ip("default/a", &[1, 2])
        },
    )]);
    ok(&reconciler.apply(&one, &mut maps));
    let ops = maps.take_ops();
    assert!(
        position(&ops, Op::GrowTables(maps.space.len() as u32)) < ops.len(),
        "an empty space grows for the first table: {ops:?}"
    );
    let a = maps.table(&maps.services[&key(10, 80)].backends).to_vec();
    let mut two = one.clone();
    for i in 0..5 {
        two.insert(
            key(20 + i, 80),
            DesiredService {
                maglev,
                ..cluster_ip(&format!("default/b{i}"), &[3, 4])
            },
        );
    }
    ok(&reconciler.apply(&two, &mut maps));
    let ops = maps.take_ops();
    let grew = ops
        .iter()
        .position(|op| matches!(op, Op::GrowTables(_)))
        .expect("the space grew");
    let first_table = ops.iter().position(|op| matches!(op, Op::PutTable(_))).unwrap();
    assert!(grew < first_table, "{ops:?}");
    assert_eq!(
        maps.table(&maps.services[&key(10, 80)].backends),
        a,
        "kept across growth"
    );
    assert!(maps.space.len() % 1024 == 0);
}

#[test]
fn maglev_tables_follow_the_backend_addresses_and_the_size_policy() {
    let web = key(10, 80);
    let mut maps = Recorder::default();
    let mut reconciler = Reconciler::new(Programmed::default());
    let with = |size, last: &[u8]| {
        Desired::from([(
            web,
            DesiredService {
                maglev: Some(size),
                ..cluster_ip("default/web", last)
            },
        )])
    };
    ok(&reconciler.apply(&with(MaglevSize::Fixed(251), &[1, 2, 3]), &mut maps));
    let set = maps.services[&web].backends;
    assert_eq!(set.maglev_size, 251);
    let ids = maps.table(&set)[..3].to_vec();
    let identities: Vec<Vec<u8>> = backends(&[1, 2, 3]).into_iter().map(maglev::identity).collect();
    let weighted: Vec<(&[u8], u32)> = identities.iter().map(|i| (i.as_slice(), 1)).collect();
    let expected: Vec<BackendId> = maglev::table(&weighted, 251)
        .into_iter()
        .map(|i| ids[i])
        .collect();
    assert_eq!(
        maps.table(&set)[3..],
        expected[..],
        "the table after the ids, by address"
    );

    ok(&reconciler.apply(
        &with(MaglevSize::Scaled, &(1..=11).collect::<Vec<u8>>()),
        &mut maps,
    ));
    assert_eq!(
        maps.services[&web].backends.maglev_size, 2039,
        "11 backends: 2039 positions"
    );
    ok(&reconciler.apply(
        &Desired::from([(web, cluster_ip("default/web", &[1]))]),
        &mut maps,
    ));
    let random = maps.services[&web].backends;
    assert_eq!(
        (random.maglev_size, random.count),
        (0, 1),
        "random choice has no Maglev table"
    );
}

#[test]
fn source_ranges_are_written_before_their_frontend_and_removed_after_it() {
    let lb = key(7, 80);
    let mut service = DesiredService {
        external: Some(External {
            source_ranges: Some(vec![([192, 0, 2, 0].into(), 24), ([198, 51, 100, 0].into(), 24)]),
            ..External::default()
        }),
        ..external("default/lb:80 (LoadBalancer)", &[1])
    };
    let mut maps = Recorder::default();
    let mut reconciler = Reconciler::new(Programmed::default());
    ok(&reconciler.apply(&Desired::from([(lb, service.clone())]), &mut maps));
    let ops = maps.take_ops();
    let put_service = position(&ops, Op::PutService(lb));
    let ranges: Vec<usize> = (0..ops.len())
        .filter(|&i| matches!(ops[i], Op::PutSourceRange(_)))
        .collect();
    assert_eq!(ranges.len(), 2);
    assert!(ranges.iter().all(|&i| i < put_service), "ranges first: {ops:?}");
    let info = maps.services[&lb];
    assert_eq!(
        info.flags,
        service_flags::SOURCE_RANGES | service_flags::EXTERNAL_SNAT
    );

    service.external.as_mut().unwrap().source_ranges = Some(vec![([192, 0, 2, 0].into(), 24)]);
    ok(&reconciler.apply(&Desired::from([(lb, service)]), &mut maps));
    let gone = SourceRange {
        service_id: info.id,
        addr: [198, 51, 100, 0].into(),
        prefix_len: 24,
    };
    assert_eq!(maps.take_ops(), vec![Op::DeleteSourceRange(gone)]);

    ok(&reconciler.apply(&Desired::new(), &mut maps));
    let ops = maps.take_ops();
    assert_eq!(ops[0], Op::DeleteService(lb), "the entry first: {ops:?}");
    assert!(maps.ranges.is_empty(), "{ops:?}");
}

#[test]
fn a_backend_of_the_other_family_is_refused_before_anything_is_written() {
    let web6 = FrontendKey {
        addr: "fd00::10".parse().unwrap(),
        port: 80,
        proto: IPPROTO_TCP,
    };
    let mut maps = Recorder::default();
    let mut reconciler = Reconciler::new(Programmed::default());
    let report = reconciler.apply(
        &Desired::from([(web6, cluster_ip("default/web", &[1]))]),
        &mut maps,
    );
    assert_eq!(report.failed.len(), 1, "{:?}", report.failed);
    assert_eq!(report.failed[0].1.map, map_names::BACKENDS6);
    assert!(maps.services.is_empty() && maps.backends.is_empty());
}

#[test]
fn dual_stack_frontends_have_a_set_each_in_one_id_space() {
    let web6 = FrontendKey {
        addr: "fd00::10".parse().unwrap(),
        port: 80,
        proto: IPPROTO_TCP,
    };
    let six = DesiredService {
        name: "default/web".into(),
        cluster_ip: true,
        backends: vec!["[fd00:244::1]:8080".parse().unwrap()],
        ..DesiredService::default()
    };
    let mut maps = Recorder::default();
    let mut reconciler = Reconciler::new(Programmed::default());
    ok(&reconciler.apply(
        &Desired::from([(key(10, 80), cluster_ip("default/web", &[1])), (web6, six)]),
        &mut maps,
    ));
    let (v4, v6) = (maps.services[&key(10, 80)], maps.services[&web6]);
    assert_ne!(v4.backends.id, v6.backends.id);
    let ids = BTreeSet::from([v4.id, v6.id, v4.backends.id, v6.backends.id]);
    assert_eq!(ids.len(), 4, "one space of service and set ids");
    assert_eq!(maps.cluster_ips.len(), 2);
}

// --- plan ----------------------------------------------------------------------------------

fn endpoint(text: &str) -> Endpoint {
    let addr: SocketAddr = text.parse().expect("address:port");
    Endpoint {
        address: addr.ip(),
        port: addr.port(),
        pod: format!("pod-{text}"),
        node_name: None,
        zone: None,
        terminating: false,
        zone_hints: Vec::new(),
        node_hints: Vec::new(),
    }
}

fn model_frontend(name: &str, kind: FrontendKind, address: &str, port: u16, backends: &[&str]) -> Frontend {
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
        protocol: Protocol::Tcp,
        algorithm: None,
        backends: backends.iter().map(|b| endpoint(b)).collect(),
        draining: Vec::new(),
        in_cluster: None,
        policy: Policy::default(),
    }
}

#[test]
fn plan_maps_frontends_to_keys_with_their_backends_in_order() {
    let mut dns = model_frontend(
        "kube-system/dns",
        FrontendKind::ClusterIp,
        "10.96.0.53",
        53,
        &["10.0.0.53:5353"],
    );
    dns.protocol = Protocol::Udp;
    let model = Model {
        frontends: vec![
            model_frontend(
                "default/web",
                FrontendKind::ClusterIp,
                "10.96.0.10",
                80,
                &["10.0.0.2:8080", "10.0.0.1:8080"],
            ),
            dns,
            model_frontend("default/empty", FrontendKind::ClusterIp, "10.96.0.11", 8080, &[]),
        ],
        warnings: vec![],
    };
    let planned = plan(&model, &PlanOptions::default());
    let udp = FrontendKey {
        proto: IPPROTO_UDP,
        ..key(53, 53)
    };
    assert_eq!(
        planned[&key(10, 80)],
        DesiredService {
            name: "default/web:80".into(),
            cluster_ip: true,
            backends: backends(&[2, 1]),
            draining: Vec::new(),
            maglev: Some(MaglevSize::Scaled),
            affinity_timeout: None,
            external: None,
        },
        "backends keep the model's order; Maglev scaled by default"
    );
    assert_eq!(planned[&udp].name, "kube-system/dns:53");
    assert_eq!(
        planned[&key(11, 8080)].backends,
        vec![],
        "a frontend without endpoints is still planned"
    );
}

#[test]
fn plan_keys_external_frontends_with_their_policy_and_in_cluster_backends() {
    let load_balancer = |address| {
        let mut lb = model_frontend("default/web", FrontendKind::LoadBalancer, address, 80, &[]);
        lb.policy.external_local = true;
        lb.policy.source_ranges = vec!["203.0.113.9/24".into(), "2001:db8::1/32".into(), "junk".into()];
        lb.in_cluster = Some(Endpoints {
            backends: vec![endpoint("10.0.0.1:8080")],
            draining: Vec::new(),
        });
        lb
    };
    let model = Model {
        frontends: vec![
            model_frontend(
                "default/web",
                FrontendKind::NodePort,
                "0.0.0.0",
                30080,
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
    let node_port = &planned[&key("0.0.0.0", 30080)];
    assert_eq!(node_port.name, "default/web:30080 (NodePort)");
    assert_eq!(node_port.external, Some(External::default()));
    assert_eq!(
        planned[&key("198.51.100.7", 80)].external,
        Some(External {
            local: true,
            source_ranges: Some(vec![([203, 0, 113, 0].into(), 24)]),
            in_cluster: Some(BackendAddrs {
                backends: backends(&[1]),
                draining: Vec::new(),
            }),
        }),
        "IPv6 and unparsable ranges admit no IPv4 client; pods and the node use every endpoint"
    );
    assert_eq!(
        planned[&key("2001:db8:7::7", 80)]
            .external
            .as_ref()
            .unwrap()
            .source_ranges,
        Some(vec![("2001:db8::".parse().unwrap(), 32)]),
        "the range is masked to its prefix"
    );
}

#[test]
fn a_group_plan_shares_equal_sets_and_keeps_draining_apart_from_live() {
    let np = DesiredService {
        draining: backends(&[1, 3]),
        ..external("default/web", &[1, 2])
    };
    let desired = Desired::from([
        (key(10, 80), cluster_ip("default/web", &[1, 2])),
        (node_port(30080), np),
    ]);
    let plan = GroupPlan::new(&desired);
    assert_eq!(
        plan.sets.len(),
        2,
        "the NodePort's draining one makes it another set: {plan:?}"
    );
    let node_port_set = &plan.sets[plan.frontends[0].backends];
    assert_eq!(plan.frontends[0].key, node_port(30080), "frontends in key order");
    assert_eq!(
        node_port_set.draining,
        backends(&[3]),
        "a live backend is not also draining"
    );
    assert_eq!(node_port_set.maglev_size, 0, "random choice");
}
