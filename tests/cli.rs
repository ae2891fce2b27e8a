//! The documented commands, as a user runs them, on bad and good input.
use std::process::Command;

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

/// The README's first command: the demo answers from the ClusterIP and from localhost on the
/// NodePort, and leaves no namespace or pin behind.
#[test]
fn the_demo_answers_on_the_cluster_ip_and_on_localhost_and_cleans_up() {
    assert!(nix::unistd::geteuid().is_root(), "the demo needs root, as CI has");
    let (ok, stdout, stderr) = switchboard(&["demo", "--requests", "3"]);
    assert!(ok, "the demo succeeds: {stdout}\n{stderr}");
    assert!(
        stdout.contains("3 requests to the ClusterIP were answered by"),
        "{stdout}"
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
