//! Restart delays: start at the configured delay, double during a crash loop up to a ceiling,
//! and start over once the instance has run stably.

use std::time::Duration;

/// Restart delay state of one instance.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
    consecutive: u32,
}

impl Backoff {
    /// A backoff whose first delay is `initial` and which never waits longer than `max`.
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            next: initial,
            consecutive: 0,
        }
    }

    /// Records a failure and returns how long to wait before the next start. A failure after
    /// a stable run is the first of a new series, not the next step of a crash loop.
    pub fn failure(&mut self, after_stable_run: bool) -> Duration {
        if after_stable_run {
            self.reset();
        }
        self.consecutive += 1;
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// Forgets past failures: the instance has run stably, or was restarted by hand.
    pub fn reset(&mut self) {
        self.next = self.initial;
        self.consecutive = 0;
    }

    /// Failures since the last reset.
    pub fn consecutive(&self) -> u32 {
        self.consecutive
    }

    /// The delay the next failure will get.
    pub fn next_delay(&self) -> Duration {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn delay_doubles_during_a_crash_loop_up_to_the_ceiling() {
        let mut b = Backoff::new(secs(5), secs(60));
        let delays: Vec<Duration> = (0..6).map(|_| b.failure(false)).collect();
        assert_eq!(
            delays,
            [secs(5), secs(10), secs(20), secs(40), secs(60), secs(60)]
        );
        assert_eq!(b.consecutive(), 6);
    }

    #[test]
    fn a_stable_run_starts_the_delays_over() {
        let mut b = Backoff::new(secs(5), secs(60));
        b.failure(false);
        b.failure(false);
        assert_eq!(b.next_delay(), secs(20));
        assert_eq!(b.failure(true), secs(5));
        assert_eq!(b.consecutive(), 1);
        b.reset();
        assert_eq!((b.consecutive(), b.next_delay()), (0, secs(5)));
    }
}
