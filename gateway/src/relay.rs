//! Relay: pass a backend's response body to the client frame by frame, untouched.
//!
//! The [`RelayBody`] owns the request's [`SlotGuard`]. The slot is released the moment the
//! last frame passes, when the upstream fails, or when hyper drops the body because the
//! client went away, and never twice, because the guard is an `Option` taken once and its
//! `Drop` does the release. Dropping the upstream body mid-stream closes the backend
//! connection, which is how llama-server learns to stop generating.
//!
//! On the way it feeds each frame to the [`Scanner`] (which only reads), and when the body
//! ends, fails or is dropped it records the request's metrics and access-log line, once.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::backend::Health;
use crate::balance::Outcome;
use crate::body::BoxError;
use crate::dialect::bitnet::SseFixer;
use crate::error::error_body;
use crate::forward::UpstreamBody;
use crate::metrics::Metrics;
use crate::pool::SlotGuard;
use crate::sse::Scanner;

/// What the relay records about the exchange it carries.
#[derive(Debug)]
pub struct Exchange {
    /// The request id (also in `X-Request-Id`).
    pub request_id: String,
    /// Endpoint label, from a closed set.
    pub endpoint: &'static str,
    /// When the request arrived at the gateway.
    pub arrived: Instant,
    /// When the backend's response head arrived.
    pub head_at: Instant,
    /// Time spent waiting for a slot.
    pub queue_wait: Duration,
    /// The backend's status code.
    pub status: u16,
    /// Where to record.
    pub metrics: Arc<Metrics>,
}

/// How a relayed body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Complete,
    UpstreamBroken,
    ClientGone,
}

impl Ending {
    /// The name the access log gives it.
    fn as_str(self) -> &'static str {
        match self {
            Ending::Complete => "Complete",
            Ending::UpstreamBroken => "UpstreamBroken",
            Ending::ClientGone => "ClientGone",
        }
    }
}

/// A backend's body on its way to the client, holding the slot it occupies.
pub struct RelayBody {
    /// `None` once the upstream body has ended (or when it was read in full beforehand).
    upstream: Option<UpstreamBody>,
    /// Bytes already read from the upstream (a peeked first event, or a whole body), sent
    /// before anything else.
    prefix: Option<Bytes>,
    /// Rewrites the older BitNet server's error lines; `None` for everyone else.
    fixer: Option<SseFixer>,
    guard: Option<SlotGuard>,
    // The response is an SSE stream: a broken upstream ends it with an error event
    // rather than a truncated message, because SSE clients read events, not framing.
    sse: bool,
    done: bool,
    scanner: Scanner,
    exchange: Exchange,
    first_content: Option<Instant>,
    bytes: u64,
    recorded: bool,
    /// Fires when the backend may have been silent too long: until the first data, after
    /// the first-byte timeout (prompt evaluation on a CPU can take minutes); after it,
    /// `idle` past the last data. Not re-armed per chunk (that would touch the timer wheel
    /// for every token): when it fires, it checks `last_data` and re-arms if data came.
    idle_timer: Pin<Box<tokio::time::Sleep>>,
    /// The waker the idle timer holds from its last poll. Polling a `Sleep` registers the
    /// waker again every time (about 400 instructions, more than half of what the token
    /// accounting costs), and the body is polled once per token; while the same task polls
    /// and the timer has not fired, there is nothing to register.
    idle_waker: Option<Waker>,
    /// When `idle_timer` is due, kept beside the fields a token touches anyway. The check
    /// made after every token (is the timer still pending?) compares the clock with it
    /// instead of reading the timer's own allocation: with a thousand streams in flight
    /// that allocation has left the cache between two tokens, and loading it was the
    /// costliest single step of relaying one (about 0.4 µs in a profile of the fan-out).
    idle_deadline: Instant,
    idle: Duration,
    last_data: Option<Instant>,
}

/// The backend went silent mid-response for longer than the idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("the backend sent nothing for {0:?} in the middle of the response")]
pub struct UpstreamIdle(Duration);

impl RelayBody {
    /// Relay `upstream` after `prefix`, passing data through `fixer` if given, and release
    /// `guard` when it ends. `timeouts` are the longest silences before the first data and
    /// between later data.
    pub fn new(
        upstream: Option<UpstreamBody>,
        prefix: Option<Bytes>,
        fixer: Option<SseFixer>,
        guard: SlotGuard,
        sse: bool,
        exchange: Exchange,
        timeouts: (Duration, Duration),
    ) -> RelayBody {
        let (first, idle) = timeouts;
        let idle_deadline = Instant::now() + first;
        RelayBody {
            upstream,
            prefix,
            fixer,
            guard: Some(guard),
            sse,
            done: false,
            scanner: Scanner::new(sse),
            exchange,
            first_content: None,
            bytes: 0,
            recorded: false,
            idle_timer: Box::pin(tokio::time::sleep_until(idle_deadline)),
            idle_waker: None,
            idle_deadline,
            idle,
            last_data: None,
        }
    }

    fn finish(&mut self, ending: Ending) {
        if !self.recorded {
            self.recorded = true;
            record(
                self.guard.as_ref(),
                &mut self.scanner,
                &self.exchange,
                self.first_content,
                self.bytes,
                self.sse,
                ending,
            );
        }
    }

    /// Account for data about to be sent.
    fn observe(&mut self, data: &[u8]) {
        let now = Instant::now();
        if self.last_data.is_none() {
            // From the first data on, silence is measured against `idle`.
            self.arm_idle_timer(now + self.idle);
            self.idle_waker = None;
        }
        self.last_data = Some(now);
        self.bytes += data.len() as u64;
        if self.scanner.feed(data) && self.first_content.is_none() {
            self.first_content = Some(now);
        }
    }

    /// Set the idle timer to fire at `at`, and its copy of the deadline with it.
    fn arm_idle_timer(&mut self, at: Instant) {
        self.idle_deadline = at;
        self.idle_timer.as_mut().reset(at);
    }

    /// A body of known length is over when its last byte is handed on: hyper writes it
    /// and may drop the body without polling again, which must not count as a client
    /// that went away. Record the end now, and release the slot with it.
    fn complete_if_ended(&mut self) {
        let upstream_done = self.upstream.as_ref().is_none_or(|u| u.is_end_stream());
        if upstream_done && self.prefix.is_none() && self.fixer.is_none() {
            self.done = true;
            self.finish(Ending::Complete);
            self.guard.take();
        }
    }

    /// Whether the backend has been silent past its deadline; re-arms the timer when data
    /// arrived since it was set.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let registered = self
            .idle_waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()));
        // Before its deadline the timer cannot have fired, so its waker is still ours.
        if registered && Instant::now() < self.idle_deadline {
            return false;
        }
        loop {
            if self.idle_timer.as_mut().poll(cx).is_pending() {
                self.idle_waker = Some(cx.waker().clone());
                return false;
            }
            match self.last_data {
                Some(at) if at + self.idle > Instant::now() => self.arm_idle_timer(at + self.idle),
                _ => return true,
            }
        }
    }

    fn fix(&mut self, data: Bytes) -> Bytes {
        match self.fixer.as_mut() {
            Some(f) => f.feed(&data),
            None => data,
        }
    }
}

impl Drop for RelayBody {
    fn drop(&mut self) {
        self.finish(Ending::ClientGone);
    }
}

/// The SSE event that ends a stream whose backend broke after bytes reached the client.
pub fn broken_stream_event(backend: &str) -> Bytes {
    let body = error_body(
        &format!("the backend {backend} failed in the middle of the response"),
        "server_error",
        "upstream_stream_broken",
    );
    let mut ev = Vec::with_capacity(body.len() + 8);
    ev.extend_from_slice(b"data: ");
    ev.extend_from_slice(&body);
    ev.extend_from_slice(b"\n\n");
    Bytes::from(ev)
}

/// Record metrics and the access-log line for one finished exchange.
fn record(
    guard: Option<&SlotGuard>,
    scanner: &mut Scanner,
    ex: &Exchange,
    first_content: Option<Instant>,
    bytes: u64,
    sse: bool,
    ending: Ending,
) {
    let Some(guard) = guard else {
        return;
    };
    let now = Instant::now();
    let backend = guard.backend().name.as_str();
    let model = guard.pool().id.as_str();
    let tally = scanner.finish();
    let m = &*ex.metrics;
    let series = m.series(
        (
            Arc::as_ptr(guard.backend()) as usize,
            Arc::as_ptr(guard.pool()) as usize,
        ),
        backend,
        model,
        ex.endpoint,
    );
    if ex.status == 200 {
        series.ok(m).inc();
    } else {
        m.requests
            .requests
            .with_label_values(&[backend, model, ex.endpoint, &ex.status.to_string()])
            .inc();
    }
    let duration = now - ex.arrived;
    series.duration(m).observe(duration.as_secs_f64());
    let ttft = if sse {
        first_content.map(|t| t - ex.arrived)
    } else {
        Some(ex.head_at - ex.arrived)
    };
    if let Some(t) = ttft {
        series.ttft(m).observe(t.as_secs_f64());
    }
    if let Some(n) = tally.prompt_tokens {
        series.prompt_tokens(m).inc_by(n);
    }
    if let Some(n) = tally.cached_tokens {
        series.cached_tokens(m).inc_by(n);
    }
    let completion = tally.completion();
    if completion > 0 {
        series.completion_tokens(m).inc_by(completion);
    }
    let tps = tally.predicted_per_second.or_else(|| {
        // Decode rate from our own clock: tokens after the first, over the time after it.
        let first = first_content?;
        let secs = (now - first).as_secs_f64();
        (completion > 1 && secs > 0.0).then(|| (completion - 1) as f64 / secs)
    });
    if let Some(r) = tps.filter(|r| r.is_finite() && *r > 0.0) {
        series.tokens_per_second(m).observe(r);
    }
    if let Some(plan) = guard.plan() {
        // Time to first token from the moment the slot was claimed, which is where the
        // prediction starts.
        let since_claim = ttft.map(|t| t.saturating_sub(ex.queue_wait));
        if let Some(actual) = since_claim {
            m.routing
                .ttft_error
                .with_label_values(&[backend])
                .observe(actual.as_secs_f64() - plan.ttft_secs);
        }
        m.routing
            .predicted_cached
            .with_label_values(&[backend])
            .inc_by(plan.cached_tokens as u64);
        let outcome = Outcome {
            prompt_tokens: tally.prompt_tokens,
            cached_tokens: tally.cached_tokens,
            evaluated_tokens: tally.evaluated_tokens,
            prompt_per_second: tally.prompt_per_second,
            predicted_per_second: tps,
            completion_tokens: completion,
            complete: ending == Ending::Complete && ex.status < 400,
            ttft: since_claim,
        };
        guard.pool().observe(guard, &outcome);
    }
    match ending {
        Ending::Complete => {}
        Ending::UpstreamBroken => series.broken_streams(m).inc(),
        Ending::ClientGone => series.client_disconnects(m).inc(),
    }
    crate::logging::Access {
        request_id: &ex.request_id,
        model,
        backend,
        endpoint: ex.endpoint,
        status: ex.status,
        ending: ending.as_str(),
        queue_wait_ms: ex.queue_wait.as_millis() as u64,
        ttft_ms: ttft.map(|t| t.as_millis() as u64),
        prompt_tokens: tally.prompt_tokens,
        completion_tokens: completion,
        duration_ms: duration.as_millis() as u64,
        bytes,
    }
    .log();
}

impl Body for RelayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if let Some(p) = this.prefix.take() {
                let p = this.fix(p);
                if !p.is_empty() {
                    this.observe(&p);
                    this.complete_if_ended();
                    return Poll::Ready(Some(Ok(Frame::data(p))));
                }
                continue;
            }
            let Some(upstream) = this.upstream.as_mut() else {
                // Ended: send what the fixer still holds, then finish.
                if let Some(rest) = this
                    .fixer
                    .as_mut()
                    .map(SseFixer::finish)
                    .filter(|r| !r.is_empty())
                {
                    this.observe(&rest);
                    return Poll::Ready(Some(Ok(Frame::data(rest))));
                }
                this.done = true;
                this.finish(Ending::Complete);
                this.guard.take();
                return Poll::Ready(None);
            };
            let polled = match Pin::new(upstream).poll_frame(cx) {
                // Only a backend with nothing to give is idle: a slow client that makes us
                // poll late finds data waiting and never trips the timer.
                Poll::Pending if this.idle_expired(cx) => {
                    Poll::Ready(Some(Err(Box::new(UpstreamIdle(this.idle)) as BoxError)))
                }
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e) as BoxError))),
                Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
                Poll::Ready(None) => Poll::Ready(None),
            };
            match polled {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let data = this.fix(data);
                        if data.is_empty() {
                            continue;
                        }
                        this.observe(&data);
                        this.complete_if_ended();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Err(other) => return Poll::Ready(Some(Ok(other))),
                },
                Poll::Ready(None) => this.upstream = None,
                Poll::Ready(Some(Err(err))) => {
                    this.done = true;
                    this.finish(Ending::UpstreamBroken);
                    let guard = this.guard.take();
                    let name = guard
                        .as_ref()
                        .map(|g| g.backend().name.clone())
                        .unwrap_or_default();
                    if let Some(g) = &guard {
                        // A body that breaks mid-way almost always means the process died or
                        // the connection was cut; the prober re-admits it if it is fine.
                        if g.backend().set_health(Health::Down) != Health::Down {
                            tracing::warn!(backend = %name, error = %err, "backend broke mid-response; marked down");
                        }
                    }
                    drop(guard);
                    return if this.sse {
                        Poll::Ready(Some(Ok(Frame::data(broken_stream_event(&name)))))
                    } else {
                        Poll::Ready(Some(Err(err)))
                    };
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Not the upstream's flag: hyper must poll once more so the end is observed and
        // recorded as complete rather than as a client that went away.
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.upstream, &self.prefix, &self.fixer) {
            _ if self.done => SizeHint::with_exact(0),
            // Rewritten bytes may change length: promise nothing.
            (_, _, Some(_)) => SizeHint::default(),
            (Some(up), None, None) => up.size_hint(),
            (None, Some(p), None) => SizeHint::with_exact(p.len() as u64),
            (Some(up), Some(p), None) => {
                let up = up.size_hint();
                let extra = p.len() as u64;
                let mut h = SizeHint::new();
                // Upper before lower: `set_lower` asserts lower <= upper.
                if let Some(u) = up.upper() {
                    h.set_upper(u + extra);
                }
                h.set_lower(up.lower() + extra);
                h
            }
            (None, None, None) => SizeHint::with_exact(0),
        }
    }
}
