//! The services the fuzzer programs, the pods around them and the clients outside the node.
//! Backends are not shared between services, so a backend's reply names exactly one flow.
use lb_common::{IPPROTO_TCP, IPPROTO_UDP};

pub type Endpoint = ([u8; 4], u16);
/// An IPv4 prefix and its length.
pub type Range = ([u8; 4], u8);

pub struct Service {
    /// A NodePort's address is 0.0.0.0: it answers on every node address.
    pub frontend: Endpoint,
    pub proto: u8,
    pub backends: &'static [Endpoint],
    pub maglev: bool,
    pub affinity: bool,
    pub kind: Kind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    ClusterIp,
    /// A NodePort, LoadBalancer IP or externalIP.
    External {
        /// `externalTrafficPolicy: Local`: no source NAT; without endpoints, dropped.
        local: bool,
        /// `loadBalancerSourceRanges`: only these clients start flows.
        source_ranges: Option<&'static [Range]>,
    },
}

impl Service {
    const fn cluster_ip(
        frontend: Endpoint,
        proto: u8,
        backends: &'static [Endpoint],
        maglev: bool,
        affinity: bool,
    ) -> Self {
        Self {
            frontend,
            proto,
            backends,
            maglev,
            affinity,
            kind: Kind::ClusterIp,
        }
    }

    const fn external(
        frontend: Endpoint,
        proto: u8,
        backends: &'static [Endpoint],
        local: bool,
        source_ranges: Option<&'static [Range]>,
    ) -> Self {
        Self {
            frontend,
            proto,
            backends,
            maglev: false,
            affinity: false,
            kind: Kind::External { local, source_ranges },
        }
    }

    pub fn is_external(&self) -> bool {
        matches!(self.kind, Kind::External { .. })
    }

    /// `externalTrafficPolicy: Local`.
    pub fn is_local(&self) -> bool {
        matches!(self.kind, Kind::External { local: true, .. })
    }

    /// eTP Cluster: flows leaving for a backend take the node's address.
    pub fn snats(&self) -> bool {
        matches!(self.kind, Kind::External { local: false, .. })
    }

    /// Whether a new flow from `client` gets in from outside.
    pub fn admits(&self, client: [u8; 4]) -> bool {
        match self.kind {
            Kind::External {
                source_ranges: Some(ranges),
                ..
            } => ranges.iter().any(|range| in_range(client, *range)),
            _ => true,
        }
    }
}

fn in_range(addr: [u8; 4], (prefix, len): Range) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    u32::from_be_bytes(addr) & mask == u32::from_be_bytes(prefix) & mask
}

/// Random choice, Maglev, session affinity, a backend port equal to the frontend's (so only the
/// address changes), TCP and UDP, and two services without endpoints (the reject path); then the
/// external frontends: NodePorts with externalTrafficPolicy Cluster (source NAT) and Local, with
/// and without endpoints, and LoadBalancer IPs with and without source ranges.
pub const SERVICES: [Service; 17] = [
    Service::cluster_ip(
        ([10, 96, 0, 10], 80),
        IPPROTO_TCP,
        &[
            ([10, 244, 1, 10], 8080),
            ([10, 244, 1, 11], 8080),
            ([10, 244, 1, 12], 8080),
        ],
        false,
        false,
    ),
    Service::cluster_ip(
        ([10, 96, 0, 10], 53),
        IPPROTO_UDP,
        &[([10, 244, 1, 20], 5353), ([10, 244, 1, 21], 5353)],
        false,
        false,
    ),
    Service::cluster_ip(
        ([10, 96, 0, 11], 443),
        IPPROTO_TCP,
        &[
            ([10, 244, 2, 10], 8443),
            ([10, 244, 2, 11], 8443),
            ([10, 244, 2, 12], 8443),
            ([10, 244, 2, 13], 8443),
        ],
        true,
        false,
    ),
    Service::cluster_ip(
        ([10, 96, 0, 11], 8125),
        IPPROTO_UDP,
        &[([10, 244, 2, 20], 8125), ([10, 244, 2, 21], 9125)],
        true,
        true,
    ),
    Service::cluster_ip(
        ([10, 96, 0, 12], 80),
        IPPROTO_TCP,
        &[([10, 244, 3, 10], 80), ([10, 244, 3, 11], 80)],
        false,
        true,
    ),
    Service::cluster_ip(([10, 96, 0, 13], 80), IPPROTO_TCP, &[], false, false),
    Service::cluster_ip(([10, 96, 0, 13], 53), IPPROTO_UDP, &[], false, false),
    Service::external(
        ([0; 4], 30_080),
        IPPROTO_TCP,
        &[([10, 244, 4, 10], 8080), ([10, 244, 4, 11], 8080)],
        false,
        None,
    ),
    Service {
        maglev: true,
        ..Service::external(
            ([0; 4], 30_053),
            IPPROTO_UDP,
            &[([10, 244, 4, 20], 53), ([10, 244, 4, 21], 53)],
            false,
            None,
        )
    },
    Service::external(
        ([0; 4], 30_081),
        IPPROTO_TCP,
        &[([10, 244, 5, 10], 80)],
        true,
        None,
    ),
    Service::external(([0; 4], 30_082), IPPROTO_TCP, &[], true, None),
    Service::external(([0; 4], 30_082), IPPROTO_UDP, &[], true, None),
    Service::external(([0; 4], 30_090), IPPROTO_TCP, &[], false, None),
    Service {
        affinity: true,
        ..Service::external(
            (LB_IP, 443),
            IPPROTO_TCP,
            &[([10, 244, 6, 10], 8443), ([10, 244, 6, 11], 8443)],
            false,
            Some(&[([203, 0, 113, 0], 24), ([192, 0, 2, 128], 25)]),
        )
    },
    Service::external(
        (LB_IP, 53),
        IPPROTO_UDP,
        &[([10, 244, 6, 20], 5353)],
        true,
        Some(&[([203, 0, 113, 0], 24), ([192, 0, 2, 128], 25)]),
    ),
    Service::external(
        ([198, 51, 100, 8], 80),
        IPPROTO_TCP,
        &[],
        false,
        Some(&[([203, 0, 113, 0], 25)]),
    ),
    Service::external(
        ([198, 51, 100, 9], 80),
        IPPROTO_TCP,
        &[([10, 244, 7, 10], 80)],
        false,
        None,
    ),
];

const LB_IP: [u8; 4] = [198, 51, 100, 7];

/// This node's addresses: NodePorts answer on them and nowhere else.
pub const NODE_ADDRS: [[u8; 4]; 2] = [[192, 168, 50, 2], [192, 168, 50, 3]];
/// Addresses that are not the node's, where a NodePort must not answer (0.0.0.0 included: a
/// NodePort's key must not match it).
pub const OTHER_ADDRS: [[u8; 4]; 3] = [[192, 168, 50, 4], [0; 4], [10, 96, 0, 10]];
/// The address flows leaving for other nodes' backends take, configured for the interface
/// BPF_PROG_TEST_RUN runs TC programs on (loopback, index 1).
pub const SNAT_ADDR: [u8; 4] = NODE_ADDRS[0];
pub const SNAT_IFINDEX: u32 = 1;
/// Where probed source ports lie (the kernel's default ephemeral range).
pub const SNAT_PORTS: std::ops::Range<u16> = 32_768..61_000;

/// Clients outside the cluster: inside and outside the source ranges above.
pub const EXTERNAL_CLIENTS: [[u8; 4]; 5] = [
    [203, 0, 113, 5],
    [203, 0, 113, 200],
    [192, 0, 2, 130],
    [192, 0, 2, 5],
    [198, 18, 0, 1],
];
/// External clients' ports: mostly high ones, kept by source NAT when free, and a few below
/// 1024, which source NAT never keeps.
pub const EXTERNAL_PORTS: [u16; 8] = [40_000, 40_001, 40_002, 40_003, 40_004, 40_005, 123, 500];

/// Client pods. Their ports come from a small range so that replies often belong to a flow.
pub const CLIENTS: [[u8; 4]; 4] = [
    [10, 244, 0, 20],
    [10, 244, 0, 21],
    [10, 244, 0, 22],
    [10, 244, 0, 23],
];
pub const CLIENT_PORTS: std::ops::Range<u16> = 40_000..40_048;

pub const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 20];
pub const GATEWAY_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

/// Whether `addr` is the ClusterIP of any service: on a port it does not define, it is refused.
pub fn is_cluster_ip(addr: [u8; 4]) -> bool {
    SERVICES
        .iter()
        .any(|s| s.kind == Kind::ClusterIp && s.frontend.0 == addr)
}

/// The service a packet to `addr:port` reaches: the frontend with that address, or a NodePort
/// when `addr` is one of the node's.
pub fn service_at(addr: [u8; 4], port: u16, proto: u8) -> Option<&'static Service> {
    let find = |addr| {
        SERVICES
            .iter()
            .find(|s| s.frontend == (addr, port) && s.proto == proto)
    };
    if addr == [0; 4] {
        return None;
    }
    find(addr).or_else(|| NODE_ADDRS.contains(&addr).then(|| find([0; 4])).flatten())
}
