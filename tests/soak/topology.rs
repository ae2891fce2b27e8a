//! Who is who in the soak's cluster: the Services with their ports, the pods that may back
//! them, the client pods, and the frontends the churn programs. Every Service is dual-stack:
//! each port is a frontend on its IPv4 ClusterIP and on its IPv6 one.
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use lb_common::{IPPROTO_TCP, IPPROTO_UDP};
use lb_userspace::{lab::ipv6_of, reconcile::FrontendKey};

/// The Services: name, IPv4 ClusterIP ([`ipv6_of`] it is the IPv6 one), and the letter their
/// pods are named with.
pub const SERVICES: [(&str, Ipv4Addr, char); 3] = [
    ("alpha", Ipv4Addr::new(10, 96, 7, 1), 'a'),
    ("beta", Ipv4Addr::new(10, 96, 7, 2), 'b'),
    ("gamma", Ipv4Addr::new(10, 96, 7, 3), 'g'),
];
/// Pods per Service, in and out of its endpoints as the churn goes.
pub const POOL: usize = 4;
pub const CLIENTS: [(&str, Ipv4Addr); 2] = [
    ("c0", Ipv4Addr::new(10, 244, 9, 10)),
    ("c1", Ipv4Addr::new(10, 244, 9, 11)),
];
/// Every Service has `http` (TCP 80 → 3000) and `dns` (UDP 53 → 5353), and the churn adds and
/// removes `alt` (TCP 8080 → 3000).
pub const HTTP: (u16, u16) = (80, 3000);
pub const DNS: (u16, u16) = (53, 5353);
pub const ALT: u16 = 8080;

/// One frontend of a Service: `http`, `dns` or `alt`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub service: usize,
    pub port: u16,
    pub proto: u8,
    pub ipv6: bool,
}

impl Frontend {
    pub fn http(service: usize) -> Self {
        Self {
            service,
            port: HTTP.0,
            proto: IPPROTO_TCP,
            ipv6: false,
        }
    }

    pub fn dns(service: usize) -> Self {
        Self {
            service,
            port: DNS.0,
            proto: IPPROTO_UDP,
            ipv6: false,
        }
    }

    pub fn alt(service: usize) -> Self {
        Self {
            service,
            port: ALT,
            proto: IPPROTO_TCP,
            ipv6: false,
        }
    }

    /// The same port on the Service's ClusterIP of the other family.
    pub fn in_ipv6(self, ipv6: bool) -> Self {
        Self { ipv6, ..self }
    }

    /// The ClusterIP and port a client dials.
    pub fn socket(&self) -> SocketAddr {
        let ip = SERVICES[self.service].1;
        let ip = if self.ipv6 {
            IpAddr::from(ipv6_of(ip))
        } else {
            ip.into()
        };
        SocketAddr::new(ip, self.port)
    }

    pub fn key(&self) -> FrontendKey {
        let socket = self.socket();
        FrontendKey {
            addr: socket.ip(),
            port: socket.port(),
            proto: self.proto,
        }
    }
}

impl std::fmt::Display for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = if self.proto == IPPROTO_TCP { "TCP" } else { "UDP" };
        write!(f, "{} {}/{proto}", SERVICES[self.service].0, self.socket())
    }
}

/// Every frontend the churn may program, Service by Service, in both families.
pub fn frontends() -> Vec<Frontend> {
    (0..SERVICES.len())
        .flat_map(|service| {
            [
                Frontend::http(service),
                Frontend::dns(service),
                Frontend::alt(service),
            ]
        })
        .flat_map(|frontend| [frontend, frontend.in_ipv6(true)])
        .collect()
}

/// The name of the pod (or client) at `ip`, of either family, if it is one of the lab's.
pub fn pod_at(ip: IpAddr) -> Option<String> {
    let pods = (0..SERVICES.len()).flat_map(|service| (0..POOL).map(move |index| pod(service, index)));
    let clients = CLIENTS.iter().map(|&(name, ip)| (name.to_owned(), ip));
    pods.chain(clients)
        .find(|&(_, at)| ip == IpAddr::from(at) || ip == IpAddr::from(ipv6_of(at)))
        .map(|(name, _)| name)
}

/// Pod `index` of Service `service`: its name and address.
pub fn pod(service: usize, index: usize) -> (String, Ipv4Addr) {
    (
        format!("{}{index}", SERVICES[service].2),
        Ipv4Addr::new(10, 244, service as u8 + 1, 10 + index as u8),
    )
}
