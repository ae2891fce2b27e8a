//! The deploy manifests, parsed into Kubernetes types, checked on the fields that matter so they
//! cannot rot: RBAC verbs, the DaemonSet's scheduling, identity, mounts, capabilities, probes, and
//! arguments the agent's own command line accepts.
use clap::Parser as _;
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::ServiceAccount,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use lb_userspace::cli::{Cli, Command};
use serde::Deserialize as _;

struct Manifests {
    account: ServiceAccount,
    role: ClusterRole,
    binding: ClusterRoleBinding,
    daemonset: DaemonSet,
}

fn manifests() -> Manifests {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/switchboard.yaml")).unwrap();
    let documents: Vec<serde_yaml_ng::Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde_yaml_ng::Value::deserialize(d).unwrap())
        .collect();
    let of_kind = |kind: &str| {
        let mut found = documents.iter().filter(|d| d["kind"].as_str() == Some(kind));
        let document = found
            .next()
            .unwrap_or_else(|| panic!("no {kind} in deploy/switchboard.yaml"))
            .clone();
        assert!(found.next().is_none(), "one {kind} only");
        document
    };
    Manifests {
        account: serde_yaml_ng::from_value(of_kind("ServiceAccount")).unwrap(),
        role: serde_yaml_ng::from_value(of_kind("ClusterRole")).unwrap(),
        binding: serde_yaml_ng::from_value(of_kind("ClusterRoleBinding")).unwrap(),
        daemonset: serde_yaml_ng::from_value(of_kind("DaemonSet")).unwrap(),
    }
}

#[test]
fn rbac_grants_list_and_watch_on_what_the_agent_reads_and_nothing_else() {
    let m = manifests();
    let mut granted: Vec<(String, String, Vec<String>)> = Vec::new();
    for rule in m.role.rules.unwrap() {
        for group in rule.api_groups.clone().unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                let mut verbs = rule.verbs.clone();
                verbs.sort();
                granted.push((group.clone(), resource, verbs));
            }
        }
    }
    granted.sort();
    let list_watch = || vec!["list".to_owned(), "watch".to_owned()];
    let create_patch = || vec!["create".to_owned(), "patch".to_owned()];
    assert_eq!(
        granted,
        [
            ("".into(), "events".into(), create_patch()),
            ("".into(), "nodes".into(), list_watch()),
            ("".into(), "pods".into(), list_watch()),
            ("".into(), "services".into(), list_watch()),
            ("discovery.k8s.io".into(), "endpointslices".into(), list_watch()),
            ("events.k8s.io".into(), "events".into(), create_patch()),
        ]
    );
    let subject = &m.binding.subjects.unwrap()[0];
    assert_eq!(
        (subject.name.as_str(), subject.namespace.as_deref()),
        ("switchboard", Some("kube-system"))
    );
    assert_eq!(m.binding.role_ref.name, m.role.metadata.name.unwrap());
    assert_eq!(m.account.metadata.name.as_deref(), Some("switchboard"));
}

#[test]
fn the_daemonset_runs_on_every_node_with_the_host_network_and_few_capabilities() {
    let pod = manifests().daemonset.spec.template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    assert_eq!(pod.service_account_name.as_deref(), Some("switchboard"));
    let tolerations = pod.tolerations.unwrap();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "tolerates every taint"
    );

    let container = &pod.containers[0];
    let security = container.security_context.clone().unwrap();
    assert_ne!(security.privileged, Some(true), "capabilities, not privileged");
    let capabilities = security.capabilities.unwrap();
    assert_eq!(capabilities.drop.unwrap(), ["ALL"]);
    let mut added = capabilities.add.unwrap();
    added.sort();
    assert_eq!(added, ["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"]);

    let env = container.env.clone().unwrap();
    let node_name = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME is set");
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .unwrap();
    assert_eq!(field.field_path, "spec.nodeName", "from the downward API");
    assert!(
        env.iter().any(|e| e.name == "SWITCHBOARD_API_SERVER"),
        "the API server is given directly, not via a ClusterIP"
    );

    let mounts = container.volume_mounts.clone().unwrap();
    let bpffs = mounts
        .iter()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .expect("bpffs is mounted");
    let volume = pod
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == bpffs.name)
        .unwrap();
    assert_eq!(volume.host_path.unwrap().path, "/sys/fs/bpf");
}

#[test]
fn probes_read_the_agents_health_endpoints_on_its_metrics_port() {
    let pod = manifests().daemonset.spec.template.spec.unwrap();
    let container = &pod.containers[0];
    let env = container.env.clone().unwrap();
    let metrics = env
        .iter()
        .find(|e| e.name == "SWITCHBOARD_METRICS_ADDRESS")
        .and_then(|e| e.value.clone())
        .unwrap();
    let port: i32 = metrics.rsplit(':').next().unwrap().parse().unwrap();
    for (probe, path) in [
        (container.liveness_probe.clone(), "/livez"),
        (container.readiness_probe.clone(), "/healthz"),
    ] {
        let http = probe.unwrap().http_get.unwrap();
        assert_eq!(http.path.as_deref(), Some(path));
        assert_eq!(
            http.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(port)
        );
        assert_eq!(
            http.host.as_deref(),
            Some("127.0.0.1"),
            "the metrics address is loopback"
        );
    }
}

#[test]
fn the_daemonsets_arguments_are_ones_the_agent_accepts() {
    let pod = manifests().daemonset.spec.template.spec.unwrap();
    let args = pod.containers[0].args.clone().unwrap();
    let cli = Cli::try_parse_from(std::iter::once("switchboard".to_owned()).chain(args.clone()))
        .unwrap_or_else(|e| panic!("switchboard rejects the DaemonSet's arguments {args:?}: {e}"));
    let Command::Run(run) = cli.command else {
        panic!("the DaemonSet runs the agent")
    };
    assert!(run.keep_datapath, "a rollout must not take the datapath down");
    assert!(
        run.source.manifests.is_none(),
        "in a cluster the source is the API server"
    );
    assert!(run.external_interfaces.is_some(), "NodePorts are served");
    let cgroup = run.host_cgroup.expect("the host's cgroup root is given");
    let mount = pod.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == cgroup)
        .unwrap_or_else(|| panic!("--host-cgroup {cgroup} is a mount"));
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap();
    assert_eq!(
        volume.host_path.as_ref().unwrap().path,
        "/sys/fs/cgroup",
        "the socket hooks go on the host's cgroup root, not the container's"
    );
}
