//! The services the fuzzer programs and the pods around them. Backends are not shared between
//! services, so a backend's reply names exactly one flow.
use lb_common::{IPPROTO_TCP, IPPROTO_UDP};

pub type Endpoint = ([u8; 4], u16);

pub struct Service {
    pub frontend: Endpoint,
    pub proto: u8,
    pub backends: &'static [Endpoint],
    pub maglev: bool,
    pub affinity: bool,
}

/// Random choice, Maglev, session affinity, a backend port equal to the frontend's (so only the
/// address changes), TCP and UDP, and two services without endpoints (the reject path).
pub const SERVICES: [Service; 7] = [
    Service {
        frontend: ([10, 96, 0, 10], 80),
        proto: IPPROTO_TCP,
        backends: &[
            ([10, 244, 1, 10], 8080),
            ([10, 244, 1, 11], 8080),
            ([10, 244, 1, 12], 8080),
        ],
        maglev: false,
        affinity: false,
    },
    Service {
        frontend: ([10, 96, 0, 10], 53),
        proto: IPPROTO_UDP,
        backends: &[([10, 244, 1, 20], 5353), ([10, 244, 1, 21], 5353)],
        maglev: false,
        affinity: false,
    },
    Service {
        frontend: ([10, 96, 0, 11], 443),
        proto: IPPROTO_TCP,
        backends: &[
            ([10, 244, 2, 10], 8443),
            ([10, 244, 2, 11], 8443),
            ([10, 244, 2, 12], 8443),
            ([10, 244, 2, 13], 8443),
        ],
        maglev: true,
        affinity: false,
    },
    Service {
        frontend: ([10, 96, 0, 11], 8125),
        proto: IPPROTO_UDP,
        backends: &[([10, 244, 2, 20], 8125), ([10, 244, 2, 21], 9125)],
        maglev: true,
        affinity: true,
    },
    Service {
        frontend: ([10, 96, 0, 12], 80),
        proto: IPPROTO_TCP,
        backends: &[([10, 244, 3, 10], 80), ([10, 244, 3, 11], 80)],
        maglev: false,
        affinity: true,
    },
    Service {
        frontend: ([10, 96, 0, 13], 80),
        proto: IPPROTO_TCP,
        backends: &[],
        maglev: false,
        affinity: false,
    },
    Service {
        frontend: ([10, 96, 0, 13], 53),
        proto: IPPROTO_UDP,
        backends: &[],
        maglev: false,
        affinity: false,
    },
];

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
    SERVICES.iter().any(|s| s.frontend.0 == addr)
}

pub fn service_at(addr: [u8; 4], port: u16, proto: u8) -> Option<&'static Service> {
    SERVICES
        .iter()
        .find(|s| s.frontend == (addr, port) && s.proto == proto)
}
