//! Liveness of a ready instance: when a failed `/health` probe counts against it.
//!
//! On a CPU box, a llama-server deep in a long prompt evaluation can answer `/health` late or
//! not at all (the older server handles some endpoints on the same loop that evaluates). A
//! slow probe alone is therefore no reason to restart. A failed probe counts only when the
//! instance shows no sign of work: its process used almost no CPU since the last probe, and
//! neither `/slots` nor `/metrics` shows a request in progress. Only a run of such failures,
//! `threshold` long, gets it restarted.

use std::time::{Duration, Instant};

use crate::probe::{Activity, Health};

/// Share of one core a process must have used between probes to count as working. An idle
/// llama-server uses next to nothing; one evaluating uses several cores.
const BUSY_CPU_SHARE: f64 = 0.1;

/// What to make of one probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// `/health` answered 200.
    Healthy,
    /// `/health` failed, but the instance is visibly working.
    Busy,
    /// `/health` failed with no sign of work: this many times in a row, below the threshold.
    Failing(u32),
    /// The threshold was reached: restart it.
    Restart,
}

/// Consecutive-failure count of one instance's liveness probes.
#[derive(Debug, Clone)]
pub struct Liveness {
    threshold: u32,
    failures: u32,
}

impl Liveness {
    /// Restart after `threshold` failures in a row (at least 1).
    pub fn new(threshold: u32) -> Liveness {
        Liveness {
            threshold: threshold.max(1),
            failures: 0,
        }
    }

    /// Judges one probe. `cpu_busy` is the [`CpuMeter`]'s reading since the previous probe;
    /// `activity` is what `/slots` and `/metrics` said, asked only when `/health` failed.
    pub fn observe(
        &mut self,
        health: Health,
        cpu_busy: bool,
        activity: Option<Activity>,
    ) -> Verdict {
        if health == Health::Ok {
            self.failures = 0;
            return Verdict::Healthy;
        }
        if cpu_busy || activity.is_some_and(|a| a.is_busy()) {
            // Evidence of life: a stall before this one and a stall after it are not a run.
            self.failures = 0;
            return Verdict::Busy;
        }
        self.failures += 1;
        if self.failures >= self.threshold {
            Verdict::Restart
        } else {
            Verdict::Failing(self.failures)
        }
    }
}

/// Tracks a process's CPU time between samples.
#[derive(Debug, Clone, Default)]
pub struct CpuMeter {
    last: Option<(Instant, Duration)>,
}

impl CpuMeter {
    /// Records `cpu` (total CPU time used, if readable) at `now`, and says whether the process
    /// used at least a tenth of a core since the previous sample.
    pub fn sample(&mut self, now: Instant, cpu: Option<Duration>) -> bool {
        let Some(cpu) = cpu else {
            self.last = None;
            return false;
        };
        let busy = self.last.is_some_and(|(then, used)| {
            let wall = now.saturating_duration_since(then).as_secs_f64();
            wall > 0.0 && cpu.saturating_sub(used).as_secs_f64() >= wall * BUSY_CPU_SHARE
        });
        self.last = Some((now, cpu));
        busy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Option<Activity> = Some(Activity {
        busy_slots: Some(0),
        requests: Some(0),
    });
    const WORKING: Option<Activity> = Some(Activity {
        busy_slots: Some(1),
        requests: None,
    });

    #[test]
    fn idle_instance_is_restarted_after_threshold_failures() {
        let mut l = Liveness::new(3);
        assert_eq!(l.observe(Health::Timeout, false, IDLE), Verdict::Failing(1));
        assert_eq!(
            l.observe(Health::Unreachable, false, None),
            Verdict::Failing(2)
        );
        assert_eq!(
            l.observe(Health::Status(500), false, IDLE),
            Verdict::Restart
        );
    }

    #[test]
    fn busy_instance_with_slow_health_is_not_restarted() {
        let mut l = Liveness::new(2);
        for _ in 0..10 {
            assert_eq!(l.observe(Health::Timeout, true, None), Verdict::Busy);
            assert_eq!(l.observe(Health::Timeout, false, WORKING), Verdict::Busy);
        }
    }

    #[test]
    fn a_healthy_or_busy_probe_breaks_a_run_of_failures() {
        let mut l = Liveness::new(2);
        assert_eq!(l.observe(Health::Timeout, false, IDLE), Verdict::Failing(1));
        assert_eq!(l.observe(Health::Ok, false, None), Verdict::Healthy);
        assert_eq!(l.observe(Health::Timeout, false, IDLE), Verdict::Failing(1));
        assert_eq!(l.observe(Health::Timeout, true, IDLE), Verdict::Busy);
        assert_eq!(l.observe(Health::Timeout, false, IDLE), Verdict::Failing(1));
        assert_eq!(l.observe(Health::Timeout, false, IDLE), Verdict::Restart);
    }

    #[test]
    fn cpu_meter_sees_work_only_above_a_tenth_of_a_core() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        let mut m = CpuMeter::default();
        assert!(!m.sample(t0, Some(s(10))), "no previous sample");
        assert!(!m.sample(t0 + s(5), Some(s(10) + ms(100))), "2% of a core");
        assert!(m.sample(t0 + s(10), Some(s(50))), "eight cores");
        assert!(!m.sample(t0 + s(15), None), "unreadable");
        assert!(
            !m.sample(t0 + s(20), Some(s(90))),
            "no baseline after a gap"
        );
    }
}
