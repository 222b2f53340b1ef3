//! The data-plane threads: `[global] workers` threads, each driving its own single-threaded
//! tokio runtime.
//!
//! A worker accepts on its own listening sockets (its own `SO_REUSEPORT` socket, or its own
//! descriptor of a shared one) and serves every connection it accepts on that one thread,
//! from set-up to the access-log record. So a connection's wake-ups never cross threads,
//! no task is ever stolen by another worker, and the relay's scratch buffer and pipe pool
//! are the thread's own. A work-stealing runtime with the same number of threads spends
//! measurably more CPU per request parking and waking its workers (see `bench/README.md`).
//!
//! The control plane (admin server, health checks, DNS, reload, signals) runs on the
//! runtime of the thread that started the proxy.

use std::io;
use std::sync::Mutex;
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// The running worker threads.
pub struct Workers {
    handles: Vec<Handle>,
    stop: CancellationToken,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Workers {
    /// Starts `n` worker threads (at least one).
    pub fn start(n: usize) -> io::Result<Workers> {
        let n = n.max(1);
        let workers = Workers {
            handles: Vec::with_capacity(n),
            stop: CancellationToken::new(),
            threads: Mutex::new(Vec::with_capacity(n)),
        };
        let mut workers = workers;
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = rt.handle().clone();
            let stop = workers.stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("ferry-worker-{i}"))
                .spawn(move || {
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

    /// Stops every worker and waits for its thread to end. Tasks still running are dropped.
    pub fn shutdown(&self) {
        self.stop.cancel();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            if t.thread().id() == std::thread::current().id() {
                continue;
            }
            let _ = t.join();
        }
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
}
