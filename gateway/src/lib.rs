//! bitnet-gateway: one OpenAI-compatible endpoint in front of several llama-server backends.
//!
//! # Layout
//!
//! A request's path, top to bottom, one file per step:
//!
//! 1. [`server`]: accept connections, deal them over the serving threads, tell HTTP/1.1 from
//!    HTTP/2, drain on shutdown. [`http1`] is the gateway's own HTTP/1.1 server side (over
//!    TCP or TLS); hyper serves HTTP/2. [`stall`] closes an HTTP/2 connection with nothing
//!    in progress for too long, and any connection that reads nothing for too long;
//!    [`gated`] keeps the idle timer and the drain signal from being polled on every
//!    wake-up of an HTTP/2 connection's task.
//! 2. [`routes`]: check the key, match method and path, read the body within its limit,
//!    [`inspect`] it for `model` and `stream` and read it as a [`job`] (prompt size, prefix
//!    chain, answer length, session, priority); answer `/health`, `/metrics`, `/v1/models`
//!    and `/admin/...` here.
//! 3. [`admit`]: claim a slot in the model's [`pool`], or wait in its queue (refused at once
//!    when the predicted wait exceeds the queue timeout); a waiting stream can be sent
//!    `: queued` comments ([`waiting`]).
//! 4. [`balance`]: the routing [`Policy`](balance::Policy) that picks a backend (and, for
//!    predicted-TTFT routing, the slot), one file per policy; [`ledger`] is each backend's
//!    book of slot caches, assigned work and measured rates.
//! 5. [`forward`]: send to the backend over a pooled keep-alive connection of the
//!    gateway's own HTTP/1.1 client, which has no task per connection (the relay body
//!    reads the backend's socket itself); fail over before the first byte.
//! 6. [`relay`]: pass the backend's body through untouched, holding the slot guard;
//!    account tokens and timings, and write the access log when it ends.
//! 7. Release: dropping the [`SlotGuard`](pool::SlotGuard) frees the slot and hands it to
//!    the oldest waiter, once.
//!
//! Around it:
//! - configuration: [`config`] and [`cli`] (TOML plus flags), [`reload`] (SIGHUP),
//!   [`summary`] (what `--check-config` prints);
//! - shared state: [`state`] (the [`Gateway`]), [`backend`] (per-backend
//!   atomics and health), [`health`] (probes and each backend's own load), [`discovery`]
//!   (backends from a bitnet-runner or DNS);
//! - the request's content: [`dialect`] (rewrites for the older BitNet server), [`context`]
//!   (the context-length guard), [`sse`] (token accounting from the relayed bytes);
//! - the edges: [`auth`] (API and admin keys, constant time), [`tls`] (rustls termination
//!   with reload, https backends), [`error`] (the one mapping from errors to HTTP), [`body`]
//!   (the response body type), [`metrics`] (Prometheus, one struct per component),
//!   [`logging`] (the access log's formatter and writer thread), [`fasthash`] (the hasher of
//!   the maps a request looks up); in tests, `fuzz` makes the parsers' random inputs.

pub mod admit;
pub mod auth;
pub mod backend;
pub mod balance;
pub mod body;
pub mod cli;
pub mod config;
pub mod context;
pub mod dialect;
pub mod discovery;
pub mod error;
pub mod fasthash;
pub mod forward;
#[cfg(test)]
mod fuzz;
pub mod gated;
pub mod health;
pub mod http1;
pub mod inspect;
pub mod job;
pub mod ledger;
pub mod logging;
pub mod metrics;
pub mod pool;
pub mod relay;
pub mod reload;
pub mod routes;
pub mod server;
pub mod sse;
pub mod stall;
pub mod state;
pub mod summary;
pub mod tls;
pub mod waiting;

pub use server::{serve, serve_threads};
pub use state::Gateway;
