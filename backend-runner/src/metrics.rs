//! Prometheus metrics of the runner, registered on a [`Registry`] (no global macros) and
//! served at `GET /metrics`.
//!
//! Counters are bumped by the supervisors as things happen. Gauges that mirror live state
//! (up, state, uptime, RSS, crash-loop depth) are refreshed from the instances when Prometheus
//! scrapes, so they are never stale and cost nothing in between.

use std::sync::Arc;

use prometheus::core::Collector;
use prometheus::{Encoder, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::instance::{Instance, State};
use crate::procfs;

/// Why a process ended, as the `reason` label of `bitnet_runner_exits_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// It exited or was killed by a signal, unasked.
    Crash,
    /// It failed liveness and was stopped.
    Liveness,
    /// `/health` did not answer 200 within the start-up timeout.
    StartupTimeout,
    /// It could not be spawned at all.
    SpawnFailed,
    /// A restart was asked for through the control API.
    Requested,
}

impl ExitReason {
    const ALL: [ExitReason; 5] = [
        ExitReason::Crash,
        ExitReason::Liveness,
        ExitReason::StartupTimeout,
        ExitReason::SpawnFailed,
        ExitReason::Requested,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ExitReason::Crash => "crash",
            ExitReason::Liveness => "liveness",
            ExitReason::StartupTimeout => "startup_timeout",
            ExitReason::SpawnFailed => "spawn_failed",
            ExitReason::Requested => "requested",
        }
    }
}

/// The runner's metrics.
#[derive(Debug, Clone)]
pub struct RunnerMetrics {
    up: IntGaugeVec,
    state: IntGaugeVec,
    restarts: IntCounterVec,
    exits: IntCounterVec,
    uptime: GaugeVec,
    rss: IntGaugeVec,
    consecutive_failures: IntGaugeVec,
    restart_delay: GaugeVec,
}

impl RunnerMetrics {
    /// Creates the metrics on `registry`, with every series of `instances` present from the
    /// start (a counter that appears only after its first increment hides that increment
    /// from `rate()`).
    pub fn register(registry: &Registry, instances: &[&str]) -> prometheus::Result<RunnerMetrics> {
        let inst = &["instance"];
        let m = RunnerMetrics {
            up: registered(
                registry,
                IntGaugeVec::new(
                Opts::new(
                    "bitnet_runner_instance_up",
                    "1 if the instance is ready to take work, else 0.",
                ),
                inst,
            )?,
            )?,
            state: registered(
                registry,
                IntGaugeVec::new(
                Opts::new(
                    "bitnet_runner_instance_state",
                    "1 for the state the instance is in (starting, ready, draining, restarting, stopped, failed).",
                ),
                &["instance", "state"],
            )?,
            )?,
            restarts: registered(
                registry,
                IntCounterVec::new(
                Opts::new(
                    "bitnet_runner_restarts_total",
                    "Processes started for the instance after its first.",
                ),
                inst,
            )?,
            )?,
            exits: registered(
                registry,
                IntCounterVec::new(
                Opts::new(
                    "bitnet_runner_exits_total",
                    "Processes of the instance that ended, by reason (crash, liveness, startup_timeout, spawn_failed, requested).",
                ),
                &["instance", "reason"],
            )?,
            )?,
            uptime: registered(
                registry,
                GaugeVec::new(
                Opts::new(
                    "bitnet_runner_instance_uptime_seconds",
                    "Seconds since the instance's current process was started; 0 if none runs.",
                ),
                inst,
            )?,
            )?,
            rss: registered(
                registry,
                IntGaugeVec::new(
                Opts::new(
                    "bitnet_runner_instance_rss_bytes",
                    "Resident memory of the instance's process (VmRSS); 0 if none runs.",
                ),
                inst,
            )?,
            )?,
            consecutive_failures: registered(
                registry,
                IntGaugeVec::new(
                Opts::new(
                    "bitnet_runner_instance_consecutive_failures",
                    "Failures of the instance since it last ran stably; above 1 means a crash loop.",
                ),
                inst,
            )?,
            )?,
            restart_delay: registered(
                registry,
                GaugeVec::new(
                Opts::new(
                    "bitnet_runner_instance_restart_delay_seconds",
                    "Delay the instance's next restart after a failure will wait (doubles in a crash loop).",
                ),
                inst,
            )?,
            )?,
        };
        for name in instances {
            m.restarts.with_label_values(&[*name]);
            for reason in ExitReason::ALL {
                m.exits.with_label_values(&[*name, reason.as_str()]);
            }
        }
        Ok(m)
    }

    /// Counts a process started after the instance's first.
    pub fn restarted(&self, instance: &str) {
        self.restarts.with_label_values(&[instance]).inc();
    }

    /// Counts a process that ended for `reason`.
    pub fn exited(&self, instance: &str, reason: ExitReason) {
        self.exits
            .with_label_values(&[instance, reason.as_str()])
            .inc();
    }

    /// Refreshes the live-state gauges from `instances`.
    pub fn refresh(&self, instances: &[Arc<Instance>]) {
        for inst in instances {
            let name = inst.name();
            let s = inst.status();
            self.up
                .with_label_values(&[name])
                .set(i64::from(s.state == State::Ready));
            for state in State::ALL {
                self.state
                    .with_label_values(&[name, state.as_str()])
                    .set(i64::from(s.state == state));
            }
            self.uptime
                .with_label_values(&[name])
                .set(s.spawned_at.map_or(0.0, |t| t.elapsed().as_secs_f64()));
            let rss = s.pid.and_then(procfs::rss_bytes).unwrap_or(0);
            self.rss
                .with_label_values(&[name])
                .set(i64::try_from(rss).unwrap_or(i64::MAX));
            self.consecutive_failures
                .with_label_values(&[name])
                .set(i64::from(s.consecutive_failures));
            self.restart_delay
                .with_label_values(&[name])
                .set(s.restart_delay.as_secs_f64());
        }
    }
}

fn registered<C: Collector + Clone + 'static>(registry: &Registry, c: C) -> prometheus::Result<C> {
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

/// Encodes everything on `registry` in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut buf = Vec::new();
    // Encoding into a Vec only fails on metrics that violate the format, which the
    // constructors above already rule out.
    if let Err(err) = TextEncoder::new().encode(&registry.gather(), &mut buf) {
        tracing::error!(error = %err, "cannot encode metrics");
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::InstanceConfig;
    use std::time::Duration;

    fn instance(name: &str) -> Arc<Instance> {
        let config = InstanceConfig {
            name: name.into(),
            model: "/m".into(),
            host: "127.0.0.1".parse().unwrap(),
            port: 0,
            threads: 1,
            ctx: 512,
            parallel: None,
            extra_args: Vec::new(),
            cpus: None,
        };
        Arc::new(Instance::new(config, None, Duration::from_secs(5)).0)
    }

    #[test]
    fn every_series_exists_before_anything_happens() {
        let registry = Registry::new();
        let m = RunnerMetrics::register(&registry, &["i0", "i1"]).unwrap();
        m.refresh(&[instance("i0"), instance("i1")]);
        let text = encode(&registry);
        for series in [
            r#"bitnet_runner_instance_up{instance="i1"} 0"#,
            r#"bitnet_runner_restarts_total{instance="i0"} 0"#,
            r#"bitnet_runner_exits_total{instance="i0",reason="crash"} 0"#,
            r#"bitnet_runner_instance_uptime_seconds{instance="i0"} 0"#,
            r#"bitnet_runner_instance_rss_bytes{instance="i1"} 0"#,
            r#"bitnet_runner_instance_state{instance="i0",state="starting"} 1"#,
            r#"bitnet_runner_instance_restart_delay_seconds{instance="i0"} 5"#,
        ] {
            assert!(text.contains(series), "{series} missing from\n{text}");
        }
    }

    #[test]
    fn gauges_follow_the_instance_and_counters_count() {
        let registry = Registry::new();
        let m = RunnerMetrics::register(&registry, &["i0"]).unwrap();
        let inst = instance("i0");
        inst.update(|s| {
            s.state = State::Ready;
            // This test process stands in for llama-server: it certainly has resident memory.
            s.pid = Some(std::process::id());
            s.consecutive_failures = 3;
        });
        m.restarted("i0");
        m.exited("i0", ExitReason::Liveness);
        m.refresh(&[inst]);
        let text = encode(&registry);
        assert!(
            text.contains(r#"bitnet_runner_instance_up{instance="i0"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"bitnet_runner_restarts_total{instance="i0"} 1"#));
        assert!(text.contains(r#"bitnet_runner_exits_total{instance="i0",reason="liveness"} 1"#));
        assert!(text.contains(r#"bitnet_runner_instance_consecutive_failures{instance="i0"} 3"#));
        assert!(text.contains(r#"bitnet_runner_instance_state{instance="i0",state="ready"} 1"#));
        assert!(text.contains(r#"bitnet_runner_instance_state{instance="i0",state="starting"} 0"#));
        let rss_line = text
            .lines()
            .find(|l| l.starts_with("bitnet_runner_instance_rss_bytes{"))
            .unwrap();
        let rss: f64 = rss_line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(rss > 0.0, "{rss_line}");
    }
}
