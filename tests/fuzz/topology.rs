//! The services the fuzzer programs, the pods around them and the clients outside the node, in
//! both families: every address below is written once, as IPv4, and has an IPv6 twin
//! (`fd00::a.b.c.d`, the integration tests' convention; 0.0.0.0's twin is `::`), so every service,
//! pod, node address and client exists in each family. Backends are not shared between services,
//! so a backend's reply names exactly one flow.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::LazyLock,
};

use lb_common::{HAIRPIN_ADDR, HAIRPIN_ADDR6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

use crate::common::packets::v6;

/// An address and a port.
pub type Endpoint = (IpAddr, u16);
/// A prefix and its length.
pub type Range = (IpAddr, u8);

type Endpoint4 = ([u8; 4], u16);
type Range4 = ([u8; 4], u8);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub const ALL: [Self; 2] = [Self::Ipv4, Self::Ipv6];

    pub fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Self::Ipv4,
            IpAddr::V6(_) => Self::Ipv6,
        }
    }

    /// This family's address for the IPv4 address `v4` of the tables below.
    pub fn addr(self, v4: [u8; 4]) -> IpAddr {
        match self {
            Self::Ipv4 => IpAddr::V4(Ipv4Addr::from(v4)),
            Self::Ipv6 if v4 == [0; 4] => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            Self::Ipv6 => IpAddr::V6(Ipv6Addr::from(v6(v4))),
        }
    }

    fn endpoint(self, (addr, port): Endpoint4) -> Endpoint {
        (self.addr(addr), port)
    }

    /// The twin of an IPv4 prefix: the IPv6 twins' prefix is 96 bits long.
    fn range(self, (addr, len): Range4) -> Range {
        match self {
            Self::Ipv4 => (self.addr(addr), len),
            Self::Ipv6 => (self.addr(addr), len + 96),
        }
    }

    /// The source a pod reaching itself through its own Service sees (hairpin).
    pub fn hairpin(self) -> IpAddr {
        match self {
            Self::Ipv4 => HAIRPIN_ADDR.into(),
            Self::Ipv6 => HAIRPIN_ADDR6.into(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Ipv4 => "IPv4",
            Self::Ipv6 => "IPv6",
        }
    }
}

/// A service as the tables write it, in IPv4.
struct Spec {
    frontend: Endpoint4,
    proto: u8,
    backends: &'static [Endpoint4],
    maglev: bool,
    affinity: bool,
    local: bool,
    external: bool,
    source_ranges: Option<&'static [Range4]>,
}

impl Spec {
    const fn cluster_ip(
        frontend: Endpoint4,
        proto: u8,
        backends: &'static [Endpoint4],
        maglev: bool,
        affinity: bool,
    ) -> Self {
        Self {
            frontend,
            proto,
            backends,
            maglev,
            affinity,
            local: false,
            external: false,
            source_ranges: None,
        }
    }

    const fn external(
        frontend: Endpoint4,
        proto: u8,
        backends: &'static [Endpoint4],
        local: bool,
        source_ranges: Option<&'static [Range4]>,
    ) -> Self {
        Self {
            frontend,
            proto,
            backends,
            maglev: false,
            affinity: false,
            local,
            external: true,
            source_ranges,
        }
    }
}

pub struct Service {
    /// A NodePort's address is the unspecified one: it answers on every node address of its
    /// family.
    pub frontend: Endpoint,
    pub proto: u8,
    pub backends: Vec<Endpoint>,
    pub maglev: bool,
    pub affinity: bool,
    pub kind: Kind,
}

#[derive(Clone, PartialEq, Eq)]
pub enum Kind {
    ClusterIp,
    /// A NodePort, LoadBalancer IP or externalIP.
    External {
        /// `externalTrafficPolicy: Local`: no source NAT; without endpoints, dropped.
        local: bool,
        /// `loadBalancerSourceRanges`: only these clients start flows.
        source_ranges: Option<Vec<Range>>,
    },
}

impl Service {
    fn twin(family: Family, spec: &Spec) -> Self {
        let kind = if spec.external {
            Kind::External {
                local: spec.local,
                source_ranges: spec
                    .source_ranges
                    .map(|ranges| ranges.iter().map(|&range| family.range(range)).collect()),
            }
        } else {
            Kind::ClusterIp
        };
        Self {
            frontend: family.endpoint(spec.frontend),
            proto: spec.proto,
            backends: spec.backends.iter().map(|&b| family.endpoint(b)).collect(),
            maglev: spec.maglev,
            affinity: spec.affinity,
            kind,
        }
    }

    /// The backend at `addr` (backends of a service have addresses of their own): what a later
    /// fragment DNATed to `addr`, which shows no port, went to.
    pub fn backend_at(&self, addr: IpAddr) -> Result<Endpoint, String> {
        self.backends
            .iter()
            .find(|backend| backend.0 == addr)
            .copied()
            .ok_or_else(|| format!("sent to {addr}, no backend of {:?}", self.frontend))
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
    pub fn admits(&self, client: IpAddr) -> bool {
        match &self.kind {
            Kind::External {
                source_ranges: Some(ranges),
                ..
            } => ranges.iter().any(|range| in_range(client, *range)),
            _ => true,
        }
    }
}

fn in_range(addr: IpAddr, (prefix, len): Range) -> bool {
    match (addr, prefix) {
        (IpAddr::V4(addr), IpAddr::V4(prefix)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(addr) & mask == u32::from(prefix) & mask
        }
        (IpAddr::V6(addr), IpAddr::V6(prefix)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(addr) & mask == u128::from(prefix) & mask
        }
        _ => false,
    }
}

/// Every service, in both families: the IPv4 ones, then their IPv6 twins.
pub static SERVICES: LazyLock<Vec<Service>> = LazyLock::new(|| {
    Family::ALL
        .iter()
        .flat_map(|&family| SPECS.iter().map(move |spec| Service::twin(family, spec)))
        .collect()
});

/// The services in IPv4 (each has an IPv6 twin): random choice, Maglev, session affinity, a
/// backend port equal to the frontend's (so only the address changes), TCP, UDP and SCTP, and
/// services without endpoints (the reject path); then the external frontends: NodePorts with
/// externalTrafficPolicy Cluster (source NAT) and Local, with and without endpoints, LoadBalancer
/// IPs with and without source ranges, and externalIPs. Backend pods also act as clients of their
/// own Service (hairpin).
const SPECS: [Spec; 22] = [
    Spec::cluster_ip(
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
    Spec::cluster_ip(
        ([10, 96, 0, 10], 53),
        IPPROTO_UDP,
        &[([10, 244, 1, 20], 5353), ([10, 244, 1, 21], 5353)],
        false,
        false,
    ),
    Spec::cluster_ip(
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
    Spec::cluster_ip(
        ([10, 96, 0, 11], 8125),
        IPPROTO_UDP,
        &[([10, 244, 2, 20], 8125), ([10, 244, 2, 21], 9125)],
        true,
        true,
    ),
    Spec::cluster_ip(
        ([10, 96, 0, 12], 80),
        IPPROTO_TCP,
        &[([10, 244, 3, 10], 80), ([10, 244, 3, 11], 80)],
        false,
        true,
    ),
    // SCTP: a targetPort that differs (the CRC32c follows the port), one that does not (the
    // CRC32c is left as it is), and none on a port TCP serves (refused: frontends are per
    // protocol).
    Spec::cluster_ip(
        ([10, 96, 0, 14], 9000),
        IPPROTO_SCTP,
        &[
            ([10, 244, 8, 10], 9900),
            ([10, 244, 8, 11], 9900),
            ([10, 244, 8, 12], 9900),
        ],
        false,
        false,
    ),
    Spec::cluster_ip(
        ([10, 96, 0, 14], 3868),
        IPPROTO_SCTP,
        &[([10, 244, 8, 20], 3868), ([10, 244, 8, 21], 3868)],
        true,
        true,
    ),
    Spec::cluster_ip(([10, 96, 0, 10], 80), IPPROTO_SCTP, &[], false, false),
    Spec::cluster_ip(([10, 96, 0, 13], 80), IPPROTO_TCP, &[], false, false),
    Spec::cluster_ip(([10, 96, 0, 13], 53), IPPROTO_UDP, &[], false, false),
    Spec::external(
        ([0; 4], 30_080),
        IPPROTO_TCP,
        &[([10, 244, 4, 10], 8080), ([10, 244, 4, 11], 8080)],
        false,
        None,
    ),
    Spec {
        maglev: true,
        ..Spec::external(
            ([0; 4], 30_053),
            IPPROTO_UDP,
            &[([10, 244, 4, 20], 53), ([10, 244, 4, 21], 53)],
            false,
            None,
        )
    },
    Spec::external(
        ([0; 4], 30_081),
        IPPROTO_TCP,
        &[([10, 244, 5, 10], 80)],
        true,
        None,
    ),
    Spec::external(([0; 4], 30_082), IPPROTO_TCP, &[], true, None),
    Spec::external(([0; 4], 30_082), IPPROTO_UDP, &[], true, None),
    Spec::external(([0; 4], 30_090), IPPROTO_TCP, &[], false, None),
    Spec::external(
        ([0; 4], 30_132),
        IPPROTO_SCTP,
        &[([10, 244, 9, 10], 9900), ([10, 244, 9, 11], 9900)],
        false,
        None,
    ),
    Spec::external(([0; 4], 30_090), IPPROTO_SCTP, &[], false, None),
    Spec {
        affinity: true,
        ..Spec::external(
            (LB_IP, 443),
            IPPROTO_TCP,
            &[([10, 244, 6, 10], 8443), ([10, 244, 6, 11], 8443)],
            false,
            Some(&[([203, 0, 113, 0], 24), ([192, 0, 2, 128], 25)]),
        )
    },
    Spec::external(
        (LB_IP, 53),
        IPPROTO_UDP,
        &[([10, 244, 6, 20], 5353)],
        true,
        Some(&[([203, 0, 113, 0], 24), ([192, 0, 2, 128], 25)]),
    ),
    Spec::external(
        ([198, 51, 100, 8], 80),
        IPPROTO_TCP,
        &[],
        false,
        Some(&[([203, 0, 113, 0], 25)]),
    ),
    Spec::external(
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
/// Addresses that are not the node's, where a NodePort must not answer (0.0.0.0 and `::`
/// included: a NodePort's key must not match them).
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

/// The services of one family.
pub fn services(family: Family) -> &'static [Service] {
    let (ipv4, ipv6) = SERVICES.split_at(SPECS.len());
    match family {
        Family::Ipv4 => ipv4,
        Family::Ipv6 => ipv6,
    }
}

/// `addresses` in `family`.
pub fn in_family<const N: usize>(family: Family, addresses: [[u8; 4]; N]) -> [IpAddr; N] {
    addresses.map(|addr| family.addr(addr))
}

/// Whether `addr` is the ClusterIP of any service: on a port it does not define, it is refused.
pub fn is_cluster_ip(addr: IpAddr) -> bool {
    SERVICES
        .iter()
        .any(|s| s.kind == Kind::ClusterIp && s.frontend.0 == addr)
}

/// The service a packet to `addr:port` reaches: the frontend with that address, or a NodePort
/// when `addr` is one of the node's (of its family).
pub fn service_at(addr: IpAddr, port: u16, proto: u8) -> Option<&'static Service> {
    let find = |addr| {
        SERVICES
            .iter()
            .find(|s| s.frontend == (addr, port) && s.proto == proto)
    };
    if addr.is_unspecified() {
        return None;
    }
    let family = Family::of(addr);
    find(addr).or_else(|| {
        in_family(family, NODE_ADDRS)
            .contains(&addr)
            .then(|| find(family.addr([0; 4])))
            .flatten()
    })
}
