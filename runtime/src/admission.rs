//! Admission control per function: at most `max_concurrency` invocations run
//! at once; the excess waits in a bounded queue (backpressure), and only a
//! full queue or a wait past `queue_timeout` is rejected.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::manifest::Concurrency;

/// Why an invocation was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("queue full ({0} invocations already waiting)")]
    QueueFull(u32),
    #[error("waited longer than the queue timeout of {0:?} for a concurrency slot")]
    QueueTimeout(Duration),
}

pub struct Admission {
    slots: Semaphore,
    waiting: AtomicU32,
    limits: Concurrency,
    depth: IntGauge,
}

/// Decrements the waiting count however the wait ends (including when the
/// waiting request is dropped because its client went away).
struct Waiting<'a>(&'a Admission);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let now = self.0.waiting.fetch_sub(1, Ordering::Relaxed) - 1;
        self.0.depth.set(i64::from(now));
    }
}

impl Admission {
    /// `depth` is the gauge that shows how many wait.
    pub fn new(limits: Concurrency, depth: IntGauge) -> Admission {
        Admission {
            slots: Semaphore::new(limits.max.get() as usize),
            waiting: AtomicU32::new(0),
            limits,
            depth,
        }
    }

    /// Waits for a slot; the permit frees it on drop.
    pub async fn enter(&self) -> Result<SemaphorePermit<'_>, Rejected> {
        if let Ok(permit) = self.slots.try_acquire() {
            return Ok(permit);
        }
        let queued = self.waiting.fetch_add(1, Ordering::Relaxed);
        self.depth.set(i64::from(queued) + 1);
        let _waiting = Waiting(self);
        if queued >= self.limits.queue {
            return Err(Rejected::QueueFull(queued));
        }
        match tokio::time::timeout(self.limits.queue_timeout, self.slots.acquire()).await {
            Ok(permit) => Ok(permit.expect("the semaphore is never closed")),
            Err(_) => Err(Rejected::QueueTimeout(self.limits.queue_timeout)),
        }
    }

    /// The host-wide gate: a pool slot for the instance, waited for within
    /// the function's queue timeout. Functions' `max_concurrency` may add up
    /// to more than the pool holds; the excess waits here instead of failing.
    pub async fn enter_pool<'p>(
        &self,
        pool: &'p Semaphore,
    ) -> Result<SemaphorePermit<'p>, Rejected> {
        if let Ok(permit) = pool.try_acquire() {
            return Ok(permit);
        }
        match tokio::time::timeout(self.limits.queue_timeout, pool.acquire()).await {
            Ok(permit) => Ok(permit.expect("the semaphore is never closed")),
            Err(_) => Err(Rejected::QueueTimeout(self.limits.queue_timeout)),
        }
    }
}
