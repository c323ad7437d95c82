//! One task per instance keeps its llama-server running.
//!
//! ```text
//!            spawn                      /health 200
//!   ┌──────▶ starting ─────────────────────────────▶ ready ──┐ liveness probes
//!   │           │ exit, start-up timeout               │  ▲──┘
//!   │           ▼                                      │ exit, liveness failures
//!   │       restarting ◀───────────────────────────────┘
//!   │  delay    │    (delay doubles in a crash loop; after max_failures: failed)
//!   └───────────┘
//!   ready ── restart requested ──▶ draining ── slots idle or timeout ──▶ SIGTERM … SIGKILL ──▶ starting
//!   any ──── SIGTERM/SIGINT ─────▶ draining ── slots idle or timeout ──▶ SIGTERM … SIGKILL ──▶ stopped
//!            (a second signal: SIGKILL at once)
//! ```
//!
//! Each instance runs in a process group of its own, started through the [`crate::launch`]
//! launcher so that it dies with the runner. Stopping signals the whole group.
//!
//! - [`backoff`]: the restart delays.
//! - [`liveness`]: when a failed probe counts.

pub mod backoff;
pub mod liveness;

use std::fmt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::Child;
use tokio::sync::mpsc;

use crate::command::llama_server_args;
use crate::config::Timing;
use crate::instance::{Command, Instance, State};
use crate::launch::Launcher;
use crate::logs::{InstanceLog, Tail};
use crate::metrics::{ExitReason, RunnerMetrics};
use crate::probe::{Health, Prober};
use crate::procfs;
use backoff::Backoff;
use liveness::{CpuMeter, Liveness, Verdict};

/// Pause between `/health` probes while an instance starts: cheap (a 503 or a refused
/// connection) and it decides how soon a loaded instance takes work.
const STARTUP_POLL: Duration = Duration::from_millis(100);
/// Pause between `/slots` checks while draining.
const DRAIN_POLL: Duration = Duration::from_millis(200);
/// Idle observations in a row that end a drain. One could fall in the instant between a
/// request's arrival and its slot starting.
const IDLE_CHECKS: u32 = 2;

/// What every supervisor shares.
#[derive(Debug)]
pub struct Shared {
    /// The llama-server binary, resolved.
    pub llama_server: PathBuf,
    /// Timing of probes, restarts and stops.
    pub timing: Timing,
    /// How processes are started.
    pub launcher: Launcher,
    /// HTTP client for probes.
    pub prober: Prober,
    /// Counters to bump.
    pub metrics: RunnerMetrics,
    /// Where an instance that cannot start at all reports it, so the runner can give up.
    pub start_failures: mpsc::UnboundedSender<StartFailure>,
}

/// An instance whose very first process exited with an error status before it was ready:
/// a bad model file, a bad argument or a taken port. Restarting would only repeat it.
#[derive(Debug, Clone)]
pub struct StartFailure {
    /// Instance name.
    pub instance: String,
    /// `exit N`.
    pub exit: String,
    /// The last lines the process wrote, which usually say why.
    pub log_tail: Vec<String>,
}

impl fmt::Display for StartFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "instance {} could not start: llama-server ended with {} before it was ready",
            self.instance, self.exit
        )?;
        if !self.log_tail.is_empty() {
            write!(f, "; its last output:")?;
            for line in &self.log_tail {
                write!(f, "\n    {line}")?;
            }
        }
        Ok(())
    }
}

/// How one process's run ended.
enum Ended {
    /// Stopped for good.
    Stopped,
    /// Stopped on request; start again at once.
    Restart,
    /// Ended unexpectedly.
    Failed(Failure),
}

struct Failure {
    reason: ExitReason,
    /// How long it had been ready, if it got there.
    ready_for: Option<Duration>,
    /// Set when the first process exited with a status code before it was ready: its last
    /// output.
    start_failure: Option<Vec<String>>,
}

/// What happened while waiting.
enum Event {
    Exited(std::io::Result<ExitStatus>),
    Command(Command),
    Tick,
}

/// The process of the current run.
struct Proc {
    child: Child,
    pid: u32,
    tail: Arc<Tail>,
}

/// Keeps one instance running until told to stop.
pub struct Supervisor {
    inst: Arc<Instance>,
    commands: mpsc::UnboundedReceiver<Command>,
    shared: Arc<Shared>,
    log: InstanceLog,
    backoff: Backoff,
    /// Set once a stop was asked for, to whether it may be graceful. Kept apart from the
    /// command that carried it because that command can arrive in the middle of a restart,
    /// which must then not start anything new.
    stop: Option<bool>,
}

// === impl Supervisor ===

impl Supervisor {
    /// A supervisor for `inst`, reading its commands from `commands`.
    pub fn new(
        inst: Arc<Instance>,
        commands: mpsc::UnboundedReceiver<Command>,
        shared: Arc<Shared>,
        log: InstanceLog,
    ) -> Supervisor {
        let backoff = Backoff::new(shared.timing.restart_delay, shared.timing.max_restart_delay);
        Supervisor {
            inst,
            commands,
            shared,
            log,
            backoff,
            stop: None,
        }
    }

    /// Runs until the instance is stopped.
    ///
    /// Must run on the thread that will outlive every process it starts (the runner's main
    /// thread): the parent-death signal fires when the spawning thread exits.
    pub async fn run(mut self) {
        let mut first = true;
        loop {
            let ended = self.run_process(first).await;
            first = false;
            if self.stop.is_some() {
                break;
            }
            let failure = match ended {
                Ended::Stopped => break,
                Ended::Restart => continue,
                Ended::Failed(f) => f,
            };
            if let Some(log_tail) = failure.start_failure {
                let report = StartFailure {
                    instance: self.name().to_owned(),
                    exit: self.inst.status().last_exit.unwrap_or_default(),
                    log_tail,
                };
                tracing::error!(instance = self.name(), exit = %report.exit, "llama-server exited before it was ready on its first start");
                self.set_state(State::Failed);
                let _ = self.shared.start_failures.send(report);
                // The runner stops everything; wait for it.
                if self.wait_failed().await {
                    continue;
                }
                break;
            }
            let stable = failure
                .ready_for
                .is_some_and(|d| d >= self.shared.timing.stable);
            let delay = self.backoff.failure(stable);
            let consecutive = self.backoff.consecutive();
            let next = self.backoff.next_delay();
            self.inst.update(|s| {
                s.consecutive_failures = consecutive;
                s.restart_delay = next;
            });
            if let Some(max) = self.shared.timing.max_failures {
                if consecutive >= max {
                    tracing::error!(instance = self.name(), failures = consecutive, "giving up after {consecutive} failures in a row; POST /instances/{}/restart to try again", self.name());
                    self.set_state(State::Failed);
                    if self.wait_failed().await {
                        continue;
                    }
                    break;
                }
            }
            if consecutive > 1 {
                tracing::warn!(
                    instance = self.name(),
                    failures = consecutive,
                    delay_secs = delay.as_secs_f64(),
                    reason = failure.reason.as_str(),
                    "crash loop: {consecutive} failures in a row; restarting in {delay:.1?}"
                );
            } else {
                tracing::warn!(
                    instance = self.name(),
                    delay_secs = delay.as_secs_f64(),
                    reason = failure.reason.as_str(),
                    "restarting in {delay:.1?}"
                );
            }
            self.set_state(State::Restarting);
            match self.next_event(None, delay).await {
                Event::Command(Command::Stop { .. }) => break,
                // Asked to restart while waiting: start now.
                Event::Command(Command::Restart) | Event::Tick | Event::Exited(_) => {}
            }
        }
        self.inst.update(|s| {
            s.state = State::Stopped;
            s.pid = None;
            s.spawned_at = None;
        });
        tracing::info!(instance = self.name(), "stopped");
    }

    /// Waits in `failed` for a restart request (true) or a stop (false).
    async fn wait_failed(&mut self) -> bool {
        match self.next_command().await {
            Command::Restart => {
                self.backoff.reset();
                let delay = self.backoff.next_delay();
                self.inst.update(|s| {
                    s.consecutive_failures = 0;
                    s.restart_delay = delay;
                });
                true
            }
            Command::Stop { .. } => false,
        }
    }

    /// Starts one process and watches it until it ends or is stopped.
    async fn run_process(&mut self, first: bool) -> Ended {
        let configured_port = self.inst.config().port;
        let generation = self.inst.update(|s| {
            s.generation += 1;
            s.state = State::Starting;
            s.pid = None;
            s.spawned_at = None;
            s.port = (configured_port != 0).then_some(configured_port);
            if !first {
                s.restarts += 1;
            }
            s.generation
        });
        if !first {
            self.shared.metrics.restarted(self.name());
        }

        let args = llama_server_args(self.inst.config());
        let mut cmd = self.shared.launcher.command(
            std::process::id(),
            self.inst.cpus(),
            &self.shared.llama_server,
            &args,
        );
        // A group of its own: a Ctrl-C at the runner's terminal must not reach the instances
        // before the runner drains them, and stopping reaches anything the server forked.
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Last resort if this task is dropped without stopping the process.
            .kill_on_drop(true);
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(err) => {
                tracing::error!(instance = self.name(), error = %err, "cannot spawn llama-server");
                self.inst
                    .update(|s| s.last_exit = Some(format!("spawn failed: {err}")));
                self.shared
                    .metrics
                    .exited(self.name(), ExitReason::SpawnFailed);
                return Ended::Failed(Failure {
                    reason: ExitReason::SpawnFailed,
                    ready_for: None,
                    start_failure: None,
                });
            }
        };
        let tail = self.log.attach(&mut child, &self.inst, generation);
        let Some(pid) = child.id() else {
            // Already reaped: it cannot have run at all.
            let status = child.wait().await;
            return self.exited(status, None, first, &tail).await;
        };
        let spawned = Instant::now();
        self.inst.update(|s| {
            s.pid = Some(pid);
            s.spawned_at = Some(spawned);
        });
        let cpus = self
            .inst
            .cpus()
            .map(crate::placement::format_cpu_list)
            .unwrap_or_else(|| "any".to_owned());
        tracing::info!(instance = self.name(), pid, cpus = %cpus, "started llama-server");
        let mut proc = Proc { child, pid, tail };

        if let Err(ended) = self.await_ready(&mut proc, spawned, first).await {
            return ended;
        }
        self.serve(&mut proc).await
    }

    /// Polls `/health` until 200. `Err` carries how the run ended instead.
    async fn await_ready(
        &mut self,
        proc: &mut Proc,
        spawned: Instant,
        first: bool,
    ) -> Result<(), Ended> {
        let timing = self.shared.timing.clone();
        let deadline = spawned + timing.startup_timeout;
        let mut stranger_warned = false;
        loop {
            if let Some((url, port)) = self.inst.url().zip(self.inst.port()) {
                let left = deadline.saturating_duration_since(Instant::now());
                let probe = timing
                    .health_timeout
                    .min(left)
                    .max(Duration::from_millis(1));
                if self.shared.prober.health(&url, probe).await == Health::Ok {
                    // Another process may have taken the port: then the answer is its, and
                    // this instance is about to fail to bind. Ready it is not. The runner
                    // itself is no stranger: nothing of its own listens on an instance's
                    // port (config refuses the control API there), and in-process tests
                    // serve an instance's port from inside it.
                    let own = std::process::id();
                    if procfs::port_held_by(port, proc.pid, own) != Some(false) {
                        tracing::info!(instance = self.name(), url = %url, secs = spawned.elapsed().as_secs_f64(), "ready");
                        return Ok(());
                    }
                    if !std::mem::replace(&mut stranger_warned, true) {
                        tracing::warn!(instance = self.name(), port, pid = proc.pid, "another process listens on this instance's port and answers its health check; not ready");
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline {
                tracing::error!(instance = self.name(), timeout = ?timing.startup_timeout, "not ready within the start-up timeout; stopping it");
                self.stop_process(proc).await;
                self.shared
                    .metrics
                    .exited(self.name(), ExitReason::StartupTimeout);
                return Err(Ended::Failed(Failure {
                    reason: ExitReason::StartupTimeout,
                    ready_for: None,
                    start_failure: None,
                }));
            }
            match self
                .next_event(Some(&mut proc.child), STARTUP_POLL.min(deadline - now))
                .await
            {
                Event::Exited(status) => {
                    let tail = proc.tail.clone();
                    return Err(self.exited(status, None, first, &tail).await);
                }
                // Not taking work yet, so nothing to drain.
                Event::Command(Command::Restart) => {
                    self.stop_process(proc).await;
                    self.shared
                        .metrics
                        .exited(self.name(), ExitReason::Requested);
                    return Err(Ended::Restart);
                }
                Event::Command(Command::Stop { .. }) => {
                    self.stop_process(proc).await;
                    return Err(Ended::Stopped);
                }
                Event::Tick => {}
            }
        }
    }

    /// Watches a ready instance until it ends or is stopped.
    async fn serve(&mut self, proc: &mut Proc) -> Ended {
        let timing = self.shared.timing.clone();
        let ready_at = Instant::now();
        self.set_state(State::Ready);
        let mut liveness = Liveness::new(timing.failure_threshold);
        let mut cpu = CpuMeter::default();
        cpu.sample(Instant::now(), procfs::cpu_time(proc.pid));
        let mut stable = false;
        let mut next_probe = ready_at + timing.health_interval;
        loop {
            if !stable && ready_at.elapsed() >= timing.stable {
                stable = true;
                if self.backoff.consecutive() > 0 {
                    tracing::info!(
                        instance = self.name(),
                        "running stably again; restart delay reset"
                    );
                }
                self.backoff.reset();
                let delay = self.backoff.next_delay();
                self.inst.update(|s| {
                    s.consecutive_failures = 0;
                    s.restart_delay = delay;
                });
            }
            // Wake for the next probe, or sooner for the moment the instance counts as stable:
            // its failure count and restart delay reset then, not up to a probe interval later.
            let wake = if stable {
                next_probe
            } else {
                next_probe.min(ready_at + timing.stable)
            };
            match self
                .next_event(
                    Some(&mut proc.child),
                    wake.saturating_duration_since(Instant::now()),
                )
                .await
            {
                Event::Exited(status) => {
                    let tail = proc.tail.clone();
                    return self
                        .exited(status, Some(ready_at.elapsed()), false, &tail)
                        .await;
                }
                Event::Command(Command::Restart) => {
                    return self.drain_and_stop(proc, Goal::Restart).await;
                }
                Event::Command(Command::Stop { graceful }) => {
                    return self.drain_and_stop(proc, Goal::Stop { graceful }).await;
                }
                Event::Tick => {}
            }
            if Instant::now() < next_probe {
                continue;
            }
            next_probe = Instant::now() + timing.health_interval;
            let Some(url) = self.inst.url() else { continue };
            let health = self.shared.prober.health(&url, timing.health_timeout).await;
            let cpu_busy = cpu.sample(Instant::now(), procfs::cpu_time(proc.pid));
            let activity = if health == Health::Ok {
                None
            } else {
                Some(
                    self.shared
                        .prober
                        .activity(&url, timing.health_timeout)
                        .await,
                )
            };
            // The interval runs from the end of a probe, however long the probe took.
            next_probe = Instant::now() + timing.health_interval;
            match liveness.observe(health, cpu_busy, activity) {
                Verdict::Healthy => {}
                Verdict::Busy => {
                    tracing::debug!(
                        instance = self.name(),
                        ?health,
                        "slow /health while busy; not counted"
                    )
                }
                Verdict::Failing(n) => {
                    tracing::warn!(
                        instance = self.name(),
                        ?health,
                        failures = n,
                        threshold = timing.failure_threshold,
                        "liveness probe failed"
                    )
                }
                Verdict::Restart => {
                    tracing::error!(
                        instance = self.name(),
                        ?health,
                        failures = timing.failure_threshold,
                        "liveness failed with no sign of work; restarting"
                    );
                    self.stop_process(proc).await;
                    self.shared
                        .metrics
                        .exited(self.name(), ExitReason::Liveness);
                    return Ended::Failed(Failure {
                        reason: ExitReason::Liveness,
                        ready_for: Some(ready_at.elapsed()),
                        start_failure: None,
                    });
                }
            }
        }
    }

    /// Marks the instance draining, waits (within limits) for its in-flight requests, then
    /// stops it.
    async fn drain_and_stop(&mut self, proc: &mut Proc, mut goal: Goal) -> Ended {
        self.set_state(State::Draining);
        let timing = self.shared.timing.clone();
        let limit = match goal {
            Goal::Restart => timing.drain_timeout,
            Goal::Stop { graceful: true } => timing.shutdown_drain,
            Goal::Stop { graceful: false } => Duration::ZERO,
        };
        tracing::info!(instance = self.name(), goal = %goal, limit = ?limit, "draining");
        let started = Instant::now();
        let mut deadline = started + limit;
        let grace_end = started + timing.drain_grace.min(limit);
        let url = self.inst.url();
        let mut idle_checks = 0;
        let mut unknown_warned = false;
        loop {
            let now = Instant::now();
            if now >= deadline {
                if goal == (Goal::Stop { graceful: false }) {
                    tracing::warn!(
                        instance = self.name(),
                        "stopping at once, in-flight requests or not"
                    );
                } else if limit > Duration::ZERO {
                    tracing::warn!(instance = self.name(), waited = ?now - started, "drain timeout: stopping with requests possibly in flight");
                }
                break;
            }
            // The grace lets a gateway polling GET /instances see "draining" and stop sending
            // before the slots are watched.
            if now >= grace_end {
                let activity = match &url {
                    Some(url) => Some(
                        self.shared
                            .prober
                            .activity(url, timing.health_timeout)
                            .await,
                    ),
                    None => None,
                };
                match activity.and_then(|a| a.is_idle()) {
                    Some(true) => idle_checks += 1,
                    Some(false) => idle_checks = 0,
                    None => {
                        // Neither /slots nor /metrics answered: nothing to go by but the clock.
                        if !unknown_warned {
                            tracing::warn!(
                                instance = self.name(),
                                "cannot see the instance's slots; waiting out the drain timeout"
                            );
                            unknown_warned = true;
                        }
                    }
                }
                if idle_checks >= IDLE_CHECKS {
                    tracing::info!(instance = self.name(), waited = ?started.elapsed(), "drained");
                    break;
                }
            }
            let wait = DRAIN_POLL.min(deadline.saturating_duration_since(Instant::now()));
            match self.next_event(Some(&mut proc.child), wait).await {
                Event::Exited(status) => {
                    // It went away on its own while draining; nothing left to stop.
                    self.record_exit(&status);
                    return self.finish_planned(goal);
                }
                Event::Command(Command::Stop { graceful }) => {
                    // Shutdown overrides a restart in progress; a second signal cuts the wait.
                    goal = Goal::Stop { graceful };
                    let cap = Instant::now()
                        + if graceful {
                            timing.shutdown_drain
                        } else {
                            Duration::ZERO
                        };
                    deadline = deadline.min(cap);
                }
                Event::Command(Command::Restart) | Event::Tick => {}
            }
        }
        self.stop_process(proc).await;
        self.finish_planned(goal)
    }

    fn finish_planned(&self, goal: Goal) -> Ended {
        match goal {
            Goal::Restart => {
                self.shared
                    .metrics
                    .exited(self.name(), ExitReason::Requested);
                Ended::Restart
            }
            Goal::Stop { .. } => Ended::Stopped,
        }
    }

    /// SIGTERM to the process group, then SIGKILL after the stop timeout (at once if a
    /// hurried stop was asked for, before or meanwhile); reaps the process.
    async fn stop_process(&mut self, proc: &mut Proc) {
        let timeout = self.shared.timing.stop_timeout;
        // The process is not reaped until `wait` returns below, so its pid, and with it the
        // group id, cannot have been reused: the signals cannot reach a stranger.
        let group = Pid::from_raw(proc.pid as i32);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut status = None;
        if self.stop != Some(false) {
            let _ = killpg(group, Signal::SIGTERM);
            while status.is_none() && self.stop != Some(false) {
                tokio::select! {
                    exited = proc.child.wait() => status = Some(exited),
                    () = tokio::time::sleep_until(deadline) => {
                        tracing::warn!(instance = self.name(), pid = proc.pid, "still running {timeout:?} after SIGTERM; sending SIGKILL");
                        break;
                    }
                    // Only a hurried stop changes anything here, through `self.stop`.
                    _ = self.next_command() => {}
                }
            }
        }
        let status = match status {
            Some(status) => status,
            None => {
                let _ = killpg(group, Signal::SIGKILL);
                proc.child.wait().await
            }
        };
        self.record_exit(&status);
        tracing::info!(instance = self.name(), pid = proc.pid, exit = %describe(&status), "process stopped");
    }

    /// Handles a process that ended on its own.
    async fn exited(
        &self,
        status: std::io::Result<ExitStatus>,
        ready_for: Option<Duration>,
        first: bool,
        tail: &Tail,
    ) -> Ended {
        self.record_exit(&status);
        let exit = describe(&status);
        self.shared.metrics.exited(self.name(), ExitReason::Crash);
        // Exit codes (not signals) before the first start was ready mean a bad model, a bad
        // argument or a taken port: restarting would only repeat it.
        let fatal =
            first && ready_for.is_none() && status.as_ref().is_ok_and(|s| s.code().is_some());
        if fatal {
            tail.wait_closed(Duration::from_millis(500)).await;
            return Ended::Failed(Failure {
                reason: ExitReason::Crash,
                ready_for,
                start_failure: Some(tail.lines()),
            });
        }
        match ready_for {
            Some(up) => {
                tracing::warn!(instance = self.name(), exit = %exit, ready_secs = up.as_secs_f64(), "llama-server exited unexpectedly")
            }
            None => {
                tracing::warn!(instance = self.name(), exit = %exit, "llama-server exited before it was ready")
            }
        }
        Ended::Failed(Failure {
            reason: ExitReason::Crash,
            ready_for,
            start_failure: None,
        })
    }

    fn record_exit(&self, status: &std::io::Result<ExitStatus>) {
        let exit = describe(status);
        // An OS-assigned port dies with its process; a configured one is where the next
        // process will be.
        let dynamic = self.inst.config().port == 0;
        self.inst.update(|s| {
            s.last_exit = Some(exit);
            s.pid = None;
            s.spawned_at = None;
            if dynamic {
                s.port = None;
            }
        });
    }

    /// Waits up to `wait` for the process to exit (if one runs) or a command to arrive.
    async fn next_event(&mut self, child: Option<&mut Child>, wait: Duration) -> Event {
        let exited = async {
            match child {
                Some(child) => child.wait().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            status = exited => Event::Exited(status),
            cmd = self.next_command() => Event::Command(cmd),
            () = tokio::time::sleep(wait) => Event::Tick,
        }
    }

    /// The next command, noting any stop in `self.stop` (a hurried one overrides a graceful
    /// one, never the reverse).
    async fn next_command(&mut self) -> Command {
        // The sender lives in the instance; if it is gone, nothing can ask for anything any
        // more, and stopping at once is the only sensible reading.
        let cmd = self
            .commands
            .recv()
            .await
            .unwrap_or(Command::Stop { graceful: false });
        if let Command::Stop { graceful } = cmd {
            self.stop = Some(graceful && self.stop != Some(false));
        }
        cmd
    }

    fn set_state(&self, state: State) {
        let prev = self.inst.update(|s| std::mem::replace(&mut s.state, state));
        if prev != state {
            tracing::info!(
                instance = self.name(),
                from = prev.as_str(),
                to = state.as_str(),
                "state changed"
            );
        }
    }

    fn name(&self) -> &str {
        self.inst.name()
    }
}

/// Why an instance is being drained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Goal {
    Restart,
    Stop { graceful: bool },
}

impl fmt::Display for Goal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Goal::Restart => "restart",
            Goal::Stop { .. } => "stop",
        })
    }
}

/// `exit N` or `signal N`, the form `last_exit` uses.
pub fn describe(status: &std::io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit {code}"),
            (None, Some(sig)) => format!("signal {sig}"),
            (None, None) => s.to_string(),
        },
        Err(err) => format!("unknown ({err})"),
    }
}
