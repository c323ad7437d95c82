//! One supervised instance as the rest of the runner sees it: its configuration, its current
//! status (written by its supervisor, read by the control API and metrics) and the channel
//! for asking its supervisor to restart or stop it.

use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::InstanceConfig;

/// Where an instance is in its life. Only `Ready` instances should be sent work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Spawned (or about to be), loading the model; `/health` not yet 200.
    Starting,
    /// `/health` answered 200; takes work.
    Ready,
    /// A planned restart or stop is under way: finishing in-flight requests, taking no more.
    Draining,
    /// The process ended unexpectedly; waiting out the restart delay.
    Restarting,
    /// Stopped for good because the runner is shutting down.
    Stopped,
    /// Given up after too many failures in a row, or could not start at all.
    Failed,
}

impl State {
    /// Every state, for one-hot metrics.
    pub const ALL: [State; 6] = [
        State::Starting,
        State::Ready,
        State::Draining,
        State::Restarting,
        State::Stopped,
        State::Failed,
    ];

    /// The lowercase name used in JSON, metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Ready => "ready",
            State::Draining => "draining",
            State::Restarting => "restarting",
            State::Stopped => "stopped",
            State::Failed => "failed",
        }
    }
}

/// What an instance's supervisor can be asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Drain, stop and start again (or start now, if waiting or failed).
    Restart,
    /// Stop for good.
    Stop {
        /// `true`: drain in-flight requests, SIGTERM, SIGKILL only after the stop timeout.
        /// `false` (a second signal, or a failed start): SIGKILL at once.
        graceful: bool,
    },
}

/// The supervisor's record of the instance, copied out for readers.
#[derive(Debug, Clone)]
pub struct Status {
    /// Current state.
    pub state: State,
    /// Counts processes started; log lines of an earlier process are told apart by it.
    pub generation: u64,
    /// Pid of the current process.
    pub pid: Option<u32>,
    /// Port of the current process, once known.
    pub port: Option<u16>,
    /// When the current process was spawned.
    pub spawned_at: Option<Instant>,
    /// Processes started after the first.
    pub restarts: u64,
    /// How the previous process ended: `exit N` or `signal N`.
    pub last_exit: Option<String>,
    /// Failures since the instance last ran stably.
    pub consecutive_failures: u32,
    /// Delay before the next restart after a failure.
    pub restart_delay: Duration,
}

/// An instance as the control API shows it. The field names and meanings are a contract with
/// the gateway, which follows `GET /instances`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceView {
    /// Instance name.
    pub name: String,
    /// Base URL of the current process; `null` until its port is known.
    pub url: Option<String>,
    /// Pid of the current process, if one is running.
    pub pid: Option<u32>,
    /// Current state.
    pub state: State,
    /// Processes started after the first.
    pub restarts: u64,
    /// Seconds since the current process was spawned; 0 when none runs.
    pub uptime_secs: f64,
    /// How the previous process ended (`"exit 1"`, `"signal 9"`), or `null`.
    pub last_exit: Option<String>,
}

/// Why a restart request was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RestartRefused {
    /// The runner is shutting down.
    #[error("the runner is shutting down")]
    ShuttingDown,
}

/// One supervised instance.
#[derive(Debug)]
pub struct Instance {
    config: InstanceConfig,
    cpus: Option<Vec<usize>>,
    status: Mutex<Status>,
    commands: mpsc::UnboundedSender<Command>,
}

// === impl Instance ===

impl Instance {
    /// A new instance in `starting` state, and the receiver its supervisor reads commands from.
    pub fn new(
        config: InstanceConfig,
        cpus: Option<Vec<usize>>,
        restart_delay: Duration,
    ) -> (Instance, mpsc::UnboundedReceiver<Command>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let status = Status {
            state: State::Starting,
            generation: 0,
            pid: None,
            port: None,
            spawned_at: None,
            restarts: 0,
            last_exit: None,
            consecutive_failures: 0,
            restart_delay,
        };
        let inst = Instance {
            config,
            cpus,
            status: Mutex::new(status),
            commands: tx,
        };
        (inst, rx)
    }

    /// The instance's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Its configuration.
    pub fn config(&self) -> &InstanceConfig {
        &self.config
    }

    /// The cores it is pinned to, if any.
    pub fn cpus(&self) -> Option<&[usize]> {
        self.cpus.as_deref()
    }

    /// A copy of the current status.
    pub fn status(&self) -> Status {
        self.lock().clone()
    }

    /// Changes the status under the lock. The closure must not block.
    pub fn update<R>(&self, f: impl FnOnce(&mut Status) -> R) -> R {
        f(&mut self.lock())
    }

    /// Records the port a process announced in its log, unless the process is no longer the
    /// current one or the port was configured.
    pub fn port_announced(&self, generation: u64, port: u16) {
        let mut s = self.lock();
        if s.generation == generation && s.port.is_none() {
            s.port = Some(port);
        }
    }

    /// The current process's port, once known.
    pub fn port(&self) -> Option<u16> {
        self.lock().port
    }

    /// The current process's base URL, once its port is known.
    pub fn url(&self) -> Option<String> {
        let port = self.lock().port?;
        Some(base_url(self.config.host, port))
    }

    /// The view served by `GET /instances`.
    pub fn view(&self) -> InstanceView {
        let s = self.status();
        InstanceView {
            name: self.config.name.clone(),
            url: s.port.map(|p| base_url(self.config.host, p)),
            pid: s.pid,
            state: s.state,
            restarts: s.restarts,
            uptime_secs: s
                .spawned_at
                .map_or(0.0, |t| (t.elapsed().as_secs_f64() * 10.0).round() / 10.0),
            last_exit: s.last_exit,
        }
    }

    /// Asks the supervisor for a drained restart.
    pub fn request_restart(&self) -> Result<(), RestartRefused> {
        self.commands
            .send(Command::Restart)
            .map_err(|_| RestartRefused::ShuttingDown)
    }

    /// Asks the supervisor to stop the instance for good.
    pub fn request_stop(&self, graceful: bool) {
        // An error means the supervisor already ended, which is what was asked.
        let _ = self.commands.send(Command::Stop { graceful });
    }

    fn lock(&self) -> MutexGuard<'_, Status> {
        // Every update leaves the status consistent, so a panic elsewhere cannot poison it.
        self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// `http://HOST:PORT`, where a wildcard bind address is reached through loopback.
pub fn base_url(host: IpAddr, port: u16) -> String {
    let host = match host {
        IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        other => other,
    };
    match host {
        IpAddr::V4(a) => format!("http://{a}:{port}"),
        IpAddr::V6(a) => format!("http://[{a}]:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn instance(port: u16) -> Instance {
        let config = InstanceConfig {
            name: "i0".into(),
            model: PathBuf::from("/m"),
            host: "127.0.0.1".parse().unwrap(),
            port,
            threads: 1,
            ctx: 512,
            parallel: None,
            extra_args: Vec::new(),
            cpus: None,
        };
        Instance::new(config, None, Duration::from_secs(5)).0
    }

    #[test]
    fn view_serializes_to_the_gateway_contract() {
        let inst = instance(0);
        inst.update(|s| {
            s.state = State::Ready;
            s.pid = Some(123);
            s.port = Some(8101);
            s.restarts = 2;
            s.last_exit = Some("signal 9".into());
        });
        let json = serde_json::to_value(inst.view()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "name": "i0", "url": "http://127.0.0.1:8101", "pid": 123, "state": "ready",
                "restarts": 2, "uptime_secs": 0.0, "last_exit": "signal 9"
            })
        );
    }

    #[test]
    fn announced_port_of_an_earlier_process_is_ignored() {
        let inst = instance(0);
        inst.update(|s| s.generation = 2);
        inst.port_announced(1, 4000);
        assert_eq!(inst.url(), None);
        inst.port_announced(2, 4001);
        assert_eq!(inst.url().as_deref(), Some("http://127.0.0.1:4001"));
        inst.port_announced(2, 4002);
        assert_eq!(inst.url().as_deref(), Some("http://127.0.0.1:4001"));
    }

    #[test]
    fn wildcard_hosts_are_reached_through_loopback() {
        assert_eq!(
            base_url("0.0.0.0".parse().unwrap(), 80),
            "http://127.0.0.1:80"
        );
        assert_eq!(base_url("::".parse().unwrap(), 80), "http://[::1]:80");
        assert_eq!(
            base_url("10.0.0.5".parse().unwrap(), 80),
            "http://10.0.0.5:80"
        );
    }

    #[test]
    fn restart_is_refused_once_the_supervisor_is_gone() {
        let config = instance(0).config.clone();
        let (inst, rx) = Instance::new(config, None, Duration::from_secs(1));
        assert_eq!(inst.request_restart(), Ok(()));
        drop(rx);
        assert_eq!(inst.request_restart(), Err(RestartRefused::ShuttingDown));
    }
}
