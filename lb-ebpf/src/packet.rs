//! Parsing: just enough of Ethernet, IPv4 and TCP/UDP to find a flow's 5-tuple and the offsets
//! NAT rewrites. Whatever cannot be parsed in full is not ours and passes untouched.
use lb_common::{IPPROTO_TCP, IPPROTO_UDP, flow_hash};

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

    /// The 5-tuple's hash, the same on every node (see `lb_common::flow_hash`).
    #[inline(always)]
    pub fn hash(&self) -> u32 {
        flow_hash(
            self.src_addr,
            self.dst_addr,
            self.src_port,
            self.dst_port,
            self.proto,
        )
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
    // A packet longer than its frame was cut on the way, and one whose TCP data offset or UDP
    // length runs past its end is malformed: neither is ours to rewrite (the kernel drops both).
    let ip_len = usize::from(ip.tot_len());
    if ip_len > ctx.len().saturating_sub(EthHdr::LEN) {
        return None;
    }
    let l4_off = EthHdr::LEN + ihl;
    let (src_port, dst_port, l4_csum_off, l4_len, tcp_flags) = match ip.proto {
        IPPROTO_TCP => {
            let tcp: TcpHdr = ctx.load(l4_off)?;
            let flags = tcp.fin() | tcp.syn() << 1 | tcp.rst() << 2 | tcp.ack() << 4;
            (
                tcp.source,
                tcp.dest,
                l4_off + 16,
                usize::from(tcp.doff()) * 4,
                flags as u8,
            )
        }
        IPPROTO_UDP => {
            let udp: UdpHdr = ctx.load(l4_off)?;
            (udp.src, udp.dst, l4_off + 6, usize::from(udp.len()), 0)
        }
        _ => return None,
    };
    // The TCP header with its options, or the UDP datagram as long as its header says, must fit
    // in the IP packet (the loads above only checked that the fixed header is in the frame).
    let min_len = if ip.proto == IPPROTO_TCP {
        TcpHdr::LEN
    } else {
        UdpHdr::LEN
    };
    if l4_len < min_len || ip_len < ihl + l4_len {
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
