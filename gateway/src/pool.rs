//! A model's pool: its backends, its routing policy and its queue of waiting requests
//! (first come, first served, unless priorities are in use; see [`QueueLimits::aging`]).
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
use tokio::time::Instant;

use crate::backend::{Backend, Health};
use crate::balance::{Outcome, Plan, Policy};
use crate::job::Job;

/// Queue limits for one model.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Fixed cap on waiters; `None` sizes it from the pool's slots (see [`ModelPool::max_queue`]).
    pub max: Option<usize>,
    /// Waiters per slot when `max` is not set.
    pub per_slot: usize,
    /// How long a request may wait for a slot.
    pub timeout: Duration,
    /// How long a wait is worth one priority level: a request that has waited this long
    /// goes ahead of one a level above it that just arrived, so nothing starves.
    pub aging: Duration,
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
    /// The policy reads prompts ([`Policy::reads_prompt`]), kept outside the queue's lock
    /// because every request asks.
    reads_prompt: AtomicBool,
}

/// The backends as one shared, immutable list.
pub type Backends = Arc<[Arc<Backend>]>;

#[derive(Debug)]
struct Queue {
    limits: QueueLimits,
    policy: Box<dyn Policy>,
    backends: Backends,
    waiters: VecDeque<Waiter>,
    /// Waiters whose priority is not 0; while there are none the queue is plain FIFO.
    prioritized: usize,
    next_id: u64,
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    tx: oneshot::Sender<SlotGuard>,
    job: Arc<Job>,
    since: Instant,
}

/// A claimed slot on one backend. Dropping it frees the slot and hands it to the oldest
/// waiter, exactly once, whether the response ended, failed or the client went away.
#[derive(Debug)]
pub struct SlotGuard {
    pool: Arc<ModelPool>,
    backend: Arc<Backend>,
    job: Arc<Job>,
    /// The slot plan and its entry in the backend's ledger, under slot-planning policies.
    booked: Option<Booked>,
}

#[derive(Debug)]
struct Booked {
    plan: Plan,
    work_id: u64,
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
    /// The request is predicted to wait longer than the queue timeout: refused at once.
    WontStart { eta: Duration, queued: usize },
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
            reads_prompt: AtomicBool::new(policy.reads_prompt()),
            configured: Mutex::new(backends.clone()),
            queue: Mutex::new(Queue {
                limits,
                policy,
                backends: backends.into(),
                waiters: VecDeque::new(),
                prioritized: 0,
                next_id: 0,
            }),
            removed: AtomicBool::new(false),
            discovering: AtomicBool::new(false),
        }
    }

    /// Whether requests' prompts should be read into their [`Job`]s for the policy.
    pub fn reads_prompt(&self) -> bool {
        self.reads_prompt.load(Ordering::Relaxed)
    }

    /// The queue limits in force.
    pub fn limits(&self) -> QueueLimits {
        self.lock().limits
    }

    /// Change the queue limits and policy (a reload); waiters may fit a larger queue now.
    pub fn reconfigure(self: &Arc<Self>, limits: QueueLimits, policy: Box<dyn Policy>) {
        let mut q = self.lock();
        q.limits = limits;
        self.reads_prompt
            .store(policy.reads_prompt(), Ordering::Relaxed);
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
        self.lock().cap()
    }

    /// Requests waiting now.
    pub fn queue_len(&self) -> usize {
        self.lock().waiters.len()
    }

    /// Whether a request arriving now would be refused for a full queue (unless a slot
    /// frees first).
    pub fn queue_is_full(&self) -> bool {
        self.lock().is_full()
    }

    /// Claim a slot now if the policy finds one and nobody is waiting ahead of us;
    /// otherwise join the queue (or learn why not).
    // Out of line, so that a profile of the whole-program-optimised release build names
    // it (loadtest/bench/instructions.sh breaks the gateway's work down by function).
    #[inline(never)]
    pub fn try_claim(self: &Arc<Self>, job: Arc<Job>) -> TryClaim {
        let mut q = self.lock();
        // Fairness: a newcomer never overtakes requests already waiting.
        if q.waiters.is_empty() {
            if let Some(guard) = self.claim_locked(&q, &job) {
                return TryClaim::Claimed(guard);
            }
        }
        if q.backends
            .iter()
            .all(|b| b.health() == Health::Down || b.is_retired())
        {
            return TryClaim::NoBackend;
        }
        let queued = q.waiters.len();
        if q.is_full() {
            return TryClaim::QueueFull { queued };
        }
        // Honest admission: if the policy predicts that this request could not start within
        // the queue timeout, say so now instead of after the timeout.
        let now = Instant::now();
        let ahead = q.ahead_of(None, job.priority, now);
        if let Some(eta) = q.policy.start_eta(&q.backends, &ahead, &job) {
            if eta > q.limits.timeout {
                return TryClaim::WontStart { eta, queued };
            }
        }
        drop(ahead);
        let (tx, rx) = oneshot::channel();
        let id = q.next_id;
        q.next_id += 1;
        if job.priority != 0 {
            q.prioritized += 1;
        }
        q.waiters.push_back(Waiter {
            id,
            tx,
            job,
            since: now,
        });
        TryClaim::Queued { id, rx }
    }

    /// A waiter's place in the queue (1 = next) and when it is predicted to start.
    pub fn queue_status(&self, id: u64) -> Option<(usize, Option<Duration>)> {
        let q = self.lock();
        let w = q.waiters.iter().find(|w| w.id == id)?;
        let now = Instant::now();
        let ahead = q.ahead_of(Some(w), w.job.priority, now);
        let eta = q.policy.start_eta(&q.backends, &ahead, &w.job);
        Some((ahead.len() + 1, eta))
    }

    /// Learn from a finished request (rates, answer lengths) for the policy that routed it.
    pub fn observe(&self, guard: &SlotGuard, outcome: &Outcome) {
        let q = self.lock();
        if let Some(b) = &guard.booked {
            q.policy
                .observe(&guard.backend, &guard.job, &b.plan, outcome);
        }
    }

    /// Remove a waiter that gave up (timed out or its client went away).
    ///
    /// Returns `false` if it was no longer queued, i.e. a slot was already sent to it;
    /// that slot then arrives on its receiver (or is released when the receiver drops).
    pub fn leave_queue(&self, id: u64) -> bool {
        let mut q = self.lock();
        match q.waiters.iter().position(|w| w.id == id) {
            Some(pos) => {
                if let Some(w) = q.waiters.remove(pos) {
                    if w.job.priority != 0 {
                        q.prioritized -= 1;
                    }
                }
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
            let next = q.next_waiter(Instant::now());
            let job = q.waiters[next].job.clone();
            let Some(guard) = self.claim_locked(q, &job) else {
                return;
            };
            let waiter = q.waiters.remove(next).expect("index from next_waiter");
            if waiter.job.priority != 0 {
                q.prioritized -= 1;
            }
            if let Err(guard) = waiter.tx.send(guard) {
                // The waiter's future was dropped between leaving and being removed.
                // Undo the claim by hand: dropping the guard here would re-enter this lock.
                guard.unbook();
                guard.backend.sub_inflight();
                std::mem::forget(guard);
            }
        }
    }

    /// Pick a backend and claim a slot on it. Must be called with the queue lock held so
    /// that pick-then-increment (and the ledger entry) is atomic with respect to other
    /// claims.
    fn claim_locked(self: &Arc<Self>, q: &Queue, job: &Arc<Job>) -> Option<SlotGuard> {
        let pick = q.policy.pick(&q.backends, job)?;
        let backend = q.backends[pick.index].clone();
        backend.add_inflight();
        let booked = pick.plan.map(|plan| {
            let work_id = backend.ledger().assign(plan.slot, job, plan.work_secs);
            Booked { plan, work_id }
        });
        Some(SlotGuard {
            pool: self.clone(),
            backend,
            job: job.clone(),
            booked,
        })
    }

    fn release(self: &Arc<Self>, guard: &SlotGuard) {
        let mut q = self.lock();
        guard.unbook();
        guard.backend.sub_inflight();
        self.dispatch_locked(&mut q);
    }
}

impl Queue {
    /// The queue cap: fixed, or `per_slot` × slots (at least `per_slot`).
    fn cap(&self) -> usize {
        self.limits.max.unwrap_or_else(|| {
            let slots: u32 = self.backends.iter().map(|b| b.slots()).sum();
            self.limits.per_slot * (slots.max(1) as usize)
        })
    }

    /// Whether a newcomer would be refused rather than queued.
    fn is_full(&self) -> bool {
        self.waiters.len() >= self.cap()
    }

    /// The waiter to serve next: the oldest, or with priorities in use the highest
    /// priority after aging (each `aging` waited counts as one level), oldest first among
    /// equals.
    fn next_waiter(&self, now: Instant) -> usize {
        if self.prioritized == 0 {
            return 0;
        }
        let mut best = (0, f64::NEG_INFINITY);
        for (i, w) in self.waiters.iter().enumerate() {
            let s = self.score(w.job.priority, w.since, now);
            if s > best.1 {
                best = (i, s);
            }
        }
        best.0
    }

    fn score(&self, priority: i32, since: Instant, now: Instant) -> f64 {
        let aging = self.limits.aging.as_secs_f64().max(1e-3);
        f64::from(priority) + now.saturating_duration_since(since).as_secs_f64() / aging
    }

    /// The jobs of the waiters that will be served before `me` (an existing waiter, or a
    /// newcomer of `priority` when `None`), in their order.
    fn ahead_of(&self, me: Option<&Waiter>, priority: i32, now: Instant) -> Vec<&Job> {
        let my_id = me.map_or(u64::MAX, |w| w.id);
        if self.prioritized == 0 && priority == 0 {
            return self
                .waiters
                .iter()
                .take_while(|w| w.id < my_id)
                .map(|w| &*w.job)
                .collect();
        }
        let mine = self.score(priority, me.map_or(now, |w| w.since), now);
        let mut ahead: Vec<(f64, &Waiter)> = self
            .waiters
            .iter()
            .map(|w| (self.score(w.job.priority, w.since, now), w))
            .filter(|(s, w)| w.id != my_id && (*s > mine || (*s == mine && w.id < my_id)))
            .collect();
        ahead.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal));
        ahead.into_iter().map(|(_, w)| &*w.job).collect()
    }
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

    /// The request this slot serves.
    pub fn job(&self) -> &Arc<Job> {
        &self.job
    }

    /// The slot plan, under a slot-planning policy.
    pub fn plan(&self) -> Option<&Plan> {
        self.booked.as_ref().map(|b| &b.plan)
    }

    /// The slot id to send as `id_slot`: only a planned slot, only one the backend itself
    /// reported having (the older BitNet server defers a request for a missing slot
    /// forever), only with more than one slot to choose from, and never over the client's
    /// own choice.
    pub fn pin_slot(&self) -> Option<u32> {
        let slot = u32::try_from(self.plan()?.slot).ok()?;
        (self.job.can_pin && self.backend.has_slot(1) && self.backend.has_slot(slot))
            .then_some(slot)
    }

    fn unbook(&self) {
        if let Some(b) = &self.booked {
            self.backend.ledger().finish(b.plan.slot, b.work_id);
        }
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.pool.clone().release(self);
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
                aging: Duration::from_secs(30),
            },
        ))
    }

    fn job() -> Arc<Job> {
        Arc::new(Job::default())
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
        let g1 = claimed(p.try_claim(job()));
        let g2 = claimed(p.try_claim(job()));
        assert_eq!(p.backends()[0].inflight(), 2);
        drop(g1);
        assert_eq!(p.backends()[0].inflight(), 1);
        drop(g2);
        assert_eq!(p.backends()[0].inflight(), 0);
    }

    #[test]
    fn freed_slot_goes_to_the_oldest_waiter() {
        let p = pool(&[1], None);
        let g = claimed(p.try_claim(job()));
        let TryClaim::Queued { rx: mut rx1, .. } = p.try_claim(job()) else {
            panic!()
        };
        let TryClaim::Queued { rx: mut rx2, .. } = p.try_claim(job()) else {
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
        let _a = claimed(p.try_claim(job()));
        let _b = claimed(p.try_claim(job()));
        let TryClaim::Queued { rx, .. } = p.try_claim(job()) else {
            panic!()
        };
        // A backend grows a slot but nobody dispatches yet: the next request must still queue.
        assert!(matches!(p.try_claim(job()), TryClaim::Queued { .. }));
        drop(rx);
    }

    #[test]
    fn queue_full_when_limit_reached() {
        let p = pool(&[1], Some(1));
        let _g = claimed(p.try_claim(job()));
        let _q = p.try_claim(job());
        assert!(matches!(
            p.try_claim(job()),
            TryClaim::QueueFull { queued: 1 }
        ));
    }

    #[test]
    fn default_queue_cap_scales_with_slots() {
        assert_eq!(pool(&[1], None).max_queue(), 4);
        assert_eq!(pool(&[2, 2, 4], None).max_queue(), 32);
    }

    #[test]
    fn a_slot_sent_to_a_vanished_waiter_is_not_leaked() {
        let p = pool(&[1], None);
        let g = claimed(p.try_claim(job()));
        let TryClaim::Queued { rx, .. } = p.try_claim(job()) else {
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
        let _g = claimed(p.try_claim(job()));
        let TryClaim::Queued { id, .. } = p.try_claim(job()) else {
            panic!()
        };
        assert_eq!(p.queue_len(), 1);
        assert!(p.leave_queue(id));
        assert_eq!(p.queue_len(), 0);
        assert!(!p.leave_queue(id));
    }

    fn queued(t: TryClaim) -> oneshot::Receiver<SlotGuard> {
        match t {
            TryClaim::Queued { rx, .. } => rx,
            other => panic!("expected to queue, got {other:?}"),
        }
    }

    fn with_priority(p: i32) -> Arc<Job> {
        Arc::new(Job {
            priority: p,
            ..Job::default()
        })
    }

    #[test]
    fn higher_priority_goes_first_and_a_long_wait_outranks_it() {
        let p = pool(&[1], None);
        let g = claimed(p.try_claim(job()));
        let mut low = queued(p.try_claim(with_priority(0)));
        let mut high = queued(p.try_claim(with_priority(3)));
        assert_eq!(p.queue_status(1).map(|s| s.0), Some(1), "high is next");
        assert_eq!(p.queue_status(0).map(|s| s.0), Some(2));
        drop(g);
        let g = high
            .try_recv()
            .expect("the higher priority was served first");
        assert!(low.try_recv().is_err());
        drop(g);
        let _g = low.try_recv().expect("then the other");

        // With aging at 10 ms per level, 50 ms of waiting outranks 3 levels.
        let p = Arc::new(ModelPool::new(
            "m".into(),
            p.backends().to_vec(),
            Box::new(LeastLoaded::default()),
            QueueLimits {
                max: None,
                per_slot: 4,
                timeout: Duration::from_secs(1),
                aging: Duration::from_millis(10),
            },
        ));
        drop(_g);
        let g = claimed(p.try_claim(job()));
        let mut old = queued(p.try_claim(with_priority(0)));
        std::thread::sleep(Duration::from_millis(50));
        let mut fresh = queued(p.try_claim(with_priority(3)));
        drop(g);
        let _served = old.try_recv().expect("aging lets the long waiter through");
        assert!(fresh.try_recv().is_err());
    }

    #[test]
    fn prompts_are_read_only_for_a_policy_that_uses_them_and_a_reload_changes_that() {
        let p = pool(&[1], None);
        assert!(!p.reads_prompt());
        p.reconfigure(
            p.limits(),
            crate::balance::PolicyKind::PredictedTtft.build(Default::default()),
        );
        assert!(p.reads_prompt());
        p.reconfigure(
            p.limits(),
            crate::balance::PolicyKind::RoundRobin.build(Default::default()),
        );
        assert!(!p.reads_prompt());
    }

    #[tokio::test(start_paused = true)]
    async fn a_predicting_policy_refuses_a_request_that_would_wait_past_the_timeout() {
        let b = Backend::new("b".into(), "http://h:1".parse().unwrap(), Some(1));
        b.set_health(Health::Up);
        let p = Arc::new(ModelPool::new(
            "m".into(),
            vec![Arc::new(b)],
            crate::balance::PolicyKind::PredictedTtft.build(Default::default()),
            QueueLimits {
                max: None,
                per_slot: 4,
                timeout: Duration::from_secs(30),
                aging: Duration::from_secs(30),
            },
        ));
        let answer = |n: u32| {
            Arc::new(Job {
                max_tokens: Some(n),
                ..Job::default()
            })
        };
        // 200 tokens at 18 tokens/s: about 11 s ahead of the next request.
        let _running = claimed(p.try_claim(answer(200)));
        let _first = queued(p.try_claim(answer(200)));
        let (position, eta) = p.queue_status(0).unwrap();
        assert_eq!(position, 1);
        let eta = eta.expect("this policy predicts");
        assert!(
            eta > Duration::from_secs(9) && eta < Duration::from_secs(13),
            "{eta:?}"
        );
        let _second = queued(p.try_claim(answer(200)));
        // A third would start after about 33 s, past the 30 s timeout.
        match p.try_claim(answer(200)) {
            TryClaim::WontStart { eta, queued } => {
                assert_eq!(queued, 2);
                assert!(eta > Duration::from_secs(30), "{eta:?}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(p.queue_len(), 2);
    }

    #[test]
    fn all_backends_down_is_reported_instead_of_queueing() {
        let p = pool(&[1, 1], None);
        for b in p.backends().iter() {
            b.set_health(Health::Down);
        }
        assert!(matches!(p.try_claim(job()), TryClaim::NoBackend));
    }
}
