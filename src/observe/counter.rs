//! Counters the data path adds to on every read. Each has one cache line per thread that
//! writes it (the worker threads and the control plane), so workers never write the same
//! line; reading one sums its cells. A shared atomic would bounce its line between the
//! cores on every read of every connection.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

/// Cells a new counter gets: the worker threads plus the control plane. [`register_workers`]
/// raises it before any counter is made.
static CELLS: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    /// The cell this thread adds to: 0 for any thread but a worker.
    static MINE: Cell<usize> = const { Cell::new(0) };
}

/// Makes counters created from now on have a cell for each of `n` workers.
pub fn register_workers(n: usize) {
    CELLS.fetch_max(n + 1, Relaxed);
}

/// Marks the calling thread as worker `i`: its adds go to cell `i + 1`.
pub fn enter_worker(i: usize) {
    MINE.with(|c| c.set(i + 1));
}

/// One cell on a cache line (and the adjacent line the prefetcher pairs with it) of its own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded(AtomicU64);

/// A monotonic counter, summed over per-thread cells when read.
#[derive(Debug)]
pub struct Counter {
    cells: Box<[Padded]>,
}

impl Default for Counter {
    fn default() -> Self {
        Counter::new()
    }
}

impl Counter {
    pub fn new() -> Counter {
        Counter {
            cells: (0..CELLS.load(Relaxed).max(1))
                .map(|_| Padded::default())
                .collect(),
        }
    }

    /// Adds `n` in the calling thread's cell.
    #[inline]
    pub fn add(&self, n: u64) {
        let i = MINE.with(Cell::get) % self.cells.len();
        self.cells[i].0.fetch_add(n, Relaxed);
    }

    /// The sum over every cell.
    pub fn get(&self) -> u64 {
        self.cells
            .iter()
            .fold(0u64, |s, c| s.wrapping_add(c.0.load(Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_the_adds_of_every_thread() {
        register_workers(4);
        let c = std::sync::Arc::new(Counter::new());
        assert!(c.cells.len() >= 5);
        let threads: Vec<_> = (0..6)
            .map(|i| {
                let c = c.clone();
                std::thread::spawn(move || {
                    // Workers 0..5: one more than the cells made for, which wraps around.
                    enter_worker(i);
                    for _ in 0..1000 {
                        c.add(3);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        c.add(1);
        assert_eq!(c.get(), 6 * 3000 + 1);
    }

    #[test]
    fn cells_do_not_share_cache_lines() {
        assert_eq!(std::mem::align_of::<Padded>(), 128);
        assert_eq!(std::mem::size_of::<Padded>(), 128);
    }
}
