//! Load testing tools for bitnet-gateway.
//!
//! # Layout
//! - [`sse`]: the SSE client-side parser both binaries share.
//! - [`sim`]: `llama-sim`, a llama-server simulator with BitNet-like CPU timing, per-slot prompt
//!   caching, two API dialects and fault injection.
//! - [`gen`]: `bitnet-loadtest`, the OpenAI-aware load generator: workloads, closed and open loops,
//!   HDR histograms, summaries, JSON and HTML reports, run comparison.

pub mod gen;
pub mod sim;
pub mod sse;
