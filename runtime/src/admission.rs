//! Admission control per function: at most `max_concurrency` invocations run
//! at once; the excess waits in a bounded queue (backpressure), and only a
//! full queue or a wait past `queue_timeout` is rejected.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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
    slots: Arc<Semaphore>,
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
            slots: Arc::new(Semaphore::new(limits.max.get() as usize)),
            waiting: AtomicU32::new(0),
            limits,
            depth,
        }
    }

    /// Waits for a slot; the permit frees it on drop (it may move to the
    /// task that runs the invocation).
    pub async fn enter(&self) -> Result<OwnedSemaphorePermit, Rejected> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let queued = self.waiting.fetch_add(1, Ordering::Relaxed);
        self.depth.set(i64::from(queued) + 1);
        let _waiting = Waiting(self);
        if queued >= self.limits.queue {
            return Err(Rejected::QueueFull(queued));
        }
        match tokio::time::timeout(
            self.limits.queue_timeout,
            self.slots.clone().acquire_owned(),
        )
        .await
        {
            Ok(permit) => Ok(permit.expect("the semaphore is never closed")),
            Err(_) => Err(Rejected::QueueTimeout(self.limits.queue_timeout)),
        }
    }

    /// A slot if one is free now.
    pub fn try_enter(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// Waits for a slot however long it takes, outside the bounded queue:
    /// for triggers whose events wait in a store of their own (queue
    /// messages, blobs, durable work), which would otherwise be refused,
    /// put back and taken again in a loop. Dropping the future leaves the
    /// line.
    pub async fn enter_patiently(&self) -> OwnedSemaphorePermit {
        self.slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    /// The host-wide gate: a pool slot for the instance, waited for within
    /// the function's queue timeout (`patient`: however long it takes).
    /// Functions' `max_concurrency` may add up to more than the pool holds;
    /// the excess waits here instead of failing.
    pub async fn enter_pool(
        &self,
        pool: &Arc<Semaphore>,
        patient: bool,
    ) -> Result<OwnedSemaphorePermit, Rejected> {
        if let Ok(permit) = pool.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if patient {
            return Ok(pool
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed"));
        }
        match tokio::time::timeout(self.limits.queue_timeout, pool.clone().acquire_owned()).await {
            Ok(permit) => Ok(permit.expect("the semaphore is never closed")),
            Err(_) => Err(Rejected::QueueTimeout(self.limits.queue_timeout)),
        }
    }
}
