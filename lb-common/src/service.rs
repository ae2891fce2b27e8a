//! Frontends, their backends and the per-service policy maps.
use crate::{Address, Ipv4};

/// Flags of the backend table space ([`crate::map_names::BACKEND_TABLES`]'s inner array):
/// BPF_F_INNER_MAP (its size may differ from the template's, so it can grow) | BPF_F_MMAPABLE
/// (the agent writes tables through a shared mapping, not a syscall per position).
pub const BACKEND_TABLES_FLAGS: u32 = (1 << 12) | (1 << 10);

/// An element of the backend table space: two positions. Array elements are laid out 8 bytes
/// apart whatever their size, so a `u32` element would waste half the space; a pair fills it.
pub type TablePair = [BackendId; 2];

/// A service frontend as a packet addresses it: destination address, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey<A: Address = Ipv4> {
    pub addr: A,
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

/// What the datapath knows of a frontend. Written after its backends and tables on add and
/// deleted before them, so a packet that finds it also finds every backend it points at.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Stable id of the frontend, chosen by the agent: recorded in conntrack, and the key of its
    /// counters, source ranges and session affinity. One id space for both families.
    pub id: u32,
    /// [`service_flags`].
    pub flags: u32,
    /// With [`service_flags::AFFINITY`]: how long a client sticks to its backend after its last
    /// new connection, in seconds.
    pub affinity_timeout_s: u32,
    /// The backends new flows from pods and from the node itself are balanced over.
    pub backends: BackendSet,
    /// The backends new flows from outside the node are balanced over: `backends`, except on an
    /// external frontend with `externalTrafficPolicy: Local`, where they are this node's only
    /// (kube-proxy restricts only outside clients to local endpoints).
    pub outside: BackendSet,
}

impl ServiceInfo {
    /// This frontend as clients from outside the node see it: balanced over [`Self::outside`].
    #[inline(always)]
    pub fn for_outside_clients(&mut self) {
        self.backends = self.outside;
    }
}

/// A set of backends with its table, shared by every frontend of a Service whose new flows go to
/// the same endpoints (its ClusterIP, NodePort, LoadBalancer and external IPs, say).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendSet {
    /// The set's id: its backends' entries name it as their owner ([`Backend::set_id`]).
    pub id: u32,
    /// How many backends take new flows: positions `table .. table + count` of
    /// [`crate::map_names::BACKEND_TABLES`] hold their ids (the slots random choice picks from).
    /// Zero: none, and new flows are refused.
    pub count: u32,
    /// Where the set's table starts in [`crate::map_names::BACKEND_TABLES`].
    pub table: u32,
    /// Maglev: the size of the lookup table that follows the ids, at `table + count`. Zero:
    /// random choice among the ids.
    pub maglev_size: u32,
}

pub mod service_flags {
    /// Bit 1 (Maglev) is retired: a backend set says so with its table size.
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

/// A ClusterIP, whatever the port: the key of [`crate::map_names::CLUSTER_IPS`], whose value is
/// how many frontends the address has. A packet to a ClusterIP on a port no frontend defines is
/// refused like one to a closed port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterIpKey<A: Address = Ipv4> {
    pub addr: A,
}

/// A key of [`crate::map_names::SOURCE_RANGES`], an LPM trie: the prefix length counts the
/// service id's 32 bits plus the range's prefix, so one trie holds every service's ranges.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceRangeKey<A: Address = Ipv4> {
    pub service_id: [u8; 4],
    pub addr: A,
}

/// A backend id, the value of a slot and the key of [`crate::map_names::BACKENDS`] (or of its
/// IPv6 twin, for a service of that family: one id space for both).
pub type BackendId = u32;

/// A backend of one backend set. Ids are per set and never handed out twice (until the counter
/// wraps), so removing an endpoint from a set removes its id, and a conntrack entry that still
/// names it is re-balanced instead of black-holed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend<A: Address = Ipv4> {
    pub addr: A,
    pub port: u16,
    pub proto: u8,
    /// [`backend_flags`].
    pub flags: u8,
    /// The [`BackendSet`] this backend belongs to: a flow whose backend left its set finds
    /// another owner, or none.
    pub set_id: u32,
}

pub mod backend_flags {
    /// Keeps the flows it has but is given no new one (a terminating endpoint while ready ones
    /// exist, or one a traffic policy leaves out): it is in no slot and no Maglev table, and a
    /// client's session affinity to it is not honoured.
    pub const DRAINING: u8 = 1;
}

/// A client of a service with session affinity.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey<A: Address = Ipv4> {
    pub service_id: u32,
    pub client_addr: A,
}

/// The backend a client sticks to, and when it last opened a connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityEntry {
    pub backend_id: BackendId,
    pub pad: u32,
    pub last_used_ns: u64,
}
