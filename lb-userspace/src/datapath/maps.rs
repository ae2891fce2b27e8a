//! Typed handles on the pinned maps: what the reconciler writes through and `status` reads.
use std::{
    mem::size_of,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::maps::{HashMap, Map, MapData, MapInfo, PerCpuArray};
use lb_common::{Backend, BackendId, CtEntry, CtKey, ServiceInfo, ServiceKey, SlotKey, Stat, map_names};

use crate::reconcile::{MapError, MapWriter, Programmed};

/// Key and value sizes each pinned map must have for this build of the datapath.
const LAYOUTS: [(&str, usize, usize); 5] = [
    (
        map_names::SERVICES,
        size_of::<ServiceKey>(),
        size_of::<ServiceInfo>(),
    ),
    (
        map_names::BACKEND_SLOTS,
        size_of::<SlotKey>(),
        size_of::<BackendId>(),
    ),
    (map_names::BACKENDS, size_of::<BackendId>(), size_of::<Backend>()),
    (map_names::CONNTRACK, size_of::<CtKey>(), size_of::<CtEntry>()),
    (map_names::STATS, size_of::<u32>(), size_of::<u64>()),
];

/// aya reuses a pinned map without checking its layout; a pin left by a build with other key or
/// value sizes is removed here so the loader creates a fresh map instead of misreading it.
pub fn drop_incompatible_pins(pin_dir: &Path) -> anyhow::Result<()> {
    for (name, key_size, value_size) in LAYOUTS {
        let path = pin_dir.join(name);
        let Ok(info) = MapInfo::from_pin(&path) else {
            continue;
        };
        if (info.key_size() as usize, info.value_size() as usize) != (key_size, value_size) {
            tracing::warn!(
                map = name,
                "pinned map has another layout; recreating it (its entries are lost)"
            );
            std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    Ok(())
}

pub struct ServiceMaps {
    pub services: HashMap<MapData, ServiceKey, ServiceInfo>,
    pub slots: HashMap<MapData, SlotKey, BackendId>,
    pub backends: HashMap<MapData, BackendId, Backend>,
    pub conntrack: HashMap<MapData, CtKey, CtEntry>,
    pub stats: PerCpuArray<MapData, u64>,
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
            stats: open(pin_dir, map_names::STATS)?.try_into()?,
        })
    }

    /// Everything the reconciler manages, as the kernel holds it now.
    pub fn read_programmed(&self) -> anyhow::Result<Programmed> {
        Ok(Programmed {
            services: self.services.iter().collect::<Result<_, _>>()?,
            slots: self.slots.iter().collect::<Result<_, _>>()?,
            backends: self.backends.iter().collect::<Result<_, _>>()?,
        })
    }

    /// A datapath counter summed over CPUs.
    pub fn stat(&self, stat: Stat) -> anyhow::Result<u64> {
        Ok(self.stats.get(&(stat as u32), 0)?.iter().sum())
    }
}

fn failed(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> MapError {
    move |error| MapError {
        map,
        message: error.to_string(),
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
}
