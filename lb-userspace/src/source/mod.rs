//! Sources of truth. Each turns its input into the same typed k8s-openapi objects; nothing
//! downstream knows which source is running.
pub mod kube;
pub mod manifests;

use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};

pub use crate::model::ZONE_LABEL;

/// Everything a source currently knows. A source publishes one only when it is complete (for
/// the Kubernetes source: after the first full list of every watched kind).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: Vec<Service>,
    pub pods: Vec<Pod>,
    pub endpoint_slices: Vec<EndpointSlice>,
    /// This node's Node object, when known (its zone label feeds topology-aware routing).
    pub nodes: Vec<Node>,
}

impl Snapshot {
    /// The zone label of the Node named `node_name`.
    pub fn zone_of(&self, node_name: &str) -> Option<&str> {
        self.nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(node_name))?
            .metadata
            .labels
            .as_ref()?
            .get(ZONE_LABEL)
            .map(String::as_str)
    }
}
