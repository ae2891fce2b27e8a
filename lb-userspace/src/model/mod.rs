//! The pure model: Kubernetes objects in, service frontends with their backends out.
//!
//! Every Kubernetes Service semantic lives here and nowhere else; there is no I/O, so the rules are
//! unit-tested directly. Sources feed it typed k8s-openapi objects; the reconciler consumes its
//! [`Frontend`]s.
pub mod selector;
mod validate;

use std::{collections::BTreeMap, fmt, net::IpAddr};

use k8s_openapi::{
    api::core::v1::{Pod, Service, ServicePort},
    apimachinery::pkg::util::intstr::IntOrString,
};

use self::selector::Selector;
pub use self::validate::{FieldError, validate_pod, validate_service};

/// Services carrying this label belong to another proxy.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Services carrying this label are headless whatever their spec says.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The protocol of a Service or container port; `None` when the datapath cannot carry it.
    pub fn from_k8s(protocol: Option<&str>) -> Option<Self> {
        match protocol.unwrap_or("TCP") {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        }
    }
}

/// `namespace/name` of a Service.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One address:port/protocol that clients dial, and the endpoints behind it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub service: ServiceName,
    /// The Service port's name (may be empty for a single-port Service).
    pub port_name: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// Endpoints new connections may go to, sorted by address and port. Empty: the service has
    /// no endpoints and connections to it fail.
    pub backends: Vec<Endpoint>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub address: IpAddr,
    pub port: u16,
    /// The pod behind the endpoint, for people reading status output.
    pub pod: String,
}

/// Something in the input the model had to pass over, said about the object it concerns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    pub object: String,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.message)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Model {
    pub frontends: Vec<Frontend>,
    pub warnings: Vec<Warning>,
}

/// Computes every frontend from Services and the Pods their selectors match.
pub fn build(services: &[Service], pods: &[Pod]) -> Model {
    let mut model = Model::default();
    let pods_by_namespace = group_by_namespace(pods);
    for service in services {
        let Some(name) = service_name(service) else {
            continue;
        };
        if let Some(reason) = skip_reason(service) {
            tracing::debug!(service = %name, reason, "not proxied");
            continue;
        }
        let spec = service.spec.as_ref().expect("skip_reason checks the spec");
        let addresses = cluster_ips(service);
        if addresses.is_empty() {
            model.warn(
                &name,
                "has no spec.clusterIP; without an API server to allocate one, set it in the manifest",
            );
            continue;
        }
        let selector = spec.selector.as_ref().map(Selector::from_map).unwrap_or_default();
        let namespace_pods = pods_by_namespace
            .get(name.namespace.as_str())
            .map_or(&[][..], Vec::as_slice);
        for port in spec.ports.iter().flatten() {
            let Some(protocol) = Protocol::from_k8s(port.protocol.as_deref()) else {
                let protocol = port.protocol.as_deref().unwrap_or_default();
                model.warn(
                    &name,
                    &format!("port {}: protocol {protocol} is not supported yet", port.port),
                );
                continue;
            };
            let Ok(port_number) = u16::try_from(port.port) else {
                continue;
            };
            for &address in &addresses {
                let backends = endpoints(&selector, namespace_pods, port, protocol, address.is_ipv4());
                model.frontends.push(Frontend {
                    service: name.clone(),
                    port_name: port.name.clone().unwrap_or_default(),
                    address,
                    port: port_number,
                    protocol,
                    backends,
                });
            }
        }
    }
    model.frontends.sort_by(|a, b| {
        (&a.service, a.address, a.port, a.protocol).cmp(&(&b.service, b.address, b.port, b.protocol))
    });
    model
}

impl Model {
    fn warn(&mut self, service: &ServiceName, message: &str) {
        self.warnings.push(Warning {
            object: format!("Service {service}"),
            message: message.to_owned(),
        });
    }
}

fn service_name(service: &Service) -> Option<ServiceName> {
    Some(ServiceName {
        namespace: service
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: service.metadata.name.clone()?,
    })
}

/// Why a Service is not ours to proxy, if it is not.
fn skip_reason(service: &Service) -> Option<&'static str> {
    let labels = service.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL)) {
        return Some("labelled for another proxy");
    }
    if labels.is_some_and(|l| l.contains_key(HEADLESS_LABEL)) {
        return Some("labelled headless");
    }
    let Some(spec) = service.spec.as_ref() else {
        return Some("has no spec");
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Some("ExternalName");
    }
    if spec.cluster_ip.as_deref() == Some("None") {
        return Some("headless");
    }
    None
}

/// `spec.clusterIPs`, or `spec.clusterIP` when the list is absent; unparsable entries are left to
/// validation, which reports them.
fn cluster_ips(service: &Service) -> Vec<IpAddr> {
    let Some(spec) = service.spec.as_ref() else {
        return Vec::new();
    };
    let listed = spec.cluster_ips.iter().flatten();
    let single = spec.cluster_ip.iter();
    let texts: Vec<&String> = if spec.cluster_ips.as_ref().is_some_and(|ips| !ips.is_empty()) {
        listed.collect()
    } else {
        single.collect()
    };
    texts.into_iter().filter_map(|ip| ip.parse().ok()).collect()
}

fn group_by_namespace(pods: &[Pod]) -> BTreeMap<&str, Vec<&Pod>> {
    let mut groups: BTreeMap<&str, Vec<&Pod>> = BTreeMap::new();
    for pod in pods {
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        groups.entry(namespace).or_default().push(pod);
    }
    groups
}

/// The endpoints of one Service port: ready pods; serving but terminating pods only when no pod
/// is ready, so connections drain to them rather than fail.
fn endpoints(
    selector: &Selector,
    pods: &[&Pod],
    port: &ServicePort,
    protocol: Protocol,
    ipv4: bool,
) -> Vec<Endpoint> {
    // An empty or absent selector selects no pods (its endpoints are managed elsewhere).
    if selector.is_empty() {
        return Vec::new();
    }
    let (mut ready, mut terminating) = (Vec::new(), Vec::new());
    for pod in pods {
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        if !selector.matches(&labels) {
            continue;
        }
        let Some(state) = pod_state(pod) else { continue };
        if !state.serving {
            continue;
        }
        let Some(address) = pod_ip(pod, ipv4) else {
            continue;
        };
        let Some(target) = target_port(pod, port, protocol) else {
            continue;
        };
        let endpoint = Endpoint {
            address,
            port: target,
            pod: pod.metadata.name.clone().unwrap_or_default(),
        };
        if state.terminating {
            terminating.push(endpoint);
        } else {
            ready.push(endpoint);
        }
    }
    let mut chosen = if ready.is_empty() { terminating } else { ready };
    chosen.sort();
    chosen.dedup_by(|a, b| a.address == b.address && a.port == b.port);
    chosen
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
