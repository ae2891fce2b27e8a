//! The model's frontends as desired map contents.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use super::FrontendKey;
use crate::model::{Endpoint, Frontend, FrontendKind, LbAlgorithm, Model, parse_cidr};

/// What one frontend's entries should be.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredService {
    /// `namespace/name:port` for logs and status.
    pub name: String,
    /// A ClusterIP frontend: the address's ports that no frontend defines are refused.
    pub cluster_ip: bool,
    /// Backend addresses and ports, in slot order; of the frontend's address family.
    pub backends: Vec<SocketAddr>,
    /// Backends kept for the flows they have, never chosen for a new one (terminating
    /// endpoints, or endpoints a traffic policy leaves out).
    pub draining: Vec<SocketAddr>,
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
    /// A LoadBalancer frontend's `loadBalancerSourceRanges` of its address family (prefix,
    /// length): only clients inside them get in. `None`: every client.
    pub source_ranges: Option<Vec<(IpAddr, u8)>>,
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

/// The map contents for `model`, frontends of both address families alike. A NodePort frontend is
/// keyed with its family's unspecified address: the datapath matches it on any of the node's
/// addresses of that family.
pub fn plan(model: &Model, options: &PlanOptions) -> BTreeMap<FrontendKey, DesiredService> {
    plan_frontends(&model.frontends, options)
}

/// The map contents for `frontends` (of one Service, or of all).
pub fn plan_frontends(
    frontends: &[Frontend],
    options: &PlanOptions,
) -> BTreeMap<FrontendKey, DesiredService> {
    frontends
        .iter()
        .map(|frontend| {
            let name = match frontend.kind {
                FrontendKind::ClusterIp => format!("{}:{}", frontend.service, frontend.port),
                kind => format!("{}:{} ({})", frontend.service, frontend.port, kind.as_str()),
            };
            let algorithm = frontend.algorithm.unwrap_or(options.default_algorithm);
            let service = DesiredService {
                name,
                cluster_ip: frontend.kind == FrontendKind::ClusterIp,
                backends: frontend.backends.iter().map(Endpoint::socket_addr).collect(),
                draining: frontend.draining.iter().map(Endpoint::socket_addr).collect(),
                maglev: (algorithm == LbAlgorithm::Maglev).then_some(options.maglev_table_size),
                affinity_timeout: frontend.policy.affinity_timeout_seconds,
                external: frontend.kind.is_external().then(|| external(frontend)),
            };
            (FrontendKey::of(frontend), service)
        })
        .collect()
}

/// A range of the other family can never hold a client of this frontend, and an unparsable one
/// holds none: both are left out, so a frontend whose ranges all are admits no client.
fn external(frontend: &Frontend) -> External {
    let ranges = &frontend.policy.source_ranges;
    let source_ranges = (frontend.kind == FrontendKind::LoadBalancer && !ranges.is_empty()).then(|| {
        ranges
            .iter()
            .filter_map(|range| parse_cidr(range))
            .filter(|(addr, _)| addr.is_ipv4() == frontend.address.is_ipv4())
            .collect()
    });
    External {
        local: frontend.policy.external_local,
        source_ranges,
    }
}
