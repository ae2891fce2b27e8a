//! An EndpointSlice as the model reads it. At 100,000 Services × 10 endpoints the API's type
//! costs about 5 KB a slice (352 bytes an endpoint before its strings); this keeps what the rules
//! read, about a quarter of that, with node and zone names shared between endpoints.
use std::{collections::HashSet, net::IpAddr, sync::Arc};

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::{Protocol, ServiceName, slice_service};

/// Node and zone names, one copy each however many endpoints name them.
#[derive(Debug, Default)]
pub struct Names(HashSet<Arc<str>>);

impl Names {
    fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(shared) = self.0.get(name) {
            return shared.clone();
        }
        let shared: Arc<str> = name.into();
        self.0.insert(shared.clone());
        shared
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slice {
    /// The Service it belongs to (`kubernetes.io/service-name`).
    pub service: ServiceName,
    /// `addressType` IPv4; otherwise IPv6 (FQDN slices are not kept).
    pub ipv4: bool,
    pub ports: Box<[SlicePort]>,
    pub endpoints: Box<[SliceEndpoint]>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    pub name: Box<str>,
    /// `None`: a protocol Kubernetes does not define.
    pub protocol: Option<Protocol>,
    pub port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// The first address: only it counts.
    pub address: IpAddr,
    /// Conditions, defaulted as Kubernetes does: ready and serving when absent, not terminating.
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// `targetRef.name`.
    pub pod: Option<Box<str>>,
    pub node_name: Option<Arc<str>>,
    pub zone: Option<Arc<str>>,
    pub zone_hints: Box<[Arc<str>]>,
    pub node_hints: Box<[Arc<str>]>,
}

impl Slice {
    /// What the model reads of `slice`; `None` for a slice of no Service or of FQDNs.
    pub fn new(slice: &EndpointSlice, names: &mut Names) -> Option<Self> {
        let service = slice_service(slice)?;
        let ipv4 = match slice.address_type.as_str() {
            "IPv4" => true,
            "IPv6" => false,
            _ => return None,
        };
        let ports = slice
            .ports
            .iter()
            .flatten()
            .map(|p| SlicePort {
                name: p.name.as_deref().unwrap_or_default().into(),
                protocol: Protocol::from_k8s(p.protocol.as_deref()),
                port: p.port.and_then(|p| u16::try_from(p).ok()),
            })
            .collect();
        let endpoints = slice
            .endpoints
            .iter()
            .flatten()
            .filter_map(|endpoint| {
                let conditions = endpoint.conditions.as_ref();
                let hints = endpoint.hints.as_ref();
                Some(SliceEndpoint {
                    address: endpoint.addresses.first()?.parse().ok()?,
                    ready: conditions.and_then(|c| c.ready).unwrap_or(true),
                    serving: conditions.and_then(|c| c.serving).unwrap_or(true),
                    terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
                    pod: endpoint
                        .target_ref
                        .as_ref()
                        .and_then(|r| r.name.as_deref())
                        .map(Into::into),
                    node_name: endpoint.node_name.as_deref().map(|n| names.get(n)),
                    zone: endpoint.zone.as_deref().map(|z| names.get(z)),
                    zone_hints: hints
                        .iter()
                        .flat_map(|h| h.for_zones.iter().flatten())
                        .map(|z| names.get(&z.name))
                        .collect(),
                    node_hints: hints
                        .iter()
                        .flat_map(|h| h.for_nodes.iter().flatten())
                        .map(|n| names.get(&n.name))
                        .collect(),
                })
            })
            .collect();
        Some(Self {
            service,
            ipv4,
            ports,
            endpoints,
        })
    }
}
