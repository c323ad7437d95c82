//! The `llamacpp:*` Prometheus metrics llama-server exposes, fed by the simulated work.
//!
//! Durations are the modelled ones (scaled by the time scale), the same figures the responses'
//! `timings` report. Slots decode independently here, so every generated token counts as one
//! decode call and `n_busy_slots_per_decode` is the average number of busy slots seen at each.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::config::Dialect;
use super::slots::PoolStats;

/// Tokens llama.cpp evaluates per decode call when it processes a prompt (`n_batch`).
const N_BATCH: u64 = 2048;

/// Counters behind `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    prompt_tokens: AtomicU64,
    prompt_tokens_cached: AtomicU64,
    prompt_us: AtomicU64,
    predicted_tokens: AtomicU64,
    predicted_us: AtomicU64,
    decodes: AtomicU64,
    /// Busy slots summed over every decode call, for `n_busy_slots_per_decode`.
    busy_slot_decodes: AtomicU64,
}

impl Metrics {
    /// A prompt finished evaluating: `evaluated` new tokens in `took`, `cached` reused.
    pub(crate) fn prompt_done(&self, evaluated: usize, cached: usize, took: Duration, busy: usize) {
        let evaluated = evaluated as u64;
        let decodes = evaluated.div_ceil(N_BATCH).max(1);
        self.prompt_tokens.fetch_add(evaluated, Ordering::Relaxed);
        self.prompt_tokens_cached
            .fetch_add(cached as u64, Ordering::Relaxed);
        self.prompt_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        self.decodes.fetch_add(decodes, Ordering::Relaxed);
        self.busy_slot_decodes
            .fetch_add(decodes * busy as u64, Ordering::Relaxed);
    }

    /// `n` tokens were generated in `took` while `busy` slots were processing.
    pub(crate) fn tokens_done(&self, n: usize, took: Duration, busy: usize) {
        let n = n as u64;
        self.predicted_tokens.fetch_add(n, Ordering::Relaxed);
        self.predicted_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        self.decodes.fetch_add(n, Ordering::Relaxed);
        self.busy_slot_decodes
            .fetch_add(n * busy as u64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of every metric the dialect's server has.
    pub(crate) fn render(&self, dialect: Dialect, pool: PoolStats, kv_capacity: usize) -> String {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let prompt_tokens = load(&self.prompt_tokens);
        let prompt_s = load(&self.prompt_us) as f64 / 1e6;
        let predicted = load(&self.predicted_tokens);
        let predicted_s = load(&self.predicted_us) as f64 / 1e6;
        let decodes = load(&self.decodes);
        let rate = |n: u64, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };

        let mut out = String::with_capacity(2048);
        let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
            // Writing to a String cannot fail.
            let _ = write!(
                out,
                "# HELP llamacpp:{name} {help}\n# TYPE llamacpp:{name} {kind}\nllamacpp:{name} {value}\n"
            );
        };
        metric(
            "prompt_tokens_total",
            "counter",
            "Prompt tokens evaluated (cached ones excluded).",
            prompt_tokens as f64,
        );
        if dialect == Dialect::LlamaCpp {
            metric(
                "prompt_tokens_cached_total",
                "counter",
                "Prompt tokens reused from a slot cache instead of evaluated.",
                load(&self.prompt_tokens_cached) as f64,
            );
        }
        metric(
            "prompt_seconds_total",
            "counter",
            "Seconds spent evaluating prompts.",
            prompt_s,
        );
        metric(
            "tokens_predicted_total",
            "counter",
            "Tokens generated.",
            predicted as f64,
        );
        metric(
            "tokens_predicted_seconds_total",
            "counter",
            "Seconds spent generating tokens.",
            predicted_s,
        );
        metric(
            "n_decode_total",
            "counter",
            "Decode calls: one per prompt batch and one per generated token.",
            decodes as f64,
        );
        metric(
            "n_busy_slots_per_decode",
            "gauge",
            "Mean number of slots busy at each decode call.",
            if decodes > 0 {
                load(&self.busy_slot_decodes) as f64 / decodes as f64
            } else {
                0.0
            },
        );
        metric(
            "prompt_tokens_seconds",
            "gauge",
            "Prompt evaluation throughput so far, tokens per second.",
            rate(prompt_tokens, prompt_s),
        );
        metric(
            "predicted_tokens_seconds",
            "gauge",
            "Generation throughput so far, tokens per second.",
            rate(predicted, predicted_s),
        );
        if dialect == Dialect::Bitnet {
            metric(
                "kv_cache_usage_ratio",
                "gauge",
                "Share of all slots' context occupied by cached tokens (1 = full).",
                if kv_capacity > 0 {
                    pool.cached_tokens as f64 / kv_capacity as f64
                } else {
                    0.0
                },
            );
            metric(
                "kv_cache_tokens",
                "gauge",
                "Tokens held in all slots' caches.",
                pool.cached_tokens as f64,
            );
        }
        metric(
            "requests_processing",
            "gauge",
            "Requests holding a slot.",
            pool.processing as f64,
        );
        metric(
            "requests_deferred",
            "gauge",
            "Requests waiting for a slot.",
            pool.deferred as f64,
        );
        out
    }
}
