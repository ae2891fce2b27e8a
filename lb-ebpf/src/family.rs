//! What differs between IPv4 and IPv6, and nothing else: header layout and parsing, the reply
//! headers, and each family's twin maps. The datapath is written once over `A: Family` (the
//! address type itself, `Ipv4` or `Ipv6`), and every attach point dispatches on the EtherType.
use core::net::IpAddr;

use lb_common::{
    Address, IPPROTO_ICMP, IPPROTO_ICMPV6, Ipv4, Ipv6, ipv4_header, ipv6_header, pseudo_header_sum,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    context::Packet,
    maps::{
        Affinity, Backends, ClusterIps, Conntrack, Fragments, NodeAddrs, SB_AFFINITY, SB_AFFINITY6,
        SB_BACKENDS, SB_BACKENDS6, SB_CLUSTER_IPS, SB_CLUSTER_IPS6, SB_CONNTRACK, SB_CONNTRACK6,
        SB_FRAGMENTS, SB_FRAGMENTS6, SB_NODE_ADDRS, SB_NODE_ADDRS6, SB_SERVICES, SB_SERVICES6, SB_SNAT_ADDRS,
        SB_SNAT_ADDRS6, SB_SOCK_REVNAT, SB_SOCK_REVNAT6, SB_SOURCE_RANGES, SB_SOURCE_RANGES6, Services,
        SnatAddrs, SockRevNat, SourceRanges,
    },
    packet::{self, Network, Quoted},
};

pub trait Family: Address + Into<IpAddr> {
    /// The EtherType, as `EthHdr::ether_type` holds it.
    const ETHER_TYPE: u16;
    /// The address family number (AF_INET, AF_INET6), as `bpf_fib_lookup` takes it.
    const ADDRESS_FAMILY: u8;
    /// The fixed header's length (IPv4 without options, IPv6 without extension headers).
    const HEADER_LEN: usize;
    /// Where the addresses lie in a frame.
    const SRC_OFF: usize;
    const DST_OFF: usize;
    /// The header checksum, which covers the addresses: IPv4's. IPv6 has none.
    const HEADER_CHECKSUM_OFF: Option<usize>;
    /// ICMP or ICMPv6, and its port unreachable (type, code).
    const ICMP: u8;
    const PORT_UNREACHABLE: [u8; 2];
    /// How much of a refused datagram its port unreachable quotes at most: the IP header and 8
    /// bytes for IPv4 (RFC 792), as much as keeps the reply within the minimum MTU of 1280
    /// bytes for IPv6 (RFC 4443 §2.4).
    const QUOTE_MAX: usize;
    /// A reply's header, as built by [`Family::reply_header`].
    type Header: Copy;

    /// The network header of a frame of this family, if it is whole (it may be a fragment).
    fn parse_network(ctx: &impl Packet) -> Option<Network<Self>>;
    /// The header of the packet an ICMP error quotes at `at`.
    fn parse_quoted(ctx: &impl Packet, at: usize) -> Option<Quoted<Self>>;
    /// Whether an ICMP (ICMPv6) message of type `kind` is an error quoting a packet:
    /// destination unreachable, time exceeded, parameter problem, and IPv6's packet too big.
    fn is_icmp_error(kind: u8) -> bool;
    /// The header of a reply from `src` to `dst` carrying `payload_len` bytes of `proto`.
    fn reply_header(src: Self, dst: Self, proto: u8, payload_len: u16) -> Self::Header;
    /// What an ICMP checksum over `len` bytes from `src` to `dst` starts from: ICMPv6 covers a
    /// pseudo-header, ICMP does not.
    fn icmp_checksum_start(src: Self, dst: Self, len: u16) -> u32;

    fn services() -> &'static Services<Self>;
    fn backends() -> &'static Backends<Self>;
    fn conntrack() -> &'static Conntrack<Self>;
    fn affinity() -> &'static Affinity<Self>;
    fn cluster_ips() -> &'static ClusterIps<Self>;
    fn node_addrs() -> &'static NodeAddrs<Self>;
    fn snat_addrs() -> &'static SnatAddrs<Self>;
    fn source_ranges() -> &'static SourceRanges<Self>;
    fn sock_revnat() -> &'static SockRevNat<Self>;
    fn fragments() -> &'static Fragments<Self>;
}

/// The accessors of a family's twin maps.
macro_rules! twin_maps {
    ($($accessor:ident: $map_type:ident = $map:ident),* $(,)?) => {$(
        #[inline(always)]
        fn $accessor() -> &'static $map_type<Self> {
            &$map
        }
    )*};
}

impl Family for Ipv4 {
    const ETHER_TYPE: u16 = network_types::eth::EtherType::Ipv4 as u16;
    const ADDRESS_FAMILY: u8 = 2;
    const HEADER_LEN: usize = Ipv4Hdr::LEN;
    const SRC_OFF: usize = EthHdr::LEN + 12;
    const DST_OFF: usize = EthHdr::LEN + 16;
    const HEADER_CHECKSUM_OFF: Option<usize> = Some(EthHdr::LEN + 10);
    const ICMP: u8 = IPPROTO_ICMP;
    const PORT_UNREACHABLE: [u8; 2] = [3, 3];
    const QUOTE_MAX: usize = Ipv4Hdr::LEN + 8;
    type Header = [u8; 20];

    #[inline(always)]
    fn parse_network(ctx: &impl Packet) -> Option<Network<Self>> {
        packet::ipv4_network(ctx)
    }

    #[inline(always)]
    fn parse_quoted(ctx: &impl Packet, at: usize) -> Option<Quoted<Self>> {
        packet::ipv4_quoted(ctx, at)
    }

    #[inline(always)]
    fn is_icmp_error(kind: u8) -> bool {
        matches!(kind, 3 | 11 | 12)
    }

    #[inline(always)]
    fn reply_header(src: Self, dst: Self, proto: u8, payload_len: u16) -> Self::Header {
        ipv4_header(src, dst, proto, payload_len)
    }

    #[inline(always)]
    fn icmp_checksum_start(_: Self, _: Self, _: u16) -> u32 {
        0
    }

    twin_maps! {
        services: Services = SB_SERVICES,
        backends: Backends = SB_BACKENDS,
        conntrack: Conntrack = SB_CONNTRACK,
        affinity: Affinity = SB_AFFINITY,
        cluster_ips: ClusterIps = SB_CLUSTER_IPS,
        node_addrs: NodeAddrs = SB_NODE_ADDRS,
        snat_addrs: SnatAddrs = SB_SNAT_ADDRS,
        source_ranges: SourceRanges = SB_SOURCE_RANGES,
        sock_revnat: SockRevNat = SB_SOCK_REVNAT,
        fragments: Fragments = SB_FRAGMENTS,
    }
}

impl Family for Ipv6 {
    const ETHER_TYPE: u16 = network_types::eth::EtherType::Ipv6 as u16;
    const ADDRESS_FAMILY: u8 = 10;
    const HEADER_LEN: usize = Ipv6Hdr::LEN;
    const SRC_OFF: usize = EthHdr::LEN + 8;
    const DST_OFF: usize = EthHdr::LEN + 24;
    const HEADER_CHECKSUM_OFF: Option<usize> = None;
    const ICMP: u8 = IPPROTO_ICMPV6;
    const PORT_UNREACHABLE: [u8; 2] = [1, 4];
    const QUOTE_MAX: usize = 1280 - Ipv6Hdr::LEN - 8;
    type Header = [u8; 40];

    #[inline(always)]
    fn parse_network(ctx: &impl Packet) -> Option<Network<Self>> {
        packet::ipv6_network(ctx)
    }

    #[inline(always)]
    fn parse_quoted(ctx: &impl Packet, at: usize) -> Option<Quoted<Self>> {
        packet::ipv6_quoted(ctx, at)
    }

    #[inline(always)]
    fn is_icmp_error(kind: u8) -> bool {
        matches!(kind, 1..=4)
    }

    #[inline(always)]
    fn reply_header(src: Self, dst: Self, proto: u8, payload_len: u16) -> Self::Header {
        ipv6_header(src, dst, proto, payload_len)
    }

    #[inline(always)]
    fn icmp_checksum_start(src: Self, dst: Self, len: u16) -> u32 {
        pseudo_header_sum(src, dst, IPPROTO_ICMPV6, len)
    }

    twin_maps! {
        services: Services = SB_SERVICES6,
        backends: Backends = SB_BACKENDS6,
        conntrack: Conntrack = SB_CONNTRACK6,
        affinity: Affinity = SB_AFFINITY6,
        cluster_ips: ClusterIps = SB_CLUSTER_IPS6,
        node_addrs: NodeAddrs = SB_NODE_ADDRS6,
        snat_addrs: SnatAddrs = SB_SNAT_ADDRS6,
        source_ranges: SourceRanges = SB_SOURCE_RANGES6,
        sock_revnat: SockRevNat = SB_SOCK_REVNAT6,
        fragments: Fragments = SB_FRAGMENTS6,
    }
}
