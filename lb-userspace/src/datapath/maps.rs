//! Typed handles on the pinned maps: what the reconciler writes through and `status` reads. Each
//! map keyed or valued by an address has an IPv6 twin, named with a `6` here as in
//! `lb_common::map_names`; the reconciler's family-neutral entries go to the twin of their
//! address's family.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap},
    net::IpAddr,
    os::fd::{AsFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{
    Pod,
    maps::{
        Array, HashMap, IterableMap, Map, MapData, PerCpuArray, PerCpuHashMap,
        lpm_trie::{Key, LpmTrie},
    },
};
use lb_common::{
    Address, AffinityEntry, AffinityKey, Backend, BackendId, ClusterIpKey, CtEntry, CtKey, Ipv4, Ipv6,
    ServiceInfo, ServiceKey, ServiceStats, SourceRangeKey, Stat, config, ct_direction, map_names,
};

use super::{raw, tables::TableSpaceMap};
use crate::reconcile::{
    BackendEntry, BatchError, FrontendKey, IdKind, MapError, MapWriter, NextIds, Programmed, SourceRange,
};

pub struct ServiceMaps {
    pub services: HashMap<MapData, ServiceKey, ServiceInfo>,
    pub services6: HashMap<MapData, ServiceKey<Ipv6>, ServiceInfo>,
    pub backends: HashMap<MapData, BackendId, Backend>,
    pub backends6: HashMap<MapData, BackendId, Backend<Ipv6>>,
    pub conntrack: HashMap<MapData, CtKey, CtEntry>,
    pub conntrack6: HashMap<MapData, CtKey<Ipv6>, CtEntry<Ipv6>>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityEntry>,
    pub affinity6: HashMap<MapData, AffinityKey<Ipv6>, AffinityEntry>,
    pub stats: PerCpuArray<MapData, u64>,
    pub tables: TableSpaceMap,
    pub node_addrs: HashMap<MapData, Ipv4, u32>,
    pub node_addrs6: HashMap<MapData, Ipv6, u32>,
    pub snat_addrs: HashMap<MapData, u32, Ipv4>,
    pub snat_addrs6: HashMap<MapData, u32, Ipv6>,
    pub source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    pub source_ranges6: LpmTrie<MapData, SourceRangeKey<Ipv6>, u8>,
    pub cluster_ips: HashMap<MapData, ClusterIpKey, u32>,
    pub cluster_ips6: HashMap<MapData, ClusterIpKey<Ipv6>, u32>,
    pub service_stats: PerCpuHashMap<MapData, u32, ServiceStats>,
    pub config: Array<MapData, u64>,
}

/// An address family, with its twin of each map the agent fills with the node's own addresses.
pub trait Family: Address + Pod + Into<IpAddr> {
    fn node_addrs(maps: &mut ServiceMaps) -> &mut HashMap<MapData, Self, u32>;
    fn snat_addrs(maps: &mut ServiceMaps) -> &mut HashMap<MapData, u32, Self>;
}

impl Family for Ipv4 {
    fn node_addrs(maps: &mut ServiceMaps) -> &mut HashMap<MapData, Self, u32> {
        &mut maps.node_addrs
    }

    fn snat_addrs(maps: &mut ServiceMaps) -> &mut HashMap<MapData, u32, Self> {
        &mut maps.snat_addrs
    }
}

impl Family for Ipv6 {
    fn node_addrs(maps: &mut ServiceMaps) -> &mut HashMap<MapData, Self, u32> {
        &mut maps.node_addrs6
    }

    fn snat_addrs(maps: &mut ServiceMaps) -> &mut HashMap<MapData, u32, Self> {
        &mut maps.snat_addrs6
    }
}

fn open(pin_dir: &Path, name: &str) -> anyhow::Result<Map> {
    let path: PathBuf = pin_dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "cannot open {}; is the agent running with --pin-dir {}?",
            path.display(),
            pin_dir.display()
        )
    })?;
    let info = data.info()?;
    Ok(match info.map_type()? {
        aya::maps::MapType::PerCpuArray => Map::PerCpuArray(data),
        aya::maps::MapType::LruHash => Map::LruHashMap(data),
        aya::maps::MapType::HashOfMaps => Map::HashOfMaps(data),
        aya::maps::MapType::ArrayOfMaps => Map::ArrayOfMaps(data),
        aya::maps::MapType::LpmTrie => Map::LpmTrie(data),
        aya::maps::MapType::PerCpuHash => Map::PerCpuHashMap(data),
        aya::maps::MapType::Array => Map::Array(data),
        _ => Map::HashMap(data),
    })
}

impl ServiceMaps {
    /// Opens the maps pinned under `pin_dir`.
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            services: open(pin_dir, map_names::SERVICES)?.try_into()?,
            services6: open(pin_dir, map_names::SERVICES6)?.try_into()?,
            backends: open(pin_dir, map_names::BACKENDS)?.try_into()?,
            backends6: open(pin_dir, map_names::BACKENDS6)?.try_into()?,
            conntrack: open(pin_dir, map_names::CONNTRACK)?.try_into()?,
            conntrack6: open(pin_dir, map_names::CONNTRACK6)?.try_into()?,
            affinity: open(pin_dir, map_names::AFFINITY)?.try_into()?,
            affinity6: open(pin_dir, map_names::AFFINITY6)?.try_into()?,
            stats: open(pin_dir, map_names::STATS)?.try_into()?,
            tables: TableSpaceMap::new(open(pin_dir, map_names::BACKEND_TABLES)?.try_into()?)?,
            node_addrs: open(pin_dir, map_names::NODE_ADDRS)?.try_into()?,
            node_addrs6: open(pin_dir, map_names::NODE_ADDRS6)?.try_into()?,
            snat_addrs: open(pin_dir, map_names::SNAT_ADDRS)?.try_into()?,
            snat_addrs6: open(pin_dir, map_names::SNAT_ADDRS6)?.try_into()?,
            source_ranges: open(pin_dir, map_names::SOURCE_RANGES)?.try_into()?,
            source_ranges6: open(pin_dir, map_names::SOURCE_RANGES6)?.try_into()?,
            cluster_ips: open(pin_dir, map_names::CLUSTER_IPS)?.try_into()?,
            cluster_ips6: open(pin_dir, map_names::CLUSTER_IPS6)?.try_into()?,
            service_stats: open(pin_dir, map_names::SERVICE_STATS)?.try_into()?,
            config: open(pin_dir, map_names::CONFIG)?.try_into()?,
        })
    }

    /// The frontends of both families, as the kernel holds them now.
    pub fn services(&self) -> anyhow::Result<BTreeMap<FrontendKey, ServiceInfo>> {
        let mut services: BTreeMap<FrontendKey, ServiceInfo> = raw::lookup_batch(fd(&self.services))?
            .into_iter()
            .map(|(key, info): (ServiceKey, ServiceInfo)| (key.into(), info))
            .collect();
        services.extend(
            raw::lookup_batch(fd(&self.services6))?
                .into_iter()
                .map(|(key, info): (ServiceKey<Ipv6>, ServiceInfo)| (key.into(), info)),
        );
        Ok(services)
    }

    /// The frontend `key`'s entry in its family's services map, if it has one.
    pub fn service(&self, key: &FrontendKey) -> Option<ServiceInfo> {
        match key.addr {
            IpAddr::V4(addr) => self.services.get(&key.service_key(addr.octets()), 0).ok(),
            IpAddr::V6(addr) => self.services6.get(&key.service_key(addr.octets()), 0).ok(),
        }
    }

    /// The backends of both families, by id.
    pub fn backends(&self) -> anyhow::Result<StdHashMap<BackendId, BackendEntry>> {
        let mut backends: StdHashMap<BackendId, BackendEntry> = raw::lookup_batch(fd(&self.backends))?
            .into_iter()
            .map(|(id, backend): (BackendId, Backend)| (id, backend.into()))
            .collect();
        backends.extend(
            raw::lookup_batch(fd(&self.backends6))?
                .into_iter()
                .map(|(id, backend): (BackendId, Backend<Ipv6>)| (id, backend.into())),
        );
        Ok(backends)
    }

    /// Everything the reconciler manages, in both families' maps, as the kernel holds it now.
    pub fn read_programmed(&self) -> anyhow::Result<Programmed> {
        let services = self.services()?;
        // The ids at the start of every table a frontend points at.
        let mut counts: StdHashMap<u32, u32> = StdHashMap::new();
        for set in services.values().flat_map(|info| [info.backends, info.outside]) {
            if set.count > 0 {
                let count = counts.entry(set.table).or_default();
                *count = (*count).max(set.count);
            }
        }
        let blocks: Vec<(u32, u32)> = counts.into_iter().collect();
        let ids = self.tables.read(&blocks)?;
        let tables = blocks.iter().map(|(start, _)| *start).zip(ids).collect();
        let mut source_ranges = read_source_ranges(&self.source_ranges)?;
        source_ranges.extend(read_source_ranges(&self.source_ranges6)?);
        let mut cluster_ips = entries(&self.cluster_ips, |key, frontends| (key.addr.into(), frontends))?;
        cluster_ips.extend(entries(&self.cluster_ips6, |key, frontends| {
            (key.addr.into(), frontends)
        })?);
        let next_id = |index| -> anyhow::Result<u32> { Ok(self.config.get(&index, 0)? as u32) };
        let next_ids = NextIds {
            service: next_id(config::NEXT_SERVICE_ID)?,
            backend: next_id(config::NEXT_BACKEND_ID)?,
        };
        Ok(Programmed {
            services,
            backends: self.backends()?,
            tables,
            table_capacity: self.tables.capacity(),
            source_ranges,
            cluster_ips,
            next_ids,
        })
    }

    /// Makes `A`'s node addresses map ([`map_names::NODE_ADDRS`] or its twin) hold exactly
    /// `addrs`, the node's addresses of that family.
    pub fn set_node_addrs<A: Family>(&mut self, addrs: &BTreeSet<A>) -> anyhow::Result<()> {
        let map = A::node_addrs(self);
        let held: Vec<A> = map.keys().collect::<Result<_, _>>()?;
        for addr in addrs {
            map.insert(addr, 0, 0)?;
        }
        for addr in held.iter().filter(|a| !addrs.contains(*a)) {
            map.remove(addr)?;
        }
        Ok(())
    }

    /// Makes `A`'s SNAT addresses map ([`map_names::SNAT_ADDRS`] or its twin) hold exactly
    /// `addrs` (interface index → address).
    pub fn set_snat_addrs<A: Family>(&mut self, addrs: &BTreeMap<u32, A>) -> anyhow::Result<()> {
        let map = A::snat_addrs(self);
        let held: Vec<u32> = map.keys().collect::<Result<_, _>>()?;
        for (index, addr) in addrs {
            map.insert(index, addr, 0)?;
        }
        for index in held.iter().filter(|i| !addrs.contains_key(*i)) {
            map.remove(index)?;
        }
        Ok(())
    }

    /// How many entries the conntrack map was created to hold (a pinned map keeps its size).
    pub fn conntrack_capacity(&self) -> anyhow::Result<u32> {
        capacity(&self.conntrack)
    }

    /// A datapath counter summed over CPUs.
    pub fn stat(&self, stat: Stat) -> anyhow::Result<u64> {
        Ok(self.stats.get(&(stat as u32), 0)?.iter().sum())
    }

    /// The most verbose `lb_common::log_level` the datapath logs at.
    pub fn log_level(&self) -> anyhow::Result<u64> {
        Ok(self.config.get(&config::LOG_LEVEL, 0)?)
    }

    pub fn set_log_level(&mut self, level: u64) -> anyhow::Result<()> {
        Ok(self.config.set(config::LOG_LEVEL, level, 0)?)
    }

    /// Switches the reverse-path check of pods' packets (`config::SOURCE_CHECK`) on or off.
    pub fn set_source_check(&mut self, on: bool) -> anyhow::Result<()> {
        Ok(self.config.set(config::SOURCE_CHECK, u64::from(on), 0)?)
    }

    /// Flows tracked in both families' conntrack maps (their forward entries), by service id.
    /// Entries the datapath evicts meanwhile are skipped.
    pub fn flows_by_service(&self) -> BTreeMap<u32, usize> {
        let mut flows = BTreeMap::new();
        count_flows(&self.conntrack, &mut flows);
        count_flows(&self.conntrack6, &mut flows);
        flows
    }

    /// Every service id's traffic counters, summed over CPUs. A service without traffic since
    /// its id was given out has none.
    pub fn service_stats(&self) -> anyhow::Result<BTreeMap<u32, ServiceStats>> {
        let mut sums = BTreeMap::new();
        for entry in self.service_stats.iter() {
            let (id, per_cpu) = entry?;
            let sum: &mut ServiceStats = sums.entry(id).or_default();
            for stats in per_cpu.iter() {
                *sum += *stats;
            }
        }
        Ok(sums)
    }
}

fn count_flows<A: Address>(
    conntrack: &HashMap<MapData, CtKey<A>, CtEntry<A>>,
    flows: &mut BTreeMap<u32, usize>,
) where
    CtKey<A>: Pod,
    CtEntry<A>: Pod,
{
    for (key, entry) in conntrack.iter().filter_map(Result::ok) {
        if key.direction == ct_direction::FORWARD {
            *flows.entry(entry.service_id).or_default() += 1;
        }
    }
}

/// How many entries `map` was created to hold.
pub fn capacity<K: Pod, V>(map: &impl IterableMap<K, V>) -> anyhow::Result<u32> {
    Ok(map.map().info()?.max_entries())
}

fn failed(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> MapError {
    move |error| {
        let message = match &error {
            // What a hash map answers when every entry is taken.
            aya::maps::MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
                "the map is full".to_owned()
            }
            aya::maps::MapError::SyscallError(e) => format!("{}: {}", e.call, e.io_error),
            _ => error.to_string(),
        };
        MapError { map, message }
    }
}

/// Every entry of `map`, converted.
fn entries<K: Pod + Default, V: Pod + Default, T: Ord, U>(
    map: &HashMap<MapData, K, V>,
    convert: impl Fn(K, V) -> (T, U),
) -> std::io::Result<BTreeMap<T, U>> {
    Ok(raw::lookup_batch(fd(map))?
        .into_iter()
        .map(|(k, v)| convert(k, v))
        .collect())
}

/// The ranges of a family's trie, as the reconciler keeps them.
fn read_source_ranges<A: Address + Into<IpAddr>>(
    trie: &LpmTrie<MapData, SourceRangeKey<A>, u8>,
) -> Result<BTreeSet<SourceRange>, aya::maps::MapError>
where
    SourceRangeKey<A>: Pod,
{
    trie.keys()
        .map(|key| {
            let key = key?;
            let data = key.data();
            Ok(SourceRange {
                service_id: u32::from_be_bytes(data.service_id),
                addr: data.addr.into(),
                prefix_len: (key.prefix_len() - 32) as u8,
            })
        })
        .collect()
}

/// The trie key: the service id's 32 bits, then the range's prefix.
fn source_range_key<A: Address>(range: &SourceRange, addr: A) -> Key<SourceRangeKey<A>>
where
    SourceRangeKey<A>: Pod,
{
    let data = SourceRangeKey {
        service_id: range.service_id.to_be_bytes(),
        addr,
    };
    Key::new(32 + u32::from(range.prefix_len), data)
}

/// The file descriptor of a map.
fn fd<K: Pod, V>(map: &impl IterableMap<K, V>) -> BorrowedFd<'_> {
    map.map().fd().as_fd()
}

/// Writes `entries` into `A`'s map by `write_batch`, converted by `convert`, for runs of one
/// family at a time (`family` of each entry says which).
fn by_family<T, K4: Pod, V4: Pod, K6: Pod, V6: Pod>(
    entries: &[T],
    ipv4: impl Fn(&T) -> Option<(K4, V4)>,
    ipv6: impl Fn(&T) -> Option<(K6, V6)>,
    mut write4: impl FnMut(&[K4], &[V4]) -> Result<(), (usize, MapError)>,
    mut write6: impl FnMut(&[K6], &[V6]) -> Result<(), (usize, MapError)>,
) -> Result<(), BatchError> {
    let mut at = 0;
    while at < entries.len() {
        let run4: Vec<(K4, V4)> = entries[at..].iter().map_while(&ipv4).collect();
        if !run4.is_empty() {
            let (keys, values): (Vec<K4>, Vec<V4>) = run4.into_iter().unzip();
            write4(&keys, &values).map_err(|(index, error)| BatchError {
                index: at + index,
                error,
            })?;
            at += keys.len();
            continue;
        }
        let run6: Vec<(K6, V6)> = entries[at..].iter().map_while(&ipv6).collect();
        let (keys, values): (Vec<K6>, Vec<V6>) = run6.into_iter().unzip();
        write6(&keys, &values).map_err(|(index, error)| BatchError {
            index: at + index,
            error,
        })?;
        at += keys.len().max(1);
    }
    Ok(())
}

/// A batch update into `map`, named `name` in errors.
fn update<'a, K: Pod, V: Pod>(
    map: BorrowedFd<'a>,
    name: &'static str,
) -> impl FnMut(&[K], &[V]) -> Result<(), (usize, MapError)> + 'a {
    move |keys, values| {
        raw::update_batch(map, keys, values).map_err(|(done, error)| (done, io_failed(name, &error)))
    }
}

/// A batch delete from `map` (values ignored), named `name` in errors.
fn delete<'a, K: Pod, V>(
    map: BorrowedFd<'a>,
    name: &'static str,
) -> impl FnMut(&[K], &[V]) -> Result<(), (usize, MapError)> + 'a {
    move |keys, _| raw::delete_batch(map, keys).map_err(|(done, error)| (done, io_failed(name, &error)))
}

fn io_failed(map: &'static str, error: &std::io::Error) -> MapError {
    let message = match error.raw_os_error() {
        // What a hash map answers when every entry is taken.
        Some(libc::E2BIG) => "the map is full".to_owned(),
        _ => error.to_string(),
    };
    MapError { map, message }
}

fn ipv4_backend((id, backend): &(BackendId, BackendEntry)) -> Option<(BackendId, Backend)> {
    match backend.addr.ip() {
        IpAddr::V4(addr) => Some((*id, backend.with_addr(addr.octets()))),
        IpAddr::V6(_) => None,
    }
}

fn ipv6_backend((id, backend): &(BackendId, BackendEntry)) -> Option<(BackendId, Backend<Ipv6>)> {
    match backend.addr.ip() {
        IpAddr::V6(addr) => Some((*id, backend.with_addr(addr.octets()))),
        IpAddr::V4(_) => None,
    }
}

fn ipv4_service((key, info): &(FrontendKey, ServiceInfo)) -> Option<(ServiceKey, ServiceInfo)> {
    match key.addr {
        IpAddr::V4(addr) => Some((key.service_key(addr.octets()), *info)),
        IpAddr::V6(_) => None,
    }
}

fn ipv6_service((key, info): &(FrontendKey, ServiceInfo)) -> Option<(ServiceKey<Ipv6>, ServiceInfo)> {
    match key.addr {
        IpAddr::V6(addr) => Some((key.service_key(addr.octets()), *info)),
        IpAddr::V4(_) => None,
    }
}

/// Each write of an entry with an address goes to its family's twin map.
impl MapWriter for ServiceMaps {
    fn put_backends(&mut self, entries: &[(BackendId, BackendEntry)]) -> Result<(), BatchError> {
        by_family(
            entries,
            ipv4_backend,
            ipv6_backend,
            update(fd(&self.backends), map_names::BACKENDS),
            update(fd(&self.backends6), map_names::BACKENDS6),
        )
    }

    fn delete_backends(&mut self, entries: &[(BackendId, BackendEntry)]) -> Result<(), BatchError> {
        by_family(
            entries,
            ipv4_backend,
            ipv6_backend,
            delete(fd(&self.backends), map_names::BACKENDS),
            delete(fd(&self.backends6), map_names::BACKENDS6),
        )
    }

    fn put_services(&mut self, entries: &[(FrontendKey, ServiceInfo)]) -> Result<(), BatchError> {
        by_family(
            entries,
            ipv4_service,
            ipv6_service,
            update(fd(&self.services), map_names::SERVICES),
            update(fd(&self.services6), map_names::SERVICES6),
        )
    }

    fn delete_services(&mut self, keys: &[FrontendKey]) -> Result<(), BatchError> {
        let keyed: Vec<(FrontendKey, ServiceInfo)> =
            keys.iter().map(|key| (*key, ServiceInfo::default())).collect();
        by_family(
            &keyed,
            ipv4_service,
            ipv6_service,
            delete(fd(&self.services), map_names::SERVICES),
            delete(fd(&self.services6), map_names::SERVICES6),
        )
    }

    fn put_tables(
        &mut self,
        blocks: &[(u32, u32)],
        fill: &(dyn Fn(usize, &mut [BackendId]) + Sync),
    ) -> Result<(), MapError> {
        self.tables.write(blocks, fill)
    }

    fn grow_tables(&mut self, positions: u32) -> Result<(), MapError> {
        self.tables.grow(positions)
    }

    fn put_source_range(&mut self, range: SourceRange) -> Result<(), MapError> {
        match range.addr {
            IpAddr::V4(addr) => self
                .source_ranges
                .insert(&source_range_key(&range, addr.octets()), 1, 0)
                .map_err(failed(map_names::SOURCE_RANGES)),
            IpAddr::V6(addr) => self
                .source_ranges6
                .insert(&source_range_key(&range, addr.octets()), 1, 0)
                .map_err(failed(map_names::SOURCE_RANGES6)),
        }
    }

    fn delete_source_range(&mut self, range: SourceRange) -> Result<(), MapError> {
        match range.addr {
            IpAddr::V4(addr) => self
                .source_ranges
                .remove(&source_range_key(&range, addr.octets()))
                .map_err(failed(map_names::SOURCE_RANGES)),
            IpAddr::V6(addr) => self
                .source_ranges6
                .remove(&source_range_key(&range, addr.octets()))
                .map_err(failed(map_names::SOURCE_RANGES6)),
        }
    }

    fn forget_service_stats(&mut self, service_id: u32) {
        match self.service_stats.remove(&service_id) {
            Ok(()) => {}
            // The usual case: no traffic since the id was last forgotten.
            Err(aya::maps::MapError::SyscallError(error))
                if error.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(error) => tracing::warn!(service_id, "cannot reset the service's counters: {error}"),
        }
    }

    fn put_next_id(&mut self, kind: IdKind, next: u32) -> Result<(), MapError> {
        let index = match kind {
            IdKind::Service => config::NEXT_SERVICE_ID,
            IdKind::Backend => config::NEXT_BACKEND_ID,
        };
        self.config
            .set(index, u64::from(next), 0)
            .map_err(failed(map_names::CONFIG))
    }

    fn put_cluster_ips(&mut self, entries: &[(IpAddr, u32)]) -> Result<(), BatchError> {
        by_family(
            entries,
            |&(addr, frontends)| match addr {
                IpAddr::V4(addr) => Some((ClusterIpKey { addr: addr.octets() }, frontends)),
                IpAddr::V6(_) => None,
            },
            |&(addr, frontends)| match addr {
                IpAddr::V6(addr) => Some((ClusterIpKey { addr: addr.octets() }, frontends)),
                IpAddr::V4(_) => None,
            },
            update(fd(&self.cluster_ips), map_names::CLUSTER_IPS),
            update(fd(&self.cluster_ips6), map_names::CLUSTER_IPS6),
        )
    }

    fn delete_cluster_ips(&mut self, addrs: &[IpAddr]) -> Result<(), BatchError> {
        by_family(
            addrs,
            |addr| match addr {
                IpAddr::V4(addr) => Some((ClusterIpKey { addr: addr.octets() }, 0u32)),
                IpAddr::V6(_) => None,
            },
            |addr| match addr {
                IpAddr::V6(addr) => Some((ClusterIpKey { addr: addr.octets() }, 0u32)),
                IpAddr::V4(_) => None,
            },
            delete(fd(&self.cluster_ips), map_names::CLUSTER_IPS),
            delete(fd(&self.cluster_ips6), map_names::CLUSTER_IPS6),
        )
    }
}
