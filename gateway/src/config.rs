//! Configuration: TOML parsed into raw structs (`deny_unknown_fields`), command-line flags
//! applied on top, then validated into typed [`Config`] with errors that name the key.
//!
//! ```toml
//! listen = "127.0.0.1:8090"
//! default_model = "falcon3-10b"   # optional: where unknown or missing `model`s go
//! policy = "least-loaded"          # or "predicted-ttft", "round-robin"
//!
//! [queue]
//! timeout_secs = 180
//! per_slot = 32                    # queue cap = per_slot × total slots, unless `max` is set
//! priority_header = "x-priority"   # optional: trust a per-request priority (-10..=10)
//! key_priority = { batch = -2 }    # optional: priority by API key name
//! priority_aging_secs = 30         # a wait this long is worth one priority level
//! sse_comments_secs = 5            # optional: ": queued position=.. eta=.." to waiting streams
//!
//! [routing]                        # predicted-ttft: starting points until measured
//! prefill_rate = 60                # prompt tokens/s per backend
//! decode_rate = 18                 # generated tokens/s per request
//!
//! [[models]]
//! id = "falcon3-10b"
//! aliases = ["bitnet"]
//! backends = [
//!   { url = "http://127.0.0.1:8101" },             # slots discovered from /props
//!   { url = "http://127.0.0.1:8102", slots = 2 },
//! ]
//! ```

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
use serde::Deserialize;

use crate::auth::{KeySet, PublicEndpoints, RawApiKey};
use crate::balance::{PolicyKind, RoutingDefaults};
use crate::dialect::{DialectSetting, ToolsMode};

/// Default listen address: the port OpenClaw configurations already point at.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8090";

/// A configuration problem, naming the key or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid config: {key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

// === raw (as written) ===

/// The config file as written. Every field is optional so that flags can fill gaps.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: Option<String>,
    pub default_model: Option<String>,
    pub policy: Option<PolicyKind>,
    pub max_body_bytes: Option<usize>,
    pub drain_timeout_secs: Option<f64>,
    pub workers: Option<usize>,
    #[serde(default)]
    pub queue: RawQueue,
    #[serde(default)]
    pub routing: RawRouting,
    #[serde(default)]
    pub health: RawHealth,
    #[serde(default)]
    pub upstream: RawUpstream,
    #[serde(default)]
    pub discovery: RawDiscovery,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub compat: RawCompat,
    /// Client keys (`[[api_keys]] name = "…", key = "…"` or `key_env = "VAR"`).
    #[serde(default)]
    pub api_keys: Vec<RawApiKey>,
    /// Files of client keys, one per line (`name:key` or just `key`).
    #[serde(default)]
    pub api_key_files: Vec<PathBuf>,
    /// Keys for the admin endpoints.
    #[serde(default)]
    pub admin_keys: Vec<RawApiKey>,
    /// Whether `/health` and `/metrics` need no key: "loopback" (default), "always", "never".
    pub public_health_metrics: Option<PublicEndpoints>,
    /// PEM certificate chain; with `tls_key`, the gateway serves HTTPS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    #[serde(default)]
    pub models: Vec<RawModel>,
    /// Keys given with `--api-key` (never in the file).
    #[serde(skip)]
    pub cli_api_keys: Vec<String>,
    /// Keys given with `--admin-key`.
    #[serde(skip)]
    pub cli_admin_keys: Vec<String>,
}

/// `[compat]`: how the gateway bridges clients and older backends.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCompat {
    pub tools: Option<ToolsMode>,
    pub context_guard: Option<bool>,
}

/// `[queue]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQueue {
    pub max: Option<usize>,
    pub per_slot: Option<usize>,
    pub timeout_secs: Option<f64>,
    pub priority_header: Option<String>,
    #[serde(default)]
    pub key_priority: HashMap<String, i32>,
    pub priority_aging_secs: Option<f64>,
    pub sse_comments_secs: Option<f64>,
}

/// `[routing]`: predicted-TTFT routing's starting points.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouting {
    pub prefill_rate: Option<f64>,
    pub decode_rate: Option<f64>,
    pub bytes_per_token: Option<f64>,
    pub answer_tokens: Option<u32>,
    pub max_depth: Option<usize>,
}

/// `[health]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub interval_secs: Option<f64>,
    pub timeout_secs: Option<f64>,
    pub failure_threshold: Option<u32>,
    pub load_interval_secs: Option<f64>,
    pub remote_load: Option<bool>,
}

/// `[limits]`: what one client may use.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_connections: Option<usize>,
    pub max_header_bytes: Option<usize>,
    pub header_read_timeout_secs: Option<f64>,
    pub body_read_timeout_secs: Option<f64>,
    pub send_timeout_secs: Option<f64>,
    pub max_buffered_body_bytes: Option<usize>,
}

/// `[discovery]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDiscovery {
    pub interval_secs: Option<f64>,
}

/// `[upstream]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub connect_timeout_secs: Option<f64>,
    pub max_attempts: Option<u32>,
    pub first_byte_timeout_secs: Option<f64>,
    pub idle_timeout_secs: Option<f64>,
    /// CA bundle for `https://` backends, instead of the system roots.
    pub ca_file: Option<PathBuf>,
}

/// `[[models]]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub id: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub backends: Vec<RawBackend>,
    /// A bitnet-runner control API whose ready instances serve this model.
    pub runner: Option<String>,
    /// `HOST:PORT` whose addresses (re-resolved periodically) serve this model.
    pub dns: Option<String>,
}

/// One backend of a model.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub url: String,
    pub name: Option<String>,
    pub slots: Option<u32>,
    pub dialect: Option<DialectSetting>,
}

impl RawConfig {
    /// Read and parse a TOML file.
    pub fn from_file(path: &Path) -> Result<RawConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                source,
            },
            other => other,
        })
    }

    /// Parse TOML text.
    pub fn from_toml(text: &str) -> Result<RawConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<inline>".into(),
            source: Box::new(e),
        })
    }
}

impl RawBackend {
    /// Parse the command-line form `URL[#slots=N][&name=NAME][&dialect=D]`.
    pub fn from_flag(s: &str) -> Result<RawBackend, String> {
        let (url, frag) = match s.split_once('#') {
            Some((u, f)) => (u, Some(f)),
            None => (s, None),
        };
        let mut b = RawBackend {
            url: url.to_string(),
            ..RawBackend::default()
        };
        if let Some(frag) = frag {
            for kv in frag.split('&').filter(|kv| !kv.is_empty()) {
                match kv.split_once('=') {
                    Some(("slots", n)) => {
                        b.slots = Some(n.parse().map_err(|_| {
                            format!("'{n}' in '{s}' is not a slot count (expected URL#slots=N; join options with '&')")
                        })?)
                    }
                    Some(("name", n)) => b.name = Some(n.to_string()),
                    Some(("dialect", d)) => b.dialect = Some(d.parse()?),
                    _ => {
                        return Err(format!(
                            "unknown backend option '{kv}' in '{s}' (expected URL#slots=N&name=NAME&dialect=auto|llama.cpp|bitnet, each optional)"
                        ))
                    }
                }
            }
        }
        Ok(b)
    }
}

/// Check `[routing]` and fill in its defaults.
fn routing_defaults(r: &RawRouting) -> Result<RoutingDefaults, ConfigError> {
    let d = RoutingDefaults::default();
    let rate = |key: &str, v: Option<f64>, default: f64| match v {
        None => Ok(default),
        Some(x) if x.is_finite() && x > 0.0 && x <= 1e6 => Ok(x),
        Some(x) => Err(invalid(key, format!("{x} is not a rate in (0, 1e6]"))),
    };
    Ok(RoutingDefaults {
        prefill_rate: rate("routing.prefill_rate", r.prefill_rate, d.prefill_rate)?,
        decode_rate: rate("routing.decode_rate", r.decode_rate, d.decode_rate)?,
        bytes_per_token: match r.bytes_per_token {
            None => d.bytes_per_token,
            Some(x) if (0.5..=16.0).contains(&x) => x,
            Some(x) => {
                return Err(invalid(
                    "routing.bytes_per_token",
                    format!("{x} is not within 0.5..=16"),
                ))
            }
        },
        answer_tokens: match r.answer_tokens {
            None => d.answer_tokens,
            Some(0) => return Err(invalid("routing.answer_tokens", "must be at least 1")),
            Some(n) => n,
        },
        max_depth: match r.max_depth {
            None => d.max_depth,
            Some(0) => return Err(invalid("routing.max_depth", "must be at least 1")),
            Some(n) => n,
        },
    })
}

// === validated ===

/// Serving threads unless configured. One relays well over ten thousand requests a
/// second, hundreds of times what a CPU fleet generates. Each thread keeps its connections
/// to itself, so more threads cost a request no cross-thread wake-ups; but on a machine
/// whose other cores are busy (the backends' work) a second one cost 6-11 % more CPU and
/// added more to p99 than it saved, except in synchronized token bursts (BENCHMARKS.md).
pub const DEFAULT_WORKERS: usize = 1;
/// More threads than this is a typo.
pub const MAX_WORKERS: usize = 256;

/// Default of `limits.max_buffered_body_bytes`: 1 GiB, a hundred 10 MiB bodies or ten
/// thousand long agent conversations.
pub const DEFAULT_BUFFERED_BODY_BYTES: usize = 1 << 30;

/// Largest `limits.max_buffered_body_bytes`: what the budget's semaphore can count.
pub const MAX_BUFFERED_BODY_BYTES: usize = tokio::sync::Semaphore::MAX_PERMITS;

/// The configuration in force.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Where requests naming an unknown model, or none, go.
    pub default_model: Option<String>,
    /// Backend selection policy.
    pub policy: PolicyKind,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// How long in-flight responses may run after SIGTERM.
    pub drain_timeout: Duration,
    /// Threads that serve connections.
    pub workers: usize,
    /// Fixed queue cap per model, or `None` for `queue_per_slot` × slots.
    pub queue_max: Option<usize>,
    /// Queue cap per slot when `queue_max` is unset.
    pub queue_per_slot: usize,
    /// Longest wait for a slot.
    pub queue_timeout: Duration,
    /// How long a wait is worth one priority level.
    pub queue_aging: Duration,
    /// The request header that carries a priority, when clients are trusted to set one.
    pub priority_header: Option<http::HeaderName>,
    /// Priority by API key name.
    pub key_priority: HashMap<String, i32>,
    /// Interval of `: queued` comments to streams waiting in the queue; `None`: none sent.
    pub queue_comments: Option<Duration>,
    /// Predicted-TTFT routing's starting points.
    pub routing: RoutingDefaults,
    /// Health probe period.
    pub health_interval: Duration,
    /// Health probe timeout.
    pub health_timeout: Duration,
    /// Consecutive failed probes (timeouts, bad statuses) before a backend is marked down.
    pub health_failure_threshold: u32,
    /// Read each backend's own reported load (`/metrics` or `/slots`), so that several
    /// gateways in front of the same backends see each other's work.
    pub remote_load: bool,
    /// How often that load is read.
    pub load_interval: Duration,
    /// How often runner and DNS discovery refresh the backend sets.
    pub discovery_interval: Duration,
    /// Time to connect to a backend, TLS handshake included.
    pub connect_timeout: Duration,
    /// Attempts per request, counting the first (failover happens only before the first byte).
    pub max_attempts: u32,
    /// Longest wait for a backend's response head (and, for the older BitNet server's
    /// streams, its first event). Generous: CPU prompt evaluation can take minutes.
    pub first_byte_timeout: Duration,
    /// Longest silence from a backend between two chunks of a response.
    pub upstream_idle_timeout: Duration,
    /// Most client connections open at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Largest request head (request line and headers) in bytes.
    pub max_header_bytes: usize,
    /// Time a client has to send a request's headers, counted from the connection's start
    /// or from the end of the previous response: it is both the slowloris guard and the
    /// keep-alive idle timeout, on HTTP/2 too.
    pub header_read_timeout: Duration,
    /// Time a client has to send a request's body, from the end of its headers.
    pub body_read_timeout: Duration,
    /// Longest a write to a client may stay blocked (a client that reads nothing) before
    /// its connection is closed, which ends its requests and frees their slots.
    pub send_timeout: Duration,
    /// Request bytes all requests together may hold in memory: bodies being read, waiting
    /// in a queue, or kept for a failover until their backend answers.
    pub max_buffered_body_bytes: usize,
    /// Client keys; empty means the gateway is open.
    pub keys: KeySet,
    /// Admin keys; empty means the admin endpoints are off.
    pub admin_keys: KeySet,
    /// Whether `/health` and `/metrics` need a key.
    pub public_health_metrics: PublicEndpoints,
    /// HTTPS certificate and key files.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// CA bundle for `https://` backends.
    pub upstream_ca_file: Option<PathBuf>,
    /// What to do with `tools` for backends without tool calling.
    pub tools: ToolsMode,
    /// Refuse prompts that cannot fit a backend's context, before they reach it.
    pub context_guard: bool,
    /// The models and their backends.
    pub models: Vec<ModelConfig>,
}

/// A model and the backends that serve it.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub id: String,
    pub aliases: Vec<String>,
    /// Backends listed in the config.
    pub backends: Vec<BackendConfig>,
    /// A runner whose ready instances are added to the backends.
    pub runner: Option<Uri>,
    /// `HOST:PORT` resolved periodically; each address is a backend.
    pub dns: Option<String>,
}

/// A validated backend.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    pub name: String,
    pub url: Uri,
    pub slots: Option<u32>,
    pub dialect: DialectSetting,
}

fn secs(key: &str, v: Option<f64>, default: f64) -> Result<Duration, ConfigError> {
    let v = v.unwrap_or(default);
    if !(v.is_finite() && v > 0.0 && v < 1e9) {
        return Err(invalid(
            key,
            format!("{v} is not a positive number of seconds"),
        ));
    }
    Ok(Duration::from_secs_f64(v))
}

impl RawConfig {
    /// Validate into a [`Config`], applying defaults.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let listen_s = self.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen: SocketAddr = listen_s.parse().map_err(|_| {
            invalid(
                "listen",
                format!("'{listen_s}' is not an address like 127.0.0.1:8090"),
            )
        })?;
        if self.models.is_empty() {
            return Err(invalid(
                "models",
                "no model is configured: add a [[models]] table or pass --backend URL",
            ));
        }
        let mut names = HashSet::new();
        let mut backend_names = HashSet::new();
        let mut models = Vec::with_capacity(self.models.len());
        for (mi, m) in self.models.into_iter().enumerate() {
            let key = format!("models[{mi}]");
            if m.id.trim().is_empty() {
                return Err(invalid(format!("{key}.id"), "must not be empty"));
            }
            for name in std::iter::once(&m.id).chain(m.aliases.iter()) {
                if !names.insert(name.clone()) {
                    return Err(invalid(
                        key.clone(),
                        format!(
                            "the name '{name}' is used twice (ids and aliases share one namespace)"
                        ),
                    ));
                }
            }
            if m.backends.is_empty() && m.runner.is_none() && m.dns.is_none() {
                return Err(invalid(
                    format!("{key}.backends"),
                    format!(
                        "model '{}' has no backends (list `backends`, or set `runner` or `dns`)",
                        m.id
                    ),
                ));
            }
            let runner = match &m.runner {
                Some(r) => Some(
                    parse_backend_url(r).map_err(|msg| invalid(format!("{key}.runner"), msg))?,
                ),
                None => None,
            };
            if let Some(d) = &m.dns {
                if d.contains("://") {
                    return Err(invalid(
                        format!("{key}.dns"),
                        format!("'{d}' is a URL; give HOST:PORT, as in 'bitnet-backends:8080'"),
                    ));
                }
                // A host holds no '/' (nor, bracketed IPv6 aside, a ':').
                let ok = d.rsplit_once(':').is_some_and(|(h, p)| {
                    !h.is_empty() && !h.contains('/') && p.parse::<u16>().is_ok_and(|p| p > 0)
                });
                if !ok {
                    return Err(invalid(
                        format!("{key}.dns"),
                        format!("'{d}' is not HOST:PORT"),
                    ));
                }
            }
            let mut backends = Vec::with_capacity(m.backends.len());
            for (bi, b) in m.backends.into_iter().enumerate() {
                let bkey = format!("{key}.backends[{bi}]");
                let url =
                    parse_backend_url(&b.url).map_err(|msg| invalid(format!("{bkey}.url"), msg))?;
                if b.slots == Some(0) {
                    return Err(invalid(format!("{bkey}.slots"), "must be at least 1"));
                }
                let name = b.name.unwrap_or_else(|| {
                    url.authority()
                        .map(|a| a.to_string())
                        .unwrap_or_else(|| b.url.clone())
                });
                if !backend_names.insert(name.clone()) {
                    return Err(invalid(
                        bkey.clone(),
                        format!("backend name '{name}' is used twice; give one a `name`"),
                    ));
                }
                backends.push(BackendConfig {
                    name,
                    url,
                    slots: b.slots,
                    dialect: b.dialect.unwrap_or_default(),
                });
            }
            models.push(ModelConfig {
                id: m.id,
                aliases: m.aliases,
                backends,
                runner,
                dns: m.dns,
            });
        }
        if let Some(d) = &self.default_model {
            if !names.contains(d) {
                return Err(invalid(
                    "default_model",
                    format!("'{d}' is not a configured model id or alias"),
                ));
            }
        }
        let max_attempts = self.upstream.max_attempts.unwrap_or(2);
        if max_attempts == 0 {
            return Err(invalid("upstream.max_attempts", "must be at least 1"));
        }
        let per_slot = self.queue.per_slot.unwrap_or(32);
        if per_slot == 0 {
            return Err(invalid("queue.per_slot", "must be at least 1"));
        }
        let max_body_bytes = self.max_body_bytes.unwrap_or(10 * 1024 * 1024);
        if max_body_bytes == 0 {
            return Err(invalid("max_body_bytes", "must be at least 1"));
        }
        let workers = match self.workers {
            None => DEFAULT_WORKERS,
            Some(n) if (1..=MAX_WORKERS).contains(&n) => n,
            Some(n) => {
                return Err(invalid(
                    "workers",
                    format!("{n} is out of range: 1 to {MAX_WORKERS}"),
                ))
            }
        };
        Ok(Config {
            listen,
            default_model: self.default_model,
            policy: self.policy.unwrap_or_default(),
            max_body_bytes,
            drain_timeout: secs("drain_timeout_secs", self.drain_timeout_secs, 30.0)?,
            workers,
            queue_max: self.queue.max,
            queue_per_slot: per_slot,
            queue_timeout: secs("queue.timeout_secs", self.queue.timeout_secs, 180.0)?,
            queue_aging: secs(
                "queue.priority_aging_secs",
                self.queue.priority_aging_secs,
                30.0,
            )?,
            priority_header: match &self.queue.priority_header {
                None => None,
                Some(h) => Some(h.parse().map_err(|_| {
                    invalid(
                        "queue.priority_header",
                        format!("'{h}' is not a header name"),
                    )
                })?),
            },
            key_priority: {
                for (name, p) in &self.queue.key_priority {
                    if p.abs() > crate::job::MAX_PRIORITY {
                        return Err(invalid(
                            format!("queue.key_priority.{name}"),
                            "must be within -10..=10",
                        ));
                    }
                }
                self.queue.key_priority
            },
            queue_comments: match self.queue.sse_comments_secs {
                None => None,
                Some(_) => Some(secs(
                    "queue.sse_comments_secs",
                    self.queue.sse_comments_secs,
                    5.0,
                )?),
            },
            routing: routing_defaults(&self.routing)?,
            health_interval: secs("health.interval_secs", self.health.interval_secs, 5.0)?,
            health_timeout: secs("health.timeout_secs", self.health.timeout_secs, 3.0)?,
            health_failure_threshold: self.health.failure_threshold.unwrap_or(3).max(1),
            remote_load: self.health.remote_load.unwrap_or(true),
            load_interval: secs(
                "health.load_interval_secs",
                self.health.load_interval_secs,
                1.0,
            )?,
            discovery_interval: secs("discovery.interval_secs", self.discovery.interval_secs, 1.0)?,
            connect_timeout: secs(
                "upstream.connect_timeout_secs",
                self.upstream.connect_timeout_secs,
                5.0,
            )?,
            max_attempts,
            first_byte_timeout: secs(
                "upstream.first_byte_timeout_secs",
                self.upstream.first_byte_timeout_secs,
                600.0,
            )?,
            upstream_idle_timeout: secs(
                "upstream.idle_timeout_secs",
                self.upstream.idle_timeout_secs,
                120.0,
            )?,
            max_connections: match self.limits.max_connections.unwrap_or(4096) {
                0 => return Err(invalid("limits.max_connections", "must be at least 1")),
                n => n,
            },
            max_header_bytes: match self.limits.max_header_bytes.unwrap_or(64 * 1024) {
                n if n < 8192 => {
                    return Err(invalid("limits.max_header_bytes", "must be at least 8192"))
                }
                n => n,
            },
            header_read_timeout: secs(
                "limits.header_read_timeout_secs",
                self.limits.header_read_timeout_secs,
                30.0,
            )?,
            body_read_timeout: secs(
                "limits.body_read_timeout_secs",
                self.limits.body_read_timeout_secs,
                60.0,
            )?,
            send_timeout: secs(
                "limits.send_timeout_secs",
                self.limits.send_timeout_secs,
                120.0,
            )?,
            max_buffered_body_bytes: match self.limits.max_buffered_body_bytes {
                None => DEFAULT_BUFFERED_BODY_BYTES.max(max_body_bytes),
                Some(n) if n < max_body_bytes => {
                    return Err(invalid(
                        "limits.max_buffered_body_bytes",
                        format!("must be at least max_body_bytes ({max_body_bytes}), or no body of that size could be read"),
                    ))
                }
                Some(n) if n > MAX_BUFFERED_BODY_BYTES => {
                    return Err(invalid(
                        "limits.max_buffered_body_bytes",
                        format!("must be at most {MAX_BUFFERED_BODY_BYTES}"),
                    ))
                }
                Some(n) => n,
            },
            keys: KeySet::build(&self.api_keys, &self.cli_api_keys, &self.api_key_files)
                .map_err(|e| invalid("api_keys", e.to_string()))?,
            admin_keys: KeySet::build_admin(&self.admin_keys, &self.cli_admin_keys, &[])
                .map_err(|e| invalid("admin_keys", e.to_string()))?,
            public_health_metrics: self.public_health_metrics.unwrap_or_default(),
            tls: match (self.tls_cert, self.tls_key) {
                (Some(c), Some(k)) => Some((c, k)),
                (None, None) => None,
                _ => return Err(invalid("tls_cert", "tls_cert and tls_key go together")),
            },
            upstream_ca_file: self.upstream.ca_file,
            tools: self.compat.tools.unwrap_or_default(),
            context_guard: self.compat.context_guard.unwrap_or(true),
            models,
        })
    }
}

fn parse_backend_url(s: &str) -> Result<Uri, String> {
    let uri: Uri = s.parse().map_err(|e| format!("'{s}' is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(format!("'{s}' must start with http:// or https://")),
    }
    if uri.authority().is_none() {
        return Err(format!("'{s}' has no host"));
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_file_parses_and_validates() {
        let raw = RawConfig::from_toml(
            r#"
            listen = "0.0.0.0:9000"
            default_model = "bitnet"
            policy = "round-robin"
            [queue]
            max = 7
            timeout_secs = 2.5
            [[models]]
            id = "falcon3-10b"
            aliases = ["bitnet"]
            backends = [{ url = "http://127.0.0.1:8101" }, { url = "http://127.0.0.1:8102", slots = 2, name = "two" }]
            "#,
        )
        .unwrap();
        let c = raw.validate().unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.policy, PolicyKind::RoundRobin);
        assert_eq!(c.queue_max, Some(7));
        assert_eq!(c.queue_timeout, Duration::from_millis(2500));
        assert_eq!(c.models[0].backends[0].name, "127.0.0.1:8101");
        assert_eq!(c.models[0].backends[1].name, "two");
        assert_eq!(c.models[0].backends[1].slots, Some(2));
        assert_eq!(c.max_attempts, 2);
        assert_eq!(c.workers, DEFAULT_WORKERS);
        let two =
            RawConfig::from_toml("workers = 2\n[[models]]\nid='m'\nbackends=[{url='http://a:1'}]")
                .unwrap();
        assert_eq!(two.validate().unwrap().workers, 2);
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let err = RawConfig::from_toml("lisen = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("lisen"), "{err}");
        let err = RawConfig::from_toml("[queue]\nmax_len = 3")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_len"), "{err}");
        // A bare string where a key table belongs says what a key table looks like.
        let err = RawConfig::from_toml("admin_keys = [\"adm-1\"]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected a key table such as {"), "{err}");
    }

    #[test]
    fn invalid_values_name_their_key() {
        let cases = [
            (
                "[[models]]\nid='m'\nbackends=[{url='ftp://x'}]",
                "models[0].backends[0].url",
            ),
            ("[[models]]\nid='m'\nbackends=[]", "models[0].backends"),
            (
                "[[models]]\nid='m'\nbackends=[{url='http://a:1', slots=0}]",
                "slots",
            ),
            (
                "default_model='x'\n[[models]]\nid='m'\nbackends=[{url='http://a:1'}]",
                "default_model",
            ),
            (
                "[queue]\ntimeout_secs=-1\n[[models]]\nid='m'\nbackends=[{url='http://a:1'}]",
                "queue.timeout_secs",
            ),
            (
                "[[models]]\nid='m'\naliases=['m']\nbackends=[{url='http://a:1'}]",
                "used twice",
            ),
            ("", "no model is configured"),
            (
                "workers=0\n[[models]]\nid='m'\nbackends=[{url='http://a:1'}]",
                "workers: 0 is out of range",
            ),
            (
                "workers=100000\n[[models]]\nid='m'\nbackends=[{url='http://a:1'}]",
                "workers: 100000 is out of range",
            ),
            (
                "[[models]]\nid='m'\ndns='http://backends:8080'",
                "models[0].dns: 'http://backends:8080' is a URL; give HOST:PORT",
            ),
            ("[[models]]\nid='m'\ndns='backends'", "is not HOST:PORT"),
            (
                "max_body_bytes=2000\n[limits]\nmax_buffered_body_bytes=1000\n[[models]]\nid='m'\nbackends=[{url='http://a:1'}]",
                "limits.max_buffered_body_bytes: must be at least max_body_bytes (2000)",
            ),
            (
                "[[models]]\nid='m'\ndns='backends/x:80'",
                "is not HOST:PORT",
            ),
        ];
        for (toml, needle) in cases {
            let err = RawConfig::from_toml(toml)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{toml:?} gave {err}");
        }
    }

    #[test]
    fn backend_flag_takes_slots_and_name() {
        let b = RawBackend::from_flag("http://127.0.0.1:8101#slots=4").unwrap();
        assert_eq!(b.url, "http://127.0.0.1:8101");
        assert_eq!(b.slots, Some(4));
        let b = RawBackend::from_flag("http://h:1#name=x&slots=2").unwrap();
        assert_eq!((b.name.as_deref(), b.slots), (Some("x"), Some(2)));
        assert!(RawBackend::from_flag("http://h:1#slots=many").is_err());
        assert!(RawBackend::from_flag("http://h:1#weight=2").is_err());
    }
}
