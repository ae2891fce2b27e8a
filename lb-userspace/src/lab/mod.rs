//! A node with pods, built from network namespaces and veth pairs, for the demo and the tests.
//!
//! ```text
//!   pod netns: eth0 10.x.y.z/32     ── veth ── node netns: <prefix>-<n>  169.254.1.1/32, route 10.x.y.z/32
//!                   fd00:x:y:z::/128                                      fe80::1/64,     route fd00:x:y:z::/128
//! ```
//! Pods route everything to 169.254.1.1 and fe80::1, which every host-side veth owns (as Calico
//! does with proxy ARP). Every pod is dual-stack: its IPv6 address spells its IPv4 one
//! ([`ipv6_of`]). The node namespace forwards between pods; it is never the machine's own
//! namespace.
pub mod servers;

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
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
/// The pods' IPv6 default gateway: link-local, owned by every host-side veth.
pub const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// The IPv6 address of the lab pod (or ClusterIP) whose IPv4 address is `ip`: `fd00:a:b:c::d`
/// for `a.b.c.d`, each group spelling its octet in decimal, so `10.244.0.10` is
/// `fd00:10:244:0::10` and a reader sees which is which.
pub fn ipv6_of(ip: Ipv4Addr) -> Ipv6Addr {
    let group =
        |octet: u8| u16::from_str_radix(&octet.to_string(), 16).expect("decimal digits are hex digits");
    let [a, b, c, d] = ip.octets();
    Ipv6Addr::new(0xfd00, group(a), group(b), group(c), 0, 0, 0, group(d))
}

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

    /// A veth pair: `name` in this namespace, its peer `peer_name` in `peer`.
    pub fn add_veth(&self, name: &str, peer: &NetNs, peer_name: &str) -> anyhow::Result<()> {
        self.ip(&[
            "link",
            "add",
            name,
            "type",
            "veth",
            "peer",
            "name",
            peer_name,
            "netns",
            peer.name(),
        ])
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

/// A pod: its namespace, addresses and the host-side interface the datapath attaches to.
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    /// [`ipv6_of`] `ip`.
    pub ip6: Ipv6Addr,
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
        node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
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

    /// Adds a pod with addresses `ip` and [`ipv6_of`] `ip`, wired to the node.
    pub fn add_pod(&mut self, name: &str, ip: Ipv4Addr) -> anyhow::Result<&Pod> {
        let host_interface = format!("{}-p{}", self.prefix, self.pods.len());
        let ns = NetNs::create(&format!("{}-{name}", self.prefix))?;
        let address = format!("{ip}/32");
        let gateway = format!("{GATEWAY}/32");
        let gateway_ip = GATEWAY.to_string();
        let ip6 = ipv6_of(ip);
        let address6 = format!("{ip6}/128");
        let gateway6 = format!("{GATEWAY6}/64");
        let gateway6_ip = GATEWAY6.to_string();
        self.node.add_veth(&host_interface, &ns, "eth0")?;
        self.node.ip(&["addr", "add", &gateway, "dev", &host_interface])?;
        self.node.ip(&["link", "set", &host_interface, "up"])?;
        self.node
            .ip(&["route", "add", &address, "dev", &host_interface])?;
        ns.ip(&["addr", "add", &address, "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", &gateway_ip, "dev", "eth0", "scope", "link"])?;
        ns.ip(&["route", "add", "default", "via", &gateway_ip, "dev", "eth0"])?;
        // IPv6: no duplicate address detection, so the addresses work at once.
        self.node
            .ip(&["addr", "add", &gateway6, "dev", &host_interface, "nodad"])?;
        self.node
            .ip(&["-6", "route", "add", &address6, "dev", &host_interface])?;
        ns.ip(&["addr", "add", &address6, "dev", "eth0", "nodad"])?;
        ns.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &gateway6_ip,
            "dev",
            "eth0",
        ])?;
        self.pods.push(Pod {
            name: name.to_owned(),
            ip,
            ip6,
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

/// The YAML of a ready dual-stack Pod with `labels`, as `kubectl get pod -o yaml` would show it:
/// `podIP` is `ip`, `podIPs` adds [`ipv6_of`] `ip`.
pub fn pod_manifest(name: &str, ip: Ipv4Addr, labels: &[(&str, &str)], container_port: u16) -> String {
    let ip6 = ipv6_of(ip);
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
  podIPs:
  - ip: {ip}
  - ip: \"{ip6}\"
  conditions:
  - type: Ready
    status: \"True\"
"
    )
}

/// The YAML of an IPv4 ClusterIP Service selecting `selector`, with one port per
/// `(name, protocol)`.
pub fn service_manifest(
    name: &str,
    cluster_ip: Ipv4Addr,
    selector: &[(&str, &str)],
    ports: &[(&str, &str, u16, u16)],
) -> String {
    multi_family_service_manifest(name, &[cluster_ip.into()], selector, ports)
}

/// Like [`service_manifest`], with the ClusterIPs `cluster_ips`, of either family, the first
/// being the primary (`ipFamilyPolicy: RequireDualStack` when there is one of each).
pub fn multi_family_service_manifest(
    name: &str,
    cluster_ips: &[IpAddr],
    selector: &[(&str, &str)],
    ports: &[(&str, &str, u16, u16)],
) -> String {
    let family = |ip: &IpAddr| if ip.is_ipv4() { "IPv4" } else { "IPv6" };
    let quoted = |ip: &IpAddr| format!("\"{ip}\"");
    let list = |items: Vec<String>| items.join(", ");
    let cluster_ip = quoted(&cluster_ips[0]);
    let ips = list(cluster_ips.iter().map(quoted).collect());
    let families = list(cluster_ips.iter().map(|ip| family(ip).to_owned()).collect());
    let policy = if cluster_ips.len() > 1 {
        "RequireDualStack"
    } else {
        "SingleStack"
    };
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
  clusterIPs: [{ips}]
  ipFamilies: [{families}]
  ipFamilyPolicy: {policy}
  selector:
{selector}  ports:
{ports}"
    )
}

/// An endpoint of [`endpoint_slice_manifest`]: its pod, address and conditions.
#[derive(Clone, Copy, Debug)]
pub struct SliceEndpoint<'a> {
    pub pod: &'a str,
    pub ip: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl<'a> SliceEndpoint<'a> {
    pub fn ready(pod: &'a str, ip: impl Into<IpAddr>) -> Self {
        Self {
            pod,
            ip: ip.into(),
            ready: true,
            serving: true,
            terminating: false,
        }
    }

    /// A pod being deleted that still passes its readiness probe.
    pub fn terminating(pod: &'a str, ip: impl Into<IpAddr>) -> Self {
        Self {
            ready: false,
            terminating: true,
            ..Self::ready(pod, ip)
        }
    }
}

/// The YAML of an EndpointSlice of Service `service`, as the EndpointSlice controller writes it,
/// with one port per `(name, protocol, port)`. A slice holds one family: that of its first
/// endpoint (IPv4 when it has none); IPv6 slices are named apart, so a dual-stack Service can
/// have one of each.
pub fn endpoint_slice_manifest(
    service: &str,
    ports: &[(&str, &str, u16)],
    endpoints: &[SliceEndpoint<'_>],
) -> String {
    let (address_type, name) = match endpoints.first() {
        Some(e) if e.ip.is_ipv6() => ("IPv6", format!("{service}-lab-v6")),
        _ => ("IPv4", format!("{service}-lab")),
    };
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
  name: {name}
  namespace: default
  labels:
    kubernetes.io/service-name: {service}
addressType: {address_type}
ports:
{ports}endpoints:
{endpoints}"
    )
}
