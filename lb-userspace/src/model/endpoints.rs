//! A Service port's endpoints, from EndpointSlices or from the Pods its selector matches. Either
//! way: ready endpoints; serving but terminating ones only when none is ready, so connections
//! drain to them rather than fail.
use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::{
    api::core::v1::{Pod, Service, ServicePort},
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::{Endpoint, EndpointsFrom, Objects, Protocol, ServiceName, selector::Selector, slice::Slice};

/// Every serving endpoint of one Service port in one address family, before [`usable`] picks
/// the ready ones.
pub(super) fn candidates(
    objects: &impl Objects,
    endpoints_from: EndpointsFrom,
    service: &Service,
    name: &ServiceName,
    port: &ServicePort,
    protocol: Protocol,
    ipv4: bool,
) -> Vec<Endpoint> {
    let selector = service.spec.as_ref().and_then(|s| s.selector.as_ref());
    // Pods are only consulted through a selector; a Service without one has its endpoints
    // written for it as EndpointSlices.
    match selector.filter(|s| endpoints_from == EndpointsFrom::Pods && !s.is_empty()) {
        Some(selector) => {
            let pods = objects.pods(&name.namespace, selector);
            from_pods(&Selector::from_map(selector), &pods, port, protocol, ipv4)
        }
        None => from_slices(&objects.endpoint_slices(name), port, protocol, ipv4),
    }
}

/// Ready endpoints if there are any, else the serving terminating ones; sorted, one per address
/// and port.
pub(super) fn usable(mut candidates: Vec<Endpoint>) -> Vec<Endpoint> {
    if candidates.iter().any(|e| !e.terminating) {
        candidates.retain(|e| !e.terminating);
    }
    candidates.sort();
    candidates.dedup_by(|a, b| a.address == b.address && a.port == b.port);
    candidates
}

/// The serving endpoints left out of `backends`, sorted, one per address and port: their
/// established connections must keep working while they finish.
pub(super) fn draining(mut serving: Vec<Endpoint>, backends: &[Endpoint]) -> Vec<Endpoint> {
    serving.retain(|e| {
        !backends
            .iter()
            .any(|b| b.address == e.address && b.port == e.port)
    });
    serving.sort();
    serving.dedup_by(|a, b| a.address == b.address && a.port == b.port);
    serving
}

/// Serving endpoints from EndpointSlices. Missing `ready`/`serving` mean true, missing
/// `terminating` false; only the first address of an endpoint counts; an address listed by two
/// slices counts once, preferring the non-terminating entry.
fn from_slices(slices: &[&Slice], port: &ServicePort, protocol: Protocol, ipv4: bool) -> Vec<Endpoint> {
    let mut by_address: BTreeMap<(IpAddr, u16), Endpoint> = BTreeMap::new();
    for slice in slices.iter().filter(|s| s.ipv4 == ipv4) {
        let Some(slice_port) = slice
            .ports
            .iter()
            .find(|p| *p.name == *port.name.as_deref().unwrap_or_default() && p.protocol == Some(protocol))
        else {
            continue;
        };
        let Some(number) = slice_port.port.filter(|p| *p != 0) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let usable = if endpoint.terminating {
                endpoint.serving
            } else {
                endpoint.ready
            };
            let address = endpoint.address;
            if !usable || address.is_ipv4() != ipv4 {
                continue;
            }
            let names = |names: &[std::sync::Arc<str>]| names.iter().map(|n| n.to_string()).collect();
            let candidate = Endpoint {
                address,
                port: number,
                pod: endpoint
                    .pod
                    .as_deref()
                    .map_or_else(|| address.to_string(), str::to_owned),
                node_name: endpoint.node_name.as_deref().map(str::to_owned),
                zone: endpoint.zone.as_deref().map(str::to_owned),
                terminating: endpoint.terminating,
                zone_hints: names(&endpoint.zone_hints),
                node_hints: names(&endpoint.node_hints),
            };
            by_address
                .entry((address, number))
                .and_modify(|existing| {
                    if existing.terminating && !candidate.terminating {
                        *existing = candidate.clone();
                    }
                })
                .or_insert(candidate);
        }
    }
    by_address.into_values().collect()
}

/// Serving endpoints from the Pods `selector` matches (an empty selector matches none).
fn from_pods(
    selector: &Selector,
    pods: &[&Pod],
    port: &ServicePort,
    protocol: Protocol,
    ipv4: bool,
) -> Vec<Endpoint> {
    if selector.is_empty() {
        return Vec::new();
    }
    let mut endpoints = Vec::new();
    for pod in pods {
        let no_labels = BTreeMap::new();
        if !selector.matches(pod.metadata.labels.as_ref().unwrap_or(&no_labels)) {
            continue;
        }
        let Some(state) = pod_state(pod) else {
            continue;
        };
        if !state.serving {
            continue;
        }
        let Some(address) = pod_ip(pod, ipv4) else {
            continue;
        };
        let Some(target) = target_port(pod, port, protocol) else {
            continue;
        };
        endpoints.push(Endpoint {
            address,
            port: target,
            pod: pod.metadata.name.clone().unwrap_or_default(),
            node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            zone: None,
            terminating: state.terminating,
            zone_hints: Vec::new(),
            node_hints: Vec::new(),
        });
    }
    endpoints
}

struct PodState {
    /// The Ready condition is True (for a terminating pod: it still serves).
    serving: bool,
    terminating: bool,
}

/// `None` for pods that have finished: they never serve again.
fn pod_state(pod: &Pod) -> Option<PodState> {
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let serving = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    Some(PodState {
        serving,
        terminating: pod.metadata.deletion_timestamp.is_some(),
    })
}

/// The pod's address in the frontend's family: `status.podIPs`, else `status.podIP`.
fn pod_ip(pod: &Pod, ipv4: bool) -> Option<IpAddr> {
    let status = pod.status.as_ref()?;
    let listed = status.pod_ips.iter().flatten().map(|ip| ip.ip.as_str());
    listed
        .chain(status.pod_ip.as_deref())
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .find(|ip| ip.is_ipv4() == ipv4)
}

/// `targetPort` for this pod: a number, a named container port of the same protocol (it may
/// differ between pods), or the Service port when unset. `None` when the name is not found.
fn target_port(pod: &Pod, port: &ServicePort, protocol: Protocol) -> Option<u16> {
    match &port.target_port {
        None => u16::try_from(port.port).ok(),
        Some(IntOrString::Int(number)) => u16::try_from(*number).ok().filter(|n| *n != 0),
        Some(IntOrString::String(name)) => pod
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| {
                p.name.as_deref() == Some(name.as_str())
                    && Protocol::from_k8s(p.protocol.as_deref()) == Some(protocol)
            })
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

#[cfg(test)]
mod tests;
