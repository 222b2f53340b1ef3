//! The data-plane threads: `[global] workers` threads, each driving its own single-threaded
//! tokio runtime.
//!
//! A worker accepts on its own listening sockets (its own `SO_REUSEPORT` socket, or its own
//! descriptor of a shared one) and serves each connection on one thread, from set-up to
//! the access-log record. So a connection's wake-ups never cross threads, no task is ever
//! stolen by another worker, and the relay's scratch buffer and pipe pool are the thread's
//! own.
//!
//! The kernel spreads new connections over the workers' sockets by a hash, which can leave
//! one worker with many more connections than another (a few dozen busy connections split
//! 30/20 leave one core saturated and the other idle). So a worker serves a connection it
//! accepted itself only while it has at most [`SLACK`] more connections than the least
//! busy worker; otherwise it hands the accepted socket to that worker (one cross-thread
//! wake-up, once per connection, only while the counts are uneven).
//!
//! The control plane (admin server, health checks, DNS, reload, signals) runs on the
//! runtime of the thread that started the proxy.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// How many more connections than the least busy worker a worker may hold and still serve
/// the connections it accepts itself.
pub const SLACK: usize = 1;

/// The running worker threads.
pub struct Workers {
    handles: Vec<Handle>,
    /// Connections each worker serves now.
    load: Box<[AtomicUsize]>,
    stop: CancellationToken,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Workers {
    /// Starts `n` worker threads (at least one).
    pub fn start(n: usize) -> io::Result<Workers> {
        let n = n.max(1);
        // Built as it goes, so that an error part-way stops (on drop) what was started.
        let mut workers = Workers {
            handles: Vec::with_capacity(n),
            load: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            stop: CancellationToken::new(),
            threads: Mutex::new(Vec::with_capacity(n)),
        };
        crate::observe::counter::register_workers(n);
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = rt.handle().clone();
            let stop = workers.stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("ferry-worker-{i}"))
                .spawn(move || {
                    crate::observe::counter::enter_worker(i);
                    rt.block_on(stop.cancelled());
                    // Dropping the runtime drops whatever tasks are left (after a drain,
                    // none but those the drain timeout already cut).
                })?;
            workers.handles.push(handle);
            workers
                .threads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(thread);
        }
        Ok(workers)
    }

    /// One worker that is the runtime this is called on, with no thread of its own: the
    /// proxy runs inside the caller's runtime. For tests (one thread, and a paused clock
    /// if the runtime has one) and for embedding. Must be called within a runtime.
    pub fn on_current_runtime() -> Workers {
        crate::observe::counter::register_workers(1);
        Workers {
            handles: vec![Handle::current()],
            load: vec![AtomicUsize::new(0)].into_boxed_slice(),
            stop: CancellationToken::new(),
            threads: Mutex::new(Vec::new()),
        }
    }

    /// How many workers run.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Never true: there is always at least one worker.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// The runtime of worker `i` (modulo the number of workers).
    pub fn handle(&self, i: usize) -> &Handle {
        &self.handles[i % self.handles.len()]
    }

    /// Connections worker `i` serves now.
    pub fn load(&self, i: usize) -> usize {
        self.load[i % self.load.len()].load(Relaxed)
    }

    /// Connections each worker serves now, in worker order.
    pub fn loads(&self) -> Vec<usize> {
        self.load.iter().map(|l| l.load(Relaxed)).collect()
    }

    /// Chooses the worker to serve a connection that worker `me` accepted: `me`, unless it
    /// serves more than [`SLACK`] connections above the least busy worker, which then gets
    /// it. The connection counts against the chosen worker until the returned
    /// [`Assignment`] is dropped.
    pub fn assign(self: &Arc<Self>, me: usize) -> Assignment {
        let me = me % self.load.len();
        let mine = self.load[me].load(Relaxed);
        let mut target = me;
        let mut least = mine;
        for (i, l) in self.load.iter().enumerate() {
            let l = l.load(Relaxed);
            if l < least {
                least = l;
                target = i;
            }
        }
        if mine <= least + SLACK {
            target = me;
        }
        self.load[target].fetch_add(1, Relaxed);
        Assignment {
            workers: self.clone(),
            worker: target,
        }
    }

    /// Stops every worker and waits for its thread to end. Tasks still running are dropped.
    pub fn shutdown(&self) {
        self.stop.cancel();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            // The last `Arc<Workers>` can be an `Assignment` dropped on a worker thread:
            // that thread cannot wait for itself (it ends once its runtime sees `stop`).
            if t.thread().id() == std::thread::current().id() {
                continue;
            }
            let _ = t.join();
        }
    }
}

/// A connection's place on a worker (see [`Workers::assign`]); dropping it gives it up.
pub struct Assignment {
    workers: Arc<Workers>,
    worker: usize,
}

impl Assignment {
    /// The worker that serves the connection.
    pub fn worker(&self) -> usize {
        self.worker
    }

    /// That worker's runtime.
    pub fn handle(&self) -> &Handle {
        self.workers.handle(self.worker)
    }
}

impl Drop for Assignment {
    fn drop(&mut self) {
        self.workers.load[self.worker].fetch_sub(1, Relaxed);
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_their_worker_thread() {
        let w = Workers::start(2).unwrap();
        assert_eq!(w.len(), 2);
        let names: Vec<String> = (0..4)
            .map(|i| {
                let (tx, rx) = std::sync::mpsc::channel();
                w.handle(i).spawn(async move {
                    let _ = tx.send(std::thread::current().name().unwrap_or("").to_string());
                });
                rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap()
            })
            .collect();
        assert_eq!(
            names,
            [
                "ferry-worker-0",
                "ferry-worker-1",
                "ferry-worker-0",
                "ferry-worker-1"
            ]
        );
        w.shutdown();
    }

    #[test]
    fn connections_accepted_by_one_worker_are_spread_over_all() {
        let w = Arc::new(Workers::start(3).unwrap());
        // Every connection arrives at worker 0 (a skewed hash): the others get their share.
        let held: Vec<Assignment> = (0..30).map(|_| w.assign(0)).collect();
        let loads: Vec<usize> = (0..3).map(|i| w.load(i)).collect();
        assert_eq!(loads.iter().sum::<usize>(), 30);
        let (min, max) = (loads.iter().min().unwrap(), loads.iter().max().unwrap());
        assert!(max - min <= SLACK + 1, "{loads:?}");
        // Worker 0 keeps what it accepts while it is not ahead by more than the slack.
        assert_eq!(held[0].worker(), 0);
        drop(held);
        assert_eq!((0..3).map(|i| w.load(i)).sum::<usize>(), 0);
        // Balanced: every worker keeps its own connections (no cross-thread hand-off).
        let a: Vec<Assignment> = (0..3).map(|i| w.assign(i)).collect();
        assert_eq!(a.iter().map(|a| a.worker()).collect::<Vec<_>>(), [0, 1, 2]);
        drop(a);
        w.shutdown();
    }
}
