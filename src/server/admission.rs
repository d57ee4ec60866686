//! Admission control: at most `max_running` sequences hold a slot in the engine; up to
//! `queue_size` requests wait for one; a full queue answers 429 at once. Each request has a
//! deadline, `queue_timeout` after its arrival, for the engine to start it: the wait here for
//! a slot is the first part of it, the wait in the engine's queue (for KV blocks) the rest (the
//! handler enforces that part; a prefill under way is never cut off). Past it, 503 and dropped. Nothing waits forever.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;
use super::metrics as m;

pub struct Admission {
    slots: Arc<Semaphore>,
    max_running: usize,
    queue_size: usize,
    queue_timeout: Duration,
    queued: AtomicUsize,
    closed: AtomicBool,
}

/// Decrements the queue count however the wait ends (granted, timed out, or cancelled
/// because the client went away).
struct QueuedGuard<'a>(&'a AtomicUsize);

impl Drop for QueuedGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Admission {
    pub fn new(max_running: usize, queue_size: usize, queue_timeout: Duration) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max_running)),
            max_running,
            queue_size,
            queue_timeout,
            queued: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
        }
    }

    /// How long a request may wait, from its arrival, for its first token.
    pub fn queue_timeout(&self) -> Duration {
        self.queue_timeout
    }

    /// The error of a request whose deadline passed (counted as a `queue_timeout` rejection).
    pub fn timed_out(&self) -> ApiError {
        m::record_rejection("queue_timeout");
        ApiError::queue_timeout(self.queue_timeout.as_secs_f64())
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Stops admitting: every later request is answered 503.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Waits for `n` slots (one per sequence of the request), until `deadline` at most.
    pub async fn acquire(&self, n: usize, deadline: Instant) -> Result<OwnedSemaphorePermit, ApiError> {
        if self.closed.load(Ordering::SeqCst) {
            m::record_rejection("shutting_down");
            return Err(ApiError::shutting_down());
        }
        if n > self.max_running {
            return Err(ApiError::invalid_param(
                "n",
                format!("'n' is {n}, but at most {} sequences run at once", self.max_running),
            ));
        }
        if let Ok(permit) = self.slots.clone().try_acquire_many_owned(n as u32) {
            return Ok(permit);
        }
        // Reserve a queue place atomically, so the bound holds under concurrent arrivals.
        let reserved =
            self.queued.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| (q < self.queue_size).then_some(q + 1));
        if reserved.is_err() {
            m::record_rejection("queue_full");
            return Err(ApiError::queue_full(1));
        }
        let _guard = QueuedGuard(&self.queued);
        match tokio::time::timeout_at(deadline.into(), self.slots.clone().acquire_many_owned(n as u32)).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(ApiError::shutting_down()),
            Err(_) => Err(self.timed_out()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deadline `queue_timeout` from now, as a handler sets it at arrival.
    fn soon(a: &Admission) -> Instant {
        Instant::now() + a.queue_timeout()
    }

    #[tokio::test]
    async fn a_full_queue_is_refused_at_once_and_waiters_time_out() {
        let a = Arc::new(Admission::new(1, 1, Duration::from_millis(200)));
        let held = a.acquire(1, soon(&a)).await.unwrap();
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { a.acquire(1, soon(&a)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(a.queued(), 1);
        let refused = a.acquire(1, soon(&a)).await.unwrap_err();
        assert_eq!(refused.status, 429);
        assert!(refused.retry_after.is_some());
        let timed_out = waiter.await.unwrap().unwrap_err();
        assert_eq!(timed_out.status, 503);
        assert_eq!(a.queued(), 0);
        drop(held);
        assert!(a.acquire(1, soon(&a)).await.is_ok());
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_waiter() {
        let a = Arc::new(Admission::new(2, 4, Duration::from_secs(5)));
        let held = a.acquire(2, soon(&a)).await.unwrap();
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { a.acquire(1, soon(&a)).await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        assert!(waiter.await.unwrap().is_ok());
        assert_eq!(a.acquire(3, soon(&a)).await.unwrap_err().status, 400, "more sequences than can ever run");
    }

    #[tokio::test]
    async fn a_cancelled_wait_leaves_the_queue() {
        let a = Arc::new(Admission::new(1, 1, Duration::from_secs(5)));
        let _held = a.acquire(1, soon(&a)).await.unwrap();
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { a.acquire(1, soon(&a)).await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(a.queued(), 0);
        a.close();
        assert_eq!(a.acquire(1, soon(&a)).await.unwrap_err().status, 503);
    }
}
