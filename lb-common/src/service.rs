//! Frontends, their backends and the per-service policy maps.
use crate::{Address, Ipv4};

/// Maglev lookup table size unless configured otherwise: a prime, so every backend's permutation
/// visits every position; 100× the backend count keeps each backend within a few percent of its
/// share.
pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 16_381;

/// Flags of every Maglev table (inner map): BPF_F_INNER_MAP (sizes may differ from the
/// template's) | BPF_F_MMAPABLE (filled through one mapping). The kernel requires the same flags
/// on every inner map.
pub const MAGLEV_TABLE_FLAGS: u32 = (1 << 12) | (1 << 10);

/// A service frontend as a packet addresses it: destination address, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey<A: Address = Ipv4> {
    pub addr: A,
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

/// What the datapath knows of a frontend. Written last on add and first on delete, so a packet
/// that finds it also finds `backend_count` valid slots.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Stable id, chosen by the agent; keys the slots and is recorded in conntrack. One id space
    /// for both families.
    pub id: u32,
    /// Slots `0..backend_count` in [`crate::map_names::BACKEND_SLOTS`] are valid. Zero: no
    /// endpoints.
    pub backend_count: u32,
    /// [`service_flags`].
    pub flags: u32,
    /// With [`service_flags::MAGLEV`]: the size of the service's table in
    /// [`crate::map_names::MAGLEV`].
    pub maglev_table_size: u32,
    /// With [`service_flags::AFFINITY`]: how long a client sticks to its backend after its last
    /// new connection, in seconds.
    pub affinity_timeout_s: u32,
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

/// One slot of a service's backend set: `(service id, slot index)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub service_id: u32,
    pub slot: u32,
}

/// A backend id, the value of a slot and the key of [`crate::map_names::BACKENDS`] (or of its
/// IPv6 twin, for a service of that family: one id space for both).
pub type BackendId = u32;

/// A backend of one service. Ids are per service, so removing an endpoint from a service removes
/// its id, and a conntrack entry that still names it is re-balanced instead of black-holed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend<A: Address = Ipv4> {
    pub addr: A,
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
