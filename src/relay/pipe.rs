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
const POOL_MAX: usize = 64;
/// Bytes moved into a pipe at once (the default pipe capacity).
const PIPE_CHUNK: usize = 64 * 1024;

pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// An empty pipe from the pool, or a new one. `None` if none can be made (e.g. the
/// descriptor limit is reached).
pub fn take() -> Option<Pipe> {
    if let Some(p) = POOL.with_borrow_mut(|pool| pool.pop()) {
        return Some(p);
    }
    let (r, w) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK).ok()?;
    Some(Pipe { r, w })
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
    pub fn splice_in(&self, from: impl AsFd) -> io::Result<usize> {
        Ok(splice(
            from,
            None,
            &self.w,
            None,
            PIPE_CHUNK,
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
