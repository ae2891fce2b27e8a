//! Map layout migration on real pinned maps: maps pinned by an earlier build (an older value
//! layout, a smaller capacity) are created and filled with raw bpf(2) calls, then this build's
//! datapath is loaded over them and a packet of a carried flow goes through it.
mod common;

use std::{ffi::CString, os::fd::AsFd as _, os::fd::AsRawFd as _, path::Path};

use aya::{
    maps::{MapData, MapInfo},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use common::{PinDir, packets, require_root};
use lb_common::{
    Backend, CtEntry, CtKey, IPPROTO_TCP, ServiceInfo, ServiceKey, SlotKey, capacity, ct_direction,
    map_names, program_names,
};
use lb_userspace::datapath::{Datapath, bpffs};

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
    program.load().unwrap();
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
