//! Configuration: a TOML file parsed into raw structs (`deny_unknown_fields`), command-line
//! flags laid over it, then validated into a typed [`Config`] whose errors name the key.
//!
//! ```toml
//! llama_server = "/opt/bitnet/build/bin/llama-server"
//! model = "/models/Falcon3-10B-Instruct-1.58bit/ggml-model-i2_s.gguf"
//! instances = 7
//! threads = 8
//! ctx = 4096
//! # parallel = 1                  # -np; not passed unless set
//! host = "127.0.0.1"
//! base_port = 8101               # instance i listens on base_port + i; 0 = OS-assigned
//! control = "127.0.0.1:8099"
//! pin = true
//! extra_args = ["--temp", "0.7"]
//!
//! [health]
//! startup_timeout_secs = 300
//! interval_secs = 5
//! timeout_secs = 5
//! failure_threshold = 3
//!
//! [restart]
//! delay_secs = 5                 # systemd's RestartSec; doubles during a crash loop
//! max_delay_secs = 60
//! stable_secs = 60               # this long ready resets the delay
//! max_failures = 0               # consecutive failures before giving up; 0 = never
//!
//! [stop]
//! drain_timeout_secs = 300       # planned restart: wait this long for in-flight requests
//! drain_grace_secs = 2           # let the gateway see "draining" before watching slots
//! shutdown_drain_secs = 10       # the same wait on SIGTERM/SIGINT
//! timeout_secs = 10              # SIGTERM, then SIGKILL after this long
//!
//! [logs]
//! dir = "/var/log/bitnet-runner" # also write each instance's output to DIR/NAME.log
//! max_bytes = 67108864
//! keep = 3
//!
//! [[instance]]                   # the first instance; later tables are the next ones
//! name = "big"
//! threads = 16
//! cpus = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
//! ```

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default control API address.
pub const DEFAULT_CONTROL: &str = "127.0.0.1:8099";
/// Default first instance port: the range the gateway's examples point at.
pub const DEFAULT_BASE_PORT: u16 = 8101;
/// Default llama-server `-t`: what the 1.58-bit Falcon3-10B is tuned for.
pub const DEFAULT_THREADS: u32 = 8;
/// Default llama-server `-c`.
pub const DEFAULT_CTX: u32 = 4096;

/// A configuration problem, naming the file or key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or has an unknown or mistyped key.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message, which names the key and line.
        source: Box<toml::de::Error>,
    },
    /// A value is missing, out of range or inconsistent with another.
    #[error("invalid config: {key}: {message}")]
    Invalid {
        /// The key, e.g. `instance[1].port`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

// === raw (as written) ===

/// The config file as written. Every field is optional so that flags can fill the gaps; the
/// command line is turned into one of these too and laid over the file with [`RawConfig::overlay`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// llama-server binary: a path, or a name looked up on `PATH`.
    pub llama_server: Option<PathBuf>,
    /// GGUF model for every instance.
    pub model: Option<PathBuf>,
    /// Number of instances.
    pub instances: Option<u32>,
    /// `-t` for every instance.
    pub threads: Option<u32>,
    /// `-c` for every instance.
    pub ctx: Option<u32>,
    /// `-np` for every instance.
    pub parallel: Option<u32>,
    /// `--host` for every instance.
    pub host: Option<String>,
    /// Port of the first instance; 0 lets each instance's OS pick one.
    pub base_port: Option<u16>,
    /// Control API address.
    pub control: Option<String>,
    /// Pin each instance to its own cores.
    pub pin: Option<bool>,
    /// Arguments appended to every llama-server command line.
    pub extra_args: Option<Vec<String>>,
    /// `[health]`
    #[serde(default)]
    pub health: RawHealth,
    /// `[restart]`
    #[serde(default)]
    pub restart: RawRestart,
    /// `[stop]`
    #[serde(default)]
    pub stop: RawStop,
    /// `[logs]`
    #[serde(default)]
    pub logs: RawLogs,
    /// `[[instance]]`: overrides for the first, second, ... instance.
    #[serde(default)]
    pub instance: Vec<RawInstance>,
}

/// `[health]`: readiness and liveness.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    /// How long an instance may take from spawn to `/health` 200.
    pub startup_timeout_secs: Option<f64>,
    /// Pause between liveness probes of a ready instance.
    pub interval_secs: Option<f64>,
    /// How long one probe may take.
    pub timeout_secs: Option<f64>,
    /// Consecutive failed probes of an idle instance before it is restarted.
    pub failure_threshold: Option<u32>,
}

/// `[restart]`: backoff after an instance exits or fails liveness.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRestart {
    /// First delay before a restart.
    pub delay_secs: Option<f64>,
    /// Ceiling the delay doubles up to during a crash loop.
    pub max_delay_secs: Option<f64>,
    /// Time ready after which the delay resets.
    pub stable_secs: Option<f64>,
    /// Consecutive failures after which the instance is left `failed`; 0 = never give up.
    pub max_failures: Option<u32>,
}

/// `[stop]`: draining and stopping.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStop {
    /// Longest wait for in-flight requests before a planned restart.
    pub drain_timeout_secs: Option<f64>,
    /// Pause after marking an instance draining, before watching its slots.
    pub drain_grace_secs: Option<f64>,
    /// Longest wait for in-flight requests on SIGTERM/SIGINT.
    pub shutdown_drain_secs: Option<f64>,
    /// Time between SIGTERM and SIGKILL.
    pub timeout_secs: Option<f64>,
}

/// `[logs]`: per-instance log files.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLogs {
    /// Directory for `NAME.log`; unset = runner log only.
    pub dir: Option<PathBuf>,
    /// Size at which a log file is rotated.
    pub max_bytes: Option<u64>,
    /// Rotated files kept (`NAME.log.1` .. `NAME.log.KEEP`).
    pub keep: Option<u32>,
}

/// `[[instance]]`: what differs for one instance.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInstance {
    /// Name in the control API, metrics and logs.
    pub name: Option<String>,
    /// Model file.
    pub model: Option<PathBuf>,
    /// `--host`.
    pub host: Option<String>,
    /// Port; 0 = OS-assigned.
    pub port: Option<u16>,
    /// `-t`, and with `pin`, the number of cores.
    pub threads: Option<u32>,
    /// `-c`.
    pub ctx: Option<u32>,
    /// `-np`.
    pub parallel: Option<u32>,
    /// Appended after the top-level `extra_args`.
    pub extra_args: Option<Vec<String>>,
    /// Exact cores to pin to (implies pinning this instance).
    pub cpus: Option<Vec<usize>>,
}

impl RawConfig {
    /// Reads and parses a TOML file.
    pub fn from_file(path: &Path) -> Result<RawConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            source: Box::new(e),
        })
    }

    /// Parses TOML text (for tests and `--check-config` style tooling).
    pub fn from_toml(text: &str) -> Result<RawConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<inline>".into(),
            source: Box::new(e),
        })
    }

    /// Lays `top` (usually the command line) over `self`: every value `top` sets wins.
    /// `[[instance]]` tables only come from the file, so they are kept.
    pub fn overlay(self, top: RawConfig) -> RawConfig {
        RawConfig {
            llama_server: top.llama_server.or(self.llama_server),
            model: top.model.or(self.model),
            instances: top.instances.or(self.instances),
            threads: top.threads.or(self.threads),
            ctx: top.ctx.or(self.ctx),
            parallel: top.parallel.or(self.parallel),
            host: top.host.or(self.host),
            base_port: top.base_port.or(self.base_port),
            control: top.control.or(self.control),
            pin: top.pin.or(self.pin),
            extra_args: top.extra_args.or(self.extra_args),
            health: RawHealth {
                startup_timeout_secs: top
                    .health
                    .startup_timeout_secs
                    .or(self.health.startup_timeout_secs),
                interval_secs: top.health.interval_secs.or(self.health.interval_secs),
                timeout_secs: top.health.timeout_secs.or(self.health.timeout_secs),
                failure_threshold: top
                    .health
                    .failure_threshold
                    .or(self.health.failure_threshold),
            },
            restart: RawRestart {
                delay_secs: top.restart.delay_secs.or(self.restart.delay_secs),
                max_delay_secs: top.restart.max_delay_secs.or(self.restart.max_delay_secs),
                stable_secs: top.restart.stable_secs.or(self.restart.stable_secs),
                max_failures: top.restart.max_failures.or(self.restart.max_failures),
            },
            stop: RawStop {
                drain_timeout_secs: top.stop.drain_timeout_secs.or(self.stop.drain_timeout_secs),
                drain_grace_secs: top.stop.drain_grace_secs.or(self.stop.drain_grace_secs),
                shutdown_drain_secs: top
                    .stop
                    .shutdown_drain_secs
                    .or(self.stop.shutdown_drain_secs),
                timeout_secs: top.stop.timeout_secs.or(self.stop.timeout_secs),
            },
            logs: RawLogs {
                dir: top.logs.dir.or(self.logs.dir),
                max_bytes: top.logs.max_bytes.or(self.logs.max_bytes),
                keep: top.logs.keep.or(self.logs.keep),
            },
            instance: if top.instance.is_empty() {
                self.instance
            } else {
                top.instance
            },
        }
    }
}

// === validated ===

/// A validated configuration: everything the runner needs, with defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// llama-server binary as configured (a path or a bare name for a `PATH` lookup).
    pub llama_server: PathBuf,
    /// Control API address.
    pub control: SocketAddr,
    /// Whether every instance gets its own cores.
    pub pin: bool,
    /// The instances, in order.
    pub instances: Vec<InstanceConfig>,
    /// Readiness, liveness, restart and stop timing.
    pub timing: Timing,
    /// Per-instance log files, if wanted.
    pub log_files: Option<LogFiles>,
}

/// One llama-server instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceConfig {
    /// Name in the control API, metrics and logs: `i0`, `i1`, ... unless configured.
    pub name: String,
    /// `-m`.
    pub model: PathBuf,
    /// `--host`.
    pub host: IpAddr,
    /// `--port`; 0 lets the OS choose, and the runner reads the port from the server's log.
    pub port: u16,
    /// `-t`.
    pub threads: u32,
    /// `-c`.
    pub ctx: u32,
    /// `-np`, passed only when set.
    pub parallel: Option<u32>,
    /// Appended to the command line.
    pub extra_args: Vec<String>,
    /// Exact cores, when configured.
    pub cpus: Option<Vec<usize>>,
}

/// Timing of readiness, liveness, restarts and stops.
#[derive(Debug, Clone, PartialEq)]
pub struct Timing {
    /// Spawn to `/health` 200, at most.
    pub startup_timeout: Duration,
    /// Between liveness probes.
    pub health_interval: Duration,
    /// One probe, at most.
    pub health_timeout: Duration,
    /// Consecutive failed probes of an instance that shows no sign of work before a restart.
    pub failure_threshold: u32,
    /// First restart delay.
    pub restart_delay: Duration,
    /// Crash-loop ceiling of the restart delay.
    pub max_restart_delay: Duration,
    /// Ready this long and the delay resets.
    pub stable: Duration,
    /// Consecutive failures before giving up, if ever.
    pub max_failures: Option<u32>,
    /// Planned restart: longest wait for in-flight requests.
    pub drain_timeout: Duration,
    /// Pause before watching slots, so the gateway stops sending first.
    pub drain_grace: Duration,
    /// SIGTERM/SIGINT: longest wait for in-flight requests.
    pub shutdown_drain: Duration,
    /// SIGTERM to SIGKILL.
    pub stop_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            startup_timeout: Duration::from_secs(300),
            health_interval: Duration::from_secs(5),
            health_timeout: Duration::from_secs(5),
            failure_threshold: 3,
            restart_delay: Duration::from_secs(5),
            max_restart_delay: Duration::from_secs(60),
            stable: Duration::from_secs(60),
            max_failures: None,
            drain_timeout: Duration::from_secs(300),
            drain_grace: Duration::from_secs(2),
            shutdown_drain: Duration::from_secs(10),
            stop_timeout: Duration::from_secs(10),
        }
    }
}

/// Where and how instance output is also written to files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFiles {
    /// Directory holding `NAME.log`.
    pub dir: PathBuf,
    /// Rotate when a file would grow past this.
    pub max_bytes: u64,
    /// Rotated files kept.
    pub keep: u32,
}

impl RawConfig {
    /// Validates into a [`Config`], filling in defaults. Only the configuration itself is
    /// checked here; whether files exist and ports are free is for [`crate::preflight`].
    pub fn validate(self) -> Result<Config, ConfigError> {
        let model = self.model;
        let count = match self.instances {
            Some(0) => return Err(invalid("instances", "must be at least 1")),
            Some(n) if (n as usize) < self.instance.len() => {
                return Err(invalid(
                    "instances",
                    format!(
                        "{n} is fewer than the {} [[instance]] tables",
                        self.instance.len()
                    ),
                ))
            }
            Some(n) => n as usize,
            None => self.instance.len().max(1),
        };
        let threads = positive("threads", self.threads, DEFAULT_THREADS)?;
        let ctx = positive("ctx", self.ctx, DEFAULT_CTX)?;
        let parallel = match self.parallel {
            Some(0) => return Err(invalid("parallel", "must be at least 1")),
            p => p,
        };
        let host = parse_host("host", self.host.as_deref().unwrap_or("127.0.0.1"))?;
        let base_port = self.base_port.unwrap_or(DEFAULT_BASE_PORT);
        let extra_args = self.extra_args.unwrap_or_default();
        let control_text = self.control.as_deref().unwrap_or(DEFAULT_CONTROL);
        let control: SocketAddr = control_text.parse().map_err(|_| {
            invalid(
                "control",
                format!("{control_text:?} is not an address like 127.0.0.1:8099"),
            )
        })?;

        let mut instances = Vec::with_capacity(count);
        for i in 0..count {
            let raw = self.instance.get(i).cloned().unwrap_or_default();
            let key = |field: &str| format!("instance[{i}].{field}");
            let name = match raw.name {
                Some(name) => {
                    check_name(&key("name"), &name)?;
                    name
                }
                None => format!("i{i}"),
            };
            let port = match raw.port {
                Some(port) => port,
                None if base_port == 0 => 0,
                None => u16::try_from(base_port as usize + i).map_err(|_| {
                    invalid(
                        "base_port",
                        format!("{base_port} + {i} (instance {name}) is past port 65535"),
                    )
                })?,
            };
            let model = raw.model.or_else(|| model.clone()).ok_or_else(|| {
                invalid(
                    "model",
                    "required: set `model` in the config file or pass --model",
                )
            })?;
            let host = match raw.host {
                Some(h) => parse_host(&key("host"), &h)?,
                None => host,
            };
            let cpus = match raw.cpus {
                Some(cpus) if cpus.is_empty() => {
                    return Err(invalid(key("cpus"), "must list at least one core"))
                }
                other => other,
            };
            let mut args = extra_args.clone();
            args.extend(raw.extra_args.unwrap_or_default());
            instances.push(InstanceConfig {
                name,
                model,
                host,
                port,
                threads: positive(&key("threads"), raw.threads, threads)?,
                ctx: positive(&key("ctx"), raw.ctx, ctx)?,
                parallel: match raw.parallel {
                    Some(0) => return Err(invalid(key("parallel"), "must be at least 1")),
                    Some(p) => Some(p),
                    None => parallel,
                },
                extra_args: args,
                cpus,
            });
        }
        check_unique(&instances, control)?;

        Ok(Config {
            llama_server: self
                .llama_server
                .unwrap_or_else(|| PathBuf::from("llama-server")),
            control,
            pin: self.pin.unwrap_or(false),
            instances,
            timing: timing(&self.health, &self.restart, &self.stop)?,
            log_files: match self.logs.dir {
                None => None,
                Some(dir) => Some(LogFiles {
                    dir,
                    max_bytes: match self.logs.max_bytes {
                        Some(b) if b < 1024 => {
                            return Err(invalid("logs.max_bytes", "must be at least 1024"))
                        }
                        Some(b) => b,
                        None => 64 * 1024 * 1024,
                    },
                    keep: match self.logs.keep {
                        Some(0) => return Err(invalid("logs.keep", "must be at least 1")),
                        Some(k) => k,
                        None => 3,
                    },
                }),
            },
        })
    }
}

fn timing(h: &RawHealth, r: &RawRestart, s: &RawStop) -> Result<Timing, ConfigError> {
    let d = Timing::default();
    let mut t = Timing {
        startup_timeout: secs(
            "health.startup_timeout_secs",
            h.startup_timeout_secs,
            d.startup_timeout,
            true,
        )?,
        health_interval: secs(
            "health.interval_secs",
            h.interval_secs,
            d.health_interval,
            true,
        )?,
        health_timeout: secs(
            "health.timeout_secs",
            h.timeout_secs,
            d.health_timeout,
            true,
        )?,
        failure_threshold: positive(
            "health.failure_threshold",
            h.failure_threshold,
            d.failure_threshold,
        )?,
        restart_delay: secs("restart.delay_secs", r.delay_secs, d.restart_delay, true)?,
        max_restart_delay: secs(
            "restart.max_delay_secs",
            r.max_delay_secs,
            d.max_restart_delay,
            true,
        )?,
        stable: secs("restart.stable_secs", r.stable_secs, d.stable, false)?,
        max_failures: r.max_failures.filter(|&n| n > 0),
        drain_timeout: secs(
            "stop.drain_timeout_secs",
            s.drain_timeout_secs,
            d.drain_timeout,
            false,
        )?,
        drain_grace: secs(
            "stop.drain_grace_secs",
            s.drain_grace_secs,
            d.drain_grace,
            false,
        )?,
        shutdown_drain: secs(
            "stop.shutdown_drain_secs",
            s.shutdown_drain_secs,
            d.shutdown_drain,
            false,
        )?,
        stop_timeout: secs("stop.timeout_secs", s.timeout_secs, d.stop_timeout, false)?,
    };
    // Unset, the ceiling rises to a longer first delay (`--restart-delay 120`, say) rather
    // than refuse it: only a ceiling someone wrote down can be in the way.
    if r.max_delay_secs.is_none() {
        t.max_restart_delay = t.max_restart_delay.max(t.restart_delay);
    }
    if t.max_restart_delay < t.restart_delay {
        return Err(invalid(
            "restart.max_delay_secs",
            format!(
                "{:?} is shorter than restart.delay_secs ({:?})",
                t.max_restart_delay, t.restart_delay
            ),
        ));
    }
    Ok(t)
}

fn secs(
    key: &str,
    value: Option<f64>,
    default: Duration,
    nonzero: bool,
) -> Result<Duration, ConfigError> {
    let Some(v) = value else {
        return Ok(default);
    };
    // A year is far past any sensible timeout and keeps Duration::from_secs_f64 from panicking.
    const YEAR: f64 = 365.0 * 86400.0;
    if !(0.0..=YEAR).contains(&v) || (nonzero && v == 0.0) {
        let want = if nonzero { "above 0" } else { "0 or more" };
        return Err(invalid(
            key,
            format!("{v} is not a number of seconds {want} and at most a year ({YEAR})"),
        ));
    }
    Ok(Duration::from_secs_f64(v))
}

fn positive(key: &str, value: Option<u32>, default: u32) -> Result<u32, ConfigError> {
    match value {
        Some(0) => Err(invalid(key, "must be at least 1")),
        Some(v) => Ok(v),
        None => Ok(default),
    }
}

fn parse_host(key: &str, text: &str) -> Result<IpAddr, ConfigError> {
    // An IP rather than a hostname: the runner must probe the address llama-server binds,
    // and check before start that the port is free there.
    text.parse()
        .map_err(|_| invalid(key, format!("{text:?} is not an IP address")))
}

fn check_name(key: &str, name: &str) -> Result<(), ConfigError> {
    // Names appear in URL paths (/instances/NAME/restart), metric labels and file names.
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("{name:?}: use 1-64 letters, digits, '-', '_' or '.', not starting with '.'"),
        ))
    }
}

/// Names and listening addresses must not collide: two listeners on one port fail at
/// start, and an instance on the control port would have the control API's `/health`
/// answer for it.
fn check_unique(instances: &[InstanceConfig], control: SocketAddr) -> Result<(), ConfigError> {
    let mut names = HashSet::new();
    let mut taken: Vec<(SocketAddr, &str)> = Vec::new();
    if control.port() != 0 {
        taken.push((control, "the control API"));
    }
    for (i, inst) in instances.iter().enumerate() {
        if !names.insert(inst.name.as_str()) {
            return Err(invalid(
                format!("instance[{i}].name"),
                format!("{:?} is used twice", inst.name),
            ));
        }
        if inst.port == 0 {
            continue;
        }
        let addr = SocketAddr::new(inst.host, inst.port);
        if let Some((other_addr, other)) = taken.iter().find(|(a, _)| overlap(*a, addr)) {
            return Err(invalid(
                format!("instance[{i}].port"),
                format!(
                    "{} on {addr} and {other} on {other_addr} would listen on the same port",
                    inst.name
                ),
            ));
        }
        taken.push((addr, &inst.name));
    }
    Ok(())
}

/// Whether two listeners would clash: the same port on the same address, or on any address
/// of a family when either is that family's wildcard (`::` takes IPv4 too, by default).
fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() != b.port() {
        return false;
    }
    let dual_stack = |ip: IpAddr| matches!(ip, IpAddr::V6(v6) if v6.is_unspecified());
    let (x, y) = (a.ip(), b.ip());
    x == y
        || dual_stack(x)
        || dual_stack(y)
        || (x.is_ipv4() == y.is_ipv4() && (x.is_unspecified() || y.is_unspecified()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        RawConfig::from_toml(text)?.validate()
    }

    #[test]
    fn defaults_give_one_instance_on_8101_with_eight_threads() {
        let c = parse(r#"model = "/m.gguf""#).unwrap();
        assert_eq!(c.instances.len(), 1);
        let i = &c.instances[0];
        assert_eq!(i.name, "i0");
        assert_eq!(i.port, DEFAULT_BASE_PORT);
        assert_eq!((i.threads, i.ctx, i.parallel), (8, 4096, None));
        assert_eq!(i.host, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(c.control, DEFAULT_CONTROL.parse().unwrap());
        assert_eq!(c.timing, Timing::default());
        assert!(!c.pin);
        assert_eq!(c.llama_server, PathBuf::from("llama-server"));
    }

    #[test]
    fn instances_get_consecutive_ports_from_base_port() {
        let c = parse("model = \"/m\"\ninstances = 3\nbase_port = 9000").unwrap();
        let ports: Vec<u16> = c.instances.iter().map(|i| i.port).collect();
        assert_eq!(ports, [9000, 9001, 9002]);
        let names: Vec<&str> = c.instances.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["i0", "i1", "i2"]);
    }

    #[test]
    fn base_port_zero_leaves_every_port_to_the_os() {
        let c = parse("model = \"/m\"\ninstances = 2\nbase_port = 0").unwrap();
        assert!(c.instances.iter().all(|i| i.port == 0));
    }

    #[test]
    fn instance_tables_override_the_instance_they_stand_for() {
        let c = parse(
            r#"
            model = "/m"
            instances = 3
            threads = 4
            extra_args = ["--temp", "0.7"]
            [[instance]]
            name = "big"
            threads = 16
            ctx = 8192
            extra_args = ["-n", "512"]
            [[instance]]
            port = 7000
            model = "/other"
            "#,
        )
        .unwrap();
        let [big, second, third] = &c.instances[..] else {
            panic!("three instances expected")
        };
        assert_eq!((big.name.as_str(), big.threads, big.ctx), ("big", 16, 8192));
        assert_eq!(big.extra_args, ["--temp", "0.7", "-n", "512"]);
        assert_eq!((second.name.as_str(), second.port), ("i1", 7000));
        assert_eq!(second.model, PathBuf::from("/other"));
        assert_eq!(second.threads, 4);
        assert_eq!((third.name.as_str(), third.port), ("i2", 8103));
        assert_eq!(third.extra_args, ["--temp", "0.7"]);
    }

    #[test]
    fn instance_tables_alone_set_the_count() {
        let c = parse("model = \"/m\"\n[[instance]]\n[[instance]]\n").unwrap();
        assert_eq!(c.instances.len(), 2);
    }

    #[test]
    fn unknown_key_is_rejected_by_name() {
        let err = parse("model = \"/m\"\nmodle = \"/x\"").unwrap_err();
        assert!(err.to_string().contains("modle"), "{err}");
        let err = parse("model = \"/m\"\n[restart]\ndelay = 1").unwrap_err();
        assert!(err.to_string().contains("delay"), "{err}");
        let err = parse("model = \"/m\"\n[[instance]]\nthread = 1").unwrap_err();
        assert!(err.to_string().contains("thread"), "{err}");
    }

    #[test]
    fn missing_model_names_the_key_and_the_flag() {
        let err = parse("instances = 2").unwrap_err().to_string();
        assert!(err.contains("model") && err.contains("--model"), "{err}");
    }

    #[test]
    fn fewer_instances_than_tables_is_an_error() {
        let err = parse("model = \"/m\"\ninstances = 1\n[[instance]]\n[[instance]]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("instances"), "{err}");
    }

    #[test]
    fn duplicate_names_and_ports_are_rejected() {
        let err = parse("model = \"/m\"\n[[instance]]\nname = \"a\"\n[[instance]]\nname = \"a\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("instance[1].name"), "{err}");
        let err = parse("model = \"/m\"\ninstances = 2\n[[instance]]\nport = 8102")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("instance[1].port") && err.contains("8102"),
            "{err}"
        );
        // A wildcard listener clashes with any address of its family.
        let err = parse(
            "model = \"/m\"\n[[instance]]\nhost = \"0.0.0.0\"\nport = 8200\n\
             [[instance]]\nport = 8200",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("instance[1].port"), "{err}");
        // Different addresses of one family, or an IPv4 wildcard beside IPv6 loopback, do not.
        for pair in [("127.0.0.1", "127.0.0.2"), ("0.0.0.0", "::1")] {
            let text = format!(
                "model = \"/m\"\n[[instance]]\nhost = {:?}\nport = 8200\n\
                 [[instance]]\nhost = {:?}\nport = 8200",
                pair.0, pair.1
            );
            assert!(parse(&text).is_ok(), "{pair:?}");
        }
    }

    #[test]
    fn a_first_restart_delay_past_the_default_ceiling_raises_it() {
        let c = parse("model = \"/m\"\n[restart]\ndelay_secs = 120").unwrap();
        assert_eq!(c.timing.restart_delay, Duration::from_secs(120));
        assert_eq!(c.timing.max_restart_delay, Duration::from_secs(120));
        let c = parse("model = \"/m\"\n[restart]\ndelay_secs = 2").unwrap();
        assert_eq!(c.timing.max_restart_delay, Duration::from_secs(60));
    }

    #[test]
    fn an_instance_on_the_control_port_is_rejected() {
        // Its health check would be answered by the control API.
        let err = parse("model = \"/m\"\ncontrol = \"127.0.0.1:8101\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("instance[0].port") && err.contains("control API"),
            "{err}"
        );
        let err = parse("model = \"/m\"\ncontrol = \"0.0.0.0:8102\"\ninstances = 2")
            .unwrap_err()
            .to_string();
        assert!(err.contains("instance[1].port"), "{err}");
        assert!(parse("model = \"/m\"\ncontrol = \"127.0.0.1:0\"\nbase_port = 0").is_ok());
    }

    #[test]
    fn names_that_cannot_be_url_segments_are_rejected() {
        for bad in ["", "a/b", "a b", ".hidden"] {
            let text = format!("model = \"/m\"\n[[instance]]\nname = {bad:?}");
            assert!(parse(&text).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn bad_numbers_name_their_key() {
        for (text, key) in [
            ("threads = 0", "threads"),
            ("instances = 0", "instances"),
            ("[health]\ninterval_secs = -1", "health.interval_secs"),
            ("[health]\ntimeout_secs = 0", "health.timeout_secs"),
            (
                "[restart]\ndelay_secs = 10\nmax_delay_secs = 5",
                "restart.max_delay_secs",
            ),
            ("[health]\nstartup_timeout_secs = 1e8", "at most a year"),
            ("host = \"localhost\"", "host"),
            ("control = \"8099\"", "control"),
            ("base_port = 65535\ninstances = 2", "base_port"),
            ("[logs]\ndir = \"/tmp\"\nkeep = 0", "logs.keep"),
        ] {
            let err = parse(&format!("model = \"/m\"\n{text}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{text:?}: {err}");
        }
    }

    #[test]
    fn flags_override_the_file_but_keep_its_instance_tables() {
        let file = RawConfig::from_toml(
            "model = \"/file\"\nthreads = 4\ninstances = 2\n[[instance]]\nname = \"a\"",
        )
        .unwrap();
        let flags = RawConfig {
            model: Some("/flag".into()),
            instances: Some(3),
            ..RawConfig::default()
        };
        let c = file.overlay(flags).validate().unwrap();
        assert_eq!(c.instances.len(), 3);
        assert_eq!(c.instances[0].name, "a");
        assert!(c.instances.iter().all(|i| i.model == Path::new("/flag")));
        assert!(c.instances.iter().all(|i| i.threads == 4));
    }

    #[test]
    fn fractional_seconds_are_accepted_for_fast_tests() {
        let c = parse("model = \"/m\"\n[restart]\ndelay_secs = 0.2\n[stop]\ndrain_grace_secs = 0")
            .unwrap();
        assert_eq!(c.timing.restart_delay, Duration::from_millis(200));
        assert_eq!(c.timing.drain_grace, Duration::ZERO);
    }
}
