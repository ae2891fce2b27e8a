//! The documented commands, as a user runs them, on bad and good input.
mod common;

use std::{net::Ipv6Addr, process::Command, sync::Arc};

use common::Loaded;
use k8s_openapi::api::core::v1::{Pod, Service};
use lb_common::{CtEntry, CtKey, IPPROTO_TCP, ct_direction};
use lb_userspace::{
    model,
    observe::metrics::{AgentMetrics, registry},
    reconcile::{FrontendKey, PlanOptions, plan},
};

fn switchboard(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(args)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn plan_names_the_file_and_field_of_a_bad_manifest_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("good.yaml"),
        lb_userspace::lab::service_manifest(
            "web",
            "10.96.0.10".parse().unwrap(),
            &[("app", "web")],
            &[("http", "TCP", 80, 3000)],
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: api\nspec:\n  clusterIP: 10.96.0.20\n  ports:\n  - port: 70000\n",
    )
    .unwrap();
    let (ok, stdout, stderr) = switchboard(&["plan", "--manifests", dir.path().to_str().unwrap()]);
    assert!(!ok, "plan exits non-zero on a bad manifest");
    assert!(stderr.contains("bad.yaml"), "the error names the file: {stderr}");
    assert!(
        stderr.contains("Service default/api"),
        "the error names the object: {stderr}"
    );
    assert!(
        stderr.contains("spec.ports[0].port"),
        "the error names the field: {stderr}"
    );
    assert!(
        stdout.contains("default/web") && stdout.contains("10.96.0.10:80/TCP"),
        "the good file is still planned: {stdout}"
    );
    assert!(
        stdout.contains("NO ENDPOINTS"),
        "a service without endpoints says so: {stdout}"
    );
}

#[test]
fn status_without_a_running_agent_says_what_to_do() {
    let (ok, _, stderr) = switchboard(&["status", "--pin-dir", "/sys/fs/bpf/switchboard-does-not-exist"]);
    assert!(!ok);
    assert!(
        stderr.contains("is the agent running"),
        "one clear sentence: {stderr}"
    );
}

#[test]
fn run_rejects_a_missing_manifest_directory() {
    let (ok, _, stderr) = switchboard(&[
        "run",
        "--manifests",
        "/nonexistent/manifests",
        "--interfaces",
        "x*",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("/nonexistent/manifests") && stderr.contains("not a directory"),
        "{stderr}"
    );
}

/// A Service whose pods are labelled `app=web-app` instead of `app=web`: the user must see at a
/// glance that it has no endpoints, and why.
#[test]
fn explain_names_the_selector_key_that_failed_and_the_near_misses() {
    let dir = tempfile::tempdir().unwrap();
    let service = lb_userspace::lab::service_manifest(
        "web",
        "10.96.0.10".parse().unwrap(),
        &[("app", "web")],
        &[("http", "TCP", 80, 3000)],
    );
    let near_miss = lb_userspace::lab::pod_manifest(
        "web-app-0",
        "10.244.0.10".parse().unwrap(),
        &[("app", "web-app")],
        3000,
    );
    let other =
        lb_userspace::lab::pod_manifest("db-0", "10.244.0.11".parse().unwrap(), &[("role", "db")], 5432);
    std::fs::write(
        dir.path().join("all.yaml"),
        [service, near_miss, other].join("---\n"),
    )
    .unwrap();
    let manifests = dir.path().to_str().unwrap();

    let (ok, stdout, stderr) = switchboard(&["explain", "service", "web", "--manifests", manifests]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("NO ENDPOINTS"), "{stdout}");
    let near_miss_line = stdout
        .lines()
        .position(|l| l.contains("web-app-0"))
        .expect("the near miss is listed");
    let other_line = stdout
        .lines()
        .position(|l| l.contains("db-0"))
        .expect("other pods are listed");
    assert!(
        near_miss_line < other_line,
        "the closest miss comes first: {stdout}"
    );
    assert!(
        stdout.contains(r#"app: wanted "web", pod has "web-app""#),
        "{stdout}"
    );

    let (ok, stdout, _) = switchboard(&[
        "explain",
        "service",
        "web",
        "--manifests",
        manifests,
        "-o",
        "json",
    ]);
    assert!(ok);
    let explanation: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(explanation["pods"][0]["pod"], "web-app-0");
    assert_eq!(explanation["frontends"][0]["endpoints"], serde_json::json!([]));

    let (ok, _, stderr) = switchboard(&["explain", "service", "missing", "--manifests", manifests]);
    assert!(!ok, "a missing service is an error a script can test for");
    assert!(stderr.contains("default/missing not found"), "{stderr}");

    let (ok, stdout, _) = switchboard(&[
        "get",
        "services",
        "--manifests",
        manifests,
        "-o",
        "json",
        "--pin-dir",
        "/nonexistent",
    ]);
    assert!(ok);
    let rows: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(rows[0]["service"], "default/web");
    assert_eq!(rows[0]["endpoints"], 0);
    assert_eq!(
        rows[0]["programmed"],
        serde_json::Value::Null,
        "no agent: the kernel's view is unknown, not 'no'"
    );
}

/// The README's first command: the demo answers from both ClusterIPs and from localhost on the
/// NodePort, and leaves no namespace or pin behind.
#[test]
fn the_demo_answers_on_both_cluster_ips_and_on_localhost_and_cleans_up() {
    assert!(nix::unistd::geteuid().is_root(), "the demo needs root, as CI has");
    let (ok, stdout, stderr) = switchboard(&["demo", "--requests", "3"]);
    assert!(ok, "the demo succeeds: {stdout}\n{stderr}");
    for cluster_ip in ["10.96.0.10", "fd00:10:96::10"] {
        assert!(
            stdout.contains(&format!(
                "3 requests to the ClusterIP {cluster_ip} were answered by"
            )),
            "{stdout}"
        );
    }
    assert!(
        stdout.contains("(reply from [fd00:10:96::10]:80)"),
        "answers come from the IPv6 ClusterIP: {stdout}"
    );
    assert!(
        stdout.contains("3 requests from the node to localhost:30007 were answered by"),
        "{stdout}"
    );
    let namespaces = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&namespaces.stdout).contains("sbdemo"),
        "the demo's namespaces are gone"
    );
    assert!(
        !std::path::Path::new("/sys/fs/bpf/switchboard-demo").exists(),
        "its pins are gone"
    );
}

/// A dual-stack Service (IPv4 and IPv6 ClusterIPs) and a dual-stack pod behind it.
const DUAL_STACK: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00::10"]
  ipFamilies: [IPv4, IPv6]
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 3000}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: default, labels: {app: web}}
status:
  podIP: 10.244.0.10
  podIPs: [{ip: 10.244.0.10}, {ip: "fd00:244::10"}]
  conditions: [{type: Ready, status: "True"}]
"#;

fn dual_stack_manifests() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("web.yaml"), DUAL_STACK).unwrap();
    dir
}

/// IPv6 addresses with a port are printed in brackets, as URLs and `ss` print them.
#[test]
fn plan_and_explain_print_ipv6_frontends_and_endpoints_in_brackets() {
    let dir = dual_stack_manifests();
    let manifests = dir.path().to_str().unwrap();
    let (ok, stdout, stderr) = switchboard(&["plan", "--manifests", manifests]);
    assert!(ok, "{stderr}");
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [
            ["default/web", "10.96.0.10:80/TCP", "10.244.0.10:3000", "web-0"],
            ["default/web", "[fd00::10]:80/TCP", "[fd00:244::10]:3000", "web-0"],
        ],
        "{stdout}"
    );

    let (ok, stdout, stderr) = switchboard(&["explain", "service", "web", "--manifests", manifests]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("ClusterIP [fd00::10]:80/TCP: [fd00:244::10]:3000 (web-0)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ClusterIP 10.96.0.10:80/TCP: 10.244.0.10:3000 (web-0)"),
        "{stdout}"
    );
}

/// What the agent programmed for a dual-stack Service, as `get`, `status` and the metrics show
/// it: the IPv6 frontend, its backend and a flow of it beside the IPv4 ones.
#[test]
fn get_status_and_metrics_show_the_ipv6_half_of_a_dual_stack_service() {
    let dir = dual_stack_manifests();
    let mut documents = serde_yaml_ng::Deserializer::from_str(DUAL_STACK);
    let service: Service = serde::Deserialize::deserialize(documents.next().unwrap()).unwrap();
    let pod: Pod = serde::Deserialize::deserialize(documents.next().unwrap()).unwrap();
    let mut loaded = Loaded::new("cli6");
    loaded.apply(&plan(&model::build(&[service], &[pod]), &PlanOptions::default()));
    // A flow of the IPv6 frontend, both directions, as the datapath records it.
    let ip = |text: &str| text.parse::<Ipv6Addr>().unwrap().octets();
    let (client, frontend, backend) = (ip("fd00:244::20"), ip("fd00::10"), ip("fd00:244::10"));
    let web6 = FrontendKey {
        addr: "fd00::10".parse().unwrap(),
        port: 80,
        proto: IPPROTO_TCP,
    };
    let service_id = loaded
        .maps
        .service(&web6)
        .expect("the IPv6 frontend is programmed")
        .id;
    let forward = CtKey {
        src_addr: client,
        dst_addr: frontend,
        src_port: 40000,
        dst_port: 80,
        proto: IPPROTO_TCP,
        direction: ct_direction::FORWARD,
        pad: [0; 2],
    };
    let reply = CtKey {
        src_addr: backend,
        dst_addr: client,
        src_port: 3000,
        dst_port: 40000,
        direction: ct_direction::REPLY,
        ..forward
    };
    let entry = |nat_addr, nat_port| CtEntry {
        service_id,
        nat_addr,
        nat_port,
        ..CtEntry::default()
    };
    loaded
        .maps
        .conntrack6
        .insert(forward, entry(backend, 3000), 0)
        .unwrap();
    loaded
        .maps
        .conntrack6
        .insert(reply, entry(frontend, 80), 0)
        .unwrap();
    let pins = loaded.pins.path().to_str().unwrap();
    let manifests = dir.path().to_str().unwrap();

    let (ok, stdout, stderr) = switchboard(&[
        "get",
        "services",
        "--manifests",
        manifests,
        "--pin-dir",
        pins,
        "-o",
        "json",
    ]);
    assert!(ok, "{stderr}");
    let rows: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let frontends: Vec<(&str, bool)> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            (
                row["frontend"].as_str().unwrap(),
                row["programmed"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        frontends,
        [("10.96.0.10:80/TCP", true), ("[fd00::10]:80/TCP", true)]
    );

    let (ok, stdout, stderr) = switchboard(&["get", "backends", "--pin-dir", pins]);
    assert!(ok, "{stderr}");
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("[fd00::10]:80/TCP") && l.contains("[fd00:244::10]:3000")),
        "{stdout}"
    );

    let (ok, stdout, stderr) = switchboard(&["get", "conntrack", "--pin-dir", pins]);
    assert!(ok, "{stderr}");
    let flows: Vec<Vec<&str>> = stdout
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    let (service_id, zero) = (service_id.to_string(), "0".to_owned());
    assert!(
        flows.contains(&vec![
            "forward",
            "TCP",
            "[fd00:244::20]:40000",
            "[fd00::10]:80",
            "[fd00:244::10]:3000",
            &service_id,
            &zero,
        ]),
        "{stdout}"
    );
    assert!(
        flows
            .iter()
            .any(|f| f[0] == "reply" && f[2] == "[fd00:244::10]:3000" && f[4] == "[fd00::10]:80"),
        "{stdout}"
    );

    let (ok, stdout, stderr) = switchboard(&["status", "--pin-dir", pins]);
    assert!(ok, "{stderr}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("[fd00::10]:80/TCP"))
        .unwrap_or_else(|| panic!("status lists the IPv6 frontend: {stdout}"));
    let columns: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        (columns[1], columns[3], columns[4], *columns.last().unwrap()),
        (service_id.as_str(), "1", "1", "[fd00:244::10]:3000"),
        "id, endpoints, flows, backend: {line}"
    );

    let mut metrics = String::new();
    let registry = registry(&Arc::new(AgentMetrics::default()), loaded.pins.path().to_owned());
    prometheus_client::encoding::text::encode(&mut metrics, &registry).unwrap();
    for expected in [
        r#"switchboard_map_entries{map="SB_SERVICES6"} 1"#,
        r#"switchboard_map_entries{map="SB_BACKENDS6"} 1"#,
        r#"switchboard_map_entries{map="SB_CONNTRACK6"} 2"#,
        r#"switchboard_map_entries{map="SB_SERVICES"} 1"#,
        r#"switchboard_map_capacity{map="SB_CONNTRACK6"} 262144"#,
        "switchboard_conntrack_flows 1",
    ] {
        assert!(
            metrics.lines().any(|line| line == expected),
            "{expected} in\n{metrics}"
        );
    }
}
