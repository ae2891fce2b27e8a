//! Internet checksum sums over the packet's own bytes, for the ICMP messages the datapath builds
//! or translates.
use aya_ebpf::programs::TcContext;
use lb_common::{Ipv6, checksum_add};

use crate::family::Family;

const CHUNK: usize = 64;
/// Enough chunks for the longest quote (IPv6's).
const CHUNKS: usize = <Ipv6 as Family>::QUOTE_MAX / CHUNK;
/// [`sum_from`] reads less than this: the chunks, and a rest shorter than one.
pub const SUM_MAX: usize = (CHUNKS + 1) * CHUNK;

/// The unfolded Internet checksum sum of the packet's bytes from `offset` to its end, which lies
/// less than [`SUM_MAX`] bytes further (else `None`). Every read has a fixed size, as
/// the verifier wants: whole chunks, then the rest in pieces of 32, 16, 8, 4, 2 and 1 bytes (so
/// only the last piece can be odd, as the checksum's pairing of bytes requires).
#[inline(always)]
pub fn sum_from(ctx: &TcContext, offset: usize) -> Option<u32> {
    let mut piece = Piece {
        sum: 0,
        offset,
        left: (ctx.len() as usize).saturating_sub(offset),
    };
    for _ in 0..CHUNKS {
        if piece.left < CHUNK {
            break;
        }
        piece.add::<CHUNK>(ctx)?;
    }
    piece.add_if_left::<32>(ctx)?;
    piece.add_if_left::<16>(ctx)?;
    piece.add_if_left::<8>(ctx)?;
    piece.add_if_left::<4>(ctx)?;
    piece.add_if_left::<2>(ctx)?;
    piece.add_if_left::<1>(ctx)?;
    (piece.left == 0).then_some(piece.sum)
}

/// [`sum_from`]'s progress: the sum so far, where it goes on, and how many bytes are left.
struct Piece {
    sum: u32,
    offset: usize,
    left: usize,
}

impl Piece {
    /// Adds the next `N` bytes.
    #[inline(always)]
    fn add<const N: usize>(&mut self, ctx: &TcContext) -> Option<()> {
        let bytes: [u8; N] = ctx.load(self.offset).ok()?;
        self.sum = checksum_add(self.sum, &bytes);
        self.offset += N;
        self.left -= N;
        Some(())
    }

    /// Adds the next `N` bytes if the rest, shorter than `2 * N`, holds them.
    #[inline(always)]
    fn add_if_left<const N: usize>(&mut self, ctx: &TcContext) -> Option<()> {
        if self.left & N == 0 {
            return Some(());
        }
        self.add::<N>(ctx)
    }
}
