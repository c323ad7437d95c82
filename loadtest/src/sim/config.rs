//! What a simulated server is: its dialect, capacity, speed and injected faults.

use std::time::Duration;

/// Model path reported by `/v1/models` and `/props` when none is given.
pub const DEFAULT_MODEL_PATH: &str = "models/Falcon3-10B-Instruct-1.58bit/ggml-model-i2_s.gguf";

/// Longest single delay the simulator schedules; a year is "never" for any test or benchmark.
const MAX_DELAY: Duration = Duration::from_secs(365 * 24 * 3600);

/// Which llama-server the simulator imitates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Dialect {
    /// Current upstream llama.cpp `llama-server`.
    #[value(name = "llama.cpp")]
    LlamaCpp,
    /// The October 2024 llama.cpp fork that bitnet.cpp builds.
    #[value(name = "bitnet")]
    Bitnet,
}

impl Dialect {
    /// Slots a server of this dialect starts with when not told otherwise.
    pub fn default_slots(self) -> usize {
        match self {
            Dialect::LlamaCpp => 4,
            Dialect::Bitnet => 1,
        }
    }

    /// Whether `cache_prompt` is on when a request does not say.
    pub fn default_cache_prompt(self) -> bool {
        self == Dialect::LlamaCpp
    }

    /// Share of a prompt an idle slot must already hold to be preferred over the least recently
    /// used one.
    pub(crate) fn slot_similarity(self) -> f64 {
        match self {
            Dialect::LlamaCpp => 0.10,
            Dialect::Bitnet => 0.50,
        }
    }
}

/// Everything that shapes one simulated server. Build it with [`SimConfig::new`] and adjust the
/// public fields; [`crate::sim::serve`] validates it before serving.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// API shapes and behaviours to imitate.
    pub dialect: Dialect,
    /// The `-m` model path; the model id when no alias is set.
    pub model_path: String,
    /// The `--alias` model name, which replaces the path as the model id.
    pub alias: Option<String>,
    /// Number of slots, i.e. requests processed at once; later ones wait in FIFO order.
    pub slots: usize,
    /// Whether `/slots` answers. The bitnet fork only serves it when started with `--slots`.
    pub slots_endpoint: bool,
    /// The server-wide cap on tokens generated per request (`-n`); `None` leaves the
    /// dialect's own (none upstream, 4096 for the fork).
    pub n_predict: Option<usize>,
    /// The key every endpoint but /health and the model list requires (`--api-key`).
    pub api_key: Option<String>,
    /// Context size of each slot, in tokens.
    pub ctx: usize,
    /// Prompt evaluation speed, tokens per second.
    pub prefill_rate: f64,
    /// Generation speed of one slot, tokens per second.
    pub decode_rate: f64,
    /// Tokens generated when a request sets no limit; the model then "stops by itself".
    pub default_max_tokens: usize,
    /// Multiplies every delay, including `load_time` and the `slow_start` fault.
    pub time_scale: f64,
    /// Answer without sleeping at all. Reported timings still show the modelled durations.
    pub zero_latency: bool,
    /// How long `/health` (and every other endpoint) answers 503 "Loading model" after start.
    pub load_time: Duration,
    /// Injected failures.
    pub faults: Faults,
}

impl SimConfig {
    /// The defaults of `dialect`: its slot count, BitNet-like speeds (60 tok/s prompt, 18 tok/s
    /// generation), 4096 tokens of context, real time, no faults.
    pub fn new(dialect: Dialect) -> SimConfig {
        SimConfig {
            dialect,
            model_path: DEFAULT_MODEL_PATH.to_owned(),
            alias: None,
            slots: dialect.default_slots(),
            slots_endpoint: dialect == Dialect::LlamaCpp,
            n_predict: None,
            api_key: None,
            ctx: 4096,
            prefill_rate: 60.0,
            decode_rate: 18.0,
            default_max_tokens: 128,
            time_scale: 1.0,
            zero_latency: false,
            load_time: Duration::ZERO,
            faults: Faults::default(),
        }
    }

    /// The id `/v1/models` reports.
    pub fn model_id(&self) -> &str {
        self.alias.as_deref().unwrap_or(&self.model_path)
    }

    /// Checks that the numbers describe a server that can run.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.slots == 0 {
            return Err(ConfigError::Invalid("slots", "must be at least 1"));
        }
        if self.ctx == 0 {
            return Err(ConfigError::Invalid("ctx", "must be at least 1"));
        }
        if !(self.prefill_rate.is_finite() && self.prefill_rate > 0.0) {
            return Err(ConfigError::Invalid(
                "prefill_rate",
                "must be a positive number",
            ));
        }
        if !(self.decode_rate.is_finite() && self.decode_rate > 0.0) {
            return Err(ConfigError::Invalid(
                "decode_rate",
                "must be a positive number",
            ));
        }
        if !(self.time_scale.is_finite() && self.time_scale >= 0.0) {
            return Err(ConfigError::Invalid("time_scale", "must be a number >= 0"));
        }
        if self.faults.every == 0 {
            return Err(ConfigError::Invalid("fault_every", "must be at least 1"));
        }
        if self.faults.crash_after == Some(0) {
            return Err(ConfigError::Invalid(
                "crash_after",
                "counts requests from 1",
            ));
        }
        Ok(())
    }

    /// `secs` of modelled time as wall time under `time_scale`, at most [`MAX_DELAY`] so that
    /// absurd requests (a billion tokens) cannot overflow a deadline.
    pub(crate) fn scaled_secs(&self, secs: f64) -> Duration {
        Duration::try_from_secs_f64(secs * self.time_scale)
            .unwrap_or(MAX_DELAY)
            .min(MAX_DELAY)
    }

    /// A configured delay under `time_scale`.
    pub(crate) fn scaled(&self, d: Duration) -> Duration {
        self.scaled_secs(d.as_secs_f64())
    }
}

/// Failures to inject. Request numbers count generation requests (the chat, completions and
/// native completion endpoints) from 1 in arrival order; other endpoints are never faulted.
#[derive(Debug, Clone, PartialEq)]
pub struct Faults {
    /// The server dies when generation request N arrives (or, with `crash_after_tokens`, once
    /// that request has streamed that many tokens).
    pub crash_after: Option<u64>,
    /// Makes the `crash_after` crash happen mid-stream, after this many tokens.
    pub crash_after_tokens: Option<usize>,
    /// Selected requests are accepted and never answered: not even a status line.
    pub hang_before_first_byte: bool,
    /// Selected requests stop producing output after this many tokens and never finish.
    pub hang_mid_stream_after: Option<usize>,
    /// Selected requests fail with the dialect's mid-stream error after this many tokens.
    pub error_mid_stream_after: Option<usize>,
    /// Delay before selected requests get any byte of an answer.
    pub slow_start: Duration,
    /// Selected requests get 503 "Loading model" at once.
    pub fail_503: bool,
    /// Which requests the per-request faults above select: every Nth (1 = all).
    pub every: u64,
}

impl Default for Faults {
    fn default() -> Faults {
        Faults {
            crash_after: None,
            crash_after_tokens: None,
            hang_before_first_byte: false,
            hang_mid_stream_after: None,
            error_mid_stream_after: None,
            slow_start: Duration::ZERO,
            fail_503: false,
            every: 1,
        }
    }
}

impl Faults {
    /// Whether the per-request faults apply to generation request `n` (counted from 1).
    pub(crate) fn selects(&self, n: u64) -> bool {
        n.is_multiple_of(self.every)
    }
}

/// A [`SimConfig`] that cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A field holds an unusable value.
    #[error("invalid {0}: {1}")]
    Invalid(&'static str, &'static str),
}
