//! `llama-sim`: a llama-server that does no inference but takes the time a BitNet CPU backend
//! would, so a gateway can be tested and benchmarked against realistic latency cheaply.
//!
//! # The model of timing and caching
//!
//! - The server has `slots` slots. A generation request takes an idle slot, or waits in one FIFO
//!   queue (counted by `llamacpp:requests_deferred`) until a slot it can use frees up. A request
//!   pinned with `id_slot` waits for that slot only, without holding up the requests behind it.
//! - Each slot remembers the tokens it holds: the prompt of its last request plus the tokens
//!   generated for it. A request evaluates only the part of its prompt after the longest common
//!   prefix with that cache (`cache_n` tokens are reused, `prompt_n` evaluated; at least one token
//!   is always evaluated, as in llama.cpp). `cache_prompt: false` (the bitnet default) evaluates
//!   the whole prompt.
//! - An idle slot is chosen by that common prefix when it covers more than a share of the prompt
//!   (10% upstream, 50% bitnet), else the least recently used slot wins.
//! - Prompt evaluation takes `prompt_n / prefill_rate` seconds. Then token `i` (from 1) is due
//!   `i / decode_rate` seconds after evaluation ended, so the first token arrives after
//!   `prompt_n / prefill_rate + 1 / decode_rate`. Every slot decodes at the full rate: slots do
//!   not slow each other down.
//! - Every delay is multiplied by `time_scale`; `timings`, `usage` and `/metrics` report the
//!   scaled durations. `zero_latency` skips the sleeps but reports the same numbers.
//! - The slot is released just before the last bytes of an answer are written, so a client's next
//!   turn finds it idle and its cache warm.
//! - Tokens come from a deterministic split of the text (see `sim/tokens.rs`); chats are rendered
//!   with a ChatML-like template, so re-sent history is a prefix of the next prompt. The generated
//!   text is deterministic pseudo-English seeded by the prompt.
//!
//! # Layout
//! - [`config`]: [`SimConfig`], [`Dialect`] and [`Faults`]: what a simulated server is.
//! - [`cli`]: [`SimArgs`], the `llama-sim` command line, which builds a [`SimConfig`].
//! - `server`: [`serve`], the accept loop, graceful or abrupt endings.
//! - `routes`: request routing and the small endpoints (health, models, props, slots, metrics,
//!   tokenize); for generation requests it applies arrival faults and starts the work.
//! - `request`: reads a generation request into a job, with each dialect's refusals.
//! - `slots`: the slot pool, FIFO queue and per-slot prompt caches.
//! - `generate`: one generation on a timer: slot, prompt evaluation, tokens, mid-stream faults.
//! - `wire`: the JSON and SSE shapes of each endpoint and dialect.
//! - `tokens`: the deterministic tokenizer, chat template and generated words.
//! - `metrics`, `error`, `body`, `state`: Prometheus text, error answers, response bodies, and
//!   the state shared by all connections.
//!
//! A generation request goes: `routes` (arrival faults, parse via `request`) → `generate` (wait
//! in `slots`, sleep, render with `wire`) → a channel → the response `body`.

pub mod cli;
pub mod config;

mod body;
mod error;
mod generate;
mod metrics;
mod request;
mod routes;
mod server;
mod slots;
mod state;
mod tokens;
mod wire;

pub use cli::SimArgs;
pub use config::{ConfigError, Dialect, Faults, SimConfig, DEFAULT_MODEL_PATH};
pub use server::{bind, serve, Exit, LISTEN_BACKLOG};
