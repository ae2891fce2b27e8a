//! The flow hash Maglev and source-port probing use.
use crate::Address;

/// Hash of a flow's 5-tuple that every node computes alike (no per-boot seed), so the same flow
/// meets the same Maglev table position on any node. MurmurHash3's mixing steps, over each
/// 32-bit word of the addresses (one for IPv4, four for IPv6), then the ports and protocol.
#[inline(always)]
pub fn flow_hash<A: Address>(src_addr: A, dst_addr: A, src_port: u16, dst_port: u16, proto: u8) -> u32 {
    #[inline(always)]
    fn mix(hash: u32, word: u32) -> u32 {
        let k = word
            .wrapping_mul(0xcc9e_2d51)
            .rotate_left(15)
            .wrapping_mul(0x1b87_3593);
        (hash ^ k)
            .rotate_left(13)
            .wrapping_mul(5)
            .wrapping_add(0xe654_6b64)
    }
    #[inline(always)]
    fn mix_address(hash: u32, addr: &[u8]) -> u32 {
        let (words, _) = addr.as_chunks::<4>();
        words
            .iter()
            .fold(hash, |hash, word| mix(hash, u32::from_be_bytes(*word)))
    }
    let mut hash = mix_address(0x5b0a_2d9f, src_addr.as_ref());
    hash = mix_address(hash, dst_addr.as_ref());
    hash = mix(hash, (u32::from(src_port) << 16) | u32::from(dst_port));
    hash = mix(hash, u32::from(proto));
    hash ^= hash >> 16;
    hash = hash.wrapping_mul(0x85eb_ca6b);
    hash ^= hash >> 13;
    hash = hash.wrapping_mul(0xc2b2_ae35);
    hash ^ (hash >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_hash_is_stable_and_spreads() {
        // A pinned value: every node and every build must agree on it, or an upgrade would move
        // flows between backends.
        assert_eq!(
            flow_hash([10, 0, 0, 1], [10, 96, 0, 10], 40000, 80, 6),
            1_861_148_423
        );
        let buckets = (0..10_000u16).fold([0u32; 10], |mut buckets, port| {
            buckets[(flow_hash([10, 0, 0, 1], [10, 96, 0, 10], port, 80, 6) % 10) as usize] += 1;
            buckets
        });
        assert!(
            buckets.iter().all(|&n| (900..1100).contains(&n)),
            "ports spread evenly: {buckets:?}"
        );
        assert_ne!(
            flow_hash([10, 0, 0, 1], [10, 96, 0, 10], 1, 2, 6),
            flow_hash([10, 0, 0, 1], [10, 96, 0, 10], 2, 1, 6)
        );
    }

    #[test]
    fn ipv6_flow_hash_is_stable_and_uses_every_word() {
        let client: crate::Ipv6 = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let service: crate::Ipv6 = [0xfd, 0, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
        // Pinned, as the IPv4 value is.
        assert_eq!(flow_hash(client, service, 40000, 80, 6), 4_041_829_043);
        for byte in 0..16 {
            let mut other = client;
            other[byte] ^= 1;
            assert_ne!(
                flow_hash(other, service, 40000, 80, 6),
                flow_hash(client, service, 40000, 80, 6),
                "byte {byte} of the client address counts"
            );
        }
    }
}
