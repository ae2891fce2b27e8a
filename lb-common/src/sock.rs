//! What the socket hooks remember: which frontend a socket of the node asked for.
use crate::{Address, Ipv4};

/// A backend a socket of the node was sent to: (socket cookie, backend address and port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevKey<A: Address = Ipv4> {
    pub cookie: u64,
    pub addr: A,
    pub port: u16,
    pub pad: u16,
    pub pad_addr: A::Pad,
}

/// The service frontend that socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevEntry<A: Address = Ipv4> {
    pub addr: A,
    pub port: u16,
    pub pad: u16,
}
