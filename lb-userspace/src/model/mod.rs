//! The pure model: Kubernetes objects in, service frontends with their backends out.
//!
//! Every Kubernetes Service semantic lives here and nowhere else; there is no I/O, so the rules are
//! unit-tested directly. Sources feed it typed k8s-openapi objects; the reconciler consumes its
//! [`Frontend`]s.
mod endpoints;
pub mod explain;
pub mod selector;
pub mod slice;
mod topology;
pub mod trim;
mod validate;

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
};

use k8s_openapi::api::{
    core::v1::{Pod, Service, ServicePort, ServiceSpec},
    discovery::v1::EndpointSlice,
};

pub use self::{
    slice::Slice,
    validate::{FieldError, validate_endpoint_slice, validate_pod, validate_service},
};

/// Services carrying this label belong to another proxy.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Services carrying this label are headless whatever their spec says.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The Node label holding its zone, which topology hints refer to.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Session affinity timeout when `sessionAffinityConfig` does not give one (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10_800;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub const ALL: [Self; 3] = [Self::Tcp, Self::Udp, Self::Sctp];

    /// The protocol of a Service or container port (`TCP` when unset); `None` for one
    /// Kubernetes does not define.
    pub fn from_k8s(protocol: Option<&str>) -> Option<Self> {
        let protocol = protocol.unwrap_or("TCP");
        Self::ALL.into_iter().find(|p| p.as_str() == protocol)
    }

    /// The IP protocol number, as the maps key frontends.
    pub fn ip_protocol(self) -> u8 {
        match self {
            Self::Tcp => lb_common::IPPROTO_TCP,
            Self::Udp => lb_common::IPPROTO_UDP,
            Self::Sctp => lb_common::IPPROTO_SCTP,
        }
    }

    pub fn from_ip_protocol(number: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.ip_protocol() == number)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a client dials, as every command prints it: `10.96.0.10:80/TCP`, `[fd00::10]:80/TCP`.
pub fn dialled(address: IpAddr, port: u16, protocol: impl fmt::Display) -> String {
    format!("{}/{protocol}", SocketAddr::new(address, port))
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

/// How clients reach a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    ClusterIp,
    /// Every node address at `port` (the frontend's address is the unspecified address of its
    /// family).
    NodePort,
    LoadBalancer,
    ExternalIp,
}

impl FrontendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIp => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
            Self::ExternalIp => "ExternalIP",
        }
    }

    /// Traffic from outside the cluster, subject to `externalTrafficPolicy`.
    pub fn is_external(self) -> bool {
        self != Self::ClusterIp
    }
}

/// The annotation choosing a Service's backend selection, overriding the agent's default.
pub const LB_ALGORITHM_ANNOTATION: &str = "switchboard.io/lb-algorithm";

/// How a new flow's backend is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum LbAlgorithm {
    /// Maglev consistent hashing of the flow: every node picks the same backend, and a backend
    /// change moves few flows.
    #[default]
    Maglev,
    /// Uniformly at random.
    Random,
}

impl LbAlgorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Maglev => "maglev",
            Self::Random => "random",
        }
    }
}

/// One address:port/protocol that clients dial, and the endpoints behind it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub service: ServiceName,
    /// The Service port's name (may be empty for a single-port Service).
    pub port_name: String,
    pub kind: FrontendKind,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// Endpoints new connections may go to, sorted by address and port. Empty: the service has
    /// no endpoints and connections to it fail. On an external frontend, those of clients from
    /// outside the node (see `in_cluster`).
    pub backends: Vec<Endpoint>,
    /// Serving endpoints that are not in `backends` (terminating while a ready one exists, or
    /// left out by a traffic policy or topology hints): they keep the connections they have but
    /// get no new one.
    pub draining: Vec<Endpoint>,
    /// On an external frontend with `externalTrafficPolicy: Local`, the endpoints of clients in
    /// the cluster (pods, and the node's own processes): the cluster-wide ones, as kube-proxy
    /// sends them (the policy restricts only clients from outside to this node's endpoints).
    /// `None`: `backends` serve every client.
    pub in_cluster: Option<Endpoints>,
    pub policy: Policy,
    /// The Service's `switchboard.io/lb-algorithm` annotation; `None`: the agent's default.
    pub algorithm: Option<LbAlgorithm>,
}

impl Frontend {
    /// `10.96.0.10:80/TCP`, `[fd00::10]:80/TCP`.
    pub fn dialled(&self) -> String {
        dialled(self.address, self.port, self.protocol)
    }
}

/// The endpoints new connections go to, and the ones draining, of one kind of client.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Endpoints {
    pub backends: Vec<Endpoint>,
    pub draining: Vec<Endpoint>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub address: IpAddr,
    pub port: u16,
    /// The pod behind the endpoint, for people reading status output.
    pub pod: String,
    /// The node it runs on, when known (traffic policies `Local` use it).
    pub node_name: Option<String>,
    pub zone: Option<String>,
    /// Serving but terminating: used only while no ready endpoint exists.
    pub terminating: bool,
    /// `hints.forZones`: the zones whose nodes should use it (topology-aware routing).
    pub zone_hints: Vec<String>,
    /// `hints.forNodes`: the nodes that should use it.
    pub node_hints: Vec<String>,
}

impl Endpoint {
    /// `10.244.0.10:3000`, `[fd00:10::1]:3000`.
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }
}

/// The per-Service settings a frontend carries to the datapath.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// `sessionAffinity: ClientIP`, with its timeout in seconds.
    pub affinity_timeout_seconds: Option<u32>,
    /// `externalTrafficPolicy: Local` (external frontends only use this node's endpoints).
    pub external_local: bool,
    /// `internalTrafficPolicy: Local` (the ClusterIP only uses this node's endpoints).
    pub internal_local: bool,
    /// `loadBalancerSourceRanges` (CIDRs), applying to LoadBalancer frontends only.
    pub source_ranges: Vec<String>,
    pub health_check_node_port: Option<u16>,
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

/// Where a Service's endpoints come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum EndpointsFrom {
    /// EndpointSlices, as a cluster publishes them (the only source for selector-less Services).
    #[default]
    Slices,
    /// The Service's label selector evaluated against Pods; selector-less Services still use
    /// EndpointSlices.
    Pods,
}

/// Everything the model reads, as plain lists (the one-shot commands and the tests).
#[derive(Clone, Copy, Debug, Default)]
pub struct Input<'a> {
    pub services: &'a [Service],
    pub pods: &'a [Pod],
    pub endpoint_slices: &'a [EndpointSlice],
    pub endpoints_from: EndpointsFrom,
    /// This node's name, for traffic policies `Local`; without it no endpoint is local.
    pub node_name: Option<&'a str>,
    /// This node's zone (`topology.kubernetes.io/zone`), for topology-aware routing.
    pub zone: Option<&'a str>,
}

impl Input<'_> {
    /// What the model knows of this node and the agent's settings.
    pub fn context(&self) -> Context<'_> {
        Context {
            endpoints_from: self.endpoints_from,
            node_name: self.node_name,
            zone: self.zone,
        }
    }
}

/// The settings and node identity every Service's computation shares.
#[derive(Clone, Copy, Debug, Default)]
pub struct Context<'a> {
    pub endpoints_from: EndpointsFrom,
    /// This node's name, for traffic policies `Local`; without it no endpoint is local.
    pub node_name: Option<&'a str>,
    /// This node's zone (`topology.kubernetes.io/zone`), for topology-aware routing.
    pub zone: Option<&'a str>,
}

/// What the model reads besides a Service itself, indexed by whoever holds the objects (the
/// agent's store, or [`compute`]'s index over an [`Input`]).
pub trait Objects {
    /// The EndpointSlices labelled `kubernetes.io/service-name` for `service`.
    fn endpoint_slices(&self, service: &ServiceName) -> Vec<&Slice>;
    /// Pods of `namespace` that may match the equality `selector` (never empty): at least every
    /// one that does; the model matches them again.
    fn pods(&self, namespace: &str, selector: &BTreeMap<String, String>) -> Vec<&Pod>;
}

/// Computes every frontend from Services and the Pods their selectors match.
pub fn build(services: &[Service], pods: &[Pod]) -> Model {
    compute(&Input {
        services,
        pods,
        endpoint_slices: &[],
        endpoints_from: EndpointsFrom::Pods,
        node_name: None,
        zone: None,
    })
}

/// Computes every frontend of every proxied Service with its endpoints.
pub fn compute(input: &Input<'_>) -> Model {
    let objects = InputIndex::new(input);
    let context = input.context();
    let mut model = Model::default();
    for service in input.services {
        let one = compute_service(service, &objects, &context);
        model.frontends.extend(one.frontends);
        model.warnings.extend(one.warnings);
    }
    model.frontends.sort_by(|a, b| {
        (&a.service, a.kind, a.address, a.port, a.protocol)
            .cmp(&(&b.service, b.kind, b.address, b.port, b.protocol))
    });
    model
}

/// The frontends of one Service (none when it is not proxied or not valid) and the warnings
/// about it, from its EndpointSlices or Pods as `objects` holds them.
pub fn compute_service(service: &Service, objects: &impl Objects, context: &Context<'_>) -> Model {
    let mut model = Model::default();
    let Some(name) = service_name(service) else {
        return model;
    };
    if let Some(reason) = skip_reason(service) {
        tracing::debug!(service = %name, reason, "not proxied");
        return model;
    }
    // What an API server already refused, a manifest source already reported; this catches
    // the rest (an older API server, a hand-made object) before it reaches the maps.
    let errors = validate_service(service);
    if !errors.is_empty() {
        for error in errors {
            model.warn(&name, &format!("{error}; the Service is not programmed"));
        }
        return model;
    }
    let spec = service.spec.as_ref().expect("skip_reason checks the spec");
    let cluster_ips = parsed_ips(cluster_ip_texts(spec));
    if cluster_ips.is_empty() {
        model.warn(
            &name,
            "has no spec.clusterIP; without an API server to allocate one, set it in the manifest",
        );
        return model;
    }
    let policy = policy(spec);
    let algorithm = match service
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(LB_ALGORITHM_ANNOTATION))
    {
        None => None,
        Some(value) => match value.as_str() {
            "maglev" => Some(LbAlgorithm::Maglev),
            "random" => Some(LbAlgorithm::Random),
            other => {
                model.warn(
                    &name,
                    &format!(
                        "{LB_ALGORITHM_ANNOTATION}: {other:?} is not maglev or random; using the default"
                    ),
                );
                None
            }
        },
    };
    for range in &policy.source_ranges {
        if parse_cidr(range).is_none() {
            model.warn(
                &name,
                &format!("loadBalancerSourceRanges: {range:?} is not a CIDR; it admits no client"),
            );
        }
    }
    if (policy.internal_local || policy.external_local) && context.node_name.is_none() {
        model.warn(&name, "has a traffic policy Local but this node's name is unknown (--node-name): no endpoint counts as local");
    }
    for port in spec.ports.iter().flatten() {
        // Validation has refused a protocol Kubernetes does not define.
        let Some(protocol) = Protocol::from_k8s(port.protocol.as_deref()) else {
            continue;
        };
        let Ok(port_number) = u16::try_from(port.port) else {
            continue;
        };
        for (kind, address, frontend_port) in
            frontend_addresses(service, spec, &cluster_ips, port, port_number)
        {
            let serving = endpoints::candidates(
                objects,
                context.endpoints_from,
                service,
                &name,
                port,
                protocol,
                address.is_ipv4(),
            );
            let mut candidates = serving.clone();
            // Traffic policy Local: only this node's endpoints, and none (so the traffic is
            // dropped) when it has none.
            let local = if kind.is_external() {
                policy.external_local
            } else {
                policy.internal_local
            };
            // Clients in the cluster reaching an external frontend of a Service with
            // externalTrafficPolicy Local get the cluster-wide endpoints (kube-proxy's
            // "short-circuit pod traffic" and "local traffic").
            let in_cluster = (kind.is_external() && local).then(|| {
                let backends =
                    endpoints::usable(topology::filter(serving.clone(), context.node_name, context.zone));
                let draining = endpoints::draining(serving.clone(), &backends);
                Endpoints { backends, draining }
            });
            if local {
                candidates
                    .retain(|e| context.node_name.is_some() && e.node_name.as_deref() == context.node_name);
            } else {
                candidates = topology::filter(candidates, context.node_name, context.zone);
            }
            let backends = endpoints::usable(candidates);
            let draining = endpoints::draining(serving, &backends);
            model.frontends.push(Frontend {
                service: name.clone(),
                port_name: port.name.clone().unwrap_or_default(),
                kind,
                address,
                port: frontend_port,
                protocol,
                backends,
                draining,
                in_cluster,
                policy: policy.clone(),
                algorithm,
            });
        }
    }
    model.frontends.sort_by(|a, b| {
        (a.kind, a.address, a.port, a.protocol).cmp(&(b.kind, b.address, b.port, b.protocol))
    });
    model
}

/// [`Objects`] over the slices of an [`Input`]: slices by Service, pods by namespace.
struct InputIndex<'a> {
    pods: BTreeMap<&'a str, Vec<&'a Pod>>,
    slices: BTreeMap<ServiceName, Vec<Slice>>,
}

impl<'a> InputIndex<'a> {
    fn new(input: &Input<'a>) -> Self {
        let mut index = Self {
            pods: BTreeMap::new(),
            slices: BTreeMap::new(),
        };
        for pod in input.pods {
            let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
            index.pods.entry(namespace).or_default().push(pod);
        }
        let mut names = slice::Names::default();
        for slice in input.endpoint_slices {
            if let Some(slice) = Slice::new(slice, &mut names) {
                index.slices.entry(slice.service.clone()).or_default().push(slice);
            }
        }
        index
    }
}

impl Objects for InputIndex<'_> {
    fn endpoint_slices(&self, service: &ServiceName) -> Vec<&Slice> {
        self.slices
            .get(service)
            .map(|s| s.iter().collect())
            .unwrap_or_default()
    }

    fn pods(&self, namespace: &str, _selector: &BTreeMap<String, String>) -> Vec<&Pod> {
        self.pods.get(namespace).cloned().unwrap_or_default()
    }
}

/// The Service an EndpointSlice belongs to, by its `kubernetes.io/service-name` label; slices
/// without it belong to none.
pub fn slice_service(slice: &EndpointSlice) -> Option<ServiceName> {
    let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some(ServiceName {
        namespace: slice
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: name.clone(),
    })
}

/// Whether a Service with this `spec.selector` takes Pods with these labels as endpoints when
/// endpoints come from Pods: it has a selector, and the labels match it.
pub fn selects(
    selector: Option<&BTreeMap<String, String>>,
    labels: Option<&BTreeMap<String, String>>,
) -> bool {
    let Some(selector) = selector else {
        return false;
    };
    let no_labels = BTreeMap::new();
    !selector.is_empty() && selector::Selector::from_map(selector).matches(labels.unwrap_or(&no_labels))
}

impl Model {
    /// The frontends grouped by Service, as the reconciler takes them.
    pub fn by_service(&self) -> BTreeMap<ServiceName, Vec<Frontend>> {
        let mut services: BTreeMap<ServiceName, Vec<Frontend>> = BTreeMap::new();
        for frontend in &self.frontends {
            services
                .entry(frontend.service.clone())
                .or_default()
                .push(frontend.clone());
        }
        services
    }

    fn warn(&mut self, service: &ServiceName, message: &str) {
        self.warnings.push(Warning {
            object: format!("Service {service}"),
            message: message.to_owned(),
        });
    }
}

pub fn service_name(service: &Service) -> Option<ServiceName> {
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

/// `spec.clusterIPs`, or `spec.clusterIP` when the list is absent.
fn cluster_ip_texts(spec: &ServiceSpec) -> Vec<&str> {
    match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    }
}

/// Parsable addresses only; validation reports the others.
fn parsed_ips<'a>(texts: impl IntoIterator<Item = &'a str>) -> Vec<IpAddr> {
    texts.into_iter().filter_map(|ip| ip.parse().ok()).collect()
}

/// Every (kind, address, port) a Service port is reachable at.
fn frontend_addresses(
    service: &Service,
    spec: &ServiceSpec,
    cluster_ips: &[IpAddr],
    port: &ServicePort,
    port_number: u16,
) -> Vec<(FrontendKind, IpAddr, u16)> {
    let mut addresses: Vec<_> = cluster_ips
        .iter()
        .map(|ip| (FrontendKind::ClusterIp, *ip, port_number))
        .collect();
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    if matches!(type_, "NodePort" | "LoadBalancer")
        && let Some(node_port) = port.node_port.and_then(|p| u16::try_from(p).ok())
    {
        for family_ip in cluster_ips {
            let any = if family_ip.is_ipv4() {
                IpAddr::from([0u8; 4])
            } else {
                IpAddr::from([0u8; 16])
            };
            addresses.push((FrontendKind::NodePort, any, node_port));
        }
    }
    if type_ == "LoadBalancer" {
        let ingress = service
            .status
            .iter()
            .flat_map(|s| s.load_balancer.iter())
            .flat_map(|lb| lb.ingress.iter().flatten());
        // ipMode Proxy means the load balancer delivers to the node, not to the VIP.
        let vips = ingress.filter(|i| i.ip_mode.as_deref().is_none_or(|mode| mode == "VIP"));
        for ip in parsed_ips(vips.filter_map(|i| i.ip.as_deref())) {
            addresses.push((FrontendKind::LoadBalancer, ip, port_number));
        }
    }
    for ip in parsed_ips(spec.external_ips.iter().flatten().map(String::as_str)) {
        addresses.push((FrontendKind::ExternalIp, ip, port_number));
    }
    addresses
}

/// `address/prefix` (`10.0.0.0/8`, `2001:db8::/32`); a bare address is a single host. The
/// address is masked to the prefix.
pub fn parse_cidr(cidr: &str) -> Option<(IpAddr, u8)> {
    let (address, prefix) = match cidr.trim().split_once('/') {
        Some((address, prefix)) => (address.parse::<IpAddr>().ok()?, Some(prefix.parse::<u8>().ok()?)),
        None => (cidr.trim().parse::<IpAddr>().ok()?, None),
    };
    Some(match address {
        IpAddr::V4(v4) => {
            let prefix = prefix.unwrap_or(32);
            let mask = u32::MAX
                .checked_shl(32u32.checked_sub(prefix.into())?)
                .unwrap_or(0);
            (IpAddr::from((u32::from(v4) & mask).to_be_bytes()), prefix)
        }
        IpAddr::V6(v6) => {
            let prefix = prefix.unwrap_or(128);
            let mask = u128::MAX
                .checked_shl(128u32.checked_sub(prefix.into())?)
                .unwrap_or(0);
            (IpAddr::from((u128::from(v6) & mask).to_be_bytes()), prefix)
        }
    })
}

fn policy(spec: &ServiceSpec) -> Policy {
    let affinity_timeout_seconds = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECONDS)
    });
    Policy {
        affinity_timeout_seconds,
        external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        source_ranges: spec.load_balancer_source_ranges.clone().unwrap_or_default(),
        health_check_node_port: spec.health_check_node_port.and_then(|p| u16::try_from(p).ok()),
    }
}

#[cfg(test)]
mod tests;
