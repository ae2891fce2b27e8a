//! Topology-aware routing as kube-proxy does it (`pkg/proxy/topology.go`): the EndpointSlice
//! controller hints each endpoint to zones (`hints.forZones`) or nodes (`hints.forNodes`), and
//! a node uses only the endpoints hinted for it. Hints are trusted only when every ready
//! endpoint carries them (otherwise a change to or from hints is under way) and at least one is
//! for this node or zone; otherwise every endpoint is used.
use super::Endpoint;

type Hints = fn(&Endpoint) -> &[String];

/// The endpoints a node uses for traffic policy `Cluster`, by the ready endpoints' hints: those
/// hinted for `node_name` if every ready endpoint has node hints and one names this node, else
/// those hinted for `zone` under the same rule, else all of them.
pub(super) fn filter(
    candidates: Vec<Endpoint>,
    node_name: Option<&str>,
    zone: Option<&str>,
) -> Vec<Endpoint> {
    let ready: Vec<&Endpoint> = candidates.iter().filter(|e| !e.terminating).collect();
    let usable = |hints: Hints, target: Option<&str>| {
        target.is_some_and(|target| {
            ready.iter().all(|e| !hints(e).is_empty())
                && ready.iter().any(|e| hints(e).iter().any(|h| h == target))
        })
    };
    let node_hints: Hints = |e| &e.node_hints;
    let zone_hints: Hints = |e| &e.zone_hints;
    let (hints, target) = if usable(node_hints, node_name) {
        (node_hints, node_name)
    } else if usable(zone_hints, zone) {
        (zone_hints, zone)
    } else {
        return candidates;
    };
    let target = target.unwrap_or_default();
    // There is a ready endpoint for this node or zone, so terminating ones (only used while none
    // is ready) cannot be needed.
    candidates
        .into_iter()
        .filter(|e| !e.terminating && hints(e).iter().any(|h| h == target))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(last_octet: u8, zones: &[&str], nodes: &[&str]) -> Endpoint {
        Endpoint {
            address: [10, 0, 0, last_octet].into(),
            port: 8080,
            pod: format!("pod-{last_octet}"),
            node_name: None,
            zone: None,
            terminating: false,
            zone_hints: zones.iter().map(|z| (*z).to_owned()).collect(),
            node_hints: nodes.iter().map(|n| (*n).to_owned()).collect(),
        }
    }

    fn chosen(candidates: Vec<Endpoint>, node: Option<&str>, zone: Option<&str>) -> Vec<u8> {
        filter(candidates, node, zone)
            .iter()
            .map(|e| match e.address {
                std::net::IpAddr::V4(a) => a.octets()[3],
                std::net::IpAddr::V6(_) => unreachable!(),
            })
            .collect()
    }

    #[test]
    fn zone_hints_keep_this_zones_endpoints() {
        let endpoints = vec![
            endpoint(1, &["zone-a"], &[]),
            endpoint(2, &["zone-b"], &[]),
            endpoint(3, &["zone-a", "zone-c"], &[]),
        ];
        assert_eq!(chosen(endpoints.clone(), Some("n1"), Some("zone-a")), [1, 3]);
        assert_eq!(chosen(endpoints.clone(), Some("n1"), Some("zone-c")), [3]);
        assert_eq!(
            chosen(endpoints.clone(), Some("n1"), Some("zone-x")),
            [1, 2, 3],
            "no endpoint for this zone: hints ignored"
        );
        assert_eq!(
            chosen(endpoints, Some("n1"), None),
            [1, 2, 3],
            "this node's zone unknown: hints ignored"
        );
    }

    #[test]
    fn one_ready_endpoint_without_hints_disables_them() {
        let endpoints = vec![endpoint(1, &["zone-a"], &[]), endpoint(2, &[], &[])];
        assert_eq!(chosen(endpoints, None, Some("zone-a")), [1, 2]);
        // A terminating endpoint is not ready: its missing hints do not count, and it is left
        // out once the hints apply.
        let mut terminating = endpoint(3, &[], &[]);
        terminating.terminating = true;
        let endpoints = vec![
            endpoint(1, &["zone-a"], &[]),
            endpoint(2, &["zone-b"], &[]),
            terminating,
        ];
        assert_eq!(chosen(endpoints, None, Some("zone-a")), [1]);
    }

    #[test]
    fn node_hints_win_over_zone_hints_and_fall_back_to_them() {
        let endpoints = vec![
            endpoint(1, &["zone-a"], &["n1"]),
            endpoint(2, &["zone-a"], &["n2"]),
            endpoint(3, &["zone-b"], &["n3"]),
        ];
        assert_eq!(chosen(endpoints.clone(), Some("n2"), Some("zone-a")), [2]);
        assert_eq!(
            chosen(endpoints.clone(), Some("n9"), Some("zone-a")),
            [1, 2],
            "no endpoint for this node: the zone's"
        );
        assert_eq!(chosen(endpoints, None, Some("zone-b")), [3]);
    }
}
