//! How much kernel memory the pinned maps take, as the kernel accounts it (`bpftool map show`'s
//! `memlock`): for a map that is not preallocated, what its entries take now.
use std::{os::fd::AsFd as _, path::Path};

use aya::maps::{ArrayOfMaps, Map, MapData};
use lb_common::map_names;

use super::{raw, tables::TableSpaceMap};

/// One map's memory.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MapMemory {
    pub map: &'static str,
    pub bytes: u64,
}

/// Every pinned map's memory under `pin_dir`, the table space (held by
/// [`map_names::BACKEND_TABLES`], not pinned itself) counted with it. Maps that are not pinned
/// (the rate limiter's, the log ring) are left out: a few pages.
pub fn usage(pin_dir: &Path) -> anyhow::Result<Vec<MapMemory>> {
    let mut usage = Vec::with_capacity(map_names::ALL.len());
    for map in map_names::ALL {
        let data = MapData::from_pin(pin_dir.join(map))?;
        let mut bytes = raw::memlock(data.fd().as_fd())?;
        if map == map_names::BACKEND_TABLES {
            let outer: ArrayOfMaps<MapData, _> = Map::ArrayOfMaps(data).try_into()?;
            bytes += TableSpaceMap::new(outer)?.memory()?;
        }
        usage.push(MapMemory { map, bytes });
    }
    Ok(usage)
}
