//! The state one simulated server shares between its connections.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::Instant;

use super::config::SimConfig;
use super::metrics::Metrics;
use super::slots::SlotPool;

/// A failure planned for the middle of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MidStream {
    /// Stop producing output and never finish.
    Hang,
    /// Report an error the way the dialect does, then end.
    Error,
    /// Take the whole server down.
    Crash,
}

/// One simulated llama-server.
pub(crate) struct Sim {
    pub(crate) cfg: SimConfig,
    pub(crate) pool: Arc<SlotPool>,
    pub(crate) metrics: Metrics,
    /// When loading ends.
    ready_at: Instant,
    /// Generation requests seen so far, to number them for faults.
    requests: AtomicU64,
    /// Slot tasks started so far, for `/slots`' `id_task`.
    tasks: AtomicU64,
    crashed: watch::Sender<bool>,
}

impl Sim {
    pub(crate) fn new(cfg: SimConfig) -> Sim {
        Sim {
            pool: Arc::new(SlotPool::new(
                cfg.slots,
                cfg.ctx,
                cfg.dialect.slot_similarity(),
            )),
            metrics: Metrics::default(),
            ready_at: Instant::now() + cfg.scaled(cfg.load_time),
            requests: AtomicU64::new(0),
            tasks: AtomicU64::new(0),
            crashed: watch::Sender::new(false),
            cfg,
        }
    }

    /// Whether the simulated model is still loading.
    pub(crate) fn loading(&self) -> bool {
        Instant::now() < self.ready_at
    }

    /// Numbers a newly arrived generation request, from 1.
    pub(crate) fn next_request(&self) -> u64 {
        self.requests.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub(crate) fn next_task(&self) -> u64 {
        self.tasks.fetch_add(1, Ordering::Relaxed)
    }

    /// Takes the server down: the accept loop drops every connection and stops.
    pub(crate) fn crash(&self) {
        self.crashed.send_replace(true);
    }

    /// Resolves once [`Sim::crash`] was called.
    pub(crate) async fn crashed(&self) {
        let mut rx = self.crashed.subscribe();
        // The sender lives as long as `self`, so waiting cannot fail.
        let _ = rx.wait_for(|c| *c).await;
    }

    /// The failure planned for the middle of generation request `seq`, if any: the one due
    /// after the fewest tokens.
    pub(crate) fn mid_stream_fault(&self, seq: u64) -> Option<(usize, MidStream)> {
        let f = &self.cfg.faults;
        let selected = f.selects(seq);
        let crash = f
            .crash_after_tokens
            .filter(|_| f.crash_after == Some(seq))
            .map(|k| (k, MidStream::Crash));
        let hang = f
            .hang_mid_stream_after
            .filter(|_| selected)
            .map(|k| (k, MidStream::Hang));
        let error = f
            .error_mid_stream_after
            .filter(|_| selected)
            .map(|k| (k, MidStream::Error));
        [crash, hang, error]
            .into_iter()
            .flatten()
            .min_by_key(|(k, _)| *k)
    }
}
