//! Conntrack garbage collection: the datapath only ever adds and refreshes entries, and its LRU
//! map forgets the oldest only when full. The agent deletes the flows that are over: TCP flows
//! closed by a FIN or RST shortly after their last packet, other flows after a long idle time.
//! Both directions of a flow go together. Each family's maps are collected alike.
use std::{collections::HashMap, time::Duration};

use aya::{
    Pod,
    maps::{HashMap as BpfHashMap, MapData},
};
use lb_common::{
    Address, AffinityEntry, AffinityKey, CtEntry, CtKey, IPPROTO_SCTP, IPPROTO_TCP, ServiceInfo,
    ct_direction, ct_flags, service_flags,
};

/// How long a flow may stay idle, by kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// An established TCP flow (kube-proxy sets netfilter's to 24 h).
    pub tcp: Duration,
    /// A TCP flow that has seen a FIN or RST (netfilter keeps a closed one 10 s).
    pub tcp_closing: Duration,
    /// A UDP flow (netfilter: 30 s unreplied, 120 s for a stream).
    pub udp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp: Duration::from_secs(24 * 3600),
            tcp_closing: Duration::from_secs(10),
            udp: Duration::from_secs(60),
        }
    }
}

/// Why a flow was collected; the label of `switchboard_conntrack_gc_collected_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    TcpClosed,
    TcpIdle,
    UdpIdle,
    SctpClosed,
    SctpIdle,
}

impl Reason {
    pub const ALL: [Reason; 5] = [
        Reason::TcpClosed,
        Reason::TcpIdle,
        Reason::UdpIdle,
        Reason::SctpClosed,
        Reason::SctpIdle,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::TcpClosed => "tcp_closed",
            Reason::TcpIdle => "tcp_idle",
            Reason::UdpIdle => "udp_idle",
            Reason::SctpClosed => "sctp_closed",
            Reason::SctpIdle => "sctp_idle",
        }
    }
}

/// Flows collected by one pass, by reason.
pub type Collected = HashMap<Reason, u64>;

/// Service id → how long a client's affinity lasts, for the frontends (of both families) that
/// have affinity.
pub type AffinityTimeouts = HashMap<u32, Duration>;

/// Whether a flow last seen at `last_seen_ns` has expired at `now_ns`, and why. An SCTP
/// association, a connection like TCP's whose heartbeats keep it seen, has TCP's timeouts.
pub fn expired(
    proto: u8,
    closing: bool,
    last_seen_ns: u64,
    now_ns: u64,
    timeouts: &Timeouts,
) -> Option<Reason> {
    let (reason, timeout) = match (proto, closing) {
        (IPPROTO_TCP, true) => (Reason::TcpClosed, timeouts.tcp_closing),
        (IPPROTO_TCP, false) => (Reason::TcpIdle, timeouts.tcp),
        (IPPROTO_SCTP, true) => (Reason::SctpClosed, timeouts.tcp_closing),
        (IPPROTO_SCTP, false) => (Reason::SctpIdle, timeouts.tcp),
        _ => (Reason::UdpIdle, timeouts.udp),
    };
    let idle = Duration::from_nanos(now_ns.saturating_sub(last_seen_ns));
    (idle > timeout).then_some(reason)
}

/// The clock `bpf_ktime_get_ns()` reads: CLOCK_MONOTONIC, in nanoseconds.
pub fn monotonic_now_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec we own; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// The forward entry's key of the flow `key` belongs to, and the reply entry's. A source NAT
/// entry stands alone: each is refreshed by the packets that use it, and goes on its own.
fn flow_keys<A: Address>(key: &CtKey<A>, entry: &CtEntry<A>) -> (CtKey<A>, CtKey<A>) {
    if matches!(key.direction, ct_direction::SNAT_OUT | ct_direction::SNAT_IN) {
        return (*key, *key);
    }
    if key.direction == ct_direction::FORWARD {
        // Forward: client → frontend, mapped to the backend, which replies to the client.
        let reply = CtKey {
            src_addr: entry.nat_addr,
            dst_addr: key.src_addr,
            src_port: entry.nat_port,
            dst_port: key.src_port,
            proto: key.proto,
            direction: ct_direction::REPLY,
            pad: [0; 2],
        };
        (*key, reply)
    } else {
        // Reply: backend → client, mapped to the frontend the client dialled.
        let forward = CtKey {
            src_addr: key.dst_addr,
            dst_addr: entry.nat_addr,
            src_port: key.dst_port,
            dst_port: entry.nat_port,
            proto: key.proto,
            direction: ct_direction::FORWARD,
            pad: [0; 2],
        };
        (forward, *key)
    }
}

/// One pass over the conntrack map at `now_ns`: deletes both entries of every flow idle past
/// its timeout (a flow is as recent as its most recent direction, and closing if either saw a
/// FIN or RST). A flow refreshed by the datapath while the pass ran is left alone.
pub fn collect<A: Address>(
    conntrack: &mut BpfHashMap<MapData, CtKey<A>, CtEntry<A>>,
    now_ns: u64,
    timeouts: &Timeouts,
) -> Collected
where
    CtKey<A>: Pod,
    CtEntry<A>: Pod,
{
    // Entries may vanish while iterating (LRU eviction, the datapath); those are skipped.
    let entries: HashMap<CtKey<A>, CtEntry<A>> = conntrack.iter().filter_map(Result::ok).collect();
    let mut flows: HashMap<CtKey<A>, [Option<CtKey<A>>; 2]> = HashMap::new();
    for (key, entry) in &entries {
        let (forward, _) = flow_keys(key, entry);
        let keys = flows.entry(forward).or_default();
        keys[usize::from(key.direction != ct_direction::FORWARD)] = Some(*key);
    }
    let mut collected = Collected::new();
    for (forward, keys) in flows {
        let present: Vec<(CtKey<A>, CtEntry<A>)> = keys.iter().flatten().map(|k| (*k, entries[k])).collect();
        let last_seen = present.iter().map(|(_, e)| e.last_seen_ns).max().unwrap_or(0);
        let closing = present.iter().any(|(_, e)| e.flags & ct_flags::CLOSING != 0);
        let Some(reason) = expired(forward.proto, closing, last_seen, now_ns, timeouts) else {
            continue;
        };
        let refreshed = present.iter().any(|(key, entry)| {
            conntrack
                .get(key, 0)
                .is_ok_and(|now| now.last_seen_ns != entry.last_seen_ns)
        });
        if refreshed {
            continue;
        }
        for (key, _) in &present {
            // Already gone (evicted, or removed by hand) is as good as deleted.
            let _ = conntrack.remove(key);
        }
        *collected.entry(reason).or_default() += 1;
    }
    collected
}

/// Whether a conntrack map holding `entries` of `capacity` counts as full: its LRU evicts the
/// oldest flows (established ones too) to make room, and it frees entries in batches, so a map
/// under that pressure hovers a little below its size rather than at it.
pub fn is_full(entries: usize, capacity: u32) -> bool {
    entries as u64 * 10 >= u64::from(capacity) * 9
}

/// Whether the map must have evicted since the last pass: it held `before` entries then, and
/// `new_flows` flows were tracked since (two entries each at least), more than it has room for.
/// This catches pressure that an occupancy sample misses, as the LRU frees in batches.
pub fn overflowed(before: usize, new_flows: u64, capacity: u32) -> bool {
    before as u64 + new_flows.saturating_mul(2) > u64::from(capacity)
}

/// The affinity timeout of each of `services` that has affinity.
pub fn affinity_timeouts<'a>(services: impl IntoIterator<Item = &'a ServiceInfo>) -> AffinityTimeouts {
    services
        .into_iter()
        .filter(|info| info.flags & service_flags::AFFINITY != 0)
        .map(|info| (info.id, Duration::from_secs(info.affinity_timeout_s.into())))
        .collect()
}

/// Deletes the session affinity entries that no longer steer anything: their frontend is gone
/// or has affinity switched off (it has no entry in `timeouts`), or the client has not connected
/// for the frontend's timeout. The datapath ignores such entries already; deleting them keeps
/// the LRU map for live clients. Returns how many were deleted.
pub fn collect_affinity<A: Address>(
    affinity: &mut BpfHashMap<MapData, AffinityKey<A>, AffinityEntry>,
    timeouts: &AffinityTimeouts,
    now_ns: u64,
) -> u64
where
    AffinityKey<A>: Pod,
{
    let entries: Vec<(AffinityKey<A>, AffinityEntry)> = affinity.iter().filter_map(Result::ok).collect();
    let mut collected = 0;
    for (key, entry) in entries {
        let idle = Duration::from_nanos(now_ns.saturating_sub(entry.last_used_ns));
        let steers = timeouts
            .get(&key.service_id)
            .is_some_and(|timeout| idle < *timeout);
        // A client that connected again meanwhile keeps its entry.
        let refreshed = affinity
            .get(&key, 0)
            .is_ok_and(|now| now.last_used_ns != entry.last_used_ns);
        if !steers && !refreshed && affinity.remove(&key).is_ok() {
            collected += 1;
        }
    }
    collected
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::IPPROTO_UDP;

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn each_kind_of_flow_expires_after_its_own_timeout() {
        let timeouts = Timeouts::default();
        let now = 100_000 * SECOND;
        let ago = |seconds: u64| now - seconds * SECOND;
        assert_eq!(expired(IPPROTO_TCP, true, ago(5), now, &timeouts), None);
        assert_eq!(
            expired(IPPROTO_TCP, true, ago(11), now, &timeouts),
            Some(Reason::TcpClosed)
        );
        assert_eq!(expired(IPPROTO_TCP, false, ago(3600), now, &timeouts), None);
        assert_eq!(
            expired(IPPROTO_TCP, false, ago(25 * 3600), now, &timeouts),
            Some(Reason::TcpIdle)
        );
        assert_eq!(expired(IPPROTO_UDP, false, ago(30), now, &timeouts), None);
        assert_eq!(
            expired(IPPROTO_UDP, false, ago(61), now, &timeouts),
            Some(Reason::UdpIdle)
        );
        assert_eq!(
            expired(IPPROTO_SCTP, true, ago(11), now, &timeouts),
            Some(Reason::SctpClosed)
        );
        assert_eq!(expired(IPPROTO_SCTP, false, ago(3600), now, &timeouts), None);
        assert_eq!(
            expired(IPPROTO_SCTP, false, ago(25 * 3600), now, &timeouts),
            Some(Reason::SctpIdle)
        );
        assert_eq!(
            expired(IPPROTO_UDP, false, now + SECOND, now, &timeouts),
            None,
            "a time after now (refreshed meanwhile) is not idle"
        );
    }

    #[test]
    fn a_map_at_nine_tenths_of_its_capacity_is_full() {
        assert!(!is_full(0, 16));
        assert!(!is_full(14, 16));
        assert!(is_full(15, 16));
        assert!(is_full(16, 16));
        assert!(!is_full(235_929, 262_144));
        assert!(is_full(235_930, 262_144));
    }

    #[test]
    fn more_new_flows_than_room_since_the_last_pass_means_evictions() {
        assert!(!overflowed(0, 8, 16), "8 flows fill 16 entries exactly");
        assert!(overflowed(0, 9, 16));
        assert!(overflowed(10, 4, 16));
        assert!(!overflowed(10, 3, 16));
    }

    #[test]
    fn forward_and_reply_entries_name_the_same_flow() {
        let forward = CtKey {
            src_addr: [10, 244, 0, 20],
            dst_addr: [10, 96, 0, 10],
            src_port: 40000,
            dst_port: 80,
            proto: IPPROTO_TCP,
            direction: ct_direction::FORWARD,
            pad: [0; 2],
        };
        let to_backend = CtEntry {
            nat_addr: [10, 244, 0, 11],
            nat_port: 3000,
            ..CtEntry::default()
        };
        let (_, reply) = flow_keys(&forward, &to_backend);
        assert_eq!(
            (reply.src_addr, reply.src_port, reply.dst_addr, reply.dst_port),
            ([10, 244, 0, 11], 3000, [10, 244, 0, 20], 40000)
        );
        let to_frontend = CtEntry {
            nat_addr: [10, 96, 0, 10],
            nat_port: 80,
            ..CtEntry::default()
        };
        assert_eq!(flow_keys(&reply, &to_frontend), (forward, reply));
    }

    #[test]
    fn an_ipv6_flow_pairs_its_entries_alike() {
        let ip = |text: &str| text.parse::<std::net::Ipv6Addr>().unwrap().octets();
        let forward = CtKey {
            src_addr: ip("fd00:244::20"),
            dst_addr: ip("fd00:96::10"),
            src_port: 40000,
            dst_port: 80,
            proto: IPPROTO_UDP,
            direction: ct_direction::FORWARD,
            pad: [0; 2],
        };
        let to_backend = CtEntry {
            nat_addr: ip("fd00:244::11"),
            nat_port: 3000,
            ..CtEntry::default()
        };
        let (_, reply) = flow_keys(&forward, &to_backend);
        assert_eq!(
            (reply.src_addr, reply.src_port, reply.dst_addr, reply.dst_port),
            (ip("fd00:244::11"), 3000, ip("fd00:244::20"), 40000)
        );
        let to_frontend = CtEntry {
            nat_addr: forward.dst_addr,
            nat_port: 80,
            ..CtEntry::default()
        };
        assert_eq!(flow_keys(&reply, &to_frontend), (forward, reply));
    }
}
