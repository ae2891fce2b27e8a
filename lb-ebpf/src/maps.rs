//! The maps, declared with BTF so `bpftool map dump` prints field names. The agent pins each one
//! under its own name; see `lb_common::map_names`. Each map keyed or valued by an address has an
//! IPv6 twin named with a `6`, of the same generic type over `Ipv6`.
use aya_ebpf::{
    bindings::{BPF_F_INNER_MAP, BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, BPF_NOEXIST},
    btf_maps::{Array, ArrayOfMaps, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap},
    macros::btf_map,
};
use lb_common::{
    AffinityEntry, AffinityKey, BACKEND_TABLES_FLAGS, Backend, BackendId, ClusterIpKey, CtEntry, CtKey,
    FragmentKey, FragmentPorts, Ipv4, Ipv6, RejectBucket, RejectLimit, ServiceInfo, ServiceKey, ServiceStats,
    SockRevEntry, SockRevKey, SourceRangeKey, Stat, TablePair, capacity, config,
};

use crate::source_check::VerifiedSource;

const _: () = assert!(BACKEND_TABLES_FLAGS == BPF_F_INNER_MAP | BPF_F_MMAPABLE);

/// The maps the agent fills with Services are not preallocated: their memory follows the
/// cluster's size, and their capacity (a flag) costs a hash bucket per entry.
const GROWING: usize = BPF_F_NO_PREALLOC as usize;

// The twin maps' types: one generic type per map, over the address of its family.
pub type Services<A> = HashMap<ServiceKey<A>, ServiceInfo, { capacity::SERVICES as usize }, GROWING>;
pub type Backends<A> = HashMap<BackendId, Backend<A>, { capacity::BACKENDS as usize }, GROWING>;
pub type Conntrack<A> = LruHashMap<CtKey<A>, CtEntry<A>, { capacity::CONNTRACK as usize }>;
pub type Affinity<A> = LruHashMap<AffinityKey<A>, AffinityEntry, { capacity::AFFINITY as usize }>;
pub type ClusterIps<A> = HashMap<ClusterIpKey<A>, u32, { capacity::SERVICES as usize }, GROWING>;
pub type NodeAddrs<A> = HashMap<A, u32, { capacity::NODE_ADDRS as usize }>;
pub type SnatAddrs<A> = HashMap<u32, A, { capacity::SNAT_ADDRS as usize }>;
pub type SourceRanges<A> = LpmTrie<SourceRangeKey<A>, u8, { capacity::SOURCE_RANGES as usize }>;
pub type SockRevNat<A> = LruHashMap<SockRevKey<A>, SockRevEntry<A>, { capacity::SOCK_REVNAT as usize }>;
pub type Fragments<A> = LruHashMap<FragmentKey<A>, FragmentPorts, { capacity::FRAGMENTS as usize }>;

/// Frontend (ClusterIP:port/proto) → service.
#[btf_map]
pub static SB_SERVICES: Services<Ipv4> = HashMap::new();
#[btf_map]
pub static SB_SERVICES6: Services<Ipv6> = HashMap::new();

/// Backend id → address, port and owning backend set.
#[btf_map]
pub static SB_BACKENDS: Backends<Ipv4> = HashMap::new();
#[btf_map]
pub static SB_BACKENDS6: Backends<Ipv6> = HashMap::new();

/// Both directions of every service flow. LRU: when full, the least recently used flow is
/// forgotten instead of refusing a new one.
#[btf_map]
pub static SB_CONNTRACK: Conntrack<Ipv4> = LruHashMap::new();
#[btf_map]
pub static SB_CONNTRACK6: Conntrack<Ipv6> = LruHashMap::new();

/// Every backend set's table, at the position its `BackendSet` says: the ids of its backends
/// (the slots of random choice), then its Maglev table (hash position → backend id). One flat
/// array of position pairs, held in slot 0 of an array of maps so the agent can swap in a larger
/// one as the cluster grows (BPF_F_INNER_MAP: of another size than this template). The agent
/// writes a changed table to free positions and then points the frontends at it, so a packet
/// always sees a complete one; BPF_F_MMAPABLE lets it write them through a shared mapping.
#[btf_map]
pub static SB_BACKEND_TABLES: ArrayOfMaps<Array<TablePair, 1, { BACKEND_TABLES_FLAGS as usize }>, 1> =
    ArrayOfMaps::new();

/// The backend id at `position` of the table space, if it has one.
#[inline(always)]
pub fn table_entry(position: u32) -> Option<BackendId> {
    let pair = SB_BACKEND_TABLES.get_value(0, &(position >> 1))?;
    Some(pair[(position & 1) as usize])
}

/// (service id, client address) → the backend the client sticks to, for services with session
/// affinity. LRU: a forgotten client just gets a backend chosen anew.
#[btf_map]
pub static SB_AFFINITY: Affinity<Ipv4> = LruHashMap::new();
#[btf_map]
pub static SB_AFFINITY6: Affinity<Ipv6> = LruHashMap::new();

/// Every ClusterIP (→ its number of frontends), whatever the port.
#[btf_map]
pub static SB_CLUSTER_IPS: ClusterIps<Ipv4> = HashMap::new();
#[btf_map]
pub static SB_CLUSTER_IPS6: ClusterIps<Ipv6> = HashMap::new();

/// The rate limit of RST/ICMP replies, written by the agent at start (all zero: none).
#[btf_map]
pub static SB_REJECT_LIMIT: Array<RejectLimit, 1> = Array::new();

/// Each CPU's token bucket: per CPU, so that refusing a flood costs no shared cache line.
#[btf_map]
pub static SB_REJECT_TOKENS: PerCpuArray<RejectBucket, 1> = PerCpuArray::new();

/// This node's IPv4 addresses (value unused): a NodePort frontend, keyed with address 0.0.0.0,
/// answers on any of them.
#[btf_map]
pub static SB_NODE_ADDRS: NodeAddrs<Ipv4> = HashMap::new();
#[btf_map]
pub static SB_NODE_ADDRS6: NodeAddrs<Ipv6> = HashMap::new();

/// External interface index → the address a flow leaving through it for a backend on another
/// node takes as its source.
#[btf_map]
pub static SB_SNAT_ADDRS: SnatAddrs<Ipv4> = HashMap::new();
#[btf_map]
pub static SB_SNAT_ADDRS6: SnatAddrs<Ipv6> = HashMap::new();

/// (service id, client prefix) → allowed, for LoadBalancer frontends with source ranges.
#[btf_map]
pub static SB_SOURCE_RANGES: SourceRanges<Ipv4> = LpmTrie::new();
#[btf_map]
pub static SB_SOURCE_RANGES6: SourceRanges<Ipv6> = LpmTrie::new();

/// (socket cookie, backend) → the frontend a socket of the node asked for, so its peer and the
/// sources of its datagrams read as the service. LRU: sockets come and go without telling.
#[btf_map]
pub static SB_SOCK_REVNAT: SockRevNat<Ipv4> = LruHashMap::new();
#[btf_map]
pub static SB_SOCK_REVNAT6: SockRevNat<Ipv6> = LruHashMap::new();

/// A fragmented datagram (addresses, protocol, fragment id) → the ports its first fragment
/// carries, for its later fragments (see `fragment`). LRU: datagrams come and go without telling.
#[btf_map]
pub static SB_FRAGMENTS: Fragments<Ipv4> = LruHashMap::new();
#[btf_map]
pub static SB_FRAGMENTS6: Fragments<Ipv6> = LruHashMap::new();

/// Each CPU's sources lately found to route back out of their pod interface (slot: interface
/// index modulo the slots): see `source_check`.
#[btf_map]
pub static SB_VERIFIED_SOURCES: PerCpuArray<VerifiedSource, { VERIFIED_SOURCE_SLOTS as usize }> =
    PerCpuArray::new();
pub const VERIFIED_SOURCE_SLOTS: u32 = 64;

/// Settings the agent writes, indexed by `lb_common::config`.
#[btf_map]
pub static SB_CONFIG: Array<u64, { config::LEN as usize }> = Array::new();

/// Per-CPU datapath counters, indexed by `Stat`.
#[btf_map]
pub static SB_STATS: PerCpuArray<u64, { Stat::COUNT as usize }> = PerCpuArray::new();

#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(counter) = SB_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot; nothing else on this CPU runs while this program does.
        unsafe { *counter += 1 };
    }
}

/// Service id → per-CPU traffic counters. Not preallocated: an entry per CPU for every possible
/// service would cost megabytes per CPU up front.
#[btf_map]
pub static SB_SERVICE_STATS: PerCpuHashMap<
    u32,
    ServiceStats,
    { capacity::SERVICE_STATS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = PerCpuHashMap::new();

/// This CPU's counters of `service_id`, created on the service's first packet (the kernel
/// zeroes the other CPUs' copies).
#[inline(always)]
fn service_stats(service_id: u32) -> Option<*mut ServiceStats> {
    if let Some(stats) = SB_SERVICE_STATS.get_ptr_mut(service_id) {
        return Some(stats);
    }
    // NOEXIST: when another CPU creates the entry at the same moment, its count is kept.
    let _ = SB_SERVICE_STATS.insert(service_id, ServiceStats::default(), u64::from(BPF_NOEXIST));
    SB_SERVICE_STATS.get_ptr_mut(service_id)
}

/// A packet of `bytes` DNATed to one of the service's backends.
#[inline(always)]
pub fn count_service_packet(service_id: u32, bytes: u32) {
    if let Some(stats) = service_stats(service_id) {
        // SAFETY: per-CPU value; nothing else on this CPU runs while this program does.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += u64::from(bytes);
        }
    }
}

/// A flow given one of the service's backends.
#[inline(always)]
pub fn count_service_flow(service_id: u32) {
    if let Some(stats) = service_stats(service_id) {
        // SAFETY: as above.
        unsafe { (*stats).new_flows += 1 };
    }
}

/// A backend's reply of `bytes` translated back to the service's frontend.
#[inline(always)]
pub fn count_service_reply(service_id: u32, bytes: u32) {
    if let Some(stats) = service_stats(service_id) {
        // SAFETY: as above.
        unsafe {
            (*stats).reply_packets += 1;
            (*stats).reply_bytes += u64::from(bytes);
        }
    }
}
