//! Parsing: just enough of Ethernet, IPv4 and TCP/UDP to find a flow's 5-tuple and the offsets
//! NAT rewrites. Whatever cannot be parsed in full is not ours and passes untouched.
use aya_ebpf::programs::TcContext;
use lb_common::{IPPROTO_TCP, IPPROTO_UDP};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};

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
pub fn parse_ipv4(ctx: &TcContext) -> Option<Flow> {
    let eth: EthHdr = ctx.load(0).ok()?;
    if eth.ether_type != EtherType::Ipv4 as u16 {
        return None;
    }
    let ip: Ipv4Hdr = ctx.load(EthHdr::LEN).ok()?;
    let ihl = usize::from(ip.ihl());
    if ip.version() != 4 || ihl < Ipv4Hdr::LEN {
        return None;
    }
    // Only an unfragmented packet carries both ports; fragments pass to the kernel.
    if ip.frag_offset() != 0 || ip.frag_flags() & IPV4_MORE_FRAGMENTS != 0 {
        return None;
    }
    let l4_off = EthHdr::LEN + ihl;
    let l4_csum_off = match ip.proto {
        IPPROTO_TCP => l4_off + 16,
        IPPROTO_UDP => l4_off + 6,
        _ => return None,
    };
    let ports: [u8; 4] = ctx.load(l4_off).ok()?;
    // The checksum is the last field NAT writes: a packet too short to hold it is not rewritten.
    let _checksum: [u8; 2] = ctx.load(l4_csum_off).ok()?;
    Some(Flow {
        src_addr: ip.src_addr,
        dst_addr: ip.dst_addr,
        src_port: u16::from_be_bytes([ports[0], ports[1]]),
        dst_port: u16::from_be_bytes([ports[2], ports[3]]),
        proto: ip.proto,
        l4_off,
        l4_csum_off,
    })
}
