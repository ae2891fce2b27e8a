//! Translated packets: what may change, and how the checksums must follow.
use std::ops::Range;

use lb_common::{IPPROTO_SCTP, IPPROTO_UDP};

use super::{
    Run,
    parse::{ETH_LEN, Packet, Side, addr_from},
};
use crate::{checksum, topology::Endpoint};

/// Checks that `output` is `input` with one side's address and port replaced and the checksums
/// updated (see [`check_checksums`]), and returns the new address and port.
pub fn check_rewrite(packet: &Packet, run: &Run, side: Side) -> Result<Endpoint, String> {
    let (input, output) = (run.input, run.output);
    if output.len() != input.len() {
        return Err(format!("length {} became {}", input.len(), output.len()));
    }
    let mut rewritten = vec![packet.addr_at(side)];
    if packet.has_transport_header() {
        rewritten.extend([packet.port_at(side), packet.l4_checksum_at()]);
    }
    rewritten.extend(packet.header_checksum_at());
    if let Some(at) = changed_outside(input, output, &rewritten) {
        return Err(format!(
            "byte {at} changed, outside the address, port and checksums"
        ));
    }
    check_checksums(packet, input, output)?;
    if packet.has_transport_header() {
        Ok(packet.endpoint_in(output, side))
    } else {
        // A later fragment: payload after its headers, its port the datagram's.
        let port = match side {
            Side::Source => packet.src.1,
            Side::Destination => packet.dst.1,
        };
        Ok((addr_from(&output[packet.addr_at(side)]), port))
    }
}

/// A hairpinned packet: sent back (MACs swapped, redirected), both addresses and ports now
/// `(source, destination)`, nothing else changed, and each checksum as right or wrong as before.
pub fn check_hairpin(
    packet: &Packet,
    run: &Run,
    (source, destination): (Endpoint, Endpoint),
) -> Result<(), String> {
    run.expect(super::TC_ACT_REDIRECT)?;
    let (input, output) = (run.input, run.output);
    if output.len() != input.len() {
        return Err(format!("length {} became {}", input.len(), output.len()));
    }
    if output[..6] != input[6..12] || output[6..12] != input[..6] {
        return Err("hairpin: MACs not swapped".into());
    }
    let src = addr_from(&output[packet.addr_at(Side::Source)]);
    let dst = addr_from(&output[packet.addr_at(Side::Destination)]);
    let ports_agree = !packet.has_transport_header()
        || (
            packet.endpoint_in(output, Side::Source),
            packet.endpoint_in(output, Side::Destination),
        ) == (source, destination);
    if (src, dst) != (source.0, destination.0) || !ports_agree {
        return Err(format!(
            "hairpin: {src:?} → {dst:?}, expected {source:?} → {destination:?}"
        ));
    }
    let mut rewritten = vec![
        0..12,
        packet.addr_at(Side::Source),
        packet.addr_at(Side::Destination),
    ];
    if packet.has_transport_header() {
        rewritten.extend([packet.l4..packet.l4 + 4, packet.l4_checksum_at()]);
    }
    rewritten.extend(packet.header_checksum_at());
    if let Some(at) = changed_outside(input, output, &rewritten) {
        return Err(format!("hairpin: byte {at} changed"));
    }
    check_checksums(packet, input, output).map_err(|error| format!("hairpin: {error}"))
}

fn changed_outside(input: &[u8], output: &[u8], rewritten: &[Range<usize>]) -> Option<usize> {
    (0..input.len()).find(|at| input[*at] != output[*at] && !rewritten.iter().any(|r| r.contains(at)))
}

/// A checksum that was right must be right, one that was wrong must stay exactly as wrong (the
/// receiver still drops the packet), and a UDP checksum of 0 must stay 0 (none over IPv4; over
/// IPv6 forwarded as it is, RFC 6936 §5). A UDP checksum must not become 0. SCTP's CRC32c:
/// see [`check_sctp_crc`].
fn check_checksums(packet: &Packet, input: &[u8], output: &[u8]) -> Result<(), String> {
    if let Some(header) = packet.header_checksum_at().map(|_| ETH_LEN..packet.l4)
        && checksum::fold(checksum::add(0, &input[header.clone()]))
            != checksum::fold(checksum::add(0, &output[header]))
    {
        return Err("IPv4 header checksum not updated to match".into());
    }
    if !packet.has_transport_header() {
        return Ok(());
    }
    if packet.proto == IPPROTO_SCTP {
        return check_sctp_crc(packet, input, output);
    }
    let at = packet.l4_checksum_at();
    let udp = packet.proto == IPPROTO_UDP;
    if udp && input[at.clone()] == [0, 0] {
        if output[at] != [0, 0] {
            return Err("a UDP checksum of 0 was changed".into());
        }
        return Ok(());
    }
    if udp && output[at] == [0, 0] {
        return Err("a UDP checksum became 0".into());
    }
    if l4_sum(packet, input) != l4_sum(packet, output) {
        let name = if udp { "UDP" } else { "TCP" };
        return Err(format!("{name} checksum not updated to match"));
    }
    Ok(())
}

/// The folded sum over the pseudo-header and the L4 bytes the checksum covers, checksum field
/// included: 0xffff when the checksum is right. Of a first fragment, over the bytes it holds
/// (the rest of the datagram is the same before and after a translation).
fn l4_sum(packet: &Packet, frame: &[u8]) -> u16 {
    let l4 = &frame[packet.l4..packet.end];
    let len = if packet.proto == IPPROTO_UDP {
        usize::from(u16::from_be_bytes([l4[4], l4[5]]))
    } else {
        l4.len()
    };
    let pseudo = checksum::pseudo_header(
        &frame[packet.addr_at(Side::Source)],
        &frame[packet.addr_at(Side::Destination)],
        packet.proto,
        len as u16,
    );
    checksum::fold(checksum::add(pseudo, &l4[..len.min(l4.len())]))
}

/// SCTP's CRC32c covers the SCTP packet alone, not the addresses. A CRC is affine in its
/// message, so how far the field is from the right CRC (their XOR) says how right or wrong it
/// is: a translation must keep that distance (0 for a right CRC), whatever it did to the ports.
/// A zero field (left to offload) stays zero.
fn check_sctp_crc(packet: &Packet, input: &[u8], output: &[u8]) -> Result<(), String> {
    let at = packet.l4_checksum_at();
    if input[at.clone()] == [0; 4] {
        if output[at] != [0; 4] {
            return Err("an SCTP checksum of 0 was changed".into());
        }
        return Ok(());
    }
    let error = |frame: &[u8]| {
        let field = u32::from_le_bytes(frame[at.clone()].try_into().unwrap());
        field ^ u32::from_le_bytes(checksum::sctp_crc(packet.l4_bytes(frame)))
    };
    let (before, after) = (error(input), error(output));
    if before != after {
        return Err(format!(
            "SCTP checksum off by {after:#010x} from the right CRC32c, {before:#010x} before"
        ));
    }
    Ok(())
}
