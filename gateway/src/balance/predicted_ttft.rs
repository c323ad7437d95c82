//! Predicted time to first token: route each request to the backend and slot that should
//! start answering it soonest.
//!
//! On CPU backends a request's cost is its tokens, not its count: prompt evaluation runs at
//! about 60 tokens/s, so a 2,000-token history costs half a minute on a slot that does not
//! hold it and nearly nothing on the slot that does, and generation at about 18 tokens/s
//! keeps a slot busy for as long as the answer is. So for every slot of every available
//! backend this policy predicts
//!
//! ```text
//! TTFT = wait for the slot + (prompt tokens − tokens the slot holds) / prefill rate
//! ```
//!
//! from the backend's [`Ledger`](crate::ledger::Ledger) (the work assigned to each slot and
//! the prefix its cache holds) and its measured rates, and takes the lowest. That makes a
//! follow-up turn go back to the slot holding its conversation, unless that slot is so busy
//! that evaluating the whole prompt on an idle backend is quicker; and a new session go to
//! a slot that holds the shared system prompt but no conversation still in use.
//!
//! A request may be assigned to a full backend (the backend queues it) only when that beats
//! every backend with a free slot; when nothing is free and no slot holds a clear
//! advantage, it waits in the gateway's queue instead, so it can take whichever slot frees
//! first.

use std::cmp::{Ordering as CmpOrdering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::{Affinity, Outcome, Pick, Plan, Policy, RoutingDefaults};
use crate::backend::Backend;
use crate::job::Job;
use crate::ledger::Ewma;

/// Waiting for a busy slot must beat the best free start by this factor when nothing is
/// free; otherwise the request waits in the gateway's queue for whichever slot frees first.
const CLEAR_WIN: f64 = 0.8;

/// Buckets of answer-length history: none, then one per power of two of `max_tokens`.
const ANSWER_BUCKETS: usize = 34;

/// Requests that must have opened with the same first message before a slot this gateway
/// has not used yet is assumed to hold it: a backend that has been serving such traffic
/// (for another gateway, or before this one started) holds it like any other.
const COMMON_OPENING: u32 = 2;

/// Distinct first messages counted; the rarest is forgotten to make room.
const MAX_OPENINGS: usize = 64;

/// Gap between a conversation's turns assumed until one is measured, in seconds.
const DEFAULT_TURN_GAP_SECS: f64 = 20.0;

/// Fewest evaluated tokens for a prompt-rate sample: tiny evaluations are mostly overhead.
const MIN_RATE_SAMPLE: u64 = 16;

/// Fewest uncached prompt tokens for a rate measured from the time to first token, which
/// also holds a network round trip and the first generated token.
const MIN_MEASURED_PROMPT: f64 = 64.0;

/// The predicted-TTFT policy.
#[derive(Debug)]
pub struct PredictedTtft {
    defaults: RoutingDefaults,
    learned: Mutex<Learned>,
    next: AtomicUsize,
}

#[derive(Debug)]
struct Learned {
    bytes_per_token: Ewma,
    answers: [Ewma; ANSWER_BUCKETS],
    /// Seconds from one turn of a conversation being routed to its next turn arriving.
    turn_gap: Ewma,
    /// How often recent requests opened with each first message (a system prompt), so
    /// that a slot this gateway never used can be assumed to hold a common one.
    openings: HashMap<u64, u32>,
}

/// The best slot of one backend for a job.
#[derive(Debug, Clone)]
struct Candidate {
    index: usize,
    slot: usize,
    wait: f64,
    ttft: f64,
    /// Predicted TTFT plus what the choice costs the conversation whose cache it evicts.
    score: f64,
    /// The request continues the conversation this slot holds.
    continues: bool,
    /// Seconds since the slot was last given work.
    gap: f64,
    work: f64,
    cached: f64,
    /// Most prompt tokens any slot of the backend holds.
    held: f64,
    free: bool,
    same_session: bool,
    last_used: Instant,
}

impl PredictedTtft {
    /// A policy starting from `defaults`.
    pub fn new(defaults: RoutingDefaults) -> PredictedTtft {
        PredictedTtft {
            defaults,
            learned: Mutex::new(Learned {
                bytes_per_token: Ewma::default(),
                answers: [Ewma::default(); ANSWER_BUCKETS],
                turn_gap: Ewma::default(),
                openings: HashMap::new(),
            }),
            next: AtomicUsize::new(0),
        }
    }

    fn learned(&self) -> std::sync::MutexGuard<'_, Learned> {
        self.learned.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes per prompt token, measured or default.
    fn bytes_per_token(&self) -> f64 {
        self.learned()
            .bytes_per_token
            .get()
            .unwrap_or(self.defaults.bytes_per_token)
    }

    /// Tokens the job is expected to generate: the history of requests with a similar
    /// `max_tokens`, capped by its own `max_tokens`.
    fn answer_tokens(&self, job: &Job) -> f64 {
        let seen = self.learned().answers[bucket(job.max_tokens)].get();
        let default = f64::from(self.defaults.answer_tokens);
        match (seen, job.max_tokens) {
            (Some(s), Some(m)) => s.min(f64::from(m)),
            (Some(s), None) => s,
            (None, Some(m)) => default.min(f64::from(m)),
            (None, None) => default,
        }
    }

    /// Mean measured prefill and decode rates of the backends, or the configured ones.
    fn fleet_rates(&self, backends: &[Arc<Backend>]) -> (f64, f64) {
        let (mut p, mut pn, mut d, mut dn) = (0.0, 0, 0.0, 0);
        for b in backends {
            let l = b.ledger();
            if let Some(x) = l.prefill.get() {
                p += x;
                pn += 1;
            }
            if let Some(x) = l.decode.get() {
                d += x;
                dn += 1;
            }
        }
        (
            if pn > 0 {
                p / pn as f64
            } else {
                self.defaults.prefill_rate
            },
            if dn > 0 {
                d / dn as f64
            } else {
                self.defaults.decode_rate
            },
        )
    }

    /// The best slot of each available backend (scanning from a rotating start, so that
    /// equal candidates take turns), and when the fleet's first slot frees up.
    fn candidates(&self, backends: &[Arc<Backend>], job: &Job) -> (Vec<Candidate>, f64) {
        let now = Instant::now();
        let bpt = self.bytes_per_token();
        let prompt = f64::from(job.prompt_bytes) / bpt;
        let answer = self.answer_tokens(job);
        let (live_for, opening) = {
            let mut learned = self.learned();
            // A conversation counts as over after a few of its usual gaps between turns.
            let live_for = 3.0 * learned.turn_gap.get().unwrap_or(DEFAULT_TURN_GAP_SECS);
            // What an unused slot is assumed to hold: a first message common enough.
            let opening = job.links.first().filter(|first| {
                let seen = note_opening(&mut learned.openings, first.hash);
                seen >= COMMON_OPENING && job.links.len() > 1
            });
            (live_for, opening.map_or(0.0, |l| f64::from(l.bytes) / bpt))
        };
        let n = backends.len();
        let start = match n {
            0 => 0,
            n => self.next.fetch_add(1, Ordering::Relaxed) % n,
        };
        let mut out = Vec::with_capacity(n);
        // A backend not measured yet is assumed as fast as the measured ones (the same
        // model on the same kind of machine, as a rule), and only failing that as fast as
        // configured: a default far from the truth would make every measured backend look
        // much faster or slower than the unmeasured ones.
        let (prefill_default, decode_default) = self.fleet_rates(backends);
        // Predicted TTFT of a cold start on the first slot to free up anywhere.
        let mut first_free = f64::INFINITY;
        for k in 0..n {
            let index = (start + k) % n;
            let b = &backends[index];
            if !b.is_available() {
                continue;
            }
            let free = b.free_slots() > 0;
            let mut ledger = b.ledger();
            let prefill = ledger.prefill.get().unwrap_or(prefill_default);
            let decode = ledger.decode.get().unwrap_or(decode_default);
            // The backend reports every slot busy although our ledger may not: someone
            // else's requests are there, for about an answer's time each.
            let foreign = if free { 0.0 } else { answer / decode };
            let books = ledger.slots(b.slots() as usize);
            let mut best: Option<Candidate> = None;
            let mut held: f64 = 0.0;
            for (slot, book) in books.iter().enumerate() {
                let reuse = job.reuse(&book.chain, book.tail_reply);
                let continues = reuse.continues;
                let cached = if book.chain.is_empty() && book.depth() == 0 {
                    opening
                } else {
                    f64::from(reuse.cached_bytes) / bpt
                }
                .min(prompt);
                held = held.max(cached);
                // A slot without work of ours on a full backend is someone else's.
                let wait = match book.depth() {
                    0 => foreign,
                    _ => book.wait_secs(now),
                };
                first_free = first_free.min(wait + prompt / prefill);
                if book.depth() >= self.defaults.max_depth {
                    continue;
                }
                // Only a conversation's own next turn waits for a busy slot. Queueing other
                // requests behind it for a prefix many share (a common system prompt) would
                // pile a whole fleet's traffic onto the few backends warmed first, while
                // the rest stay idle and cold.
                if wait > 0.0 && !continues {
                    continue;
                }
                let uncached = prompt - cached;
                // What taking this slot would cost the conversation whose cache it evicts:
                // re-evaluating the part this request does not share, weighed by how likely
                // that conversation is to come back (fading after a few turn gaps).
                let reply = if book.tail_reply { answer } else { 0.0 };
                let evicted = book
                    .chain
                    .last()
                    .map_or(0.0, |l| f64::from(l.bytes) / bpt + reply - cached)
                    .max(0.0);
                let age = now.saturating_duration_since(book.last_used).as_secs_f64();
                let evict = if continues {
                    0.0
                } else {
                    evicted / prefill * (-age / live_for).exp()
                };
                let c = Candidate {
                    index,
                    slot,
                    wait,
                    ttft: wait + uncached / prefill,
                    score: wait + uncached / prefill + evict,
                    continues,
                    gap: age,
                    work: uncached / prefill + answer / decode,
                    cached,
                    held: 0.0,
                    free: wait == 0.0,
                    same_session: job.session.is_some() && book.session == job.session,
                    last_used: book.last_used,
                };
                if best
                    .as_ref()
                    .is_none_or(|b| prefer(&c, b) == CmpOrdering::Less)
                {
                    best = Some(c);
                }
            }
            if let Some(mut c) = best {
                c.held = held;
                out.push(c);
            }
        }
        (out, first_free)
    }
}

/// Which of two candidates is better: lower score (predicted TTFT plus eviction cost,
/// within 2 %, which is noise in the estimate), then an idle slot, more of the prompt
/// cached, the request's own session, and last the slot used least recently, whose cache
/// is the least likely to be wanted by a conversation still going on.
fn prefer(a: &Candidate, b: &Candidate) -> CmpOrdering {
    let close = (a.score - b.score).abs() <= 0.02 * a.score.max(b.score) + 1e-6;
    let ttft = if close {
        CmpOrdering::Equal
    } else {
        cmp_f64(a.score, b.score)
    };
    ttft.then(b.free.cmp(&a.free))
        .then(cmp_f64(b.cached, a.cached))
        .then(b.same_session.cmp(&a.same_session))
        .then(a.last_used.cmp(&b.last_used))
}

impl Policy for PredictedTtft {
    fn reads_prompt(&self) -> bool {
        true
    }

    fn pick(&self, backends: &[Arc<Backend>], job: &Job) -> Option<Pick> {
        let (cands, first_free) = self.candidates(backends, job);
        let best = cands.iter().min_by(|a, b| prefer(a, b))?;
        if best.continues {
            self.learned().turn_gap.add(best.gap);
        }
        let chosen = if best.free {
            best
        } else if let Some(free) = cands.iter().filter(|c| c.free).min_by(|a, b| prefer(a, b)) {
            // `best` is this conversation's own slot, busy, and waiting for it still beats
            // starting on an idle backend.
            if best.score < free.score {
                best
            } else {
                free
            }
        } else if best.ttft < CLEAR_WIN * first_free {
            // Nothing is idle; waiting for its own slot clearly beats a cold start on the
            // first slot to free up.
            best
        } else {
            // Wait in the gateway's queue for whichever slot frees first.
            return None;
        };
        let most = cands.iter().map(|c| c.held).fold(0.0, f64::max);
        let least = cands.iter().map(|c| c.held).fold(f64::INFINITY, f64::min);
        // A decision about affinity exists only when some backend holds more of the prompt
        // than another (a system prompt every backend holds decides nothing).
        let affinity = (most - least >= 1.0).then_some(if chosen.held + 0.5 >= most {
            Affinity::Taken
        } else {
            Affinity::Overridden
        });
        Some(Pick {
            index: chosen.index,
            plan: Some(Plan {
                slot: chosen.slot,
                ttft_secs: chosen.ttft,
                wait_secs: chosen.wait,
                work_secs: chosen.work,
                cached_tokens: chosen.cached,
                affinity,
            }),
        })
    }

    fn start_eta(&self, backends: &[Arc<Backend>], ahead: &[&Job], job: &Job) -> Option<Duration> {
        let _ = job;
        let now = Instant::now();
        let bpt = self.bytes_per_token();
        // When each slot of the fleet frees up, in microseconds from now.
        let mut free_at: BinaryHeap<Reverse<u64>> = BinaryHeap::new();
        let mut rates = (0.0, 0.0, 0usize);
        let mut books_seen = Vec::new();
        let (prefill_default, decode_default) = self.fleet_rates(backends);
        for b in backends.iter().filter(|b| b.is_available()) {
            let mut ledger = b.ledger();
            let prefill = ledger.prefill.get().unwrap_or(prefill_default);
            let decode = ledger.decode.get().unwrap_or(decode_default);
            rates = (rates.0 + prefill, rates.1 + decode, rates.2 + 1);
            for book in ledger.slots(b.slots() as usize) {
                free_at.push(Reverse(micros(book.wait_secs(now))));
                books_seen.push((book.chain.clone(), book.tail_reply));
            }
        }
        if free_at.is_empty() {
            return None;
        }
        let (prefill, decode) = (rates.0 / rates.2 as f64, rates.1 / rates.2 as f64);
        for w in ahead {
            let prompt = f64::from(w.prompt_bytes) / bpt;
            let cached = books_seen
                .iter()
                .map(|(chain, tail)| f64::from(w.cached_bytes(chain, *tail)) / bpt)
                .fold(0.0, f64::max)
                .min(prompt);
            let work = (prompt - cached) / prefill + self.answer_tokens(w) / decode;
            let Reverse(t) = free_at.pop().expect("never empties: one push per pop");
            free_at.push(Reverse(t + micros(work)));
        }
        free_at.pop().map(|Reverse(t)| Duration::from_micros(t))
    }

    fn observe(&self, backend: &Backend, job: &Job, plan: &Plan, o: &Outcome) {
        {
            let mut ledger = backend.ledger();
            if let (Some(n), Some(rate)) = (o.evaluated_tokens, o.prompt_per_second) {
                if n >= MIN_RATE_SAMPLE {
                    ledger.prefill.add(rate);
                }
            } else if let Some(rate) = measured_prefill(plan, o) {
                // No timings (the older BitNet server's streams): from usage and the time
                // to first token, bounded so that one odd request cannot swing the average.
                let rate = match ledger.prefill.get() {
                    Some(now) => rate.clamp(now / 4.0, now * 4.0),
                    None => rate,
                };
                ledger.prefill.add(rate);
            }
            if let Some(rate) = o.predicted_per_second {
                ledger.decode.add(rate);
            }
        }
        let mut learned = self.learned();
        if let Some(p) = o.prompt_tokens.filter(|&p| p >= 32) {
            if job.prompt_bytes > 0 {
                let ratio = f64::from(job.prompt_bytes) / p as f64;
                learned.bytes_per_token.add(ratio.clamp(0.5, 16.0));
            }
        }
        if o.complete {
            learned.answers[bucket(job.max_tokens)].add(o.completion_tokens.max(1) as f64);
        }
    }
}

/// Prompt evaluation rate from `usage` and the measured time to first token, when the
/// request started at once on an idle slot (so the time is all evaluation) and evaluated
/// enough tokens to measure. Cached tokens are the backend's count if it gives one, else
/// the prediction.
fn measured_prefill(plan: &Plan, o: &Outcome) -> Option<f64> {
    if plan.wait_secs > 0.0 {
        return None;
    }
    let prompt = o.prompt_tokens? as f64;
    let cached = o.cached_tokens.map_or(plan.cached_tokens, |c| c as f64);
    let secs = o.ttft?.as_secs_f64();
    let uncached = prompt - cached;
    (uncached >= MIN_MEASURED_PROMPT && secs > 0.0).then(|| uncached / secs)
}

/// Count one more request opening with `hash`; returns its count. The table stays small:
/// when full, the rarest opening is forgotten.
fn note_opening(openings: &mut HashMap<u64, u32>, hash: u64) -> u32 {
    if !openings.contains_key(&hash) && openings.len() >= MAX_OPENINGS {
        if let Some((&rare, _)) = openings.iter().min_by_key(|(_, &n)| n) {
            openings.remove(&rare);
        }
    }
    let n = openings.entry(hash).or_insert(0);
    *n = n.saturating_add(1);
    *n
}

fn bucket(max_tokens: Option<u32>) -> usize {
    match max_tokens {
        None => 0,
        Some(m) => 1 + (32 - m.leading_zeros()) as usize,
    }
}

fn micros(secs: f64) -> u64 {
    (secs.clamp(0.0, 1e9) * 1e6) as u64
}

fn cmp_f64(a: f64, b: f64) -> CmpOrdering {
    a.partial_cmp(&b).unwrap_or(CmpOrdering::Equal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Health;

    fn fleet(n: usize, slots: u32) -> Vec<Arc<Backend>> {
        (0..n)
            .map(|i| {
                let b = Backend::new(format!("b{i}"), "http://h:1".parse().unwrap(), Some(slots));
                b.set_health(Health::Up);
                Arc::new(b)
            })
            .collect()
    }

    fn chat(turns: &[&str]) -> Job {
        let mut messages = vec![serde_json::json!({"role": "system", "content": "S".repeat(8000)})];
        for (i, t) in turns.iter().enumerate() {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            messages.push(serde_json::json!({"role": role, "content": t.repeat(200)}));
        }
        let body = serde_json::to_vec(&serde_json::json!({"messages": messages})).unwrap();
        Job::from_body(&body, None, 0)
    }

    /// Claim as the pool does: pick, then book the work and count the request.
    fn claim(p: &PredictedTtft, bs: &[Arc<Backend>], job: &Job) -> Option<(usize, Plan)> {
        claim_id(p, bs, job).map(|(i, plan, _)| (i, plan))
    }

    fn claim_id(p: &PredictedTtft, bs: &[Arc<Backend>], job: &Job) -> Option<(usize, Plan, u64)> {
        let pick = p.pick(bs, job)?;
        let plan = pick.plan.clone().expect("this policy plans slots");
        let id = bs[pick.index]
            .ledger()
            .assign(plan.slot, job, plan.work_secs);
        bs[pick.index].add_inflight();
        Some((pick.index, plan, id))
    }

    /// The request on `slot` of backend `i` ended.
    fn done(bs: &[Arc<Backend>], i: usize, slot: usize, id: u64) {
        bs[i].ledger().finish(slot, id);
        bs[i].sub_inflight();
    }

    #[tokio::test(start_paused = true)]
    async fn a_follow_up_turn_returns_to_the_backend_holding_its_history() {
        let p = PredictedTtft::new(RoutingDefaults::default());
        let bs = fleet(4, 1);
        // Four sessions at once: each starts on its own backend rather than queueing
        // behind another for the system prompt they share.
        let names = ["p", "q", "r", "s"];
        let mut warm = Vec::new();
        for k in names {
            warm.push(claim_id(&p, &bs, &chat(&[k])).unwrap());
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        let mut used: Vec<_> = warm.iter().map(|w| w.0).collect();
        used.sort();
        used.dedup();
        assert_eq!(used.len(), 4, "spread over the fleet: {used:?}");
        for (i, plan, id) in &warm {
            tokio::time::advance(Duration::from_secs(1)).await;
            done(&bs, *i, plan.slot, *id);
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        // A new session takes the backend used least recently: every one holds the system
        // prompt and a conversation of the same length, and that one's is the likeliest to
        // be over.
        let (a_home, plan, id) = claim_id(&p, &bs, &chat(&["a"])).unwrap();
        assert_eq!(a_home, warm[0].0, "least recently used");
        assert!(
            plan.cached_tokens > 1900.0,
            "the system prompt is cached: {plan:?}"
        );
        done(&bs, a_home, plan.slot, id);
        tokio::time::advance(Duration::from_secs(1)).await;
        // Another new session does not evict it.
        let (n, plan, id) = claim_id(&p, &bs, &chat(&["n"])).unwrap();
        assert_ne!(n, a_home);
        done(&bs, n, plan.slot, id);
        // The follow-up returns home, to the slot holding its history.
        let (again, plan) = claim(&p, &bs, &chat(&["a", "reply", "b"])).unwrap();
        assert_eq!(again, a_home);
        assert_eq!(plan.affinity, Some(Affinity::Taken));
        assert!(plan.cached_tokens > 2000.0, "{plan:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_holder_is_waited_for_only_while_that_beats_a_cold_start() {
        let p = PredictedTtft::new(RoutingDefaults::default());
        for (busy_for, expect_home) in [(2.0, true), (600.0, false)] {
            let bs = fleet(2, 1);
            let (home, plan, id) = claim_id(&p, &bs, &chat(&["a"])).unwrap();
            done(&bs, home, plan.slot, id);
            // The holder is running the conversation's previous turn, for `busy_for` s.
            bs[home]
                .ledger()
                .assign(0, &chat(&["a", "r", "b"]), busy_for);
            bs[home].add_inflight();
            let (i, plan) = claim(&p, &bs, &chat(&["a", "r", "b", "r", "c"])).unwrap();
            if expect_home {
                // Waiting 2 s beats evaluating ~2,500 tokens cold (about 40 s).
                assert_eq!(i, home, "waited for its cache: {plan:?}");
                assert_eq!(plan.affinity, Some(Affinity::Taken));
                assert!(plan.ttft_secs < 10.0, "{plan:?}");
            } else {
                assert_ne!(i, home, "ten minutes is worse than a cold start: {plan:?}");
                assert_eq!(plan.affinity, Some(Affinity::Overridden));
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_session_key_decides_between_slots_holding_the_same_prefix() {
        let p = PredictedTtft::new(RoutingDefaults::default());
        let bs = fleet(2, 1);
        let body = |user: &str| {
            format!(
                r#"{{"user":"{user}","messages":[{{"role":"system","content":"S"}},{{"role":"user","content":"hi"}}]}}"#
            )
        };
        let first = |user: &str| Job::from_body(body(user).as_bytes(), None, 0);
        // Two users opened with the same words; alice's slot was used first.
        let a = bs[0].ledger().assign(0, &first("alice"), 0.0);
        tokio::time::advance(Duration::from_secs(1)).await;
        let b = bs[1].ledger().assign(0, &first("bob"), 0.0);
        tokio::time::advance(Duration::from_secs(1)).await;
        bs[0].ledger().finish(0, a);
        bs[1].ledger().finish(0, b);
        let next = |user: &str| {
            let body = format!(
                r#"{{"user":"{user}","messages":[{{"role":"system","content":"S"}},{{"role":"user","content":"hi"}},{{"role":"assistant","content":"hello"}},{{"role":"user","content":"go on"}}]}}"#
            );
            Job::from_body(body.as_bytes(), None, 0)
        };
        assert_eq!(p.pick(&bs, &next("bob")).unwrap().index, 1);
        assert_eq!(p.pick(&bs, &next("alice")).unwrap().index, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn with_nothing_free_and_no_cache_advantage_the_request_waits_centrally() {
        let p = PredictedTtft::new(RoutingDefaults::default());
        let bs = fleet(2, 1);
        let small = Job::from_body(br#"{"messages":[{"role":"user","content":"hi"}]}"#, None, 0);
        assert!(claim(&p, &bs, &small).is_some());
        assert!(claim(&p, &bs, &small).is_some());
        assert!(p.pick(&bs, &small).is_none());
        // Its predicted start is when the first slot frees.
        let eta = p.start_eta(&bs, &[], &small).unwrap();
        assert!(
            eta > Duration::from_secs(5) && eta < Duration::from_secs(30),
            "{eta:?}"
        );
        let later = p.start_eta(&bs, &[&small, &small], &small).unwrap();
        assert!(later > eta, "two ahead: {later:?} vs {eta:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn slots_are_planned_individually_on_a_multi_slot_backend() {
        let p = PredictedTtft::new(RoutingDefaults::default());
        let bs = fleet(1, 2);
        let (_, a) = claim(&p, &bs, &chat(&["a"])).unwrap();
        let (_, b) = claim(&p, &bs, &chat(&["b"])).unwrap();
        assert_ne!(a.slot, b.slot, "the second session takes the other slot");
        bs[0].sub_inflight();
        bs[0].sub_inflight();
        let (_, again) = claim(&p, &bs, &chat(&["b", "r", "c"])).unwrap();
        assert_eq!(again.slot, b.slot);
    }

    #[test]
    fn measurements_replace_the_defaults() {
        let p = PredictedTtft::new(RoutingDefaults::default());
        let bs = fleet(1, 1);
        let job = Job::from_body(
            format!(
                r#"{{"messages":[{{"role":"user","content":"{}"}}],"max_tokens":500}}"#,
                "x".repeat(4000)
            )
            .as_bytes(),
            None,
            0,
        );
        assert_eq!(p.answer_tokens(&job), 256.0);
        let plan = p.pick(&bs, &job).unwrap().plan.unwrap();
        for _ in 0..50 {
            p.observe(
                &bs[0],
                &job,
                &plan,
                &Outcome {
                    prompt_tokens: Some(2000),
                    evaluated_tokens: Some(2000),
                    prompt_per_second: Some(120.0),
                    predicted_per_second: Some(30.0),
                    completion_tokens: 40,
                    complete: true,
                    ..Outcome::default()
                },
            );
        }
        assert!((p.answer_tokens(&job) - 40.0).abs() < 1.0);
        assert!((p.bytes_per_token() - job.prompt_bytes as f64 / 2000.0).abs() < 0.1);
        let l = bs[0].ledger();
        assert!((l.prefill.get().unwrap() - 120.0).abs() < 1e-6);
        assert!((l.decode.get().unwrap() - 30.0).abs() < 1e-6);
    }

    #[test]
    fn without_timings_the_prefill_rate_comes_from_usage_and_the_time_to_first_token() {
        let p = PredictedTtft::new(RoutingDefaults::default());
        let bs = fleet(1, 1);
        let job = Job::from_body(br#"{"messages":[{"role":"user","content":"q"}]}"#, None, 0);
        let idle = p.pick(&bs, &job).unwrap().plan.unwrap();
        assert_eq!(idle.wait_secs, 0.0);
        let outcome = |secs: f64| Outcome {
            prompt_tokens: Some(600),
            cached_tokens: Some(0),
            ttft: Some(Duration::from_secs_f64(secs)),
            complete: true,
            ..Outcome::default()
        };
        p.observe(&bs[0], &job, &idle, &outcome(20.0));
        assert!((bs[0].ledger().prefill.get().unwrap() - 30.0).abs() < 1e-6);
        // A request that queued on its slot says nothing about evaluation speed.
        let queued = Plan {
            wait_secs: 5.0,
            ..idle.clone()
        };
        p.observe(&bs[0], &job, &queued, &outcome(1.0));
        assert!((bs[0].ledger().prefill.get().unwrap() - 30.0).abs() < 1e-6);
        // One odd sample moves the average by at most four times the current value.
        p.observe(&bs[0], &job, &idle, &outcome(0.001));
        assert!(bs[0].ledger().prefill.get().unwrap() <= 30.0 + 0.2 * 90.0 + 1e-6);
    }

    #[test]
    fn unavailable_backends_are_never_picked() {
        let p = PredictedTtft::new(RoutingDefaults::default());
        let bs = fleet(2, 1);
        bs[0].set_health(Health::Down);
        bs[1].set_held(true);
        assert!(p.pick(&bs, &Job::default()).is_none());
        assert!(p.start_eta(&bs, &[], &Job::default()).is_none());
    }
}
