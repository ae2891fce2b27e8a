//! Fragmented datagrams: only the first fragment carries the transport header, so the datapath
//! remembers its ports under the datagram's identity (as Cilium's fragment map does) and gives
//! the later fragments the same translation.
use crate::{Address, Ipv4};

/// A datagram's identity, as the receiver's reassembly sees it (RFC 791, RFC 8200 §4.5): its
/// addresses, transport protocol and fragment identification (IPv4's 16 bits widened, IPv6's
/// 32).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey<A: Address = Ipv4> {
    pub src_addr: A,
    pub dst_addr: A,
    pub id: u32,
    pub proto: u8,
    pub pad: [u8; 3],
}

/// The ports the datagram's first fragment carries (host order, as conntrack keys hold them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentPorts {
    pub src_port: u16,
    pub dst_port: u16,
}
