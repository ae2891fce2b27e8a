//! What the integration tests share: a datapath loaded with its own pin directory, and its
//! maps programmed through the real reconciler.
#![allow(dead_code, reason = "each test binary uses a different part")]

pub mod fake_api;
pub mod packets;

use std::collections::BTreeMap;

use lb_common::ServiceKey;
pub use lb_userspace::lab::PinDir;
use lb_userspace::{
    datapath::{Capacity, Datapath, maps::ServiceMaps},
    reconcile::{BackendAddr, DesiredService, Reconciler},
};

/// Fails loudly instead of skipping: CI runs as root, and a skipped datapath test proves nothing.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests load eBPF programs and create network namespaces: run them as root (`cargo xtask test`)"
    );
}

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
    /// succeeded.
    pub fn program(&mut self, services: &[(ServiceKey, &[BackendAddr])]) {
        self.program_with(services, None);
    }

    /// Like [`Loaded::program`], with Maglev tables of `maglev` positions when given.
    pub fn program_with(&mut self, services: &[(ServiceKey, &[BackendAddr])], maglev: Option<u32>) {
        self.program_all(services, maglev, None);
    }

    /// Like [`Loaded::program_with`], with session affinity of `affinity_timeout` seconds.
    pub fn program_all(
        &mut self,
        services: &[(ServiceKey, &[BackendAddr])],
        maglev: Option<u32>,
        affinity_timeout: Option<u32>,
    ) {
        let desired: BTreeMap<ServiceKey, DesiredService> = services
            .iter()
            .map(|(key, backends)| {
                let service = DesiredService {
                    name: format!("test/{key:?}"),
                    cluster_ip: true,
                    backends: backends.to_vec(),
                    draining: Vec::new(),
                    maglev,
                    affinity_timeout,
                    external: None,
                };
                (*key, service)
            })
            .collect();
        self.apply(&desired);
    }

    /// Programs exactly `desired` and asserts every write succeeded.
    pub fn apply(&mut self, desired: &BTreeMap<ServiceKey, DesiredService>) {
        let report = self.reconciler.apply(desired, &mut self.maps);
        assert!(
            report.failed.is_empty(),
            "programming failed: {:?}",
            report.failed
        );
    }
}

pub fn frontend(addr: [u8; 4], port: u16, proto: u8) -> ServiceKey {
    ServiceKey {
        addr,
        port,
        proto,
        pad: 0,
    }
}
