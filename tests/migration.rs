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
    Backend, BackendId, BackendSet, ClusterIpKey, CtEntry, CtKey, IPPROTO_TCP, Ipv6, ServiceKey,
    SourceRangeKey, Stat, backend_flags, capacity, ct_direction, flow_hash, map_names, program_names,
    service_flags,
};
use lb_userspace::{
    datapath::{Datapath, bpffs, migrate},
    reconcile::{DesiredService, External, FrontendKey, MaglevSize, Reconciler, maglev},
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
    pin(path, fd);
}

/// Pins map `fd` at `path` and closes it: the pin holds the map.
fn pin(path: &Path, fd: u32) {
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
    // SAFETY: the fd was created by the caller and is not used again.
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

/// A `ServiceInfo` of the layout before backend sets (20 bytes): id, backend count, flags
/// (bit 1: Maglev), Maglev table size, affinity timeout.
fn service_before_sets(id: u32, backend_count: u32, maglev_size: u32) -> Vec<u8> {
    let flags = u32::from(maglev_size > 0);
    [id, backend_count, flags, maglev_size, 0]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect()
}

/// The Maglev table an earlier build wrote for [`BACKENDS`] (ids 1 and 2), `size` positions.
fn old_maglev_table(size: u32) -> Vec<BackendId> {
    let identities: Vec<Vec<u8>> = BACKENDS
        .iter()
        .map(|&(addr, port)| maglev::identity(SocketAddr::from((addr, port))))
        .collect();
    let weighted: Vec<(&[u8], u32)> = identities.iter().map(|i| (i.as_slice(), 1)).collect();
    maglev::table(&weighted, size)
        .into_iter()
        .map(|index| index as BackendId + 1)
        .collect()
}

/// `SB_MAGLEV` as the builds before backend sets pinned it: service id → an array of its own.
fn pin_old_maglev(path: &Path, service_id: u32, table: &[BackendId]) {
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    const BPF_MAP_TYPE_HASH_OF_MAPS: u32 = 13;
    const INNER_MAP_AND_MMAPABLE: u32 = (1 << 12) | (1 << 10);
    #[repr(C)]
    struct Create {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        inner_map_fd: u32,
    }
    let inner = bpf(
        BPF_MAP_CREATE,
        &Create {
            map_type: BPF_MAP_TYPE_ARRAY,
            key_size: 4,
            value_size: 4,
            max_entries: table.len() as u32,
            map_flags: INNER_MAP_AND_MMAPABLE,
            inner_map_fd: 0,
        },
    ) as u32;
    for (position, id) in table.iter().enumerate() {
        put(inner, &(position as u32).to_ne_bytes(), &id.to_ne_bytes());
    }
    let outer = bpf(
        BPF_MAP_CREATE,
        &Create {
            map_type: BPF_MAP_TYPE_HASH_OF_MAPS,
            key_size: 4,
            value_size: 4,
            max_entries: 1024,
            map_flags: 0,
            inner_map_fd: inner,
        },
    ) as u32;
    put(outer, &service_id.to_ne_bytes(), &inner.to_ne_bytes());
    pin(path, outer);
    // SAFETY: created here and not used again; the outer map holds the inner one.
    unsafe { libc::close(inner as i32) };
}

#[test]
fn services_of_the_layout_before_backend_sets_keep_their_ids_flows_and_tables() {
    require_root();
    let pins = PinDir::new("sbtest", "migrate");
    bpffs::prepare_pin_dir(pins.path()).unwrap();
    let other = ServiceKey {
        port: 443,
        ..FRONTEND
    };
    const MAGLEV_SIZE: u32 = 251;
    pin_old_map(
        &pins.path().join(map_names::SERVICES),
        BPF_MAP_TYPE_HASH,
        8,
        20,
        65_536,
        &[
            (
                &bytes(&FRONTEND),
                &service_before_sets(SERVICE_ID, 2, MAGLEV_SIZE),
            ),
            (&bytes(&other), &service_before_sets(8, 0, 0)),
        ],
    );
    let slots: Vec<(Vec<u8>, Vec<u8>)> = (0..2u32)
        .map(|slot| {
            let key = [SERVICE_ID, slot].iter().flat_map(|w| w.to_ne_bytes()).collect();
            (key, (slot + 1).to_ne_bytes().to_vec())
        })
        .collect();
    let slots: Vec<(&[u8], &[u8])> = slots.iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect();
    pin_old_map(
        &pins.path().join(migrate::retired::BACKEND_SLOTS),
        BPF_MAP_TYPE_HASH,
        8,
        4,
        262_144,
        &slots,
    );
    // The backends' entries have the layout they had: their owner is the service's id.
    let backends: Vec<(Vec<u8>, Vec<u8>)> = BACKENDS
        .iter()
        .enumerate()
        .map(|(index, &(addr, port))| {
            let backend = Backend {
                addr,
                port,
                proto: IPPROTO_TCP,
                flags: 0,
                set_id: SERVICE_ID,
            };
            ((index as u32 + 1).to_ne_bytes().to_vec(), bytes(&backend))
        })
        .collect();
    let backends: Vec<(&[u8], &[u8])> = backends
        .iter()
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    pin_old_map(
        &pins.path().join(map_names::BACKENDS),
        BPF_MAP_TYPE_HASH,
        4,
        12,
        262_144,
        &backends,
    );
    let old_table = old_maglev_table(MAGLEV_SIZE);
    pin_old_maglev(
        &pins.path().join(migrate::retired::MAGLEV),
        SERVICE_ID,
        &old_table,
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
    let services = maps.services().unwrap();
    assert_eq!(services.len(), 2, "{services:?}");
    let info = services[&FrontendKey::from(FRONTEND)];
    assert_eq!(
        (info.id, info.flags, info.backends, info.outside),
        (
            SERVICE_ID,
            0,
            BackendSet {
                id: SERVICE_ID,
                count: 2,
                table: info.backends.table,
                maglev_size: MAGLEV_SIZE,
            },
            info.backends
        ),
        "the frontend keeps its id; its set is named by the id its backends' entries name"
    );
    let programmed = maps.read_programmed().unwrap();
    assert_eq!(programmed.live_backends(&info.backends), [1, 2], "its slots");
    assert_eq!(services[&FrontendKey::from(other)].backends.count, 0);
    let info = MapInfo::from_pin(pins.path().join(map_names::CONNTRACK)).unwrap();
    assert_eq!(info.max_entries(), capacity::CONNTRACK, "the new capacity");
    for (key, entry) in flow(40_000, 2) {
        assert_eq!(
            maps.conntrack.get(&key, 0).unwrap(),
            entry,
            "the flow was carried"
        );
    }
    let backends_info = MapInfo::from_pin(pins.path().join(map_names::BACKENDS)).unwrap();
    assert_eq!(
        (backends_info.max_entries(), backends_info.map_flags()),
        (capacity::BACKENDS, 1),
        "a larger backends map, not preallocated, its entries carried"
    );
    assert_eq!(maps.backends().unwrap().len(), 2);
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
        .filter(|name| name.ends_with("-old") || migrate::retired::ALL.contains(&name.as_str()))
        .collect();
    assert!(left.is_empty(), "old maps unpinned: {left:?}");

    // The new datapath serves the carried flows (each packet to its flow's backend, no new flow
    // counted), and a new flow where the old Maglev table sent it.
    let program: &mut SchedClassifier = datapath
        .ebpf
        .program_mut(program_names::FROM_POD)
        .unwrap()
        .try_into()
        .unwrap();
    load_program(|| program.load()).unwrap();
    let send = |packet: Vec<u8>| {
        let mut out = vec![0u8; packet.len() + 64];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(&packet),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .unwrap();
        out.truncate(result.data_size_out as usize);
        packets::addresses_with_valid_checksums(&out).1
    };
    for (port, backend) in [(40_000, BACKENDS[1]), (40_001, BACKENDS[0])] {
        let packet = packets::tcp_data((CLIENT, port), (FRONTEND.addr, FRONTEND.port), b"GET /");
        assert_eq!(
            send(packet),
            backend,
            "the flow from port {port} kept its backend"
        );
    }
    let stats = maps.service_stats().unwrap()[&SERVICE_ID];
    assert_eq!(
        (stats.packets, stats.new_flows),
        (2, 0),
        "both flows were established ones"
    );
    for port in 41_000..41_020 {
        let hash = flow_hash(CLIENT, FRONTEND.addr, port, FRONTEND.port, IPPROTO_TCP);
        let expected = BACKENDS[old_table[(hash % MAGLEV_SIZE) as usize] as usize - 1];
        let packet = packets::tcp_syn((CLIENT, port), (FRONTEND.addr, FRONTEND.port));
        assert_eq!(
            send(packet),
            expected,
            "a new flow from port {port} goes where it went"
        );
    }

    // The agent's first pass finds the same backends under the same ids: nothing to write.
    let desired = BTreeMap::from([(
        FrontendKey::from(FRONTEND),
        DesiredService {
            name: "test/web:80".into(),
            cluster_ip: true,
            backends: BACKENDS.iter().map(|&b| SocketAddr::from(b)).collect(),
            maglev: Some(MaglevSize::Fixed(MAGLEV_SIZE)),
            ..DesiredService::default()
        },
    )]);
    let mut reconciler = Reconciler::new(maps.read_programmed().unwrap());
    let report = reconciler.apply(&desired, &mut maps);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(
        report.writes, 1,
        "only its ClusterIP, which the old maps did not hold: {report:?}"
    );
    assert_eq!(
        maps.services().unwrap()[&FrontendKey::from(FRONTEND)],
        services[&FrontendKey::from(FRONTEND)]
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
        maglev: Some(MaglevSize::Fixed(251)),
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
                    ..External::default()
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
        (info6.backends.count, info6.flags, info6.backends.maglev_size),
        (2, 0, 251)
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
    let ids = [
        info4.id,
        info6.id,
        lb_info6.id,
        info4.backends.id,
        info6.backends.id,
        lb_info6.backends.id,
    ];
    assert_eq!(BTreeSet::from(ids).len(), 6, "one service id space: {ids:?}");

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
    let programmed = maps.read_programmed().unwrap();
    for id in programmed.live_backends(&info6.backends) {
        let backend = backends6[id];
        assert_eq!(
            (backend.set_id, backend.port, backend.flags),
            (info6.backends.id, 3000, 0),
            "the IPv6 frontend's backends, in the table space shared by both families"
        );
    }
    assert_eq!(programmed.live_backends(&info6.backends).len(), 2);
    assert_eq!(
        programmed.tables.len(),
        3,
        "a table for each family's ClusterIP set, one for the LoadBalancer's: {:?}",
        programmed.tables
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
        programmed,
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
