//! Services for the node itself (host processes and hostNetwork pods): cgroup socket hooks give
//! a connecting socket its backend once, at connect(), instead of translating every packet, and
//! make the socket see the service as its peer. Only sockets in the node's network namespace are
//! touched; pods have the TC programs on their interfaces.
use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use lb_common::{IPPROTO_TCP, IPPROTO_UDP, SockRevEntry, SockRevKey, config};

use crate::{
    maps::{SB_CONFIG, SB_SOCK_REVNAT},
    packet::Flow,
    service,
};

const AF_INET: u32 = 2;
const ECONNREFUSED: i32 = 111;

/// Whether the socket behind `ctx` lives in the node's network namespace.
#[inline(always)]
fn in_node_netns(ctx: &SockAddrContext) -> bool {
    let node = SB_CONFIG.get(config::NETNS_COOKIE).copied().unwrap_or(0);
    // SAFETY: the helper only reads the context the kernel passed in.
    node != 0 && unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) } == node
}

/// connect()/sendmsg() to a service frontend: the address becomes a backend's. `false`: refuse
/// (a service without endpoints), which the kernel reports as ECONNREFUSED.
#[inline(always)]
pub fn translate_destination(ctx: &SockAddrContext) -> bool {
    let addr = ctx.sock_addr;
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's run.
    let (family, protocol, ip, port) = unsafe {
        (
            (*addr).user_family,
            (*addr).protocol,
            (*addr).user_ip4,
            (*addr).user_port,
        )
    };
    let proto = protocol as u8;
    if family != AF_INET || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) || !in_node_netns(ctx) {
        return true;
    }
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(addr.cast()) };
    // The socket's own address is not known yet: its cookie stands in for the source port in
    // the Maglev hash, and the node is one client for session affinity.
    let flow = Flow {
        src_addr: [0; 4],
        dst_addr: ip.to_ne_bytes(),
        src_port: cookie as u16,
        dst_port: u16::from_be(port as u16),
        proto,
        tcp_flags: 0,
        l4_off: 0,
        l4_csum_off: 0,
    };
    let Some((_, backend)) = (match service::lookup_frontend(&flow) {
        Some(service) => service::choose_backend(&service, &flow),
        // A ClusterIP on a port its Service does not define is refused like one without
        // endpoints; any other address is not ours.
        None if service::is_cluster_ip(flow.dst_addr) => None,
        None => return true,
    }) else {
        // SAFETY: a plain helper call; connect4 and sendmsg4 may set the error.
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
    let _ = SB_SOCK_REVNAT.insert(key, frontend, 0);
    // SAFETY: as above; the kernel lets these two fields be written, as whole words.
    unsafe {
        (*addr).user_ip4 = u32::from_ne_bytes(backend.addr);
        (*addr).user_port = u32::from(backend.port.to_be());
    }
    true
}

/// recvmsg()/getpeername() of a translated socket: the backend reads as the service again.
#[inline(always)]
pub fn restore_peer(ctx: &SockAddrContext) {
    let addr = ctx.sock_addr;
    // SAFETY: as in translate_destination.
    let (family, ip, port) = unsafe { ((*addr).user_family, (*addr).user_ip4, (*addr).user_port) };
    if family != AF_INET || !in_node_netns(ctx) {
        return;
    }
    let key = SockRevKey {
        // SAFETY: as above.
        cookie: unsafe { bpf_get_socket_cookie(addr.cast()) },
        addr: ip.to_ne_bytes(),
        port: u16::from_be(port as u16),
        pad: 0,
        pad_addr: Default::default(),
    };
    // SAFETY: copied out at once.
    if let Some(frontend) = unsafe { SB_SOCK_REVNAT.get(key).copied() } {
        // SAFETY: as above.
        unsafe {
            (*addr).user_ip4 = u32::from_ne_bytes(frontend.addr);
            (*addr).user_port = u32::from(frontend.port.to_be());
        }
    }
}
