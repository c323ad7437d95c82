//! Running one generation: wait for a slot, evaluate the prompt, generate tokens on a timer.
//!
//! Deadlines are computed from the end of prompt evaluation, token `i` (from 1) being due
//! `i / decode_rate` seconds after it, so timer lateness never accumulates. Tokens that are due
//! together (when the scaled token interval is below the timer's resolution, or the task woke
//! late)
//! go out as one write.
//!
//! The same code serves the timed path, where output goes through a channel to the response body,
//! and the zero-latency path, where it is collected into one body; [`Out`] is the difference.

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};

use super::body::Msg;
use super::config::Dialect;
use super::error::ApiError;
use super::request::Job;
use super::slots::{TaskInfo, Want};
use super::state::{MidStream, Sim};
use super::tokens::{token_id, Babble};
use super::wire::{Stats, Wire};

/// Message of the injected mid-stream error.
const INJECTED_ERROR: &str = "llama_decode failed (injected by --error-mid-stream-after)";

/// The client went away; stop working for it.
#[derive(Debug)]
pub(crate) struct Gone;

/// Where a generation's output goes.
pub(crate) trait Out {
    /// Hands bytes (or, before any byte, an HTTP error) to the client.
    async fn send(&mut self, msg: Msg) -> Result<(), Gone>;

    /// Waits for `work`, giving up early if the client leaves and this server would notice.
    async fn watch<F: Future>(&mut self, work: F) -> Result<F::Output, Gone>;

    /// Never produces anything again; returns only once the client has left.
    async fn hang(&mut self);
}

/// Output streamed to a response body through a channel.
pub(crate) struct Channel {
    pub(crate) tx: mpsc::Sender<Msg>,
    /// Upstream polls for closed connections while it works; the fork only finds out when a
    /// write fails.
    pub(crate) notices_disconnect: bool,
}

impl Out for Channel {
    async fn send(&mut self, msg: Msg) -> Result<(), Gone> {
        self.tx.send(msg).await.map_err(|_| Gone)
    }

    async fn watch<F: Future>(&mut self, work: F) -> Result<F::Output, Gone> {
        if !self.notices_disconnect {
            return Ok(work.await);
        }
        tokio::select! {
            out = work => Ok(out),
            () = self.tx.closed() => Err(Gone),
        }
    }

    async fn hang(&mut self) {
        self.tx.closed().await;
    }
}

/// Output collected into one body, for zero-latency answers.
#[derive(Default)]
pub(crate) struct Collect {
    pub(crate) data: BytesMut,
    pub(crate) fail: Option<ApiError>,
}

impl Out for Collect {
    async fn send(&mut self, msg: Msg) -> Result<(), Gone> {
        match msg {
            Msg::Data(b) => self.data.extend_from_slice(&b),
            Msg::Fail(e) => self.fail = Some(e),
        }
        Ok(())
    }

    async fn watch<F: Future>(&mut self, work: F) -> Result<F::Output, Gone> {
        Ok(work.await)
    }

    async fn hang(&mut self) {
        std::future::pending().await
    }
}

/// How often a request that does not stream updates its progress in `/slots` and `/metrics`.
const PROGRESS_TICK: Duration = Duration::from_millis(100);

/// Runs `job` (generation request number `seq`) to its end, or to `fault`.
pub(crate) async fn run(
    sim: &Sim,
    job: Job,
    seq: u64,
    fault: Option<(usize, MidStream)>,
    out: &mut impl Out,
) -> Result<(), Gone> {
    let cfg = &sim.cfg;
    let timed = !cfg.zero_latency;
    let want = Want {
        prompt: job.prompt.clone(),
        pin: job.id_slot,
        cache_prompt: job.cache_prompt,
        task: TaskInfo {
            id_task: sim.next_task(),
            n_predict: job.n_predict,
        },
    };
    let mut claim = out.watch(sim.pool.acquire(want)).await?;
    let mut wire = Wire::new(&job, cfg.dialect, claim.idx(), seq, unix_now());

    let cache_n = claim.cache_n();
    let prompt_n = job.prompt.len() - cache_n;
    let prompt_d = cfg.scaled_secs(prompt_n as f64 / cfg.prefill_rate);
    let gen_start = Instant::now() + prompt_d;
    if timed {
        out.watch(sleep_until(gen_start)).await?;
    }
    claim.prompt_evaluated();
    sim.metrics
        .prompt_done(prompt_n, cache_n, prompt_d, sim.pool.busy());

    let decode_time = |n: usize| cfg.scaled_secs(n as f64 / cfg.decode_rate);
    let due = |k: usize| gen_start + decode_time(k);
    let limit = fault.map_or(job.n_predict, |(k, _)| k.min(job.n_predict));
    let mut babble = Babble::new(job.seed);
    let mut buf = BytesMut::with_capacity(512);
    let mut sent = false;
    let mut done = 0;
    while done < limit {
        let upto = if !timed {
            limit
        } else if !job.stream {
            // The client sees no token before the end, but `/slots` and `/metrics` show the
            // real server's progress as it goes: count them every PROGRESS_TICK or so, not
            // one timer per token.
            let per_tick = (PROGRESS_TICK.as_secs_f64() / decode_time(1).as_secs_f64()) as usize;
            let target = done.saturating_add(per_tick.max(1)).min(limit);
            out.watch(sleep_until(due(target))).await?;
            target
        } else {
            out.watch(sleep_until(due(done + 1))).await?;
            let now = Instant::now();
            let mut upto = done + 1;
            while upto < limit && due(upto + 1) <= now {
                upto += 1;
            }
            upto
        };
        for _ in done..upto {
            let piece = babble.next_piece();
            claim.push_generated(token_id(piece));
            wire.token(&mut buf, piece);
        }
        claim.set_decoded(upto);
        sim.metrics
            .tokens_done(upto - done, decode_time(upto - done), sim.pool.busy());
        done = upto;
        if job.stream {
            out.send(Msg::Data(buf.split().freeze())).await?;
            sent = true;
        }
    }

    match fault.map(|(_, f)| f) {
        Some(MidStream::Hang) => {
            out.hang().await;
            return Err(Gone);
        }
        Some(MidStream::Crash) => {
            sim.crash();
            out.hang().await;
            return Err(Gone);
        }
        Some(MidStream::Error) => {
            drop(claim);
            let err = ApiError::Server(INJECTED_ERROR.to_owned());
            // Upstream holds its headers until the first token, so an error before it is still
            // an HTTP error; the fork has sent its 200 already.
            let before_headers = !job.stream || (cfg.dialect == Dialect::LlamaCpp && !sent);
            if before_headers {
                return out.send(Msg::Fail(err)).await;
            }
            wire.error(&mut buf, &err);
            return out.send(Msg::Data(buf.split().freeze())).await;
        }
        None => {}
    }

    let stats = Stats {
        cache_n,
        prompt_n,
        prompt_ms: ms(prompt_d),
        predicted_n: job.n_predict,
        predicted_ms: ms(decode_time(job.n_predict)),
    };
    // Free the slot before the last bytes leave, as llama-server does, so that a client sending
    // its next turn right away finds the slot (and its cache) idle.
    drop(claim);
    wire.finish(&mut buf, &stats);
    out.send(Msg::Data(buf.split().freeze())).await
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
