//! Typed handles on the pinned maps: what the reconciler writes through and `status` reads. Each
//! map keyed or valued by an address has an IPv6 twin, named with a `6` here as in
//! `lb_common::map_names`; the reconciler's family-neutral entries go to the twin of their
//! address's family.
use std::{
    collections::{BTreeMap, BTreeSet},
    mem::size_of,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{
    Pod,
    maps::{
        Array, HashMap, HashOfMaps, IterableMap, Map, MapData, PerCpuArray, PerCpuHashMap,
        lpm_trie::{Key, LpmTrie},
    },
};
use lb_common::{
    Address, AffinityEntry, AffinityKey, Backend, BackendId, ClusterIpKey, CtEntry, CtKey, Ipv4, Ipv6,
    MAGLEV_TABLE_FLAGS, ServiceInfo, ServiceKey, ServiceStats, SlotKey, SourceRangeKey, Stat, config,
    ct_direction, map_names, service_flags,
};

use crate::reconcile::{
    BackendEntry, FrontendKey, MaglevInput, MapError, MapWriter, Programmed, SourceRange,
};

pub struct ServiceMaps {
    pub services: HashMap<MapData, ServiceKey, ServiceInfo>,
    pub services6: HashMap<MapData, ServiceKey<Ipv6>, ServiceInfo>,
    pub slots: HashMap<MapData, SlotKey, BackendId>,
    pub backends: HashMap<MapData, BackendId, Backend>,
    pub backends6: HashMap<MapData, BackendId, Backend<Ipv6>>,
    pub conntrack: HashMap<MapData, CtKey, CtEntry>,
    pub conntrack6: HashMap<MapData, CtKey<Ipv6>, CtEntry<Ipv6>>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityEntry>,
    pub affinity6: HashMap<MapData, AffinityKey<Ipv6>, AffinityEntry>,
    pub stats: PerCpuArray<MapData, u64>,
    pub maglev: HashOfMaps<MapData, u32, Array<MapData, BackendId>>,
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
            slots: open(pin_dir, map_names::BACKEND_SLOTS)?.try_into()?,
            backends: open(pin_dir, map_names::BACKENDS)?.try_into()?,
            backends6: open(pin_dir, map_names::BACKENDS6)?.try_into()?,
            conntrack: open(pin_dir, map_names::CONNTRACK)?.try_into()?,
            conntrack6: open(pin_dir, map_names::CONNTRACK6)?.try_into()?,
            affinity: open(pin_dir, map_names::AFFINITY)?.try_into()?,
            affinity6: open(pin_dir, map_names::AFFINITY6)?.try_into()?,
            stats: open(pin_dir, map_names::STATS)?.try_into()?,
            maglev: open(pin_dir, map_names::MAGLEV)?.try_into()?,
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
    pub fn services(&self) -> Result<BTreeMap<FrontendKey, ServiceInfo>, aya::maps::MapError> {
        let mut services = entries(&self.services, |key, info| (key.into(), info))?;
        services.extend(entries(&self.services6, |key, info| (key.into(), info))?);
        Ok(services)
    }

    /// The frontend `key`'s entry in its family's services map, if it has one.
    pub fn service(&self, key: &FrontendKey) -> Option<ServiceInfo> {
        match key.addr {
            IpAddr::V4(addr) => self.services.get(&key.service_key(addr.octets()), 0).ok(),
            IpAddr::V6(addr) => self.services6.get(&key.service_key(addr.octets()), 0).ok(),
        }
    }

    /// Everything the reconciler manages, in both families' maps, as the kernel holds it now.
    pub fn read_programmed(&self) -> anyhow::Result<Programmed> {
        let services = self.services()?;
        let slots: BTreeMap<SlotKey, BackendId> = self.slots.iter().collect::<Result<_, _>>()?;
        // A table in place was written whole from the service's backends and size (tables are
        // swapped in complete), so its input is known without reading its positions back. A
        // table of no service, or of one no longer using Maglev, gets an input that matches
        // nothing: the reconciler replaces or removes it.
        let mut maglev = BTreeMap::new();
        for service_id in self.maglev.keys() {
            let service_id = service_id?;
            let info = services
                .values()
                .find(|i| i.id == service_id && i.flags & service_flags::MAGLEV != 0);
            let input = info.map_or_else(MaglevInput::default, |info| {
                let mut backends: Vec<BackendId> = (0..info.backend_count)
                    .filter_map(|slot| slots.get(&SlotKey { service_id, slot }).copied())
                    .collect();
                backends.sort_unstable();
                MaglevInput {
                    size: info.maglev_table_size,
                    backends,
                }
            });
            maglev.insert(service_id, input);
        }
        let mut backends = entries(&self.backends, |id, backend| (id, backend.into()))?;
        backends.extend(entries(&self.backends6, |id, backend| (id, backend.into()))?);
        let mut source_ranges = read_source_ranges(&self.source_ranges)?;
        source_ranges.extend(read_source_ranges(&self.source_ranges6)?);
        let mut cluster_ips = entries(&self.cluster_ips, |key, frontends| (key.addr.into(), frontends))?;
        cluster_ips.extend(entries(&self.cluster_ips6, |key, frontends| {
            (key.addr.into(), frontends)
        })?);
        Ok(Programmed {
            services,
            slots,
            backends,
            maglev,
            source_ranges,
            cluster_ips,
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
fn entries<K: Pod, V: Pod, T: Ord, U>(
    map: &HashMap<MapData, K, V>,
    convert: impl Fn(K, V) -> (T, U),
) -> Result<BTreeMap<T, U>, aya::maps::MapError> {
    map.iter()
        .map(|entry| entry.map(|(k, v)| convert(k, v)))
        .collect()
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

fn insert<K: Pod, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    key: K,
    value: V,
    name: &'static str,
) -> Result<(), MapError> {
    map.insert(key, value, 0).map_err(failed(name))
}

fn remove<K: Pod, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    key: K,
    name: &'static str,
) -> Result<(), MapError> {
    map.remove(&key).map_err(failed(name))
}

/// Each write of an entry with an address goes to its family's twin map.
impl MapWriter for ServiceMaps {
    fn put_backend(&mut self, id: BackendId, backend: &BackendEntry) -> Result<(), MapError> {
        match backend.addr.ip() {
            IpAddr::V4(addr) => insert(
                &mut self.backends,
                id,
                backend.with_addr(addr.octets()),
                map_names::BACKENDS,
            ),
            IpAddr::V6(addr) => insert(
                &mut self.backends6,
                id,
                backend.with_addr(addr.octets()),
                map_names::BACKENDS6,
            ),
        }
    }

    fn put_slot(&mut self, key: SlotKey, id: BackendId) -> Result<(), MapError> {
        insert(&mut self.slots, key, id, map_names::BACKEND_SLOTS)
    }

    fn put_service(&mut self, key: FrontendKey, info: ServiceInfo) -> Result<(), MapError> {
        match key.addr {
            IpAddr::V4(addr) => insert(
                &mut self.services,
                key.service_key(addr.octets()),
                info,
                map_names::SERVICES,
            ),
            IpAddr::V6(addr) => insert(
                &mut self.services6,
                key.service_key(addr.octets()),
                info,
                map_names::SERVICES6,
            ),
        }
    }

    fn delete_backend(&mut self, id: BackendId, backend: &BackendEntry) -> Result<(), MapError> {
        match backend.addr {
            SocketAddr::V4(_) => remove(&mut self.backends, id, map_names::BACKENDS),
            SocketAddr::V6(_) => remove(&mut self.backends6, id, map_names::BACKENDS6),
        }
    }

    fn delete_slot(&mut self, key: SlotKey) -> Result<(), MapError> {
        remove(&mut self.slots, key, map_names::BACKEND_SLOTS)
    }

    fn delete_service(&mut self, key: FrontendKey) -> Result<(), MapError> {
        match key.addr {
            IpAddr::V4(addr) => remove(
                &mut self.services,
                key.service_key(addr.octets()),
                map_names::SERVICES,
            ),
            IpAddr::V6(addr) => remove(
                &mut self.services6,
                key.service_key(addr.octets()),
                map_names::SERVICES6,
            ),
        }
    }

    fn put_maglev(&mut self, service_id: u32, table: &[BackendId]) -> Result<(), MapError> {
        let inner = Array::<MapData, BackendId>::create(table.len() as u32, MAGLEV_TABLE_FLAGS)
            .map_err(failed(map_names::MAGLEV))?;
        fill_mmapped(&inner, table).map_err(|error| MapError {
            map: map_names::MAGLEV,
            message: format!("cannot fill a new table: {error}"),
        })?;
        // One update swaps the whole table: a packet sees the old table or the new one.
        self.maglev
            .insert(service_id, &inner, 0)
            .map_err(failed(map_names::MAGLEV))
    }

    fn delete_maglev(&mut self, service_id: u32) -> Result<(), MapError> {
        self.maglev.remove(&service_id).map_err(failed(map_names::MAGLEV))
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

    fn put_cluster_ip(&mut self, addr: IpAddr, frontends: u32) -> Result<(), MapError> {
        match addr {
            IpAddr::V4(addr) => insert(
                &mut self.cluster_ips,
                ClusterIpKey { addr: addr.octets() },
                frontends,
                map_names::CLUSTER_IPS,
            ),
            IpAddr::V6(addr) => insert(
                &mut self.cluster_ips6,
                ClusterIpKey { addr: addr.octets() },
                frontends,
                map_names::CLUSTER_IPS6,
            ),
        }
    }

    fn delete_cluster_ip(&mut self, addr: IpAddr) -> Result<(), MapError> {
        match addr {
            IpAddr::V4(addr) => remove(
                &mut self.cluster_ips,
                ClusterIpKey { addr: addr.octets() },
                map_names::CLUSTER_IPS,
            ),
            IpAddr::V6(addr) => remove(
                &mut self.cluster_ips6,
                ClusterIpKey { addr: addr.octets() },
                map_names::CLUSTER_IPS6,
            ),
        }
    }
}

/// Copies `table` into a fresh BPF_F_MMAPABLE array through a shared mapping: one pass instead
/// of a syscall per position.
fn fill_mmapped(array: &Array<MapData, BackendId>, table: &[BackendId]) -> nix::Result<()> {
    use std::{num::NonZeroUsize, os::fd::AsFd as _};

    use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

    // The kernel lays array elements out 8-byte aligned, whatever the value size.
    const STRIDE: usize = size_of::<BackendId>().next_multiple_of(8);
    const PAGE: usize = 4096;
    let Some(length) = NonZeroUsize::new((table.len() * STRIDE).next_multiple_of(PAGE)) else {
        return Ok(());
    };
    let fd = IterableMap::map(array).fd().as_fd();
    // SAFETY: a fresh shared mapping of the array's values, written within its length, unmapped
    // below and never aliased.
    unsafe {
        let base = mmap(
            None,
            length,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            fd,
            0,
        )?;
        let bytes = base.as_ptr().cast::<u8>();
        for (position, id) in table.iter().enumerate() {
            bytes
                .add(position * STRIDE)
                .cast::<BackendId>()
                .write_unaligned(*id);
        }
        munmap(base, length.get())
    }
}
