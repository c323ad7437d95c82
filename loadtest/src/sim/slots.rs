//! Slots: who is processing, who waits, and what each slot's cache holds.
//!
//! Acquiring a slot and using it are separate: [`SlotPool::acquire`] either claims an idle slot
//! at once or queues the request FIFO, and the returned [`Claim`] gives the slot back when it is
//! dropped, however the request ends. Giving a slot back hands it straight to the first waiter
//! that can use it, so a waiter never has to poll.
//!
//! Each slot keeps the tokens it holds (the last prompt plus what was generated for it). A new
//! request reuses the common prefix of those tokens and its prompt, and only the rest costs
//! prompt-evaluation time.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;

/// What a request wants from the pool.
pub(crate) struct Want {
    /// The prompt's tokens.
    pub(crate) prompt: Arc<[u32]>,
    /// A slot the request insists on (`id_slot`); it waits for that one even if others are idle.
    pub(crate) pin: Option<usize>,
    /// Whether the slot's cached prefix may be reused.
    pub(crate) cache_prompt: bool,
    /// Shown by `/slots` while the request runs.
    pub(crate) task: TaskInfo,
}

/// The request a busy slot is working on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TaskInfo {
    pub(crate) id_task: u64,
    pub(crate) n_predict: usize,
}

/// One slot as `/slots` and `/metrics` see it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SlotView {
    pub(crate) id: usize,
    pub(crate) task: Option<TaskInfo>,
    pub(crate) n_cached: usize,
    pub(crate) n_decoded: usize,
}

/// Occupancy totals for `/metrics`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PoolStats {
    pub(crate) processing: usize,
    pub(crate) deferred: usize,
    pub(crate) cached_tokens: usize,
}

/// The slots of one simulated server.
pub(crate) struct SlotPool {
    state: Mutex<PoolState>,
    /// Per-slot progress, outside the lock because generation updates it on every token batch.
    live: Box<[Live]>,
    /// Slots processing, readable without the lock.
    busy: AtomicUsize,
    n_ctx: usize,
    /// Minimum share of a prompt a slot must hold to win over the least recently used one.
    similarity: f64,
}

struct PoolState {
    slots: Vec<Slot>,
    waiters: VecDeque<Waiter>,
    /// Orders slot releases, for least-recently-used choice.
    clock: u64,
}

struct Slot {
    /// Tokens the slot holds. Empty while busy: the [`Claim`] has them.
    cache: Vec<u32>,
    task: Option<TaskInfo>,
    last_used: u64,
}

#[derive(Default)]
struct Live {
    /// Tokens the slot holds, kept up to date while it is busy too.
    cached: AtomicUsize,
    /// Tokens generated so far by the running request.
    decoded: AtomicUsize,
}

struct Waiter {
    want: Want,
    tx: oneshot::Sender<Grant>,
}

/// A slot handed to a request, before it is wrapped in a [`Claim`].
struct Grant {
    idx: usize,
    cache_n: usize,
    tokens: Vec<u32>,
}

// === impl SlotPool ===

impl SlotPool {
    pub(crate) fn new(slots: usize, n_ctx: usize, similarity: f64) -> SlotPool {
        SlotPool {
            state: Mutex::new(PoolState {
                slots: (0..slots)
                    .map(|_| Slot {
                        cache: Vec::new(),
                        task: None,
                        last_used: 0,
                    })
                    .collect(),
                waiters: VecDeque::new(),
                clock: 0,
            }),
            live: (0..slots).map(|_| Live::default()).collect(),
            busy: AtomicUsize::new(0),
            n_ctx,
            similarity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // The state is consistent between statements, so a panic elsewhere leaves it usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Claims a slot for `want`, waiting in FIFO order while none it can use is idle.
    ///
    /// Dropping the returned future gives up the place in the queue (and any slot granted in the
    /// meantime).
    pub(crate) async fn acquire(self: &Arc<Self>, want: Want) -> Claim {
        let rx = {
            let mut st = self.lock();
            // Waiters only exist while nothing they can use is idle (every release re-runs the
            // queue), so taking an idle slot here never jumps the queue.
            if let Some(idx) = st.pick(&want, self.similarity) {
                let grant = self.grant(&mut st, idx, &want);
                return Claim::new(self.clone(), grant);
            }
            let (tx, rx) = oneshot::channel();
            st.waiters.push_back(Waiter { want, tx });
            rx
        };
        let mut waiting = Waiting {
            rx: Some(rx),
            pool: self,
        };
        let rx = waiting.rx.as_mut().expect("set just above");
        // The sender lives in the queue until it is used; the queue only drops senders whose
        // receiver is gone, and ours is right here.
        let grant = rx
            .await
            .expect("a queued waiter is never dropped while waiting");
        waiting.rx = None;
        Claim::new(self.clone(), grant)
    }

    /// Returns slot `idx` with the tokens it now holds and serves the queue.
    fn release(&self, idx: usize, tokens: Vec<u32>) {
        let mut st = self.lock();
        st.clock += 1;
        let clock = st.clock;
        st.slots[idx].last_used = clock;
        self.put_back(&mut st, idx, tokens);
        self.dispatch(&mut st);
    }

    /// Marks slot `idx` busy for `want` and prepares its tokens: the reusable cached prefix
    /// followed by the rest of the prompt.
    fn grant(&self, st: &mut PoolState, idx: usize, want: &Want) -> Grant {
        let slot = &mut st.slots[idx];
        let mut tokens = std::mem::take(&mut slot.cache);
        // Like llama.cpp, evaluate at least the prompt's last token again, so that there are
        // logits to sample the first generated token from.
        let cache_n = if want.cache_prompt {
            common_prefix(&tokens, &want.prompt).min(want.prompt.len().saturating_sub(1))
        } else {
            0
        };
        tokens.truncate(cache_n);
        tokens.extend_from_slice(&want.prompt[cache_n..]);
        slot.task = Some(want.task);
        self.live[idx].cached.store(cache_n, Ordering::Relaxed);
        self.live[idx].decoded.store(0, Ordering::Relaxed);
        self.busy.fetch_add(1, Ordering::Relaxed);
        Grant {
            idx,
            cache_n,
            tokens,
        }
    }

    /// Makes slot `idx` idle, holding `tokens`.
    fn put_back(&self, st: &mut PoolState, idx: usize, tokens: Vec<u32>) {
        let slot = &mut st.slots[idx];
        self.live[idx].cached.store(tokens.len(), Ordering::Relaxed);
        slot.cache = tokens;
        slot.task = None;
        self.busy.fetch_sub(1, Ordering::Relaxed);
    }

    /// Hands idle slots to waiters, first come first served. A waiter pinned to a busy slot
    /// keeps its place without blocking those behind it.
    fn dispatch(&self, st: &mut PoolState) {
        let mut i = 0;
        while i < st.waiters.len() {
            if st.waiters[i].tx.is_closed() {
                st.waiters.remove(i);
                continue;
            }
            let Some(idx) = st.pick(&st.waiters[i].want, self.similarity) else {
                i += 1;
                continue;
            };
            let waiter = st.waiters.remove(i).expect("index checked above");
            let grant = self.grant(st, idx, &waiter.want);
            if let Err(Grant {
                idx,
                cache_n,
                mut tokens,
            }) = waiter.tx.send(grant)
            {
                // The waiter left between the check and the send: undo, keeping only what the
                // slot held before.
                tokens.truncate(cache_n);
                self.put_back(st, idx, tokens);
            }
        }
    }

    pub(crate) fn n_slots(&self) -> usize {
        self.live.len()
    }

    pub(crate) fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// Every slot, for `/slots`.
    pub(crate) fn views(&self) -> Vec<SlotView> {
        let st = self.lock();
        st.slots
            .iter()
            .enumerate()
            .map(|(id, s)| SlotView {
                id,
                task: s.task,
                n_cached: self.live[id].cached.load(Ordering::Relaxed),
                n_decoded: self.live[id].decoded.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Occupancy totals, for `/metrics`.
    pub(crate) fn stats(&self) -> PoolStats {
        let deferred = self
            .lock()
            .waiters
            .iter()
            .filter(|w| !w.tx.is_closed())
            .count();
        PoolStats {
            processing: self.busy(),
            deferred,
            cached_tokens: self
                .live
                .iter()
                .map(|l| l.cached.load(Ordering::Relaxed))
                .sum(),
        }
    }

    /// Slots currently processing.
    pub(crate) fn busy(&self) -> usize {
        self.busy.load(Ordering::Relaxed)
    }
}

// === impl PoolState ===

impl PoolState {
    /// The idle slot `want` should get, if any: its pinned slot; else the one already holding
    /// the longest part of the prompt, if that part is large enough; else the least recently used.
    fn pick(&self, want: &Want, similarity: f64) -> Option<usize> {
        if let Some(pin) = want.pin {
            return self
                .slots
                .get(pin)
                .is_some_and(|s| s.task.is_none())
                .then_some(pin);
        }
        let mut best: Option<(usize, usize)> = None;
        let mut lru: Option<(usize, u64)> = None;
        for (i, slot) in self.slots.iter().enumerate() {
            if slot.task.is_some() {
                continue;
            }
            let lcp = common_prefix(&slot.cache, &want.prompt);
            if best.is_none_or(|(_, b)| lcp > b) {
                best = Some((i, lcp));
            }
            if lru.is_none_or(|(_, t)| slot.last_used < t) {
                lru = Some((i, slot.last_used));
            }
        }
        match best {
            Some((i, lcp)) if lcp > 0 && lcp as f64 / want.prompt.len() as f64 > similarity => {
                Some(i)
            }
            _ => lru.map(|(i, _)| i),
        }
    }
}

/// Length of the longest common prefix of two token sequences.
pub(crate) fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// A queued [`SlotPool::acquire`]; dropping it early leaves the queue cleanly.
struct Waiting<'a> {
    rx: Option<oneshot::Receiver<Grant>>,
    pool: &'a Arc<SlotPool>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        // Closing first means no grant can arrive after the check below; one that arrived before
        // it goes back to the pool, where it may serve the next waiter.
        rx.close();
        if let Ok(grant) = rx.try_recv() {
            let Grant {
                idx,
                cache_n,
                mut tokens,
            } = grant;
            tokens.truncate(cache_n);
            self.pool.release(idx, tokens);
        }
    }
}

// === impl Claim ===

/// A slot held by one request. Dropping it frees the slot, keeping the tokens it really
/// evaluated as the slot's cache.
pub(crate) struct Claim {
    pool: Arc<SlotPool>,
    idx: usize,
    cache_n: usize,
    tokens: Vec<u32>,
    /// How many of `tokens` the slot has really evaluated so far.
    valid: usize,
}

impl Claim {
    fn new(pool: Arc<SlotPool>, grant: Grant) -> Claim {
        Claim {
            pool,
            idx: grant.idx,
            cache_n: grant.cache_n,
            valid: grant.cache_n,
            tokens: grant.tokens,
        }
    }

    /// The slot's index.
    pub(crate) fn idx(&self) -> usize {
        self.idx
    }

    /// Prompt tokens the slot already held, which need no evaluation.
    pub(crate) fn cache_n(&self) -> usize {
        self.cache_n
    }

    /// Records that the whole prompt is now evaluated.
    pub(crate) fn prompt_evaluated(&mut self) {
        self.valid = self.tokens.len();
        self.pool.live[self.idx]
            .cached
            .store(self.valid, Ordering::Relaxed);
    }

    /// Records generated token `id`. When the slot is full, the older half of it is dropped,
    /// as llama.cpp's context shift does; only the bitnet dialect ever generates that far.
    pub(crate) fn push_generated(&mut self, id: u32) {
        if self.tokens.len() >= self.pool.n_ctx {
            let discard = self.tokens.len() / 2;
            self.tokens.drain(..discard);
        }
        self.tokens.push(id);
        self.valid = self.tokens.len();
    }

    /// Publishes progress for `/slots` and `/metrics`.
    pub(crate) fn set_decoded(&self, n: usize) {
        let live = &self.pool.live[self.idx];
        live.decoded.store(n, Ordering::Relaxed);
        live.cached.store(self.valid, Ordering::Relaxed);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut tokens = std::mem::take(&mut self.tokens);
        tokens.truncate(self.valid);
        self.pool.release(self.idx, tokens);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn want(prompt: &[u32], pin: Option<usize>) -> Want {
        Want {
            prompt: prompt.into(),
            pin,
            cache_prompt: true,
            task: TaskInfo {
                id_task: 0,
                n_predict: 1,
            },
        }
    }

    #[tokio::test]
    async fn second_request_with_same_prefix_returns_to_the_same_slot() {
        let pool = Arc::new(SlotPool::new(3, 100, 0.1));
        let first = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
        let mut c = pool.acquire(want(&first, None)).await;
        let slot = c.idx();
        c.prompt_evaluated();
        c.push_generated(11);
        drop(c);
        // Another request used a different slot meanwhile, so LRU alone would not pick `slot`.
        drop(pool.acquire(want(&[50, 51], None)).await);
        let next: Vec<u32> = (1..=14).collect();
        let c = pool.acquire(want(&next, None)).await;
        assert_eq!(c.idx(), slot);
        assert_eq!(c.cache_n(), 11);
    }

    #[tokio::test]
    async fn cached_prompt_still_evaluates_its_last_token() {
        let pool = Arc::new(SlotPool::new(1, 100, 0.1));
        let mut c = pool.acquire(want(&[1, 2, 3], None)).await;
        c.prompt_evaluated();
        drop(c);
        assert_eq!(pool.acquire(want(&[1, 2, 3], None)).await.cache_n(), 2);
    }

    #[tokio::test]
    async fn waiters_are_served_in_arrival_order() {
        let pool = Arc::new(SlotPool::new(1, 100, 0.1));
        let held = pool.acquire(want(&[1], None)).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for n in 0..3 {
            let (pool, tx) = (pool.clone(), tx.clone());
            tokio::spawn(async move {
                let c = pool.acquire(want(&[9], None)).await;
                tx.send(n).unwrap();
                drop(c);
            });
            // Let each task enqueue before the next one starts.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(pool.stats().deferred, 3);
        drop(held);
        let order: Vec<i32> = vec![
            rx.recv().await.unwrap(),
            rx.recv().await.unwrap(),
            rx.recv().await.unwrap(),
        ];
        assert_eq!(order, [0, 1, 2]);
        assert_eq!(pool.stats().deferred, 0);
    }

    #[tokio::test]
    async fn pinned_waiter_does_not_block_others() {
        let pool = Arc::new(SlotPool::new(2, 100, 0.1));
        let on_zero = pool.acquire(want(&[1], Some(0))).await;
        let pinned = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.acquire(want(&[2], Some(0))).await.idx() })
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        let free = pool.acquire(want(&[3], None)).await;
        assert_eq!(free.idx(), 1);
        drop(on_zero);
        assert_eq!(pinned.await.unwrap(), 0);
    }

    #[tokio::test]
    async fn abandoned_waiter_leaves_the_queue_and_frees_no_slot_twice() {
        let pool = Arc::new(SlotPool::new(1, 100, 0.1));
        let held = pool.acquire(want(&[1], None)).await;
        let waiter = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.acquire(want(&[2], None)).await })
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(pool.stats().deferred, 0);
        drop(held);
        assert_eq!(pool.stats().processing, 0);
        let again = pool.acquire(want(&[3], None)).await;
        assert_eq!(again.idx(), 0);
    }

    #[tokio::test]
    async fn pin_to_missing_slot_waits_forever() {
        let pool = Arc::new(SlotPool::new(1, 100, 0.1));
        let res =
            tokio::time::timeout(Duration::from_millis(20), pool.acquire(want(&[1], Some(5))))
                .await;
        assert!(res.is_err());
    }
}
