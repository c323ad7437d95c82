//! The run loops: closed (a fixed number of workers) and open (Poisson arrivals), the stop
//! conditions they share, and the sink every measurement goes to.
//!
//! Stopping works in two stages. Once the duration is up or the request budget is spent, no new
//! request starts (think times are cut short too); requests already running may finish for up to
//! the drain period, after which a stop signal cancels them and they are recorded as cancelled,
//! so a slow target cannot stretch a bounded run indefinitely. An interrupt sends the same stop
//! signal at once; it also ends every pause (arrival waits, think times) and refuses new requests.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::config::{Load, RunConfig};
use super::exchange::{micros, ChatRequest, Exchange, HttpClient, Outcome, StreamOptions, Target};
use super::record::RequestRecord;
use super::rng::Rng;
use super::stats::latency_histogram;
use super::workload::{PromptShape, Session};

/// Counters the progress line reads while the run goes on.
#[derive(Debug, Default)]
pub(crate) struct Live {
    pub started: AtomicU64,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    pub tokens: AtomicU64,
    pub sessions: AtomicUsize,
    pub dropped: AtomicU64,
}

/// Where finished requests go.
struct Sink {
    records: Vec<RequestRecord>,
    itl: Histogram<u64>,
}

/// What the loops hand back.
pub(crate) struct Collected {
    pub records: Vec<RequestRecord>,
    pub itl: Histogram<u64>,
    pub dropped_arrivals: u64,
}

/// Token arrival times a run keeps at most with `token_times` (8 bytes each): 10 million, a
/// thousand 10,000-token streams. Requests recorded after the budget is spent keep none.
pub const MAX_TOKEN_TIMES: u64 = 10_000_000;

/// State shared by every task of one run.
pub(crate) struct Driver {
    cfg: RunConfig,
    client: HttpClient,
    target: Target,
    shape: PromptShape,
    start: Instant,
    deadline: Option<Instant>,
    issued: AtomicU64,
    /// What is left of [`MAX_TOKEN_TIMES`].
    token_times_left: AtomicU64,
    pub live: Arc<Live>,
    sink: Mutex<Sink>,
    stop: watch::Receiver<bool>,
}

impl Driver {
    pub fn new(
        cfg: RunConfig,
        client: HttpClient,
        target: Target,
        start: Instant,
        stop: watch::Receiver<bool>,
    ) -> Self {
        let shape = PromptShape::new(cfg.system_prompt_chars, cfg.turns);
        let deadline = cfg.duration.map(|d| start + d);
        Self {
            cfg,
            client,
            target,
            shape,
            start,
            deadline,
            issued: AtomicU64::new(0),
            token_times_left: AtomicU64::new(MAX_TOKEN_TIMES),
            live: Arc::new(Live::default()),
            sink: Mutex::new(Sink {
                records: Vec::new(),
                itl: latency_histogram(),
            }),
            stop,
        }
    }

    /// When new requests stop starting, if the run has a duration.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Runs the configured loop to completion and returns everything measured.
    pub async fn run(self: Arc<Self>) -> Collected {
        match self.cfg.load {
            Load::Closed { concurrency } => self.clone().closed_loop(concurrency).await,
            Load::Open {
                rate,
                max_in_flight,
            } => self.clone().open_loop(rate, max_in_flight).await,
        }
        let sink = std::mem::replace(
            &mut *self.sink.lock().expect("sink lock poisoned"),
            Sink {
                records: Vec::new(),
                itl: latency_histogram(),
            },
        );
        let mut records = sink.records;
        records.sort_by_key(|r| (r.start_us, r.session, r.turn));
        Collected {
            records,
            itl: sink.itl,
            dropped_arrivals: self.live.dropped.load(Ordering::Relaxed),
        }
    }

    async fn closed_loop(self: Arc<Self>, concurrency: usize) {
        let next_session = Arc::new(AtomicU64::new(0));
        let mut workers = JoinSet::new();
        for _ in 0..concurrency {
            let driver = self.clone();
            let next_session = next_session.clone();
            workers.spawn(async move {
                let mut arrivals = Vec::new();
                loop {
                    if !driver.may_start() {
                        break;
                    }
                    let index = next_session.fetch_add(1, Ordering::Relaxed);
                    if !driver.run_session(index, None, false, &mut arrivals).await {
                        break;
                    }
                }
            });
        }
        while workers.join_next().await.is_some() {}
    }

    async fn open_loop(self: Arc<Self>, rate: f64, max_in_flight: usize) {
        // Arrival gaps get their own stream so the schedule does not shift when session content
        // changes, and vice versa.
        let mut rng = Rng::derive(self.cfg.seed, u64::MAX);
        let mean_gap = 1.0 / rate;
        let mut sessions = JoinSet::new();
        let mut offset = 0.0;
        let mut index = 0;
        loop {
            offset += rng.exp(mean_gap);
            let Ok(gap) = Duration::try_from_secs_f64(offset) else {
                break;
            };
            let at = self.start + gap;
            if self.deadline.is_some_and(|d| at >= d) {
                break;
            }
            self.pause_until(at).await;
            while sessions.try_join_next().is_some() {}
            if self.live.sessions.load(Ordering::Relaxed) >= max_in_flight {
                self.live.dropped.fetch_add(1, Ordering::Relaxed);
                index += 1;
                continue;
            }
            // The scheduler takes the first ticket itself so a request budget is never
            // overshot by sessions spawned before their tasks got to run.
            if !self.take_ticket() {
                break;
            }
            let driver = self.clone();
            let scheduled = micros(gap);
            self.live.sessions.fetch_add(1, Ordering::Relaxed);
            sessions.spawn(async move {
                let mut arrivals = Vec::new();
                driver
                    .run_session(index, Some(scheduled), true, &mut arrivals)
                    .await;
                driver.live.sessions.fetch_sub(1, Ordering::Relaxed);
            });
            index += 1;
        }
        while sessions.join_next().await.is_some() {}
    }

    /// Whether the stop signal was sent.
    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Sleeps until `at`, or until the stop signal.
    async fn pause_until(&self, at: Instant) {
        let mut stop = self.stop.clone();
        tokio::select! {
            () = tokio::time::sleep_until(at.into()) => {}
            _ = stop.wait_for(|stopped| *stopped) => {}
        }
    }

    /// Whether a new request could still start.
    fn may_start(&self) -> bool {
        if self.stopped() || self.deadline.is_some_and(|d| Instant::now() >= d) {
            return false;
        }
        self.cfg
            .max_requests
            .is_none_or(|max| self.issued.load(Ordering::Relaxed) < max)
    }

    /// Claims the right to send one request.
    fn take_ticket(&self) -> bool {
        if self.stopped() || self.deadline.is_some_and(|d| Instant::now() >= d) {
            return false;
        }
        let n = self.issued.fetch_add(1, Ordering::Relaxed);
        self.cfg.max_requests.is_none_or(|max| n < max)
    }

    /// Runs one session's turns. Returns `false` once the run allows no more requests.
    async fn run_session(
        &self,
        index: u64,
        scheduled_us: Option<u64>,
        mut prepaid: bool,
        arrivals: &mut Vec<u64>,
    ) -> bool {
        let mut session = Session::new(self.cfg.seed, index, &self.cfg.workload, &self.shape);
        let max_tokens = self.cfg.max_tokens_for(session.kind);
        while session.has_next() {
            if session.turn() > 0 && !self.cfg.think_time.is_zero() {
                let wake = Instant::now() + self.cfg.think_time;
                let wake = self.deadline.map_or(wake, |d| wake.min(d));
                self.pause_until(wake).await;
            }
            if !std::mem::take(&mut prepaid) && !self.take_ticket() {
                return false;
            }
            let messages = session.next_turn().expect("has_next was checked");
            let body = serde_json::to_vec(&ChatRequest {
                model: &self.cfg.model,
                messages,
                stream: self.cfg.stream,
                stream_options: self.cfg.stream.then_some(StreamOptions {
                    include_usage: true,
                }),
                max_tokens,
            })
            .expect("chat requests always serialise");
            let keep_reply = session.needs_replies();
            let sent_at = Instant::now();
            let outcome = self.send(Bytes::from(body), keep_reply, arrivals).await;
            let scheduled_us = scheduled_us.filter(|_| session.turn() == 1);
            self.record(&session, scheduled_us, sent_at, &outcome, arrivals);
            if outcome.error.is_some() {
                // Without the reply the history cannot grow the way a real client's would.
                session.abandon();
            } else if keep_reply {
                session.push_reply(&outcome.reply);
            }
        }
        true
    }

    async fn send(&self, body: Bytes, keep_reply: bool, arrivals: &mut Vec<u64>) -> Outcome {
        self.live.started.fetch_add(1, Ordering::Relaxed);
        let exchange = Exchange {
            client: &self.client,
            target: &self.target,
            stream: self.cfg.stream,
            keep_reply,
            timeout: self.cfg.timeout,
        };
        let mut stop = self.stop.clone();
        arrivals.clear();
        exchange
            .run(body, arrivals, async move {
                // A dropped sender means the run is over too.
                let _ = stop.wait_for(|stopped| *stopped).await;
            })
            .await
    }

    /// Whether a request's `count` token times are kept: the run asked for them and the
    /// budget still holds them.
    fn keep_token_times(&self, count: usize) -> bool {
        let count = count as u64;
        self.cfg.token_times
            && self
                .token_times_left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                    left.checked_sub(count)
                })
                .is_ok()
    }

    fn record(
        &self,
        session: &Session,
        scheduled_us: Option<u64>,
        sent_at: Instant,
        out: &Outcome,
        arrivals: &[u64],
    ) {
        let ok = out.error.is_none();
        let completion_tokens = out.completion_tokens();
        let ttft_us = out.ttft.map(micros);
        let e2e_us = micros(out.e2e);
        let gap_count = out.content_chunks.saturating_sub(1);
        // Only when tokens arrived spread out: a response delivered in one burst has no
        // measurable generation speed, and dividing by its microseconds would be noise.
        let decode_tokens_per_s = match ttft_us {
            Some(ttft)
                if ok && !out.itl_sum.is_zero() && completion_tokens > 1 && e2e_us > ttft =>
            {
                Some((completion_tokens - 1) as f64 / ((e2e_us - ttft) as f64 / 1e6))
            }
            _ => None,
        };
        let start_us = micros(sent_at.saturating_duration_since(self.start));
        let token_us = self
            .keep_token_times(arrivals.len())
            .then(|| arrivals.iter().map(|at| start_us + at).collect());
        let record = RequestRecord {
            session: session.index,
            turn: session.turn(),
            workload: session.kind,
            scheduled_us,
            start_us,
            ttft_us,
            e2e_us,
            itl_mean_us: (gap_count > 0).then(|| micros(out.itl_sum) / gap_count),
            itl_max_us: (gap_count > 0).then(|| micros(out.itl_max)),
            completion_tokens,
            prompt_tokens: out.prompt_tokens(),
            cached_tokens: out.cached_tokens(),
            decode_tokens_per_s,
            status: out.status,
            error: out.error.as_ref().map(|(kind, _)| *kind),
            error_message: out.error.as_ref().map(|(_, msg)| msg.clone()),
            token_us,
        };
        if ok {
            self.live.completed.fetch_add(1, Ordering::Relaxed);
            self.live
                .tokens
                .fetch_add(completion_tokens, Ordering::Relaxed);
        } else {
            self.live.failed.fetch_add(1, Ordering::Relaxed);
        }
        let mut sink = self.sink.lock().expect("sink lock poisoned");
        if ok {
            for pair in arrivals.windows(2) {
                sink.itl
                    .saturating_record(pair[1].saturating_sub(pair[0]).max(1));
            }
        }
        sink.records.push(record);
    }
}
