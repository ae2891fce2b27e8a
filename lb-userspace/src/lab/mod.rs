//! A node with pods, built from network namespaces and veth pairs, for the demo and the tests.
//!
//! ```text
//!   pod netns: eth0 10.x.y.z/32 ── veth ── node netns: <prefix>-<n>  (169.254.1.1/32, route 10.x.y.z/32)
//! ```
//! Pods route everything to 169.254.1.1, which every host-side veth owns (as Calico does with
//! proxy ARP). The node namespace forwards between pods; it is never the machine's own namespace.
pub mod servers;

use std::{
    fs::File,
    net::Ipv4Addr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::atomic::{AtomicUsize, Ordering},
};

use anyhow::{Context as _, bail};
use nix::sched::{CloneFlags, setns};

/// A pin directory of its own under /sys/fs/bpf, named after its owner, the process and a
/// counter so that concurrent runs never share one; removed, with what is pinned in it, on drop.
pub struct PinDir(PathBuf);

impl PinDir {
    pub fn new(owner: &str, tag: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        Self(PathBuf::from(format!(
            "/sys/fs/bpf/{owner}-{}-{tag}-{n}",
            std::process::id()
        )))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The pods' default gateway, owned by every host-side veth.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// A named network namespace (`ip netns add`); deleted on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    pub fn create(name: &str) -> anyhow::Result<Self> {
        // A namespace left by a run that was killed: start clean.
        let _ = Command::new("ip").args(["netns", "delete", name]).output();
        ip(&["netns", "add", name])?;
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> …`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }

    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let text = value.to_owned();
        self.run(move || std::fs::write(&path, text))?
            .with_context(|| format!("sysctl {key}={value} in {}", self.name))
    }

    /// Runs `f` on a thread inside this namespace. Sockets it creates stay in the namespace
    /// wherever they are used afterwards.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
        let file = File::open(self.path()).with_context(|| format!("netns {} is gone", self.name))?;
        std::thread::spawn(move || setns(&file, CloneFlags::CLONE_NEWNET).map(|()| f()))
            .join()
            .map_err(|_| anyhow::anyhow!("thread in netns {} panicked", self.name))?
            .with_context(|| format!("cannot enter netns {}", self.name))
    }

    /// Starts `command` inside this namespace (network only: mounts stay the caller's, so the
    /// child sees the same bpffs).
    pub fn spawn(&self, command: &mut Command) -> anyhow::Result<Child> {
        let file = File::open(self.path()).with_context(|| format!("netns {} is gone", self.name))?;
        // SAFETY: the closure only calls setns(2), which is async-signal-safe.
        unsafe {
            command.pre_exec(move || setns(&file, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from));
        }
        command
            .spawn()
            .with_context(|| format!("cannot start {command:?}"))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", &self.name]).output();
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (iproute2): is it installed?")?;
    if !output.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// A pod: its namespace, address and the host-side interface the datapath attaches to.
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    pub host_interface: String,
    pub ns: NetNs,
}

/// A node namespace and its pods. Everything is named `<prefix>-…`, so one lab never touches
/// another's interfaces.
pub struct Lab {
    pub prefix: String,
    pub pods: Vec<Pod>,
    /// Dropped last: deleting it removes every host-side veth (and so each pair).
    pub node: NetNs,
}

impl Lab {
    /// `prefix` must be short: interface names are `<prefix>-<n>` and Linux allows 15 bytes.
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        if prefix.len() > 10 {
            bail!("lab prefix {prefix:?} is longer than 10 bytes");
        }
        let node = NetNs::create(&format!("{prefix}-node"))?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        node.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        node.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        Ok(Self {
            prefix: prefix.to_owned(),
            pods: Vec::new(),
            node,
        })
    }

    /// The glob matching every pod interface of this lab, for `switchboard run --interfaces`.
    pub fn interface_pattern(&self) -> String {
        format!("{}-p*", self.prefix)
    }

    /// Adds a pod with address `ip`, wired to the node.
    pub fn add_pod(&mut self, name: &str, ip: Ipv4Addr) -> anyhow::Result<&Pod> {
        let host_interface = format!("{}-p{}", self.prefix, self.pods.len());
        let ns = NetNs::create(&format!("{}-{name}", self.prefix))?;
        let address = format!("{ip}/32");
        let gateway = format!("{GATEWAY}/32");
        let gateway_ip = GATEWAY.to_string();
        self.node.ip(&[
            "link",
            "add",
            &host_interface,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        self.node.ip(&["addr", "add", &gateway, "dev", &host_interface])?;
        self.node.ip(&["link", "set", &host_interface, "up"])?;
        self.node
            .ip(&["route", "add", &address, "dev", &host_interface])?;
        ns.ip(&["addr", "add", &address, "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", &gateway_ip, "dev", "eth0", "scope", "link"])?;
        ns.ip(&["route", "add", "default", "via", &gateway_ip, "dev", "eth0"])?;
        self.pods.push(Pod {
            name: name.to_owned(),
            ip,
            host_interface,
            ns,
        });
        Ok(self.pods.last().expect("just pushed"))
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} in the lab"))
    }
}

/// The YAML of a ready Pod with `labels`, as `kubectl get pod -o yaml` would show it.
pub fn pod_manifest(name: &str, ip: Ipv4Addr, labels: &[(&str, &str)], container_port: u16) -> String {
    let labels: String = labels.iter().map(|(k, v)| format!("    {k}: {v}\n")).collect();
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: default
  labels:
{labels}spec:
  containers:
  - name: server
    image: switchboard/lab-server
    ports:
    - name: http
      containerPort: {container_port}
status:
  phase: Running
  podIP: {ip}
  conditions:
  - type: Ready
    status: \"True\"
"
    )
}

/// The YAML of a ClusterIP Service selecting `selector`, with one port per `(name, protocol)`.
pub fn service_manifest(
    name: &str,
    cluster_ip: Ipv4Addr,
    selector: &[(&str, &str)],
    ports: &[(&str, &str, u16, u16)],
) -> String {
    let selector: String = selector.iter().map(|(k, v)| format!("    {k}: {v}\n")).collect();
    let ports: String = ports
        .iter()
        .map(|(port_name, protocol, port, target)| {
            format!("  - name: {port_name}\n    protocol: {protocol}\n    port: {port}\n    targetPort: {target}\n")
        })
        .collect();
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: default
spec:
  type: ClusterIP
  clusterIP: {cluster_ip}
  selector:
{selector}  ports:
{ports}"
    )
}

/// An endpoint of [`endpoint_slice_manifest`]: its pod, address and conditions.
#[derive(Clone, Copy, Debug)]
pub struct SliceEndpoint<'a> {
    pub pod: &'a str,
    pub ip: Ipv4Addr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl<'a> SliceEndpoint<'a> {
    pub fn ready(pod: &'a str, ip: Ipv4Addr) -> Self {
        Self {
            pod,
            ip,
            ready: true,
            serving: true,
            terminating: false,
        }
    }

    /// A pod being deleted that still passes its readiness probe.
    pub fn terminating(pod: &'a str, ip: Ipv4Addr) -> Self {
        Self {
            ready: false,
            terminating: true,
            ..Self::ready(pod, ip)
        }
    }
}

/// The YAML of an IPv4 EndpointSlice of Service `service`, as the EndpointSlice controller
/// writes it, with one port per `(name, protocol, port)`.
pub fn endpoint_slice_manifest(
    service: &str,
    ports: &[(&str, &str, u16)],
    endpoints: &[SliceEndpoint<'_>],
) -> String {
    let ports: String = ports
        .iter()
        .map(|(name, protocol, port)| format!("- name: {name}\n  protocol: {protocol}\n  port: {port}\n"))
        .collect();
    let endpoints: String = endpoints
        .iter()
        .map(|e| {
            format!(
                "- addresses: [\"{}\"]\n  conditions: {{ready: {}, serving: {}, terminating: {}}}\n  targetRef: {{kind: Pod, namespace: default, name: {}}}\n",
                e.ip, e.ready, e.serving, e.terminating, e.pod
            )
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {service}-lab
  namespace: default
  labels:
    kubernetes.io/service-name: {service}
addressType: IPv4
ports:
{ports}endpoints:
{endpoints}"
    )
}
