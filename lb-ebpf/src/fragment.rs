//! Fragmented datagrams, as Cilium handles them: only the first fragment carries the transport
//! header, so its ports are remembered under the datagram's identity (addresses, protocol,
//! fragment id), and each later fragment is given them when it comes. With its ports a later
//! fragment takes the same path through conntrack and NAT as the first; only its addresses are
//! rewritten, its bytes being payload.
//!
//! Every program remembers every first fragment it parses, service traffic or not, as it sees
//! it (a program downstream of a translation keys the datagram by its translated addresses). A
//! later fragment whose first fragment was not seen (it came first, or the entry was evicted)
//! has no ports: it passes untouched and is counted. Its datagram is lost, since the first
//! fragment, translated, no longer matches it at reassembly, as it would be lost had the first
//! fragment been dropped; a datagram that is not service traffic still reassembles.
use lb_common::{FragmentKey, FragmentPorts, Stat};

use crate::{family::Family, maps::count, packet::Network};

/// A fragment's place in its datagram.
#[derive(Clone, Copy)]
pub struct Fragment {
    /// IPv4's 16-bit identification, or IPv6's 32-bit one.
    pub id: u32,
    /// The fragment at offset 0, which holds the transport header.
    pub first: bool,
}

#[inline(always)]
fn key<A: Family>(network: &Network<A>, fragment: Fragment) -> FragmentKey<A> {
    FragmentKey {
        src_addr: network.src_addr,
        dst_addr: network.dst_addr,
        id: fragment.id,
        proto: network.proto,
        pad: [0; 3],
    }
}

/// Remembers the ports of the datagram whose first fragment this is. An older datagram's entry
/// under the same identity (its id reused) is replaced.
#[inline(always)]
pub fn remember<A: Family>(network: &Network<A>, fragment: Fragment, src_port: [u8; 2], dst_port: [u8; 2]) {
    let ports = FragmentPorts {
        src_port: u16::from_be_bytes(src_port),
        dst_port: u16::from_be_bytes(dst_port),
    };
    // LRU: a full map forgets the oldest datagrams, long reassembled or lost.
    let _ = A::fragments().insert(key(network, fragment), ports, 0);
}

/// The (source, destination) ports of the datagram this later fragment belongs to.
#[inline(always)]
pub fn ports<A: Family>(network: &Network<A>, fragment: Fragment) -> Option<(u16, u16)> {
    // SAFETY: copied out at once.
    let Some(ports) = (unsafe { A::fragments().get(key(network, fragment)).copied() }) else {
        count(Stat::FragmentWithoutFirst);
        return None;
    };
    Some((ports.src_port, ports.dst_port))
}
