//! ICMP and ICMPv6 errors about a client's packet as DNATed (client → backend), on their way back
//! to the client (`to_pod` only): translated as netfilter translates them, so that the client's
//! socket, which knows only the frontend, takes the error as its own. A frame qualifies when it
//! is a whole, untagged IPv4 (no options, not a fragment) or IPv6 (ICMPv6 right after the fixed
//! header) packet carrying a destination unreachable, packet too big, time exceeded or parameter
//! problem with a right checksum, that quotes a TCP, UDP or SCTP packet of its own family, the
//! quoted IP header and 8 bytes at least, whose reply tuple is a tracked flow's; the message is
//! shorter than 1280 bytes (an error quotes at most what keeps it within IPv6's minimum MTU,
//! RFC 4443, and IPv4 routers quote less, RFC 1812). Then the quoted
//! destination becomes the frontend, and so does the outer source when it is the backend itself.
use std::ops::Range;

use lb_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

use super::{
    Outcome, Run, TC_ACT_OK,
    parse::{ETH_LEN, Tuple, addr_from, family_of, fixed_header_len},
};
use crate::{
    checksum,
    topology::{Endpoint, Family},
};

const ICMP_HEADER_LEN: usize = 8;
/// Destination unreachable, time exceeded, parameter problem (RFC 792).
const ICMP_ERRORS: [u8; 3] = [3, 11, 12];
/// Destination unreachable, packet too big, time exceeded, parameter problem (RFC 4443).
const ICMPV6_ERRORS: [u8; 4] = [1, 2, 3, 4];
/// What an error must quote of the transport header: the ports (RFC 792).
const QUOTED_L4_MIN: usize = 8;
/// A quoted TCP checksum is updated only when the quote holds the whole fixed TCP header, as
/// netfilter's `tcp_manip_pkt` does (not merely the checksum field, 18 bytes).
const TCP_HEADER_LEN: usize = 20;
/// Longer ICMP messages are no error a router or host sends, and are left as they are.
const MESSAGE_MAX: usize = 1279;

/// A translatable error's layout in the frame, and the quoted packet's tuple.
pub struct IcmpError {
    family: Family,
    /// Offset of the ICMP (ICMPv6) header; the message runs to the frame's end.
    icmp: usize,
    /// Offset of the quoted IP header and of its transport header.
    quoted: usize,
    quoted_l4: usize,
    /// The quoted packet: client → backend.
    src: Endpoint,
    dst: Endpoint,
    proto: u8,
}

impl IcmpError {
    /// The flow's reply tuple (backend → client), as the model keys replies.
    pub fn reply_tuple(&self) -> Tuple {
        (self.dst, self.src, self.proto)
    }

    fn addr_len(&self) -> usize {
        match self.family {
            Family::Ipv4 => 4,
            Family::Ipv6 => 16,
        }
    }

    /// Where the source address lies of the IP header at `ip` (the outer or the quoted one).
    fn src_addr_at(&self, ip: usize) -> Range<usize> {
        let at = ip + if self.family == Family::Ipv4 { 12 } else { 8 };
        at..at + self.addr_len()
    }

    /// Likewise the destination address.
    fn dst_addr_at(&self, ip: usize) -> Range<usize> {
        let src = self.src_addr_at(ip);
        src.end..src.end + self.addr_len()
    }

    fn quoted_dst_port_at(&self) -> Range<usize> {
        self.quoted_l4 + 2..self.quoted_l4 + 4
    }

    /// The quoted TCP or UDP checksum when a translation must update it: UDP's unless zero
    /// ("none"), TCP's when the whole fixed header is quoted; SCTP's CRC32c is left alone.
    fn updated_l4_checksum_at(&self, frame: &[u8]) -> Option<Range<usize>> {
        let held = frame.len() - self.quoted_l4;
        match self.proto {
            IPPROTO_UDP if frame[self.quoted_l4 + 6..self.quoted_l4 + 8] != [0, 0] => {
                Some(self.quoted_l4 + 6..self.quoted_l4 + 8)
            }
            IPPROTO_TCP if held >= TCP_HEADER_LEN => Some(self.quoted_l4 + 16..self.quoted_l4 + 18),
            _ => None,
        }
    }
}

/// The error in `frame` if it is one `to_pod` translates when its tuple is tracked (rules 1–3).
pub fn parse(frame: &[u8]) -> Option<IcmpError> {
    let family = family_of(frame)?;
    let ip = frame.get(ETH_LEN..)?;
    let header_len = fixed_header_len(family);
    if ip.len() < header_len {
        return None;
    }
    let whole = match family {
        Family::Ipv4 => {
            ip[0] == 0x45
                && usize::from(u16::from_be_bytes([ip[2], ip[3]])) == ip.len()
                && u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff == 0
                && ip[9] == IPPROTO_ICMP
        }
        Family::Ipv6 => {
            ip[0] >> 4 == 6
                && header_len + usize::from(u16::from_be_bytes([ip[4], ip[5]])) == ip.len()
                && ip[6] == IPPROTO_ICMPV6
        }
    };
    let icmp = ETH_LEN + header_len;
    let message = &frame[icmp..];
    if !whole || !(ICMP_HEADER_LEN..=MESSAGE_MAX).contains(&message.len()) || !is_error(family, message[0]) {
        return None;
    }
    if icmp_sum(family, frame, icmp) != 0xffff {
        return None;
    }
    let quoted = icmp + ICMP_HEADER_LEN;
    let (proto, quoted_l4) = quoted_header(family, &frame[quoted..])?;
    let quoted_l4 = quoted + quoted_l4;
    if frame.len() < quoted_l4 + QUOTED_L4_MIN {
        return None;
    }
    let mut error = IcmpError {
        family,
        icmp,
        quoted,
        quoted_l4,
        src: (addr_from(&[0; 4]), 0),
        dst: (addr_from(&[0; 4]), 0),
        proto,
    };
    let port = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
    error.src = (addr_from(&frame[error.src_addr_at(quoted)]), port(quoted_l4));
    error.dst = (addr_from(&frame[error.dst_addr_at(quoted)]), port(quoted_l4 + 2));
    Some(error)
}

fn is_error(family: Family, kind: u8) -> bool {
    match family {
        Family::Ipv4 => ICMP_ERRORS.contains(&kind),
        Family::Ipv6 => ICMPV6_ERRORS.contains(&kind),
    }
}

/// The quoted packet's transport protocol and the offset of its transport header, if it is a
/// TCP, UDP or SCTP packet of `family` (IPv4: not a later fragment; IPv6: no extension header).
fn quoted_header(family: Family, quoted: &[u8]) -> Option<(u8, usize)> {
    let (version, proto, header_len) = match family {
        Family::Ipv4 => {
            let header = quoted.get(..20)?;
            if u16::from_be_bytes([header[6], header[7]]) & 0x1fff != 0 {
                return None;
            }
            (4, header[9], usize::from(header[0] & 0x0f) * 4)
        }
        Family::Ipv6 => {
            let header = quoted.get(..40)?;
            (6, header[6], 40)
        }
    };
    let transport = [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP].contains(&proto);
    (quoted[0] >> 4 == version && header_len >= 20 && transport).then_some((proto, header_len))
}

/// The folded sum over the ICMP message (ICMPv6: and its pseudo-header): 0xffff when right.
fn icmp_sum(family: Family, frame: &[u8], icmp: usize) -> u16 {
    let start = match family {
        Family::Ipv4 => 0,
        Family::Ipv6 => checksum::pseudo_header(
            &frame[ETH_LEN + 8..ETH_LEN + 24],
            &frame[ETH_LEN + 24..ETH_LEN + 40],
            IPPROTO_ICMPV6,
            (frame.len() - icmp) as u16,
        ),
    };
    checksum::fold(checksum::add(start, &frame[icmp..]))
}

/// Checks the translation of `error` for the flow dialled at `frontend`: the quoted destination
/// (and the outer source, when the backend itself reports) is the frontend, nothing else changed
/// but the checksums, which follow.
pub fn check_translation(error: &IcmpError, run: &Run, frontend: Endpoint) -> Result<Outcome, String> {
    run.expect(TC_ACT_OK)?;
    let (input, output) = (run.input, run.output);
    if output.len() != input.len() {
        return Err(format!(
            "ICMP error: length {} became {}",
            input.len(),
            output.len()
        ));
    }
    let frontend_addr = &octets(frontend.0)[..error.addr_len()];
    let mut expected = input.to_vec();
    expected[error.dst_addr_at(error.quoted)].copy_from_slice(frontend_addr);
    expected[error.quoted_dst_port_at()].copy_from_slice(&frontend.1.to_be_bytes());
    let backend_reports = input[error.src_addr_at(ETH_LEN)] == input[error.dst_addr_at(error.quoted)];
    if backend_reports {
        expected[error.src_addr_at(ETH_LEN)].copy_from_slice(frontend_addr);
    }
    let mut checksums = Vec::with_capacity(4);
    checksums.push(error.icmp + 2..error.icmp + 4);
    if error.family == Family::Ipv4 {
        checksums.extend([ETH_LEN + 10..ETH_LEN + 12, error.quoted + 10..error.quoted + 12]);
    }
    checksums.extend(error.updated_l4_checksum_at(input));
    if let Some(at) =
        (0..input.len()).find(|&at| output[at] != expected[at] && !checksums.iter().any(|r| r.contains(&at)))
    {
        return Err(format!(
            "ICMP error: byte {at} is {:#04x}, expected {:#04x} (was {:#04x})",
            output[at], expected[at], input[at]
        ));
    }
    check_checksums(error, input, output)?;
    Ok(Outcome::IcmpErrorTranslated)
}

/// The outer and quoted IPv4 header checksums as right or wrong as before, the quoted TCP or UDP
/// checksum following the address and port (a UDP one not becoming 0), the ICMP checksum right.
fn check_checksums(error: &IcmpError, input: &[u8], output: &[u8]) -> Result<(), String> {
    let same_sum = |at: Range<usize>| {
        checksum::fold(checksum::add(0, &input[at.clone()])) == checksum::fold(checksum::add(0, &output[at]))
    };
    if error.family == Family::Ipv4 {
        if !same_sum(ETH_LEN..error.icmp) {
            return Err("ICMP error: outer IPv4 header checksum not updated to match".into());
        }
        if !same_sum(error.quoted..error.quoted_l4) {
            return Err("ICMP error: quoted IPv4 header checksum not updated to match".into());
        }
    }
    if let Some(at) = error.updated_l4_checksum_at(input) {
        // The pseudo-header's addresses, the ports and the checksum: all the translation touches
        // of what the checksum covers.
        let covered = |frame: &[u8]| {
            let addrs = error.src_addr_at(error.quoted).start..error.dst_addr_at(error.quoted).end;
            let addrs = checksum::add(0, &frame[addrs]);
            let ports = checksum::add(addrs, &frame[error.quoted_l4..error.quoted_l4 + 4]);
            checksum::fold(checksum::add(ports, &frame[at.clone()]))
        };
        let name = if error.proto == IPPROTO_UDP { "UDP" } else { "TCP" };
        if covered(input) != covered(output) {
            return Err(format!("ICMP error: quoted {name} checksum not updated to match"));
        }
        if error.proto == IPPROTO_UDP && output[at] == [0, 0] {
            return Err("ICMP error: quoted UDP checksum became 0".into());
        }
    }
    if icmp_sum(error.family, output, error.icmp) != 0xffff {
        return Err("ICMP error: its checksum is not right".into());
    }
    Ok(())
}

fn octets(addr: std::net::IpAddr) -> [u8; 16] {
    match addr {
        std::net::IpAddr::V4(addr) => {
            let mut bytes = [0; 16];
            bytes[..4].copy_from_slice(&addr.octets());
            bytes
        }
        std::net::IpAddr::V6(addr) => addr.octets(),
    }
}
