//! Frontends of either family for the BPF_PROG_TEST_RUN tests, so each test is written once and
//! run over IPv4 and IPv6. IPv4 goes through the real reconciler (`Loaded::apply`); IPv6 is
//! written straight into the twin maps the way the reconciler writes IPv4, until the shared
//! `Loaded::program*` and the reconciler take IPv6 frontends (branch `userspace-v6`), when this
//! file gives way to them.
#![allow(dead_code, reason = "each test binary uses a different part")]

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use aya::maps::{HashMap, Map, MapData, lpm_trie, lpm_trie::LpmTrie};
use lb_common::{
    Backend, BackendId, ClusterIpKey, CtEntry, CtKey, Ipv4, Ipv6, ServiceInfo, ServiceKey, SlotKey,
    SourceRangeKey, backend_flags, map_names, service_flags,
};
use lb_userspace::reconcile::{DesiredService, External, MapWriter as _, maglev};

use crate::common::{
    Loaded,
    packets::{Endpoint, Family},
};

/// What a frontend should be: `DesiredService`, with backends and source ranges of family `A`.
#[derive(Clone, Debug)]
pub struct Desired<A> {
    pub cluster_ip: bool,
    pub backends: Vec<Endpoint<A>>,
    pub draining: Vec<Endpoint<A>>,
    pub maglev: Option<u32>,
    pub affinity_timeout: Option<u32>,
    pub external: Option<ExternalPolicy<A>>,
}

/// `reconcile::External`, with source ranges of family `A`.
#[derive(Clone, Debug)]
pub struct ExternalPolicy<A> {
    /// `externalTrafficPolicy: Local`.
    pub local: bool,
    /// `loadBalancerSourceRanges` (prefix, length).
    pub source_ranges: Option<Vec<(A, u8)>>,
}

impl<A> Default for Desired<A> {
    fn default() -> Self {
        Self {
            cluster_ip: false,
            backends: Vec::new(),
            draining: Vec::new(),
            maglev: None,
            affinity_timeout: None,
            external: None,
        }
    }
}

/// A ClusterIP frontend with `backends`.
pub fn cluster_ip<A: Copy>(backends: &[Endpoint<A>]) -> Desired<A> {
    Desired {
        cluster_ip: true,
        backends: backends.to_vec(),
        ..Desired::default()
    }
}

/// A frontend of `addr`'s family (`common::frontend` takes IPv4 only).
pub fn frontend<A: lb_common::Address>(addr: A, port: u16, proto: u8) -> ServiceKey<A> {
    ServiceKey {
        addr,
        port,
        proto,
        pad: 0,
    }
}

/// A family whose frontends a test can program.
pub trait Programmable: Family {
    /// Programs exactly `frontends` of this family; the other family's stay.
    fn apply(lb: &mut Loaded, frontends: &[(ServiceKey<Self>, Desired<Self>)]);
    /// The node's addresses of this family (NodePorts answer on them) and the addresses flows
    /// leaving through an interface take.
    fn set_node_addrs(lb: &mut Loaded, node: &[Self], snat: &[(u32, Self)]);
    /// This family's conntrack entries.
    fn conntrack(lb: &Loaded) -> Vec<(CtKey<Self>, CtEntry<Self>)>;
}

/// What the reconciler is given for IPv4 `frontends`.
pub fn desired_services(frontends: &[(ServiceKey, Desired<Ipv4>)]) -> BTreeMap<ServiceKey, DesiredService> {
    frontends
        .iter()
        .map(|(key, desired)| {
            let service = DesiredService {
                name: format!("test/{key:?}"),
                cluster_ip: desired.cluster_ip,
                backends: desired.backends.clone(),
                draining: desired.draining.clone(),
                maglev: desired.maglev,
                affinity_timeout: desired.affinity_timeout,
                external: desired.external.clone().map(|policy| External {
                    local: policy.local,
                    source_ranges: policy.source_ranges,
                }),
            };
            (*key, service)
        })
        .collect()
}

impl Programmable for Ipv4 {
    fn apply(lb: &mut Loaded, frontends: &[(ServiceKey, Desired<Ipv4>)]) {
        lb.apply(&desired_services(frontends));
    }

    fn set_node_addrs(lb: &mut Loaded, node: &[Ipv4], snat: &[(u32, Ipv4)]) {
        let node: BTreeSet<_> = node.iter().copied().collect();
        lb.maps.set_node_addrs(&node).unwrap();
        lb.maps.set_snat_addrs(&snat.iter().copied().collect()).unwrap();
    }

    fn conntrack(lb: &Loaded) -> Vec<(CtKey, CtEntry)> {
        lb.maps.conntrack.iter().map(Result::unwrap).collect()
    }
}

/// IPv6 service ids start here, clear of the ids the reconciler gives IPv4 frontends (one id
/// space for both families).
const FIRST_IPV6_SERVICE_ID: u32 = 1_000_000;
/// Backend ids of an IPv6 service: its id times this, plus a number.
const BACKEND_IDS_PER_SERVICE: u32 = 1_000;

fn map(pins: &Path, name: &str) -> MapData {
    MapData::from_pin(pins.join(name)).unwrap_or_else(|e| panic!("{name} is pinned: {e}"))
}

fn hash_map<K: aya::Pod, V: aya::Pod>(pins: &Path, name: &str) -> HashMap<MapData, K, V> {
    HashMap::try_from(Map::HashMap(map(pins, name))).unwrap()
}

impl Programmable for Ipv6 {
    /// Writes what the reconciler would, in its order (backends, slots and tables before the
    /// service entry), keeping the ids of backends that stay so that their flows stay. A
    /// frontend's service id is its position in `frontends`.
    fn apply(lb: &mut Loaded, frontends: &[(ServiceKey<Ipv6>, Desired<Ipv6>)]) {
        let pins = lb.pins.path().to_owned();
        let mut services = hash_map::<ServiceKey<Ipv6>, ServiceInfo>(&pins, map_names::SERVICES6);
        let mut backends = hash_map::<BackendId, Backend<Ipv6>>(&pins, map_names::BACKENDS6);
        let mut cluster_ips = hash_map::<ClusterIpKey<Ipv6>, u32>(&pins, map_names::CLUSTER_IPS6);
        let mut range_map: LpmTrie<MapData, SourceRangeKey<Ipv6>, u8> =
            LpmTrie::try_from(Map::LpmTrie(map(&pins, map_names::SOURCE_RANGES6))).unwrap();

        let held: Vec<(BackendId, Backend<Ipv6>)> = backends.iter().map(Result::unwrap).collect();
        let mut wanted_backends = BTreeSet::new();
        let mut cluster_ip_counts = BTreeMap::<Ipv6, u32>::new();
        for (index, (key, desired)) in frontends.iter().enumerate() {
            let service_id = FIRST_IPV6_SERVICE_ID + index as u32;
            let mut ids = Vec::new();
            let all = desired.backends.iter().map(|b| (b, 0));
            let draining = desired.draining.iter().map(|b| (b, backend_flags::DRAINING));
            for (number, (&(addr, port), flags)) in all.chain(draining).enumerate() {
                let id = held
                    .iter()
                    .find(|(_, b)| b.service_id == service_id && (b.addr, b.port) == (addr, port))
                    .map_or(service_id * BACKEND_IDS_PER_SERVICE + number as u32, |(id, _)| {
                        *id
                    });
                let backend = Backend {
                    addr,
                    port,
                    proto: key.proto,
                    flags,
                    service_id,
                };
                backends.insert(id, backend, 0).unwrap();
                wanted_backends.insert(id);
                if flags == 0 {
                    ids.push(id);
                }
            }
            for (slot, id) in ids.iter().enumerate() {
                lb.maps
                    .put_slot(
                        SlotKey {
                            service_id,
                            slot: slot as u32,
                        },
                        *id,
                    )
                    .unwrap();
            }
            let mut flags = 0;
            if let Some(size) = desired.maglev {
                let identities: Vec<Vec<u8>> = desired
                    .backends
                    .iter()
                    .map(|(addr, port)| [&addr[..], &port.to_be_bytes()].concat())
                    .collect();
                let weighted: Vec<(&[u8], u32)> = identities.iter().map(|id| (id.as_slice(), 1)).collect();
                let table: Vec<BackendId> = maglev::table(&weighted, size)
                    .into_iter()
                    .map(|i| ids[i])
                    .collect();
                lb.maps.put_maglev(service_id, &table).unwrap();
                flags |= service_flags::MAGLEV;
            }
            if desired.affinity_timeout.is_some() {
                flags |= service_flags::AFFINITY;
            }
            if let Some(ExternalPolicy { local, source_ranges }) = &desired.external {
                flags |= if *local {
                    service_flags::EXTERNAL_LOCAL
                } else {
                    service_flags::EXTERNAL_SNAT
                };
                for (addr, prefix_len) in source_ranges.iter().flatten() {
                    let key = SourceRangeKey {
                        service_id: service_id.to_be_bytes(),
                        addr: *addr,
                    };
                    range_map
                        .insert(&lpm_trie::Key::new(32 + u32::from(*prefix_len), key), 1, 0)
                        .unwrap();
                    flags |= service_flags::SOURCE_RANGES;
                }
            }
            let info = ServiceInfo {
                id: service_id,
                backend_count: ids.len() as u32,
                flags,
                maglev_table_size: desired.maglev.unwrap_or(0),
                affinity_timeout_s: desired.affinity_timeout.unwrap_or(0),
            };
            services.insert(key, info, 0).unwrap();
            if desired.cluster_ip {
                *cluster_ip_counts.entry(key.addr).or_default() += 1;
            }
        }

        // What is no longer wanted goes, the service entries first.
        let wanted_keys: BTreeSet<_> = frontends.iter().map(|(key, _)| *key).collect();
        let held_keys: Vec<ServiceKey<Ipv6>> = services.keys().map(Result::unwrap).collect();
        for key in held_keys.iter().filter(|key| !wanted_keys.contains(key)) {
            services.remove(key).unwrap();
        }
        // Slots past a service's backend count are never read, nor tables without its flag.
        for (id, _) in &held {
            if !wanted_backends.contains(id) {
                backends.remove(id).unwrap();
            }
        }
        let held_ips: Vec<ClusterIpKey<Ipv6>> = cluster_ips.keys().map(Result::unwrap).collect();
        for key in held_ips {
            if !cluster_ip_counts.contains_key(&key.addr) {
                cluster_ips.remove(&key).unwrap();
            }
        }
        for (addr, count) in cluster_ip_counts {
            cluster_ips.insert(ClusterIpKey { addr }, count, 0).unwrap();
        }
    }

    fn set_node_addrs(lb: &mut Loaded, node: &[Ipv6], snat: &[(u32, Ipv6)]) {
        let pins = lb.pins.path().to_owned();
        let mut node_addrs = hash_map::<Ipv6, u32>(&pins, map_names::NODE_ADDRS6);
        for addr in node {
            node_addrs.insert(addr, 0, 0).unwrap();
        }
        let mut snat_addrs = hash_map::<u32, Ipv6>(&pins, map_names::SNAT_ADDRS6);
        for (index, addr) in snat {
            snat_addrs.insert(index, addr, 0).unwrap();
        }
    }

    fn conntrack(lb: &Loaded) -> Vec<(CtKey<Ipv6>, CtEntry<Ipv6>)> {
        let conntrack = Map::LruHashMap(map(lb.pins.path(), map_names::CONNTRACK6));
        let conntrack: HashMap<MapData, CtKey<Ipv6>, CtEntry<Ipv6>> = HashMap::try_from(conntrack).unwrap();
        conntrack.iter().map(Result::unwrap).collect()
    }
}

/// ClusterIP frontends of family `A` with their backends, as `Loaded::program_all` programs
/// IPv4 ones.
pub fn program<A: Programmable>(
    lb: &mut Loaded,
    frontends: &[(ServiceKey<A>, &[Endpoint<A>])],
    maglev: Option<u32>,
    affinity_timeout: Option<u32>,
) {
    let desired: Vec<_> = frontends
        .iter()
        .map(|(key, backends)| {
            let desired = Desired {
                maglev,
                affinity_timeout,
                ..cluster_ip(backends)
            };
            (*key, desired)
        })
        .collect();
    A::apply(lb, &desired);
}
