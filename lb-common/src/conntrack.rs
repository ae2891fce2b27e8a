//! Connection tracking entries: a flow's 5-tuple in each direction, and what it maps to.
use crate::{Address, BackendId, Ipv4};

/// Which way a conntrack entry looks at a flow.
pub mod ct_direction {
    /// Client → frontend, keyed as the client sent it; maps to the chosen backend.
    pub const FORWARD: u8 = 0;
    /// Backend → client, keyed as the backend replies; maps back to the frontend.
    pub const REPLY: u8 = 1;
    /// Client → backend, keyed as a DNATed external flow leaves the node for another one; maps
    /// to the node address and port it takes as its source (unset until the first packet leaves).
    pub const SNAT_OUT: u8 = 2;
    /// Backend → node address and port, keyed as a source-NATed flow's reply arrives; maps back
    /// to the client.
    pub const SNAT_IN: u8 = 3;
}

/// [`CtEntry::flags`].
pub mod ct_flags {
    /// A TCP flow that has seen a FIN or a RST (an SCTP association an ABORT or SHUTDOWN
    /// COMPLETE): the agent forgets it a short while after its last packet instead of after the
    /// long established timeout.
    pub const CLOSING: u16 = 1;

    /// TCP header flag bits, as on the wire.
    pub const TCP_FIN: u8 = 0x01;
    pub const TCP_SYN: u8 = 0x02;
    pub const TCP_RST: u8 = 0x04;
    pub const TCP_ACK: u8 = 0x10;

    /// An entry's flags after a TCP segment with `tcp_flags`: a FIN or RST marks the flow
    /// closing; a pure SYN reopens it (the client reused the 5-tuple for a new connection).
    #[inline(always)]
    pub fn after_tcp_segment(flags: u16, tcp_flags: u8) -> u16 {
        if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            flags | CLOSING
        } else if tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
            flags & !CLOSING
        } else {
            flags
        }
    }
}

/// A flow's 5-tuple as seen in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey<A: Address = Ipv4> {
    pub src_addr: A,
    pub dst_addr: A,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub direction: u8,
    pub pad: [u8; 2],
}

/// A conntrack entry. For [`ct_direction::FORWARD`] `nat_*` is the backend the flow was given;
/// for [`ct_direction::REPLY`] it is the frontend the client dialled.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry<A: Address = Ipv4> {
    pub service_id: u32,
    pub backend_id: BackendId,
    pub nat_addr: A,
    pub nat_port: u16,
    /// [`ct_flags`].
    pub flags: u16,
    pub pad: A::Pad,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last packet in this direction, refreshed
    /// at most once a second.
    pub last_seen_ns: u64,
}

#[cfg(test)]
mod tests {
    use super::ct_flags::*;

    #[test]
    fn fin_and_rst_mark_a_flow_closing_and_a_new_syn_reopens_it() {
        assert_eq!(after_tcp_segment(0, TCP_SYN), 0);
        assert_eq!(after_tcp_segment(0, TCP_ACK), 0);
        assert_eq!(after_tcp_segment(0, TCP_FIN | TCP_ACK), CLOSING);
        assert_eq!(after_tcp_segment(0, TCP_RST), CLOSING);
        assert_eq!(
            after_tcp_segment(CLOSING, TCP_ACK),
            CLOSING,
            "the last ACK stays closing"
        );
        assert_eq!(
            after_tcp_segment(CLOSING, TCP_SYN | TCP_ACK),
            CLOSING,
            "a SYN-ACK is no new connection"
        );
        assert_eq!(after_tcp_segment(CLOSING, TCP_SYN), 0, "the tuple reused");
    }
}
