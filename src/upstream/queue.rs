//! The pool's wait queue: connections that found every server full wait here, first come
//! first served, until a slot frees or their timeout passes.
//!
//! A waiter keeps its place until it gets a server or gives up; a freed slot wakes the
//! first waiter not already woken. The lock is held only to look at the list, never across
//! an `.await`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Debug)]
struct Waiter {
    notify: Notify,
    /// Woken and not yet done with it: the next freed slot goes to someone else.
    woken: AtomicBool,
}

#[derive(Debug)]
pub struct Queue {
    waiters: Mutex<VecDeque<Arc<Waiter>>>,
    size: usize,
    timeout: Duration,
}

/// A place in the queue; leaving (drop) hands an unused wake-up to the next waiter.
pub struct Ticket {
    queue: Arc<Queue>,
    me: Arc<Waiter>,
}

impl Queue {
    pub fn new(size: usize, timeout: Duration) -> Queue {
        Queue {
            waiters: Mutex::new(VecDeque::new()),
            size,
            timeout,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<Waiter>>> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Takes a place at the back, or `None` if the queue is full.
    pub fn join(self: &Arc<Self>) -> Option<Ticket> {
        let mut w = self.lock();
        if w.len() >= self.size {
            return None;
        }
        let me = Arc::new(Waiter {
            notify: Notify::new(),
            woken: AtomicBool::new(false),
        });
        w.push_back(me.clone());
        Some(Ticket {
            queue: self.clone(),
            me,
        })
    }

    /// A server slot was freed: wake the first waiter not already woken.
    pub fn slot_freed(&self) {
        let w = self.lock();
        if let Some(next) = w.iter().find(|x| !x.woken.load(Ordering::Acquire)) {
            next.woken.store(true, Ordering::Release);
            next.notify.notify_one();
        }
    }

    /// Capacity changed in a way that may let several through: wake everyone.
    pub fn wake_all(&self) {
        for x in self.lock().iter() {
            x.woken.store(true, Ordering::Release);
            x.notify.notify_one();
        }
    }
}

impl Ticket {
    /// Waits until woken. The caller then tries to claim a server and, failing, waits
    /// again with its place kept.
    pub async fn wait(&mut self) {
        self.me.notify.notified().await;
        self.me.woken.store(false, Ordering::Release);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let was_woken = {
            let mut w = self.queue.lock();
            if let Some(pos) = w.iter().position(|x| Arc::ptr_eq(x, &self.me)) {
                w.remove(pos);
            }
            self.me.woken.load(Ordering::Acquire)
        };
        // A wake-up meant for us that we did not use (we timed out, or got a server by
        // other means) goes to the next in line.
        if was_woken {
            self.queue.slot_freed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fifo_and_bounded() {
        let q = Arc::new(Queue::new(2, Duration::from_secs(1)));
        let mut a = q.join().unwrap();
        let _b = q.join().unwrap();
        assert!(q.join().is_none(), "a full queue refuses");
        q.slot_freed();
        // The first waiter is woken.
        tokio::time::timeout(Duration::from_secs(1), a.wait())
            .await
            .expect("first waiter woken");
        drop(a);
        assert_eq!(q.len(), 1);
    }

    #[tokio::test]
    async fn unused_wakeup_passes_on() {
        let q = Arc::new(Queue::new(4, Duration::from_secs(1)));
        let a = q.join().unwrap();
        let mut b = q.join().unwrap();
        q.slot_freed(); // goes to a
        drop(a); // a leaves without using it: b gets it
        tokio::time::timeout(Duration::from_secs(1), b.wait())
            .await
            .expect("wake-up handed on");
    }
}
