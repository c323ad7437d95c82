//! Test support shared by every crate in the workspace.
//!
//! # Layout
//! - [`backlog`]: whether a listening socket's backlog holds a burst of connections.
//! - [`child`]: a guard that kills a spawned process (and its process group) when dropped, even on panic.
//! - [`gguf`]: writes a tiny, deterministic llama-architecture GGUF model that a real llama-server loads.
//! - [`llama_server`]: finds a real `llama-server` binary and starts it on an OS-assigned port.
//! - [`fake_backend`]: small scriptable HTTP backends for gateway logic tests.
//! - [`prometheus`]: runs a real Prometheus on an OS-assigned port, serves exposition text
//!   for it to scrape, and lints text with `promtool`.

pub mod backlog;
pub mod child;
pub mod fake_backend;
pub mod gguf;
pub mod llama_server;
pub mod prometheus;
