//! Pipes for the splice engine, pooled per thread.
//!
//! A pipe is only held by a connection while bytes are in it; an empty one goes back to the
//! pool of the thread that empties it. A pipe still holding bytes when its connection ends
//! is closed, never pooled.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

use rustix::pipe::{PipeFlags, SpliceFlags, pipe_with, splice};

/// Empty pipes kept per thread.
const POOL_MAX: usize = 16;

pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    /// The capacity asked for (`[global] pipe_size`).
    asked: usize,
    /// The capacity the kernel gave.
    cap: usize,
}

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// An empty pipe of (up to) `size` bytes from the pool, or a new one. `None` if none can be
/// made (e.g. the descriptor limit is reached).
pub fn take(size: usize) -> Option<Pipe> {
    while let Some(p) = POOL.with_borrow_mut(|pool| pool.pop()) {
        if p.asked == size {
            return Some(p);
        }
        // Made before a reload changed the size: let it go.
    }
    let (r, w) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK).ok()?;
    // A bigger pipe moves more per splice (on loopback, 1 MiB pipes nearly double a single
    // stream's throughput and cut CPU per GB by a third). Past the per-user pipe budget
    // (`/proc/sys/fs/pipe-user-pages-soft`) or `fs.pipe-max-size` the kernel refuses, and a
    // user past the soft budget gets pipes of two pages: ask what it really is then.
    let cap = match rustix::pipe::fcntl_setpipe_size(&w, size) {
        Ok(cap) => cap,
        Err(_) => rustix::pipe::fcntl_getpipe_size(&w).ok()?,
    };
    Some(Pipe {
        r,
        w,
        asked: size,
        cap,
    })
}

/// Returns an empty pipe to this thread's pool.
pub fn give_back(p: Pipe) {
    POOL.with_borrow_mut(|pool| {
        if pool.len() < POOL_MAX {
            pool.push(p);
        }
    });
}

impl Pipe {
    /// Moves what `from` has (up to one pipe's worth) into the pipe. 0 means EOF.
    ///
    /// A TCP splice also stops short when the pipe runs out of slots (one per packet
    /// fragment): with 1,500-byte packets a 1 MiB pipe takes about 370 KB. So a short
    /// count says nothing about whether the socket still holds data; only `EAGAIN` does
    /// (the pipe is always empty when this is called, so `EAGAIN` cannot mean "pipe full").
    pub fn splice_in(&self, from: impl AsFd) -> io::Result<usize> {
        Ok(splice(
            from,
            None,
            &self.w,
            None,
            self.cap,
            SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
        )?)
    }

    /// Moves up to `len` bytes from the pipe into `to`.
    pub fn splice_out(&self, to: impl AsFd, len: usize) -> io::Result<usize> {
        Ok(splice(
            &self.r,
            None,
            to,
            None,
            len,
            SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pipe_reports_the_capacity_it_really_has() {
        // Linux rounds a pipe up to a power-of-two number of pages.
        let p = take(5000).expect("a pipe");
        assert_eq!(p.cap, 8192);
        assert_eq!(rustix::pipe::fcntl_getpipe_size(&p.w).unwrap(), p.cap);
        give_back(p);
        // A pooled pipe made for another size is not handed out for this one.
        let q = take(64 * 1024).expect("a pipe");
        assert_eq!(q.cap, 64 * 1024);
    }
}
