//! Names of the bench's own: network namespace prefixes that no other run (nor a test binary
//! running beside the bench) can collide with, and pin directories likewise.
use std::sync::atomic::{AtomicUsize, Ordering};

pub use lb_userspace::lab::PinDir;

/// The bench's pin directories are `/sys/fs/bpf/sbbench-…`.
pub const PIN_OWNER: &str = "sbbench";

/// A short tag unique to this process and call, e.g. `sb3e12345`: at most 10 bytes, so that lab
/// interface names (`<prefix>-p<n>`) stay within Linux's 15.
pub fn unique_prefix(tag: char) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::SeqCst) % 10;
    format!("sb{tag}{n}{}", std::process::id() % 100_000)
}
