//! Objects decoded from the API without what no part of the agent reads: the watcher decodes
//! [`Lean<K>`] instead of `K`. Most of an object as the API sends it is its managedFields (an
//! EndpointSlice of 10 endpoints carries a field set per endpoint); decoded into the API's types
//! they are trees of `serde_json::Value` built only to be dropped by [`crate::model::trim`],
//! which made decoding most of the cost of listing. Here they are skipped while parsing, as are
//! the metadata fields trim drops anyway; what is decoded is then trimmed as before.
use std::collections::BTreeMap;

use k8s_openapi::{
    Metadata, Resource,
    api::{
        core::v1::{Node, Pod, PodSpec, PodStatus, Service, ServiceSpec, ServiceStatus},
        discovery::v1::{Endpoint, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use serde::{Deserialize, Deserializer};

/// `K` as decoded from the API's JSON, without its managedFields and the metadata fields
/// [`crate::model::trim`] drops.
#[derive(Clone, Debug, PartialEq)]
pub struct Lean<K>(pub K);

impl<K: Resource> Resource for Lean<K> {
    const API_VERSION: &'static str = K::API_VERSION;
    const GROUP: &'static str = K::GROUP;
    const KIND: &'static str = K::KIND;
    const VERSION: &'static str = K::VERSION;
    const URL_PATH_SEGMENT: &'static str = K::URL_PATH_SEGMENT;
    type Scope = K::Scope;
}

impl<K: Metadata<Ty = ObjectMeta>> Metadata for Lean<K> {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        self.0.metadata()
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        self.0.metadata_mut()
    }
}

/// The metadata fields trim keeps (every other one, managedFields first, is skipped unparsed).
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Meta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    annotations: Option<BTreeMap<String, String>>,
    deletion_timestamp: Option<Time>,
}

impl From<Meta> for ObjectMeta {
    fn from(meta: Meta) -> Self {
        Self {
            name: meta.name,
            namespace: meta.namespace,
            uid: meta.uid,
            resource_version: meta.resource_version,
            labels: meta.labels,
            annotations: meta.annotations,
            deletion_timestamp: meta.deletion_timestamp,
            ..Self::default()
        }
    }
}

/// An object of metadata, spec and status.
#[derive(Deserialize)]
struct Object<Spec, Status> {
    #[serde(default)]
    metadata: Meta,
    spec: Option<Spec>,
    status: Option<Status>,
}

impl<'de> Deserialize<'de> for Lean<Service> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let object = Object::<ServiceSpec, ServiceStatus>::deserialize(deserializer)?;
        Ok(Self(Service {
            metadata: object.metadata.into(),
            spec: object.spec,
            status: object.status,
        }))
    }
}

impl<'de> Deserialize<'de> for Lean<Pod> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let object = Object::<PodSpec, PodStatus>::deserialize(deserializer)?;
        Ok(Self(Pod {
            metadata: object.metadata.into(),
            spec: object.spec,
            status: object.status,
        }))
    }
}

impl<'de> Deserialize<'de> for Lean<Node> {
    /// Only its metadata: trim keeps nothing else of a Node.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Wire {
            #[serde(default)]
            metadata: Meta,
        }
        let wire = Wire::deserialize(deserializer)?;
        Ok(Self(Node {
            metadata: wire.metadata.into(),
            ..Node::default()
        }))
    }
}

impl<'de> Deserialize<'de> for Lean<EndpointSlice> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire {
            #[serde(default)]
            metadata: Meta,
            address_type: String,
            endpoints: Option<Vec<Endpoint>>,
            ports: Option<Vec<EndpointPort>>,
        }
        let wire = Wire::deserialize(deserializer)?;
        Ok(Self(EndpointSlice {
            metadata: wire.metadata.into(),
            address_type: wire.address_type,
            endpoints: wire.endpoints,
            ports: wire.ports,
        }))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::trim;

    fn metadata() -> serde_json::Value {
        json!({
            "name": "web", "namespace": "default", "uid": "1234", "resourceVersion": "42",
            "generateName": "web-", "creationTimestamp": "2026-01-01T00:00:00Z", "generation": 3,
            "labels": {"app": "web", "kubernetes.io/service-name": "web"},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"a\":1}",
                            "switchboard.io/lb-algorithm": "random"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web", "uid": "1234"}],
            "finalizers": ["x"],
            "managedFields": [{"manager": "kubectl", "operation": "Update", "fieldsType": "FieldsV1",
                               "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:app": {}}}}}],
        })
    }

    /// Decoded lean then trimmed, each kind is what the full decoding trimmed was.
    #[test]
    fn lean_objects_trim_to_what_full_ones_do() {
        let service = json!({
            "apiVersion": "v1", "kind": "Service", "metadata": metadata(),
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "selector": {"app": "web"},
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "nodePort": 30080}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]},
                       "conditions": [{"type": "x", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z",
                                       "reason": "r", "message": "m"}]},
        });
        let mut full: Service = serde_json::from_value(service.clone()).unwrap();
        let Lean(mut lean) = serde_json::from_value::<Lean<Service>>(service).unwrap();
        assert_eq!(lean.metadata.managed_fields, None);
        trim::service(&mut full);
        trim::service(&mut lean);
        assert_eq!(lean, full);

        let slice = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": metadata(),
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.244.0.1", "10.244.0.2"], "nodeName": "node-a", "zone": "z",
                           "conditions": {"ready": true, "serving": true, "terminating": false},
                           "hints": {"forZones": [{"name": "z"}]},
                           "targetRef": {"kind": "Pod", "namespace": "default", "name": "web-1", "uid": "9"}}],
        });
        let mut full: EndpointSlice = serde_json::from_value(slice.clone()).unwrap();
        let Lean(mut lean) = serde_json::from_value::<Lean<EndpointSlice>>(slice).unwrap();
        trim::endpoint_slice(&mut full);
        trim::endpoint_slice(&mut lean);
        assert_eq!(lean, full);

        let pod = json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": metadata(),
            "spec": {"nodeName": "node-a", "containers": [
                {"name": "app", "image": "example.invalid/web", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": "10.244.0.1", "podIPs": [{"ip": "10.244.0.1"}],
                       "conditions": [{"type": "Ready", "status": "True"}]},
        });
        let mut full: Pod = serde_json::from_value(pod.clone()).unwrap();
        let Lean(mut lean) = serde_json::from_value::<Lean<Pod>>(pod).unwrap();
        trim::pod(&mut full);
        trim::pod(&mut lean);
        assert_eq!(lean, full);

        let node = json!({
            "apiVersion": "v1", "kind": "Node", "metadata": metadata(),
            "spec": {"podCIDR": "10.244.0.0/24"}, "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"}]},
        });
        let mut full: Node = serde_json::from_value(node.clone()).unwrap();
        let Lean(mut lean) = serde_json::from_value::<Lean<Node>>(node).unwrap();
        trim::node(&mut full);
        trim::node(&mut lean);
        assert_eq!(lean, full);
    }

    /// The watcher reads the kind and the resourceVersion through kube's `Resource`.
    #[test]
    fn lean_objects_are_resources_of_their_kind() {
        use kube::Resource as _;
        assert_eq!(Lean::<EndpointSlice>::kind(&()), "EndpointSlice");
        assert_eq!(Lean::<EndpointSlice>::plural(&()), "endpointslices");
        assert_eq!(Lean::<Service>::api_version(&()), "v1");
        let Lean(service) = serde_json::from_value::<Lean<Service>>(json!({"metadata": metadata()})).unwrap();
        assert_eq!(Lean(service).meta().resource_version.as_deref(), Some("42"));
    }
}
