//! The contract between the datapath (`lb-ebpf`) and the agent (`lb-userspace`).
//!
//! Every type here is `#[repr(C)]`, has no implicit padding (explicit `pad` fields instead), and is
//! read by both sides. Addresses are stored as network-order byte arrays and ports as host-order
//! `u16`, so `bpftool map dump` prints `addr: [10,96,0,10]` and `port: 80`.
#![no_std]

/// Where the agent pins the maps unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/switchboard";

/// Names of the maps, which are also the names they are pinned under.
pub mod map_names {
    pub const SERVICES: &str = "SB_SERVICES";
    pub const BACKEND_SLOTS: &str = "SB_BACKEND_SLOTS";
    pub const BACKENDS: &str = "SB_BACKENDS";
    pub const CONNTRACK: &str = "SB_CONNTRACK";
    pub const STATS: &str = "SB_STATS";
    pub const ALL: [&str; 5] = [SERVICES, BACKEND_SLOTS, BACKENDS, CONNTRACK, STATS];
}

/// Names of the programs in the object file.
pub mod program_names {
    /// TC ingress on a pod's host-side interface: traffic leaving the pod.
    pub const FROM_POD: &str = "from_pod";
    /// TC egress on a pod's host-side interface: traffic entering the pod.
    pub const TO_POD: &str = "to_pod";
}

/// Default map capacities; the agent may override them at load time.
pub mod capacity {
    pub const SERVICES: u32 = 65_536;
    pub const BACKENDS: u32 = 262_144;
    pub const BACKEND_SLOTS: u32 = 262_144;
    pub const CONNTRACK: u32 = 262_144;
}

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// A service frontend as a packet addresses it: destination address, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: [u8; 4],
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

/// What the datapath knows of a frontend. Written last on add and first on delete, so a packet
/// that finds it also finds `backend_count` valid slots.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Stable id, chosen by the agent; keys the slots and is recorded in conntrack.
    pub id: u32,
    /// Slots `0..backend_count` in [`map_names::BACKEND_SLOTS`] are valid. Zero: no endpoints.
    pub backend_count: u32,
    pub flags: u32,
}

/// One slot of a service's backend set: `(service id, slot index)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub service_id: u32,
    pub slot: u32,
}

/// A backend id, the value of a slot and the key of [`map_names::BACKENDS`].
pub type BackendId = u32;

/// A backend of one service. Ids are per service, so removing an endpoint from a service removes
/// its id, and a conntrack entry that still names it is re-balanced instead of black-holed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: [u8; 4],
    pub port: u16,
    pub proto: u8,
    pub flags: u8,
    /// The service this backend belongs to; guards against a recycled id.
    pub service_id: u32,
}

/// Which way a conntrack entry looks at a flow.
pub mod ct_direction {
    /// Client → frontend, keyed as the client sent it; maps to the chosen backend.
    pub const FORWARD: u8 = 0;
    /// Backend → client, keyed as the backend replies; maps back to the frontend.
    pub const REPLY: u8 = 1;
}

/// A flow's 5-tuple as seen in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub src_addr: [u8; 4],
    pub dst_addr: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub direction: u8,
    pub pad: [u8; 2],
}

/// A conntrack entry. For [`ct_direction::FORWARD`] `nat_*` is the backend the flow was given;
/// for [`ct_direction::REPLY`] it is the frontend the client dialled.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    pub service_id: u32,
    pub backend_id: BackendId,
    pub nat_addr: [u8; 4],
    pub nat_port: u16,
    pub flags: u16,
    /// `bpf_ktime_get_ns()` of the last packet.
    pub last_seen_ns: u64,
}

/// Indexes of the per-CPU datapath counters in [`map_names::STATS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Packets DNATed to a backend (every packet of a service flow, not just the first).
    ServicePackets = 0,
    /// New flows: a conntrack miss that chose a backend.
    NewFlows = 1,
    /// Flows whose backend had gone and were given a live one.
    Rebalanced = 2,
    /// Packets to a frontend with no usable backend, dropped.
    NoBackend = 3,
    /// Replies translated back to the frontend.
    ReplyPackets = 4,
    /// Conntrack inserts that failed (the map refused the entry).
    CtInsertFailed = 5,
}

impl Stat {
    pub const COUNT: u32 = 6;
    pub const ALL: [Stat; Self::COUNT as usize] = [
        Stat::ServicePackets,
        Stat::NewFlows,
        Stat::Rebalanced,
        Stat::NoBackend,
        Stat::ReplyPackets,
        Stat::CtInsertFailed,
    ];

    pub const fn help(self) -> &'static str {
        match self {
            Stat::ServicePackets => "Packets DNATed to a backend",
            Stat::NewFlows => "Flows given a backend (conntrack misses)",
            Stat::Rebalanced => "Flows moved to a live backend because theirs had gone",
            Stat::NoBackend => "Packets to a frontend without usable backend, dropped",
            Stat::ReplyPackets => "Replies translated back to the frontend",
            Stat::CtInsertFailed => "Conntrack entries the map refused",
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Stat::ServicePackets => "service_packets",
            Stat::NewFlows => "new_flows",
            Stat::Rebalanced => "rebalanced_flows",
            Stat::NoBackend => "no_backend_drops",
            Stat::ReplyPackets => "reply_packets",
            Stat::CtInsertFailed => "conntrack_insert_failures",
        }
    }
}

#[cfg(feature = "user")]
mod pod_impls {
    use super::*;

    // SAFETY: all of these are #[repr(C)] with explicit padding, so every bit pattern is valid
    // and no byte is uninitialised.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceInfo {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtEntry {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 8);
        assert_eq!(size_of::<ServiceInfo>(), 12);
        assert_eq!(size_of::<SlotKey>(), 8);
        assert_eq!(size_of::<Backend>(), 12);
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(size_of::<CtEntry>(), 24);
    }
}
