//! Switchboard's side of the control-plane section: the real agent (`switchboard run`, the
//! binary users run, default settings) fed by the in-process Kubernetes API server of the tests
//! with N Services and their EndpointSlices as the API sends them (managedFields, the
//! last-applied annotation, owner references, paged lists). Everything it does between the API
//! and the kernel is in the numbers: watch, deserialize, trim, model, plan, map writes.
use std::{
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    os::fd::{AsFd as _, AsRawFd as _},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use lb_common::IPPROTO_TCP;
use lb_userspace::{datapath::maps::ServiceMaps, reconcile::FrontendKey};
use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    fake_api::FakeApi,
    kube_proxy_rules::ServicePort,
    scratch::{PIN_OWNER, PinDir},
    services::{self, ENDPOINTS_PER_SERVICE},
};

/// What one agent run measured.
#[derive(Clone, Debug, Serialize)]
pub struct AgentRun {
    /// Agent started → every Service programmed (maps in sync), as the bench's clock sees it.
    pub sync_seconds: f64,
    /// Agent started → programs attached and maps in sync.
    pub serving_seconds: f64,
    /// The same after a `kill -9` and a restart that finds the pinned maps.
    pub restart_sync_seconds: f64,
    pub restart_serving_seconds: f64,
    /// API object changed → the kernel's map shows it, for each endpoint change.
    pub change_seconds: Vec<f64>,
    /// The agent's resident memory once in sync, and its peak (VmHWM) by then.
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
    /// Every BPF map the agent created (pinned maps, Maglev tables…), as the kernel charges them.
    pub kernel_map_mib: f64,
    /// Services the first sync could not program (a map full): the other numbers then cover
    /// less than every Service.
    pub failed_services: u64,
}

pub struct Options<'a> {
    pub changes: usize,
    pub change_budget: Duration,
    pub timeout: Duration,
    /// `--lb-algorithm` for the agent; `None`: its default.
    pub lb_algorithm: Option<&'a str>,
}

/// Serves `ports` from a fake API server and measures an agent on them from cold, while its
/// endpoints change one at a time, and across a restart.
pub fn measure(ports: &[ServicePort], options: &Options<'_>) -> anyhow::Result<AgentRun> {
    let api = FakeApi::start();
    for (index, port) in ports.iter().enumerate() {
        api.apply(service(index, port));
        api.apply(slice(index, port, ENDPOINTS_PER_SERVICE));
    }
    let pins = PinDir::new(PIN_OWNER, "agent");
    let maps_before = newest_map_id();
    let mut agent = Agent::start(&api, &pins, ports.len(), options)?;
    let sync_seconds = agent.wait_for("every Service programmed", options.timeout)?;
    let serving_seconds = agent.wait_for("serving", options.timeout)?;
    let (rss_mib, peak_rss_mib) = agent.memory()?;
    let failed_services = agent.failed;
    let kernel_map_mib = kernel_map_bytes(maps_before)? as f64 / (1024.0 * 1024.0);
    let change_seconds = changes(&api, &pins, ports, options)?;
    agent.kill();

    let mut agent = Agent::start(&api, &pins, ports.len(), options)?;
    let restart_sync_seconds = agent.wait_for("every Service programmed", options.timeout)?;
    let restart_serving_seconds = agent.wait_for("serving", options.timeout)?;
    agent.kill();
    Ok(AgentRun {
        sync_seconds,
        serving_seconds,
        restart_sync_seconds,
        restart_serving_seconds,
        change_seconds,
        rss_mib,
        peak_rss_mib,
        kernel_map_mib,
        failed_services,
    })
}

/// Endpoint changes, a different Service each time: its slice loses its last endpoint, or gets
/// it back. Each is timed from the API server's event to the kernel's services map showing the
/// new backend count.
fn changes(
    api: &FakeApi,
    pins: &PinDir,
    ports: &[ServicePort],
    options: &Options<'_>,
) -> anyhow::Result<Vec<f64>> {
    let maps = ServiceMaps::open(pins.path())?;
    let mut seconds = Vec::new();
    let mut endpoints = vec![ENDPOINTS_PER_SERVICE; ports.len()];
    let started = Instant::now();
    for k in 0..options.changes {
        if k >= 3 && started.elapsed() > options.change_budget {
            break;
        }
        let index = (k * 7919) % ports.len();
        let key = FrontendKey {
            addr: ports[index].cluster_ip.into(),
            port: ports[index].port,
            proto: IPPROTO_TCP,
        };
        if maps.service(&key).is_none() {
            // Not programmed (a map was full): nothing to time.
            continue;
        }
        endpoints[index] = if endpoints[index] == ENDPOINTS_PER_SERVICE {
            ENDPOINTS_PER_SERVICE - 1
        } else {
            ENDPOINTS_PER_SERVICE
        };
        let changed = Instant::now();
        api.apply(slice(index, &ports[index], endpoints[index]));
        loop {
            if maps.service(&key).map(|s| s.backends.count as usize) == Some(endpoints[index]) {
                break;
            }
            ensure!(
                changed.elapsed() < options.timeout,
                "change {k} never reached the maps"
            );
            std::thread::sleep(Duration::from_micros(100));
        }
        seconds.push(changed.elapsed().as_secs_f64());
    }
    Ok(seconds)
}

/// `switchboard run` against the fake API, its JSON log read line by line.
struct Agent {
    child: Child,
    started: Instant,
    /// (when, message, fields) of each log line.
    lines: mpsc::Receiver<(Instant, String, Value)>,
    /// The most Services a sync said it could not program.
    failed: u64,
}

impl Agent {
    fn start(api: &FakeApi, pins: &PinDir, services: usize, options: &Options<'_>) -> anyhow::Result<Self> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_switchboard"));
        command
            .args(["--log-format", "json", "run", "--api-server", &api.url()])
            // No interface matches: the programs are loaded, verified and attached to none.
            .args(["--interfaces", "sbbench-none*", "--host-cgroup", "off"])
            .args(["--metrics-address", "127.0.0.1:0"])
            .arg("--pin-dir")
            .arg(pins.path())
            .env_remove("KUBECONFIG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // The default capacities (262,144 frontends, 1,048,576 backend entries a family) hold
        // every size the bench runs up to 100,000 Services x 10 endpoints; above, more frontends.
        if services + 1024 > lb_common::capacity::SERVICES as usize {
            command.args(["--services-capacity", &(services + 1024).to_string()]);
        }
        if let Some(algorithm) = options.lb_algorithm {
            command.args(["--lb-algorithm", algorithm]);
        }
        let started = Instant::now();
        let mut child = command.spawn().context("cannot start switchboard")?;
        let stderr = child.stderr.take().expect("piped");
        let (sender, lines) = mpsc::channel();
        // With SWITCHBOARD_BENCH_AGENT_LOG=FILE, each line is also written there with the
        // seconds since the start and the agent's resident memory then: where time and memory go.
        let mut trace = std::env::var_os("SWITCHBOARD_BENCH_AGENT_LOG").and_then(|path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .ok()
        });
        let pid = child.id();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(trace) = &mut trace {
                    use std::io::Write as _;
                    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                    let rss = status
                        .lines()
                        .find(|l| l.starts_with("VmRSS:"))
                        .unwrap_or_default();
                    let _ = writeln!(trace, "{:.3} {rss} {line}", started.elapsed().as_secs_f64());
                }
                let Ok(event) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                let fields = event["fields"].clone();
                let message = fields["message"].as_str().unwrap_or_default().to_owned();
                if sender.send((Instant::now(), message, fields)).is_err() {
                    return;
                }
            }
        });
        Ok(Self {
            child,
            started,
            lines,
            failed: 0,
        })
    }

    /// Seconds from the start to the log line `message`; an error if the agent exits first.
    fn wait_for(&mut self, message: &str, timeout: Duration) -> anyhow::Result<f64> {
        loop {
            let left = timeout.saturating_sub(self.started.elapsed());
            let (at, said, fields) = match self.lines.recv_timeout(left) {
                Ok(line) => line,
                Err(mpsc::RecvTimeoutError::Timeout) => bail!("no {message:?} within {timeout:?}"),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("the agent exited before {message:?}: {:?}", self.child.wait())
                }
            };
            if said == "maps in sync" {
                self.failed = self.failed.max(fields["failed"].as_u64().unwrap_or(0));
            }
            if said == message {
                return Ok((at - self.started).as_secs_f64());
            }
        }
    }

    /// (resident, peak resident) MiB.
    fn memory(&self) -> anyhow::Result<(f64, f64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kib = |field: &str| -> anyhow::Result<f64> {
            status
                .lines()
                .find_map(|line| line.strip_prefix(field))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .with_context(|| format!("no {field} in the agent's status"))
        };
        Ok((kib("VmRSS:")? / 1024.0, kib("VmHWM:")? / 1024.0))
    }

    /// `kill -9`: the pinned maps stay, as after a crash or an OOM kill.
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The highest id of a BPF map that exists now.
fn newest_map_id() -> u32 {
    aya::maps::loaded_maps()
        .filter_map(Result::ok)
        .map(|map| map.id())
        .max()
        .unwrap_or(0)
}

/// The memory the kernel charges for every map created after `since` (map ids only grow):
/// whatever the agent's layout, pinned maps and the inner maps of maps-of-maps alike. The bench
/// holds the root-test lock, so no other process creates maps meanwhile.
fn kernel_map_bytes(since: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    for map in aya::maps::loaded_maps().filter_map(Result::ok) {
        if map.id() <= since {
            continue;
        }
        let Ok(fd) = map.fd() else { continue };
        let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd()))?;
        total += fdinfo
            .lines()
            .find_map(|line| line.strip_prefix("memlock:"))
            .and_then(|value| value.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(total)
}

/// The Service as the API server sends it, with what `kubectl apply` and the API server add.
fn service(index: usize, port: &ServicePort) -> Value {
    let cluster_ip = port.cluster_ip.to_string();
    let spec = json!({
        "clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "ipFamilies": ["IPv4"],
        "ipFamilyPolicy": "SingleStack", "internalTrafficPolicy": "Cluster", "type": "ClusterIP",
        "sessionAffinity": "None", "selector": {"app": port.name},
        "ports": [{"name": port.port_name, "protocol": "TCP", "port": port.port, "targetPort": 8080}],
    });
    let applied = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": port.name, "namespace": port.namespace}, "spec": spec});
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {
            "name": port.name, "namespace": port.namespace,
            "uid": format!("00000000-0000-4000-8000-{index:012}"),
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": {"app": port.name},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": applied.to_string()},
            "managedFields": [{
                "manager": "kubectl-client-side-apply", "operation": "Update", "apiVersion": "v1",
                "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:metadata": {"f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}},
                    "f:labels": {".": {}, "f:app": {}}},
                    "f:spec": {"f:internalTrafficPolicy": {}, "f:ports": {".": {}, "k:{\"port\":80,\"protocol\":\"TCP\"}": {
                        ".": {}, "f:name": {}, "f:port": {}, "f:protocol": {}, "f:targetPort": {}}},
                        "f:selector": {}, "f:sessionAffinity": {}, "f:type": {}}},
            }],
        },
        "spec": spec,
        "status": {"loadBalancer": {}},
    })
}

/// The EndpointSlice the EndpointSlice controller writes for `port`'s Service with its first
/// `endpoints` endpoints, managedFields included.
fn slice(index: usize, port: &ServicePort, endpoints: usize) -> Value {
    let addresses: Vec<Ipv4Addr> = port.endpoints.iter().take(endpoints).map(|(ip, _)| *ip).collect();
    let listed: Vec<Value> = addresses
        .iter()
        .enumerate()
        .map(|(j, ip)| {
            json!({
                "addresses": [ip.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": format!("node-{}", j % 3),
                "zone": "zone-a",
                "targetRef": {"kind": "Pod", "namespace": port.namespace, "name": format!("{}-{j}", port.name),
                              "uid": format!("00000000-0000-4000-9000-{:012}", index * ENDPOINTS_PER_SERVICE + j)},
            })
        })
        .collect();
    let managed: serde_json::Map<String, Value> = addresses
        .iter()
        .map(|ip| {
            (
                format!("k:{{\"addresses\":[\"{ip}\"]}}"),
                json!({".": {}, "f:addresses": {}, "f:conditions": {".": {}, "f:ready": {}, "f:serving": {}, "f:terminating": {}},
                        "f:nodeName": {}, "f:targetRef": {}, "f:zone": {}}),
            )
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{}-abcde", port.name), "namespace": port.namespace,
            "generateName": format!("{}-", port.name),
            "uid": format!("00000000-0000-4000-a000-{index:012}"),
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": {"kubernetes.io/service-name": port.name,
                       "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-01-01T00:00:00Z"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": port.name,
                                 "uid": format!("00000000-0000-4000-8000-{index:012}"),
                                 "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [{
                "manager": "kube-controller-manager", "operation": "Update",
                "apiVersion": "discovery.k8s.io/v1", "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:addressType": {}, "f:endpoints": managed,
                             "f:metadata": {"f:labels": {".": {}, "f:kubernetes.io/service-name": {}}},
                             "f:ports": {}},
            }],
        },
        "addressType": "IPv4",
        "ports": [{"name": port.port_name, "protocol": "TCP", "port": 8080}],
        "endpoints": listed,
    })
}

/// The Services of the run: fillers as everywhere in the bench.
pub fn ports(count: usize) -> Vec<ServicePort> {
    (0..count).map(services::filler).collect()
}
