//! Services for the node itself (host processes and hostNetwork pods): cgroup socket hooks give
//! a connecting socket its backend once, at connect(), instead of translating every packet, and
//! make the socket see the service as its peer. Only sockets in the node's network namespace are
//! touched; pods have the TC programs on their interfaces.
//!
//! The IPv6 hooks serve IPv6 addresses from the IPv6 maps, and an IPv4-mapped address
//! (`::ffff:10.96.0.10`, a dual-stack socket reaching an IPv4 service) from the IPv4 maps,
//! written back IPv4-mapped.
use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use lb_common::{Address, IPPROTO_TCP, IPPROTO_UDP, Ipv4, Ipv6, SockRevEntry, SockRevKey, config};

use crate::{
    family::Family,
    maps::SB_CONFIG,
    packet::{Flow, Piece},
    service,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const ECONNREFUSED: i32 = 111;

/// Where a hook's socket address lies in `bpf_sock_addr`, and the family whose maps serve it.
trait SockAddress {
    type Family: Family;
    /// The socket address family the hook sees.
    const USER_FAMILY: u32;
    fn read(addr: &bpf_sock_addr) -> Self::Family;
    /// Writes whole words, as the kernel requires.
    fn write(addr: &mut bpf_sock_addr, value: Self::Family);
}

/// An IPv4 hook's address: `user_ip4`.
struct UserIp4;
/// An IPv6 hook's address: `user_ip6`.
struct UserIp6;
/// An IPv4 address inside an IPv6 hook's `user_ip6`, as `::ffff:a.b.c.d`.
struct MappedIp4;

/// The first three words of an IPv4-mapped IPv6 address (`::ffff:0:0/96`), as they lie in
/// memory.
const IPV4_MAPPED_PREFIX: [u32; 3] = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff])];

impl SockAddress for UserIp4 {
    type Family = Ipv4;
    const USER_FAMILY: u32 = AF_INET;

    #[inline(always)]
    fn read(addr: &bpf_sock_addr) -> Ipv4 {
        addr.user_ip4.to_ne_bytes()
    }

    #[inline(always)]
    fn write(addr: &mut bpf_sock_addr, value: Ipv4) {
        addr.user_ip4 = u32::from_ne_bytes(value);
    }
}

impl SockAddress for UserIp6 {
    type Family = Ipv6;
    const USER_FAMILY: u32 = AF_INET6;

    #[inline(always)]
    fn read(addr: &bpf_sock_addr) -> Ipv6 {
        let mut value = [0u8; 16];
        for (bytes, word) in value.chunks_exact_mut(4).zip(addr.user_ip6) {
            bytes.copy_from_slice(&word.to_ne_bytes());
        }
        value
    }

    #[inline(always)]
    fn write(addr: &mut bpf_sock_addr, value: Ipv6) {
        for (word, bytes) in addr.user_ip6.iter_mut().zip(value.chunks_exact(4)) {
            *word = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        }
    }
}

impl SockAddress for MappedIp4 {
    type Family = Ipv4;
    const USER_FAMILY: u32 = AF_INET6;

    #[inline(always)]
    fn read(addr: &bpf_sock_addr) -> Ipv4 {
        addr.user_ip6[3].to_ne_bytes()
    }

    #[inline(always)]
    fn write(addr: &mut bpf_sock_addr, value: Ipv4) {
        let [a, b, c] = IPV4_MAPPED_PREFIX;
        addr.user_ip6 = [a, b, c, u32::from_ne_bytes(value)];
    }
}

/// The kernel's `bpf_sock_addr` of this run. Helpers given the context's pointer are called
/// before it is borrowed, or after the borrow ends.
#[inline(always)]
#[allow(
    clippy::mut_from_ref,
    reason = "the context is a pointer to kernel memory the program may write, not Rust-owned data"
)]
fn sock_addr(ctx: &SockAddrContext) -> &mut bpf_sock_addr {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's run; callers hold one
    // borrow of it at a time.
    unsafe { &mut *ctx.sock_addr }
}

/// The hook's socket address family and protocol.
#[inline(always)]
fn family_and_protocol(ctx: &SockAddrContext) -> (u32, u8) {
    let addr = sock_addr(ctx);
    (addr.user_family, addr.protocol as u8)
}

#[inline(always)]
fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the helper only reads the context the kernel passed in.
    unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) }
}

/// Whether an IPv6 hook's address is IPv4-mapped.
#[inline(always)]
fn is_ipv4_mapped(ctx: &SockAddrContext) -> bool {
    let words = sock_addr(ctx).user_ip6;
    [words[0], words[1], words[2]] == IPV4_MAPPED_PREFIX
}

/// Whether the socket behind `ctx` lives in the node's network namespace.
#[inline(always)]
fn in_node_netns(ctx: &SockAddrContext) -> bool {
    let node = SB_CONFIG.get(config::NETNS_COOKIE).copied().unwrap_or(0);
    // SAFETY: the helper only reads the context the kernel passed in.
    node != 0 && unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) } == node
}

/// connect4/sendmsg4: see [`translate_destination`].
#[inline(always)]
pub fn translate_destination4(ctx: &SockAddrContext) -> bool {
    translate_destination::<UserIp4>(ctx)
}

/// connect6/sendmsg6: see [`translate_destination`].
#[inline(always)]
pub fn translate_destination6(ctx: &SockAddrContext) -> bool {
    if is_ipv4_mapped(ctx) {
        translate_destination::<MappedIp4>(ctx)
    } else {
        translate_destination::<UserIp6>(ctx)
    }
}

/// recvmsg4/getpeername4: see [`restore_peer`].
#[inline(always)]
pub fn restore_peer4(ctx: &SockAddrContext) {
    restore_peer::<UserIp4>(ctx);
}

/// recvmsg6/getpeername6: see [`restore_peer`].
#[inline(always)]
pub fn restore_peer6(ctx: &SockAddrContext) {
    if is_ipv4_mapped(ctx) {
        restore_peer::<MappedIp4>(ctx);
    } else {
        restore_peer::<UserIp6>(ctx);
    }
}

/// connect()/sendmsg() to a service frontend: the address becomes a backend's. `false`: refuse
/// (a service without endpoints), which the kernel reports as ECONNREFUSED.
#[inline(always)]
fn translate_destination<S: SockAddress>(ctx: &SockAddrContext) -> bool {
    let (family, proto) = family_and_protocol(ctx);
    if family != S::USER_FAMILY || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) || !in_node_netns(ctx) {
        return true;
    }
    let cookie = socket_cookie(ctx);
    let addr = sock_addr(ctx);
    // The socket's own address is not known yet: its cookie stands in for the source port in
    // the Maglev hash, and the node is one client for session affinity.
    let flow = Flow {
        src_addr: S::Family::UNSPECIFIED,
        dst_addr: S::read(addr),
        src_port: cookie as u16,
        dst_port: u16::from_be(addr.user_port as u16),
        proto,
        tcp_flags: 0,
        l4_off: 0,
        l4_csum_off: 0,
        end: 0,
        piece: Piece::Whole,
    };
    let Some((_, backend)) = (match service::lookup_frontend(&flow) {
        Some(service) => service::choose_backend(&service, &flow),
        // A ClusterIP on a port its Service does not define is refused like one without
        // endpoints; any other address is not ours.
        None if service::is_cluster_ip(flow.dst_addr) => None,
        None => return true,
    }) else {
        // SAFETY: a plain helper call; connect and sendmsg hooks may set the error.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return false;
    };
    let key = SockRevKey {
        cookie,
        addr: backend.addr,
        port: backend.port,
        pad: 0,
        pad_addr: Default::default(),
    };
    let frontend = SockRevEntry {
        addr: flow.dst_addr,
        port: flow.dst_port,
        pad: 0,
    };
    // A full LRU map evicts; a lost entry only shows the backend's address to the socket.
    let _ = S::Family::sock_revnat().insert(key, frontend, 0);
    S::write(addr, backend.addr);
    addr.user_port = u32::from(backend.port.to_be());
    true
}

/// recvmsg()/getpeername() of a translated socket: the backend reads as the service again.
#[inline(always)]
fn restore_peer<S: SockAddress>(ctx: &SockAddrContext) {
    if family_and_protocol(ctx).0 != S::USER_FAMILY || !in_node_netns(ctx) {
        return;
    }
    let cookie = socket_cookie(ctx);
    let addr = sock_addr(ctx);
    let key = SockRevKey {
        cookie,
        addr: S::read(addr),
        port: u16::from_be(addr.user_port as u16),
        pad: 0,
        pad_addr: Default::default(),
    };
    // SAFETY: copied out at once.
    if let Some(frontend) = unsafe { S::Family::sock_revnat().get(key).copied() } {
        S::write(addr, frontend.addr);
        addr.user_port = u32::from(frontend.port.to_be());
    }
}
