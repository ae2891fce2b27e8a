//! The contract between the datapath (`lb-ebpf`) and the agent (`lb-userspace`).
//!
//! Every type here is `#[repr(C)]`, has no implicit padding (explicit `pad` fields instead), and is
//! read by both sides. Addresses are stored as network-order byte arrays and ports as host-order
//! `u16`, so `bpftool map dump` prints `addr: [10,96,0,10]` and `port: 80`.
#![no_std]

/// Where the agent pins the maps unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/switchboard";

/// Names of the maps, which are also the names they are pinned under.
pub mod map_names {
    pub const SERVICES: &str = "SB_SERVICES";
    pub const BACKEND_SLOTS: &str = "SB_BACKEND_SLOTS";
    pub const BACKENDS: &str = "SB_BACKENDS";
    pub const CONNTRACK: &str = "SB_CONNTRACK";
    pub const STATS: &str = "SB_STATS";
    pub const MAGLEV: &str = "SB_MAGLEV";
    pub const AFFINITY: &str = "SB_AFFINITY";
    pub const NODE_ADDRS: &str = "SB_NODE_ADDRS";
    pub const SNAT_ADDRS: &str = "SB_SNAT_ADDRS";
    pub const SOURCE_RANGES: &str = "SB_SOURCE_RANGES";
    pub const SERVICE_STATS: &str = "SB_SERVICE_STATS";
    pub const SOCK_REVNAT: &str = "SB_SOCK_REVNAT";
    pub const CONFIG: &str = "SB_CONFIG";
    pub const CLUSTER_IPS: &str = "SB_CLUSTER_IPS";
    /// The rate limit of RST/ICMP replies (written by the agent at start; not pinned).
    pub const REJECT_LIMIT: &str = "SB_REJECT_LIMIT";
    /// Per-CPU token buckets of that limit (not pinned).
    pub const REJECT_TOKENS: &str = "SB_REJECT_TOKENS";
    /// The maps pinned under their names.
    pub const ALL: [&str; 14] = [
        SERVICES,
        BACKEND_SLOTS,
        BACKENDS,
        CONNTRACK,
        STATS,
        MAGLEV,
        AFFINITY,
        NODE_ADDRS,
        SNAT_ADDRS,
        SOURCE_RANGES,
        SERVICE_STATS,
        SOCK_REVNAT,
        CONFIG,
        CLUSTER_IPS,
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

/// Names of the programs in the object file.
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
    pub const SOCKET: [&str; 4] = [SOCK_CONNECT, SOCK_SENDMSG, SOCK_RECVMSG, SOCK_GETPEERNAME];
}

/// Indexes of [`map_names::CONFIG`], an array of `u64` the agent (and `switchboard log-level`)
/// writes and the programs read on each use, so a change takes effect at once.
pub mod config {
    /// The network namespace (cookie) whose sockets the socket programs translate: the node's.
    /// Zero: none.
    pub const NETNS_COOKIE: u32 = 0;
    /// The most verbose [`crate::log_level`] the datapath logs at; 0 (the default) logs nothing.
    pub const LOG_LEVEL: u32 = 1;
    pub const LEN: u32 = 8;
}

/// Default map capacities; the agent may override them at load time.
pub mod capacity {
    pub const SERVICES: u32 = 65_536;
    pub const BACKENDS: u32 = 262_144;
    pub const BACKEND_SLOTS: u32 = 262_144;
    pub const CONNTRACK: u32 = 262_144;
    pub const AFFINITY: u32 = 65_536;
    pub const NODE_ADDRS: u32 = 256;
    pub const SNAT_ADDRS: u32 = 256;
    pub const SOURCE_RANGES: u32 = 16_384;
    /// One entry per service id that saw traffic; allocated on first use, not up front.
    pub const SERVICE_STATS: u32 = SERVICES;
    pub const SOCK_REVNAT: u32 = 65_536;
}

/// A backend a socket of the node was sent to: (socket cookie, backend address and port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    pub cookie: u64,
    pub addr: [u8; 4],
    pub port: u16,
    pub pad: u16,
}

/// The service frontend that socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevEntry {
    pub addr: [u8; 4],
    pub port: u16,
    pub pad: u16,
}

/// Maglev lookup table size unless configured otherwise: a prime, so every backend's permutation
/// visits every position; 100× the backend count keeps each backend within a few percent of its
/// share.
pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 16_381;

/// Flags of every Maglev table (inner map): BPF_F_INNER_MAP (sizes may differ from the
/// template's) | BPF_F_MMAPABLE (filled through one mapping). The kernel requires the same flags
/// on every inner map.
pub const MAGLEV_TABLE_FLAGS: u32 = (1 << 12) | (1 << 10);

/// The source a pod sees on a connection to itself through its own Service (hairpin): its own
/// address would make it drop the packets as martians. Link-local, so never a real peer.
pub const HAIRPIN_ADDR: [u8; 4] = [169, 254, 42, 1];

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// A service frontend as a packet addresses it: destination address, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: [u8; 4],
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

/// What the datapath knows of a frontend. Written last on add and first on delete, so a packet
/// that finds it also finds `backend_count` valid slots.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Stable id, chosen by the agent; keys the slots and is recorded in conntrack.
    pub id: u32,
    /// Slots `0..backend_count` in [`map_names::BACKEND_SLOTS`] are valid. Zero: no endpoints.
    pub backend_count: u32,
    /// [`service_flags`].
    pub flags: u32,
    /// With [`service_flags::MAGLEV`]: the size of the service's table in [`map_names::MAGLEV`].
    pub maglev_table_size: u32,
    /// With [`service_flags::AFFINITY`]: how long a client sticks to its backend after its last
    /// new connection, in seconds.
    pub affinity_timeout_s: u32,
}

/// A ClusterIP, whatever the port: the key of [`map_names::CLUSTER_IPS`], whose value is how
/// many frontends the address has. A packet to a ClusterIP on a port no frontend defines is
/// refused like one to a closed port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterIpKey {
    pub addr: [u8; 4],
}

pub mod service_flags {
    /// Choose backends by Maglev consistent hashing of the flow instead of at random.
    pub const MAGLEV: u32 = 1;
    /// `sessionAffinity: ClientIP`: a client's new connections go to the backend its previous
    /// ones went to, while that one serves and the timeout has not run out.
    pub const AFFINITY: u32 = 2;
    /// An external frontend (NodePort, LoadBalancer IP, externalIP) with
    /// `externalTrafficPolicy: Cluster`: a flow that leaves the node for a backend elsewhere
    /// takes the node's address as its source, so the reply comes back through this node.
    pub const EXTERNAL_SNAT: u32 = 4;
    /// An external frontend with `externalTrafficPolicy: Local`: the client address is kept,
    /// only this node's endpoints serve, and without one the traffic is dropped (not refused),
    /// so a load balancer's health check steers clients elsewhere.
    pub const EXTERNAL_LOCAL: u32 = 8;
    /// A LoadBalancer frontend with `loadBalancerSourceRanges`: a new flow from a client outside
    /// them (see [`crate::map_names::SOURCE_RANGES`]) is dropped.
    pub const SOURCE_RANGES: u32 = 16;
}

/// A key of [`map_names::SOURCE_RANGES`], an LPM trie: the prefix length counts the service id's
/// 32 bits plus the range's prefix, so one trie holds every service's ranges.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceRangeKey {
    pub service_id: [u8; 4],
    pub addr: [u8; 4],
}

/// `checksum` (an RFC 1071 checksum as stored) after the bytes `old` of the data it covers were
/// replaced by `new` (RFC 1624, eq. 3). Both must have the same even length.
#[inline(always)]
pub fn checksum_replace(checksum: u16, old: &[u8], new: &[u8]) -> u16 {
    let mut sum = u32::from(!checksum);
    let mut i = 0;
    while i + 1 < old.len() && i + 1 < new.len() {
        sum += u32::from(!u16::from_be_bytes([old[i], old[i + 1]]));
        sum += u32::from(u16::from_be_bytes([new[i], new[i + 1]]));
        i += 2;
    }
    checksum_fold(sum)
}

/// The Internet checksum (RFC 1071) of `bytes` added to `sum`, not yet folded.
#[inline(always)]
pub fn checksum_add(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    if i < bytes.len() {
        sum += u32::from(bytes[i]) << 8;
    }
    sum
}

/// Folds a 32-bit sum into the one's complement 16-bit checksum.
#[inline(always)]
pub fn checksum_fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The TCP checksum of a header-only segment (no payload) between two IPv4 addresses.
#[inline(always)]
pub fn tcp_ipv4_checksum(src: [u8; 4], dst: [u8; 4], segment: &[u8; 20]) -> u16 {
    let mut sum = checksum_add(0, &src);
    sum = checksum_add(sum, &dst);
    sum += u32::from(IPPROTO_TCP) + segment.len() as u32;
    checksum_fold(checksum_add(sum, segment))
}

/// A client of a service with session affinity.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub service_id: u32,
    pub client_addr: [u8; 4],
}

/// The backend a client sticks to, and when it last opened a connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityEntry {
    pub backend_id: BackendId,
    pub pad: u32,
    pub last_used_ns: u64,
}

/// Hash of a flow's 5-tuple that every node computes alike (no per-boot seed), so the same flow
/// meets the same Maglev table position on any node. MurmurHash3's mixing steps.
#[inline(always)]
pub fn flow_hash(src_addr: [u8; 4], dst_addr: [u8; 4], src_port: u16, dst_port: u16, proto: u8) -> u32 {
    #[inline(always)]
    fn mix(hash: u32, word: u32) -> u32 {
        let k = word
            .wrapping_mul(0xcc9e_2d51)
            .rotate_left(15)
            .wrapping_mul(0x1b87_3593);
        (hash ^ k)
            .rotate_left(13)
            .wrapping_mul(5)
            .wrapping_add(0xe654_6b64)
    }
    let mut hash = mix(0x5b0a_2d9f, u32::from_be_bytes(src_addr));
    hash = mix(hash, u32::from_be_bytes(dst_addr));
    hash = mix(hash, (u32::from(src_port) << 16) | u32::from(dst_port));
    hash = mix(hash, u32::from(proto));
    hash ^= hash >> 16;
    hash = hash.wrapping_mul(0x85eb_ca6b);
    hash ^= hash >> 13;
    hash = hash.wrapping_mul(0xc2b2_ae35);
    hash ^ (hash >> 16)
}

/// One slot of a service's backend set: `(service id, slot index)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub service_id: u32,
    pub slot: u32,
}

/// A backend id, the value of a slot and the key of [`map_names::BACKENDS`].
pub type BackendId = u32;

/// A backend of one service. Ids are per service, so removing an endpoint from a service removes
/// its id, and a conntrack entry that still names it is re-balanced instead of black-holed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: [u8; 4],
    pub port: u16,
    pub proto: u8,
    /// [`backend_flags`].
    pub flags: u8,
    /// The service this backend belongs to; guards against a recycled id.
    pub service_id: u32,
}

pub mod backend_flags {
    /// Keeps the flows it has but is given no new one (a terminating endpoint while ready ones
    /// exist, or one a traffic policy leaves out): it is in no slot and no Maglev table, and a
    /// client's session affinity to it is not honoured.
    pub const DRAINING: u8 = 1;
}

/// Which way a conntrack entry looks at a flow.
pub mod ct_direction {
    /// Client → frontend, keyed as the client sent it; maps to the chosen backend.
    pub const FORWARD: u8 = 0;
    /// Backend → client, keyed as the backend replies; maps back to the frontend.
    pub const REPLY: u8 = 1;
    /// Client → backend, keyed as a DNATed external flow leaves the node for another one; maps
    /// to the node address and port it takes as its source (unset until the first packet leaves).
    pub const SNAT_OUT: u8 = 2;
    /// Backend → node address and port, keyed as a source-NATed flow's reply arrives; maps back
    /// to the client.
    pub const SNAT_IN: u8 = 3;
}

/// [`CtEntry::flags`].
pub mod ct_flags {
    /// A TCP flow that has seen a FIN or a RST: the agent forgets it a short while after its
    /// last packet instead of after the long established timeout.
    pub const CLOSING: u16 = 1;

    /// TCP header flag bits, as on the wire.
    pub const TCP_FIN: u8 = 0x01;
    pub const TCP_SYN: u8 = 0x02;
    pub const TCP_RST: u8 = 0x04;
    pub const TCP_ACK: u8 = 0x10;

    /// An entry's flags after a TCP segment with `tcp_flags`: a FIN or RST marks the flow
    /// closing; a pure SYN reopens it (the client reused the 5-tuple for a new connection).
    #[inline(always)]
    pub fn after_tcp_segment(flags: u16, tcp_flags: u8) -> u16 {
        if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            flags | CLOSING
        } else if tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
            flags & !CLOSING
        } else {
            flags
        }
    }
}

/// A flow's 5-tuple as seen in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub src_addr: [u8; 4],
    pub dst_addr: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub direction: u8,
    pub pad: [u8; 2],
}

/// A conntrack entry. For [`ct_direction::FORWARD`] `nat_*` is the backend the flow was given;
/// for [`ct_direction::REPLY`] it is the frontend the client dialled.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    pub service_id: u32,
    pub backend_id: BackendId,
    pub nat_addr: [u8; 4],
    pub nat_port: u16,
    /// [`ct_flags`].
    pub flags: u16,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last packet in this direction, refreshed
    /// at most once a second.
    pub last_seen_ns: u64,
}

/// How many RST / ICMP unreachable replies the datapath may generate: a token bucket per CPU,
/// kept in nanoseconds of credit so the datapath never divides. All zero: no limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RejectLimit {
    /// Credit one reply costs: a second over the rate.
    pub interval_ns: u64,
    /// Most credit a bucket holds: `burst` replies.
    pub burst_ns: u64,
}

impl RejectLimit {
    /// `rate` replies per second and CPU, up to `burst` at once. A rate of 0: no limit.
    pub const fn per_second(rate: u32, burst: u32) -> Self {
        if rate == 0 {
            return Self {
                interval_ns: 0,
                burst_ns: 0,
            };
        }
        let interval_ns = 1_000_000_000 / rate as u64;
        Self {
            interval_ns,
            burst_ns: interval_ns * burst as u64,
        }
    }
}

/// One CPU's bucket of [`RejectLimit`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RejectBucket {
    pub credit_ns: u64,
    pub last_ns: u64,
}

impl RejectBucket {
    /// Whether one more reply may go out at `now_ns`, taking its credit if so. A fresh bucket
    /// starts full.
    #[inline(always)]
    pub fn take(&mut self, limit: &RejectLimit, now_ns: u64) -> bool {
        if limit.interval_ns == 0 {
            return true;
        }
        let earned = now_ns.wrapping_sub(self.last_ns);
        self.credit_ns = self.credit_ns.saturating_add(earned).min(limit.burst_ns);
        self.last_ns = now_ns;
        if self.credit_ns < limit.interval_ns {
            return false;
        }
        self.credit_ns -= limit.interval_ns;
        true
    }
}

/// Indexes of the per-CPU datapath counters in [`map_names::STATS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Packets DNATed to a backend (every packet of a service flow, not just the first).
    ServicePackets = 0,
    /// New flows: a conntrack miss that chose a backend.
    NewFlows = 1,
    /// Flows whose backend had gone and were given a live one.
    Rebalanced = 2,
    /// Packets to a frontend with no usable backend: a TCP SYN answered with a RST, UDP with an
    /// ICMP port unreachable, the rest dropped.
    NoBackend = 3,
    /// Replies translated back to the frontend.
    ReplyPackets = 4,
    /// Conntrack inserts that failed (the map refused the entry).
    CtInsertFailed = 5,
    /// New flows to a LoadBalancer IP from a client outside `loadBalancerSourceRanges`, dropped.
    SourceRangeDrops = 6,
    /// External flows leaving for another node that could not be given a source address and port
    /// (no address for the interface, or every probed port taken); sent with the client's.
    SnatFailed = 7,
    /// RST or ICMP unreachable replies not sent (the packet dropped) because of the rate limit.
    RejectRateLimited = 8,
    /// Packets to a ClusterIP on a port its Service does not define: refused like [`Stat::NoBackend`].
    UndefinedPort = 9,
}

impl Stat {
    pub const COUNT: u32 = 10;
    pub const ALL: [Stat; Self::COUNT as usize] = [
        Stat::ServicePackets,
        Stat::NewFlows,
        Stat::Rebalanced,
        Stat::NoBackend,
        Stat::ReplyPackets,
        Stat::CtInsertFailed,
        Stat::SourceRangeDrops,
        Stat::SnatFailed,
        Stat::RejectRateLimited,
        Stat::UndefinedPort,
    ];

    pub const fn help(self) -> &'static str {
        match self {
            Stat::ServicePackets => "Packets DNATed to a backend",
            Stat::NewFlows => "Flows given a backend (conntrack misses)",
            Stat::Rebalanced => "Flows moved to a live backend because theirs had gone",
            Stat::NoBackend => {
                "Packets to a frontend without usable backend (refused with a RST or ICMP port unreachable, or dropped)"
            }
            Stat::ReplyPackets => "Replies translated back to the frontend",
            Stat::CtInsertFailed => "Conntrack entries the map refused",
            Stat::SourceRangeDrops => {
                "New flows to a LoadBalancer IP from outside its loadBalancerSourceRanges, dropped"
            }
            Stat::SnatFailed => "External flows to another node's backend that could not be source-NATed",
            Stat::RejectRateLimited => "Refusals dropped instead of answered (RST/ICMP rate limit)",
            Stat::UndefinedPort => {
                "Packets to a ClusterIP on a port its Service does not define (refused with a RST or ICMP port unreachable, or dropped)"
            }
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Stat::ServicePackets => "service_packets",
            Stat::NewFlows => "new_flows",
            Stat::Rebalanced => "rebalanced_flows",
            Stat::NoBackend => "no_backend_drops",
            Stat::ReplyPackets => "reply_packets",
            Stat::CtInsertFailed => "conntrack_insert_failures",
            Stat::SourceRangeDrops => "source_range_drops",
            Stat::SnatFailed => "snat_failures",
            Stat::RejectRateLimited => "rate_limited_rejects",
            Stat::UndefinedPort => "undefined_port_drops",
        }
    }
}

/// Per-service traffic counters, one copy per CPU, in [`map_names::SERVICE_STATS`] under the
/// service id. The datapath creates a service's entry on its first packet; the agent removes it
/// when it gives the id to a new frontend, so counters never carry over.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Packets DNATed to one of the service's backends.
    pub packets: u64,
    /// Their bytes, as the packets were seen at the hook (link-layer header included).
    pub bytes: u64,
    /// Flows given a backend.
    pub new_flows: u64,
    /// Backend replies translated back to the frontend.
    pub reply_packets: u64,
    pub reply_bytes: u64,
}

impl core::ops::AddAssign for ServiceStats {
    fn add_assign(&mut self, other: Self) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.new_flows += other.new_flows;
        self.reply_packets += other.reply_packets;
        self.reply_bytes += other.reply_bytes;
    }
}

#[cfg(feature = "user")]
mod pod_impls {
    use super::*;

    // SAFETY: all of these are #[repr(C)] with explicit padding, so every bit pattern is valid
    // and no byte is uninitialised.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceInfo {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityEntry {}
    unsafe impl aya::Pod for SourceRangeKey {}
    unsafe impl aya::Pod for ServiceStats {}
    unsafe impl aya::Pod for SockRevKey {}
    unsafe impl aya::Pod for SockRevEntry {}
    unsafe impl aya::Pod for ClusterIpKey {}
    unsafe impl aya::Pod for RejectLimit {}
    unsafe impl aya::Pod for RejectBucket {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::size_of;

    /// The worked example of RFC 1071 §3, and an IPv4 header whose checksum verifies to zero.
    #[test]
    fn internet_checksum() {
        let sum = checksum_add(0, &[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]);
        assert_eq!(checksum_fold(sum), !0xddf2);
        let header = [
            0x45, 0, 0, 0x73, 0, 0, 0x40, 0, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0, 1, 0xc0, 0xa8, 0, 0xc7,
        ];
        assert_eq!(
            checksum_fold(checksum_add(0, &header)),
            0,
            "a correct header sums to zero"
        );
    }

    /// An incremental update agrees with a checksum computed from scratch, for an address and
    /// for a port.
    #[test]
    fn checksum_replace_matches_a_full_recomputation() {
        let mut header = [
            0x45, 0, 0, 0x73, 0, 0, 0x40, 0, 0x40, 0x11, 0, 0, 0xc0, 0xa8, 0, 1, 0xc0, 0xa8, 0, 0xc7,
        ];
        let check = checksum_fold(checksum_add(0, &header));
        header[10..12].copy_from_slice(&check.to_be_bytes());
        let updated = checksum_replace(check, &[0xc0, 0xa8, 0, 0xc7], &[10, 244, 2, 17]);
        header[16..20].copy_from_slice(&[10, 244, 2, 17]);
        header[10..12].copy_from_slice(&updated.to_be_bytes());
        assert_eq!(
            checksum_fold(checksum_add(0, &header)),
            0,
            "the updated header verifies"
        );
        header[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(updated, checksum_fold(checksum_add(0, &header)));
        assert_eq!(
            checksum_replace(0x1234, &[0, 80], &[0, 80]),
            0x1234,
            "no change, same sum"
        );
    }

    #[test]
    fn flow_hash_is_stable_and_spreads() {
        // A pinned value: every node and every build must agree on it, or an upgrade would move
        // flows between backends.
        assert_eq!(
            flow_hash([10, 0, 0, 1], [10, 96, 0, 10], 40000, 80, 6),
            1_861_148_423
        );
        let buckets = (0..10_000u16).fold([0u32; 10], |mut buckets, port| {
            buckets[(flow_hash([10, 0, 0, 1], [10, 96, 0, 10], port, 80, 6) % 10) as usize] += 1;
            buckets
        });
        assert!(
            buckets.iter().all(|&n| (900..1100).contains(&n)),
            "ports spread evenly: {buckets:?}"
        );
        assert_ne!(
            flow_hash([10, 0, 0, 1], [10, 96, 0, 10], 1, 2, 6),
            flow_hash([10, 0, 0, 1], [10, 96, 0, 10], 2, 1, 6)
        );
    }

    #[test]
    fn fin_and_rst_mark_a_flow_closing_and_a_new_syn_reopens_it() {
        use ct_flags::*;
        assert_eq!(after_tcp_segment(0, TCP_SYN), 0);
        assert_eq!(after_tcp_segment(0, TCP_ACK), 0);
        assert_eq!(after_tcp_segment(0, TCP_FIN | TCP_ACK), CLOSING);
        assert_eq!(after_tcp_segment(0, TCP_RST), CLOSING);
        assert_eq!(
            after_tcp_segment(CLOSING, TCP_ACK),
            CLOSING,
            "the last ACK stays closing"
        );
        assert_eq!(
            after_tcp_segment(CLOSING, TCP_SYN | TCP_ACK),
            CLOSING,
            "a SYN-ACK is no new connection"
        );
        assert_eq!(after_tcp_segment(CLOSING, TCP_SYN), 0, "the tuple reused");
    }

    #[test]
    fn the_reject_bucket_allows_a_burst_then_the_rate() {
        const MS: u64 = 1_000_000;
        let limit = RejectLimit::per_second(100, 5);
        let mut bucket = RejectBucket::default();
        let start = 1_000_000 * MS;
        let burst = (0..20).filter(|_| bucket.take(&limit, start)).count();
        assert_eq!(burst, 5, "a fresh bucket holds the burst");
        assert!(
            !bucket.take(&limit, start + 9 * MS),
            "10 ms earn one reply, 9 do not"
        );
        assert!(bucket.take(&limit, start + 10 * MS));
        let later = (0..20)
            .filter(|_| bucket.take(&limit, start + 10_000 * MS))
            .count();
        assert_eq!(later, 5, "credit never exceeds the burst");
        let mut unlimited = RejectBucket::default();
        assert!((0..1000).all(|_| unlimited.take(&RejectLimit::default(), start)));
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 8);
        assert_eq!(size_of::<ServiceInfo>(), 20);
        assert_eq!(size_of::<AffinityKey>(), 8);
        assert_eq!(size_of::<AffinityEntry>(), 16);
        assert_eq!(size_of::<SlotKey>(), 8);
        assert_eq!(size_of::<Backend>(), 12);
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(size_of::<CtEntry>(), 24);
        assert_eq!(size_of::<ServiceStats>(), 40);
        assert_eq!(size_of::<SockRevKey>(), 16);
        assert_eq!(size_of::<SockRevEntry>(), 8);
    }
}
