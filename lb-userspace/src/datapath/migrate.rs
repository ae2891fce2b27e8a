//! Pinned maps across datapath versions. aya reuses a pinned map without checking its layout, so
//! every pinned map is compared with this build's definition before loading. One whose key or
//! value size or capacity differs is replaced by a new map; for the maps whose entries are state
//! the datapath cannot rebuild (conntrack, affinity) or that the agent recovers its ids from
//! (services, backends, slots), the entries are carried over: converted from the old layout when
//! it is a known earlier one, copied as they are when only the capacity changed.
//!
//! The old map is renamed `<name>-old` rather than removed, so a crash or a failed load in
//! between loses nothing: whatever `-old` pin is found after loading is carried into its
//! successor, and removed once the new programs are attached ([`carry_over`] with
//! [`Finish::Yes`]), which also picks up what the old programs wrote in the meantime.
use std::{
    mem::size_of,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::maps::{MapData, MapInfo, lpm_trie::Key};
use lb_common::{
    AffinityEntry, AffinityKey, Backend, BackendId, ClusterIpKey, CtEntry, CtKey, FragmentKey, FragmentPorts,
    Ipv4, Ipv6, ServiceInfo, ServiceKey, ServiceStats, SlotKey, SockRevEntry, SockRevKey, SourceRangeKey,
    Stat, capacity, map_names,
};

use super::{Capacity, raw};

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
}

/// `ServiceInfo` grew by appended fields, each meaning "not used" when zero: 12 bytes (id,
/// backend count, flags) before Maglev, 16 (+ table size) before session affinity.
const SERVICES_OLDER: &[Older] = &[
    Older {
        key_size: size_of::<ServiceKey>(),
        value_size: 12,
        convert: zero_extended::<{ size_of::<ServiceInfo>() }>,
    },
    Older {
        key_size: size_of::<ServiceKey>(),
        value_size: 16,
        convert: zero_extended::<{ size_of::<ServiceInfo>() }>,
    },
];

/// The value with zeroes appended up to `SIZE` bytes; the key as it is.
fn zero_extended<const SIZE: usize>(key: &[u8], value: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut value = value.to_vec();
    value.resize(SIZE, 0);
    Some((key.to_vec(), value))
}

/// Every pinned map, each IPv6 twin beside its IPv4 map and carried alike (a twin has no earlier
/// layout: it is as old as this one).
fn layouts(capacity: Capacity) -> [Layout; map_names::ALL.len()] {
    let plain = |name, key_size, value_size| Layout {
        name,
        key_size,
        value_size,
        carried: None,
        exact_entries: None,
    };
    let carried = |name, key_size, value_size, max_entries, older| Layout {
        name,
        key_size,
        value_size,
        carried: Some((max_entries, older)),
        exact_entries: None,
    };
    [
        carried(
            map_names::SERVICES,
            size_of::<ServiceKey>(),
            size_of::<ServiceInfo>(),
            capacity.services,
            SERVICES_OLDER,
        ),
        carried(
            map_names::SERVICES6,
            size_of::<ServiceKey<Ipv6>>(),
            size_of::<ServiceInfo>(),
            capacity.services,
            &[],
        ),
        carried(
            map_names::BACKEND_SLOTS,
            size_of::<SlotKey>(),
            size_of::<BackendId>(),
            capacity.backend_slots,
            &[],
        ),
        carried(
            map_names::BACKENDS,
            size_of::<BackendId>(),
            size_of::<Backend>(),
            capacity.backends,
            &[],
        ),
        carried(
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
        plain(map_names::MAGLEV, size_of::<u32>(), size_of::<u32>()),
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
        plain(
            map_names::CLUSTER_IPS,
            size_of::<ClusterIpKey>(),
            size_of::<u32>(),
        ),
        plain(
            map_names::CLUSTER_IPS6,
            size_of::<ClusterIpKey<Ipv6>>(),
            size_of::<u32>(),
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
        if same_layout && info.max_entries() == max_entries {
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
    Ok(())
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
        assert_eq!(layout(map_names::SOURCE_RANGES6).key_size, 4 + 20);
    }
}
