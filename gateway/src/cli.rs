//! Command-line flags. Every flag overrides the config file; the essentials are enough to
//! run without a file at all.

use std::path::PathBuf;

use clap::Parser;

use crate::balance::PolicyKind;
use crate::config::{Config, ConfigError, RawBackend, RawConfig, RawModel};

/// A load-balancing, OpenAI-compatible gateway in front of llama-server backends.
///
/// Requests to /v1/chat/completions, /v1/completions, /v1/embeddings and llama-server's
/// native endpoints go to the backend with the most free slots of the requested model.
/// When every slot is busy they wait in a bounded FIFO queue. Streams pass through
/// byte for byte.
///
/// Quick start without a config file:
///
///   bitnet-gateway --model falcon3-10b --alias bitnet \
///       --backend http://127.0.0.1:8101 --backend http://127.0.0.1:8102#slots=2
#[derive(Debug, Clone, Parser)]
#[command(name = "bitnet-gateway", version, verbatim_doc_comment)]
pub struct Cli {
    /// TOML config file. Flags given on the command line override its values.
    #[arg(long, value_name = "FILE", env = "BITNET_GATEWAY_CONFIG")]
    pub config: Option<PathBuf>,

    /// Address to listen on [default: 127.0.0.1:8090]. Use port 0 to let the OS choose;
    /// the bound address is printed on stdout.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,

    /// A backend base URL, repeatable. Options follow a '#', joined by '&':
    /// slots=N fixes its slot count (otherwise read from the backend's GET /props),
    /// name=NAME names it, dialect=auto|llama.cpp|bitnet sets its dialect (auto detects it
    /// from /props). E.g. http://127.0.0.1:8101#slots=1&name=i0&dialect=bitnet. The
    /// backends serve the model given by --model; they replace that model's backends from
    /// the file.
    #[arg(long = "backend", value_name = "URL[#slots=N][&name=NAME][&dialect=D]", value_parser = RawBackend::from_flag)]
    pub backends: Vec<RawBackend>,

    /// A bitnet-runner control API (e.g. http://127.0.0.1:8099) whose ready instances serve
    /// --model; followed as instances start, drain, restart or are added.
    #[arg(long, value_name = "URL")]
    pub runner: Option<String>,

    /// HOST:PORT whose DNS addresses serve --model (e.g. a Kubernetes headless Service),
    /// re-resolved every discovery interval.
    #[arg(long, value_name = "HOST:PORT")]
    pub dns: Option<String>,

    /// Model id that --backend, --alias, --runner and --dns apply to. Defaults to the file's
    /// only model, or "default" when there is no file.
    #[arg(long, value_name = "ID")]
    pub model: Option<String>,

    /// Another name for --model, repeatable (e.g. --alias bitnet).
    #[arg(long = "alias", value_name = "NAME")]
    pub aliases: Vec<String>,

    /// Model id or alias that receives requests whose `model` is unknown or missing.
    /// Without it, an unknown model gets 404 model_not_found.
    #[arg(long, value_name = "ID")]
    pub default_model: Option<String>,

    /// Backend selection policy [default: least-loaded].
    #[arg(long, value_enum, value_name = "NAME")]
    pub policy: Option<PolicyKind>,

    /// Most requests that may wait per model [default: 32 × the model's total slots].
    #[arg(long, value_name = "N")]
    pub max_queue: Option<usize>,

    /// Seconds a request may wait in the queue before it gets 503 [default: 180]. Under
    /// predicted-ttft, a request predicted to wait longer gets 429 at once instead.
    #[arg(long, value_name = "SECS")]
    pub queue_timeout: Option<f64>,

    /// Attempts per request, counting the first; failover happens only before any byte
    /// has reached the client [default: 2].
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,

    /// Seconds between backend /health probes [default: 5].
    #[arg(long, value_name = "SECS")]
    pub health_interval: Option<f64>,

    /// Largest request body in bytes; larger bodies get 413 [default: 10485760].
    #[arg(long, value_name = "BYTES")]
    pub max_body_bytes: Option<usize>,

    /// Seconds in-flight responses may run after SIGTERM/SIGINT before exit [default: 30].
    #[arg(long, value_name = "SECS")]
    pub drain_timeout: Option<f64>,

    /// Serving threads [default: 1]. The first accepts connections and deals each to the
    /// thread holding the fewest; each serves its own, with backend connections of its
    /// own, without handing work to another thread. One relays over ten thousand requests a second; raise it for a
    /// gateway that runs out of one core on a machine with cores to spare.
    #[arg(long, value_name = "N", env = "BITNET_GATEWAY_WORKERS")]
    pub workers: Option<usize>,

    /// A client API key, repeatable. Clients send it as `Authorization: Bearer KEY` or
    /// `x-api-key: KEY`. With no key configured anywhere the gateway is open. Without this
    /// flag, the environment variable BITNET_GATEWAY_API_KEYS is read: keys separated by
    /// commas. A flag's value is one key, commas included.
    #[arg(long = "api-key", value_name = "KEY")]
    pub api_keys: Vec<String>,

    /// A file of client API keys, one per line (`name:key` or `key`; `#` comments),
    /// repeatable.
    #[arg(long = "api-key-file", value_name = "FILE")]
    pub api_key_files: Vec<PathBuf>,

    /// A key for the admin endpoints (/admin/...), repeatable. Without one they are off.
    #[arg(long = "admin-key", value_name = "KEY", hide_env_values = true)]
    pub admin_keys: Vec<String>,

    /// Whether /health and /metrics answer without a key: loopback (only to clients on
    /// this machine), always, or never [default: loopback].
    #[arg(long, value_name = "WHO")]
    pub public_health_metrics: Option<crate::auth::PublicEndpoints>,

    /// PEM certificate chain: serve HTTPS (HTTP/1.1 and HTTP/2 by ALPN). Needs --tls-key.
    /// SIGHUP reloads it.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Check the configuration and the files it names, print a summary of it (API keys by
    /// name only), and exit.
    #[arg(long)]
    pub check_config: bool,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Cli {
    /// Load the file (if any), apply the flags, and validate.
    pub fn into_config(&self) -> Result<Config, ConfigError> {
        let mut raw = match &self.config {
            Some(path) => RawConfig::from_file(path)?,
            None => RawConfig::default(),
        };
        self.apply(&mut raw)?;
        raw.validate()
    }

    /// Apply the flags on top of a parsed file.
    pub fn apply(&self, raw: &mut RawConfig) -> Result<(), ConfigError> {
        if let Some(v) = &self.listen {
            raw.listen = Some(v.clone());
        }
        if let Some(v) = &self.default_model {
            raw.default_model = Some(v.clone());
        }
        if let Some(v) = self.policy {
            raw.policy = Some(v);
        }
        if let Some(v) = self.max_queue {
            raw.queue.max = Some(v);
        }
        if let Some(v) = self.queue_timeout {
            raw.queue.timeout_secs = Some(v);
        }
        if let Some(v) = self.max_attempts {
            raw.upstream.max_attempts = Some(v);
        }
        if let Some(v) = self.health_interval {
            raw.health.interval_secs = Some(v);
        }
        if let Some(v) = self.max_body_bytes {
            raw.max_body_bytes = Some(v);
        }
        if let Some(v) = self.drain_timeout {
            raw.drain_timeout_secs = Some(v);
        }
        if let Some(v) = self.workers {
            raw.workers = Some(v);
        }
        raw.cli_api_keys = if self.api_keys.is_empty() {
            std::env::var(API_KEYS_ENV)
                .map(|v| split_keys(&v))
                .unwrap_or_default()
        } else {
            self.api_keys.clone()
        };
        raw.cli_admin_keys = self.admin_keys.clone();
        raw.api_key_files.extend(self.api_key_files.iter().cloned());
        if let Some(v) = self.public_health_metrics {
            raw.public_health_metrics = Some(v);
        }
        if let Some(v) = &self.tls_cert {
            raw.tls_cert = Some(v.clone());
        }
        if let Some(v) = &self.tls_key {
            raw.tls_key = Some(v.clone());
        }
        if self.model.is_none()
            && self.backends.is_empty()
            && self.aliases.is_empty()
            && self.runner.is_none()
            && self.dns.is_none()
        {
            return Ok(());
        }
        let model = self.target_model(raw)?;
        if let Some(r) = &self.runner {
            model.runner = Some(r.clone());
        }
        if let Some(d) = &self.dns {
            model.dns = Some(d.clone());
        }
        if !self.backends.is_empty() {
            model.backends = self.backends.clone();
        }
        for a in &self.aliases {
            if !model.aliases.contains(a) {
                model.aliases.push(a.clone());
            }
        }
        Ok(())
    }

    /// The model that --backend/--alias apply to, created if the file lacks it.
    fn target_model<'a>(&self, raw: &'a mut RawConfig) -> Result<&'a mut RawModel, ConfigError> {
        let id = match (&self.model, raw.models.len()) {
            (Some(id), _) => id.clone(),
            (None, 0) => "default".to_string(),
            (None, 1) => raw.models[0].id.clone(),
            (None, _) => {
                return Err(ConfigError::Invalid {
                    key: "--model".into(),
                    message: "the config has several models: say which one --backend/--alias apply to with --model ID".into(),
                })
            }
        };
        let pos = match raw.models.iter().position(|m| m.id == id) {
            Some(p) => p,
            None => {
                raw.models.push(RawModel {
                    id,
                    ..RawModel::default()
                });
                raw.models.len() - 1
            }
        };
        Ok(&mut raw.models[pos])
    }
}

/// Client keys from the environment, when no `--api-key` is given.
const API_KEYS_ENV: &str = "BITNET_GATEWAY_API_KEYS";

/// The keys in a comma-separated list. Only the environment variable is split: a flag
/// that was split would turn a key with a comma into two shorter keys, each accepted.
fn split_keys(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flag_is_one_key_and_the_environment_a_list() {
        assert_eq!(cli(&["--api-key", "a,b"]).api_keys, ["a,b"]);
        assert_eq!(split_keys(" k1, k2,,k3 "), ["k1", "k2", "k3"]);
        assert!(split_keys("").is_empty());
    }

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("bitnet-gateway").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn flags_alone_make_a_working_config() {
        let c = cli(&[
            "--model",
            "falcon3-10b",
            "--alias",
            "bitnet",
            "--backend",
            "http://127.0.0.1:8101#slots=2",
            "--backend",
            "http://127.0.0.1:8102",
            "--max-queue",
            "9",
            "--queue-timeout",
            "1.5",
        ])
        .into_config()
        .unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8090");
        assert_eq!(c.models.len(), 1);
        assert_eq!(c.models[0].id, "falcon3-10b");
        assert_eq!(c.models[0].aliases, vec!["bitnet"]);
        assert_eq!(c.models[0].backends.len(), 2);
        assert_eq!(c.models[0].backends[0].slots, Some(2));
        assert_eq!(c.queue_max, Some(9));
    }

    #[test]
    fn flags_override_the_file() {
        let mut raw = RawConfig::from_toml(
            "listen='127.0.0.1:1'\n[queue]\nmax=3\n[[models]]\nid='m'\nbackends=[{url='http://a:1'}]",
        )
        .unwrap();
        cli(&[
            "--listen",
            "127.0.0.1:2",
            "--max-queue",
            "4",
            "--backend",
            "http://b:2",
        ])
        .apply(&mut raw)
        .unwrap();
        let c = raw.validate().unwrap();
        assert_eq!(c.listen.port(), 2);
        assert_eq!(c.queue_max, Some(4));
        assert_eq!(c.models[0].backends.len(), 1);
        assert_eq!(c.models[0].backends[0].url.to_string(), "http://b:2/");
    }

    #[test]
    fn backend_flag_is_ambiguous_with_several_models() {
        let mut raw = RawConfig::from_toml(
            "[[models]]\nid='a'\nbackends=[{url='http://a:1'}]\n[[models]]\nid='b'\nbackends=[{url='http://b:1'}]",
        )
        .unwrap();
        let err = cli(&["--backend", "http://c:1"])
            .apply(&mut raw)
            .unwrap_err();
        assert!(err.to_string().contains("--model"), "{err}");
    }
}
