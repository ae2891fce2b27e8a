//! The reconciler's view of the maps, the same for both address families: the entries it
//! programs, what the maps hold ([`Programmed`]) and the writes it makes ([`MapWriter`]). Which
//! family's twin map an entry goes to follows from its address; ids and backend tables are one
//! space shared by both families.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::{IpAddr, SocketAddr},
};

use lb_common::{Address, BackendId, ServiceInfo, ServiceKey};

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

/// A backend of one backend set, of either family: the value of its family's backends map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendEntry {
    pub addr: SocketAddr,
    pub proto: u8,
    /// `lb_common::backend_flags`.
    pub flags: u8,
    pub set_id: u32,
}

impl BackendEntry {
    /// The value of `addr`'s family's backends map.
    pub fn with_addr<A: Address>(&self, addr: A) -> lb_common::Backend<A> {
        lb_common::Backend {
            addr,
            port: self.addr.port(),
            proto: self.proto,
            flags: self.flags,
            set_id: self.set_id,
        }
    }
}

impl<A: Address + Into<IpAddr>> From<lb_common::Backend<A>> for BackendEntry {
    fn from(backend: lb_common::Backend<A>) -> Self {
        Self {
            addr: SocketAddr::new(backend.addr.into(), backend.port),
            proto: backend.proto,
            flags: backend.flags,
            set_id: backend.set_id,
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

/// The writes the reconciler makes, in batches. Implemented over the pinned BPF maps by the
/// datapath, and by a recorder in tests. An entry with an address goes to its family's twin map.
/// A batch is written in order and stops at the first entry that fails, which it names.
pub trait MapWriter {
    fn put_backends(&mut self, entries: &[(BackendId, BackendEntry)]) -> Result<(), BatchError>;
    /// Deletes each id, programmed as its entry (whose address tells the map).
    fn delete_backends(&mut self, entries: &[(BackendId, BackendEntry)]) -> Result<(), BatchError>;
    fn put_services(&mut self, entries: &[(FrontendKey, ServiceInfo)]) -> Result<(), BatchError>;
    fn delete_services(&mut self, keys: &[FrontendKey]) -> Result<(), BatchError>;
    /// Writes a table at each (position, length) of the table space (in the order of their
    /// positions): `fill(i, table)` writes the `i`th in place (maybe on several threads), so a
    /// pass over many Services never holds all their tables at once.
    fn put_tables(
        &mut self,
        blocks: &[(u32, u32)],
        fill: &(dyn Fn(usize, &mut [BackendId]) + Sync),
    ) -> Result<(), MapError>;
    /// Makes the table space hold `positions`, its contents kept.
    fn grow_tables(&mut self, positions: u32) -> Result<(), MapError>;
    /// Marks each address as a ClusterIP with that many frontends.
    fn put_cluster_ips(&mut self, entries: &[(IpAddr, u32)]) -> Result<(), BatchError>;
    fn delete_cluster_ips(&mut self, addrs: &[IpAddr]) -> Result<(), BatchError>;
    fn put_source_range(&mut self, range: SourceRange) -> Result<(), MapError>;
    fn delete_source_range(&mut self, range: SourceRange) -> Result<(), MapError>;
    /// Keeps `next` as the high-water mark of `kind`'s ids (see [`super::ids`]).
    fn put_next_id(&mut self, kind: IdKind, next: u32) -> Result<(), MapError>;
    /// Drops the traffic counters kept under a service id that is being given to a new frontend
    /// or freed, so counts never carry over from a previous owner. Best effort: counters are
    /// not worth failing a service for.
    fn forget_service_stats(&mut self, _service_id: u32) {}
}

#[derive(Clone, Debug, thiserror::Error)]
#[error("{map}: {message}")]
pub struct MapError {
    pub map: &'static str,
    pub message: String,
}

/// The entry of a batch that failed (the ones before it were written), and why.
#[derive(Debug)]
pub struct BatchError {
    pub index: usize,
    pub error: MapError,
}

/// What the maps of both families hold, as read back from the pinned maps at start-up and kept
/// in step since.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Programmed {
    /// The frontends.
    pub services: BTreeMap<FrontendKey, ServiceInfo>,
    pub backends: HashMap<BackendId, BackendEntry>,
    /// The ids at the start of each table frontends point at (`count` of them), by position.
    pub tables: HashMap<u32, Vec<BackendId>>,
    /// Positions the table space holds.
    pub table_capacity: u32,
    pub source_ranges: BTreeSet<SourceRange>,
    /// ClusterIPs → how many frontends each has.
    pub cluster_ips: BTreeMap<IpAddr, u32>,
    /// The ids' high-water marks (0: none kept).
    pub next_ids: NextIds,
}

impl Programmed {
    /// The backends new flows of `set` go to, in slot order (as far as the maps hold them).
    pub fn live_backends(&self, set: &lb_common::BackendSet) -> &[BackendId] {
        match self.tables.get(&set.table) {
            Some(ids) if set.count > 0 => &ids[..ids.len().min(set.count as usize)],
            _ => &[],
        }
    }
}

/// Past every service and backend id handed out since the counters last wrapped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextIds {
    pub service: u32,
    pub backend: u32,
}
