//! The model's frontends as desired map contents.
use std::{collections::BTreeMap, net::IpAddr};

use lb_common::{IPPROTO_TCP, IPPROTO_UDP, ServiceKey};

use crate::model::{Endpoint, Frontend, FrontendKind, LbAlgorithm, Model, Protocol, parse_cidr};

/// A backend's IPv4 address and port, as the maps store them.
pub type BackendAddr = ([u8; 4], u16);

/// What one frontend's entries should be.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredService {
    /// `namespace/name:port` for logs and status.
    pub name: String,
    /// A ClusterIP frontend: the address's ports that no frontend defines are refused.
    pub cluster_ip: bool,
    /// Backend addresses and ports, in slot order.
    pub backends: Vec<BackendAddr>,
    /// Backends kept for the flows they have, never chosen for a new one (terminating
    /// endpoints, or endpoints a traffic policy leaves out).
    pub draining: Vec<BackendAddr>,
    /// Maglev table size when the service uses Maglev; `None`: random choice.
    pub maglev: Option<u32>,
    /// `sessionAffinity: ClientIP` timeout in seconds; `None`: no affinity.
    pub affinity_timeout: Option<u32>,
    /// For NodePort, LoadBalancer and external IP frontends: how outside clients are treated.
    pub external: Option<External>,
}

/// How an external frontend treats clients from outside the node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct External {
    /// `externalTrafficPolicy: Local`: the client address is kept, only this node's endpoints
    /// serve, and without one the traffic is dropped. Otherwise flows to another node's backend
    /// are source-NATed to this node.
    pub local: bool,
    /// A LoadBalancer frontend's `loadBalancerSourceRanges` (IPv4 prefix, length): only clients
    /// inside them get in. `None`: every client.
    pub source_ranges: Option<Vec<([u8; 4], u8)>>,
}

/// The agent-wide settings the plan applies.
#[derive(Clone, Copy, Debug)]
pub struct PlanOptions {
    /// For services without the `switchboard.io/lb-algorithm` annotation.
    pub default_algorithm: LbAlgorithm,
    pub maglev_table_size: u32,
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self {
            default_algorithm: LbAlgorithm::default(),
            maglev_table_size: lb_common::DEFAULT_MAGLEV_TABLE_SIZE,
        }
    }
}

/// The map contents for `model`. IPv4 only: the datapath has no IPv6 maps yet, so IPv6
/// frontends are left out (and said so once per call at debug level). A NodePort frontend is
/// keyed with address 0.0.0.0: the datapath matches it on any of the node's addresses.
pub fn plan(model: &Model, options: &PlanOptions) -> BTreeMap<ServiceKey, DesiredService> {
    let mut desired = BTreeMap::new();
    let mut ipv6 = 0;
    for frontend in &model.frontends {
        let IpAddr::V4(address) = frontend.address else {
            ipv6 += 1;
            continue;
        };
        let key = ServiceKey {
            addr: address.octets(),
            port: frontend.port,
            proto: match frontend.protocol {
                Protocol::Tcp => IPPROTO_TCP,
                Protocol::Udp => IPPROTO_UDP,
            },
            pad: 0,
        };
        let ipv4 = |endpoints: &[Endpoint]| {
            endpoints
                .iter()
                .filter_map(|e| match e.address {
                    IpAddr::V4(a) => Some((a.octets(), e.port)),
                    IpAddr::V6(_) => None,
                })
                .collect()
        };
        let name = match frontend.kind {
            FrontendKind::ClusterIp => format!("{}:{}", frontend.service, frontend.port),
            kind => format!("{}:{} ({})", frontend.service, frontend.port, kind.as_str()),
        };
        let maglev = (frontend.algorithm.unwrap_or(options.default_algorithm) == LbAlgorithm::Maglev)
            .then_some(options.maglev_table_size);
        desired.insert(
            key,
            DesiredService {
                name,
                cluster_ip: frontend.kind == FrontendKind::ClusterIp,
                backends: ipv4(&frontend.backends),
                draining: ipv4(&frontend.draining),
                maglev,
                affinity_timeout: frontend.policy.affinity_timeout_seconds,
                external: frontend.kind.is_external().then(|| external(frontend)),
            },
        );
    }
    if ipv6 > 0 {
        tracing::debug!(frontends = ipv6, "IPv6 frontends are not programmed yet");
    }
    desired
}

fn external(frontend: &Frontend) -> External {
    let ranges = &frontend.policy.source_ranges;
    let source_ranges = (frontend.kind == FrontendKind::LoadBalancer && !ranges.is_empty()).then(|| {
        ranges
            .iter()
            .filter_map(|range| match parse_cidr(range)? {
                (IpAddr::V4(address), prefix) => Some((address.octets(), prefix)),
                (IpAddr::V6(_), _) => None,
            })
            .collect()
    });
    External {
        local: frontend.policy.external_local,
        source_ranges,
    }
}
