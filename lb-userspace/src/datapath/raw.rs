//! Map entries as bytes, through the bpf(2) syscall: a migration reads maps whose key and value
//! sizes are those of an earlier build, which no Rust type of this one describes.
use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
/// Update flag: only add a key that is not there yet.
pub const BPF_NOEXIST: u64 = 1;

/// The `bpf_attr` of the element commands.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    /// `value`, or `next_key` for BPF_MAP_GET_NEXT_KEY.
    value: u64,
    flags: u64,
}

fn bpf(command: libc::c_long, attr: &ElemAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid bpf_attr prefix for `command`, and the buffers it points to
    // outlive the call with the sizes the map was created with (checked by the callers).
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            std::ptr::from_ref(attr),
            size_of::<ElemAttr>(),
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Every entry of a hash map with keys of `key_size` and values of `value_size` bytes. Keys
/// deleted during the walk are skipped; a walk restarted by the kernel may visit a key twice,
/// which a later write of the same entry makes harmless.
pub fn entries(
    map: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut entries = Vec::new();
    let mut key: Option<Vec<u8>> = None;
    loop {
        let mut next = vec![0u8; key_size];
        let attr = ElemAttr {
            map_fd: map.as_raw_fd() as u32,
            pad: 0,
            key: key.as_ref().map_or(0, |k| k.as_ptr() as u64),
            value: next.as_mut_ptr() as u64,
            flags: 0,
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &attr) {
            Ok(()) => {}
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => return Ok(entries),
            Err(error) => return Err(error),
        }
        let mut value = vec![0u8; value_size];
        let attr = ElemAttr {
            map_fd: map.as_raw_fd() as u32,
            pad: 0,
            key: next.as_ptr() as u64,
            value: value.as_mut_ptr() as u64,
            flags: 0,
        };
        match bpf(BPF_MAP_LOOKUP_ELEM, &attr) {
            Ok(()) => entries.push((next.clone(), value)),
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(error) => return Err(error),
        }
        key = Some(next);
    }
}

/// Writes one entry; `key` and `value` must have the map's sizes.
pub fn update(map: BorrowedFd<'_>, key: &[u8], value: &[u8], flags: u64) -> io::Result<()> {
    let attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        pad: 0,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        flags,
    };
    bpf(BPF_MAP_UPDATE_ELEM, &attr)
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// The `bpf_attr` of the batch commands. The kernel writes back `count` (how many entries it
/// processed) and `out_batch`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf_batch(command: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid bpf_attr prefix for `command`; the buffers it points to hold
    // `count` keys and values of the map's sizes (checked by the callers) and outlive the call.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            std::ptr::from_mut(attr),
            size_of::<BatchAttr>(),
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Writes `keys[i]` → `values[i]` in one BPF_MAP_UPDATE_BATCH (the kernel still takes them one
/// by one, but without a syscall each). `K` and `V` must be the map's key and value types. On
/// failure: how many were written before the one that failed, and why.
pub fn update_batch<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, io::Error)> {
    assert_eq!(keys.len(), values.len(), "a value per key");
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: map.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    bpf_batch(BPF_MAP_UPDATE_BATCH, &mut attr).map_err(|error| (attr.count as usize, error))
}

/// Deletes `keys` in one BPF_MAP_DELETE_BATCH; on failure, how many were deleted before the one
/// that failed, and why.
pub fn delete_batch<K: aya::Pod>(map: BorrowedFd<'_>, keys: &[K]) -> Result<(), (usize, io::Error)> {
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: map.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    bpf_batch(BPF_MAP_DELETE_BATCH, &mut attr).map_err(|error| (attr.count as usize, error))
}

/// Every entry of a hash map, read by BPF_MAP_LOOKUP_BATCH: thousands per syscall rather than
/// two syscalls per entry. `K` and `V` must be the map's key and value types.
pub fn lookup_batch<K: aya::Pod + Default, V: aya::Pod + Default>(
    map: BorrowedFd<'_>,
) -> io::Result<Vec<(K, V)>> {
    let mut entries = Vec::new();
    let mut chunk = 4096;
    // The position token: a bucket index for hash maps; room for any map's.
    let mut token = [0u64; 8];
    let mut next_token = [0u64; 8];
    let mut first = true;
    loop {
        let mut keys = vec![K::default(); chunk];
        let mut values = vec![V::default(); chunk];
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token.as_ptr() as u64 },
            out_batch: next_token.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let result = bpf_batch(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let got = attr.count as usize;
        match result {
            Ok(()) => {}
            // The end: what this call returned is the last of it.
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => {
                entries.extend(keys.into_iter().zip(values).take(got));
                return Ok(entries);
            }
            // A bucket holds more entries than `chunk`: again, with room for them.
            Err(error) if error.raw_os_error() == Some(libc::ENOSPC) && got == 0 => {
                chunk *= 4;
                continue;
            }
            Err(error) => return Err(error),
        }
        entries.extend(keys.into_iter().zip(values).take(got));
        token = next_token;
        first = false;
    }
}

/// The kernel's accounting of a map's memory, as `bpftool map show` prints it (`memlock` in
/// `/proc/self/fdinfo`), in bytes.
pub fn memlock(map: BorrowedFd<'_>) -> io::Result<u64> {
    let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", map.as_raw_fd()))?;
    fdinfo
        .lines()
        .find_map(|line| line.strip_prefix("memlock:"))
        .and_then(|value| value.trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no memlock in fdinfo"))
}
