//! Field-level validation, the subset of the API server's that the model relies on. In manifest
//! mode nothing else checks what a user wrote, so every rule names the field it concerns.
use std::{collections::BTreeMap, fmt, net::IpAddr};

use k8s_openapi::{
    api::{
        core::v1::{Pod, Service, ServiceSpec},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::selector::label_value;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// JSON-path-like location, e.g. `spec.ports[0].port`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }
}

pub fn validate_service(service: &Service) -> Vec<FieldError> {
    let mut errors = Errors::default();
    if service.metadata.name.as_deref().is_none_or(str::is_empty) {
        errors.add("metadata.name", "is required");
    }
    labels(&mut errors, "metadata.labels", service.metadata.labels.as_ref());
    let Some(spec) = service.spec.as_ref() else {
        errors.add("spec", "is required");
        return errors.0;
    };
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    if !matches!(type_, "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName") {
        errors.add(
            "spec.type",
            format!("{type_:?} is not ClusterIP, NodePort, LoadBalancer or ExternalName"),
        );
    }
    if let Some(affinity) = spec.session_affinity.as_deref()
        && !matches!(affinity, "None" | "ClientIP")
    {
        errors.add(
            "spec.sessionAffinity",
            format!("{affinity:?} is not None or ClientIP"),
        );
    }
    if let Some(ip) = spec.cluster_ip.as_deref() {
        cluster_ip(&mut errors, "spec.clusterIP", ip);
    }
    for (i, ip) in spec.cluster_ips.iter().flatten().enumerate() {
        cluster_ip(&mut errors, &format!("spec.clusterIPs[{i}]"), ip);
    }
    ip_families(&mut errors, spec);
    labels(&mut errors, "spec.selector", spec.selector.as_ref());
    let ports = spec.ports.as_deref().unwrap_or_default();
    for (i, port) in ports.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        port_number(&mut errors, &format!("{path}.port"), port.port);
        let protocol = port.protocol.as_deref().unwrap_or("TCP");
        if !matches!(protocol, "TCP" | "UDP" | "SCTP") {
            errors.add(
                format!("{path}.protocol"),
                format!("{protocol:?} is not TCP, UDP or SCTP"),
            );
        }
        match &port.target_port {
            Some(IntOrString::Int(n)) => port_number(&mut errors, &format!("{path}.targetPort"), *n),
            Some(IntOrString::String(name)) if !is_port_name(name) => errors.add(
                format!("{path}.targetPort"),
                format!("{name:?} is neither a number nor a port name (≤ 15 lowercase letters, digits, '-')"),
            ),
            _ => {}
        }
        if ports.len() > 1 && port.name.as_deref().is_none_or(str::is_empty) {
            errors.add(
                format!("{path}.name"),
                "is required when a Service has more than one port",
            );
        }
    }
    errors.0
}

pub fn validate_pod(pod: &Pod) -> Vec<FieldError> {
    let mut errors = Errors::default();
    if pod.metadata.name.as_deref().is_none_or(str::is_empty) {
        errors.add("metadata.name", "is required");
    }
    labels(&mut errors, "metadata.labels", pod.metadata.labels.as_ref());
    for (c, container) in pod.spec.iter().flat_map(|s| s.containers.iter()).enumerate() {
        for (p, port) in container.ports.iter().flatten().enumerate() {
            port_number(
                &mut errors,
                &format!("spec.containers[{c}].ports[{p}].containerPort"),
                port.container_port,
            );
        }
    }
    if let Some(status) = pod.status.as_ref() {
        if let Some(ip) = status.pod_ip.as_deref()
            && ip.parse::<IpAddr>().is_err()
        {
            errors.add("status.podIP", format!("{ip:?} is not an IP address"));
        }
        for (i, ip) in status.pod_ips.iter().flatten().enumerate() {
            if ip.ip.parse::<IpAddr>().is_err() {
                errors.add(
                    format!("status.podIPs[{i}].ip"),
                    format!("{:?} is not an IP address", ip.ip),
                );
            }
        }
    }
    errors.0
}

pub fn validate_endpoint_slice(slice: &EndpointSlice) -> Vec<FieldError> {
    let mut errors = Errors::default();
    if slice.metadata.name.as_deref().is_none_or(str::is_empty) {
        errors.add("metadata.name", "is required");
    }
    labels(&mut errors, "metadata.labels", slice.metadata.labels.as_ref());
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6" | "FQDN") {
        errors.add(
            "addressType",
            format!("{:?} is not IPv4, IPv6 or FQDN", slice.address_type),
        );
    }
    for (i, port) in slice.ports.iter().flatten().enumerate() {
        if let Some(number) = port.port {
            port_number(&mut errors, &format!("ports[{i}].port"), number);
        }
        let protocol = port.protocol.as_deref().unwrap_or("TCP");
        if !matches!(protocol, "TCP" | "UDP" | "SCTP") {
            errors.add(
                format!("ports[{i}].protocol"),
                format!("{protocol:?} is not TCP, UDP or SCTP"),
            );
        }
    }
    if slice.address_type != "FQDN" {
        for (i, endpoint) in slice.endpoints.iter().flatten().enumerate() {
            for (j, address) in endpoint.addresses.iter().enumerate() {
                if address.parse::<IpAddr>().is_err() {
                    errors.add(
                        format!("endpoints[{i}].addresses[{j}]"),
                        format!("{address:?} is not an IP address"),
                    );
                }
            }
        }
    }
    errors.0
}

fn cluster_ip(errors: &mut Errors, path: &str, ip: &str) {
    if !ip.is_empty() && ip != "None" && ip.parse::<IpAddr>().is_err() {
        errors.add(path, format!("{ip:?} is not an IP address"));
    }
}

/// The API server's dual-stack rules, which the model relies on to give each family the
/// ClusterIP listed for it: `spec.ipFamilies` names each family once; `spec.clusterIPs` holds
/// at most one address of each, the first being `spec.clusterIP`, and the i-th of the family
/// `spec.ipFamilies[i]` names.
fn ip_families(errors: &mut Errors, spec: &ServiceSpec) {
    let families = spec.ip_families.as_deref().unwrap_or_default();
    for (i, family) in families.iter().enumerate() {
        if !matches!(family.as_str(), "IPv4" | "IPv6") {
            errors.add(
                format!("spec.ipFamilies[{i}]"),
                format!("{family:?} is not IPv4 or IPv6"),
            );
        } else if families[..i].contains(family) {
            errors.add(
                format!("spec.ipFamilies[{i}]"),
                format!("{family} is listed twice"),
            );
        }
    }
    let cluster_ips = spec.cluster_ips.as_deref().unwrap_or_default();
    if let (Some(ip), Some(first)) = (&spec.cluster_ip, cluster_ips.first())
        && ip != first
    {
        errors.add(
            "spec.clusterIPs[0]",
            format!("{first:?} is not spec.clusterIP ({ip:?})"),
        );
    }
    let parsed: Vec<Option<IpAddr>> = cluster_ips.iter().map(|ip| ip.parse().ok()).collect();
    for (i, ip) in parsed.iter().enumerate() {
        let Some(ip) = ip else {
            continue;
        };
        let (family, other_family) = if ip.is_ipv4() {
            ("IPv4", "IPv6")
        } else {
            ("IPv6", "IPv4")
        };
        if parsed[..i]
            .iter()
            .flatten()
            .any(|other| other.is_ipv4() == ip.is_ipv4())
        {
            errors.add(
                format!("spec.clusterIPs[{i}]"),
                format!("{ip} is a second {family} address (at most one of each family)"),
            );
        } else if families.get(i).is_some_and(|listed| listed == other_family) {
            errors.add(
                format!("spec.clusterIPs[{i}]"),
                format!("{ip} is an {family} address, but spec.ipFamilies[{i}] is {other_family}"),
            );
        }
    }
}

fn port_number(errors: &mut Errors, path: &str, port: i32) {
    if !(1..=65535).contains(&port) {
        errors.add(path, format!("{port} is out of range 1-65535"));
    }
}

fn labels(errors: &mut Errors, path: &str, labels: Option<&BTreeMap<String, String>>) {
    for (key, value) in labels.into_iter().flatten() {
        if let Err(reason) = label_value(value) {
            errors.add(format!("{path}.{key}"), reason);
        }
    }
}

/// IANA service name: what a named `targetPort` must be.
fn is_port_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
}
