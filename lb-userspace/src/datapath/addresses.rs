//! The node's IPv4 addresses, as the datapath needs them: every one of them answers NodePorts,
//! and a flow leaving an external interface for another node takes that interface's address.
use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;

use super::maps::ServiceMaps;

/// Interface index → its IPv4 addresses, in this network namespace.
pub fn ipv4_by_interface() -> anyhow::Result<BTreeMap<u32, Vec<[u8; 4]>>> {
    let mut addresses: BTreeMap<u32, Vec<[u8; 4]>> = BTreeMap::new();
    for entry in nix::ifaddrs::getifaddrs().context("cannot list the node's addresses")? {
        let Some(address) = entry.address.as_ref().and_then(|a| a.as_sockaddr_in()) else {
            continue;
        };
        let Ok(index) = nix::net::if_::if_nametoindex(entry.interface_name.as_str()) else {
            continue;
        };
        addresses.entry(index).or_default().push(address.ip().octets());
    }
    Ok(addresses)
}

/// Writes the node's addresses, and the source address of each of `external` (interface
/// indexes), into the maps.
pub fn program(maps: &mut ServiceMaps, external: impl IntoIterator<Item = u32>) -> anyhow::Result<()> {
    let by_interface = ipv4_by_interface()?;
    let node: BTreeSet<[u8; 4]> = by_interface.values().flatten().copied().collect();
    let snat: BTreeMap<u32, [u8; 4]> = external
        .into_iter()
        .filter_map(|index| Some((index, *by_interface.get(&index)?.first()?)))
        .collect();
    maps.set_node_addrs(&node)
        .context("cannot write the node's addresses")?;
    maps.set_snat_addrs(&snat)
        .context("cannot write the external interfaces' addresses")
}
