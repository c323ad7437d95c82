//! The live progress line on stderr.
//!
//! On a terminal it is one line rewritten in place every second; when stderr is a file or a pipe
//! (CI logs) it prints a plain line every ten seconds instead, so logs stay readable.

use std::io::{IsTerminal, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use super::driver::Live;

/// A running progress reporter; [`finish`](Self::finish) stops it and ends the line.
pub(crate) struct Progress {
    task: JoinHandle<()>,
    tty: bool,
}

impl Progress {
    /// Starts reporting `live` counters of a run that began at `start`.
    pub fn spawn(live: Arc<Live>, start: Instant, max_requests: Option<u64>) -> Self {
        let tty = std::io::stderr().is_terminal();
        let period = if tty {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(10)
        };
        let task = tokio::spawn(async move {
            let mut ticker = tokio::time::interval_at((start + period).into(), period);
            let mut previous = Snapshot::default();
            let mut previous_at = start;
            loop {
                let now = ticker.tick().await.into_std();
                let current = Snapshot::read(&live);
                let text = line(
                    now - start,
                    &current,
                    &previous,
                    now - previous_at,
                    max_requests,
                );
                let mut err = std::io::stderr().lock();
                // Progress is best effort: a closed stderr must not stop the run.
                let _ = if tty {
                    write!(err, "\r{text}\x1b[K")
                } else {
                    writeln!(err, "{text}")
                };
                let _ = err.flush();
                previous = current;
                previous_at = now;
            }
        });
        Self { task, tty }
    }

    /// Stops reporting and moves the cursor past the progress line.
    pub fn finish(self) {
        self.task.abort();
        if self.tty {
            let _ = writeln!(std::io::stderr());
        }
    }
}

/// Counter values at one moment.
#[derive(Debug, Default, Clone, Copy)]
struct Snapshot {
    started: u64,
    completed: u64,
    failed: u64,
    tokens: u64,
}

impl Snapshot {
    fn read(live: &Live) -> Self {
        Self {
            started: live.started.load(Ordering::Relaxed),
            completed: live.completed.load(Ordering::Relaxed),
            failed: live.failed.load(Ordering::Relaxed),
            tokens: live.tokens.load(Ordering::Relaxed),
        }
    }
}

/// The progress text; rates are over the last interval, not the whole run, so a stall shows.
fn line(
    elapsed: Duration,
    now: &Snapshot,
    before: &Snapshot,
    interval: Duration,
    max_requests: Option<u64>,
) -> String {
    let secs = interval.as_secs_f64().max(1e-3);
    let req_rate = (now.completed - before.completed) as f64 / secs;
    let tok_rate = (now.tokens - before.tokens) as f64 / secs;
    let in_flight = now.started.saturating_sub(now.completed + now.failed);
    let total = max_requests.map_or_else(String::new, |max| format!("/{max}"));
    format!(
        "[{:>6.1}s] sent {}{total}  ok {}  err {}  in-flight {}  |  {:.1} req/s  {:.0} tok/s",
        elapsed.as_secs_f64(),
        now.started,
        now.completed,
        now.failed,
        in_flight,
        req_rate,
        tok_rate,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_line_shows_interval_rates_and_in_flight_requests() {
        let before = Snapshot {
            started: 10,
            completed: 5,
            failed: 0,
            tokens: 100,
        };
        let now = Snapshot {
            started: 30,
            completed: 25,
            failed: 2,
            tokens: 500,
        };
        let text = line(
            Duration::from_secs(3),
            &now,
            &before,
            Duration::from_secs(2),
            Some(50),
        );
        assert_eq!(
            text,
            "[   3.0s] sent 30/50  ok 25  err 2  in-flight 3  |  10.0 req/s  200 tok/s"
        );
    }
}
