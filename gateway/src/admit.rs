//! Admission: get a slot now, or wait in the model's queue for one.
//!
//! A client that disconnects while queued makes hyper drop the request future, and with
//! it the `QueueTicket` below, whose `Drop` takes the request out of the queue at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::job::Job;
use crate::pool::{ModelPool, SlotGuard, TryClaim};

/// How a request's wait for a slot ended. Not errors: each is an ordinary outcome that the
/// caller turns into a response.
#[derive(Debug)]
pub enum Admission {
    /// A slot was claimed after waiting `waited`.
    Admitted { guard: SlotGuard, waited: Duration },
    /// The queue was full on arrival.
    QueueFull { queued: usize },
    /// The predicted wait exceeded the queue timeout on arrival.
    WontStart { eta: Duration },
    /// No slot freed up within the queue timeout.
    TimedOut { waited: Duration },
    /// Every backend of the model is down.
    NoBackend,
}

/// Claim a slot in `pool` for `job`, waiting up to its queue timeout. While it waits,
/// `place` (if given) holds its queue id plus one, for [`ModelPool::queue_status`].
pub async fn admit(pool: &Arc<ModelPool>, job: Arc<Job>, place: Option<&AtomicU64>) -> Admission {
    let start = Instant::now();
    let (id, rx) = match pool.try_claim(job) {
        TryClaim::Claimed(guard) => {
            return Admission::Admitted {
                guard,
                waited: Duration::ZERO,
            }
        }
        TryClaim::QueueFull { queued } => return Admission::QueueFull { queued },
        TryClaim::WontStart { eta, .. } => return Admission::WontStart { eta },
        TryClaim::NoBackend => return Admission::NoBackend,
        TryClaim::Queued { id, rx } => (id, rx),
    };
    if let Some(p) = place {
        p.store(id + 1, Ordering::Release);
    }
    let mut ticket = QueueTicket {
        pool,
        id,
        rx: Some(rx),
    };
    let rx = ticket.rx.as_mut().expect("set above");
    match tokio::time::timeout(pool.limits().timeout, rx).await {
        Ok(Ok(guard)) => {
            ticket.rx = None;
            Admission::Admitted {
                guard,
                waited: start.elapsed(),
            }
        }
        // The sender only disappears if the pool itself is dropped (e.g. on reload).
        Ok(Err(_)) => Admission::NoBackend,
        Err(_) => {
            let waited = start.elapsed();
            drop(ticket);
            Admission::TimedOut { waited }
        }
    }
}

/// A place in the queue. Dropping it (timeout, or the client went away) leaves the queue.
struct QueueTicket<'a> {
    pool: &'a Arc<ModelPool>,
    id: u64,
    rx: Option<oneshot::Receiver<SlotGuard>>,
}

impl Drop for QueueTicket<'_> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        if !self.pool.leave_queue(self.id) {
            // We were already popped: a slot is on its way or has arrived. Take it so that
            // dropping it hands the slot straight to the next waiter instead of leaking it.
            rx.close();
            drop(rx.try_recv());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, Health};
    use crate::balance::LeastLoaded;
    use crate::pool::QueueLimits;

    fn pool(timeout_ms: u64) -> Arc<ModelPool> {
        let b = Backend::new("b".into(), "http://h:1".parse().unwrap(), Some(1));
        b.set_health(Health::Up);
        Arc::new(ModelPool::new(
            "m".into(),
            vec![Arc::new(b)],
            Box::new(LeastLoaded::default()),
            QueueLimits {
                max: Some(4),
                per_slot: 4,
                timeout: Duration::from_millis(timeout_ms),
                aging: Duration::from_secs(30),
            },
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_request_times_out_and_leaves_the_queue() {
        let p = pool(500);
        let _busy = match admit(&p, Arc::new(Job::default()), None).await {
            Admission::Admitted { guard, .. } => guard,
            other => panic!("{other:?}"),
        };
        match admit(&p, Arc::new(Job::default()), None).await {
            Admission::TimedOut { waited } => assert!(waited >= Duration::from_millis(500)),
            other => panic!("{other:?}"),
        }
        assert_eq!(p.queue_len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_waiter_leaves_the_queue_and_loses_no_slot() {
        let p = pool(60_000);
        let busy = match admit(&p, Arc::new(Job::default()), None).await {
            Admission::Admitted { guard, .. } => guard,
            other => panic!("{other:?}"),
        };
        let p2 = p.clone();
        let waiter = tokio::spawn(async move { admit(&p2, Arc::new(Job::default()), None).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(p.queue_len(), 1);
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(p.queue_len(), 0);
        drop(busy);
        assert_eq!(p.backends()[0].inflight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn released_slot_admits_the_waiter() {
        let p = pool(60_000);
        let busy = match admit(&p, Arc::new(Job::default()), None).await {
            Admission::Admitted { guard, .. } => guard,
            other => panic!("{other:?}"),
        };
        let p2 = p.clone();
        let waiter = tokio::spawn(async move { admit(&p2, Arc::new(Job::default()), None).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(busy);
        match waiter.await.unwrap() {
            Admission::Admitted { waited, .. } => assert!(waited >= Duration::from_millis(100)),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            p.backends()[0].inflight(),
            0,
            "the waiter's guard was dropped with it"
        );
    }
}
