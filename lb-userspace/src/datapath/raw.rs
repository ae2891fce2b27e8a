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
