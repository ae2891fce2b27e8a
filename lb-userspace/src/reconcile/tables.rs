//! Where backend sets' tables live in the table space (`lb_common::map_names::BACKEND_TABLES`):
//! a best-fit allocator of position ranges that coalesces what is freed. A freed range is
//! reused only after a grace period, so a packet that read a frontend's old table position just
//! before the frontend moved never reads another set's table there.
use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

/// How long a freed range rests before it is reused: far longer than any packet takes through
/// the datapath (microseconds).
const GRACE: Duration = Duration::from_secs(1);

/// A table's positions: `start .. start + len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Block {
    pub start: u32,
    pub len: u32,
}

impl Block {
    fn end(self) -> u32 {
        self.start + self.len
    }
}

/// The table space's positions, used and free.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableSpace {
    /// Positions the kernel's array holds.
    capacity: u32,
    /// Free ranges, start → length, never adjacent (coalesced).
    free: BTreeMap<u32, u32>,
    /// The same ranges by (length, start), for best fit.
    by_len: BTreeSet<(u32, u32)>,
    /// Freed ranges resting until they may be reused, oldest first.
    resting: Vec<(Instant, Block)>,
    used: u64,
}

impl TableSpace {
    /// A space of `capacity` positions of which `used` are taken (they may overlap: frontends
    /// that disagreed on a table left by an interrupted update).
    pub fn new(capacity: u32, used: impl IntoIterator<Item = Block>) -> Self {
        let mut taken: Vec<Block> = used.into_iter().filter(|b| b.len > 0).collect();
        taken.sort_unstable();
        let mut space = Self {
            capacity,
            ..Self::default()
        };
        let mut at = 0;
        for block in taken {
            if block.start > at {
                space.insert_free(Block {
                    start: at,
                    len: block.start - at,
                });
            }
            if block.end() > at {
                space.used += u64::from(block.end() - at.max(block.start));
                at = block.end();
            }
        }
        if capacity > at {
            space.insert_free(Block {
                start: at,
                len: capacity - at,
            });
        }
        space
    }

    /// Positions in use or resting.
    #[cfg(test)]
    pub fn used(&self) -> u64 {
        self.used
    }

    /// A free range of `len` positions, or `None` when the space must grow first.
    pub fn allocate(&mut self, len: u32) -> Option<Block> {
        self.wake(Instant::now());
        let &(free_len, start) = self.by_len.range((len, 0)..).next()?;
        self.remove_free(start, free_len);
        if free_len > len {
            self.insert_free(Block {
                start: start + len,
                len: free_len - len,
            });
        }
        self.used += u64::from(len);
        Some(Block { start, len })
    }

    /// Gives `block` back; it is reused after the grace period.
    pub fn release(&mut self, block: Block) {
        if block.len > 0 {
            self.resting.push((Instant::now(), block));
        }
    }

    /// The capacity to grow to so that `len` more positions fit: an eighth more than what is
    /// then in use, so that growing (a copy of the whole space) stays rare while changed tables
    /// rest before reuse.
    pub fn grown_capacity(&self, len: u32) -> u32 {
        let needed = self.used + u64::from(len);
        let wanted = (needed + needed / 8).max(u64::from(self.capacity) + u64::from(len));
        // Whole pages of positions (1024 per 4 KiB page): the kernel maps the space by page.
        wanted.next_multiple_of(1024).min(u64::from(!1023u32)) as u32
    }

    /// The space now has `capacity` positions, its old ones unchanged.
    pub fn grew(&mut self, capacity: u32) {
        if capacity <= self.capacity {
            return;
        }
        let added = Block {
            start: self.capacity,
            len: capacity - self.capacity,
        };
        self.capacity = capacity;
        self.free_range(added);
    }

    /// Makes ranges that rested long enough free again.
    fn wake(&mut self, now: Instant) {
        let rested = self
            .resting
            .iter()
            .take_while(|(at, _)| now.duration_since(*at) >= GRACE)
            .count();
        let woken: Vec<Block> = self.resting.drain(..rested).map(|(_, block)| block).collect();
        for block in woken {
            self.used -= u64::from(block.len);
            self.free_range(block);
        }
    }

    /// Frees `block`, merged with the free ranges next to it.
    fn free_range(&mut self, mut block: Block) {
        if let Some((&start, &len)) = self.free.range(..block.start).next_back()
            && start + len == block.start
        {
            self.remove_free(start, len);
            block = Block {
                start,
                len: len + block.len,
            };
        }
        if let Some(&len) = self.free.get(&block.end()) {
            self.remove_free(block.end(), len);
            block.len += len;
        }
        self.insert_free(block);
    }

    fn insert_free(&mut self, block: Block) {
        self.free.insert(block.start, block.len);
        self.by_len.insert((block.len, block.start));
    }

    fn remove_free(&mut self, start: u32, len: u32) {
        self.free.remove(&start);
        self.by_len.remove(&(len, start));
    }

    #[cfg(test)]
    fn rest_all(&mut self) {
        let long_ago = Instant::now() - 2 * GRACE;
        for (at, _) in &mut self.resting {
            *at = long_ago;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(start: u32, len: u32) -> Block {
        Block { start, len }
    }

    #[test]
    fn ranges_are_given_best_fit_and_freed_ones_rest_before_reuse() {
        let mut space = TableSpace::new(4096, []);
        let a = space.allocate(1031).unwrap();
        let b = space.allocate(1031).unwrap();
        assert_eq!((a, b), (block(0, 1031), block(1031, 1031)));
        space.release(a);
        assert_eq!(
            space.allocate(1031),
            Some(block(2062, 1031)),
            "a just-freed range is not reused"
        );
        assert_eq!(space.allocate(1031), None, "1003 positions are left");
        space.rest_all();
        assert_eq!(space.allocate(1031), Some(a), "after the grace period it is");
        assert_eq!(space.used(), 3 * 1031);
    }

    #[test]
    fn freed_neighbours_merge_and_growth_extends_the_last_free_range() {
        let mut space = TableSpace::new(3000, []);
        let blocks: Vec<Block> = (0..3).map(|_| space.allocate(1000).unwrap()).collect();
        space.release(blocks[0]);
        space.release(blocks[2]);
        space.release(blocks[1]);
        space.rest_all();
        assert_eq!(space.allocate(3000), Some(block(0, 3000)), "one merged range");
        assert_eq!(space.allocate(10), None);
        let capacity = space.grown_capacity(10);
        assert!(capacity >= 3010 && capacity.is_multiple_of(1024), "{capacity}");
        space.grew(capacity);
        assert_eq!(space.allocate(10), Some(block(3000, 10)));
    }

    #[test]
    fn a_space_recovered_from_its_tables_hands_out_only_the_gaps() {
        let mut space = TableSpace::new(100, [block(10, 20), block(15, 5), block(50, 10)]);
        assert_eq!(space.used(), 30);
        assert_eq!(space.allocate(20), Some(block(30, 20)), "the gap between");
        assert_eq!(space.allocate(40), Some(block(60, 40)), "the end");
        assert_eq!(space.allocate(10), Some(block(0, 10)), "the start");
        assert_eq!(space.allocate(1), None);
    }
}
