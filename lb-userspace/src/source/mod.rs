//! Sources of truth. Each turns its input into the same typed k8s-openapi objects; nothing
//! downstream knows which source is running.
pub mod manifests;

use k8s_openapi::api::core::v1::{Pod, Service};

/// Everything a source currently knows.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: Vec<Service>,
    pub pods: Vec<Pod>,
}
