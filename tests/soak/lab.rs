//! The soak's cluster running: a node namespace with the agent on a manifest directory, the
//! pods of [`crate::topology`] (their servers are started and stopped by the churn), and what
//! the agent programmed, read from its pinned maps.
use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use lb_userspace::{
    datapath::maps::ServiceMaps,
    lab::{self, Lab, PinDir, SliceEndpoint},
};

use crate::topology::{ALT, CLIENTS, DNS, Frontend, HTTP, POOL, SERVICES, pod};

/// The agent's own log: the reconciler's per-frontend lines and the conntrack collection's
/// passes too, which a failure is explained with.
const AGENT_LOG_FILTER: &str = "info,lb_userspace::reconcile=debug,lb_userspace::cli::run=debug";

/// Short conntrack timeouts and a 1 s collection, so occupancy settles soon after the load.
const AGENT_ARGS: [&str; 10] = [
    "--conntrack-gc-interval",
    "1s",
    "--conntrack-tcp-closing-timeout",
    "2s",
    "--conntrack-tcp-timeout",
    "5s",
    "--conntrack-udp-timeout",
    "2s",
    "--endpoints-from",
    "slices",
];

/// How long the agent may take to program a change: it takes milliseconds, but on a machine
/// shared with compilers it has been seen waiting seconds for a CPU.
const PROGRAMMED_WITHIN: Duration = Duration::from_secs(30);

/// A Service as the churn has it now.
#[derive(Clone, Copy, Debug)]
pub struct ServiceSpec {
    pub affinity: bool,
    pub maglev: bool,
    pub alt: bool,
}

/// Entries in the maps the datapath fills by itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct Occupancy {
    pub conntrack: usize,
    pub affinity: usize,
}

impl Occupancy {
    pub fn within(&self, baseline: &Occupancy) -> bool {
        self.conntrack <= baseline.conntrack && self.affinity <= baseline.affinity
    }
}

pub struct Cluster {
    agent: Child,
    agent_log: PathBuf,
    manifests: tempfile::TempDir,
    pins: PinDir,
    pub lab: Lab,
}

impl Cluster {
    pub fn start(agent: &Path) -> anyhow::Result<Self> {
        if !nix::unistd::geteuid().is_root() {
            bail!("the soak builds network namespaces and loads eBPF: run it as root");
        }
        let prefix = format!("sk{}", std::process::id() % 100_000);
        let mut lab = Lab::new(&prefix)?;
        for service in 0..SERVICES.len() {
            for index in 0..POOL {
                let (name, ip) = pod(service, index);
                lab.add_pod(&name, ip)?;
            }
        }
        for (name, ip) in CLIENTS {
            lab.add_pod(name, ip)?;
        }
        let manifests = tempfile::tempdir()?;
        let pins = PinDir::new("sbsoak", "churn");
        let agent_log = manifests.path().with_extension("agent.log");
        let mut command = Command::new(agent);
        command
            .args(["run", "--interfaces", &lab.interface_pattern(), "--manifests"])
            .arg(manifests.path())
            .arg("--pin-dir")
            .arg(pins.path())
            .args(AGENT_ARGS)
            .env("RUST_LOG", AGENT_LOG_FILTER)
            .stdout(Stdio::null())
            .stderr(File::create(&agent_log)?);
        let agent = lab
            .node
            .spawn(&mut command)
            .with_context(|| format!("cannot start {}", agent.display()))?;
        Ok(Self {
            agent,
            agent_log,
            manifests,
            pins,
            lab,
        })
    }

    /// Writes every Service and its EndpointSlices, one per family (the pods' IPv4 `endpoints`
    /// and their IPv6 twins), each file replaced at once (write, then rename) so the agent never
    /// reads half of one.
    pub fn write(&self, specs: &[ServiceSpec], endpoints: &[Vec<SliceEndpoint<'_>>]) -> anyhow::Result<()> {
        let services: Vec<String> = SERVICES
            .iter()
            .zip(specs)
            .map(|(&(name, ip, _), spec)| service_manifest(name, ip, spec))
            .collect();
        let ports = [
            ("http", "TCP", HTTP.1),
            ("dns", "UDP", DNS.1),
            ("alt", "TCP", HTTP.1),
        ];
        let mut slices = Vec::new();
        for (&(name, ..), endpoints) in SERVICES.iter().zip(endpoints) {
            slices.push(lab::endpoint_slice_manifest(name, &ports, endpoints));
            let ipv6: Vec<SliceEndpoint<'_>> = endpoints.iter().map(|&e| in_ipv6(e)).collect();
            // A slice without endpoints would be taken for an IPv4 one: none, as no endpoint.
            if !ipv6.is_empty() {
                slices.push(lab::endpoint_slice_manifest(name, &ports, &ipv6));
            }
        }
        self.replace("services.yaml", &services.join("---\n"))?;
        self.replace("slices.yaml", &slices.join("---\n"))
    }

    fn replace(&self, file: &str, text: &str) -> anyhow::Result<()> {
        let staging = self.manifests.path().join(format!(".{file}.tmp"));
        std::fs::write(&staging, text)?;
        std::fs::rename(staging, self.manifests.path().join(file))?;
        Ok(())
    }

    fn maps(&self) -> anyhow::Result<ServiceMaps> {
        ServiceMaps::open(self.pins.path())
    }

    pub fn pins(&self) -> &Path {
        self.pins.path()
    }

    pub fn agent_pid(&self) -> u32 {
        self.agent.id()
    }

    /// Waits until the kernel's maps satisfy `done`, [`PROGRAMMED_WITHIN`] at most.
    pub fn wait_for(&self, what: &str, done: impl Fn(&ServiceMaps) -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + PROGRAMMED_WITHIN;
        while !self.maps().is_ok_and(|maps| done(&maps)) {
            if Instant::now() > deadline {
                bail!("the agent did not program {what} within {PROGRAMMED_WITHIN:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Waits until the agent says it serves: its programs attached (the kernel verifies them
    /// while the maps are programmed, so maps in sync do not mean that yet).
    pub fn wait_until_serving(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + PROGRAMMED_WITHIN;
        let serving = || {
            std::fs::read_to_string(&self.agent_log)
                .unwrap_or_default()
                .lines()
                .any(|line| line.contains("lb_userspace::agent: serving"))
        };
        while !serving() {
            if Instant::now() > deadline {
                bail!("the agent did not serve within {PROGRAMMED_WITHIN:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Both families' entries.
    pub fn occupancy(&self) -> anyhow::Result<Occupancy> {
        let maps = self.maps()?;
        let conntrack = maps.conntrack.keys().filter_map(Result::ok).count();
        let conntrack6 = maps.conntrack6.keys().filter_map(Result::ok).count();
        let affinity = maps.affinity.keys().filter_map(Result::ok).count();
        let affinity6 = maps.affinity6.keys().filter_map(Result::ok).count();
        Ok(Occupancy {
            conntrack: conntrack + conntrack6,
            affinity: affinity + affinity6,
        })
    }

    pub fn print_agent_log_tail(&self, lines: usize) {
        let log = std::fs::read_to_string(&self.agent_log).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        println!("  the agent's last log lines ({}):", self.agent_log.display());
        for line in &all[all.len().saturating_sub(lines)..] {
            println!("    {line}");
        }
    }

    /// The agent's log lines stamped between `from` and `to` (as [`Clock::log_time`] writes
    /// them): each line starts with its UTC time, which orders as text.
    ///
    /// [`Clock::log_time`]: crate::timeline::Clock::log_time
    pub fn agent_log_between(&self, from: &str, to: &str) -> Vec<String> {
        let log = std::fs::read_to_string(&self.agent_log).unwrap_or_default();
        log.lines()
            .filter(|line| {
                let stamp = line.split_whitespace().next().unwrap_or_default();
                (from..=to).contains(&stamp)
            })
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.agent.kill();
        let _ = self.agent.wait();
        let _ = std::fs::remove_file(&self.agent_log);
    }
}

/// Whether `maps` has a backend at pod address `ip` or its IPv6 twin (in a slot or draining).
pub fn has_backend(maps: &ServiceMaps, ip: Ipv4Addr) -> bool {
    let ip6 = lab::ipv6_of(ip).octets();
    let backends = maps.backends.iter().filter_map(Result::ok);
    let backends6 = maps.backends6.iter().filter_map(Result::ok);
    backends
        .into_iter()
        .any(|(_, backend)| backend.addr == ip.octets())
        || backends6.into_iter().any(|(_, backend)| backend.addr == ip6)
}

/// How many backends `frontend` has in `maps`, if it is there.
pub fn backend_count(maps: &ServiceMaps, frontend: Frontend) -> Option<u32> {
    maps.service(&frontend.key()).map(|info| info.backends.count)
}

/// The IPv6 twin of a pod's IPv4 endpoint.
fn in_ipv6(endpoint: SliceEndpoint<'_>) -> SliceEndpoint<'_> {
    let IpAddr::V4(ip) = endpoint.ip else {
        return endpoint;
    };
    SliceEndpoint {
        ip: lab::ipv6_of(ip).into(),
        ..endpoint
    }
}

/// A dual-stack Service: `cluster_ip` and its IPv6 twin.
fn service_manifest(name: &str, cluster_ip: Ipv4Addr, spec: &ServiceSpec) -> String {
    let cluster_ip6 = lab::ipv6_of(cluster_ip);
    let algorithm = if spec.maglev { "maglev" } else { "random" };
    let affinity = if spec.affinity {
        // Short, so affinity occupancy returns to its baseline soon after the load.
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 3\n"
    } else {
        "  sessionAffinity: None\n"
    };
    let alt = if spec.alt {
        format!(
            "  - name: alt\n    protocol: TCP\n    port: {ALT}\n    targetPort: {}\n",
            HTTP.1
        )
    } else {
        String::new()
    };
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: default
  annotations:
    switchboard.io/lb-algorithm: {algorithm}
spec:
  type: ClusterIP
  clusterIP: {cluster_ip}
  clusterIPs: [\"{cluster_ip}\", \"{cluster_ip6}\"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
{affinity}  ports:
  - name: http
    protocol: TCP
    port: {}
    targetPort: {}
  - name: dns
    protocol: UDP
    port: {}
    targetPort: {}
{alt}",
        HTTP.0, HTTP.1, DNS.0, DNS.1
    )
}
