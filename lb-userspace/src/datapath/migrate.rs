//! Pinned maps across datapath versions. aya reuses a pinned map without checking its layout, so
//! every pinned map is compared with this build's definition before loading. One whose key or
//! value size, capacity or flags differ is replaced by a new map; for the maps whose entries are
//! state the datapath cannot rebuild (conntrack, affinity) or that the agent recovers its ids
//! from (services, backends), the entries are carried over: converted from the old layout when
//! it is a known earlier one, copied as they are when only the capacity changed.
//!
//! The old map is renamed `<name>-old` rather than removed, so a crash or a failed load in
//! between loses nothing: whatever `-old` pin is found after loading is carried into its
//! successor, and removed once the new programs are attached ([`carry_over`] with
//! [`Finish::Yes`]), which also picks up what the old programs wrote in the meantime.
//!
//! Services of the layout before backend sets (a 20-byte `ServiceInfo` whose backends sat in
//! `SB_BACKEND_SLOTS` and whose Maglev table was an array of its own in `SB_MAGLEV`) become
//! frontends whose backend set has the service's id (the owner their backends' entries already
//! name) and a table in the table space holding the same slots and the same Maglev table, so
//! live flows keep resolving and new ones are balanced as before until the agent's first pass.
use std::{
    mem::size_of,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::maps::{Array, HashOfMaps, Map, MapData, MapInfo, lpm_trie::Key};
use lb_common::{
    AffinityEntry, AffinityKey, Backend, BackendId, BackendSet, ClusterIpKey, CtEntry, CtKey, FragmentKey,
    FragmentPorts, Ipv4, Ipv6, ServiceInfo, ServiceKey, ServiceStats, SockRevEntry, SockRevKey,
    SourceRangeKey, Stat, capacity, map_names,
};

use super::{Capacity, raw, tables::TableSpaceMap};

/// The maps of the layout before backend sets, which no build pins any more: read by the
/// services' conversion, unpinned once the new programs are attached.
pub mod retired {
    /// (service id, slot) → backend id.
    pub const BACKEND_SLOTS: &str = "SB_BACKEND_SLOTS";
    /// Service id → its Maglev table (a hash of maps of `u32` arrays).
    pub const MAGLEV: &str = "SB_MAGLEV";
    pub const ALL: [&str; 2] = [BACKEND_SLOTS, MAGLEV];
}

/// Map flag: not preallocated (the maps the agent fills with Services).
const BPF_F_NO_PREALLOC: u32 = 1;

/// Turns an entry of an earlier layout into this build's; `None` drops it.
type Convert = fn(key: &[u8], value: &[u8]) -> Option<(Vec<u8>, Vec<u8>)>;

/// A layout an earlier build pinned a map with.
struct Older {
    key_size: usize,
    value_size: usize,
    convert: Convert,
}

/// A map as this build defines it.
struct Layout {
    name: &'static str,
    key_size: usize,
    value_size: usize,
    /// `Some` for maps whose entries are carried into a replacement: the capacity this build
    /// wants (a pinned map of another capacity is replaced too), and the earlier layouts its
    /// entries can be converted from. `None`: a replacement starts empty, and the agent refills
    /// it (addresses, Maglev tables, source ranges) or it restarts counting (counters).
    carried: Option<(u32, &'static [Older])>,
    /// For a map not carried: the capacity it must have, if a different one makes it unusable
    /// (the counters array grows with each new counter).
    exact_entries: Option<u32>,
    /// For a carried map: the flags it is created with (another value: replaced, and carried).
    flags: u32,
}

/// `ServiceInfo` before backend sets grew by appended fields, each meaning "not used" when zero:
/// 12 bytes (id, backend count, flags) before Maglev, 16 (+ table size) before session affinity,
/// 20 (+ affinity timeout) until backend sets. Converted by [`carry_services`], not entry by entry.
const SERVICE_VALUE_SIZES_BEFORE_SETS: [usize; 3] = [12, 16, 20];

/// Accepted as an earlier layout of the services maps; never called: [`carry_services`]
/// converts them as a whole.
fn converted_as_a_whole(_: &[u8], _: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    None
}

const SERVICES_OLDER: &[Older] = &[
    Older {
        key_size: size_of::<ServiceKey>(),
        value_size: SERVICE_VALUE_SIZES_BEFORE_SETS[0],
        convert: converted_as_a_whole,
    },
    Older {
        key_size: size_of::<ServiceKey>(),
        value_size: SERVICE_VALUE_SIZES_BEFORE_SETS[1],
        convert: converted_as_a_whole,
    },
    Older {
        key_size: size_of::<ServiceKey>(),
        value_size: SERVICE_VALUE_SIZES_BEFORE_SETS[2],
        convert: converted_as_a_whole,
    },
];

const SERVICES6_OLDER: &[Older] = &[Older {
    key_size: size_of::<ServiceKey<Ipv6>>(),
    value_size: SERVICE_VALUE_SIZES_BEFORE_SETS[2],
    convert: converted_as_a_whole,
}];

/// Every pinned map, each IPv6 twin beside its IPv4 map and carried alike (a twin has no earlier
/// layout: it is as old as this one).
fn layouts(capacity: Capacity) -> [Layout; map_names::ALL.len()] {
    let plain = |name, key_size, value_size| Layout {
        name,
        key_size,
        value_size,
        carried: None,
        exact_entries: None,
        flags: 0,
    };
    let carried = |name, key_size, value_size, max_entries, older| Layout {
        name,
        key_size,
        value_size,
        carried: Some((max_entries, older)),
        exact_entries: None,
        flags: 0,
    };
    // Not preallocated: the maps the agent fills with Services.
    let growing = |name, key_size, value_size, max_entries, older| Layout {
        flags: BPF_F_NO_PREALLOC,
        ..carried(name, key_size, value_size, max_entries, older)
    };
    [
        growing(
            map_names::SERVICES,
            size_of::<ServiceKey>(),
            size_of::<ServiceInfo>(),
            capacity.services,
            SERVICES_OLDER,
        ),
        growing(
            map_names::SERVICES6,
            size_of::<ServiceKey<Ipv6>>(),
            size_of::<ServiceInfo>(),
            capacity.services,
            SERVICES6_OLDER,
        ),
        growing(
            map_names::BACKENDS,
            size_of::<BackendId>(),
            size_of::<Backend>(),
            capacity.backends,
            &[],
        ),
        growing(
            map_names::BACKENDS6,
            size_of::<BackendId>(),
            size_of::<Backend<Ipv6>>(),
            capacity.backends,
            &[],
        ),
        carried(
            map_names::CONNTRACK,
            size_of::<CtKey>(),
            size_of::<CtEntry>(),
            capacity.conntrack,
            &[],
        ),
        carried(
            map_names::CONNTRACK6,
            size_of::<CtKey<Ipv6>>(),
            size_of::<CtEntry<Ipv6>>(),
            capacity.conntrack,
            &[],
        ),
        carried(
            map_names::AFFINITY,
            size_of::<AffinityKey>(),
            size_of::<AffinityEntry>(),
            capacity::AFFINITY,
            &[],
        ),
        carried(
            map_names::AFFINITY6,
            size_of::<AffinityKey<Ipv6>>(),
            size_of::<AffinityEntry>(),
            capacity::AFFINITY,
            &[],
        ),
        carried(
            map_names::SOCK_REVNAT,
            size_of::<SockRevKey>(),
            size_of::<SockRevEntry>(),
            capacity::SOCK_REVNAT,
            &[],
        ),
        carried(
            map_names::SOCK_REVNAT6,
            size_of::<SockRevKey<Ipv6>>(),
            size_of::<SockRevEntry<Ipv6>>(),
            capacity::SOCK_REVNAT,
            &[],
        ),
        Layout {
            exact_entries: Some(Stat::COUNT),
            ..plain(map_names::STATS, size_of::<u32>(), size_of::<u64>())
        },
        plain(map_names::BACKEND_TABLES, size_of::<u32>(), size_of::<u32>()),
        plain(map_names::NODE_ADDRS, size_of::<Ipv4>(), size_of::<u32>()),
        plain(map_names::NODE_ADDRS6, size_of::<Ipv6>(), size_of::<u32>()),
        plain(map_names::SNAT_ADDRS, size_of::<u32>(), size_of::<Ipv4>()),
        plain(map_names::SNAT_ADDRS6, size_of::<u32>(), size_of::<Ipv6>()),
        plain(
            map_names::SOURCE_RANGES,
            size_of::<Key<SourceRangeKey>>(),
            size_of::<u8>(),
        ),
        plain(
            map_names::SOURCE_RANGES6,
            size_of::<Key<SourceRangeKey<Ipv6>>>(),
            size_of::<u8>(),
        ),
        plain(
            map_names::SERVICE_STATS,
            size_of::<u32>(),
            size_of::<ServiceStats>(),
        ),
        plain(map_names::CONFIG, size_of::<u32>(), size_of::<u64>()),
        growing(
            map_names::CLUSTER_IPS,
            size_of::<ClusterIpKey>(),
            size_of::<u32>(),
            capacity.services,
            &[],
        ),
        growing(
            map_names::CLUSTER_IPS6,
            size_of::<ClusterIpKey<Ipv6>>(),
            size_of::<u32>(),
            capacity.services,
            &[],
        ),
        // Datagrams in flight for a few milliseconds: a replacement starts empty.
        plain(
            map_names::FRAGMENTS,
            size_of::<FragmentKey>(),
            size_of::<FragmentPorts>(),
        ),
        plain(
            map_names::FRAGMENTS6,
            size_of::<FragmentKey<Ipv6>>(),
            size_of::<FragmentPorts>(),
        ),
    ]
}

fn old_pin(pin_dir: &Path, name: &str) -> PathBuf {
    pin_dir.join(format!("{name}-old"))
}

/// Before loading: moves aside (entries to be carried over) or removes (entries lost) every
/// pinned map that this build's datapath cannot use as it is.
pub fn set_aside(pin_dir: &Path, capacity: Capacity) -> anyhow::Result<()> {
    for layout in layouts(capacity) {
        let path = pin_dir.join(layout.name);
        let Ok(info) = MapInfo::from_pin(&path) else {
            continue;
        };
        let sizes = (info.key_size() as usize, info.value_size() as usize);
        let same_layout = sizes == (layout.key_size, layout.value_size);
        let Some((max_entries, older)) = layout.carried else {
            let entries_differ = layout.exact_entries.is_some_and(|n| n != info.max_entries());
            if !same_layout || entries_differ {
                tracing::warn!(
                    map = layout.name,
                    "pinned map has another layout; recreating it (the agent refills it)"
                );
                remove(&path)?;
            }
            continue;
        };
        if same_layout && info.max_entries() == max_entries && info.map_flags() == layout.flags {
            continue;
        }
        let known = same_layout || older.iter().any(|o| (o.key_size, o.value_size) == sizes);
        if !known {
            tracing::warn!(
                map = layout.name,
                key_size = sizes.0,
                value_size = sizes.1,
                "pinned map has a layout this version cannot convert; recreating it (its entries are lost)"
            );
            remove(&path)?;
            continue;
        }
        let aside = old_pin(pin_dir, layout.name);
        if aside.exists() {
            // An earlier migration that never finished: its map was carried already.
            remove(&aside)?;
        }
        std::fs::rename(&path, &aside).with_context(|| format!("cannot move {} aside", path.display()))?;
        tracing::info!(
            map = layout.name,
            key_size = sizes.0,
            value_size = sizes.1,
            max_entries = info.max_entries(),
            "pinned map has an earlier layout or capacity; its entries move to a new map"
        );
    }
    Ok(())
}

/// Whether [`carry_over`] is the last pass, removing the old maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// Copy, and keep the old maps: the old programs may still be writing to them.
    No,
    /// Copy what is still missing, then unpin the old maps.
    Yes,
}

/// After loading: writes the entries of every map set aside into the new map pinned in its
/// place, converted to this build's layout. Entries already in the new map are kept.
pub fn carry_over(pin_dir: &Path, finish: Finish) -> anyhow::Result<()> {
    for layout in layouts(Capacity::default()) {
        let Some((_, older)) = layout.carried else {
            continue;
        };
        let aside = old_pin(pin_dir, layout.name);
        let Ok(old) = MapData::from_pin(&aside) else {
            continue;
        };
        let info = old.info()?;
        let sizes = (info.key_size() as usize, info.value_size() as usize);
        let services = [map_names::SERVICES, map_names::SERVICES6].contains(&layout.name);
        if services && sizes.1 != layout.value_size {
            carry_services(pin_dir, layout.name, &old, sizes)
                .with_context(|| format!("cannot convert the old {}", layout.name))?;
            if finish == Finish::Yes {
                remove(&aside)?;
            }
            continue;
        }
        let convert: Convert = if sizes == (layout.key_size, layout.value_size) {
            |key, value| Some((key.to_vec(), value.to_vec()))
        } else if let Some(o) = older.iter().find(|o| (o.key_size, o.value_size) == sizes) {
            o.convert
        } else {
            tracing::warn!(
                map = layout.name,
                "no conversion from the old layout; dropping it"
            );
            remove(&aside)?;
            continue;
        };
        let new = MapData::from_pin(pin_dir.join(layout.name))
            .with_context(|| format!("cannot open the new {}", layout.name))?;
        let entries = raw::entries(old.fd().as_fd(), sizes.0, sizes.1)
            .with_context(|| format!("cannot read the old {}", layout.name))?;
        let (mut carried, mut refused) = (0, 0);
        for (key, value) in &entries {
            let Some((key, value)) = convert(key, value) else {
                continue;
            };
            match raw::update(new.fd().as_fd(), &key, &value, raw::BPF_NOEXIST) {
                Ok(()) => carried += 1,
                Err(error) if error.raw_os_error() == Some(libc::EEXIST) => {}
                // A smaller map that is full: the rest cannot be kept.
                Err(_) => refused += 1,
            }
        }
        if refused > 0 {
            tracing::warn!(
                map = layout.name,
                carried,
                refused,
                "the new map refused entries of the old one (too small?)"
            );
        } else if carried > 0 || finish == Finish::No {
            tracing::info!(map = layout.name, carried, "entries carried into the new map");
        }
        if finish == Finish::Yes {
            remove(&aside)?;
        }
    }
    if finish == Finish::Yes {
        for name in retired::ALL {
            let path = pin_dir.join(name);
            if path.exists() {
                remove(&path)?;
                tracing::info!(
                    map = name,
                    "a map of an earlier layout is no longer used; unpinned"
                );
            }
        }
    }
    Ok(())
}

/// Converts the services of `old` (a services map of the layout before backend sets, of
/// `sizes`) into frontends of the map pinned as `name`, each with a backend set of its id whose
/// table (its slots, then its Maglev table) is written into the table space. Frontends already
/// converted are left alone.
fn carry_services(pin_dir: &Path, name: &str, old: &MapData, sizes: (usize, usize)) -> anyhow::Result<()> {
    let new = MapData::from_pin(pin_dir.join(name))?;
    let entries = raw::entries(old.fd().as_fd(), sizes.0, sizes.1)?;
    let slots: std::collections::HashMap<(u32, u32), BackendId> =
        match MapData::from_pin(pin_dir.join(retired::BACKEND_SLOTS)) {
            Ok(slots) => raw::entries(slots.fd().as_fd(), 8, 4)?
                .into_iter()
                .map(|(key, value)| ((word(&key, 0), word(&key, 1)), word(&value, 0)))
                .collect(),
            Err(_) => Default::default(),
        };
    let maglev: Option<HashOfMaps<MapData, u32, Array<MapData, u32>>> =
        match MapData::from_pin(pin_dir.join(retired::MAGLEV)) {
            Ok(data) => Some(Map::HashOfMaps(data).try_into()?),
            Err(_) => None,
        };
    let outer = MapData::from_pin(pin_dir.join(map_names::BACKEND_TABLES))?;
    let mut tables = TableSpaceMap::new(Map::ArrayOfMaps(outer).try_into()?)?;
    let mut converted: Vec<(Vec<u8>, ServiceInfo)> = Vec::new();
    let mut blocks: Vec<(u32, Vec<BackendId>)> = Vec::new();
    let mut next = tables.capacity();
    for (key, value) in entries {
        let mut value = value;
        value.resize(20, 0);
        let [id, count, flags, maglev_size, affinity_timeout_s] = [0, 1, 2, 3, 4].map(|i| word(&value, i));
        // The slots in order, as far as they go.
        let mut ids: Vec<BackendId> = (0..count)
            .map_while(|slot| slots.get(&(id, slot)).copied())
            .collect();
        let mut set = BackendSet {
            id,
            count: ids.len() as u32,
            table: 0,
            maglev_size: 0,
        };
        // Bit 1 was the Maglev flag.
        if flags & 1 != 0
            && maglev_size > 0
            && !ids.is_empty()
            && let Some(table) = maglev.as_ref().and_then(|m| old_maglev_table(m, id, maglev_size))
        {
            ids.extend(table);
            set.maglev_size = maglev_size;
        }
        if !ids.is_empty() {
            set.table = next;
            next += ids.len() as u32;
            blocks.push((set.table, ids));
        }
        let info = ServiceInfo {
            id,
            flags: flags & !1,
            affinity_timeout_s,
            backends: set,
            outside: set,
        };
        converted.push((key, info));
    }
    if next > tables.capacity() {
        tables.grow(next.next_multiple_of(1024))?;
    }
    let positions: Vec<(u32, u32)> = blocks
        .iter()
        .map(|(start, ids)| (*start, ids.len() as u32))
        .collect();
    tables.write(&positions, &|index, to| to.copy_from_slice(&blocks[index].1))?;
    let mut carried = 0;
    for (key, info) in &converted {
        // SAFETY: ServiceInfo is repr(C) without implicit padding.
        let value = unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(info).cast::<u8>(), size_of::<ServiceInfo>())
        };
        match raw::update(new.fd().as_fd(), key, value, raw::BPF_NOEXIST) {
            Ok(()) => carried += 1,
            Err(error) if error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(error) => return Err(error.into()),
        }
    }
    if carried > 0 {
        tracing::info!(
            map = name,
            carried,
            "services converted to frontends with backend sets"
        );
    }
    Ok(())
}

/// The `index`th native-endian `u32` of `bytes`.
fn word(bytes: &[u8], index: usize) -> u32 {
    u32::from_ne_bytes(bytes[4 * index..4 * index + 4].try_into().expect("4 bytes"))
}

/// Service `id`'s Maglev table of `size` positions in the retired `SB_MAGLEV`, if whole: read
/// through a mapping (those tables were BPF_F_MMAPABLE arrays, a `u32` every 8 bytes).
fn old_maglev_table(
    maglev: &HashOfMaps<MapData, u32, Array<MapData, u32>>,
    id: u32,
    size: u32,
) -> Option<Vec<BackendId>> {
    use std::num::NonZeroUsize;

    use aya::maps::IterableMap as _;
    use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

    const STRIDE: usize = 8;
    let table = maglev.get(&id, 0).ok()?;
    if table.len() < size {
        return None;
    }
    let length = NonZeroUsize::new((size as usize * STRIDE).next_multiple_of(4096))?;
    // SAFETY: a fresh read-only shared mapping of the array's values, read within its length
    // and unmapped below.
    unsafe {
        let base = mmap(
            None,
            length,
            ProtFlags::PROT_READ,
            MapFlags::MAP_SHARED,
            table.map().fd().as_fd(),
            0,
        )
        .ok()?;
        let bytes = base.as_ptr().cast::<u8>();
        let ids = (0..size as usize)
            .map(|position| bytes.add(position * STRIDE).cast::<BackendId>().read_unaligned())
            .collect();
        let _ = munmap(base, length.get());
        Some(ids)
    }
}

fn remove(path: &Path) -> anyhow::Result<()> {
    std::fs::remove_file(path).with_context(|| format!("cannot remove {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pinned map without a layout here would be reused whatever its key and value sizes.
    #[test]
    fn every_pinned_map_has_one_layout() {
        let mut described: Vec<&str> = layouts(Capacity::default()).iter().map(|l| l.name).collect();
        let mut pinned = map_names::ALL.to_vec();
        described.sort_unstable();
        pinned.sort_unstable();
        assert_eq!(described, pinned);
    }

    /// Each IPv6 twin is carried (or refilled) as its IPv4 map is, at the same capacity.
    #[test]
    fn ipv6_twins_are_carried_as_their_ipv4_maps() {
        let layouts = layouts(Capacity::default());
        let layout = |name: &str| layouts.iter().find(|l| l.name == name).unwrap();
        for name in map_names::ALL.iter().filter(|name| name.ends_with('6')) {
            let ipv4 = layout(name.trim_end_matches('6'));
            let ipv6 = layout(name);
            assert_eq!(
                ipv6.carried.map(|(entries, _)| entries),
                ipv4.carried.map(|(entries, _)| entries),
                "{name}"
            );
        }
        assert_eq!(layout(map_names::CONNTRACK6).key_size, 40);
        assert_eq!(
            layout(map_names::SERVICES6).flags,
            layout(map_names::SERVICES).flags
        );
        assert_eq!(layout(map_names::SOURCE_RANGES6).key_size, 4 + 20);
    }
}
