//! The reconciler's view of the maps, the same for both address families: the entries it
//! programs, what the maps hold ([`Programmed`]) and the writes it makes ([`MapWriter`]). Which
//! family's twin map an entry goes to follows from its address; ids, slots and Maglev tables
//! are one space shared by both families.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
};

use lb_common::{Address, BackendId, ServiceInfo, ServiceKey, SlotKey};

use super::IdKind;
use crate::model::{self, Frontend, Protocol};

/// A frontend as the maps key it: address (of either family), port and IP protocol number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: u8,
}

impl FrontendKey {
    /// The key `frontend` is programmed under (a NodePort's is its family's unspecified address).
    pub fn of(frontend: &Frontend) -> Self {
        Self {
            addr: frontend.address,
            port: frontend.port,
            proto: frontend.protocol.ip_protocol(),
        }
    }

    /// The key of `addr`'s family's services map.
    pub fn service_key<A: Address>(&self, addr: A) -> ServiceKey<A> {
        ServiceKey {
            addr,
            port: self.port,
            proto: self.proto,
            pad: 0,
        }
    }
}

impl<A: Address + Into<IpAddr>> From<ServiceKey<A>> for FrontendKey {
    fn from(key: ServiceKey<A>) -> Self {
        Self {
            addr: key.addr.into(),
            port: key.port,
            proto: key.proto,
        }
    }
}

/// `10.96.0.10:80/TCP`, `[fd00::10]:80/TCP`.
impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match Protocol::from_ip_protocol(self.proto) {
            Some(protocol) => model::dialled(self.addr, self.port, protocol),
            None => model::dialled(self.addr, self.port, format_args!("proto-{}", self.proto)),
        };
        f.write_str(&text)
    }
}

/// A backend of one service, of either family: the value of its family's backends map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendEntry {
    pub addr: SocketAddr,
    pub proto: u8,
    /// `lb_common::backend_flags`.
    pub flags: u8,
    pub service_id: u32,
}

impl BackendEntry {
    /// The value of `addr`'s family's backends map.
    pub fn with_addr<A: Address>(&self, addr: A) -> lb_common::Backend<A> {
        lb_common::Backend {
            addr,
            port: self.addr.port(),
            proto: self.proto,
            flags: self.flags,
            service_id: self.service_id,
        }
    }
}

impl<A: Address + Into<IpAddr>> From<lb_common::Backend<A>> for BackendEntry {
    fn from(backend: lb_common::Backend<A>) -> Self {
        Self {
            addr: SocketAddr::new(backend.addr.into(), backend.port),
            proto: backend.proto,
            flags: backend.flags,
            service_id: backend.service_id,
        }
    }
}

/// One `loadBalancerSourceRanges` prefix admitted by a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceRange {
    pub service_id: u32,
    pub addr: IpAddr,
    pub prefix_len: u8,
}

/// The writes the reconciler makes. Implemented over the pinned BPF maps by the datapath, and by
/// a recorder in tests. An entry with an address goes to its family's twin map.
pub trait MapWriter {
    fn put_backend(&mut self, id: BackendId, backend: &BackendEntry) -> Result<(), MapError>;
    fn put_slot(&mut self, key: SlotKey, id: BackendId) -> Result<(), MapError>;
    fn put_service(&mut self, key: FrontendKey, info: ServiceInfo) -> Result<(), MapError>;
    /// Deletes `id`, programmed as `backend` (whose address tells the map).
    fn delete_backend(&mut self, id: BackendId, backend: &BackendEntry) -> Result<(), MapError>;
    fn delete_slot(&mut self, key: SlotKey) -> Result<(), MapError>;
    fn delete_service(&mut self, key: FrontendKey) -> Result<(), MapError>;
    /// Writes a complete Maglev table for `service_id` and swaps it in for the old one.
    fn put_maglev(&mut self, service_id: u32, table: &[BackendId]) -> Result<(), MapError>;
    fn delete_maglev(&mut self, service_id: u32) -> Result<(), MapError>;
    /// Marks `addr` as a ClusterIP with `frontends` frontends.
    fn put_cluster_ip(&mut self, addr: IpAddr, frontends: u32) -> Result<(), MapError>;
    fn delete_cluster_ip(&mut self, addr: IpAddr) -> Result<(), MapError>;
    fn put_source_range(&mut self, range: SourceRange) -> Result<(), MapError>;
    fn delete_source_range(&mut self, range: SourceRange) -> Result<(), MapError>;
    /// Drops the traffic counters kept under a service id that is being given to a new frontend
    /// or freed, so counts never carry over from a previous owner. Best effort: counters are
    /// not worth failing a service for.
    fn forget_service_stats(&mut self, _service_id: u32) {}
    /// Keeps `next` as the high-water mark of `kind`'s ids (see [`super::ids`]).
    fn put_next_id(&mut self, kind: IdKind, next: u32) -> Result<(), MapError>;
}

#[derive(Debug, thiserror::Error)]
#[error("{map}: {message}")]
pub struct MapError {
    pub map: &'static str,
    pub message: String,
}

/// What the maps of both families hold, as read back from the pinned maps at start-up and kept
/// in step since.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Programmed {
    pub services: BTreeMap<FrontendKey, ServiceInfo>,
    pub slots: BTreeMap<SlotKey, BackendId>,
    pub backends: BTreeMap<BackendId, BackendEntry>,
    /// Services with a Maglev table, and what it was built from.
    pub maglev: BTreeMap<u32, MaglevInput>,
    pub source_ranges: BTreeSet<SourceRange>,
    /// ClusterIPs → how many frontends each has.
    pub cluster_ips: BTreeMap<IpAddr, u32>,
    /// The ids' high-water marks (0: none kept).
    pub next_ids: NextIds,
}

/// Past every service and backend id handed out since the counters last wrapped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextIds {
    pub service: u32,
    pub backend: u32,
}

/// What a Maglev table is a function of: its size and the service's backends (ids, sorted).
/// Equal inputs give equal tables, so comparing inputs tells whether to rebuild.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MaglevInput {
    pub size: u32,
    pub backends: Vec<BackendId>,
}
