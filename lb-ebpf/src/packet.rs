//! Parsing: just enough of Ethernet, IPv4 and TCP/UDP to find a flow's 5-tuple and the offsets
//! NAT rewrites. Whatever cannot be parsed in full is not ours and passes untouched.
use lb_common::{IPPROTO_TCP, IPPROTO_UDP};

use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::context::Packet;

/// Byte offset of the IPv4 header checksum.
pub const IPV4_CSUM_OFF: usize = EthHdr::LEN + 10;
pub const IPV4_SRC_OFF: usize = EthHdr::LEN + 12;
pub const IPV4_DST_OFF: usize = EthHdr::LEN + 16;

const IPV4_MORE_FRAGMENTS: u8 = 0b001;

pub struct Flow {
    pub src_addr: [u8; 4],
    pub dst_addr: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// TCP header flags as on the wire (`lb_common::ct_flags::TCP_*`); 0 for UDP.
    pub tcp_flags: u8,
    /// Offset of the L4 header (IHL honoured).
    pub l4_off: usize,
    /// Offset of the L4 checksum.
    pub l4_csum_off: usize,
}

impl Flow {
    pub fn is_udp(&self) -> bool {
        self.proto == IPPROTO_UDP
    }
}

#[inline(always)]
pub fn parse_ipv4(ctx: &impl Packet) -> Option<Flow> {
    let eth: EthHdr = ctx.load(0)?;
    if eth.ether_type != EtherType::Ipv4 as u16 {
        return None;
    }
    let ip: Ipv4Hdr = ctx.load(EthHdr::LEN)?;
    let ihl = usize::from(ip.ihl());
    if ip.version() != 4 || ihl < Ipv4Hdr::LEN {
        return None;
    }
    // Only an unfragmented packet carries both ports; fragments pass to the kernel.
    if ip.frag_offset() != 0 || ip.frag_flags() & IPV4_MORE_FRAGMENTS != 0 {
        return None;
    }
    let l4_off = EthHdr::LEN + ihl;
    // The whole L4 header must be there (and inside the IP packet), not just the fields NAT
    // touches: a cut header is not ours to rewrite.
    let (src_port, dst_port, l4_csum_off, l4_len, tcp_flags) = match ip.proto {
        IPPROTO_TCP => {
            let tcp: TcpHdr = ctx.load(l4_off)?;
            if tcp.doff() < 5 {
                return None;
            }
            let flags = tcp.fin() | tcp.syn() << 1 | tcp.rst() << 2 | tcp.ack() << 4;
            (tcp.source, tcp.dest, l4_off + 16, TcpHdr::LEN, flags as u8)
        }
        IPPROTO_UDP => {
            let udp: UdpHdr = ctx.load(l4_off)?;
            (udp.src, udp.dst, l4_off + 6, UdpHdr::LEN, 0)
        }
        _ => return None,
    };
    if usize::from(ip.tot_len()) < ihl + l4_len {
        return None;
    }
    Some(Flow {
        src_addr: ip.src_addr,
        dst_addr: ip.dst_addr,
        src_port: u16::from_be_bytes(src_port),
        dst_port: u16::from_be_bytes(dst_port),
        proto: ip.proto,
        tcp_flags,
        l4_off,
        l4_csum_off,
    })
}
