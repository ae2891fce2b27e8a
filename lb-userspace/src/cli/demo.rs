//! `switchboard demo`: the classic scenario on network-namespace pods. Three dual-stack `app=web`
//! pods answer `{"pod":"<name>"}` on port 3000, the dual-stack Service `web` maps 10.96.0.10:80,
//! [fd00:10:96::10]:80 (and NodePort 30007) to them, a client pod asks each ClusterIP six
//! times and the node itself asks `localhost:30007`. Everything is removed afterwards, also on
//! Ctrl-C.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::{Child, Command, ExitCode},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::sys::signal::{SigHandler, Signal, signal};

use crate::lab::{self, Lab, servers};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// How many requests the client sends.
    #[arg(long, default_value_t = 6)]
    pub requests: usize,
    /// Keep the lab running after the requests, until Ctrl-C, to look around
    /// (e.g. `switchboard status --pin-dir /sys/fs/bpf/switchboard-demo`).
    #[arg(long)]
    pub hold: bool,
}

const PREFIX: &str = "sbdemo";
const PIN_DIR: &str = "/sys/fs/bpf/switchboard-demo";
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SERVICE_PORT: u16 = 80;
const NODE_PORT: u16 = 30007;
const TARGET_PORT: u16 = 3000;
const WEB_PODS: [(&str, Ipv4Addr); 3] = [
    ("web-7d4b9-0", Ipv4Addr::new(10, 244, 0, 10)),
    ("web-7d4b9-1", Ipv4Addr::new(10, 244, 0, 11)),
    ("web-7d4b9-2", Ipv4Addr::new(10, 244, 0, 12)),
];
const CLIENT: (&str, Ipv4Addr) = ("client", Ipv4Addr::new(10, 244, 0, 20));

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo creates network namespaces and loads eBPF programs: run it as root");
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        signal(Signal::SIGINT, SigHandler::Handler(on_signal))?;
        signal(Signal::SIGTERM, SigHandler::Handler(on_signal))?;
    }
    let manifests = tempfile::tempdir()?;
    let result = demo(&args, manifests.path());
    // The lab and the agent are gone by now (dropped inside `demo`); the pins are ours too.
    let _ = std::fs::remove_dir_all(PIN_DIR);
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(error) if INTERRUPTED.load(Ordering::SeqCst) => {
            println!("\ninterrupted ({error}); cleaned up");
            Ok(ExitCode::from(130))
        }
        Err(error) => Err(error),
    }
}

/// The agent child process; stopped (SIGTERM, then SIGKILL) when dropped.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn demo(args: &Args, manifest_dir: &std::path::Path) -> anyhow::Result<()> {
    println!("Building a node with 3 web pods and a client pod in network namespaces ({PREFIX}-*)…");
    let mut lab = Lab::new(PREFIX)?;
    let mut pod_yaml = Vec::new();
    for (name, ip) in WEB_PODS {
        lab.add_pod(name, ip)?;
        pod_yaml.push(lab::pod_manifest(name, ip, &[("app", "web")], TARGET_PORT));
    }
    lab.add_pod(CLIENT.0, CLIENT.1)?;
    pod_yaml.push(lab::pod_manifest(
        CLIENT.0,
        CLIENT.1,
        &[("app", "client")],
        TARGET_PORT,
    ));
    let servers = WEB_PODS
        .iter()
        .map(|(name, _)| servers::http_server(&lab.pod(name).ns, name, TARGET_PORT))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cluster_ip6 = lab::ipv6_of(CLUSTER_IP);
    let service = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: NodePort
  clusterIP: {CLUSTER_IP}
  clusterIPs: [\"{CLUSTER_IP}\", \"{cluster_ip6}\"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  selector: {{app: web}}
  ports:
  - {{name: http, protocol: TCP, port: {SERVICE_PORT}, targetPort: {TARGET_PORT}, nodePort: {NODE_PORT}}}
"
    );
    std::fs::write(manifest_dir.join("service.yaml"), &service)?;
    std::fs::write(manifest_dir.join("pods.yaml"), pod_yaml.join("---\n"))?;
    println!(
        "Service web (NodePort, dual-stack): {CLUSTER_IP}:{SERVICE_PORT}, [{cluster_ip6}]:{SERVICE_PORT} and <node>:{NODE_PORT} → app=web pods, targetPort {TARGET_PORT}\n"
    );

    println!("Starting the agent in the node namespace:");
    let exe = std::env::current_exe().context("cannot find the switchboard binary")?;
    let mut command = Command::new(exe);
    command.args([
        "run",
        "--interfaces",
        &lab.interface_pattern(),
        "--pin-dir",
        PIN_DIR,
        "--manifests",
    ]);
    command.arg(manifest_dir);
    let _agent = Agent(lab.node.spawn(&mut command)?);

    let client = &lab.pod(CLIENT.0).ns;
    wait_until_serving(client)?;
    println!();
    for cluster_ip in [IpAddr::from(CLUSTER_IP), cluster_ip6.into()] {
        let target = SocketAddr::new(cluster_ip, SERVICE_PORT);
        let answered_by = ask(client, "client", &target.to_string(), target, args.requests)?;
        println!(
            "\n{} requests to the ClusterIP {cluster_ip} were answered by {} different pods: {}.\n",
            args.requests,
            answered_by.len(),
            answered_by.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    // The node's own processes reach the NodePort on localhost through the socket hooks.
    let localhost = SocketAddr::from((Ipv4Addr::LOCALHOST, NODE_PORT));
    let shown = format!("localhost:{NODE_PORT}");
    let answered_by = ask(&lab.node, "node  ", &shown, localhost, args.requests)?;
    println!(
        "\n{} requests from the node to {shown} were answered by {} different pods.",
        args.requests,
        answered_by.len(),
    );
    let answered: usize = servers.iter().map(servers::Server::answered).sum();
    println!("The pods' own counters agree: {answered} requests served (one extra per readiness probe).");
    if args.hold {
        println!("\nHolding the lab; press Ctrl-C to clean up.");
        while interrupted().is_ok() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    println!("\nCleaning up: stopping the agent, deleting the namespaces and the pinned maps.");
    Ok(())
}

/// `requests` GETs from `ns` (`who`) to `target` (`shown` as), each printed with its answer; the
/// pods that answered.
fn ask(
    ns: &lab::NetNs,
    who: &str,
    shown: &str,
    target: SocketAddr,
    requests: usize,
) -> anyhow::Result<BTreeSet<String>> {
    let mut answered_by = BTreeSet::new();
    for i in 1..=requests {
        interrupted()?;
        let reply = servers::http_get(ns, target.ip(), target.port(), Duration::from_secs(2))
            .with_context(|| format!("request {i} to {shown} from the {}", who.trim()))?;
        println!(
            "  {who} → http://{shown}/  ←  {{\"pod\":\"{}\"}}   (reply from {})",
            reply.pod, reply.from
        );
        answered_by.insert(reply.pod);
    }
    Ok(answered_by)
}

/// Waits until the agent has programmed the service (a request succeeds), for at most 20 s.
fn wait_until_serving(client: &lab::NetNs) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        interrupted()?;
        match servers::http_get(client, CLUSTER_IP, SERVICE_PORT, Duration::from_millis(300)) {
            Ok(_) => return Ok(()),
            Err(error) if Instant::now() > deadline => {
                return Err(error.context("the service did not start answering within 20 s"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
