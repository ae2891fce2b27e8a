//! Sources of truth. Each turns its input into the same typed k8s-openapi objects and tells the
//! agent what changed; nothing downstream knows which source is running.
pub mod kube;
pub mod lean;
pub mod manifests;

use k8s_openapi::{
    api::{
        core::v1::{Node, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use tokio::sync::mpsc;

pub use crate::model::ZONE_LABEL;

/// Everything a source holds at one moment, for the one-shot commands (`get`, `plan`, `explain`).
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

/// The kinds of object the model reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Pod,
    Node,
}

impl Kind {
    pub const ALL: [Self; 4] = [Self::Service, Self::EndpointSlice, Self::Pod, Self::Node];
}

/// One object of a kind the model reads.
#[derive(Clone, Debug, PartialEq)]
#[expect(
    clippy::large_enum_variant,
    reason = "each object is moved once, from the source to the agent's store, where it is kept unboxed"
)]
pub enum Object {
    Service(Service),
    EndpointSlice(EndpointSlice),
    Pod(Pod),
    Node(Node),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Self::Service(_) => Kind::Service,
            Self::EndpointSlice(_) => Kind::EndpointSlice,
            Self::Pod(_) => Kind::Pod,
            Self::Node(_) => Kind::Node,
        }
    }

    pub fn name(&self) -> ObjectName {
        let metadata = self.metadata();
        ObjectName {
            namespace: metadata.namespace.clone().unwrap_or_else(|| "default".into()),
            name: metadata.name.clone().unwrap_or_default(),
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Self::Service(o) => &o.metadata,
            Self::EndpointSlice(o) => &o.metadata,
            Self::Pod(o) => &o.metadata,
            Self::Node(o) => &o.metadata,
        }
    }
}

/// `namespace/name` of any object.
pub type ObjectName = crate::model::ServiceName;

/// What a source tells the agent.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// An object was added or changed.
    Applied(Object),
    /// An object was removed.
    Deleted(Object),
    /// A list of this kind is complete (the first, or a re-list after the watch lost track): its
    /// objects came as `Applied` one by one, and these are their names; the agent's objects of
    /// that kind missing from it are gone. Nothing is programmed before every kind a source
    /// watches has been listed once. A list is never held whole, so it costs no copy of the world.
    Listed(Kind, Vec<ObjectName>),
}

/// Where a source sends its changes; each message is applied before the agent programs.
pub type Changes = mpsc::UnboundedSender<Change>;
