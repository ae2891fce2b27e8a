//! Pinned maps across loads of the datapath. Layout migration: maps pinned by an earlier build
//! (an older value layout, a smaller capacity) are created and filled with raw bpf(2) calls,
//! then this build's datapath is loaded over them and a packet of a carried flow goes through
//! it. And both address families' maps, programmed and read back by a reloaded datapath.
mod common;

use lb_userspace::datapath::load_program;
use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    net::{Ipv6Addr, SocketAddr},
    os::fd::AsFd as _,
    os::fd::AsRawFd as _,
    path::Path,
};

use aya::{
    maps::{MapData, MapInfo},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use common::{Loaded, PinDir, packets, require_root};
use lb_common::{
    Backend, BackendId, ClusterIpKey, CtEntry, CtKey, IPPROTO_TCP, Ipv6, ServiceInfo, ServiceKey, SlotKey,
    SourceRangeKey, Stat, backend_flags, capacity, ct_direction, map_names, program_names, service_flags,
};
use lb_userspace::{
    datapath::{Datapath, bpffs},
    reconcile::{DesiredService, External, FrontendKey, Reconciler},
};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

fn bpf<T>(command: libc::c_long, attr: &T) -> i64 {
    // SAFETY: `attr` is the bpf_attr prefix `command` reads; pointers in it outlive the call.
    let result = unsafe { libc::syscall(libc::SYS_bpf, command, std::ptr::from_ref(attr), size_of::<T>()) };
    assert!(result >= 0, "bpf({command}): {}", std::io::Error::last_os_error());
    result
}

/// A map as an earlier build created it, pinned at `path`, holding `entries`.
fn pin_old_map(
    path: &Path,
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    entries: &[(&[u8], &[u8])],
) {
    #[repr(C)]
    struct Create {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    let fd = bpf(
        BPF_MAP_CREATE,
        &Create {
            map_type,
            key_size,
            value_size,
            max_entries,
            map_flags: 0,
        },
    ) as u32;
    for (key, value) in entries {
        assert_eq!((key.len(), value.len()), (key_size as usize, value_size as usize));
        put(fd, key, value);
    }
    #[repr(C)]
    struct Pin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let path = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    bpf(
        BPF_OBJ_PIN,
        &Pin {
            pathname: path.as_ptr() as u64,
            bpf_fd: fd,
            file_flags: 0,
        },
    );
    // SAFETY: the fd was just created here and is not used again; the pin holds the map.
    unsafe { libc::close(fd as i32) };
}

fn put(fd: u32, key: &[u8], value: &[u8]) {
    #[repr(C)]
    struct Update {
        map_fd: u32,
        pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    bpf(
        BPF_MAP_UPDATE_ELEM,
        &Update {
            map_fd: fd,
            pad: 0,
            key: key.as_ptr() as u64,
            value: value.as_ptr() as u64,
            flags: 0,
        },
    );
}

fn bytes<T: Copy>(value: &T) -> Vec<u8> {
    // SAFETY: the lb-common types are repr(C) without implicit padding.
    unsafe { std::slice::from_raw_parts(std::ptr::from_ref(value).cast::<u8>(), size_of::<T>()) }.to_vec()
}

const CLIENT: [u8; 4] = [10, 244, 0, 20];
const FRONTEND: ServiceKey = ServiceKey {
    addr: [10, 96, 0, 10],
    port: 80,
    proto: IPPROTO_TCP,
    pad: 0,
};
const BACKENDS: [([u8; 4], u16); 2] = [([10, 244, 0, 10], 3000), ([10, 244, 0, 11], 3000)];
const SERVICE_ID: u32 = 7;

/// Both conntrack entries of a flow from the client's `port` given backend `id` (1-based).
fn flow(port: u16, id: u32) -> [(CtKey, CtEntry); 2] {
    let (addr, backend_port) = BACKENDS[id as usize - 1];
    let forward = CtKey {
        src_addr: CLIENT,
        dst_addr: FRONTEND.addr,
        src_port: port,
        dst_port: FRONTEND.port,
        proto: IPPROTO_TCP,
        direction: ct_direction::FORWARD,
        pad: [0; 2],
    };
    let entry = CtEntry {
        service_id: SERVICE_ID,
        backend_id: id,
        nat_addr: addr,
        nat_port: backend_port,
        flags: 0,
        last_seen_ns: 1,
        ..CtEntry::default()
    };
    let reply = CtKey {
        src_addr: addr,
        dst_addr: CLIENT,
        src_port: backend_port,
        dst_port: port,
        proto: IPPROTO_TCP,
        direction: ct_direction::REPLY,
        pad: [0; 2],
    };
    let back = CtEntry {
        nat_addr: FRONTEND.addr,
        nat_port: FRONTEND.port,
        ..entry
    };
    [(forward, entry), (reply, back)]
}

/// The first release's `ServiceInfo`: id, backend count, flags (12 bytes).
fn service_v1(id: u32, backend_count: u32) -> Vec<u8> {
    [id, backend_count, 0]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect()
}

#[test]
fn maps_of_an_earlier_layout_or_capacity_are_carried_into_the_new_datapath() {
    require_root();
    let pins = PinDir::new("sbtest", "migrate");
    bpffs::prepare_pin_dir(pins.path()).unwrap();
    let other = ServiceKey {
        port: 443,
        ..FRONTEND
    };
    pin_old_map(
        &pins.path().join(map_names::SERVICES),
        BPF_MAP_TYPE_HASH,
        8,
        12,
        capacity::SERVICES,
        &[
            (&bytes(&FRONTEND), &service_v1(SERVICE_ID, 2)),
            (&bytes(&other), &service_v1(8, 0)),
        ],
    );
    // A conntrack map of an earlier capacity, holding a live flow on the second backend.
    let flows: Vec<(Vec<u8>, Vec<u8>)> = flow(40_000, 2)
        .iter()
        .map(|(k, v)| (bytes(k), bytes(v)))
        .collect();
    let flows: Vec<(&[u8], &[u8])> = flows.iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect();
    pin_old_map(
        &pins.path().join(map_names::CONNTRACK),
        BPF_MAP_TYPE_LRU_HASH,
        16,
        24,
        1024,
        &flows,
    );
    // A layout no build had: not convertible, so recreated empty.
    pin_old_map(
        &pins.path().join(map_names::AFFINITY),
        BPF_MAP_TYPE_LRU_HASH,
        8,
        8,
        1024,
        &[(&[0; 8], &[1; 8])],
    );

    let mut datapath = Datapath::load(pins.path()).expect("the datapath loads over the old maps");
    let mut maps = datapath.maps().unwrap();
    let services: Vec<(ServiceKey, ServiceInfo)> = maps.services.iter().map(Result::unwrap).collect();
    assert_eq!(services.len(), 2, "{services:?}");
    assert!(
        services.contains(&(
            FRONTEND,
            ServiceInfo {
                id: SERVICE_ID,
                backend_count: 2,
                ..ServiceInfo::default()
            }
        )),
        "the service entry, with the fields added since zeroed: {services:?}"
    );
    let info = MapInfo::from_pin(pins.path().join(map_names::CONNTRACK)).unwrap();
    assert_eq!(info.max_entries(), capacity::CONNTRACK, "the new capacity");
    for (key, entry) in flow(40_000, 2) {
        assert_eq!(
            maps.conntrack.get(&key, 0).unwrap(),
            entry,
            "the flow was carried"
        );
    }
    let affinity = MapInfo::from_pin(pins.path().join(map_names::AFFINITY)).unwrap();
    assert_eq!(affinity.value_size(), 16, "an unknown layout is replaced");
    assert_eq!(maps.affinity.keys().count(), 0);

    // The old programs keep writing to the old map until the new ones are attached: a flow
    // they add meanwhile is carried by the last pass, which also unpins the old maps.
    let old = MapData::from_pin(pins.path().join(format!("{}-old", map_names::CONNTRACK))).unwrap();
    for (key, entry) in flow(40_001, 1) {
        put(old.fd().as_fd().as_raw_fd() as u32, &bytes(&key), &bytes(&entry));
    }
    datapath.finish_migrations().unwrap();
    for (key, entry) in flow(40_001, 1) {
        assert_eq!(
            maps.conntrack.get(&key, 0).unwrap(),
            entry,
            "the late flow was carried"
        );
    }
    let left: Vec<String> = std::fs::read_dir(pins.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with("-old"))
        .collect();
    assert!(left.is_empty(), "old maps unpinned: {left:?}");

    // The new datapath serves the carried flows: each packet goes to its flow's backend, and
    // no new flow is counted.
    for (id, (addr, port)) in BACKENDS.iter().enumerate() {
        let id = id as u32 + 1;
        let backend = Backend {
            addr: *addr,
            port: *port,
            proto: IPPROTO_TCP,
            flags: 0,
            service_id: SERVICE_ID,
        };
        maps.backends.insert(id, backend, 0).unwrap();
        let slot = SlotKey {
            service_id: SERVICE_ID,
            slot: id - 1,
        };
        maps.slots.insert(slot, id, 0).unwrap();
    }
    let program: &mut SchedClassifier = datapath
        .ebpf
        .program_mut(program_names::FROM_POD)
        .unwrap()
        .try_into()
        .unwrap();
    load_program(|| program.load()).unwrap();
    for (port, backend) in [(40_000, BACKENDS[1]), (40_001, BACKENDS[0])] {
        let packet = packets::tcp_data((CLIENT, port), (FRONTEND.addr, FRONTEND.port), b"GET /");
        let mut out = vec![0u8; packet.len() + 64];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(&packet),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .unwrap();
        out.truncate(result.data_size_out as usize);
        let (_, destination) = packets::addresses_with_valid_checksums(&out);
        assert_eq!(destination, backend, "the flow from port {port} kept its backend");
    }
    let stats = maps.service_stats().unwrap()[&SERVICE_ID];
    assert_eq!(
        (stats.packets, stats.new_flows),
        (2, 0),
        "both flows were established ones"
    );
}

/// The counters array of an earlier build, with fewer counters (the ten before the fragment and
/// source-check ones), is recreated with every counter: reused as it was, the datapath would
/// count the new ones past its end, that is not at all. Counters restart from zero.
#[test]
fn a_counters_map_of_an_earlier_build_is_recreated_with_every_counter() {
    const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
    require_root();
    let pins = PinDir::new("sbtest", "migrate-stats");
    bpffs::prepare_pin_dir(pins.path()).unwrap();
    let earlier = Stat::FragmentWithoutFirst as u32;
    pin_old_map(
        &pins.path().join(map_names::STATS),
        BPF_MAP_TYPE_PERCPU_ARRAY,
        4,
        8,
        earlier,
        &[],
    );
    let datapath = Datapath::load(pins.path()).expect("the datapath loads over the old counters");
    let info = MapInfo::from_pin(pins.path().join(map_names::STATS)).unwrap();
    assert_eq!(info.max_entries(), Stat::COUNT, "every counter has its slot");
    let maps = datapath.maps().unwrap();
    for stat in Stat::ALL {
        assert_eq!(maps.stat(stat).unwrap(), 0, "{stat:?} reads, from zero");
    }
}

/// An IPv6 conntrack map of another capacity (an earlier `--conntrack-capacity`) is carried into
/// the new one as its IPv4 twin is, its flows kept.
#[test]
fn the_ipv6_conntrack_map_is_carried_like_its_ipv4_twin() {
    require_root();
    let pins = PinDir::new("sbtest", "migrate6");
    bpffs::prepare_pin_dir(pins.path()).unwrap();
    let ip = |text: &str| text.parse::<Ipv6Addr>().unwrap().octets();
    let forward = CtKey {
        src_addr: ip("fd00:244::20"),
        dst_addr: ip("fd00:96::10"),
        src_port: 40_000,
        dst_port: 80,
        proto: IPPROTO_TCP,
        direction: ct_direction::FORWARD,
        pad: [0; 2],
    };
    let entry = CtEntry {
        service_id: SERVICE_ID,
        backend_id: 1,
        nat_addr: ip("fd00:244::10"),
        nat_port: 3000,
        last_seen_ns: 1,
        ..CtEntry::default()
    };
    pin_old_map(
        &pins.path().join(map_names::CONNTRACK6),
        BPF_MAP_TYPE_LRU_HASH,
        size_of::<CtKey<Ipv6>>() as u32,
        size_of::<CtEntry<Ipv6>>() as u32,
        1024,
        &[(&bytes(&forward), &bytes(&entry))],
    );
    let datapath = Datapath::load(pins.path()).expect("the datapath loads over the old map");
    datapath.finish_migrations().unwrap();
    let info = MapInfo::from_pin(pins.path().join(map_names::CONNTRACK6)).unwrap();
    assert_eq!(info.max_entries(), capacity::CONNTRACK, "the new capacity");
    let maps = datapath.maps().unwrap();
    assert_eq!(
        maps.conntrack6.get(&forward, 0).unwrap(),
        entry,
        "the flow was carried"
    );
    assert!(
        !pins
            .path()
            .join(format!("{}-old", map_names::CONNTRACK6))
            .exists(),
        "the old map is unpinned"
    );
}

/// A dual-stack Service programmed through the reconciler: each family's frontends, backends,
/// ClusterIPs and source ranges are in that family's pinned maps, slots and Maglev tables in the
/// shared ones under ids of one space; a datapath loaded again over the same pins (an agent
/// restart) reads both families back, and the restarted reconciler rewrites nothing.
#[test]
fn a_dual_stack_service_is_in_each_familys_maps_and_read_back_after_a_reload() {
    let mut loaded = Loaded::new("dualstack");
    let key = |addr: &str, port| FrontendKey {
        addr: addr.parse().unwrap(),
        port,
        proto: IPPROTO_TCP,
    };
    let socket = |text: &str| -> SocketAddr { text.parse().unwrap() };
    let cluster_service = |backends: &[&str], draining: &[&str]| DesiredService {
        name: "test/web:80".into(),
        cluster_ip: true,
        backends: backends.iter().map(|b| socket(b)).collect(),
        draining: draining.iter().map(|b| socket(b)).collect(),
        maglev: Some(251),
        ..DesiredService::default()
    };
    let (web4, web6, lb6) = (
        key("10.96.0.10", 80),
        key("fd00::10", 80),
        key("2001:db8:7::7", 80),
    );
    let desired = BTreeMap::from([
        (
            web4,
            cluster_service(&["10.244.0.10:3000", "10.244.0.11:3000"], &[]),
        ),
        (
            web6,
            cluster_service(
                &["[fd00:244::10]:3000", "[fd00:244::11]:3000"],
                &["[fd00:244::12]:3000"],
            ),
        ),
        (
            lb6,
            DesiredService {
                name: "test/web:80 (LoadBalancer)".into(),
                backends: vec![socket("[fd00:244::10]:3000")],
                external: Some(External {
                    local: false,
                    source_ranges: Some(vec![("2001:db8::".parse().unwrap(), 32)]),
                }),
                ..DesiredService::default()
            },
        ),
    ]);
    loaded.apply(&desired);
    let maps = &loaded.maps;

    let service6 = |addr: &str| ServiceKey::<Ipv6> {
        addr: addr.parse::<Ipv6Addr>().unwrap().octets(),
        port: 80,
        proto: IPPROTO_TCP,
        pad: 0,
    };
    let info6 = maps
        .services6
        .get(&service6("fd00::10"), 0)
        .expect("the IPv6 ClusterIP frontend is in SB_SERVICES6");
    let lb_info6 = maps.services6.get(&service6("2001:db8:7::7"), 0).unwrap();
    assert_eq!(
        (info6.backend_count, info6.flags, info6.maglev_table_size),
        (2, service_flags::MAGLEV, 251)
    );
    assert_eq!(
        lb_info6.flags & (service_flags::EXTERNAL_SNAT | service_flags::SOURCE_RANGES),
        service_flags::EXTERNAL_SNAT | service_flags::SOURCE_RANGES
    );
    let info4 = maps
        .services
        .get(
            &ServiceKey {
                addr: [10, 96, 0, 10],
                ..FRONTEND
            },
            0,
        )
        .unwrap();
    assert_eq!(
        maps.services.keys().count(),
        1,
        "SB_SERVICES holds the IPv4 frontend alone"
    );
    let ids = [info4.id, info6.id, lb_info6.id];
    assert_eq!(BTreeSet::from(ids).len(), 3, "one service id space: {ids:?}");

    let backends4: BTreeMap<BackendId, Backend> = maps.backends.iter().map(Result::unwrap).collect();
    let backends6: BTreeMap<BackendId, Backend<Ipv6>> = maps.backends6.iter().map(Result::unwrap).collect();
    assert_eq!(backends4.len(), 2, "{backends4:?}");
    assert_eq!(
        backends6.len(),
        4,
        "two ready, one draining, one of the LoadBalancer: {backends6:?}"
    );
    assert!(
        backends4.keys().all(|id| !backends6.contains_key(id)),
        "one backend id space: {backends4:?} {backends6:?}"
    );
    let draining: Vec<Ipv6Addr> = backends6
        .values()
        .filter(|b| b.flags == backend_flags::DRAINING)
        .map(|b| b.addr.into())
        .collect();
    assert_eq!(draining, ["fd00:244::12".parse::<Ipv6Addr>().unwrap()]);
    for slot in 0..2 {
        let id = maps
            .slots
            .get(
                &SlotKey {
                    service_id: info6.id,
                    slot,
                },
                0,
            )
            .expect("the IPv6 frontend's slots are in the shared slots map");
        let backend = backends6[&id];
        assert_eq!(
            (backend.service_id, backend.port, backend.flags),
            (info6.id, 3000, 0)
        );
    }
    assert!(
        maps.maglev.get(&info6.id, 0).is_ok(),
        "its Maglev table is in the shared SB_MAGLEV"
    );
    assert_eq!(
        maps.cluster_ips6
            .get(
                &ClusterIpKey {
                    addr: "fd00::10".parse::<Ipv6Addr>().unwrap().octets()
                },
                0
            )
            .unwrap(),
        1
    );
    assert_eq!(
        maps.cluster_ips6.keys().count(),
        1,
        "a LoadBalancer IP is no ClusterIP"
    );
    let ranges: Vec<(u32, SourceRangeKey<Ipv6>)> = maps
        .source_ranges6
        .keys()
        .map(|key| {
            let key = key.unwrap();
            (key.prefix_len(), key.data())
        })
        .collect();
    let range = SourceRangeKey {
        service_id: lb_info6.id.to_be_bytes(),
        addr: "2001:db8::".parse::<Ipv6Addr>().unwrap().octets(),
    };
    assert_eq!(ranges, [(32 + 32, range)]);

    // An agent restart: a new datapath over the same pins, a reconciler from what it reads.
    let reloaded = Datapath::load(loaded.pins.path()).unwrap();
    let mut maps = reloaded.maps().unwrap();
    let programmed = maps.read_programmed().unwrap();
    assert_eq!(
        &programmed,
        loaded.reconciler.programmed(),
        "both families are read back"
    );
    let report = Reconciler::new(programmed).apply(&desired, &mut maps);
    assert_eq!(
        (report.writes, report.deletes, report.failed.len()),
        (0, 0, 0),
        "nothing is rewritten: {report:?}"
    );
}
