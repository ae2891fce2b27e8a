//! Internet checksum arithmetic (RFC 1071, RFC 1624), plain functions over bytes so the host's
//! tests cover what the datapath runs.

/// `checksum` (an RFC 1071 checksum as stored) after the bytes `old` of the data it covers were
/// replaced by `new` (RFC 1624, eq. 3). Both must have the same even length.
#[inline(always)]
pub fn checksum_replace(checksum: u16, old: &[u8], new: &[u8]) -> u16 {
    let mut sum = u32::from(!checksum);
    let mut i = 0;
    while i + 1 < old.len() && i + 1 < new.len() {
        sum += u32::from(!u16::from_be_bytes([old[i], old[i + 1]]));
        sum += u32::from(u16::from_be_bytes([new[i], new[i + 1]]));
        i += 2;
    }
    checksum_fold(sum)
}

/// The Internet checksum (RFC 1071) of `bytes` added to `sum`, not yet folded.
#[inline(always)]
pub fn checksum_add(mut sum: u32, bytes: &[u8]) -> u32 {
    // Read by 32-bit words: the eBPF backend keeps an address read this way in whole words,
    // where 16-bit reads would split it into twice as many registers (and stack slots).
    let (words, rest) = bytes.as_chunks::<4>();
    for word in words {
        let word = u32::from_be_bytes(*word);
        sum += (word >> 16) + (word & 0xffff);
    }
    let (pairs, last) = rest.as_chunks::<2>();
    for pair in pairs {
        sum += u32::from(u16::from_be_bytes(*pair));
    }
    if let [byte] = last {
        sum += u32::from(*byte) << 8;
    }
    sum
}

/// Folds a 32-bit sum into the one's complement 16-bit checksum.
#[inline(always)]
pub fn checksum_fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of RFC 1071 §3, and an IPv4 header whose checksum verifies to zero.
    #[test]
    fn internet_checksum() {
        let sum = checksum_add(0, &[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]);
        assert_eq!(checksum_fold(sum), !0xddf2);
        let header = [
            0x45, 0, 0, 0x73, 0, 0, 0x40, 0, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0, 1, 0xc0, 0xa8, 0, 0xc7,
        ];
        assert_eq!(
            checksum_fold(checksum_add(0, &header)),
            0,
            "a correct header sums to zero"
        );
    }

    /// An incremental update agrees with a checksum computed from scratch, for an address and
    /// for a port.
    #[test]
    fn checksum_replace_matches_a_full_recomputation() {
        let mut header = [
            0x45, 0, 0, 0x73, 0, 0, 0x40, 0, 0x40, 0x11, 0, 0, 0xc0, 0xa8, 0, 1, 0xc0, 0xa8, 0, 0xc7,
        ];
        let check = checksum_fold(checksum_add(0, &header));
        header[10..12].copy_from_slice(&check.to_be_bytes());
        let updated = checksum_replace(check, &[0xc0, 0xa8, 0, 0xc7], &[10, 244, 2, 17]);
        header[16..20].copy_from_slice(&[10, 244, 2, 17]);
        header[10..12].copy_from_slice(&updated.to_be_bytes());
        assert_eq!(
            checksum_fold(checksum_add(0, &header)),
            0,
            "the updated header verifies"
        );
        header[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(updated, checksum_fold(checksum_add(0, &header)));
        assert_eq!(
            checksum_replace(0x1234, &[0, 80], &[0, 80]),
            0x1234,
            "no change, same sum"
        );
    }
}
