//! The model's Kubernetes semantics, on Services and Pods written as small YAML manifests.
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Pod, Service};

use super::*;

fn service(yaml: &str) -> Service {
    serde_yaml_ng::from_str(yaml).unwrap_or_else(|e| panic!("test Service YAML should deserialize: {e}"))
}

fn pod(yaml: &str) -> Pod {
    serde_yaml_ng::from_str(yaml).unwrap_or_else(|e| panic!("test Pod YAML should deserialize: {e}"))
}

/// A Running, Ready pod; `labels` is a YAML flow mapping such as `{app: web}`.
fn ready_pod(namespace: &str, name: &str, labels: &str, ip: &str) -> Pod {
    pod(&format!(
        r#"
metadata:
  name: {name}
  namespace: {namespace}
  labels: {labels}
status:
  phase: Running
  podIP: "{ip}"
  conditions:
  - type: Ready
    status: "True"
"#
    ))
}

/// `default/web`, ClusterIP 10.96.0.10, TCP 80 → 8080, selecting `app: web`.
fn web_service() -> Service {
    service(
        r#"
metadata:
  name: web
  namespace: default
spec:
  clusterIP: 10.96.0.10
  selector:
    app: web
  ports:
  - port: 80
    targetPort: 8080
"#,
    )
}

fn ip(text: &str) -> IpAddr {
    text.parse()
        .unwrap_or_else(|e| panic!("{text:?} should be an IP address: {e}"))
}

/// `(address, port)` of every backend, in the model's order.
fn backends(frontend: &Frontend) -> Vec<(IpAddr, u16)> {
    frontend.backends.iter().map(|e| (e.address, e.port)).collect()
}

fn backend_pods(frontend: &Frontend) -> Vec<&str> {
    frontend.backends.iter().map(|e| e.pod.as_str()).collect()
}

/// The model's only frontend, failing the test if there is not exactly one.
fn only_frontend(model: &Model) -> &Frontend {
    assert_eq!(
        model.frontends.len(),
        1,
        "expected exactly one frontend, got {:#?}",
        model.frontends
    );
    &model.frontends[0]
}

#[test]
fn cluster_ip_service_gives_one_frontend_with_its_settings() {
    let model = build(
        &[web_service()],
        &[ready_pod("default", "web-1", "{app: web}", "10.0.0.1")],
    );
    let frontend = only_frontend(&model);
    assert_eq!(
        frontend.service,
        ServiceName {
            namespace: "default".into(),
            name: "web".into()
        }
    );
    assert_eq!(frontend.kind, FrontendKind::ClusterIp);
    assert_eq!(frontend.address, ip("10.96.0.10"));
    assert_eq!(frontend.port, 80);
    assert_eq!(frontend.protocol, Protocol::Tcp, "an unset protocol means TCP");
    assert_eq!(frontend.port_name, "", "an unnamed port has an empty port_name");
    assert_eq!(backends(frontend), vec![(ip("10.0.0.1"), 8080)]);
    assert_eq!(backend_pods(frontend), vec!["web-1"]);
    assert!(
        model.warnings.is_empty(),
        "a valid Service should not warn: {:?}",
        model.warnings
    );
}

#[test]
fn selector_matches_pods_in_the_services_namespace_only() {
    let pods = [
        ready_pod("default", "web-here", "{app: web}", "10.0.0.1"),
        ready_pod("other", "web-elsewhere", "{app: web}", "10.0.0.2"),
    ];
    let model = build(&[web_service()], &pods);
    assert_eq!(
        backend_pods(only_frontend(&model)),
        vec!["web-here"],
        "a pod in another namespace must not back default/web"
    );
}

#[test]
fn absent_namespace_means_default_for_services_and_pods() {
    let svc = service(
        r#"
metadata:
  name: web
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports:
  - port: 80
"#,
    );
    let no_namespace = pod(r#"
metadata:
  name: web-1
  labels: {app: web}
status:
  podIP: 10.0.0.1
  conditions:
  - {type: Ready, status: "True"}
"#);
    let model = build(
        &[svc],
        &[
            no_namespace,
            ready_pod("other", "web-2", "{app: web}", "10.0.0.2"),
        ],
    );
    let frontend = only_frontend(&model);
    assert_eq!(
        frontend.service.namespace, "default",
        "a Service without a namespace is in default"
    );
    assert_eq!(
        backend_pods(frontend),
        vec!["web-1"],
        "a pod without a namespace is in default"
    );
}

#[test]
fn selector_requires_every_label_and_ignores_extra_ones() {
    let svc = service(
        r#"
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web, version: v1}
  ports: [{port: 80}]
"#,
    );
    let pods = [
        ready_pod(
            "default",
            "v1-prod",
            "{app: web, version: v1, env: prod}",
            "10.0.0.1",
        ),
        ready_pod("default", "v2", "{app: web, version: v2}", "10.0.0.2"),
        ready_pod("default", "app-only", "{app: web}", "10.0.0.3"),
        ready_pod("default", "other-app", "{app: api, version: v1}", "10.0.0.4"),
    ];
    let model = build(&[svc], &pods);
    assert_eq!(
        backend_pods(only_frontend(&model)),
        vec!["v1-prod"],
        "only the pod carrying app=web AND version=v1 should match"
    );
}

#[test]
fn service_without_selector_gets_no_pod_endpoints() {
    let pods = [ready_pod("default", "web-1", "{app: web}", "10.0.0.1")];
    for selector in ["", "  selector: {}\n"] {
        let svc = service(&format!(
            "metadata: {{name: web, namespace: default}}\nspec:\n  clusterIP: 10.96.0.10\n{selector}  ports: [{{port: 80}}]\n"
        ));
        let model = build(&[svc], &pods);
        let frontend = only_frontend(&model);
        assert!(
            frontend.backends.is_empty(),
            "a Service with selector {selector:?} must select no pods, got {:?}",
            frontend.backends
        );
    }
}

#[test]
fn not_ready_pods_are_excluded() {
    let not_ready = pod(r#"
metadata: {name: not-ready, namespace: default, labels: {app: web}}
status:
  phase: Running
  podIP: 10.0.0.2
  conditions:
  - {type: Ready, status: "False"}
"#);
    let no_conditions = pod(r#"
metadata: {name: no-conditions, namespace: default, labels: {app: web}}
status: {phase: Pending, podIP: 10.0.0.3}
"#);
    let no_status = pod("metadata: {name: no-status, namespace: default, labels: {app: web}}\n");
    let model = build(
        &[web_service()],
        &[
            ready_pod("default", "ready", "{app: web}", "10.0.0.1"),
            not_ready,
            no_conditions,
            no_status,
        ],
    );
    assert_eq!(
        backend_pods(only_frontend(&model)),
        vec!["ready"],
        "only the Ready pod should be a backend"
    );
}

#[test]
fn pods_without_a_pod_ip_are_excluded() {
    let no_ip = pod(r#"
metadata: {name: no-ip, namespace: default, labels: {app: web}}
status:
  phase: Running
  conditions:
  - {type: Ready, status: "True"}
"#);
    let model = build(&[web_service()], &[no_ip]);
    assert!(
        only_frontend(&model).backends.is_empty(),
        "a Ready pod without podIP cannot be a backend"
    );
}

#[test]
fn succeeded_and_failed_pods_are_excluded() {
    let finished = |name: &str, phase: &str, ip: &str| {
        pod(&format!(
            r#"
metadata: {{name: {name}, namespace: default, labels: {{app: web}}}}
status:
  phase: {phase}
  podIP: {ip}
  conditions:
  - {{type: Ready, status: "True"}}
"#
        ))
    };
    let pods = [
        finished("done", "Succeeded", "10.0.0.2"),
        finished("crashed", "Failed", "10.0.0.3"),
        finished("running", "Running", "10.0.0.1"),
    ];
    let model = build(&[web_service()], &pods);
    assert_eq!(
        backend_pods(only_frontend(&model)),
        vec!["running"],
        "Succeeded and Failed pods never serve, even with a stale Ready condition"
    );
}

fn terminating_pod(name: &str, ip: &str, ready: bool) -> Pod {
    pod(&format!(
        r#"
metadata:
  name: {name}
  namespace: default
  labels: {{app: web}}
  deletionTimestamp: "2024-05-01T12:00:00Z"
status:
  phase: Running
  podIP: {ip}
  conditions:
  - {{type: Ready, status: "{status}"}}
"#,
        status = if ready { "True" } else { "False" }
    ))
}

#[test]
fn terminating_pods_are_used_only_while_no_ready_pod_remains() {
    let with_ready = build(
        &[web_service()],
        &[
            terminating_pod("old", "10.0.0.9", true),
            ready_pod("default", "new", "{app: web}", "10.0.0.1"),
        ],
    );
    assert_eq!(
        backend_pods(only_frontend(&with_ready)),
        vec!["new"],
        "a terminating pod must not get traffic while a non-terminating one is ready"
    );

    let only_terminating = build(
        &[web_service()],
        &[
            terminating_pod("old", "10.0.0.9", true),
            terminating_pod("gone", "10.0.0.8", false),
        ],
    );
    let frontend = only_frontend(&only_terminating);
    assert_eq!(
        backend_pods(frontend),
        vec!["old"],
        "with no ready pod left, ready terminating pods serve (not-ready ones still do not)"
    );
    assert!(
        frontend.backends[0].terminating,
        "the endpoint should be marked terminating"
    );
}

#[test]
fn numeric_target_port_is_the_backend_port() {
    let model = build(
        &[web_service()],
        &[ready_pod("default", "web-1", "{app: web}", "10.0.0.1")],
    );
    let frontend = only_frontend(&model);
    assert_eq!(frontend.port, 80);
    assert_eq!(backends(frontend), vec![(ip("10.0.0.1"), 8080)]);
}

#[test]
fn unset_target_port_means_the_service_port() {
    let svc = service(
        r#"
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{port: 8443}]
"#,
    );
    let model = build(&[svc], &[ready_pod("default", "web-1", "{app: web}", "10.0.0.1")]);
    assert_eq!(backends(only_frontend(&model)), vec![(ip("10.0.0.1"), 8443)]);
}

fn pod_with_container_port(name: &str, ip: &str, port_name: &str, number: u16, protocol: &str) -> Pod {
    pod(&format!(
        r#"
metadata: {{name: {name}, namespace: default, labels: {{app: web}}}}
spec:
  containers:
  - name: app
    ports:
    - {{name: metrics, containerPort: 9090}}
    - {{name: {port_name}, containerPort: {number}, protocol: {protocol}}}
status:
  podIP: {ip}
  conditions:
  - {{type: Ready, status: "True"}}
"#
    ))
}

#[test]
fn named_target_port_is_resolved_per_pod() {
    let svc = service(
        r#"
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports:
  - {port: 80, targetPort: http}
"#,
    );
    let pods = [
        pod_with_container_port("a", "10.0.0.1", "http", 8080, "TCP"),
        pod_with_container_port("b", "10.0.0.2", "http", 9000, "TCP"),
        pod_with_container_port("lacks-name", "10.0.0.3", "web", 8080, "TCP"),
        pod_with_container_port("udp-only", "10.0.0.4", "http", 8080, "UDP"),
    ];
    let model = build(&[svc], &pods);
    assert_eq!(
        backends(only_frontend(&model)),
        vec![(ip("10.0.0.1"), 8080), (ip("10.0.0.2"), 9000)],
        "each pod's own `http` port should be used; pods without a TCP port named `http` are skipped"
    );
}

#[test]
fn multi_port_service_gives_one_frontend_per_port() {
    let svc = service(
        r#"
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: https, port: 443, targetPort: 8443}
"#,
    );
    let model = build(&[svc], &[ready_pod("default", "web-1", "{app: web}", "10.0.0.1")]);
    let ports: Vec<_> = model
        .frontends
        .iter()
        .map(|f| (f.port_name.as_str(), f.port, backends(f)))
        .collect();
    assert_eq!(
        ports,
        vec![
            ("http", 80, vec![(ip("10.0.0.1"), 8080)]),
            ("https", 443, vec![(ip("10.0.0.1"), 8443)]),
        ]
    );
}

#[test]
fn same_port_number_over_tcp_and_udp_gives_two_frontends() {
    let svc = service(
        r#"
metadata: {name: dns, namespace: kube-system}
spec:
  clusterIP: 10.96.0.53
  selector: {app: dns}
  ports:
  - {name: dns-tcp, port: 53, protocol: TCP}
  - {name: dns, port: 53, protocol: UDP}
"#,
    );
    let model = build(
        &[svc],
        &[ready_pod("kube-system", "dns-1", "{app: dns}", "10.0.0.53")],
    );
    let mut seen: Vec<_> = model
        .frontends
        .iter()
        .map(|f| (f.port, f.protocol, backends(f)))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            (53, Protocol::Tcp, vec![(ip("10.0.0.53"), 53)]),
            (53, Protocol::Udp, vec![(ip("10.0.0.53"), 53)]),
        ]
    );
}

#[test]
fn external_name_headless_and_other_proxies_services_are_skipped() {
    let skipped = [
        r#"
metadata: {name: external, namespace: default}
spec: {type: ExternalName, externalName: example.com, clusterIP: 10.96.0.1, ports: [{port: 80}]}
"#,
        r#"
metadata: {name: headless, namespace: default}
spec: {clusterIP: None, selector: {app: web}, ports: [{port: 80}]}
"#,
        r#"
metadata:
  name: other-proxy
  namespace: default
  labels: {service.kubernetes.io/service-proxy-name: someone-else}
spec: {clusterIP: 10.96.0.2, selector: {app: web}, ports: [{port: 80}]}
"#,
        r#"
metadata:
  name: labelled-headless
  namespace: default
  labels: {service.kubernetes.io/headless: ""}
spec: {clusterIP: 10.96.0.3, selector: {app: web}, ports: [{port: 80}]}
"#,
    ];
    let pods = [ready_pod("default", "web-1", "{app: web}", "10.0.0.1")];
    for yaml in skipped {
        let svc = service(yaml);
        let model = build(std::slice::from_ref(&svc), &pods);
        assert!(
            model.frontends.is_empty(),
            "Service {:?} should not be proxied, got {:#?}",
            svc.metadata.name,
            model.frontends
        );
        assert!(
            model.warnings.is_empty(),
            "skipping is not a warning: {:?}",
            model.warnings
        );
    }
}

#[test]
fn service_without_cluster_ip_warns_and_has_no_frontend() {
    let svc = service(
        r#"
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{port: 80}]
"#,
    );
    let model = build(&[svc], &[ready_pod("shop", "web-1", "{app: web}", "10.0.0.1")]);
    assert!(
        model.frontends.is_empty(),
        "no clusterIP, no frontend: {:#?}",
        model.frontends
    );
    assert_eq!(
        model.warnings.len(),
        1,
        "expected one warning, got {:?}",
        model.warnings
    );
    assert_eq!(model.warnings[0].object, "Service shop/web");
    assert!(
        model.warnings[0].message.contains("clusterIP"),
        "the warning should name clusterIP: {}",
        model.warnings[0]
    );
}

/// An SCTP port is a frontend like any other: the model plans it, the datapath decides what it
/// can carry.
#[test]
fn sctp_port_is_a_frontend_of_its_own() {
    let svc = service(
        r#"
metadata: {name: sig, namespace: default}
spec:
  clusterIP: 10.96.0.20
  selector: {app: sig}
  ports:
  - {name: sctp, port: 3868, protocol: SCTP}
  - {name: tcp, port: 3869}
"#,
    );
    let model = build(&[svc], &[ready_pod("default", "sig-1", "{app: sig}", "10.0.0.1")]);
    assert_eq!(model.warnings, vec![], "SCTP is no warning");
    let ports: Vec<(u16, Protocol)> = model.frontends.iter().map(|f| (f.port, f.protocol)).collect();
    assert_eq!(ports, vec![(3868, Protocol::Sctp), (3869, Protocol::Tcp)]);
    assert_eq!(model.frontends[0].dialled(), "10.96.0.20:3868/SCTP");
    assert_eq!(backends(&model.frontends[0]), vec![(ip("10.0.0.1"), 3868)]);
    assert_eq!(Protocol::Sctp.ip_protocol(), lb_common::IPPROTO_SCTP);
    assert_eq!(
        Protocol::from_ip_protocol(lb_common::IPPROTO_SCTP),
        Some(Protocol::Sctp)
    );
}

#[test]
fn dual_stack_service_has_a_frontend_per_family_with_backends_of_that_family() {
    let svc = service(
        r#"
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.1
  clusterIPs: ["10.96.0.1", "fd00::1"]
  ipFamilies: [IPv4, IPv6]
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
"#,
    );
    let dual = |name: &str, v4: &str, v6: &str| {
        pod(&format!(
            r#"
metadata: {{name: {name}, namespace: default, labels: {{app: web}}}}
status:
  podIP: "{v4}"
  podIPs: [{{ip: "{v4}"}}, {{ip: "{v6}"}}]
  conditions:
  - {{type: Ready, status: "True"}}
"#
        ))
    };
    let model = build(
        &[svc],
        &[
            dual("a", "10.0.0.1", "fd00:10::1"),
            dual("b", "10.0.0.2", "fd00:10::2"),
        ],
    );
    assert_eq!(
        model.frontends.len(),
        2,
        "one frontend per cluster IP: {:#?}",
        model.frontends
    );
    let v4 = model
        .frontends
        .iter()
        .find(|f| f.address == ip("10.96.0.1"))
        .expect("an IPv4 frontend on 10.96.0.1");
    let v6 = model
        .frontends
        .iter()
        .find(|f| f.address == ip("fd00::1"))
        .expect("an IPv6 frontend on fd00::1");
    assert_eq!(backends(v4), vec![(ip("10.0.0.1"), 8080), (ip("10.0.0.2"), 8080)]);
    assert_eq!(
        backends(v6),
        vec![(ip("fd00:10::1"), 8080), (ip("fd00:10::2"), 8080)]
    );
}

/// An IPv6-primary dual-stack Service (ipFamilies IPv6 first) of type LoadBalancer: every kind
/// of frontend exists once per family, each with the endpoints of its family, whichever
/// family the Pods list first.
#[test]
fn ipv6_primary_dual_stack_service_has_every_frontend_in_both_families() {
    let svc = service(
        r#"
metadata: {name: web, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: fd00::10
  clusterIPs: [fd00::10, 10.96.0.10]
  ipFamilies: [IPv6, IPv4]
  ipFamilyPolicy: RequireDualStack
  externalIPs: [192.0.2.1, "2001:db8::1"]
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.7}, {ip: "2001:db8:7::7"}]
"#,
    );
    let pod = |name: &str, ips: [&str; 2]| {
        pod(&format!(
            r#"
metadata: {{name: {name}, namespace: default, labels: {{app: web}}}}
status:
  podIP: "{}"
  podIPs: [{{ip: "{}"}}, {{ip: "{}"}}]
  conditions: [{{type: Ready, status: "True"}}]
"#,
            ips[0], ips[0], ips[1]
        ))
    };
    let model = build(
        &[svc],
        &[
            pod("v6-first", ["fd00:10::1", "10.0.0.1"]),
            pod("v4-first", ["10.0.0.2", "fd00:10::2"]),
        ],
    );
    assert_eq!(model.warnings, vec![]);
    let frontends: Vec<(FrontendKind, String)> =
        model.frontends.iter().map(|f| (f.kind, f.dialled())).collect();
    assert_eq!(
        frontends,
        [
            (FrontendKind::ClusterIp, "10.96.0.10:80/TCP"),
            (FrontendKind::ClusterIp, "[fd00::10]:80/TCP"),
            (FrontendKind::NodePort, "0.0.0.0:30080/TCP"),
            (FrontendKind::NodePort, "[::]:30080/TCP"),
            (FrontendKind::LoadBalancer, "198.51.100.7:80/TCP"),
            (FrontendKind::LoadBalancer, "[2001:db8:7::7]:80/TCP"),
            (FrontendKind::ExternalIp, "192.0.2.1:80/TCP"),
            (FrontendKind::ExternalIp, "[2001:db8::1]:80/TCP"),
        ]
        .map(|(kind, text)| (kind, text.to_owned()))
    );
    for frontend in &model.frontends {
        let expected = if frontend.address.is_ipv4() {
            vec![(ip("10.0.0.1"), 8080), (ip("10.0.0.2"), 8080)]
        } else {
            vec![(ip("fd00:10::1"), 8080), (ip("fd00:10::2"), 8080)]
        };
        assert_eq!(backends(frontend), expected, "{}", frontend.dialled());
    }
}

#[test]
fn single_stack_pod_gives_no_backend_to_the_other_family() {
    let svc = service(
        r#"
metadata: {name: web, namespace: default}
spec:
  clusterIPs: ["10.96.0.1", "fd00::1"]
  selector: {app: web}
  ports: [{port: 80}]
"#,
    );
    let model = build(
        &[svc],
        &[ready_pod("default", "v4-only", "{app: web}", "10.0.0.1")],
    );
    let v6 = model
        .frontends
        .iter()
        .find(|f| f.address.is_ipv6())
        .expect("an IPv6 frontend");
    assert!(
        v6.backends.is_empty(),
        "an IPv4-only pod must not back the IPv6 frontend: {:?}",
        v6.backends
    );
}

#[test]
fn backends_are_sorted_by_address_and_deduplicated() {
    let pods = [
        ready_pod("default", "c", "{app: web}", "10.0.0.10"),
        ready_pod("default", "a", "{app: web}", "10.0.0.9"),
        ready_pod("default", "b", "{app: web}", "10.0.0.2"),
        // Two pods reporting the same address (host-network pods on one node): one backend.
        ready_pod("default", "d", "{app: web}", "10.0.0.2"),
    ];
    let model = build(&[web_service()], &pods);
    assert_eq!(
        backends(only_frontend(&model)),
        vec![
            (ip("10.0.0.2"), 8080),
            (ip("10.0.0.9"), 8080),
            (ip("10.0.0.10"), 8080)
        ],
        "backends should be sorted numerically by address with duplicates removed"
    );
}

#[test]
fn frontends_are_ordered_independently_of_input_order() {
    let a = service(
        "metadata: {name: a, namespace: default}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}\n",
    );
    let b = service(
        "metadata: {name: b, namespace: default}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n",
    );
    let forward = build(&[a.clone(), b.clone()], &[]);
    let backward = build(&[b, a], &[]);
    assert_eq!(
        forward, backward,
        "the model should not depend on the order Services arrive in"
    );
}

// --- validation ----------------------------------------------------------------------------

fn paths(errors: &[FieldError]) -> Vec<&str> {
    errors.iter().map(|e| e.path.as_str()).collect()
}

#[test]
fn valid_service_and_pod_have_no_errors() {
    assert_eq!(validate_service(&web_service()), vec![], "web_service() is valid");
    let multi = service(
        r#"
metadata: {name: web, namespace: default, labels: {tier: frontend}}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  clusterIPs: ["10.96.0.10", "fd00::10"]
  sessionAffinity: ClientIP
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http, protocol: TCP}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
"#,
    );
    assert_eq!(validate_service(&multi), vec![], "a valid multi-port Service");
    assert_eq!(
        validate_pod(&ready_pod("default", "web-1", "{app: web}", "10.0.0.1")),
        vec![]
    );
    assert_eq!(
        validate_pod(&pod_with_container_port("a", "10.0.0.1", "http", 8080, "TCP")),
        vec![]
    );
}

#[test]
fn out_of_range_service_port_is_reported_at_its_path() {
    for port in [0, 70000] {
        let svc = service(&format!(
            "metadata: {{name: web}}\nspec: {{clusterIP: 10.96.0.10, ports: [{{port: {port}}}]}}\n"
        ));
        let errors = validate_service(&svc);
        assert_eq!(
            paths(&errors),
            vec!["spec.ports[0].port"],
            "port {port}: {errors:?}"
        );
        assert!(
            errors[0].message.contains(&port.to_string()),
            "the message should quote {port}: {}",
            errors[0]
        );
    }
}

#[test]
fn unknown_protocol_is_reported_at_its_path() {
    let svc =
        service("metadata: {name: web}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80, protocol: XTP}]}\n");
    let errors = validate_service(&svc);
    assert_eq!(paths(&errors), vec!["spec.ports[0].protocol"], "{errors:?}");
    assert!(
        errors[0].message.contains("XTP"),
        "the message should quote XTP: {}",
        errors[0]
    );
}

#[test]
fn malformed_cluster_ip_is_reported_at_its_path() {
    let svc = service("metadata: {name: web}\nspec: {clusterIP: 10.96.0.x, ports: [{port: 80}]}\n");
    assert_eq!(paths(&validate_service(&svc)), vec!["spec.clusterIP"]);
    let svc = service(
        "metadata: {name: web}\nspec: {clusterIPs: [10.96.0.1, \"fd00::zz\"], ports: [{port: 80}]}\n",
    );
    assert_eq!(paths(&validate_service(&svc)), vec!["spec.clusterIPs[1]"]);
}

/// The API server's dual-stack rules: the i-th ClusterIP is of the i-th family, at most one of
/// each, the first is `clusterIP`. A Service breaking them is not programmed (its manifest's
/// last good version stays in effect).
#[test]
fn cluster_ips_must_match_ip_families_one_per_family() {
    let errors = |spec: &str| {
        let svc = service(&format!(
            "metadata: {{name: web}}\nspec: {{ports: [{{port: 80}}], {spec}}}\n"
        ));
        validate_service(&svc)
    };
    assert_eq!(
        errors(r#"clusterIPs: [fd00::10, 10.96.0.10], ipFamilies: [IPv6, IPv4]"#),
        vec![],
        "IPv6 first is as valid as IPv4 first"
    );
    assert_eq!(
        errors(r#"clusterIPs: [10.96.0.10], ipFamilies: [IPv4, IPv6]"#),
        vec![],
        "a family may have no ClusterIP (yet)"
    );
    let swapped = errors(r#"clusterIPs: [fd00::10, 10.96.0.10], ipFamilies: [IPv4, IPv6]"#);
    assert_eq!(paths(&swapped), vec!["spec.clusterIPs[0]", "spec.clusterIPs[1]"]);
    assert_eq!(
        swapped[0].message,
        "fd00::10 is an IPv6 address, but spec.ipFamilies[0] is IPv4"
    );
    assert_eq!(
        paths(&errors(r#"clusterIPs: [10.96.0.10, 10.96.0.11]"#)),
        vec!["spec.clusterIPs[1]"],
        "two IPv4 ClusterIPs"
    );
    assert_eq!(
        paths(&errors(r#"clusterIPs: [10.96.0.10], ipFamilies: [IPv4, IPv4]"#)),
        vec!["spec.ipFamilies[1]"]
    );
    assert_eq!(
        paths(&errors(r#"clusterIPs: [10.96.0.10], ipFamilies: [IPX]"#)),
        vec!["spec.ipFamilies[0]"]
    );
    assert_eq!(
        paths(&errors(r#"clusterIP: 10.96.0.10, clusterIPs: [10.96.0.11]"#)),
        vec!["spec.clusterIPs[0]"]
    );
    let svc = service(
        r#"
metadata: {name: web, namespace: default}
spec: {clusterIPs: [fd00::10, 10.96.0.10], ipFamilies: [IPv4, IPv6], ports: [{port: 80}]}
"#,
    );
    let model = build(&[svc], &[]);
    assert_eq!(model.frontends, vec![], "not programmed");
    assert!(
        model.warnings[0].message.contains("spec.clusterIPs[0]"),
        "{:?}",
        model.warnings
    );
}

#[test]
fn invalid_selector_value_is_reported_under_its_key() {
    let svc = service(
        "metadata: {name: web}\nspec: {clusterIP: 10.96.0.10, selector: {app: \"web server\"}, ports: [{port: 80}]}\n",
    );
    assert_eq!(paths(&validate_service(&svc)), vec!["spec.selector.app"]);
}

#[test]
fn multi_port_service_needs_port_names() {
    let svc =
        service("metadata: {name: web}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}, {port: 443}]}\n");
    let errors = validate_service(&svc);
    assert!(
        paths(&errors).contains(&"spec.ports[1].name"),
        "an unnamed second port should be reported: {errors:?}"
    );
    let one_named = service(
        "metadata: {name: web}\nspec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}, {port: 443}]}\n",
    );
    assert_eq!(paths(&validate_service(&one_named)), vec!["spec.ports[1].name"]);
}

#[test]
fn malformed_pod_ip_is_reported_at_its_path() {
    let bad = pod("metadata: {name: web-1}\nstatus: {podIP: 10.0.0.x}\n");
    let errors = validate_pod(&bad);
    assert_eq!(paths(&errors), vec!["status.podIP"], "{errors:?}");
    assert!(
        errors[0].message.contains("10.0.0.x"),
        "the message should quote the address: {}",
        errors[0]
    );
    let bad_list = pod("metadata: {name: web-1}\nstatus: {podIPs: [{ip: 10.0.0.1}, {ip: nope}]}\n");
    assert_eq!(paths(&validate_pod(&bad_list)), vec!["status.podIPs[1].ip"]);
}

#[test]
fn cidrs_parse_masked_and_bad_ones_are_refused() {
    let v4 = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(parse_cidr("10.1.2.3/8"), Some((v4("10.0.0.0"), 8)));
    assert_eq!(parse_cidr("192.0.2.7"), Some((v4("192.0.2.7"), 32)));
    assert_eq!(parse_cidr("0.0.0.0/0"), Some((v4("0.0.0.0"), 0)));
    assert_eq!(parse_cidr("2001:db8::1/32"), Some((v4("2001:db8::"), 32)));
    for bad in ["10.0.0.0/33", "10.0.0/8", "nonsense", "10.0.0.0/x", "::/129"] {
        assert_eq!(parse_cidr(bad), None, "{bad}");
    }
}
