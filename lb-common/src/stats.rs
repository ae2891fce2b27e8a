//! The datapath's counters.

/// Indexes of the per-CPU datapath counters in [`crate::map_names::STATS`].
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
    /// Later fragments whose datagram's first fragment was not seen (it came after them, or was
    /// forgotten): passed untouched, their ports unknown.
    FragmentWithoutFirst = 10,
    /// Packets from a pod whose source address does not route back out of the pod's interface,
    /// dropped before they could open, close or create a service flow (`--source-check`).
    SpoofedSource = 11,
}

impl Stat {
    pub const COUNT: u32 = 12;
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
        Stat::FragmentWithoutFirst,
        Stat::SpoofedSource,
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
            Stat::FragmentWithoutFirst => {
                "Later fragments whose first fragment was not seen, passed untranslated (their datagram is lost)"
            }
            Stat::SpoofedSource => {
                "Pod packets that would open, close or create a service flow from a source not routed back to their interface, dropped"
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
            Stat::FragmentWithoutFirst => "fragments_without_first",
            Stat::SpoofedSource => "spoofed_source_drops",
        }
    }
}

/// Per-service traffic counters, one copy per CPU, in [`crate::map_names::SERVICE_STATS`] under the
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
