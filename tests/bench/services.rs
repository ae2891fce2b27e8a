//! The services every setup is programmed with, generated rather than read from manifests so that
//! 100k of them cost nothing to describe: filler services that only take up room in the tables,
//! and the measured services whose endpoints are real pods. They are written with IPv4
//! addresses; a [`Family`] turns each into its IPv6 twin ([`ipv6_of`]), so both families carry
//! the same services.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use lb_common::{IPPROTO_TCP, IPPROTO_UDP};
use lb_userspace::{
    lab::ipv6_of,
    reconcile::{DesiredService, FrontendKey},
};
use serde::Serialize;

use crate::kube_proxy_rules::{ClusterCidrs, Protocol, ServicePort};

/// Pod and ClusterIP ranges. The pod range is wide because 100k fillers × 10 endpoints need a
/// million distinct endpoint addresses.
pub const CIDRS: ClusterCidrs = ClusterCidrs {
    pods: "10.128.0.0/9",
    services: "10.96.0.0/12",
};

/// Every service has this many endpoints, as the issue asks.
pub const ENDPOINTS_PER_SERVICE: usize = 10;

/// Fillers' ClusterIPs count up from here (inside the service range, clear of 10.96.0.0/16 where
/// the measured services live).
const FILLER_CLUSTER_IPS: u32 = u32::from_be_bytes([10, 100, 0, 0]);
/// Fillers' endpoints count up from here; nothing ever sends to them.
const FILLER_ENDPOINTS: u32 = u32::from_be_bytes([10, 128, 0, 0]);

/// The `index`th filler: a TCP service port on its own ClusterIP with ten endpoints that exist
/// only in the tables.
pub fn filler(index: usize) -> ServicePort {
    let first_endpoint = FILLER_ENDPOINTS + (index * ENDPOINTS_PER_SERVICE) as u32;
    ServicePort {
        namespace: "filler".into(),
        name: format!("svc-{index}"),
        port_name: "http".into(),
        cluster_ip: Ipv4Addr::from(FILLER_CLUSTER_IPS + index as u32),
        port: 80,
        protocol: Protocol::Tcp,
        endpoints: (0..ENDPOINTS_PER_SERVICE as u32)
            .map(|j| (Ipv4Addr::from(first_endpoint + j), 8080))
            .collect(),
    }
}

/// `count` fillers with `measured` in the middle of them. Order matters to iptables only, whose
/// KUBE-SERVICES chain is walked rule by rule: the middle is its average case.
pub fn with_fillers(measured: &[ServicePort], fillers: usize) -> Vec<ServicePort> {
    let mut all: Vec<ServicePort> = (0..fillers / 2).map(filler).collect();
    all.extend_from_slice(measured);
    all.extend((fillers / 2..fillers).map(filler));
    all
}

/// The address family packets and services are measured in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub const ALL: [Family; 2] = [Self::Ipv4, Self::Ipv6];

    pub fn label(self) -> &'static str {
        match self {
            Self::Ipv4 => "IPv4",
            Self::Ipv6 => "IPv6",
        }
    }

    /// `ip` in this family: itself, or its IPv6 twin.
    pub fn address(self, ip: Ipv4Addr) -> IpAddr {
        match self {
            Self::Ipv4 => ip.into(),
            Self::Ipv6 => ipv6_of(ip).into(),
        }
    }
}

pub fn service_key(port: &ServicePort, family: Family) -> FrontendKey {
    FrontendKey {
        addr: family.address(port.cluster_ip),
        port: port.port,
        proto: match port.protocol {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        },
    }
}

/// What Switchboard's planner would produce for these service ports in `families` (a dual-stack
/// Service is a frontend in each): the reconciler's input.
pub fn desired(ports: &[ServicePort], families: &[Family]) -> BTreeMap<FrontendKey, DesiredService> {
    families
        .iter()
        .flat_map(|&family| ports.iter().map(move |port| (family, port)))
        .map(|(family, port)| {
            let service = DesiredService {
                name: format!("{}/{}:{}", port.namespace, port.name, port.port),
                cluster_ip: true,
                backends: port
                    .endpoints
                    .iter()
                    .map(|&(ip, target)| (family.address(ip), target).into())
                    .collect(),
                draining: Vec::new(),
                // Random backend choice, like kube-proxy's.
                maglev: None,
                affinity_timeout: None,
                external: None,
            };
            (service_key(port, family), service)
        })
        .collect()
}
