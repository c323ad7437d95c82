//! Backend selection: a small synchronous trait, one file per policy.
//!
//! A policy sees the pool's backends while the pool's lock is held, so the in-flight
//! counts it reads cannot change under it. It must not do I/O or block: it returns the
//! backend to claim a slot on, or `None` when no backend should take the request now
//! (the request then waits in the pool's queue).

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::backend::Backend;
use crate::job::Job;

mod least_loaded;
mod predicted_ttft;
mod round_robin;

pub use least_loaded::LeastLoaded;
pub use predicted_ttft::PredictedTtft;
pub use round_robin::RoundRobin;

/// Chooses a backend for one request.
pub trait Policy: Send + Sync + std::fmt::Debug {
    /// The backend (an index into `backends`) to send `job` to, or `None` if it should
    /// wait. Count-based policies only return routable backends (see
    /// [`Backend::is_routable`]); a policy that plans slots may return a full backend whose
    /// slot holds the job's prefix, when waiting for it beats starting cold elsewhere.
    fn pick(&self, backends: &[Arc<Backend>], job: &Job) -> Option<Pick>;

    /// Whether the policy reads a job's prompt (its prefix chain, size and answer length).
    /// Count-based policies do not, and the gateway then does not read the prompt at all:
    /// their jobs carry only a priority.
    fn reads_prompt(&self) -> bool {
        false
    }

    /// How long a request queued behind `ahead` (in the order they will be served) is
    /// predicted to wait before it starts; `None` when the policy does not predict.
    fn start_eta(
        &self,
        _backends: &[Arc<Backend>],
        _ahead: &[&Job],
        _job: &Job,
    ) -> Option<Duration> {
        None
    }

    /// Learn from a finished request that this policy routed to `backend` with `plan`.
    fn observe(&self, _backend: &Backend, _job: &Job, _plan: &Plan, _outcome: &Outcome) {}
}

/// A policy's choice.
#[derive(Debug, Clone, PartialEq)]
pub struct Pick {
    /// Index into the backends.
    pub index: usize,
    /// The slot plan, from policies that plan slots.
    pub plan: Option<Plan>,
}

impl Pick {
    /// A choice of backend only.
    pub fn backend(index: usize) -> Pick {
        Pick { index, plan: None }
    }
}

/// Which slot a request goes to and what that is predicted to cost.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Slot index on the backend.
    pub slot: usize,
    /// Predicted time to first token from now, in seconds.
    pub ttft_secs: f64,
    /// Of which waiting for the slot to free up.
    pub wait_secs: f64,
    /// Predicted time the request keeps its slot busy (prompt evaluation and generation).
    pub work_secs: f64,
    /// Prompt tokens predicted to come from the slot's cache.
    pub cached_tokens: f64,
    /// Whether this decision followed a backend's prompt cache or overrode it.
    pub affinity: Option<Affinity>,
}

/// An affinity decision: some backend held more of the prompt than the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Affinity {
    /// The request went to a backend holding the longest prefix.
    Taken,
    /// It went elsewhere: a colder, idler backend was predicted to answer sooner.
    Overridden,
}

impl Affinity {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Affinity::Taken => "taken",
            Affinity::Overridden => "overridden",
        }
    }
}

/// What a finished request measured, for policies that learn.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// Prompt tokens the backend counted (evaluated plus cached).
    pub prompt_tokens: Option<u64>,
    /// Prompt tokens it took from its cache.
    pub cached_tokens: Option<u64>,
    /// Prompt tokens it evaluated (`timings.prompt_n`).
    pub evaluated_tokens: Option<u64>,
    /// Prompt evaluation rate it reported (`timings.prompt_per_second`).
    pub prompt_per_second: Option<f64>,
    /// Generation rate it reported, or as measured between the first and last token.
    pub predicted_per_second: Option<f64>,
    /// Tokens generated.
    pub completion_tokens: u64,
    /// The response ended normally (a cut-off answer says nothing about answer lengths).
    pub complete: bool,
    /// From claiming the slot to the first token.
    pub ttft: Option<Duration>,
}

/// Defaults and limits for predicted-TTFT routing, until measurements replace them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoutingDefaults {
    /// Prompt evaluation, tokens per second per backend.
    pub prefill_rate: f64,
    /// Generation, tokens per second per request.
    pub decode_rate: f64,
    /// Bytes of request JSON per prompt token.
    pub bytes_per_token: f64,
    /// Answer length assumed for a request that sets no `max_tokens`, before any history.
    pub answer_tokens: u32,
    /// Most requests assigned to one slot at a time (the running one included).
    pub max_depth: usize,
}

impl Default for RoutingDefaults {
    fn default() -> Self {
        RoutingDefaults {
            prefill_rate: 60.0,
            decode_rate: 18.0,
            bytes_per_token: 4.0,
            answer_tokens: 256,
            max_depth: 4,
        }
    }
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
    /// The backend and slot with the lowest predicted time to first token: the queue on
    /// it plus the prompt it does not hold in cache, over its measured prefill rate.
    PredictedTtft,
}

impl PolicyKind {
    /// A fresh policy of this kind.
    pub fn build(self, defaults: RoutingDefaults) -> Box<dyn Policy> {
        match self {
            PolicyKind::LeastLoaded => Box::new(LeastLoaded::default()),
            PolicyKind::RoundRobin => Box::new(RoundRobin::default()),
            PolicyKind::PredictedTtft => Box::new(PredictedTtft::new(defaults)),
        }
    }

    /// The config name of this policy.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::LeastLoaded => "least-loaded",
            PolicyKind::RoundRobin => "round-robin",
            PolicyKind::PredictedTtft => "predicted-ttft",
        }
    }
}
