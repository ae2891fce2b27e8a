//! `ManifestDir::read` on real files in a temporary directory.
use std::path::Path;

use super::*;

const WEB_SERVICE: &str = r#"apiVersion: v1
kind: Service
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
"#;

fn pod_yaml(name: &str, ip: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: default
  labels:
    app: web
spec:
  containers:
  - name: app
    image: example.invalid/web
status:
  phase: Running
  podIP: {ip}
  conditions:
  - type: Ready
    status: "True"
"#
    )
}

fn write(dir: &Path, name: &str, contents: &str) {
    std::fs::write(dir.join(name), contents).unwrap_or_else(|e| panic!("cannot write {name}: {e}"));
}

fn read(manifests: &mut ManifestDir) -> (Snapshot, Vec<FileError>) {
    manifests
        .read()
        .unwrap_or_else(|e| panic!("reading {} should not fail: {e}", manifests.dir().display()))
}

fn service_names(snapshot: &Snapshot) -> Vec<String> {
    let mut names: Vec<String> = snapshot
        .services
        .iter()
        .map(|s| s.metadata.name.clone().unwrap_or_default())
        .collect();
    names.sort();
    names
}

fn pod_names(snapshot: &Snapshot) -> Vec<String> {
    let mut names: Vec<String> = snapshot
        .pods
        .iter()
        .map(|p| p.metadata.name.clone().unwrap_or_default())
        .collect();
    names.sort();
    names
}

fn only_error(errors: &[FileError]) -> String {
    assert_eq!(errors.len(), 1, "expected exactly one error, got {errors:#?}");
    errors[0].to_string()
}

fn assert_mentions(text: &str, expected: &[&str]) {
    for part in expected {
        assert!(text.contains(part), "{text:?} should mention {part:?}");
    }
}

#[test]
fn multi_document_yaml_with_a_service_and_pods_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{WEB_SERVICE}---\n{}---\n{}",
        pod_yaml("web-1", "10.0.0.1"),
        pod_yaml("web-2", "10.0.0.2")
    );
    write(dir.path(), "web.yaml", &text);
    let mut manifests = ManifestDir::new(dir.path());
    let (snapshot, errors) = read(&mut manifests);
    assert!(errors.is_empty(), "a valid file has no errors: {errors:#?}");
    assert_eq!(service_names(&snapshot), vec!["web"]);
    assert_eq!(pod_names(&snapshot), vec!["web-1", "web-2"]);
    let service = &snapshot.services[0];
    let spec = service.spec.as_ref().expect("the Service keeps its spec");
    assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
    assert_eq!(spec.ports.as_ref().map(|p| p[0].port), Some(80));
    assert_eq!(
        snapshot.pods[0].status.as_ref().and_then(|s| s.pod_ip.as_deref()),
        Some("10.0.0.1")
    );
}

#[test]
fn empty_documents_and_yml_extension_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "web.yml", &format!("---\n{WEB_SERVICE}---\n---\n"));
    let mut manifests = ManifestDir::new(dir.path());
    let (snapshot, errors) = read(&mut manifests);
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(service_names(&snapshot), vec!["web"]);
}

#[test]
fn json_files_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let service = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "api", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.20", "selector": {"app": "api"}, "ports": [{"port": 443}]}
    });
    write(dir.path(), "api.json", &service.to_string());
    let mut manifests = ManifestDir::new(dir.path());
    let (snapshot, errors) = read(&mut manifests);
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(service_names(&snapshot), vec!["api"]);
}

#[test]
fn endpoint_slices_are_read() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "slice.yaml",
        r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: default
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- port: 8080
endpoints:
- addresses: ["10.0.0.1"]
"#,
    );
    let mut manifests = ManifestDir::new(dir.path());
    let (snapshot, errors) = read(&mut manifests);
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(snapshot.endpoint_slices.len(), 1);
    assert_eq!(
        snapshot.endpoint_slices[0].metadata.name.as_deref(),
        Some("web-abc")
    );
}

/// A Node manifest gives this node's zone, as the Node object does in a cluster.
#[test]
fn a_node_manifest_gives_the_zone() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "node.yaml",
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n  labels:\n    topology.kubernetes.io/zone: zone-b\n",
    );
    let (snapshot, errors) = read(&mut ManifestDir::new(dir.path()));
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(snapshot.zone_of("node-a"), Some("zone-b"));
    assert_eq!(snapshot.zone_of("node-b"), None);
}

#[test]
fn unknown_kinds_are_skipped_without_error() {
    let dir = tempfile::tempdir().unwrap();
    let deployment = r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: "not even checked"
"#;
    write(dir.path(), "all.yaml", &format!("{deployment}---\n{WEB_SERVICE}"));
    let mut manifests = ManifestDir::new(dir.path());
    let (snapshot, errors) = read(&mut manifests);
    assert!(errors.is_empty(), "a Deployment is not an error: {errors:#?}");
    assert_eq!(
        service_names(&snapshot),
        vec!["web"],
        "the Service after it is still read"
    );
    assert!(snapshot.pods.is_empty());
}

#[test]
fn hidden_and_non_manifest_files_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "web.yaml", WEB_SERVICE);
    // Each of these would be an error (or a second Service) if it were read.
    write(dir.path(), ".web.yaml.swp.yaml", "kind: [broken");
    write(
        dir.path(),
        ".hidden.yaml",
        &WEB_SERVICE.replace("name: web", "name: hidden"),
    );
    write(dir.path(), "notes.txt", "kind: [broken");
    write(dir.path(), "web.yaml~", "kind: [broken");
    write(
        dir.path(),
        "README.md",
        &WEB_SERVICE.replace("name: web", "name: readme"),
    );
    std::fs::create_dir(dir.path().join("sub.yaml")).unwrap();
    write(
        &dir.path().join("sub.yaml"),
        "nested.yaml",
        &WEB_SERVICE.replace("name: web", "name: nested"),
    );
    let mut manifests = ManifestDir::new(dir.path());
    let (snapshot, errors) = read(&mut manifests);
    assert!(errors.is_empty(), "ignored files cause no errors: {errors:#?}");
    assert_eq!(service_names(&snapshot), vec!["web"], "only web.yaml is read");
}

#[test]
fn type_error_names_file_document_object_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let broken = WEB_SERVICE.replace("port: 80", "port: \"eighty\"");
    write(
        dir.path(),
        "web.yaml",
        &format!("{}---\n{broken}", pod_yaml("web-1", "10.0.0.1")),
    );
    let mut manifests = ManifestDir::new(dir.path());
    let (snapshot, errors) = read(&mut manifests);
    let message = only_error(&errors);
    assert_mentions(
        &message,
        &[
            "web.yaml",
            "document 2",
            "Service default/web",
            "spec.ports[0].port",
        ],
    );
    assert_eq!(errors[0].document, Some(2));
    assert_eq!(errors[0].object.as_deref(), Some("Service default/web"));
    assert!(errors[0].file.ends_with("web.yaml"), "{:?}", errors[0].file);
    assert!(
        snapshot.services.is_empty() && snapshot.pods.is_empty(),
        "a file never read intact contributes nothing"
    );
}

#[test]
fn validation_error_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "web.yaml",
        &WEB_SERVICE.replace("port: 80", "port: 70000"),
    );
    let mut manifests = ManifestDir::new(dir.path());
    let (_, errors) = read(&mut manifests);
    let message = only_error(&errors);
    assert_mentions(
        &message,
        &[
            "web.yaml",
            "document 1",
            "Service default/web",
            "spec.ports[0].port",
            "70000",
        ],
    );
}

#[test]
fn pod_validation_error_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "pods.yaml", &pod_yaml("web-1", "10.0.0.x"));
    let mut manifests = ManifestDir::new(dir.path());
    let (snapshot, errors) = read(&mut manifests);
    let message = only_error(&errors);
    assert_mentions(
        &message,
        &["pods.yaml", "document 1", "Pod default/web-1", "status.podIP"],
    );
    assert!(snapshot.pods.is_empty());
}

#[test]
fn yaml_syntax_error_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "broken.yaml",
        "kind: Service\nmetadata: {name: web\nspec: [\n",
    );
    let mut manifests = ManifestDir::new(dir.path());
    let (snapshot, errors) = read(&mut manifests);
    let message = only_error(&errors);
    assert_mentions(&message, &["broken.yaml"]);
    assert!(snapshot.services.is_empty());
}

#[test]
fn document_without_kind_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let kindless = WEB_SERVICE.replace("kind: Service\n", "");
    write(
        dir.path(),
        "web.yaml",
        &format!("{}---\n{kindless}", pod_yaml("web-1", "10.0.0.1")),
    );
    let mut manifests = ManifestDir::new(dir.path());
    let (_, errors) = read(&mut manifests);
    let message = only_error(&errors);
    assert_mentions(&message, &["web.yaml", "document 2", "kind"]);
}

#[test]
fn a_broken_file_keeps_serving_its_last_good_objects() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "web.yaml",
        &format!("{WEB_SERVICE}---\n{}", pod_yaml("web-1", "10.0.0.1")),
    );
    let mut manifests = ManifestDir::new(dir.path());
    let (snapshot, errors) = read(&mut manifests);
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(service_names(&snapshot), vec!["web"]);

    // A half-saved edit: the second pod is added but the Service is broken.
    let broken = format!(
        "{}---\n{}---\n{}",
        WEB_SERVICE.replace("port: 80", "port: \"eighty\""),
        pod_yaml("web-1", "10.0.0.1"),
        pod_yaml("web-2", "10.0.0.2")
    );
    write(dir.path(), "web.yaml", &broken);
    let (snapshot, errors) = read(&mut manifests);
    assert_mentions(&only_error(&errors), &["web.yaml", "spec.ports[0].port"]);
    assert_eq!(
        service_names(&snapshot),
        vec!["web"],
        "the last good Service is still served"
    );
    assert_eq!(
        pod_names(&snapshot),
        vec!["web-1"],
        "the last good contents, not half of the new ones"
    );
    assert_eq!(
        snapshot.services[0]
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .map(|p| p[0].port),
        Some(80)
    );

    // Reading again without a fix reports the error again and still serves the old state.
    let (snapshot, errors) = read(&mut manifests);
    assert_eq!(
        errors.len(),
        1,
        "the error is reported on every read while it lasts: {errors:#?}"
    );
    assert_eq!(service_names(&snapshot), vec!["web"]);

    // Fixed: the new contents replace the old.
    write(
        dir.path(),
        "web.yaml",
        &format!("{WEB_SERVICE}---\n{}", pod_yaml("web-2", "10.0.0.2")),
    );
    let (snapshot, errors) = read(&mut manifests);
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(pod_names(&snapshot), vec!["web-2"]);
}

#[test]
fn a_deleted_files_objects_disappear() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "web.yaml", WEB_SERVICE);
    write(dir.path(), "pods.yaml", &pod_yaml("web-1", "10.0.0.1"));
    let mut manifests = ManifestDir::new(dir.path());
    let (snapshot, _) = read(&mut manifests);
    assert_eq!(pod_names(&snapshot), vec!["web-1"]);

    std::fs::remove_file(dir.path().join("pods.yaml")).unwrap();
    let (snapshot, errors) = read(&mut manifests);
    assert!(errors.is_empty(), "{errors:#?}");
    assert!(
        snapshot.pods.is_empty(),
        "the deleted file's pod is gone: {:?}",
        pod_names(&snapshot)
    );
    assert_eq!(service_names(&snapshot), vec!["web"]);
}

#[test]
fn a_deleted_broken_file_stops_being_served_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "web.yaml", WEB_SERVICE);
    let mut manifests = ManifestDir::new(dir.path());
    read(&mut manifests);
    write(dir.path(), "web.yaml", "kind: [broken");
    let (snapshot, errors) = read(&mut manifests);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(service_names(&snapshot), vec!["web"]);

    std::fs::remove_file(dir.path().join("web.yaml")).unwrap();
    let (snapshot, errors) = read(&mut manifests);
    assert!(errors.is_empty(), "{errors:#?}");
    assert!(snapshot.services.is_empty(), "its last good contents go with it");
}

#[test]
fn other_files_keep_working_when_one_is_broken() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a-broken.yaml", "kind: Service\nmetadata: {name: x\n");
    write(dir.path(), "b-web.yaml", WEB_SERVICE);
    write(dir.path(), "c-pods.yaml", &pod_yaml("web-1", "10.0.0.1"));
    let mut manifests = ManifestDir::new(dir.path());
    let (snapshot, errors) = read(&mut manifests);
    assert_mentions(&only_error(&errors), &["a-broken.yaml"]);
    assert_eq!(service_names(&snapshot), vec!["web"]);
    assert_eq!(pod_names(&snapshot), vec!["web-1"]);
}

#[test]
fn a_missing_directory_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut manifests = ManifestDir::new(dir.path().join("does-not-exist"));
    assert!(
        manifests.read().is_err(),
        "a directory that does not exist cannot be read"
    );
}

fn names_of(changes: &[Change]) -> Vec<String> {
    changes
        .iter()
        .map(|change| {
            let (what, object) = match change {
                Change::Applied(object) => ("applied", object),
                Change::Deleted(object) => ("deleted", object),
                Change::Listed(kind, objects) => return format!("listed {kind:?} {}", objects.len()),
            };
            let (kind, _, name) = key_of(object);
            format!("{what} {kind:?} {name}")
        })
        .collect()
}

/// After the first full lists, a re-read says only what changed: a changed object, a removed
/// file's objects, nothing for an object that moved to another file.
#[test]
fn changes_are_the_first_lists_then_what_each_file_changed() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "web.yaml", WEB_SERVICE);
    write(
        dir.path(),
        "pods.yaml",
        &format!("{}---\n{}", pod_yaml("a", "10.0.0.1"), pod_yaml("b", "10.0.0.2")),
    );
    let mut manifests = ManifestDir::new(dir.path());
    let (changes, errors) = manifests.changes().unwrap();
    assert!(errors.is_empty());
    assert_eq!(
        names_of(&changes),
        [
            "applied Pod a",
            "applied Pod b",
            "applied Service web",
            "listed Service 1",
            "listed EndpointSlice 0",
            "listed Pod 2",
            "listed Node 0"
        ]
    );
    assert!(manifests.changes().unwrap().0.is_empty(), "nothing changed");

    write(
        dir.path(),
        "pods.yaml",
        &format!("{}---\n{}", pod_yaml("a", "10.0.0.1"), pod_yaml("b", "10.0.0.3")),
    );
    assert_eq!(names_of(&manifests.changes().unwrap().0), ["applied Pod b"]);

    // Pod a moves to a file of its own, then pods.yaml goes.
    write(dir.path(), "a.yaml", &pod_yaml("a", "10.0.0.1"));
    write(dir.path(), "pods.yaml", &pod_yaml("b", "10.0.0.3"));
    assert_eq!(names_of(&manifests.changes().unwrap().0), ["applied Pod a"]);
    std::fs::remove_file(dir.path().join("pods.yaml")).unwrap();
    assert_eq!(names_of(&manifests.changes().unwrap().0), ["deleted Pod b"]);
}
