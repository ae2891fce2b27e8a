//! The contract between the datapath (`lb-ebpf`) and the agent (`lb-userspace`).
//!
//! Every map type here is `#[repr(C)]`, has no implicit padding (explicit `pad` fields instead),
//! and is read by both sides. Addresses are stored as network-order byte arrays and ports as
//! host-order `u16`, so `bpftool map dump` prints `addr: [10,96,0,10]` and `port: 80`.
//!
//! IPv4 and IPv6 have twin maps (`SB_SERVICES` and `SB_SERVICES6`, …) whose keys and values are
//! the same generic types over the [`Address`] they hold, so the datapath's logic is written once
//! for both families and an IPv4-only node pays nothing for IPv6 entries. Service ids, backend
//! set and backend ids, backend tables and counters are one space shared by both families.
#![no_std]

mod checksum;
mod conntrack;
mod fragment;
mod hash;
mod reject;
mod reply;
mod sctp;
mod service;
mod sock;
mod stats;

pub use checksum::*;
pub use conntrack::*;
pub use fragment::*;
pub use hash::*;
pub use reject::*;
pub use reply::*;
pub use sctp::*;
pub use service::*;
pub use sock::*;
pub use stats::*;

/// Where the agent pins the maps unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/switchboard";

/// An IPv4 address as the maps store it (network order).
pub type Ipv4 = [u8; 4];
/// An IPv6 address as the maps store it (network order).
pub type Ipv6 = [u8; 16];

/// The address of one family, as the maps store it: [`Ipv4`] or [`Ipv6`].
pub trait Address:
    Copy + Default + Eq + Ord + core::hash::Hash + core::fmt::Debug + AsRef<[u8]> + 'static
{
    /// Bytes that keep a struct of (12 bytes of fields, one address, then a `u64`) free of
    /// implicit padding: none after an IPv4 address, 4 after an IPv6 one.
    type Pad: Copy + Default + Eq + Ord + core::hash::Hash + core::fmt::Debug + 'static;
    /// The unspecified address (`0.0.0.0`, `::`), which keys NodePort frontends.
    const UNSPECIFIED: Self;
    /// The source a pod sees on a connection to itself through its own Service (hairpin).
    const HAIRPIN: Self;
}

impl Address for Ipv4 {
    type Pad = [u8; 0];
    const UNSPECIFIED: Self = [0; 4];
    const HAIRPIN: Self = HAIRPIN_ADDR;
}

impl Address for Ipv6 {
    type Pad = [u8; 4];
    const UNSPECIFIED: Self = [0; 16];
    const HAIRPIN: Self = HAIRPIN_ADDR6;
}

/// The IPv4 source a pod sees on a connection to itself through its own Service (hairpin): its
/// own address would make it drop the packets as martians. Link-local, so never a real peer.
pub const HAIRPIN_ADDR: Ipv4 = [169, 254, 42, 1];

/// The IPv6 hairpin source: `100::2a01`, from the discard-only prefix `100::/64` (RFC 6666),
/// so never a real peer, yet reached through the pod's default route (a link-local address
/// would be resolved on the pod's own link and never reach the host).
pub const HAIRPIN_ADDR6: Ipv6 = [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x2a, 0x01];

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;

/// Names of the maps, which are also the names they are pinned under. A name ending in `6` is
/// the IPv6 twin of the map without it.
pub mod map_names {
    pub const SERVICES: &str = "SB_SERVICES";
    pub const SERVICES6: &str = "SB_SERVICES6";
    pub const BACKENDS: &str = "SB_BACKENDS";
    pub const BACKENDS6: &str = "SB_BACKENDS6";
    pub const CONNTRACK: &str = "SB_CONNTRACK";
    pub const CONNTRACK6: &str = "SB_CONNTRACK6";
    pub const STATS: &str = "SB_STATS";
    /// Every backend set's table: its backends' ids, then its Maglev table (an array of maps
    /// holding one growable array, see `lb_common::TablePair`).
    pub const BACKEND_TABLES: &str = "SB_BACKEND_TABLES";
    pub const AFFINITY: &str = "SB_AFFINITY";
    pub const AFFINITY6: &str = "SB_AFFINITY6";
    pub const NODE_ADDRS: &str = "SB_NODE_ADDRS";
    pub const NODE_ADDRS6: &str = "SB_NODE_ADDRS6";
    pub const SNAT_ADDRS: &str = "SB_SNAT_ADDRS";
    pub const SNAT_ADDRS6: &str = "SB_SNAT_ADDRS6";
    pub const SOURCE_RANGES: &str = "SB_SOURCE_RANGES";
    pub const SOURCE_RANGES6: &str = "SB_SOURCE_RANGES6";
    pub const SERVICE_STATS: &str = "SB_SERVICE_STATS";
    pub const SOCK_REVNAT: &str = "SB_SOCK_REVNAT";
    pub const SOCK_REVNAT6: &str = "SB_SOCK_REVNAT6";
    pub const CONFIG: &str = "SB_CONFIG";
    pub const CLUSTER_IPS: &str = "SB_CLUSTER_IPS";
    pub const CLUSTER_IPS6: &str = "SB_CLUSTER_IPS6";
    pub const FRAGMENTS: &str = "SB_FRAGMENTS";
    pub const FRAGMENTS6: &str = "SB_FRAGMENTS6";
    /// The rate limit of RST/ICMP replies (written by the agent at start; not pinned).
    pub const REJECT_LIMIT: &str = "SB_REJECT_LIMIT";
    /// Per-CPU token buckets of that limit (not pinned).
    pub const REJECT_TOKENS: &str = "SB_REJECT_TOKENS";
    /// The maps pinned under their names.
    pub const ALL: [&str; 24] = [
        SERVICES,
        SERVICES6,
        BACKENDS,
        BACKENDS6,
        CONNTRACK,
        CONNTRACK6,
        STATS,
        BACKEND_TABLES,
        AFFINITY,
        AFFINITY6,
        NODE_ADDRS,
        NODE_ADDRS6,
        SNAT_ADDRS,
        SNAT_ADDRS6,
        SOURCE_RANGES,
        SOURCE_RANGES6,
        SERVICE_STATS,
        SOCK_REVNAT,
        SOCK_REVNAT6,
        CONFIG,
        CLUSTER_IPS,
        CLUSTER_IPS6,
        FRAGMENTS,
        FRAGMENTS6,
    ];
}

/// The datapath's log levels, numbered as aya-log numbers them.
pub mod log_level {
    pub const OFF: u64 = 0;
    pub const ERROR: u64 = 1;
    pub const WARN: u64 = 2;
    pub const INFO: u64 = 3;
    pub const DEBUG: u64 = 4;
    pub const TRACE: u64 = 5;
}

/// Names of the programs in the object file. The packet programs take both families; the socket
/// hooks are per family, as the kernel's attach types are.
pub mod program_names {
    /// TC ingress on a pod's host-side interface: traffic leaving the pod.
    pub const FROM_POD: &str = "from_pod";
    /// TC egress on a pod's host-side interface: traffic entering the pod.
    pub const TO_POD: &str = "to_pod";
    /// XDP on an external interface: traffic from outside the node to NodePorts, LoadBalancer
    /// IPs and externalIPs (the fast path; what it passes, `NODEPORT_TC` sees next).
    pub const NODEPORT_XDP: &str = "nodeport";
    /// TC ingress on an external interface: the same as `NODEPORT_XDP`, for what XDP passed or
    /// where XDP is not attached, plus refusing connections to frontends without endpoints.
    pub const NODEPORT_TC: &str = "nodeport_tc";
    /// TC egress on an external interface: source NAT of flows leaving for a backend on another
    /// node, and the frontend restored as the source of replies to external clients.
    pub const NODEPORT_EGRESS: &str = "nodeport_egress";
    /// cgroup connect4: a socket of the node connecting to a service gets a backend instead, once
    /// per connection rather than per packet.
    pub const SOCK_CONNECT: &str = "sock_connect";
    /// cgroup sendmsg4: the same for each datagram of an unconnected UDP socket.
    pub const SOCK_SENDMSG: &str = "sock_sendmsg";
    /// cgroup recvmsg4: a datagram from a backend is shown as coming from the service.
    pub const SOCK_RECVMSG: &str = "sock_recvmsg";
    /// cgroup getpeername4: a connected socket's peer is shown as the service.
    pub const SOCK_GETPEERNAME: &str = "sock_getpeername";
    /// The IPv6 twins (connect6, sendmsg6, recvmsg6, getpeername6). An IPv4-mapped address
    /// (`::ffff:10.96.0.10`) on a dual-stack socket is served from the IPv4 maps.
    pub const SOCK_CONNECT6: &str = "sock_connect6";
    pub const SOCK_SENDMSG6: &str = "sock_sendmsg6";
    pub const SOCK_RECVMSG6: &str = "sock_recvmsg6";
    pub const SOCK_GETPEERNAME6: &str = "sock_getpeername6";
    /// Every socket hook, both families'.
    pub const SOCKET: [&str; 8] = [
        SOCK_CONNECT,
        SOCK_SENDMSG,
        SOCK_RECVMSG,
        SOCK_GETPEERNAME,
        SOCK_CONNECT6,
        SOCK_SENDMSG6,
        SOCK_RECVMSG6,
        SOCK_GETPEERNAME6,
    ];
}

/// Indexes of [`map_names::CONFIG`], an array of `u64` the agent (and `switchboard log-level`)
/// writes and the programs read on each use, so a change takes effect at once.
pub mod config {
    /// The network namespace (cookie) whose sockets the socket programs translate: the node's.
    /// Zero: none.
    pub const NETNS_COOKIE: u32 = 0;
    /// The most verbose [`crate::log_level`] the datapath logs at; 0 (the default) logs nothing.
    pub const LOG_LEVEL: u32 = 1;
    /// The next backend id the agent gives out, and the next service id: kept here, not
    /// derived from the ids in the maps, so that an id is never handed out twice (until the
    /// counter wraps), not even by an agent restarted after the entry that had it was deleted.
    /// A conntrack entry may still name it, and would follow it to whatever got it next.
    pub const NEXT_BACKEND_ID: u32 = 2;
    pub const NEXT_SERVICE_ID: u32 = 3;
    /// Non-zero: `from_pod` drops a pod's packets that would open, close or create a service
    /// flow from a source that does not route back out of the pod's interface (see
    /// `switchboard run --source-check`). Zero (a datapath loaded without the agent): no check.
    pub const SOURCE_CHECK: u32 = 4;
    pub const LEN: u32 = 8;
}

/// Default map capacities, the same for each family's twin; the agent overrides them at load
/// time from its flags.
pub mod capacity {
    /// Frontends, and ClusterIPs. Not preallocated: an entry costs memory once it is used, the
    /// capacity only a hash bucket (16 bytes) per entry.
    pub const SERVICES: u32 = 262_144;
    /// Backend entries (an endpoint of a backend set), per family; not preallocated either.
    pub const BACKENDS: u32 = 4 * SERVICES;
    pub const CONNTRACK: u32 = 262_144;
    pub const AFFINITY: u32 = 65_536;
    pub const NODE_ADDRS: u32 = 256;
    pub const SNAT_ADDRS: u32 = 256;
    pub const SOURCE_RANGES: u32 = 16_384;
    /// One entry per service id that saw traffic; allocated on first use, not up front.
    pub const SERVICE_STATS: u32 = SERVICES;
    pub const SOCK_REVNAT: u32 = 65_536;
    /// Datagrams in flight whose first fragment was seen, per family (as Cilium's default).
    pub const FRAGMENTS: u32 = 8_192;
}

#[cfg(feature = "user")]
mod pod_impls {
    use super::*;

    // SAFETY: all of these are #[repr(C)] with explicit padding (`Address::Pad` included), so
    // every bit pattern is valid and no byte is uninitialised.
    macro_rules! pod_for_both_families {
        ($($ty:ident),* $(,)?) => {$(
            unsafe impl aya::Pod for $ty<Ipv4> {}
            unsafe impl aya::Pod for $ty<Ipv6> {}
        )*};
    }
    pod_for_both_families!(
        ServiceKey,
        Backend,
        CtKey,
        CtEntry,
        AffinityKey,
        SourceRangeKey,
        SockRevKey,
        SockRevEntry,
        ClusterIpKey,
        FragmentKey,
    );
    unsafe impl aya::Pod for ServiceInfo {}
    unsafe impl aya::Pod for BackendSet {}
    unsafe impl aya::Pod for AffinityEntry {}
    unsafe impl aya::Pod for ServiceStats {}
    unsafe impl aya::Pod for RejectLimit {}
    unsafe impl aya::Pod for RejectBucket {}
    unsafe impl aya::Pod for FragmentPorts {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    /// The IPv4 layouts are those earlier builds pinned (pinned maps are reused across
    /// upgrades); the IPv6 twins add no implicit padding.
    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 8);
        assert_eq!(size_of::<ServiceKey<Ipv6>>(), 20);
        assert_eq!(size_of::<BackendSet>(), 16);
        assert_eq!(size_of::<ServiceInfo>(), 12 + 2 * 16);
        assert_eq!(size_of::<AffinityKey>(), 8);
        assert_eq!(size_of::<AffinityKey<Ipv6>>(), 20);
        assert_eq!(size_of::<AffinityEntry>(), 16);
        assert_eq!(size_of::<Backend>(), 12);
        assert_eq!(size_of::<Backend<Ipv6>>(), 24);
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(size_of::<CtKey<Ipv6>>(), 40);
        assert_eq!(size_of::<CtEntry>(), 24);
        assert_eq!(size_of::<CtEntry<Ipv6>>(), 40);
        assert_eq!(size_of::<ServiceStats>(), 40);
        assert_eq!(size_of::<SockRevKey>(), 16);
        assert_eq!(size_of::<SockRevKey<Ipv6>>(), 32);
        assert_eq!(size_of::<SockRevEntry>(), 8);
        assert_eq!(size_of::<SockRevEntry<Ipv6>>(), 20);
        assert_eq!(size_of::<SourceRangeKey>(), 8);
        assert_eq!(size_of::<SourceRangeKey<Ipv6>>(), 20);
        assert_eq!(size_of::<ClusterIpKey<Ipv6>>(), 16);
        assert_eq!(size_of::<FragmentKey>(), 16);
        assert_eq!(size_of::<FragmentKey<Ipv6>>(), 40);
        assert_eq!(size_of::<FragmentPorts>(), 4);
    }
}
