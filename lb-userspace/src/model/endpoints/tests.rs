//! EndpointSlice rules, frontend kinds and policies, through the model's public entry point.
use std::net::IpAddr;

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::{Value, json};

use crate::model::{EndpointsFrom, Frontend, FrontendKind, Input, Model, Protocol, compute};

fn service(spec: Value) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": spec,
    }))
    .unwrap()
}

fn web_service() -> Service {
    service(json!({"clusterIP": "10.96.0.10", "selector": {"app": "web"},
                   "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]}))
}

fn slice(name: &str, labels: Value, body: Value) -> EndpointSlice {
    let mut object = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
    });
    object
        .as_object_mut()
        .unwrap()
        .extend(body.as_object().unwrap().clone());
    serde_json::from_value(object).unwrap()
}

fn web_slice(name: &str, endpoints: Value) -> EndpointSlice {
    slice(
        name,
        json!({"kubernetes.io/service-name": "web"}),
        json!({"endpoints": endpoints}),
    )
}

fn model(services: &[Service], slices: &[EndpointSlice]) -> Model {
    compute(&Input {
        services,
        pods: &[],
        endpoint_slices: slices,
        endpoints_from: EndpointsFrom::Slices,
        node_name: Some("node-a"),
        zone: None,
    })
}

fn cluster_ip(model: &Model) -> &Frontend {
    model
        .frontends
        .iter()
        .find(|f| f.kind == FrontendKind::ClusterIp)
        .expect("a ClusterIP frontend")
}

fn addresses(frontend: &Frontend) -> Vec<String> {
    frontend
        .backends
        .iter()
        .map(|e| e.socket_addr().to_string())
        .collect()
}

#[test]
fn missing_conditions_mean_ready_and_serving_and_not_terminating() {
    let m = model(
        &[web_service()],
        &[web_slice("a", json!([{"addresses": ["10.0.0.1"]}]))],
    );
    let backends = &cluster_ip(&m).backends;
    assert_eq!(addresses(cluster_ip(&m)), ["10.0.0.1:8080"]);
    assert!(!backends[0].terminating);
}

#[test]
fn not_ready_endpoints_are_left_out() {
    let m = model(
        &[web_service()],
        &[web_slice(
            "a",
            json!([{"addresses": ["10.0.0.1"], "conditions": {"ready": false}},
                   {"addresses": ["10.0.0.2"], "conditions": {"ready": true}}]),
        )],
    );
    assert_eq!(addresses(cluster_ip(&m)), ["10.0.0.2:8080"]);
}

#[test]
fn serving_terminating_endpoints_are_used_only_when_none_is_ready() {
    let terminating = json!({"addresses": ["10.0.0.1"], "conditions": {"ready": false, "serving": true, "terminating": true}});
    let not_serving = json!({"addresses": ["10.0.0.3"], "conditions": {"ready": false, "serving": false, "terminating": true}});
    let ready = json!({"addresses": ["10.0.0.2"]});
    let with_ready = model(
        &[web_service()],
        &[web_slice("a", json!([terminating, not_serving, ready]))],
    );
    assert_eq!(addresses(cluster_ip(&with_ready)), ["10.0.0.2:8080"]);

    let only_terminating = model(
        &[web_service()],
        &[web_slice("a", json!([terminating, not_serving]))],
    );
    let frontend = cluster_ip(&only_terminating);
    assert_eq!(
        addresses(frontend),
        ["10.0.0.1:8080"],
        "serving+terminating, never not-serving"
    );
    assert!(frontend.backends[0].terminating);
}

fn draining_addresses(frontend: &Frontend) -> Vec<String> {
    frontend
        .draining
        .iter()
        .map(|e| e.socket_addr().to_string())
        .collect()
}

/// A terminating endpoint that still serves keeps its connections while ready ones take the new
/// ones; one that no longer serves is not kept.
#[test]
fn serving_endpoints_left_out_drain_instead_of_disappearing() {
    let terminating = json!({"addresses": ["10.0.0.1"], "conditions": {"ready": false, "serving": true, "terminating": true}});
    let not_serving = json!({"addresses": ["10.0.0.3"], "conditions": {"ready": false, "serving": false, "terminating": true}});
    let ready = json!({"addresses": ["10.0.0.2"]});
    let m = model(
        &[web_service()],
        &[web_slice("a", json!([terminating, not_serving, ready]))],
    );
    assert_eq!(addresses(cluster_ip(&m)), ["10.0.0.2:8080"]);
    assert_eq!(draining_addresses(cluster_ip(&m)), ["10.0.0.1:8080"]);

    let only_terminating = model(
        &[web_service()],
        &[web_slice("a", json!([terminating, not_serving]))],
    );
    assert!(
        cluster_ip(&only_terminating).draining.is_empty(),
        "the fallback uses the terminating endpoint for new connections too"
    );
}

#[test]
fn only_the_first_address_of_an_endpoint_counts() {
    let m = model(
        &[web_service()],
        &[web_slice("a", json!([{"addresses": ["10.0.0.1", "10.0.0.9"]}]))],
    );
    assert_eq!(addresses(cluster_ip(&m)), ["10.0.0.1:8080"]);
}

#[test]
fn slices_without_the_service_name_label_or_of_another_service_are_ignored() {
    let unlabelled = slice(
        "a",
        json!({}),
        json!({"endpoints": [{"addresses": ["10.0.0.1"]}]}),
    );
    let other = slice(
        "b",
        json!({"kubernetes.io/service-name": "api"}),
        json!({"endpoints": [{"addresses": ["10.0.0.2"]}]}),
    );
    let m = model(&[web_service()], &[unlabelled, other]);
    assert!(cluster_ip(&m).backends.is_empty());
}

#[test]
fn duplicates_across_slices_collapse_preferring_the_non_terminating_entry() {
    let m = model(
        &[web_service()],
        &[
            web_slice(
                "a",
                json!([{"addresses": ["10.0.0.1"], "conditions": {"serving": true, "terminating": true}}]),
            ),
            web_slice(
                "b",
                json!([{"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.2"]}]),
            ),
        ],
    );
    let frontend = cluster_ip(&m);
    assert_eq!(addresses(frontend), ["10.0.0.1:8080", "10.0.0.2:8080"]);
    assert!(frontend.backends.iter().all(|e| !e.terminating));
}

#[test]
fn the_slice_port_is_the_one_named_like_the_service_port() {
    let svc = service(json!({"clusterIP": "10.96.0.10", "selector": {"app": "web"},
        "ports": [{"name": "http", "port": 80, "targetPort": "web"}, {"name": "metrics", "port": 9100}]}));
    let s = slice(
        "a",
        json!({"kubernetes.io/service-name": "web"}),
        json!({"ports": [{"name": "metrics", "port": 9102, "protocol": "TCP"}, {"name": "http", "port": 8443, "protocol": "TCP"}],
               "endpoints": [{"addresses": ["10.0.0.1"]}]}),
    );
    let m = model(&[svc], &[s]);
    let port = |p: u16| m.frontends.iter().find(|f| f.port == p).unwrap();
    assert_eq!(addresses(port(80)), ["10.0.0.1:8443"]);
    assert_eq!(addresses(port(9100)), ["10.0.0.1:9102"]);
}

#[test]
fn a_slice_of_the_other_family_or_fqdn_gives_nothing() {
    let v6 = slice(
        "a",
        json!({"kubernetes.io/service-name": "web"}),
        json!({"addressType": "IPv6", "endpoints": [{"addresses": ["fd00::1"]}]}),
    );
    let fqdn = slice(
        "b",
        json!({"kubernetes.io/service-name": "web"}),
        json!({"addressType": "FQDN", "endpoints": [{"addresses": ["db.example"]}]}),
    );
    let m = model(&[web_service()], &[v6, fqdn]);
    assert!(cluster_ip(&m).backends.is_empty());
}

/// A dual-stack Service's EndpointSlices come one per addressType: each family's frontend takes
/// the endpoints of its family's slices only, and an address of the other family listed in a
/// slice (which the API server would refuse) serves neither.
#[test]
fn each_family_takes_the_slices_of_its_address_type() {
    let svc = service(
        json!({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::10"],
        "ipFamilies": ["IPv4", "IPv6"], "selector": {"app": "web"},
        "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]}),
    );
    let of_type = |name: &str, address_type: &str, addresses: &[&str]| {
        let endpoints: Vec<Value> = addresses.iter().map(|a| json!({"addresses": [a]})).collect();
        slice(
            name,
            json!({"kubernetes.io/service-name": "web"}),
            json!({"addressType": address_type, "endpoints": endpoints}),
        )
    };
    let m = model(
        &[svc],
        &[
            of_type("web-v4", "IPv4", &["10.0.0.1", "fd00:10::9"]),
            of_type("web-v6", "IPv6", &["fd00:10::1", "fd00:10::2", "10.0.0.9"]),
            of_type("web-fqdn", "FQDN", &["db.example"]),
        ],
    );
    let of_family = |ipv4: bool| m.frontends.iter().find(|f| f.address.is_ipv4() == ipv4).unwrap();
    assert_eq!(addresses(of_family(true)), ["10.0.0.1:8080"]);
    assert_eq!(
        addresses(of_family(false)),
        ["[fd00:10::1]:8080", "[fd00:10::2]:8080"]
    );
}

#[test]
fn the_same_port_with_tcp_and_udp_is_two_frontends_with_their_own_endpoints() {
    let svc = service(json!({"clusterIP": "10.96.0.10", "selector": {"app": "dns"},
        "ports": [{"name": "dns", "protocol": "UDP", "port": 53}, {"name": "dns-tcp", "protocol": "TCP", "port": 53}]}));
    let s = slice(
        "a",
        json!({"kubernetes.io/service-name": "web"}),
        json!({"ports": [{"name": "dns", "protocol": "UDP", "port": 5353}, {"name": "dns-tcp", "protocol": "TCP", "port": 5354}],
               "endpoints": [{"addresses": ["10.0.0.1"]}]}),
    );
    let m = model(&[svc], &[s]);
    let udp = m.frontends.iter().find(|f| f.protocol == Protocol::Udp).unwrap();
    let tcp = m.frontends.iter().find(|f| f.protocol == Protocol::Tcp).unwrap();
    assert_eq!((udp.port, addresses(udp)), (53, vec!["10.0.0.1:5353".to_owned()]));
    assert_eq!((tcp.port, addresses(tcp)), (53, vec!["10.0.0.1:5354".to_owned()]));
}

#[test]
fn a_service_without_selector_takes_its_endpoints_from_slices_even_in_pods_mode() {
    let svc = service(
        json!({"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}),
    );
    let m = compute(&Input {
        services: &[svc],
        pods: &[],
        endpoint_slices: &[web_slice("manual", json!([{"addresses": ["192.0.2.7"]}]))],
        endpoints_from: EndpointsFrom::Pods,
        node_name: None,
        zone: None,
    });
    assert_eq!(addresses(cluster_ip(&m)), ["192.0.2.7:8080"]);
}

#[test]
fn node_ports_load_balancer_ips_and_external_ips_are_frontends_too() {
    let mut svc = service(json!({
        "type": "LoadBalancer", "clusterIP": "10.96.0.10", "selector": {"app": "web"},
        "externalIPs": ["198.51.100.9"],
        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}],
    }));
    svc.status = serde_json::from_value(json!({"loadBalancer": {"ingress": [
        {"ip": "203.0.113.1"}, {"ip": "203.0.113.2", "ipMode": "VIP"}, {"ip": "203.0.113.3", "ipMode": "Proxy"}]}}))
    .unwrap();
    let m = model(&[svc], &[web_slice("a", json!([{"addresses": ["10.0.0.1"]}]))]);
    let mut seen: Vec<(FrontendKind, IpAddr, u16)> =
        m.frontends.iter().map(|f| (f.kind, f.address, f.port)).collect();
    seen.sort();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(
        seen,
        [
            (FrontendKind::ClusterIp, ip("10.96.0.10"), 80),
            (FrontendKind::NodePort, ip("0.0.0.0"), 30080),
            (FrontendKind::LoadBalancer, ip("203.0.113.1"), 80),
            (FrontendKind::LoadBalancer, ip("203.0.113.2"), 80),
            (FrontendKind::ExternalIp, ip("198.51.100.9"), 80),
        ],
        "ipMode Proxy is not a VIP"
    );
    assert!(
        m.frontends.iter().all(|f| addresses(f) == ["10.0.0.1:8080"]),
        "every frontend has the endpoints"
    );
}

#[test]
fn affinity_traffic_policies_and_source_ranges_are_carried() {
    let svc = service(json!({
        "type": "LoadBalancer", "clusterIP": "10.96.0.10", "selector": {"app": "web"},
        "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
        "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
        "loadBalancerSourceRanges": ["192.0.2.0/24"],
        "ports": [{"name": "http", "port": 80, "nodePort": 30080}],
    }));
    let m = model(&[svc], &[]);
    let policy = &cluster_ip(&m).policy;
    assert_eq!(policy.affinity_timeout_seconds, Some(60));
    assert!(policy.external_local && policy.internal_local);
    assert_eq!(policy.source_ranges, ["192.0.2.0/24"]);
    assert_eq!(policy.health_check_node_port, Some(32000));

    let default_timeout = service(json!({"clusterIP": "10.96.0.10", "sessionAffinity": "ClientIP",
        "ports": [{"name": "http", "port": 80}]}));
    assert_eq!(
        cluster_ip(&model(&[default_timeout], &[]))
            .policy
            .affinity_timeout_seconds,
        Some(10_800)
    );
}

#[test]
fn traffic_policy_local_keeps_only_this_nodes_endpoints() {
    let endpoints = json!([
        {"addresses": ["10.0.0.1"], "nodeName": "node-a"},
        {"addresses": ["10.0.0.2"], "nodeName": "node-b"},
        {"addresses": ["10.0.0.3"], "nodeName": "node-b", "conditions": {"ready": false, "serving": true, "terminating": true}},
    ]);
    let internal = service(
        json!({"clusterIP": "10.96.0.10", "selector": {"app": "web"}, "internalTrafficPolicy": "Local",
        "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}),
    );
    let m = model(
        std::slice::from_ref(&internal),
        &[web_slice("a", endpoints.clone())],
    );
    assert_eq!(
        addresses(cluster_ip(&m)),
        ["10.0.0.1:8080"],
        "only node-a's endpoint"
    );
    assert_eq!(
        draining_addresses(cluster_ip(&m)),
        ["10.0.0.2:8080", "10.0.0.3:8080"],
        "the others keep the connections they have (switching the policy breaks none)"
    );

    let elsewhere = compute(&Input {
        services: &[internal],
        pods: &[],
        endpoint_slices: &[web_slice("a", endpoints.clone())],
        endpoints_from: EndpointsFrom::Slices,
        node_name: Some("node-c"),
        zone: None,
    });
    assert!(
        cluster_ip(&elsewhere).backends.is_empty(),
        "no local endpoint: none at all, so traffic is dropped"
    );

    let external = service(
        json!({"type": "NodePort", "clusterIP": "10.96.0.10", "selector": {"app": "web"},
        "externalTrafficPolicy": "Local", "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]}),
    );
    let m = model(&[external], &[web_slice("a", endpoints)]);
    let node_port = m
        .frontends
        .iter()
        .find(|f| f.kind == FrontendKind::NodePort)
        .unwrap();
    assert_eq!(
        addresses(node_port),
        ["10.0.0.1:8080"],
        "externalTrafficPolicy applies to the NodePort"
    );
    assert_eq!(
        addresses(cluster_ip(&m)),
        ["10.0.0.1:8080", "10.0.0.2:8080"],
        "and not to the ClusterIP"
    );
}

/// kube-proxy restricts only clients from outside the node to local endpoints: pods and the
/// node itself reaching a NodePort, LoadBalancer IP or externalIP of an eTP=Local Service get
/// every endpoint (its "short-circuit pod traffic" and "local traffic" rules).
#[test]
fn clients_in_the_cluster_of_an_external_local_frontend_get_every_endpoint() {
    let endpoints = json!([
        {"addresses": ["10.0.0.1"], "nodeName": "node-a"},
        {"addresses": ["10.0.0.2"], "nodeName": "node-b"},
        {"addresses": ["10.0.0.3"], "nodeName": "node-b", "conditions": {"ready": false, "serving": true, "terminating": true}},
    ]);
    let svc = service(json!({
        "type": "LoadBalancer", "clusterIP": "10.96.0.10", "selector": {"app": "web"},
        "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Local",
        "externalIPs": ["192.0.2.8"],
        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}],
    }));
    let m = model(&[svc], &[web_slice("a", endpoints)]);
    for frontend in m.frontends.iter().filter(|f| f.kind.is_external()) {
        assert_eq!(
            addresses(frontend),
            ["10.0.0.1:8080"],
            "{:?}: outside clients",
            frontend.kind
        );
        let in_cluster = frontend
            .in_cluster
            .as_ref()
            .expect("clients in the cluster differ");
        let every: Vec<String> = in_cluster
            .backends
            .iter()
            .map(|e| e.socket_addr().to_string())
            .collect();
        assert_eq!(
            every,
            ["10.0.0.1:8080", "10.0.0.2:8080"],
            "{:?}: not even internalTrafficPolicy narrows them",
            frontend.kind
        );
        let draining: Vec<String> = in_cluster
            .draining
            .iter()
            .map(|e| e.socket_addr().to_string())
            .collect();
        assert_eq!(draining, ["10.0.0.3:8080"]);
    }
    let cluster = cluster_ip(&m);
    assert_eq!(cluster.in_cluster, None, "a ClusterIP has one set of endpoints");
    assert_eq!(addresses(cluster), ["10.0.0.1:8080"], "iTP Local");
}

#[test]
fn a_local_policy_without_a_node_name_is_warned_about() {
    let svc = service(
        json!({"clusterIP": "10.96.0.10", "internalTrafficPolicy": "Local", "ports": [{"name": "http", "port": 80}]}),
    );
    let m = compute(&Input {
        services: &[svc],
        pods: &[],
        endpoint_slices: &[],
        endpoints_from: EndpointsFrom::Slices,
        node_name: None,
        zone: None,
    });
    assert!(
        m.warnings.iter().any(|w| w.message.contains("--node-name")),
        "{:?}",
        m.warnings
    );
}

#[test]
fn an_invalid_service_from_any_source_is_warned_about_by_name_and_left_out() {
    let bad = service(json!({"clusterIP": "10.96.0.10", "selector": {"app": "web"},
        "ports": [{"name": "http", "port": 70000, "targetPort": 8080}]}));
    let m = model(&[bad, web_service()], &[]);
    assert!(
        m.warnings
            .iter()
            .any(|w| w.object == "Service default/web" && w.message.contains("spec.ports[0].port")),
        "{:?}",
        m.warnings
    );
    assert_eq!(m.frontends.len(), 1, "the valid Service is still there");
}

fn model_in_zone(services: &[Service], slices: &[EndpointSlice], zone: Option<&str>) -> Model {
    compute(&Input {
        services,
        pods: &[],
        endpoint_slices: slices,
        endpoints_from: EndpointsFrom::Slices,
        node_name: Some("node-a"),
        zone,
    })
}

/// EndpointSlice hints, end to end: this zone's endpoints take new connections, the others
/// drain; hints are ignored when one ready endpoint lacks them, and under traffic policy Local.
#[test]
fn topology_hints_route_to_this_zones_endpoints() {
    let hinted = json!([
        {"addresses": ["10.0.0.1"], "zone": "zone-a", "hints": {"forZones": [{"name": "zone-a"}]}},
        {"addresses": ["10.0.0.2"], "zone": "zone-b", "hints": {"forZones": [{"name": "zone-b"}]}},
        {"addresses": ["10.0.0.3"], "nodeName": "node-a", "zone": "zone-b", "hints": {"forZones": [{"name": "zone-b"}]}},
    ]);
    let slices = [web_slice("a", hinted.clone())];
    let m = model_in_zone(&[web_service()], &slices, Some("zone-b"));
    assert_eq!(addresses(cluster_ip(&m)), ["10.0.0.2:8080", "10.0.0.3:8080"]);
    assert_eq!(draining_addresses(cluster_ip(&m)), ["10.0.0.1:8080"]);
    let nowhere = model_in_zone(&[web_service()], &slices, Some("zone-z"));
    assert_eq!(addresses(cluster_ip(&nowhere)).len(), 3, "no endpoint for zone-z");

    let node_hinted = json!([
        {"addresses": ["10.0.0.1"], "hints": {"forZones": [{"name": "zone-a"}], "forNodes": [{"name": "node-a"}]}},
        {"addresses": ["10.0.0.2"], "hints": {"forZones": [{"name": "zone-a"}], "forNodes": [{"name": "node-b"}]}},
    ]);
    let m = model_in_zone(&[web_service()], &[web_slice("a", node_hinted)], Some("zone-a"));
    assert_eq!(addresses(cluster_ip(&m)), ["10.0.0.1:8080"], "forNodes first");

    let mut partly = hinted.as_array().unwrap().clone();
    partly.push(json!({"addresses": ["10.0.0.4"]}));
    let m = model_in_zone(&[web_service()], &[web_slice("a", json!(partly))], Some("zone-b"));
    assert_eq!(
        addresses(cluster_ip(&m)).len(),
        4,
        "a ready endpoint without hints"
    );

    let local = service(
        json!({"clusterIP": "10.96.0.10", "selector": {"app": "web"}, "internalTrafficPolicy": "Local",
        "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}),
    );
    let m = model_in_zone(&[local], &slices, Some("zone-a"));
    assert_eq!(
        addresses(cluster_ip(&m)),
        ["10.0.0.3:8080"],
        "traffic policy Local uses this node's endpoint whatever its hints"
    );
}
