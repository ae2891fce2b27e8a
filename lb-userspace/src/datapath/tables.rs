//! The backend table space ([`map_names::BACKEND_TABLES`]) from userspace: one BPF_F_MMAPABLE
//! array of position pairs in slot 0 of an array of maps. Tables are written and read through
//! shared mappings of a window at a time, so the agent never keeps the whole space mapped (its
//! pages would count in the agent's memory); the space grows by a copy into a larger array that
//! is then swapped in with one update.
use std::{num::NonZeroUsize, os::fd::AsFd as _, ptr::NonNull};

use aya::maps::{Array, ArrayOfMaps, IterableMap as _, MapData, MapError as AyaMapError};
use lb_common::{BACKEND_TABLES_FLAGS, BackendId, TablePair, map_names};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

use crate::reconcile::MapError;

const PAGE: usize = 4096;
/// Bytes mapped at once.
const WINDOW: usize = 64 << 20;
const POSITION: usize = size_of::<BackendId>();
/// Positions per array element.
const PAIR: u32 = (size_of::<TablePair>() / POSITION) as u32;

pub struct TableSpaceMap {
    outer: ArrayOfMaps<MapData, Array<MapData, TablePair>>,
    /// The array in slot 0; `None` until the first table is written.
    space: Option<Array<MapData, TablePair>>,
}

fn failed(what: &str) -> impl FnOnce(AyaMapError) -> MapError + '_ {
    move |error| MapError {
        map: map_names::BACKEND_TABLES,
        message: format!("{what}: {error}"),
    }
}

fn mapping_failed(error: nix::Error) -> MapError {
    MapError {
        map: map_names::BACKEND_TABLES,
        message: format!("cannot map the table space: {error}"),
    }
}

impl TableSpaceMap {
    pub fn new(outer: ArrayOfMaps<MapData, Array<MapData, TablePair>>) -> Result<Self, AyaMapError> {
        let space = match outer.get(&0, 0) {
            Ok(space) => Some(space),
            Err(AyaMapError::KeyNotFound) => None,
            Err(AyaMapError::SyscallError(error)) if error.io_error.raw_os_error() == Some(libc::ENOENT) => {
                None
            }
            Err(error) => return Err(error),
        };
        Ok(Self { outer, space })
    }

    /// Positions the space holds.
    pub fn capacity(&self) -> u32 {
        self.space.as_ref().map_or(0, |space| space.len() * PAIR)
    }

    /// The array's own memory, as the kernel accounts it, in bytes (0 before the first table).
    pub fn memory(&self) -> std::io::Result<u64> {
        match &self.space {
            Some(space) => super::raw::memlock(space.map().fd().as_fd()),
            None => Ok(0),
        }
    }

    /// Writes a table at each (position, length), which the space must hold: `fill(i, table)`
    /// writes the `i`th in place. Tables near each other share a mapping of up to [`WINDOW`]
    /// bytes; a table alone is mapped alone (a mapping costs a page-table entry per page).
    pub fn write(
        &mut self,
        blocks: &[(u32, u32)],
        fill: &(dyn Fn(usize, &mut [BackendId]) + Sync),
    ) -> Result<(), MapError> {
        let mut order: Vec<usize> = (0..blocks.len()).filter(|&i| blocks[i].1 > 0).collect();
        if order.is_empty() {
            return Ok(());
        }
        let Some(space) = &self.space else {
            return Err(MapError {
                map: map_names::BACKEND_TABLES,
                message: "no table space to write to".into(),
            });
        };
        let size = space.len() as usize * size_of::<TablePair>();
        order.sort_unstable_by_key(|&i| blocks[i].0);
        let ranges: Vec<(usize, usize)> = order
            .iter()
            .map(|&i| {
                let (start, len) = blocks[i];
                (
                    start as usize * POSITION,
                    (start as usize + len as usize) * POSITION,
                )
            })
            .collect();
        if ranges.last().is_some_and(|&(_, end)| end > size) {
            return Err(MapError {
                map: map_names::BACKEND_TABLES,
                message: format!("a table ends past the space's {size} bytes"),
            });
        }
        // Building Maglev tables is most of the work: spread over the CPUs, each writing tables
        // of its own (disjoint positions).
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
        for_each_window(&ranges, size, |window, inside| {
            let mapping = Mapping::new(space, window, true)?;
            let mut tables: Vec<(usize, &mut [BackendId])> = inside
                .into_iter()
                .map(|index| {
                    let (from, to) = ranges[index];
                    (
                        order[index],
                        mapping.positions(from - window.0, (to - from) / POSITION),
                    )
                })
                .collect();
            let chunk = tables.len().div_ceil(threads).max(256);
            if tables.len() <= chunk {
                // A few tables (one Service's change): no thread is worth starting.
                for (index, to) in tables {
                    fill(index, to);
                }
                return Ok(());
            }
            std::thread::scope(|scope| {
                for part in tables.chunks_mut(chunk) {
                    scope.spawn(move || {
                        for (index, to) in part {
                            fill(*index, to);
                        }
                    });
                }
            });
            Ok(())
        })
    }

    /// The `len` ids at each (position, len).
    pub fn read(&self, blocks: &[(u32, u32)]) -> Result<Vec<Vec<BackendId>>, MapError> {
        let mut read = vec![Vec::new(); blocks.len()];
        let Some(space) = &self.space else {
            return Ok(read);
        };
        let size = space.len() as usize * size_of::<TablePair>();
        let mut order: Vec<usize> = (0..blocks.len())
            .filter(|&i| {
                let (start, len) = blocks[i];
                len > 0 && (start as usize + len as usize) * POSITION <= size
            })
            .collect();
        order.sort_unstable_by_key(|&i| blocks[i].0);
        let ranges: Vec<(usize, usize)> = order
            .iter()
            .map(|&i| {
                let (start, len) = blocks[i];
                (
                    start as usize * POSITION,
                    (start as usize + len as usize) * POSITION,
                )
            })
            .collect();
        for_each_window(&ranges, size, |window, range_indexes| {
            let mapping = Mapping::new(space, window, false)?;
            for index in range_indexes {
                let (start, len) = blocks[order[index]];
                read[order[index]] = mapping.read(start as usize * POSITION - window.0, len as usize);
            }
            Ok(())
        })?;
        Ok(read)
    }

    /// Makes the space hold `positions` (a multiple of 1024: whole pages), keeping what it
    /// holds; a packet sees the old array or the new one, with the same tables.
    pub fn grow(&mut self, positions: u32) -> Result<(), MapError> {
        if positions <= self.capacity() {
            return Ok(());
        }
        let grown = Array::<MapData, TablePair>::create(positions / PAIR, BACKEND_TABLES_FLAGS)
            .map_err(failed("cannot create a larger table space"))?;
        if let Some(old) = &self.space {
            let size = old.len() as usize * size_of::<TablePair>();
            let mut at = 0;
            while at < size {
                let window = (at, (at + WINDOW).min(size));
                let from = Mapping::new(old, window, false)?;
                let to = Mapping::new(&grown, window, true)?;
                // SAFETY: two distinct mappings of `window.1 - window.0` bytes each.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        from.base.as_ptr().cast::<u8>(),
                        to.base.as_ptr().cast::<u8>(),
                        window.1 - window.0,
                    );
                }
                at = window.1;
            }
        }
        // The kernel waits for every program that may hold the old array before returning.
        self.outer
            .set(0, &grown, 0)
            .map_err(failed("cannot swap in the larger table space"))?;
        self.space = Some(grown);
        Ok(())
    }
}

/// Calls `each` with windows of at most [`WINDOW`] bytes (page-aligned, within `size`) covering
/// `ranges` (sorted byte ranges), each with the indexes of the ranges inside it.
fn for_each_window(
    ranges: &[(usize, usize)],
    size: usize,
    mut each: impl FnMut((usize, usize), Vec<usize>) -> Result<(), MapError>,
) -> Result<(), MapError> {
    let mut index = 0;
    while index < ranges.len() {
        let start = ranges[index].0 / PAGE * PAGE;
        let mut end = ranges[index].1.next_multiple_of(PAGE).min(size);
        let mut inside = vec![index];
        index += 1;
        while index < ranges.len() {
            let candidate = ranges[index].1.next_multiple_of(PAGE).min(size);
            if candidate - start > WINDOW.max(end - start) {
                break;
            }
            end = end.max(candidate);
            inside.push(index);
            index += 1;
        }
        each((start, end), inside)?;
    }
    Ok(())
}

/// A shared mapping of bytes `window` of an array's values.
struct Mapping {
    base: NonNull<libc::c_void>,
    len: usize,
}

impl Mapping {
    fn new(
        array: &Array<MapData, TablePair>,
        window: (usize, usize),
        writable: bool,
    ) -> Result<Self, MapError> {
        let len = NonZeroUsize::new(window.1 - window.0).expect("windows are not empty");
        let protection = if writable {
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE
        } else {
            ProtFlags::PROT_READ
        };
        // SAFETY: a fresh shared mapping of the array's values, page-aligned and within them;
        // unmapped on drop and never aliased by a Rust reference.
        let base = unsafe {
            mmap(
                None,
                len,
                protection,
                MapFlags::MAP_SHARED,
                array.map().fd().as_fd(),
                window.0 as i64,
            )
        }
        .map_err(mapping_failed)?;
        Ok(Self { base, len: len.get() })
    }

    /// The `len` positions at byte `offset` of a writable mapping.
    #[expect(
        clippy::mut_from_ref,
        reason = "the mapping's memory is not Rust-owned; one slice at a time"
    )]
    fn positions(&self, offset: usize, len: usize) -> &mut [BackendId] {
        assert!(offset + len * POSITION <= self.len && offset.is_multiple_of(POSITION));
        // SAFETY: within the mapping (asserted) and aligned (the mapping is page-aligned, the
        // offset a multiple of a position); the caller writes through one slice at a time.
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr().cast::<u8>().add(offset).cast(), len) }
    }

    fn read(&self, offset: usize, len: usize) -> Vec<BackendId> {
        assert!(offset + len * POSITION <= self.len);
        let mut ids = vec![0; len];
        // SAFETY: within the mapping (asserted).
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.base.as_ptr().cast::<u8>().add(offset),
                ids.as_mut_ptr().cast::<u8>(),
                len * POSITION,
            );
        }
        ids
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, not used after this.
        let _ = unsafe { munmap(self.base, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_every_range_within_the_limit_and_page_aligned() {
        let ranges = [
            (100, 200),
            (5000, 9000),
            (WINDOW + 10, WINDOW + 20),
            (3 * WINDOW, 3 * WINDOW + 8),
        ];
        let size = 4 * WINDOW;
        let mut windows = Vec::new();
        for_each_window(&ranges, size, |window, inside| {
            windows.push((window, inside));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            windows.len(),
            3,
            "the first two ranges share a window: {windows:?}"
        );
        for (window, inside) in &windows {
            assert_eq!(window.0 % PAGE, 0);
            assert!(window.1 - window.0 <= WINDOW + PAGE, "{window:?}");
            for &i in inside {
                assert!(window.0 <= ranges[i].0 && ranges[i].1 <= window.1);
            }
        }
        let covered: Vec<usize> = windows.iter().flat_map(|(_, inside)| inside.clone()).collect();
        assert_eq!(covered, [0, 1, 2, 3]);
    }
}
