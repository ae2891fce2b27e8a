//! Typed handles on the pinned maps: what the reconciler writes through and `status` reads.
use std::{
    collections::BTreeMap,
    mem::size_of,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::maps::{
    Array, HashMap, HashOfMaps, Map, MapData, PerCpuArray, PerCpuHashMap,
    lpm_trie::{Key, LpmTrie},
};
use lb_common::{
    AffinityEntry, AffinityKey, Backend, BackendId, ClusterIpKey, CtEntry, CtKey, IPPROTO_TCP, IPPROTO_UDP,
    MAGLEV_TABLE_FLAGS, ServiceInfo, ServiceKey, ServiceStats, SlotKey, SourceRangeKey, Stat, config,
    map_names, service_flags,
};

use crate::reconcile::{MaglevInput, MapError, MapWriter, Programmed, SourceRange};

pub struct ServiceMaps {
    pub services: HashMap<MapData, ServiceKey, ServiceInfo>,
    pub slots: HashMap<MapData, SlotKey, BackendId>,
    pub backends: HashMap<MapData, BackendId, Backend>,
    pub conntrack: HashMap<MapData, CtKey, CtEntry>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityEntry>,
    pub stats: PerCpuArray<MapData, u64>,
    pub maglev: HashOfMaps<MapData, u32, Array<MapData, BackendId>>,
    pub node_addrs: HashMap<MapData, [u8; 4], u32>,
    pub snat_addrs: HashMap<MapData, u32, [u8; 4]>,
    pub source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    pub cluster_ips: HashMap<MapData, ClusterIpKey, u32>,
    pub service_stats: PerCpuHashMap<MapData, u32, ServiceStats>,
    pub config: Array<MapData, u64>,
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
            slots: open(pin_dir, map_names::BACKEND_SLOTS)?.try_into()?,
            backends: open(pin_dir, map_names::BACKENDS)?.try_into()?,
            conntrack: open(pin_dir, map_names::CONNTRACK)?.try_into()?,
            affinity: open(pin_dir, map_names::AFFINITY)?.try_into()?,
            stats: open(pin_dir, map_names::STATS)?.try_into()?,
            maglev: open(pin_dir, map_names::MAGLEV)?.try_into()?,
            node_addrs: open(pin_dir, map_names::NODE_ADDRS)?.try_into()?,
            snat_addrs: open(pin_dir, map_names::SNAT_ADDRS)?.try_into()?,
            source_ranges: open(pin_dir, map_names::SOURCE_RANGES)?.try_into()?,
            cluster_ips: open(pin_dir, map_names::CLUSTER_IPS)?.try_into()?,
            service_stats: open(pin_dir, map_names::SERVICE_STATS)?.try_into()?,
            config: open(pin_dir, map_names::CONFIG)?.try_into()?,
        })
    }

    /// Everything the reconciler manages, as the kernel holds it now.
    pub fn read_programmed(&self) -> anyhow::Result<Programmed> {
        let services: BTreeMap<ServiceKey, ServiceInfo> = self.services.iter().collect::<Result<_, _>>()?;
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
        Ok(Programmed {
            services,
            slots,
            backends: self.backends.iter().collect::<Result<_, _>>()?,
            maglev,
            source_ranges: self
                .source_ranges
                .keys()
                .map(|key| {
                    let key = key?;
                    let data = key.data();
                    Ok(SourceRange {
                        service_id: u32::from_be_bytes(data.service_id),
                        addr: data.addr,
                        prefix_len: (key.prefix_len() - 32) as u8,
                    })
                })
                .collect::<Result<_, aya::maps::MapError>>()?,
            cluster_ips: self
                .cluster_ips
                .iter()
                .map(|entry| entry.map(|(key, frontends)| (key.addr, frontends)))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Makes [`map_names::NODE_ADDRS`] hold exactly `addrs`, the node's IPv4 addresses.
    pub fn set_node_addrs(&mut self, addrs: &std::collections::BTreeSet<[u8; 4]>) -> anyhow::Result<()> {
        let held: Vec<[u8; 4]> = self.node_addrs.keys().collect::<Result<_, _>>()?;
        for addr in addrs {
            self.node_addrs.insert(addr, 0, 0)?;
        }
        for addr in held.iter().filter(|a| !addrs.contains(*a)) {
            self.node_addrs.remove(addr)?;
        }
        Ok(())
    }

    /// Makes [`map_names::SNAT_ADDRS`] hold exactly `addrs` (interface index → address).
    pub fn set_snat_addrs(&mut self, addrs: &BTreeMap<u32, [u8; 4]>) -> anyhow::Result<()> {
        let held: Vec<u32> = self.snat_addrs.keys().collect::<Result<_, _>>()?;
        for (index, addr) in addrs {
            self.snat_addrs.insert(index, addr, 0)?;
        }
        for index in held.iter().filter(|i| !addrs.contains_key(*i)) {
            self.snat_addrs.remove(index)?;
        }
        Ok(())
    }

    /// How many entries the conntrack map was created to hold (a pinned map keeps its size).
    pub fn conntrack_capacity(&self) -> anyhow::Result<u32> {
        Ok(aya::maps::IterableMap::map(&self.conntrack).info()?.max_entries())
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

/// `10.96.0.10:80/TCP`
pub fn frontend_text(key: &ServiceKey) -> String {
    let proto = if key.proto == IPPROTO_TCP { "TCP" } else { "UDP" };
    format!("{}:{}/{proto}", std::net::Ipv4Addr::from(key.addr), key.port)
}

/// The key a frontend of the model is programmed under: NodePorts carry the unspecified
/// address. `None` for what the maps cannot hold (IPv6).
pub fn frontend_key(frontend: &crate::model::Frontend) -> Option<ServiceKey> {
    let std::net::IpAddr::V4(address) = frontend.address else {
        return None;
    };
    Some(ServiceKey {
        addr: address.octets(),
        port: frontend.port,
        proto: match frontend.protocol {
            crate::model::Protocol::Tcp => IPPROTO_TCP,
            crate::model::Protocol::Udp => IPPROTO_UDP,
        },
        pad: 0,
    })
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

impl MapWriter for ServiceMaps {
    fn put_backend(&mut self, id: BackendId, backend: &Backend) -> Result<(), MapError> {
        self.backends
            .insert(id, backend, 0)
            .map_err(failed(map_names::BACKENDS))
    }

    fn put_slot(&mut self, key: SlotKey, id: BackendId) -> Result<(), MapError> {
        self.slots
            .insert(key, id, 0)
            .map_err(failed(map_names::BACKEND_SLOTS))
    }

    fn put_service(&mut self, key: ServiceKey, info: ServiceInfo) -> Result<(), MapError> {
        self.services
            .insert(key, info, 0)
            .map_err(failed(map_names::SERVICES))
    }

    fn delete_backend(&mut self, id: BackendId) -> Result<(), MapError> {
        self.backends.remove(&id).map_err(failed(map_names::BACKENDS))
    }

    fn delete_slot(&mut self, key: SlotKey) -> Result<(), MapError> {
        self.slots.remove(&key).map_err(failed(map_names::BACKEND_SLOTS))
    }

    fn delete_service(&mut self, key: ServiceKey) -> Result<(), MapError> {
        self.services.remove(&key).map_err(failed(map_names::SERVICES))
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
        self.source_ranges
            .insert(&source_range_key(range), 1, 0)
            .map_err(failed(map_names::SOURCE_RANGES))
    }

    fn delete_source_range(&mut self, range: SourceRange) -> Result<(), MapError> {
        self.source_ranges
            .remove(&source_range_key(range))
            .map_err(failed(map_names::SOURCE_RANGES))
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

    fn put_cluster_ip(&mut self, addr: [u8; 4], frontends: u32) -> Result<(), MapError> {
        self.cluster_ips
            .insert(ClusterIpKey { addr }, frontends, 0)
            .map_err(failed(map_names::CLUSTER_IPS))
    }

    fn delete_cluster_ip(&mut self, addr: [u8; 4]) -> Result<(), MapError> {
        self.cluster_ips
            .remove(&ClusterIpKey { addr })
            .map_err(failed(map_names::CLUSTER_IPS))
    }
}

/// The trie key: the service id's 32 bits, then the range's prefix.
fn source_range_key(range: SourceRange) -> Key<SourceRangeKey> {
    let data = SourceRangeKey {
        service_id: range.service_id.to_be_bytes(),
        addr: range.addr,
    };
    Key::new(32 + u32::from(range.prefix_len), data)
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
    let fd = aya::maps::IterableMap::map(array).fd().as_fd();
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
