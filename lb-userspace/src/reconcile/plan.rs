//! The model's frontends as desired map contents ([`DesiredService`], one per frontend), and one
//! Service's frontends as the backend sets they share ([`GroupPlan`]).
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use lb_common::service_flags;

use super::{FrontendKey, maglev};
use crate::model::{Endpoint, Endpoints, Frontend, FrontendKind, LbAlgorithm, Model, parse_cidr};

/// What one frontend's entries should be.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct DesiredService {
    /// `namespace/name:port` for logs and status.
    pub name: String,
    /// A ClusterIP frontend: the address's ports that no frontend defines are refused.
    pub cluster_ip: bool,
    /// Backend addresses and ports, in slot order; of the frontend's address family. On an
    /// external frontend, those of clients from outside the node.
    pub backends: Vec<SocketAddr>,
    /// Backends kept for the flows they have, never chosen for a new one (terminating
    /// endpoints, or endpoints a traffic policy leaves out).
    pub draining: Vec<SocketAddr>,
    /// The Maglev table's size when the service uses Maglev; `None`: random choice.
    pub maglev: Option<MaglevSize>,
    /// `sessionAffinity: ClientIP` timeout in seconds; `None`: no affinity.
    pub affinity_timeout: Option<u32>,
    /// For NodePort, LoadBalancer and external IP frontends: how outside clients are treated.
    pub external: Option<External>,
}

/// How an external frontend treats clients from outside the node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct External {
    /// `externalTrafficPolicy: Local`: the client address is kept, only this node's endpoints
    /// serve, and without one the traffic is dropped. Otherwise flows to another node's backend
    /// are source-NATed to this node.
    pub local: bool,
    /// A LoadBalancer frontend's `loadBalancerSourceRanges` of its address family (prefix,
    /// length): only clients inside them get in. `None`: every client.
    pub source_ranges: Option<Vec<(IpAddr, u8)>>,
    /// The backends of clients in the cluster (pods, the node itself) when they differ from
    /// `DesiredService::backends` (with `local`, the cluster-wide ones). `None`: the same.
    pub in_cluster: Option<BackendAddrs>,
}

/// Backends new flows go to, and the draining ones.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendAddrs {
    pub backends: Vec<SocketAddr>,
    pub draining: Vec<SocketAddr>,
}

/// How many positions a Maglev table has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MaglevSize {
    /// Scaled to the backends: the smallest of [`maglev::TABLE_SIZES`] with at least 100
    /// positions per backend, so every backend owns its share within about 1%.
    #[default]
    Scaled,
    /// This prime, whatever the number of backends.
    Fixed(u32),
}

impl MaglevSize {
    /// The size of a table over `backends` backends.
    pub fn for_backends(self, backends: usize) -> u32 {
        match self {
            Self::Scaled => maglev::scaled_size(backends),
            Self::Fixed(size) => size,
        }
    }
}

/// The agent-wide settings the plan applies.
#[derive(Clone, Copy, Debug, Default)]
pub struct PlanOptions {
    /// For services without the `switchboard.io/lb-algorithm` annotation.
    pub default_algorithm: LbAlgorithm,
    pub maglev_table_size: MaglevSize,
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
        .map(|frontend| (FrontendKey::of(frontend), desired(frontend, options)))
        .collect()
}

fn desired(frontend: &Frontend, options: &PlanOptions) -> DesiredService {
    let name = match frontend.kind {
        FrontendKind::ClusterIp => format!("{}:{}", frontend.service, frontend.port),
        kind => format!("{}:{} ({})", frontend.service, frontend.port, kind.as_str()),
    };
    let algorithm = frontend.algorithm.unwrap_or(options.default_algorithm);
    DesiredService {
        name,
        cluster_ip: frontend.kind == FrontendKind::ClusterIp,
        backends: addrs(&frontend.backends),
        draining: addrs(&frontend.draining),
        maglev: (algorithm == LbAlgorithm::Maglev).then_some(options.maglev_table_size),
        affinity_timeout: frontend.policy.affinity_timeout_seconds,
        external: frontend.kind.is_external().then(|| external(frontend)),
    }
}

fn addrs(endpoints: &[Endpoint]) -> Vec<SocketAddr> {
    endpoints.iter().map(Endpoint::socket_addr).collect()
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
        in_cluster: frontend
            .in_cluster
            .as_ref()
            .map(|Endpoints { backends, draining }| BackendAddrs {
                backends: addrs(backends),
                draining: addrs(draining),
            }),
    }
}

/// A backend set as frontends want it: its protocol, the backends new flows go to (in slot
/// order), the draining ones and the Maglev table size (0: random choice). Frontends whose sets
/// are equal share one.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DesiredSet {
    pub proto: u8,
    pub live: Vec<SocketAddr>,
    /// Not in `live`, in the order given.
    pub draining: Vec<SocketAddr>,
    pub maglev_size: u32,
}

impl DesiredSet {
    fn of(proto: u8, live: &[SocketAddr], draining: &[SocketAddr], maglev: Option<MaglevSize>) -> Self {
        let mut kept: Vec<SocketAddr> = Vec::with_capacity(draining.len());
        for addr in draining {
            if !live.contains(addr) && !kept.contains(addr) {
                kept.push(*addr);
            }
        }
        let maglev_size = match maglev {
            Some(size) if !live.is_empty() => size.for_backends(live.len()),
            _ => 0,
        };
        Self {
            proto,
            live: live.to_vec(),
            draining: kept,
            maglev_size,
        }
    }

    /// Every address, live first.
    pub fn addrs(&self) -> impl Iterator<Item = &SocketAddr> {
        self.live.iter().chain(&self.draining)
    }
}

/// One frontend of a [`GroupPlan`]: its entry but for the backend sets, given as indexes into
/// [`GroupPlan::sets`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedFrontend {
    pub key: FrontendKey,
    pub name: String,
    pub cluster_ip: bool,
    /// `lb_common::service_flags`.
    pub flags: u32,
    pub affinity_timeout_s: u32,
    pub source_ranges: Vec<(IpAddr, u8)>,
    /// The set of clients in the cluster, and of clients from outside the node.
    pub backends: usize,
    pub outside: usize,
}

/// The frontends of one Service (or any group the caller forms) and the distinct backend sets
/// they use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupPlan {
    pub sets: Vec<DesiredSet>,
    /// In key order.
    pub frontends: Vec<PlannedFrontend>,
}

impl GroupPlan {
    pub fn new<'a>(frontends: impl IntoIterator<Item = (&'a FrontendKey, &'a DesiredService)>) -> Self {
        let mut plan = Self::default();
        for (key, service) in frontends {
            let outside = DesiredSet::of(key.proto, &service.backends, &service.draining, service.maglev);
            let in_cluster = match service.external.as_ref().and_then(|e| e.in_cluster.as_ref()) {
                Some(addrs) => DesiredSet::of(key.proto, &addrs.backends, &addrs.draining, service.maglev),
                None => outside.clone(),
            };
            let backends = plan.set_index(in_cluster);
            let outside = plan.set_index(outside);
            plan.frontends.push(PlannedFrontend {
                key: *key,
                name: service.name.clone(),
                cluster_ip: service.cluster_ip,
                flags: flags(service),
                affinity_timeout_s: service.affinity_timeout.unwrap_or(0),
                source_ranges: service
                    .external
                    .iter()
                    .flat_map(|e| e.source_ranges.iter().flatten())
                    .copied()
                    .collect(),
                backends,
                outside,
            });
        }
        plan.frontends.sort_by_key(|f| f.key);
        plan
    }

    fn set_index(&mut self, set: DesiredSet) -> usize {
        match self.sets.iter().position(|s| *s == set) {
            Some(index) => index,
            None => {
                self.sets.push(set);
                self.sets.len() - 1
            }
        }
    }
}

fn flags(service: &DesiredService) -> u32 {
    let mut flags = 0;
    if service.affinity_timeout.is_some() {
        flags |= service_flags::AFFINITY;
    }
    match &service.external {
        Some(External { local: true, .. }) => flags |= service_flags::EXTERNAL_LOCAL,
        Some(External { local: false, .. }) => flags |= service_flags::EXTERNAL_SNAT,
        None => {}
    }
    if service
        .external
        .as_ref()
        .is_some_and(|e| e.source_ranges.is_some())
    {
        flags |= service_flags::SOURCE_RANGES;
    }
    flags
}
