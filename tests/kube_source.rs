//! The agent against a Kubernetes API: the real `switchboard run --api-server …` binary, an
//! in-process API server speaking list/watch, and the kernel's pinned maps asserted after every
//! step: initial list, watch events, a cut watch, a 410 Gone forcing a re-list, an API server
//! that is down and comes back.
mod common;

use std::{
    net::{IpAddr, Ipv6Addr},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{PinDir, fake_api::FakeApi, require_root};
use lb_common::IPPROTO_TCP;
use lb_userspace::{datapath::maps::ServiceMaps, reconcile::FrontendKey};
use serde_json::{Value, json};

fn service(name: &str, cluster_ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "selector": {"app": name},
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 3000}]}
    })
}

/// The EndpointSlice the endpoints controller would write for `service` with these pod IPs, of
/// one family (it writes one slice per family).
fn slice(service: &str, ips: &[&str]) -> Value {
    let ipv6 = ips.first().is_some_and(|ip| ip.contains(':'));
    let (address_type, suffix) = if ipv6 { ("IPv6", "v6") } else { ("IPv4", "v4") };
    let endpoints: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": "node-a"}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-{suffix}"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": address_type,
        "ports": [{"name": "http", "protocol": "TCP", "port": 3000}],
        "endpoints": endpoints
    })
}

struct Agent {
    child: Child,
    pins: PinDir,
}

impl Agent {
    fn start(api: &FakeApi, tag: &str) -> Self {
        require_root();
        let pins = PinDir::new("sbtest", tag);
        let child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args([
                "run",
                "--api-server",
                &api.url(),
                "--interfaces",
                "sbt-none-*",
                "--metrics-address",
                "127.0.0.1:0",
            ])
            .arg("--pin-dir")
            .arg(pins.path())
            .env_remove("KUBECONFIG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Self { child, pins }
    }

    /// Backend count of ClusterIP:80/TCP, of either family, as the kernel holds it (`None`: no
    /// such frontend).
    fn backends(&self, cluster_ip: impl Into<IpAddr>) -> Option<u32> {
        let key = FrontendKey {
            addr: cluster_ip.into(),
            port: 80,
            proto: IPPROTO_TCP,
        };
        let maps = ServiceMaps::open(self.pins.path()).ok()?;
        maps.service(&key).map(|info| info.backends.count)
    }

    fn wait_for(&self, cluster_ip: impl Into<IpAddr> + Copy, expected: Option<u32>, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(40);
        while self.backends(cluster_ip) != expected {
            assert!(
                Instant::now() < deadline,
                "{what}: expected {expected:?} backends, the maps hold {:?}",
                self.backends(cluster_ip)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const WEB: [u8; 4] = [10, 96, 0, 10];
const API: [u8; 4] = [10, 96, 0, 20];

#[test]
fn list_then_watch_events_are_programmed() {
    let api = FakeApi::start();
    api.apply(service("web", "10.96.0.10"));
    api.apply(slice("web", &["10.244.0.10", "10.244.0.11", "10.244.0.12"]));
    let agent = Agent::start(&api, "kl");
    agent.wait_for(WEB, Some(3), "after the initial list");

    api.apply(slice("web", &["10.244.0.10", "10.244.0.11"]));
    agent.wait_for(WEB, Some(2), "after an EndpointSlice MODIFIED event");

    api.apply(service("api", "10.96.0.20"));
    agent.wait_for(API, Some(0), "a new Service without endpoints yet");
    api.apply(slice("api", &["10.244.0.20"]));
    agent.wait_for(API, Some(1), "its EndpointSlice");

    api.delete(&service("api", "10.96.0.20"));
    agent.wait_for(API, None, "after the Service was DELETED");
    assert_eq!(agent.backends(WEB), Some(2), "other services are untouched");

    // The CLI reads the same API and the same maps.
    let output = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args([
            "get",
            "services",
            "-o",
            "json",
            "--api-server",
            &api.url(),
            "--pin-dir",
        ])
        .arg(agent.pins.path())
        .env_remove("KUBECONFIG")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rows: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        rows,
        json!([{"service": "default/web", "kind": "ClusterIP", "frontend": "10.96.0.10:80/TCP",
                             "endpoints": 2, "algorithm": "default", "programmed": true,
                             "traffic": {"packets": 0, "bytes": 0, "new_flows": 0,
                                         "reply_packets": 0, "reply_bytes": 0}}])
    );
}

/// A dual-stack Service from the API, with one EndpointSlice per family: each family's frontend
/// has its slice's endpoints, and a change to one family's slice leaves the other as it is.
#[test]
fn a_dual_stack_service_is_programmed_in_both_families() {
    const WEB6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x10);
    let api = FakeApi::start();
    let mut web = service("web", "10.96.0.10");
    web["spec"]["clusterIPs"] = json!(["10.96.0.10", "fd00::10"]);
    web["spec"]["ipFamilies"] = json!(["IPv4", "IPv6"]);
    web["spec"]["ipFamilyPolicy"] = json!("RequireDualStack");
    api.apply(web);
    api.apply(slice("web", &["10.244.0.10", "10.244.0.11"]));
    api.apply(slice("web", &["fd00:244::10"]));
    let agent = Agent::start(&api, "kd");
    agent.wait_for(WEB6, Some(1), "the IPv6 frontend after the initial list");
    assert_eq!(
        agent.backends(WEB),
        Some(2),
        "the IPv4 frontend has the IPv4 slice's"
    );

    api.apply(slice("web", &["fd00:244::10", "fd00:244::11", "fd00:244::12"]));
    agent.wait_for(WEB6, Some(3), "after the IPv6 slice changed");
    assert_eq!(agent.backends(WEB), Some(2), "the IPv4 frontend is untouched");
}

/// Whether the agent has started a watch of `collection`.
fn watching(api: &FakeApi, collection: &str) -> bool {
    api.requests()
        .iter()
        .any(|r| r.contains(&format!("{collection}?")) && r.contains("watch=true"))
}

#[test]
fn nothing_is_programmed_before_every_kind_is_listed() {
    let api = FakeApi::start();
    api.apply(service("web", "10.96.0.10"));
    api.apply(slice("web", &["10.244.0.10"]));
    api.hold_lists("/apis/discovery.k8s.io/v1/endpointslices");
    let agent = Agent::start(&api, "kh");
    // Services are listed, EndpointSlices are not: programming web now would give it no
    // endpoints and reject its traffic, so nothing may be programmed yet. The Services watch
    // starts once their list is in the agent's hands; the slices' list is held meanwhile.
    let requested = |what: &str| api.requests().iter().any(|r| r.contains(what));
    let deadline = Instant::now() + Duration::from_secs(40);
    while !(watching(&api, "/api/v1/services") && requested("/apis/discovery.k8s.io/v1/endpointslices?")) {
        assert!(
            Instant::now() < deadline,
            "the agent did not list Services and ask for EndpointSlices: {:?}",
            api.requests()
        );
        assert_eq!(
            agent.backends(WEB),
            None,
            "programmed before the EndpointSlices were listed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // And for a while after the Services list was handed over.
    for _ in 0..20 {
        assert_eq!(
            agent.backends(WEB),
            None,
            "programmed before the EndpointSlices were listed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    api.release();
    agent.wait_for(WEB, Some(1), "once every kind is listed");
}

#[test]
fn a_cut_watch_and_a_410_gone_are_survived() {
    let api = FakeApi::start();
    api.apply(service("web", "10.96.0.10"));
    api.apply(slice("web", &["10.244.0.10", "10.244.0.11", "10.244.0.12"]));
    let agent = Agent::start(&api, "kw");
    agent.wait_for(WEB, Some(3), "after the initial list");

    api.cut_watches();
    api.apply(slice("web", &["10.244.0.10"]));
    agent.wait_for(WEB, Some(1), "an event after the watch was cut");

    let lists_before = api
        .requests()
        .iter()
        .filter(|r| !r.contains("watch=true"))
        .count();
    api.apply_and_expire(slice("web", &["10.244.0.10", "10.244.0.11"]));
    agent.wait_for(WEB, Some(2), "a change only a re-list can see, after 410 Gone");
    let lists_after = api
        .requests()
        .iter()
        .filter(|r| !r.contains("watch=true"))
        .count();
    assert!(lists_after > lists_before, "the 410 forced a re-list");
}

#[test]
fn an_api_server_that_is_down_leaves_the_maps_serving_and_is_caught_up_with() {
    let api = FakeApi::start();
    api.apply(service("web", "10.96.0.10"));
    api.apply(slice("web", &["10.244.0.10", "10.244.0.11", "10.244.0.12"]));
    let mut agent = Agent::start(&api, "kd");
    agent.wait_for(WEB, Some(3), "after the initial list");

    let requests_before = api.requests().len();
    api.set_down(true);
    // Until the agent has met the outage twice (its watches were cut, and a retry failed).
    let deadline = Instant::now() + Duration::from_secs(40);
    while api.requests().len() < requests_before + 2 {
        assert!(Instant::now() < deadline, "the agent never tried the API again");
        assert_eq!(
            agent.backends(WEB),
            Some(3),
            "the last programmed state keeps serving while the API is down"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent survives the outage"
    );
    // What changed while the agent could not see it arrives with the re-list.
    api.apply(slice("web", &["10.244.0.10", "10.244.0.11"]));
    api.apply(service("api", "10.96.0.20"));
    api.set_down(false);
    agent.wait_for(WEB, Some(2), "after the API came back");
    agent.wait_for(API, Some(0), "a Service created during the outage");
}

/// Events the agent published about Service `name`.
fn events_about(api: &FakeApi, name: &str) -> Vec<(String, Value)> {
    api.events()
        .into_iter()
        .filter(|(_, event)| event["regarding"]["name"] == name)
        .collect()
}

fn wait_for_event(api: &FakeApi, name: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some((_, event)) = events_about(api, name).into_iter().next() {
            return event;
        }
        assert!(
            Instant::now() < deadline,
            "no Event about {name}: {:?}",
            api.events()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A warning the model has about a Service (here an unknown `switchboard.io/lb-algorithm`)
/// becomes a Warning Event on that Service, published once while the warning stands, however
/// many passes the agent makes.
#[test]
fn a_service_warning_becomes_one_kubernetes_event_on_the_service() {
    let api = FakeApi::start();
    let mut web = service("web", "10.96.0.10");
    web["metadata"]["uid"] = json!("0b6d7f6c-web");
    web["metadata"]["annotations"] = json!({"switchboard.io/lb-algorithm": "round-robin"});
    api.apply(web);
    api.apply(slice("web", &["10.244.0.10", "10.244.0.11", "10.244.0.12"]));
    let agent = Agent::start(&api, "kev");
    agent.wait_for(
        WEB,
        Some(3),
        "the Service is programmed (with the default algorithm)",
    );

    let event = wait_for_event(&api, "web");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["regarding"]["kind"], "Service");
    assert_eq!(event["regarding"]["namespace"], "default");
    assert_eq!(event["regarding"]["uid"], "0b6d7f6c-web");
    assert_eq!(event["reportingController"], "switchboard");
    assert_eq!(event["metadata"]["namespace"], "default");
    let note = event["note"].as_str().unwrap();
    assert!(
        note.contains("switchboard.io/lb-algorithm") && note.contains("round-robin"),
        "the note says what is wrong: {note}"
    );

    // More passes while the warning stands publish nothing more. Events go out in order, so
    // once another Service's Event has arrived, any repeat about `web` would have too.
    api.apply(slice("web", &["10.244.0.10", "10.244.0.11"]));
    agent.wait_for(WEB, Some(2), "another pass");
    let mut other = service("api", "10.96.0.20");
    other["metadata"]["annotations"] = json!({"switchboard.io/lb-algorithm": "fastest"});
    api.apply(other);
    wait_for_event(&api, "api");
    assert_eq!(
        events_about(&api, "web").len(),
        1,
        "one Event per warning: {:?}",
        api.events()
    );
}
