//! A failed request, explained: what conntrack held for its client's port, what the churn did
//! to its Service around it, how the services map had its frontend, which datapath counters
//! moved, how starved the machine was, and what the agent logged meanwhile.
use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use aya::{
    Pod,
    maps::{HashMap, MapData},
};
use lb_common::{Address, CtEntry, CtKey, ct_direction, ct_flags};
use lb_userspace::datapath::{conntrack_gc::monotonic_now_ns, maps::ServiceMaps};

use crate::{
    lab::Cluster,
    load::Shared,
    monitor::{self, COUNTERS, Monitor},
    timeline::show,
    topology::{self, Frontend, SERVICES},
};

/// How far before a failed request its context reaches, and how far after its end.
const BEFORE: Duration = Duration::from_secs(2);
const AFTER: Duration = Duration::from_millis(500);
/// Agent log lines printed per failure at most.
const LOG_LINES: usize = 40;

#[derive(Clone, Debug)]
pub struct Failure {
    pub frontend: Frontend,
    /// The client pod's address and the port its socket had (0 if it never got one).
    pub client: SocketAddr,
    pub started: Duration,
    pub elapsed: Duration,
    pub error: String,
    /// Conntrack entries of the client's address and port, in words, read just after the
    /// failure.
    pub flows: Vec<String>,
}

/// The conntrack entries whose client side is `client`, flows it sent and replies to it, in
/// words.
pub fn flows_of(pins: &Path, client: SocketAddr) -> Vec<String> {
    let Ok(maps) = ServiceMaps::open(pins) else {
        return Vec::new();
    };
    match client.ip() {
        IpAddr::V4(ip) => flows_in(&maps.conntrack, ip.octets(), client.port()),
        IpAddr::V6(ip) => flows_in(&maps.conntrack6, ip.octets(), client.port()),
    }
}

fn flows_in<A>(conntrack: &HashMap<MapData, CtKey<A>, CtEntry<A>>, addr: A, port: u16) -> Vec<String>
where
    A: Address + Into<IpAddr>,
    CtKey<A>: Pod,
    CtEntry<A>: Pod,
{
    let now = monotonic_now_ns();
    conntrack
        .iter()
        .filter_map(Result::ok)
        .filter(|(key, _)| {
            (key.src_addr == addr && key.src_port == port) || (key.dst_addr == addr && key.dst_port == port)
        })
        .map(|(key, entry)| {
            let idle = Duration::from_nanos(now.saturating_sub(entry.last_seen_ns));
            describe_flow(&key, &entry, idle)
        })
        .collect()
}

/// What a failure is explained with.
pub struct Context<'a> {
    pub cluster: &'a Cluster,
    pub shared: &'a Shared,
    pub monitor: &'a Monitor,
}

/// The report of one failure, line by line.
pub fn explain(failure: &Failure, context: &Context<'_>) -> Vec<String> {
    let from = failure.started.saturating_sub(BEFORE);
    let end = failure.started + failure.elapsed;
    let to = end + AFTER;
    let mut lines = vec![format!(
        "{} from {} at {}, after {:.1} ms: {}",
        failure.frontend,
        failure.client,
        show(failure.started),
        failure.elapsed.as_secs_f64() * 1e3,
        failure.error
    )];
    if failure.flows.is_empty() {
        lines.push("  conntrack, just after: nothing for this client port".to_owned());
    } else {
        lines.push("  conntrack, just after:".to_owned());
        lines.extend(failure.flows.iter().map(|flow| format!("    {flow}")));
    }
    let service = SERVICES[failure.frontend.service].0;
    lines.push(format!(
        "  the churn on {service} from {} to {}:",
        show(from),
        show(to)
    ));
    lines.extend(
        context
            .shared
            .events
            .between(from, to, service)
            .into_iter()
            .map(|(at, what)| format!("    {} {what}", show(at))),
    );
    lines.push(format!("  {} in the services map:", failure.frontend));
    let index = monitor::frontend_index(&failure.frontend);
    lines.extend(
        context
            .monitor
            .frontend_history(index, from, to)
            .into_iter()
            .map(|(at, info)| format!("    {} {}", show(at), monitor::describe(info))),
    );
    let moved = context.monitor.counters_moved(failure.started, end + AFTER);
    let moved: Vec<String> = COUNTERS
        .iter()
        .zip(moved)
        .map(|((_, name), by)| format!("{name} +{by}"))
        .collect();
    lines.push(format!(
        "  datapath counters from its start to {AFTER:?} after its end: {}",
        moved.join(", ")
    ));
    lines.push(format!("  machine: {}", context.monitor.starvation(from, to)));
    let clock = &context.shared.clock;
    let log = context
        .cluster
        .agent_log_between(&clock.log_time(from), &clock.log_time(to));
    lines.push(format!(
        "  the agent's log from {} to {} ({} lines{}):",
        show(from),
        show(to),
        log.len(),
        if log.len() > LOG_LINES {
            ", the last ones"
        } else {
            ""
        }
    ));
    lines.extend(
        log[log.len().saturating_sub(LOG_LINES)..]
            .iter()
            .map(|line| format!("    {line}")),
    );
    lines
}

/// One conntrack entry in words, with pods named; `idle`: how long before it was read it had
/// last seen a packet.
fn describe_flow<A: Address + Into<IpAddr>>(key: &CtKey<A>, entry: &CtEntry<A>, idle: Duration) -> String {
    let endpoint = |addr: A, port: u16| {
        let at = SocketAddr::new(addr.into(), port);
        match topology::pod_at(at.ip()) {
            Some(pod) => format!("{pod} {at}"),
            None => at.to_string(),
        }
    };
    let from = endpoint(key.src_addr, key.src_port);
    let to = endpoint(key.dst_addr, key.dst_port);
    let nat = endpoint(entry.nat_addr, entry.nat_port);
    let mapping = match key.direction {
        ct_direction::FORWARD => format!("forward {from} → {to} goes to {nat}"),
        ct_direction::REPLY => format!("reply {from} → {to} is sent as from {nat}"),
        other => format!("direction {other} {from} → {to} with {nat}"),
    };
    let closing = if entry.flags & ct_flags::CLOSING != 0 {
        ", closing"
    } else {
        ""
    };
    format!(
        "{mapping} (service id {}, backend id {}{closing}, last packet {:.0} ms before)",
        entry.service_id,
        entry.backend_id,
        idle.as_secs_f64() * 1e3
    )
}
