//! The Internet checksum (RFC 1071), written here rather than taken from `lb_common` so that the
//! datapath's arithmetic is checked against code it does not share; SCTP's CRC32c from the `crc`
//! crate, for the same reason.

const CASTAGNOLI: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// Where an SCTP packet's checksum lies (after the ports and the verification tag).
pub const SCTP_CRC_AT: std::ops::Range<usize> = 8..12;

/// The CRC32c of an SCTP packet (RFC 9260 §6.8), its checksum field taken as zero: the field's
/// right value, little-endian.
pub fn sctp_crc(sctp: &[u8]) -> [u8; 4] {
    let mut digest = CASTAGNOLI.digest();
    digest.update(&sctp[..SCTP_CRC_AT.start]);
    digest.update(&[0; 4]);
    digest.update(&sctp[SCTP_CRC_AT.end..]);
    digest.finalize().to_le_bytes()
}

/// The one's complement sum of `bytes` as big-endian 16-bit words added to `acc`, not folded.
pub fn add(mut acc: u32, bytes: &[u8]) -> u32 {
    let mut words = bytes.chunks_exact(2);
    for word in &mut words {
        acc += u32::from(u16::from_be_bytes([word[0], word[1]]));
    }
    if let [last] = words.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

/// `acc` folded to 16 bits. Over data that includes a correct checksum field this is 0xffff.
pub fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The checksum to store in a field (zero while summing) so that the folded sum is 0xffff.
pub fn of(acc: u32) -> u16 {
    !fold(acc)
}

/// The pseudo-header TCP, UDP and ICMPv6 checksums cover, of either family (4- or 16-byte
/// addresses): addresses, protocol, length (IPv6's 32-bit length sums alike for any `u16`).
pub fn pseudo_header(src: &[u8], dst: &[u8], proto: u8, len: u16) -> u32 {
    add(add(0, src), dst) + u32::from(proto) + u32::from(len)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc_1071_example() {
        // RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (folded).
        let bytes = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(super::fold(super::add(0, &bytes)), 0xddf2);
    }
}
