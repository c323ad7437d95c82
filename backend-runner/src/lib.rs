//! bitnet-runner: keeps N llama-server instances alive, each on its own cores, and tells the
//! gateway which of them can take work.
//!
//! # Layout
//!
//! From the command line to a running instance:
//!
//! 1. [`cli`] and [`config`]: flags laid over the TOML file, validated into a [`Config`].
//! 2. [`preflight`]: binary, model files, [`placement`] of instances on cores, ports and log
//!    directory, all checked before anything starts.
//! 3. [`runner`]: one [`supervisor`] task per [`instance`], the [`control`] API, and the
//!    shutdown sequence.
//! 4. [`supervisor`]: spawns llama-server with the [`command`] line through the [`launch`]er
//!    (which ties the process's life to the runner's and pins it), forwards its output
//!    ([`logs`]), waits for readiness, probes liveness ([`probe`], [`procfs`]), drains and
//!    restarts it.
//! 5. [`metrics`]: what Prometheus scrapes from `GET /metrics`.
//!
//! `--check-config` stops after step 2 and prints the [`summary`] of what would run.

pub mod cli;
pub mod command;
pub mod config;
pub mod control;
pub mod instance;
pub mod launch;
pub mod logs;
pub mod metrics;
pub mod placement;
pub mod preflight;
pub mod probe;
pub mod procfs;
pub mod runner;
pub mod summary;
pub mod supervisor;

pub use config::Config;
pub use instance::{InstanceView, State};
pub use runner::{RunError, Runner};
