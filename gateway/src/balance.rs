//! Backend selection: a small synchronous trait, one file per policy.
//!
//! A policy sees the pool's backends while the pool's lock is held, so the in-flight
//! counts it reads cannot change under it. It must not do I/O or block: it returns the
//! index of the backend to claim a slot on, or `None` when no backend can take work now
//! (the request then waits in the queue).

use std::sync::Arc;

use serde::Deserialize;

use crate::backend::Backend;

mod least_loaded;
mod round_robin;

pub use least_loaded::LeastLoaded;
pub use round_robin::RoundRobin;

/// Chooses a backend for one request.
pub trait Policy: Send + Sync + std::fmt::Debug {
    /// The index into `backends` of a routable backend (see [`Backend::is_routable`]),
    /// or `None` if none can take the request now.
    fn pick(&self, backends: &[Arc<Backend>]) -> Option<usize>;
}

/// The policies, as named in config (`policy = "least-loaded"`) and on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// The backend with the most free slots; ties rotate.
    #[default]
    LeastLoaded,
    /// Each routable backend in turn, ignoring load. A baseline for benchmarks.
    RoundRobin,
}

impl PolicyKind {
    /// A fresh policy of this kind.
    pub fn build(self) -> Box<dyn Policy> {
        match self {
            PolicyKind::LeastLoaded => Box::new(LeastLoaded::default()),
            PolicyKind::RoundRobin => Box::new(RoundRobin::default()),
        }
    }

    /// The config name of this policy.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::LeastLoaded => "least-loaded",
            PolicyKind::RoundRobin => "round-robin",
        }
    }
}
