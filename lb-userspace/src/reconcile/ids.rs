//! Service and backend ids that are never handed out twice (until a counter wraps): a conntrack
//! entry names the ids of its flow, and would follow an id to whatever got it next. Deriving the
//! next id from the ids found in the maps is not enough, since an id deleted before a restart is
//! no longer there; so each counter's high-water mark is kept in the pinned config map
//! (`lb_common::config::NEXT_*_ID`), reserved a block at a time before any id of the block is
//! used.
use super::MapError;

/// How many ids one write of the high-water mark reserves: an agent that restarts skips at most
/// this many.
const RESERVED: u32 = 1024;

/// Which counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IdKind {
    Service,
    Backend,
}

/// One counter: ids count up from 1 and wrap, skipping 0, and ids in use once wrapped (before,
/// every id ahead is unused, and no lookup is needed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdCounter {
    kind: IdKind,
    next: u32,
    /// Every id below this (since the last wrap) may have been given out: a restarted agent
    /// starts here.
    reserved_until: u32,
    /// Whether ids ahead may be in use.
    wrapped: bool,
}

impl IdCounter {
    /// Starts after `persisted` (the high-water mark a previous agent kept, 0 for none) and after
    /// `highest_in_maps`.
    pub fn new(kind: IdKind, persisted: u32, highest_in_maps: Option<u32>) -> Self {
        let after_maps = highest_in_maps.map_or(1, |id| id.wrapping_add(1));
        // A persisted mark is trusted over the maps' highest id: it is past every id given out,
        // unless the counter has wrapped since, when the maps' ids are skipped one by one.
        let next = if persisted != 0 { persisted } else { after_maps };
        Self {
            kind,
            next,
            reserved_until: next,
            wrapped: highest_in_maps.is_some_and(|id| id >= next),
        }
    }

    /// The high-water mark last persisted.
    pub fn reserved_until(&self) -> u32 {
        self.reserved_until
    }

    /// A new id, neither 0 nor, once the counter wrapped, `in_use`. Reserves the next block first when the id is past the
    /// reserved one, so that no id is used before a restart would skip it.
    pub fn allocate(
        &mut self,
        in_use: impl Fn(u32) -> bool,
        persist: &mut impl FnMut(IdKind, u32) -> Result<(), MapError>,
    ) -> Result<u32, MapError> {
        loop {
            let id = self.next;
            if id == self.reserved_until {
                let until = id.wrapping_add(RESERVED).max(1);
                persist(self.kind, until)?;
                self.reserved_until = until;
            }
            self.next = id.wrapping_add(1);
            if self.next == 0 {
                self.wrapped = true;
            }
            if id != 0 && !(self.wrapped && in_use(id)) {
                return Ok(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Marks(Vec<(IdKind, u32)>);

    impl Marks {
        fn persist(&mut self) -> impl FnMut(IdKind, u32) -> Result<(), MapError> + '_ {
            |kind, next| {
                self.0.push((kind, next));
                Ok(())
            }
        }
    }

    #[test]
    fn a_block_is_reserved_before_its_first_id_is_used_and_a_restart_skips_it() {
        let mut marks = Marks::default();
        let mut ids = IdCounter::new(IdKind::Backend, 0, None);
        assert_eq!(ids.allocate(|_| false, &mut marks.persist()).unwrap(), 1);
        assert_eq!(marks.0, [(IdKind::Backend, 1 + RESERVED)]);
        for expected in 2..=RESERVED {
            assert_eq!(ids.allocate(|_| false, &mut marks.persist()).unwrap(), expected);
        }
        assert_eq!(marks.0.len(), 1, "one write per block");
        assert_eq!(
            ids.allocate(|_| false, &mut marks.persist()).unwrap(),
            RESERVED + 1
        );
        assert_eq!(marks.0.last(), Some(&(IdKind::Backend, 1 + 2 * RESERVED)));

        // Restarted with every entry deleted meanwhile: no id of the reserved blocks again.
        let mut restarted = IdCounter::new(IdKind::Backend, 1 + 2 * RESERVED, None);
        assert_eq!(
            restarted.allocate(|_| false, &mut marks.persist()).unwrap(),
            1 + 2 * RESERVED
        );
    }

    #[test]
    fn without_a_mark_ids_follow_the_highest_in_the_maps_and_wrap_past_zero_and_ids_in_use() {
        let mut marks = Marks::default();
        let mut ids = IdCounter::new(IdKind::Service, 0, Some(u32::MAX - 1));
        assert_eq!(ids.allocate(|_| false, &mut marks.persist()).unwrap(), u32::MAX);
        assert_eq!(
            ids.allocate(|id| id == 1, &mut marks.persist()).unwrap(),
            2,
            "0 is never an id and 1 is in use"
        );
    }
}
