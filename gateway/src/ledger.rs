//! A backend's work ledger: what each of its slots holds in its prompt cache, the work this
//! gateway has assigned to each slot and not yet seen finish, and the backend's measured
//! prompt-evaluation and generation rates.
//!
//! The predicted-TTFT policy reads and writes it under its pool's lock, so a decision and
//! the assignment it makes are one step. It is a model, not the truth: it only knows about
//! this gateway's requests, and a slot's cache is assumed to hold the last prefix sent to
//! it. Both are corrected by measurements as responses finish.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::time::Instant;

use crate::job::{Job, Link};

/// Weight of a new measurement in the rate averages.
const EWMA_ALPHA: f64 = 0.2;

/// An exponentially weighted moving average, empty until its first sample.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ewma(Option<f64>);

impl Ewma {
    /// Fold in a sample; non-finite or non-positive samples are ignored.
    pub fn add(&mut self, x: f64) {
        if !(x.is_finite() && x > 0.0) {
            return;
        }
        self.0 = Some(match self.0 {
            None => x,
            Some(v) => v + EWMA_ALPHA * (x - v),
        });
    }

    /// The average, if any sample arrived.
    pub fn get(&self) -> Option<f64> {
        self.0
    }
}

/// One slot's book.
#[derive(Debug)]
pub struct SlotBook {
    /// The prefix the slot's cache holds (or will, once the work assigned to it has run).
    pub chain: Arc<[Link]>,
    /// The cache also holds the reply generated after `chain`.
    pub tail_reply: bool,
    /// Session of the last request sent to the slot.
    pub session: Option<u64>,
    /// When the slot was last assigned work: earlier is colder.
    pub last_used: Instant,
    /// Work assigned and not finished, oldest first: (id, estimated seconds).
    work: VecDeque<(u64, f64)>,
    /// When the oldest piece of work started: the slot has been busy since.
    busy_since: Instant,
}

impl SlotBook {
    fn new(now: Instant) -> SlotBook {
        SlotBook {
            chain: Arc::from([]),
            tail_reply: false,
            session: None,
            last_used: now,
            work: VecDeque::new(),
            busy_since: now,
        }
    }

    /// Pieces of work assigned and not finished.
    pub fn depth(&self) -> usize {
        self.work.len()
    }

    /// Seconds until the slot is expected to be free: the estimates of its work, less the
    /// time the oldest has been running. Work that overruns its estimate still has a little
    /// left (a tenth of it), so a busy slot never looks idle.
    pub fn wait_secs(&self, now: Instant) -> f64 {
        let Some(&(_, first)) = self.work.front() else {
            return 0.0;
        };
        let total: f64 = self.work.iter().map(|(_, s)| s).sum();
        let ran = now.saturating_duration_since(self.busy_since).as_secs_f64();
        (total - ran).max(first * 0.1)
    }
}

/// A backend's ledger.
#[derive(Debug, Default)]
pub struct Ledger {
    slots: Vec<SlotBook>,
    next_id: u64,
    /// Prompt evaluation, tokens per second, as measured.
    pub prefill: Ewma,
    /// Generation, tokens per second, as measured.
    pub decode: Ewma,
}

impl Ledger {
    /// The slots' books, `n` of them (the backend's slot count can change when it is
    /// discovered; books of slots that disappear are dropped).
    pub fn slots(&mut self, n: usize) -> &[SlotBook] {
        let n = n.max(1);
        if self.slots.len() != n {
            let now = Instant::now();
            self.slots.resize_with(n, || SlotBook::new(now));
        }
        &self.slots
    }

    /// Pieces of work assigned to the backend and not finished.
    pub fn depth(&self) -> usize {
        self.slots.iter().map(SlotBook::depth).sum()
    }

    /// Record work of `est_secs` for `job` on `slot`; from now on the slot's cache is
    /// taken to hold the job's prefix and its reply. Returns the work's id for [`finish`].
    ///
    /// [`finish`]: Ledger::finish
    pub fn assign(&mut self, slot: usize, job: &Job, est_secs: f64) -> u64 {
        let now = Instant::now();
        self.next_id += 1;
        let id = self.next_id;
        if slot >= self.slots.len() {
            self.slots.resize_with(slot + 1, || SlotBook::new(now));
        }
        let book = &mut self.slots[slot];
        if book.work.is_empty() {
            book.busy_since = now;
        }
        book.work.push_back((id, est_secs.max(0.0)));
        if !job.links.is_empty() {
            book.chain = job.links.clone();
            book.tail_reply = true;
        }
        book.session = job.session;
        book.last_used = now;
        id
    }

    /// The work `id` on `slot` ended (finished, failed or cancelled).
    pub fn finish(&mut self, slot: usize, id: u64) {
        let Some(book) = self.slots.get_mut(slot) else {
            return;
        };
        let Some(pos) = book.work.iter().position(|&(w, _)| w == id) else {
            return;
        };
        book.work.remove(pos);
        if pos == 0 {
            // The next piece of work starts now.
            book.busy_since = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ewma_starts_at_the_first_sample_and_moves_towards_later_ones() {
        let mut e = Ewma::default();
        assert_eq!(e.get(), None);
        e.add(f64::NAN);
        e.add(-1.0);
        assert_eq!(e.get(), None);
        e.add(10.0);
        assert_eq!(e.get(), Some(10.0));
        e.add(20.0);
        assert!((e.get().unwrap() - 12.0).abs() < 1e-9);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_waits_for_the_work_queued_on_it() {
        let mut l = Ledger::default();
        l.slots(2);
        let job = Job::default();
        let a = l.assign(0, &job, 10.0);
        let b = l.assign(0, &job, 5.0);
        let now = Instant::now();
        assert!((l.slots(2)[0].wait_secs(now) - 15.0).abs() < 1e-6);
        assert_eq!(l.slots(2)[1].wait_secs(now), 0.0);
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!((l.slots(2)[0].wait_secs(Instant::now()) - 11.0).abs() < 1e-6);
        // The first ends early: the second starts now, with its whole estimate ahead.
        l.finish(0, a);
        assert!((l.slots(2)[0].wait_secs(Instant::now()) - 5.0).abs() < 1e-6);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(
            l.slots(2)[0].wait_secs(Instant::now()) > 0.0,
            "overrun: still busy"
        );
        l.finish(0, b);
        assert_eq!(l.slots(2)[0].wait_secs(Instant::now()), 0.0);
        assert_eq!(l.depth(), 0);
        l.finish(0, b);
        l.finish(7, b);
    }

    #[tokio::test(start_paused = true)]
    async fn an_assigned_slot_holds_the_jobs_prefix_and_session() {
        let mut l = Ledger::default();
        let job = Job::from_body(
            br#"{"messages":[{"role":"system","content":"s"}],"user":"u"}"#,
            None,
            0,
        );
        l.slots(2);
        tokio::time::advance(Duration::from_secs(1)).await;
        l.assign(1, &job, 1.0);
        let books = l.slots(2);
        assert_eq!(books[1].chain.len(), 1);
        assert!(books[1].tail_reply);
        assert_eq!(books[1].session, job.session);
        assert!(books[1].last_used > books[0].last_used);
    }
}
