//! What the integration tests share: a datapath loaded with its own pin directory, and its
//! maps programmed through the real reconciler, with frontends and backends of either family.
#![allow(dead_code, reason = "each test binary uses a different part")]

/// Runs each test written over the family once per family, as `name::ipv4` and `name::ipv6`.
#[allow(unused_macros, reason = "not every test binary has tests per family")]
macro_rules! for_each_family {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            #[test]
            fn ipv4() {
                super::$test::<lb_common::Ipv4>();
            }

            #[test]
            fn ipv6() {
                super::$test::<lb_common::Ipv6>();
            }
        }
    )*};
}

// The agent binary's path is known to integration tests only, not to the examples (the fuzzer,
// the soak) that share this module.
#[cfg(test)]
pub mod agent;
pub mod fake_api;
pub mod packets;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions, TestRunResult, Xdp};
use lb_common::{Address, ServiceKey};
pub use lb_userspace::lab::PinDir;
use lb_userspace::{
    datapath::{Capacity, Datapath, maps::ServiceMaps},
    reconcile::{DesiredService, FrontendKey, MaglevSize, Reconciler},
};

/// The verdicts BPF_PROG_TEST_RUN returns, as the programs give them.
pub mod verdict {
    pub const TC_ACT_OK: u32 = 0;
    pub const TC_ACT_SHOT: u32 = 2;
    pub const TC_ACT_REDIRECT: u32 = 7;
    pub const XDP_DROP: u32 = 1;
    pub const XDP_PASS: u32 = 2;
}

/// A TCP connection from `client` to `target` is refused within 100 ms, as by a closed port: not
/// a timeout.
pub fn assert_tcp_refused_at_once(client: &lb_userspace::lab::NetNs, target: SocketAddr) {
    let started = std::time::Instant::now();
    let result = client
        .run(move || std::net::TcpStream::connect_timeout(&target, std::time::Duration::from_secs(2)))
        .unwrap();
    let elapsed = started.elapsed();
    let error = result.expect_err("nothing may accept this connection");
    assert_eq!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{target}: {error}"
    );
    assert!(
        elapsed < std::time::Duration::from_millis(100),
        "{target} refused within 100 ms, took {elapsed:?}"
    );
}

/// A datagram from a connected UDP socket in `client` to `target` is answered with an ICMP
/// (ICMPv6) port unreachable, which the socket reports as "connection refused".
pub fn assert_udp_refused(client: &lb_userspace::lab::NetNs, target: SocketAddr) {
    let timeout = std::time::Duration::from_secs(2);
    let flow = lb_userspace::lab::servers::UdpFlow::connect(client, target, timeout).unwrap();
    let error = flow.ask().expect_err("no pod answers");
    assert_eq!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{target}: {error}"
    );
}

/// Fails loudly instead of skipping: CI runs as root, and a skipped datapath test proves nothing.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests load eBPF programs and create network namespaces: run them as root (`cargo xtask test`)"
    );
}

/// ClusterIP frontends of one family (`[u8; 4]` or `[u8; 16]` addresses), each with its backends
/// (address, port).
pub type Frontends<'a, A> = [(ServiceKey<A>, &'a [(A, u16)])];

/// A loaded datapath with its maps and a reconciler to program them.
pub struct Loaded {
    pub datapath: Datapath,
    pub maps: ServiceMaps,
    pub reconciler: Reconciler,
    pub pins: PinDir,
}

impl Loaded {
    pub fn new(tag: &str) -> Self {
        Self::with_capacity(tag, Capacity::default())
    }

    /// A datapath whose maps hold `capacity` entries, for tests of full maps.
    pub fn with_capacity(tag: &str, capacity: Capacity) -> Self {
        require_root();
        let pins = PinDir::new("sbtest", tag);
        let datapath = Datapath::load_with_capacity(pins.path(), capacity).expect("the datapath loads");
        let maps = datapath.maps().expect("the pinned maps open");
        let reconciler = Reconciler::new(maps.read_programmed().unwrap());
        Self {
            datapath,
            maps,
            reconciler,
            pins,
        }
    }

    /// Programs exactly `services`, choosing backends at random, and asserts every write
    /// succeeded. Both families at once: [`Loaded::apply`].
    pub fn program<A: Address + Into<IpAddr>>(&mut self, services: &Frontends<'_, A>) {
        self.program_with(services, None);
    }

    /// Like [`Loaded::program`], with Maglev tables of `maglev` positions when given.
    pub fn program_with<A: Address + Into<IpAddr>>(
        &mut self,
        services: &Frontends<'_, A>,
        maglev: Option<u32>,
    ) {
        self.program_all(services, maglev, None);
    }

    /// Like [`Loaded::program_with`], with session affinity of `affinity_timeout` seconds.
    pub fn program_all<A: Address + Into<IpAddr>>(
        &mut self,
        services: &Frontends<'_, A>,
        maglev: Option<u32>,
        affinity_timeout: Option<u32>,
    ) {
        let desired: BTreeMap<ServiceKey<A>, DesiredService> = services
            .iter()
            .map(|(key, backends)| {
                let service = DesiredService {
                    name: format!("test/{}", FrontendKey::from(*key)),
                    cluster_ip: true,
                    backends: backends.iter().map(|&b| SocketAddr::from(b)).collect(),
                    draining: Vec::new(),
                    maglev: maglev.map(MaglevSize::Fixed),
                    affinity_timeout,
                    external: None,
                };
                (*key, service)
            })
            .collect();
        self.apply(&desired);
    }

    /// The TC program `name` of the loaded object.
    pub fn tc(&mut self, name: &str) -> &mut SchedClassifier {
        let program = self.datapath.ebpf.program_mut(name);
        program.unwrap().try_into().unwrap()
    }

    /// The XDP program `name` of the loaded object.
    pub fn xdp(&mut self, name: &str) -> &mut Xdp {
        let program = self.datapath.ebpf.program_mut(name);
        program.unwrap().try_into().unwrap()
    }

    /// Programs exactly `desired` (keyed by [`FrontendKey`], or by either family's
    /// `ServiceKey`) and asserts every write succeeded.
    pub fn apply<K: Into<FrontendKey> + Copy>(&mut self, desired: &BTreeMap<K, DesiredService>) {
        let desired: BTreeMap<FrontendKey, DesiredService> = desired
            .iter()
            .map(|(key, service)| ((*key).into(), service.clone()))
            .collect();
        let report = self.reconciler.apply(&desired, &mut self.maps);
        assert!(
            report.failed.is_empty(),
            "programming failed: {:?}",
            report.failed
        );
    }
}

/// Runs `program` once on `packet` by BPF_PROG_TEST_RUN: the verdict and the packet as the
/// program left it. `name` is for the panic message.
pub fn run_on<P>(program: &P, name: &str, packet: &[u8]) -> (u32, Vec<u8>)
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; packet.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .unwrap_or_else(|e| {
            panic!(
                "BPF_PROG_TEST_RUN of {name} on {} bytes failed: {e}",
                packet.len()
            )
        });
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

/// A frontend of `addr`'s family: `frontend([10, 96, 0, 10], 80, IPPROTO_TCP)`, or with a
/// `[u8; 16]` IPv6 address.
pub fn frontend<A: Address>(addr: A, port: u16, proto: u8) -> ServiceKey<A> {
    ServiceKey {
        addr,
        port,
        proto,
        pad: 0,
    }
}
