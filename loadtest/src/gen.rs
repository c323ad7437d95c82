//! `bitnet-loadtest`: an OpenAI-aware load generator for chat completion servers.
//!
//! # Layout
//! - [`config`]: [`RunConfig`] and the checks that refuse unbounded runs and non-loopback targets.
//! - [`workload`]: workload kinds and mixes, and the sessions that turn them into requests
//!   (agent sessions re-send their growing history behind a shared system prompt).
//! - [`rng`]: the seeded PRNG that makes prompts and arrival times repeatable.
//! - `driver`: the closed and open loops, stop conditions and the measurement sink.
//! - `exchange`: one request on the wire: hyper client, SSE parsing, TTFT and inter-token gaps.
//! - [`record`]: per-request measurements and error kinds.
//! - [`stats`]: the [`Summary`] of a run, from HDR histograms.
//! - [`report`], [`html`], [`compare`]: the text table, the self-contained HTML page, and the
//!   side-by-side comparison of two result files.
//! - `progress`: the live line on stderr.
//!
//! A run goes: [`run`] validates the config and builds the client, the driver's loop starts
//! sessions, each turn is sent and measured by `exchange` and recorded, and when the loop ends
//! the records are summarised into a [`RunResult`].
//!
//! ```no_run
//! # async fn example() -> Result<(), loadtest::gen::RunError> {
//! use loadtest::gen::{run, RunConfig};
//!
//! let mut cfg = RunConfig::new("http://127.0.0.1:8090", "falcon3-10b");
//! cfg.max_requests = Some(100);
//! cfg.stream = true;
//! let result = run(cfg).await?;
//! println!("{}", result.table());
//! # Ok(())
//! # }
//! ```

pub mod compare;
pub mod config;
mod driver;
mod exchange;
pub mod html;
mod progress;
pub mod record;
pub mod report;
pub mod rng;
pub mod stats;
pub mod workload;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::HeaderValue;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use self::config::{ConfigError, Load, RunConfig};
pub use self::record::{ErrorKind, RequestRecord};
pub use self::stats::{LatencyStats, Summary};
pub use self::workload::{WorkloadKind, WorkloadSpec};

use self::driver::Driver;
pub use self::driver::MAX_TOKEN_TIMES;
use self::exchange::{build_client, Target};
use self::progress::Progress;

/// Identifies the layout of result files; bumped when it changes incompatibly.
pub const RESULTS_FORMAT: &str = "bitnet-loadtest/1";

/// Connecting never gets more than this, even under a longer request timeout: a loopback
/// connect that takes seconds means the target is not accepting.
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The API key cannot be sent in an HTTP header.
    #[error("the API key contains characters that cannot go in an HTTP header")]
    BadApiKey,
}

/// Everything a run produced: its parameters, summary and per-request records. This is the
/// layout of `--json` files.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    /// [`RESULTS_FORMAT`].
    pub format: String,
    /// How the run was configured.
    pub config: RunConfig,
    /// Wall-clock start, milliseconds since the Unix epoch.
    pub started_unix_ms: u64,
    /// The run's figures.
    pub summary: Summary,
    /// One record per request, ordered by send time.
    pub records: Vec<RequestRecord>,
    /// The run was interrupted (Ctrl-C) rather than ending by its bounds. Files written
    /// before this was recorded read as not interrupted.
    #[serde(default)]
    pub interrupted: bool,
}

impl RunResult {
    /// The run's figures.
    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    /// The human-readable summary table.
    pub fn table(&self) -> String {
        report::table(self)
    }

    /// The self-contained HTML report.
    pub fn html(&self) -> String {
        html::render(self)
    }

    /// Writes the results as JSON.
    pub fn write_json(&self, path: &Path) -> Result<(), ResultsError> {
        let json = serde_json::to_vec_pretty(self).map_err(|source| ResultsError::Json {
            path: path.to_owned(),
            source,
        })?;
        write_file(path, &json)
    }

    /// Writes the HTML report.
    pub fn write_html(&self, path: &Path) -> Result<(), ResultsError> {
        write_file(path, self.html().as_bytes())
    }

    /// Reads results written by [`write_json`](Self::write_json).
    pub fn read_json(path: &Path) -> Result<Self, ResultsError> {
        let bytes = std::fs::read(path).map_err(|source| ResultsError::Io {
            path: path.to_owned(),
            source,
        })?;
        let result: Self = serde_json::from_slice(&bytes).map_err(|source| ResultsError::Json {
            path: path.to_owned(),
            source,
        })?;
        if result.format != RESULTS_FORMAT {
            return Err(ResultsError::Format {
                path: path.to_owned(),
                found: result.format,
            });
        }
        Ok(result)
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ResultsError> {
    std::fs::write(path, bytes).map_err(|source| ResultsError::Io {
        path: path.to_owned(),
        source,
    })
}

/// A result file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ResultsError {
    /// The file system refused.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying failure.
        source: std::io::Error,
    },
    /// The file is not valid results JSON.
    #[error("{}: not a bitnet-loadtest result file: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The underlying failure.
        source: serde_json::Error,
    },
    /// The file was written by an incompatible version.
    #[error("{}: result format {found:?}, expected {RESULTS_FORMAT:?}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// The format it declares.
        found: String,
    },
}

/// Runs the load described by `cfg` and returns its measurements. Failed requests are results,
/// not errors; this fails only when the run cannot start.
pub async fn run(cfg: RunConfig) -> Result<RunResult, RunError> {
    run_until(cfg, std::future::pending()).await
}

/// Like [`run`], but ends the run early when `interrupt` resolves (a Ctrl-C, say): nothing new
/// starts, requests in flight are cancelled and recorded as such, and the results so far are
/// returned.
pub async fn run_until(
    cfg: RunConfig,
    interrupt: impl Future<Output = ()>,
) -> Result<RunResult, RunError> {
    let endpoint = cfg.validate()?;
    let auth = cfg
        .api_key
        .as_deref()
        .map(|key| HeaderValue::from_str(&format!("Bearer {key}")))
        .transpose()
        .map_err(|_| RunError::BadApiKey)?;
    let client = build_client(
        cfg.load.max_connections(),
        cfg.timeout.min(MAX_CONNECT_TIMEOUT),
    );
    let target = Target {
        uri: endpoint.chat_uri,
        auth,
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let started_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let start = Instant::now();
    let driver = Arc::new(Driver::new(cfg.clone(), client, target, start, stop_rx));
    let progress = cfg
        .progress
        .then(|| Progress::spawn(driver.live.clone(), start, cfg.max_requests));

    let work = driver.clone().run();
    tokio::pin!(work);
    let drain_end = async {
        match driver.deadline() {
            Some(deadline) => tokio::time::sleep_until((deadline + cfg.drain).into()).await,
            None => std::future::pending().await,
        }
    };
    let mut interrupted = false;
    let collected = tokio::select! {
        collected = &mut work => collected,
        () = drain_end => {
            // Requests still running now are cut; the loop then ends promptly.
            let _ = stop_tx.send(true);
            work.await
        }
        () = interrupt => {
            interrupted = true;
            let _ = stop_tx.send(true);
            work.await
        }
    };
    let mut wall = start.elapsed();
    // A run that went to its --duration lasted at least that long, even when its last
    // answer came before the end (an open loop's last arrival rarely falls on it).
    let budget_spent = cfg
        .max_requests
        .is_some_and(|m| collected.records.len() as u64 >= m);
    if let Some(deadline) = driver.deadline().filter(|_| !interrupted && !budget_spent) {
        wall = wall.max(deadline.saturating_duration_since(start));
    }
    let wall_secs = wall.as_secs_f64();
    if let Some(progress) = progress {
        progress.finish();
    }

    let summary = stats::Summary::compute(
        &collected.records,
        &collected.itl,
        wall_secs,
        collected.dropped_arrivals,
    );
    Ok(RunResult {
        format: RESULTS_FORMAT.to_owned(),
        config: cfg,
        started_unix_ms,
        summary,
        records: collected.records,
        interrupted,
    })
}
