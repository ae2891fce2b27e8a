//! Sources of truth. Each turns its input into the same typed k8s-openapi objects; nothing
//! downstream knows which source is running.
pub mod kube;
pub mod manifests;

use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};

/// Everything a source currently knows. A source publishes one only when it is complete (for
/// the Kubernetes source: after the first full list of every watched kind).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: Vec<Service>,
    pub pods: Vec<Pod>,
    pub endpoint_slices: Vec<EndpointSlice>,
}
