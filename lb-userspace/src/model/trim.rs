//! What the model never reads, dropped from objects before the agent stores them: at 100,000
//! Services most of an object as the API sends it (managedFields, `kubectl apply`'s
//! last-applied annotation, a Pod's containers) is memory spent on nothing. Each function keeps
//! exactly the fields [`super::compute_service`] and the Events about a Service read.
use k8s_openapi::{
    api::{
        core::v1::{
            Container, ContainerPort, Node, ObjectReference, Pod, PodCondition, PodSpec, PodStatus, Service,
        },
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use super::{LB_ALGORITHM_ANNOTATION, ZONE_LABEL};

/// Name, namespace, uid (Events refer to it), labels; annotations only when the model reads them.
fn metadata(metadata: &mut ObjectMeta, annotations: &[&str]) {
    let kept = ObjectMeta {
        name: metadata.name.take(),
        namespace: metadata.namespace.take(),
        uid: metadata.uid.take(),
        resource_version: metadata.resource_version.take(),
        labels: metadata.labels.take(),
        deletion_timestamp: metadata.deletion_timestamp.take(),
        annotations: metadata.annotations.take().map(|mut all| {
            all.retain(|key, _| annotations.contains(&key.as_str()));
            all
        }),
        ..ObjectMeta::default()
    };
    *metadata = kept;
}

pub fn service(service: &mut Service) {
    metadata(&mut service.metadata, &[LB_ALGORITHM_ANNOTATION]);
    if let Some(status) = &mut service.status {
        status.conditions = None;
    }
}

pub fn endpoint_slice(slice: &mut EndpointSlice) {
    metadata(&mut slice.metadata, &[]);
    for endpoint in slice.endpoints.iter_mut().flatten() {
        // Only the first address counts.
        endpoint.addresses.truncate(1);
        endpoint.deprecated_topology = None;
        endpoint.hostname = None;
        endpoint.target_ref = endpoint.target_ref.take().map(|target| ObjectReference {
            name: target.name,
            ..ObjectReference::default()
        });
    }
}

pub fn pod(pod: &mut Pod) {
    metadata(&mut pod.metadata, &[]);
    pod.spec = pod.spec.take().map(|spec| PodSpec {
        node_name: spec.node_name,
        // Named target ports resolve against container ports.
        containers: spec
            .containers
            .into_iter()
            .filter(|c| c.ports.as_ref().is_some_and(|p| !p.is_empty()))
            .map(|c| Container {
                name: c.name,
                ports: c.ports.map(|ports| {
                    ports
                        .into_iter()
                        .map(|p| ContainerPort {
                            name: p.name,
                            container_port: p.container_port,
                            protocol: p.protocol,
                            ..ContainerPort::default()
                        })
                        .collect()
                }),
                ..Container::default()
            })
            .collect(),
        ..PodSpec::default()
    });
    pod.status = pod.status.take().map(|status| PodStatus {
        phase: status.phase,
        pod_ip: status.pod_ip,
        pod_ips: status.pod_ips,
        conditions: status.conditions.map(|conditions| {
            conditions
                .into_iter()
                .filter(|c| c.type_ == "Ready")
                .map(|c| PodCondition {
                    type_: c.type_,
                    status: c.status,
                    ..PodCondition::default()
                })
                .collect()
        }),
        ..PodStatus::default()
    });
}

pub fn node(node: &mut Node) {
    metadata(&mut node.metadata, &[]);
    if let Some(labels) = &mut node.metadata.labels {
        labels.retain(|key, _| key == ZONE_LABEL);
    }
    node.spec = None;
    node.status = None;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A trimmed object computes to the same model as the object the API sent.
    #[test]
    fn trimming_changes_nothing_the_model_computes() {
        let service: Service = serde_yaml_ng::from_str(
            r#"
metadata:
  name: web
  namespace: default
  uid: 1234
  labels: {team: a}
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: "{}"
    switchboard.io/lb-algorithm: random
  managedFields:
  - manager: kubectl
    operation: Apply
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http, nodePort: 30080}
status:
  loadBalancer:
    ingress: [{ip: 192.0.2.1}]
"#,
        )
        .unwrap();
        let pod: Pod = serde_yaml_ng::from_str(
            r#"
metadata:
  name: web-1
  namespace: default
  labels: {app: web}
  managedFields: [{manager: kubelet}]
spec:
  nodeName: node-a
  containers:
  - name: app
    image: example.invalid/web
    env: [{name: A, value: b}]
    ports: [{name: http, containerPort: 8080}]
  - name: sidecar
    image: example.invalid/sidecar
status:
  phase: Running
  podIP: 10.244.0.1
  conditions:
  - {type: Ready, status: "True", lastTransitionTime: "2026-01-01T00:00:00Z"}
  - {type: PodScheduled, status: "True"}
"#,
        )
        .unwrap();
        let slice: EndpointSlice = serde_yaml_ng::from_str(
            r#"
metadata:
  name: web-abc
  namespace: default
  labels: {kubernetes.io/service-name: web}
  managedFields: [{manager: endpointslice-controller}]
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.244.0.1, 10.244.0.2]
  conditions: {ready: true}
  nodeName: node-a
  targetRef: {kind: Pod, name: web-1, namespace: default, uid: abc}
"#,
        )
        .unwrap();
        let compute = |services: &[Service], pods: &[Pod], slices: &[EndpointSlice], from| {
            super::super::compute(&super::super::Input {
                services,
                pods,
                endpoint_slices: slices,
                endpoints_from: from,
                node_name: Some("node-a"),
                zone: None,
            })
        };
        let (mut trimmed_service, mut trimmed_pod, mut trimmed_slice) =
            (service.clone(), pod.clone(), slice.clone());
        super::service(&mut trimmed_service);
        super::pod(&mut trimmed_pod);
        endpoint_slice(&mut trimmed_slice);
        assert!(trimmed_service.metadata.managed_fields.is_none());
        assert_eq!(
            trimmed_service.metadata.annotations.as_ref().map(|a| a.len()),
            Some(1)
        );
        assert_eq!(trimmed_pod.spec.as_ref().unwrap().containers.len(), 1);
        for from in [
            super::super::EndpointsFrom::Pods,
            super::super::EndpointsFrom::Slices,
        ] {
            let before = compute(
                std::slice::from_ref(&service),
                std::slice::from_ref(&pod),
                std::slice::from_ref(&slice),
                from,
            );
            let after = compute(
                &[trimmed_service.clone()],
                &[trimmed_pod.clone()],
                &[trimmed_slice.clone()],
                from,
            );
            assert!(!before.frontends.is_empty() && !before.frontends[0].backends.is_empty());
            assert_eq!(before, after, "{from:?}");
        }
    }
}
