//! SCTP's checksum: a CRC32c over the SCTP packet alone (RFC 9260 §6.8, Appendix A). It does not
//! cover the IP addresses, so a DNAT that keeps the port leaves it valid; a port rewrite must
//! update it, without reading the whole packet.
//!
//! A CRC is affine in its message: for messages of one length, `crc(m ^ d) = crc(m) ^ raw(d)`,
//! where `raw` is the CRC without its initial value and final xor. A port changed at `offset` of
//! an `len`-byte packet is a `d` that is zero but for two bytes, so `raw(d)` is the raw CRC of
//! those two bytes carried over the `len - offset - 2` zero bytes after them: a multiplication by
//! `x^(8k)` modulo the polynomial, from a table of `x^(8·2^i)` (as zlib's `crc32_combine`
//! does). Bounded loops only, so the datapath runs the same code.

/// The Castagnoli polynomial, bit-reflected (bit 31 is the coefficient of x^0).
const POLY: u32 = 0x82f6_3b78;

/// `a(x)·b(x) mod P(x)` in the reflected representation.
#[inline(always)]
const fn multiply(a: u32, mut b: u32) -> u32 {
    let mut product = 0;
    let mut bit = 0;
    while bit < 32 {
        if a & (1 << (31 - bit)) != 0 {
            product ^= b;
        }
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
        bit += 1;
    }
    product
}

/// `x^(8·2^i) mod P` for `i` in `0..16`: shifts over up to 65535 bytes, an IP packet's most.
const BYTE_SHIFTS: [u32; 16] = {
    let mut table = [0; 16];
    // x^8, in the reflected representation.
    let mut power = 1 << (31 - 8);
    let mut i = 0;
    while i < 16 {
        table[i] = power;
        power = multiply(power, power);
        i += 1;
    }
    table
};

/// The raw CRC (no initial value, no final xor) of `bytes` followed by `zeros` zero bytes.
#[inline(always)]
fn raw_crc(bytes: &[u8], zeros: u32) -> u32 {
    let mut crc = 0u32;
    let mut i = 0;
    while i < bytes.len() {
        crc ^= u32::from(bytes[i]);
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ POLY } else { crc >> 1 };
            bit += 1;
        }
        i += 1;
    }
    let mut i = 0;
    while i < BYTE_SHIFTS.len() {
        if zeros & (1 << i) != 0 {
            crc = multiply(crc, BYTE_SHIFTS[i]);
        }
        i += 1;
    }
    crc
}

/// The CRC32c of a `len`-byte message whose CRC was `crc` after the 16-bit field at `offset`
/// changed from `old` to `new` (both in network order as they lie in the message).
#[inline(always)]
pub fn crc32c_replace_u16(crc: u32, offset: usize, len: usize, old: u16, new: u16) -> u32 {
    let delta = (old ^ new).to_be_bytes();
    let after = len.saturating_sub(offset + 2) as u32;
    crc ^ raw_crc(&delta, after)
}

/// Byte offset of the checksum in the SCTP common header (after the two ports and the
/// verification tag).
pub const SCTP_CHECKSUM_OFFSET: usize = 8;

/// The SCTP checksum field (as it lies in the packet: the CRC32c little-endian) after the port
/// at `port_offset` (0: source, 2: destination) of a `len`-byte SCTP packet changed from `old`
/// to `new`. A zero field is left zero: the sender's stack left the CRC to a later stage
/// (checksum offload, `CHECKSUM_PARTIAL`), which computes it over the rewritten packet.
#[inline(always)]
pub fn sctp_checksum_after_port_change(
    field: [u8; 4],
    port_offset: usize,
    len: usize,
    old: u16,
    new: u16,
) -> [u8; 4] {
    if field == [0; 4] || old == new {
        return field;
    }
    crc32c_replace_u16(u32::from_le_bytes(field), port_offset, len, old, new).to_le_bytes()
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    const CASTAGNOLI: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

    /// An SCTP packet with a valid checksum: ports, a verification tag, and `chunks`.
    fn sctp_packet(src_port: u16, dst_port: u16, chunks: &[u8]) -> Vec<u8> {
        let mut packet = Vec::new();
        packet.extend_from_slice(&src_port.to_be_bytes());
        packet.extend_from_slice(&dst_port.to_be_bytes());
        packet.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        packet.extend_from_slice(&[0; 4]);
        packet.extend_from_slice(chunks);
        let crc = CASTAGNOLI.checksum(&packet);
        packet[SCTP_CHECKSUM_OFFSET..SCTP_CHECKSUM_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
        packet
    }

    #[test]
    fn the_known_answer_of_rfc_3720() {
        // iSCSI's CRC32c test vector: 32 bytes of zeros.
        assert_eq!(CASTAGNOLI.checksum(&[0; 32]), 0x8a91_36aa);
        let mut crc = !0u32;
        for byte in [0u8; 32] {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ POLY } else { crc >> 1 };
            }
        }
        assert_eq!(!crc, 0x8a91_36aa, "POLY is the reflected Castagnoli polynomial");
    }

    /// A port rewritten in place gives the checksum a full recomputation gives, at every packet
    /// length up to a jumbo frame's and beyond, for either port.
    #[test]
    fn a_port_change_updates_the_checksum_as_a_recomputation_would() {
        let mut chunks = Vec::new();
        for len in [0usize, 1, 3, 4, 16, 20, 255, 1452, 9000, 65_000] {
            chunks.resize(len, 0);
            for (i, byte) in chunks.iter_mut().enumerate() {
                *byte = (i * 7 + len) as u8;
            }
            let before = sctp_packet(40000, 80, &chunks);
            for (port_offset, after) in [
                (2, sctp_packet(40000, 3000, &chunks)),
                (0, sctp_packet(61000, 80, &chunks)),
            ] {
                let field: [u8; 4] = before[8..12].try_into().unwrap();
                let (old, new) = if port_offset == 2 {
                    (80, 3000)
                } else {
                    (40000, 61000)
                };
                assert_eq!(
                    sctp_checksum_after_port_change(field, port_offset, before.len(), old, new),
                    after[8..12],
                    "{} chunk bytes, port at {port_offset}",
                    chunks.len()
                );
            }
        }
    }

    #[test]
    fn an_offloaded_checksum_stays_zero_and_an_unchanged_port_changes_nothing() {
        assert_eq!(sctp_checksum_after_port_change([0; 4], 2, 100, 80, 3000), [0; 4]);
        assert_eq!(
            sctp_checksum_after_port_change([1, 2, 3, 4], 2, 100, 80, 80),
            [1, 2, 3, 4]
        );
    }
}
