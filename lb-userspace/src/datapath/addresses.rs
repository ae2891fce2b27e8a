//! The node's addresses, as the datapath needs them: every one of them answers NodePorts, and a
//! flow leaving an external interface for another node takes that interface's address, of the
//! flow's family.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr},
};

use anyhow::Context as _;

use super::maps::ServiceMaps;

/// Interface index → its addresses of both families, in this network namespace, in the order
/// the kernel lists them.
pub fn by_interface() -> anyhow::Result<BTreeMap<u32, Vec<IpAddr>>> {
    let mut addresses: BTreeMap<u32, Vec<IpAddr>> = BTreeMap::new();
    for entry in nix::ifaddrs::getifaddrs().context("cannot list the node's addresses")? {
        let Some(address) = entry.address.as_ref() else {
            continue;
        };
        let address = match (address.as_sockaddr_in(), address.as_sockaddr_in6()) {
            (Some(v4), _) => IpAddr::V4(v4.ip()),
            (_, Some(v6)) => IpAddr::V6(v6.ip()),
            _ => continue,
        };
        let Ok(index) = nix::net::if_::if_nametoindex(entry.interface_name.as_str()) else {
            continue;
        };
        addresses.entry(index).or_default().push(address);
    }
    Ok(addresses)
}

/// A link-local IPv6 address (fe80::/10) is one on every link, of no use to reach the node from
/// elsewhere or to be answered at from another node.
fn is_link_local(address: &Ipv6Addr) -> bool {
    address.segments()[0] & 0xffc0 == 0xfe80
}

/// Whether NodePorts answer on `address`: any of the node's, but IPv6 link-local ones.
fn serves_node_ports(address: &IpAddr) -> bool {
    match address {
        IpAddr::V4(_) => true,
        IpAddr::V6(v6) => !is_link_local(v6),
    }
}

/// Whether a flow leaving for another node may take `address` as its source: for IPv6 a global
/// one (a link-local source would not be routed back).
fn routes_to_other_nodes(address: &IpAddr) -> bool {
    match address {
        IpAddr::V4(_) => true,
        IpAddr::V6(v6) => !v6.is_loopback() && !is_link_local(v6),
    }
}

/// The node's addresses of one family (those `from` gives as `A`), and the source address of
/// that family of each external interface that has one.
fn of_family<A: Ord>(
    by_interface: &BTreeMap<u32, Vec<IpAddr>>,
    external: &[u32],
    from: impl Fn(IpAddr) -> Option<A>,
) -> (BTreeSet<A>, BTreeMap<u32, A>) {
    let node = by_interface
        .values()
        .flatten()
        .filter(|a| serves_node_ports(a))
        .filter_map(|a| from(*a))
        .collect();
    let snat = external
        .iter()
        .filter_map(|index| {
            let addresses = by_interface.get(index)?;
            let source = addresses
                .iter()
                .filter(|a| routes_to_other_nodes(a))
                .find_map(|a| from(*a))?;
            Some((*index, source))
        })
        .collect();
    (node, snat)
}

/// Writes the node's addresses of both families, and the source address of each family of each
/// of `external` (interface indexes), into the maps.
pub fn program(maps: &mut ServiceMaps, external: impl IntoIterator<Item = u32>) -> anyhow::Result<()> {
    let by_interface = by_interface()?;
    let external: Vec<u32> = external.into_iter().collect();
    let (node4, snat4) = of_family(&by_interface, &external, |a| match a {
        IpAddr::V4(v4) => Some(v4.octets()),
        IpAddr::V6(_) => None,
    });
    let (node6, snat6) = of_family(&by_interface, &external, |a| match a {
        IpAddr::V4(_) => None,
        IpAddr::V6(v6) => Some(v6.octets()),
    });
    maps.set_node_addrs(&node4)
        .and_then(|()| maps.set_node_addrs(&node6))
        .context("cannot write the node's addresses")?;
    maps.set_snat_addrs(&snat4)
        .and_then(|()| maps.set_snat_addrs(&snat6))
        .context("cannot write the external interfaces' addresses")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn ipv6_link_local_addresses_neither_serve_node_ports_nor_source_nat() {
        let by_interface = BTreeMap::from([
            (1, vec![ip("127.0.0.1"), ip("::1")]),
            (
                2,
                vec![
                    ip("fe80::1"),
                    ip("192.168.50.2"),
                    ip("fd00:50::2"),
                    ip("2001:db8::2"),
                ],
            ),
            (3, vec![ip("febf::3"), ip("10.0.0.3")]),
            (4, vec![ip("fec0::4")]),
        ]);
        let (node6, snat6) = of_family(&by_interface, &[1, 2, 3, 4], |a| match a {
            IpAddr::V6(v6) => Some(v6),
            IpAddr::V4(_) => None,
        });
        assert_eq!(
            node6,
            BTreeSet::from(["::1", "fd00:50::2", "2001:db8::2", "fec0::4"].map(|a| a.parse().unwrap())),
            "fe80::/10 (fe80::1 to febf::3) is left out"
        );
        assert_eq!(
            snat6,
            BTreeMap::from([
                (2, "fd00:50::2".parse().unwrap()),
                (4, "fec0::4".parse().unwrap())
            ]),
            "the first global address of each interface that has one: none on loopback or a link with only a link-local one"
        );
        let (node4, snat4) = of_family(&by_interface, &[2, 3], |a| match a {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        });
        assert_eq!(node4.len(), 3, "every IPv4 address, 127.0.0.1 too: {node4:?}");
        assert_eq!(
            snat4,
            BTreeMap::from([
                (2, "192.168.50.2".parse().unwrap()),
                (3, "10.0.0.3".parse().unwrap())
            ])
        );
    }
}
