//! The runner as a whole: one supervisor per instance, the control API, and the shutdown
//! sequence.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus::process_collector::ProcessCollector;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::control;
use crate::instance::{Instance, InstanceView};
use crate::launch::Launcher;
use crate::logs::InstanceLog;
use crate::metrics::{encode, RunnerMetrics};
use crate::preflight::Plan;
use crate::probe::Prober;
use crate::supervisor::{Shared, StartFailure, Supervisor};

/// Why the runner stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// An instance could not start at all; everything was stopped.
    #[error("{0}")]
    Start(StartFailure),
    /// An instance's log file could not be opened.
    #[error("cannot open the log file of instance {instance}: {source}")]
    LogFile {
        /// Instance.
        instance: String,
        /// Why.
        source: std::io::Error,
    },
    /// Metrics could not be registered (a programming error).
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// What the control API reads.
#[derive(Debug)]
pub struct RunnerState {
    instances: Vec<Arc<Instance>>,
    registry: Registry,
    metrics: RunnerMetrics,
    stopping: AtomicBool,
}

impl RunnerState {
    /// Every instance's view, in configured order.
    pub fn views(&self) -> Vec<InstanceView> {
        self.instances.iter().map(|i| i.view()).collect()
    }

    /// The instance called `name`.
    pub fn instance(&self, name: &str) -> Option<&Arc<Instance>> {
        self.instances.iter().find(|i| i.name() == name)
    }

    /// Whether shutdown has begun.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Current metrics in Prometheus text format.
    pub fn render_metrics(&self) -> String {
        self.metrics.refresh(&self.instances);
        encode(&self.registry)
    }
}

/// A started runner.
#[derive(Debug)]
pub struct Runner {
    state: Arc<RunnerState>,
    supervisors: JoinSet<()>,
    start_failures: mpsc::UnboundedReceiver<StartFailure>,
    control: tokio::task::JoinHandle<()>,
}

impl Runner {
    /// Starts a supervisor for every instance of `config` (with the cores and binary from
    /// `plan`) and the control API on `control`.
    ///
    /// Must be called within a current-thread runtime on the thread that will outlive the
    /// instances: see [`Supervisor::run`].
    pub fn start(
        config: &Config,
        plan: Plan,
        launcher: Launcher,
        control: TcpListener,
    ) -> Result<Runner, RunError> {
        let registry = Registry::new();
        let names: Vec<&str> = config.instances.iter().map(|i| i.name.as_str()).collect();
        let metrics = RunnerMetrics::register(&registry, &names)?;
        // The runner's own CPU, memory and file descriptors.
        registry.register(Box::new(ProcessCollector::for_self()))?;

        let (failures_tx, start_failures) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            llama_server: plan.llama_server,
            timing: config.timing.clone(),
            launcher,
            prober: Prober::new(),
            metrics: metrics.clone(),
            start_failures: failures_tx,
        });

        let mut instances = Vec::new();
        let mut supervisors = Vec::new();
        for (inst_config, cpus) in config.instances.iter().zip(plan.cpus) {
            let log = InstanceLog::new(&inst_config.name, config.log_files.as_ref()).map_err(
                |source| RunError::LogFile {
                    instance: inst_config.name.clone(),
                    source,
                },
            )?;
            let (inst, commands) =
                Instance::new(inst_config.clone(), cpus, config.timing.restart_delay);
            let inst = Arc::new(inst);
            supervisors.push(Supervisor::new(inst.clone(), commands, shared.clone(), log));
            instances.push(inst);
        }
        let state = Arc::new(RunnerState {
            instances,
            registry,
            metrics,
            stopping: AtomicBool::new(false),
        });
        let mut set = JoinSet::new();
        for supervisor in supervisors {
            set.spawn(supervisor.run());
        }
        let control = tokio::spawn(control::serve(control, state.clone()));
        Ok(Runner {
            state,
            supervisors: set,
            start_failures,
            control,
        })
    }

    /// What the control API reads.
    pub fn state(&self) -> &Arc<RunnerState> {
        &self.state
    }

    /// Runs until the first message on `signals` (SIGTERM/SIGINT) or until an instance cannot
    /// start at all, then stops every instance: drain, SIGTERM, SIGKILL after the stop timeout.
    /// Another message on `signals` while stopping kills what is left at once.
    pub async fn run(mut self, mut signals: mpsc::Receiver<()>) -> Result<(), RunError> {
        let outcome = tokio::select! {
            _ = signals.recv() => Ok(()),
            Some(failure) = self.start_failures.recv() => Err(RunError::Start(failure)),
        };
        self.state.stopping.store(true, Ordering::Relaxed);
        // A failed start is a configuration problem: the others are not worth draining.
        let graceful = outcome.is_ok();
        tracing::info!(graceful, "stopping every instance");
        for inst in &self.state.instances {
            inst.request_stop(graceful);
        }
        let mut signals_open = true;
        loop {
            tokio::select! {
                joined = self.supervisors.join_next() => match joined {
                    None => break,
                    Some(Err(err)) => tracing::error!(error = %err, "an instance supervisor failed"),
                    Some(Ok(())) => {}
                },
                signal = signals.recv(), if signals_open => match signal {
                    Some(()) => {
                        tracing::warn!("second signal: killing every instance now");
                        for inst in &self.state.instances {
                            inst.request_stop(false);
                        }
                    }
                    None => signals_open = false,
                },
            }
        }
        self.control.abort();
        tracing::info!("all instances stopped");
        outcome
    }
}
