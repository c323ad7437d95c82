//! A model's pool: its backends, its routing policy and its FIFO queue of waiting requests.
//!
//! The backend set can change at run time (runner or DNS discovery, reload): it is an
//! immutable list swapped as a whole, so a reader takes a cheap snapshot and never sees a
//! half-updated set. Claiming a slot, queueing, handing a freed slot to the head of the
//! queue and swapping the backend set all happen under one short `std::sync::Mutex` per pool. The critical sections are O(backends) or
//! O(1) and never await, which is what makes "the freed slot goes to the oldest waiter" and
//! "a slot is never handed out twice" easy to see and to test.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::backend::{Backend, Health};
use crate::balance::Policy;

/// Queue limits for one model.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Fixed cap on waiters; `None` sizes it from the pool's slots (see [`ModelPool::max_queue`]).
    pub max: Option<usize>,
    /// Waiters per slot when `max` is not set.
    pub per_slot: usize,
    /// How long a request may wait for a slot.
    pub timeout: Duration,
}

/// The backends that serve one model, and the requests waiting for them.
#[derive(Debug)]
pub struct ModelPool {
    /// The model id clients use.
    pub id: String,
    queue: Mutex<Queue>,
    /// The backends listed in the config (discovery adds others to these).
    configured: Mutex<Vec<Arc<Backend>>>,
    /// Taken out of the config by a reload: discovery for it stops.
    removed: AtomicBool,
    /// A discovery loop is running for it.
    pub(crate) discovering: AtomicBool,
}

/// The backends as one shared, immutable list.
pub type Backends = Arc<[Arc<Backend>]>;

#[derive(Debug)]
struct Queue {
    limits: QueueLimits,
    policy: Box<dyn Policy>,
    backends: Backends,
    waiters: VecDeque<Waiter>,
    next_id: u64,
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    tx: oneshot::Sender<SlotGuard>,
}

/// A claimed slot on one backend. Dropping it frees the slot and hands it to the oldest
/// waiter, exactly once, whether the response ended, failed or the client went away.
#[derive(Debug)]
pub struct SlotGuard {
    pool: Arc<ModelPool>,
    backend: Arc<Backend>,
}

/// Result of trying to claim a slot without waiting.
#[derive(Debug)]
pub enum TryClaim {
    /// A slot was claimed.
    Claimed(SlotGuard),
    /// The request was put at the back of the queue and will receive a slot on `rx`.
    Queued {
        id: u64,
        rx: oneshot::Receiver<SlotGuard>,
    },
    /// The queue is at its limit.
    QueueFull { queued: usize },
    /// Every backend is down; waiting would not help.
    NoBackend,
}

impl ModelPool {
    /// A pool with the given backends and policy.
    pub fn new(
        id: String,
        backends: Vec<Arc<Backend>>,
        policy: Box<dyn Policy>,
        limits: QueueLimits,
    ) -> ModelPool {
        ModelPool {
            id,
            configured: Mutex::new(backends.clone()),
            queue: Mutex::new(Queue {
                limits,
                policy,
                backends: backends.into(),
                waiters: VecDeque::new(),
                next_id: 0,
            }),
            removed: AtomicBool::new(false),
            discovering: AtomicBool::new(false),
        }
    }

    /// The queue limits in force.
    pub fn limits(&self) -> QueueLimits {
        self.lock().limits
    }

    /// Change the queue limits and policy (a reload); waiters may fit a larger queue now.
    pub fn reconfigure(self: &Arc<Self>, limits: QueueLimits, policy: Box<dyn Policy>) {
        let mut q = self.lock();
        q.limits = limits;
        q.policy = policy;
        self.dispatch_locked(&mut q);
    }

    /// The backends listed in the config.
    pub fn configured(&self) -> Vec<Arc<Backend>> {
        self.configured
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replace the backends listed in the config (a reload).
    pub fn set_configured(&self, backends: Vec<Arc<Backend>>) {
        *self.configured.lock().unwrap_or_else(|e| e.into_inner()) = backends;
    }

    /// Mark the model as removed by a reload.
    pub fn remove(&self) {
        self.removed.store(true, Ordering::Release);
    }

    /// Whether a reload removed the model.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// A snapshot of the backends.
    pub fn backends(&self) -> Backends {
        self.lock().backends.clone()
    }

    /// Replace the backend set, e.g. after discovery. Requests already running keep their
    /// slot guards (and so their backends) until they end; waiters may fit the new set.
    pub fn set_backends(self: &Arc<Self>, backends: Vec<Arc<Backend>>) {
        let mut q = self.lock();
        q.backends = backends.into();
        self.dispatch_locked(&mut q);
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding this lock cannot leave the queue half-updated in a way
        // that matters more than refusing all traffic would, so recover from poisoning.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Total slots of the backends that are up (or not yet known to be down).
    pub fn total_slots(&self) -> u32 {
        self.backends()
            .iter()
            .filter(|b| b.health() != Health::Down)
            .map(|b| b.slots())
            .sum()
    }

    /// The queue cap in force: fixed, or `per_slot` × slots (at least `per_slot`), so that
    /// a bigger fleet queues proportionally more before refusing.
    pub fn max_queue(&self) -> usize {
        let q = self.lock();
        cap(&q.limits, &q.backends)
    }

    /// Requests waiting now.
    pub fn queue_len(&self) -> usize {
        self.lock().waiters.len()
    }

    /// Claim a slot now if the policy finds one and nobody is waiting ahead of us;
    /// otherwise join the queue (or learn why not).
    pub fn try_claim(self: &Arc<Self>) -> TryClaim {
        let mut q = self.lock();
        // FIFO fairness: a newcomer never overtakes requests already waiting.
        if q.waiters.is_empty() {
            if let Some(guard) = self.claim_locked(&q) {
                return TryClaim::Claimed(guard);
            }
        }
        if q.backends
            .iter()
            .all(|b| b.health() == Health::Down || b.is_retired())
        {
            return TryClaim::NoBackend;
        }
        let max = cap(&q.limits, &q.backends);
        if q.waiters.len() >= max {
            return TryClaim::QueueFull {
                queued: q.waiters.len(),
            };
        }
        let (tx, rx) = oneshot::channel();
        let id = q.next_id;
        q.next_id += 1;
        q.waiters.push_back(Waiter { id, tx });
        TryClaim::Queued { id, rx }
    }

    /// Remove a waiter that gave up (timed out or its client went away).
    ///
    /// Returns `false` if it was no longer queued, i.e. a slot was already sent to it;
    /// that slot then arrives on its receiver (or is released when the receiver drops).
    pub fn leave_queue(&self, id: u64) -> bool {
        let mut q = self.lock();
        match q.waiters.iter().position(|w| w.id == id) {
            Some(pos) => {
                q.waiters.remove(pos);
                true
            }
            None => false,
        }
    }

    /// Hand free slots to waiters, oldest first. Called when a slot is freed and when a
    /// backend comes up or grows its slot count.
    pub fn dispatch_waiting(self: &Arc<Self>) {
        let mut q = self.lock();
        self.dispatch_locked(&mut q);
    }

    fn dispatch_locked(self: &Arc<Self>, q: &mut Queue) {
        while !q.waiters.is_empty() {
            let Some(guard) = self.claim_locked(q) else {
                return;
            };
            let waiter = q.waiters.pop_front().expect("checked non-empty");
            if let Err(guard) = waiter.tx.send(guard) {
                // The waiter's future was dropped between leaving and being removed.
                // Undo the claim by hand: dropping the guard here would re-enter this lock.
                guard.backend.sub_inflight();
                std::mem::forget(guard);
            }
        }
    }

    /// Pick a backend and claim a slot on it. Must be called with the queue lock held so
    /// that pick-then-increment is atomic with respect to other claims.
    fn claim_locked(self: &Arc<Self>, q: &Queue) -> Option<SlotGuard> {
        let i = q.policy.pick(&q.backends)?;
        let backend = q.backends[i].clone();
        backend.add_inflight();
        Some(SlotGuard {
            pool: self.clone(),
            backend,
        })
    }

    fn release(self: &Arc<Self>, backend: &Backend) {
        let mut q = self.lock();
        backend.sub_inflight();
        self.dispatch_locked(&mut q);
    }
}

/// The queue cap: fixed, or `per_slot` × slots (at least `per_slot`).
fn cap(limits: &QueueLimits, backends: &[Arc<Backend>]) -> usize {
    limits.max.unwrap_or_else(|| {
        let slots: u32 = backends.iter().map(|b| b.slots()).sum();
        limits.per_slot * (slots.max(1) as usize)
    })
}

impl SlotGuard {
    /// The backend this slot belongs to.
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    /// The pool this slot belongs to.
    pub fn pool(&self) -> &Arc<ModelPool> {
        &self.pool
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.pool.release(&self.backend);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::LeastLoaded;

    fn pool(slots: &[u32], max_queue: Option<usize>) -> Arc<ModelPool> {
        let backends = slots
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                let b = Backend::new(format!("b{i}"), "http://h:1".parse().unwrap(), Some(s));
                b.set_health(Health::Up);
                Arc::new(b)
            })
            .collect();
        Arc::new(ModelPool::new(
            "m".into(),
            backends,
            Box::new(LeastLoaded::default()),
            QueueLimits {
                max: max_queue,
                per_slot: 4,
                timeout: Duration::from_secs(1),
            },
        ))
    }

    fn claimed(t: TryClaim) -> SlotGuard {
        match t {
            TryClaim::Claimed(g) => g,
            other => panic!("expected a claim, got {other:?}"),
        }
    }

    #[test]
    fn dropping_a_guard_frees_its_slot_exactly_once() {
        let p = pool(&[2], None);
        let g1 = claimed(p.try_claim());
        let g2 = claimed(p.try_claim());
        assert_eq!(p.backends()[0].inflight(), 2);
        drop(g1);
        assert_eq!(p.backends()[0].inflight(), 1);
        drop(g2);
        assert_eq!(p.backends()[0].inflight(), 0);
    }

    #[test]
    fn freed_slot_goes_to_the_oldest_waiter() {
        let p = pool(&[1], None);
        let g = claimed(p.try_claim());
        let TryClaim::Queued { rx: mut rx1, .. } = p.try_claim() else {
            panic!()
        };
        let TryClaim::Queued { rx: mut rx2, .. } = p.try_claim() else {
            panic!()
        };
        drop(g);
        let g1 = rx1.try_recv().expect("first waiter gets the slot");
        assert!(rx2.try_recv().is_err(), "second waiter still waits");
        assert_eq!(p.backends()[0].inflight(), 1);
        drop(g1);
        let _g2 = rx2.try_recv().expect("then the second");
        assert_eq!(p.queue_len(), 0);
    }

    #[test]
    fn a_newcomer_does_not_overtake_the_queue() {
        let p = pool(&[1, 1], None);
        let _a = claimed(p.try_claim());
        let _b = claimed(p.try_claim());
        let TryClaim::Queued { rx, .. } = p.try_claim() else {
            panic!()
        };
        // A backend grows a slot but nobody dispatches yet: the next request must still queue.
        assert!(matches!(p.try_claim(), TryClaim::Queued { .. }));
        drop(rx);
    }

    #[test]
    fn queue_full_when_limit_reached() {
        let p = pool(&[1], Some(1));
        let _g = claimed(p.try_claim());
        let _q = p.try_claim();
        assert!(matches!(p.try_claim(), TryClaim::QueueFull { queued: 1 }));
    }

    #[test]
    fn default_queue_cap_scales_with_slots() {
        assert_eq!(pool(&[1], None).max_queue(), 4);
        assert_eq!(pool(&[2, 2, 4], None).max_queue(), 32);
    }

    #[test]
    fn a_slot_sent_to_a_vanished_waiter_is_not_leaked() {
        let p = pool(&[1], None);
        let g = claimed(p.try_claim());
        let TryClaim::Queued { rx, .. } = p.try_claim() else {
            panic!()
        };
        drop(rx); // the waiter's future is gone but it was never removed
        drop(g);
        assert_eq!(p.backends()[0].inflight(), 0);
        assert_eq!(p.queue_len(), 0);
    }

    #[test]
    fn leaving_the_queue_removes_the_waiter_at_once() {
        let p = pool(&[1], None);
        let _g = claimed(p.try_claim());
        let TryClaim::Queued { id, .. } = p.try_claim() else {
            panic!()
        };
        assert_eq!(p.queue_len(), 1);
        assert!(p.leave_queue(id));
        assert_eq!(p.queue_len(), 0);
        assert!(!p.leave_queue(id));
    }

    #[test]
    fn all_backends_down_is_reported_instead_of_queueing() {
        let p = pool(&[1, 1], None);
        for b in p.backends().iter() {
            b.set_health(Health::Down);
        }
        assert!(matches!(p.try_claim(), TryClaim::NoBackend));
    }
}
