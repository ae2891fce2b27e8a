//! Maglev lookup tables (Eisenbud et al., NSDI 2016): every node computes the same table from the
//! same backend set, and a change of one backend moves few table positions.
//!
//! Each backend walks its own permutation of the positions, `offset + j·skip (mod size)`, derived
//! from two independent hashes of its identity (address and port, never a node-local id); in
//! turns, each takes its next free position. Weights give a backend that many turns per round.
use std::net::{IpAddr, SocketAddr};

/// A backend's identity for hashing: its address bytes (4 or 16, network order), then its port
/// (big-endian). An IPv4 backend's is the 6 bytes every earlier build used, so an upgrade leaves
/// its tables as they were.
pub fn identity(backend: SocketAddr) -> Vec<u8> {
    let mut identity = match backend.ip() {
        IpAddr::V4(addr) => addr.octets().to_vec(),
        IpAddr::V6(addr) => addr.octets().to_vec(),
    };
    identity.extend_from_slice(&backend.port().to_be_bytes());
    identity
}

/// Table sizes when scaled to the backends: primes, each about twice the last. The first serves
/// up to 10 backends, so scaling a Deployment within the usual 1–10 replicas never changes a
/// table's size (which would move most flows that have no conntrack entry, since every position
/// is recomputed); beyond it the size doubles about as often as the backends do.
pub const TABLE_SIZES: [u32; 11] = [
    1_021, 2_039, 4_093, 8_191, 16_381, 32_749, 65_521, 131_071, 262_139, 524_287, 1_048_573,
];

/// Positions per backend a scaled table has at least (Eisenbud et al. use M ≥ 100·N): each
/// backend then owns its share within about 1%, and removing one moves few other positions.
pub const POSITIONS_PER_BACKEND: usize = 100;

/// The smallest of [`TABLE_SIZES`] with [`POSITIONS_PER_BACKEND`] positions per backend (the
/// largest, for more backends than that serves).
pub fn scaled_size(backends: usize) -> u32 {
    let wanted = backends.saturating_mul(POSITIONS_PER_BACKEND);
    TABLE_SIZES
        .into_iter()
        .find(|&size| size as usize >= wanted)
        .unwrap_or(TABLE_SIZES[TABLE_SIZES.len() - 1])
}

/// Builds a table of `size` positions (a prime, larger than the number of backends) over
/// `backends` given as (identity, weight). Returns, per position, the index into `backends` of
/// the backend owning it. The input order does not matter; a backend of weight 0 owns nothing.
pub fn table(backends: &[(&[u8], u32)], size: u32) -> Vec<usize> {
    const FREE: u32 = u32::MAX;
    let size64 = u64::from(size);
    // Sorted by identity, so two nodes listing the same backends differently agree.
    let mut order: Vec<usize> = (0..backends.len()).filter(|&i| backends[i].1 > 0).collect();
    order.sort_by_key(|&i| backends[i].0);
    if order.is_empty() || size == 0 {
        return Vec::new();
    }
    // Each backend walks offset, offset + skip, offset + 2·skip, … (mod size): its next
    // candidate position and its step, advanced by addition rather than recomputed by a
    // division per step.
    let mut walks: Vec<(u32, u32)> = order
        .iter()
        .map(|&i| {
            let identity = backends[i].0;
            let offset = hash(identity, OFFSET_SEED) % size64;
            let skip = hash(identity, SKIP_SEED) % (size64 - 1) + 1;
            (offset as u32, skip as u32)
        })
        .collect();
    let mut table = vec![FREE; size as usize];
    let mut filled = 0;
    loop {
        for (turn, &backend) in order.iter().enumerate() {
            for _ in 0..backends[backend].1 {
                let (position, skip) = &mut walks[turn];
                while table[*position as usize] != FREE {
                    *position = step(*position, *skip, size);
                }
                table[*position as usize] = turn as u32;
                *position = step(*position, *skip, size);
                filled += 1;
                if filled == size {
                    return table.into_iter().map(|turn| order[turn as usize]).collect();
                }
            }
        }
    }
}

/// `(position + skip) mod size`, for `position, skip < size`.
fn step(position: u32, skip: u32, size: u32) -> u32 {
    let next = u64::from(position) + u64::from(skip);
    if next >= u64::from(size) {
        (next - u64::from(size)) as u32
    } else {
        next as u32
    }
}

const OFFSET_SEED: u64 = 0x9e37_79b9_7f4a_7c15;
const SKIP_SEED: u64 = 0xc2b2_ae3d_27d4_eb4f;

/// FNV-1a from a seed, finished with SplitMix64 so nearby identities land far apart. Fixed here,
/// not `std`'s hasher (whose output may change between Rust releases): nodes running different
/// builds must still agree.
fn hash(bytes: &[u8], seed: u64) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325 ^ seed;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

/// Whether `n` is prime: table sizes must be, so every skip is coprime with the size.
pub fn is_prime(n: u32) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u32 = 16_381;

    fn identities(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| {
                let mut id = vec![10, 244, (i / 250) as u8, (i % 250) as u8 + 1];
                id.extend_from_slice(&8080u16.to_be_bytes());
                id
            })
            .collect()
    }

    fn build(ids: &[Vec<u8>]) -> Vec<usize> {
        let backends: Vec<(&[u8], u32)> = ids.iter().map(|id| (id.as_slice(), 1)).collect();
        table(&backends, M)
    }

    fn shares(table: &[usize], n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for &owner in table {
            counts[owner] += 1;
        }
        counts
    }

    /// Every backend owns within ±3% of M/N positions (measured worst case printed).
    #[test]
    fn every_backend_owns_close_to_its_share() {
        for n in [3, 10, 100] {
            let table = build(&identities(n));
            assert_eq!(table.len(), M as usize);
            let fair = f64::from(M) / n as f64;
            let worst = shares(&table, n)
                .iter()
                .map(|&c| (c as f64 - fair).abs() / fair)
                .fold(0.0, f64::max);
            println!("N={n}: worst share deviation {:.2}%", worst * 100.0);
            assert!(
                worst <= 0.03,
                "N={n}: a backend is {:.2}% off its share",
                worst * 100.0
            );
        }
    }

    /// Removing one of N backends moves at most 1/N + 1% of the positions beyond those it owned.
    #[test]
    fn removing_one_backend_moves_few_other_positions() {
        for n in [3, 10, 100] {
            let ids = identities(n);
            let before = build(&ids);
            let removed = n / 2;
            let survivors: Vec<Vec<u8>> = ids
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != removed)
                .map(|(_, id)| id.clone())
                .collect();
            let after = build(&survivors);
            let moved = before
                .iter()
                .zip(&after)
                .filter(|(old, new)| **old != removed && ids[**old] != survivors[**new])
                .count();
            let fraction = moved as f64 / f64::from(M);
            println!(
                "N={n}: {:.2}% of positions moved besides the removed backend's",
                fraction * 100.0
            );
            assert!(
                fraction <= 1.0 / n as f64 + 0.01,
                "N={n}: {:.2}% moved",
                fraction * 100.0
            );
        }
    }

    #[test]
    fn the_same_backends_in_another_order_give_the_same_table() {
        let ids = identities(10);
        let mut reversed = ids.clone();
        reversed.reverse();
        let (a, b) = (build(&ids), build(&reversed));
        let owners = |t: &[usize], ids: &[Vec<u8>]| t.iter().map(|&i| ids[i].clone()).collect::<Vec<_>>();
        assert_eq!(owners(&a, &ids), owners(&b, &reversed));
    }

    #[test]
    fn weights_are_respected_and_weight_zero_owns_nothing() {
        let ids = identities(3);
        let backends: Vec<(&[u8], u32)> = vec![(&ids[0], 1), (&ids[1], 3), (&ids[2], 0)];
        let counts = shares(&table(&backends, M), 3);
        assert_eq!(counts[2], 0);
        let ratio = counts[1] as f64 / counts[0] as f64;
        assert!(
            (2.9..3.1).contains(&ratio),
            "weight 3 owns three times as much: {counts:?}"
        );
    }

    #[test]
    fn identities_are_address_bytes_then_the_port() {
        assert_eq!(
            identity("10.244.0.10:8080".parse().unwrap()),
            [10, 244, 0, 10, 0x1f, 0x90],
            "the IPv4 identity earlier builds hashed"
        );
        let mut ipv6 = vec![0xfd, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a];
        ipv6.extend_from_slice(&[0x1f, 0x90]);
        assert_eq!(identity("[fd00:10::a]:8080".parse().unwrap()), ipv6);
    }

    #[test]
    fn no_backend_gives_an_empty_table_and_primes_are_recognised() {
        assert!(table(&[], M).is_empty());
        assert!(is_prime(M) && is_prime(65_537) && is_prime(2));
        assert!(!is_prime(16_383) && !is_prime(1) && !is_prime(0));
    }

    #[test]
    fn scaled_sizes_are_primes_with_100_positions_per_backend() {
        assert!(TABLE_SIZES.iter().all(|&size| is_prime(size)));
        assert!(TABLE_SIZES.windows(2).all(|pair| pair[1] > pair[0]));
        for (backends, size) in [(0, 1_021), (1, 1_021), (10, 1_021), (11, 2_039), (100, 16_381)] {
            assert_eq!(scaled_size(backends), size, "{backends} backends");
        }
        assert_eq!(scaled_size(1_000_000), 1_048_573, "the largest beyond");
    }

    /// The table every earlier build made (a division per step): nodes running different builds
    /// must agree.
    #[test]
    fn tables_are_those_of_the_division_per_step_walk() {
        fn by_division(backends: &[(&[u8], u32)], size: u32) -> Vec<usize> {
            let size = size as usize;
            let mut order: Vec<usize> = (0..backends.len()).collect();
            order.sort_by_key(|&i| backends[i].0);
            let permutations: Vec<(u64, u64)> = order
                .iter()
                .map(|&i| {
                    let offset = hash(backends[i].0, OFFSET_SEED) % size as u64;
                    let skip = hash(backends[i].0, SKIP_SEED) % (size as u64 - 1) + 1;
                    (offset, skip)
                })
                .collect();
            let mut table = vec![usize::MAX; size];
            let mut next = vec![0u64; order.len()];
            let mut filled = 0;
            loop {
                for (turn, &backend) in order.iter().enumerate() {
                    let (offset, skip) = permutations[turn];
                    let mut position = ((offset + next[turn] * skip) % size as u64) as usize;
                    while table[position] != usize::MAX {
                        next[turn] += 1;
                        position = ((offset + next[turn] * skip) % size as u64) as usize;
                    }
                    table[position] = backend;
                    next[turn] += 1;
                    filled += 1;
                    if filled == size {
                        return table;
                    }
                }
            }
        }
        for (n, size) in [(1, 1_021), (3, 1_021), (10, 1_021), (37, 4_093), (100, M)] {
            let ids = identities(n);
            let backends: Vec<(&[u8], u32)> = ids.iter().map(|id| (id.as_slice(), 1)).collect();
            assert_eq!(table(&backends, size), by_division(&backends, size), "N={n}");
        }
    }
}
