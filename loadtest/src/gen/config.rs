//! Run parameters and the checks that refuse unsafe or endless runs.

use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::workload::{WorkloadKind, WorkloadSpec};

/// How requests are paced.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Load {
    /// Closed loop: `concurrency` workers each run one session at a time, back to back.
    Closed {
        /// Number of workers.
        concurrency: usize,
    },
    /// Open loop: sessions start at Poisson arrival times, whether or not earlier ones finished.
    Open {
        /// Mean session starts per second. Single-shot workloads are one-request sessions, so
        /// for them this is requests per second.
        rate: f64,
        /// Sessions allowed at once; arrivals beyond it are dropped and counted, so an overloaded
        /// target cannot make the generator itself run out of memory.
        max_in_flight: usize,
    },
}

impl Load {
    /// The largest number of connections the run can hold open at once.
    pub fn max_connections(&self) -> usize {
        match *self {
            Self::Closed { concurrency } => concurrency,
            Self::Open { max_in_flight, .. } => max_in_flight,
        }
    }
}

/// Everything a run needs. Serialised into the JSON results (without the API key) so a result
/// file says how it was produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunConfig {
    /// Base URL of the target, e.g. `http://127.0.0.1:8090`; requests go to
    /// `{url}/v1/chat/completions`.
    pub url: String,
    /// The `model` field of every request.
    pub model: String,
    /// Sent as `Authorization: Bearer ...` when set. Never written to result files.
    #[serde(skip)]
    pub api_key: Option<String>,
    /// Closed or open loop.
    pub load: Load,
    /// Stop starting requests after this long.
    #[serde(with = "opt_secs")]
    pub duration: Option<Duration>,
    /// Stop after starting this many requests (agent turns count one each).
    pub max_requests: Option<u64>,
    /// Ask for `stream: true` and measure per-chunk timings.
    pub stream: bool,
    /// Which kinds of sessions to run.
    pub workload: WorkloadSpec,
    /// Overrides each kind's default `max_tokens`.
    pub max_tokens: Option<u32>,
    /// Seeds prompts, mix choices and arrival times.
    pub seed: u64,
    /// Pause between an agent session's reply and its next turn.
    #[serde(with = "secs")]
    pub think_time: Duration,
    /// Turns per agent session.
    pub turns: u32,
    /// Length of the shared agent system prompt in characters.
    pub system_prompt_chars: usize,
    /// Limit for one whole request, from sending to the last byte.
    #[serde(with = "secs")]
    pub timeout: Duration,
    /// After `duration`, how long requests already running may take to finish before they are
    /// cut and counted as cancelled.
    #[serde(with = "secs")]
    pub drain: Duration,
    /// Permit targets outside the loopback network.
    pub allow_remote: bool,
    /// Print a progress line on stderr while running.
    #[serde(skip)]
    pub progress: bool,
    /// Keep each streamed token's arrival time in the records (`token_us`).
    #[serde(default)]
    pub token_times: bool,
}

impl RunConfig {
    /// A closed-loop, single-worker, non-streaming `short-chat` run with the CLI's defaults.
    /// It is unbounded until `duration` or `max_requests` is set; adjust the public fields.
    pub fn new(url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            model: model.into(),
            api_key: None,
            load: Load::Closed { concurrency: 1 },
            duration: None,
            max_requests: None,
            stream: false,
            workload: WorkloadSpec::single(WorkloadKind::ShortChat),
            max_tokens: None,
            seed: 1,
            think_time: Duration::from_secs(2),
            turns: 5,
            system_prompt_chars: 38_000,
            timeout: Duration::from_secs(600),
            drain: Duration::from_secs(10),
            allow_remote: false,
            progress: false,
            token_times: false,
        }
    }

    /// `max_tokens` for a session of `kind`.
    pub fn max_tokens_for(&self, kind: WorkloadKind) -> u32 {
        self.max_tokens.unwrap_or_else(|| kind.default_max_tokens())
    }

    /// Checks the run is bounded, sane and aimed where it is allowed to go, and returns the
    /// parsed endpoint.
    pub fn validate(&self) -> Result<Endpoint, ConfigError> {
        if self.duration.is_none() && self.max_requests.is_none() {
            return Err(ConfigError::Unbounded);
        }
        if self.duration.is_some_and(|d| d.is_zero()) || self.max_requests == Some(0) {
            return Err(ConfigError::Invalid(
                "--duration and --requests must be positive",
            ));
        }
        match self.load {
            Load::Closed { concurrency: 0 } => {
                return Err(ConfigError::Invalid("--concurrency must be at least 1"))
            }
            Load::Open { rate, .. } if !(rate.is_finite() && rate > 0.0) => {
                return Err(ConfigError::Invalid("--rate must be a positive number"))
            }
            Load::Open {
                max_in_flight: 0, ..
            } => return Err(ConfigError::Invalid("--max-in-flight must be at least 1")),
            _ => {}
        }
        if self.turns == 0 {
            return Err(ConfigError::Invalid("--turns must be at least 1"));
        }
        if self.timeout.is_zero() {
            return Err(ConfigError::Invalid("--timeout must be positive"));
        }
        let endpoint = Endpoint::parse(&self.url)?;
        if !endpoint.loopback && !self.allow_remote {
            return Err(ConfigError::Remote(endpoint.host.clone()));
        }
        Ok(endpoint)
    }
}

/// The parsed target.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `{url}/v1/chat/completions`.
    pub chat_uri: http::Uri,
    /// Host part of the URL.
    pub host: String,
    /// Whether the host is a loopback address or `localhost`.
    pub loopback: bool,
}

impl Endpoint {
    fn parse(url: &str) -> Result<Self, ConfigError> {
        let bad = |why: &'static str| ConfigError::BadUrl {
            url: url.to_owned(),
            why,
        };
        let base: http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
        match base.scheme_str() {
            Some("http") => {}
            Some(_) => return Err(bad("only http:// is supported")),
            None => return Err(bad("missing http:// scheme")),
        }
        let host = base.host().ok_or_else(|| bad("missing host"))?.to_owned();
        if base.query().is_some() {
            return Err(bad("a base URL takes no query"));
        }
        let path = base.path().trim_end_matches('/');
        let chat_uri = format!(
            "http://{}{path}/v1/chat/completions",
            base.authority().ok_or_else(|| bad("missing host"))?
        )
        .parse()
        .map_err(|_| bad("not a URL"))?;
        let loopback = is_loopback(&host);
        Ok(Self {
            chat_uri,
            host,
            loopback,
        })
    }
}

fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        // Resolving names here would let a hosts-file entry silently redirect load elsewhere;
        // only the name that is loopback by definition is trusted.
        Err(_) => bare.eq_ignore_ascii_case("localhost"),
    }
}

/// Why a run configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Neither a duration nor a request count bounds the run.
    #[error("the run is unbounded: give --duration SECS or --requests N (or both)")]
    Unbounded,
    /// The target is not on the loopback network.
    #[error(
        "refusing to send load to non-loopback host {0:?}; pass --allow-remote if you mean it"
    )]
    Remote(String),
    /// The URL cannot be used.
    #[error("bad --url {url:?}: {why}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A numeric parameter is out of range.
    #[error("{0}")]
    Invalid(&'static str),
}

/// `Duration` as fractional seconds, which reads better in result files than `{secs, nanos}`.
mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }
}

/// `Option<Duration>` as fractional seconds or `null`.
mod opt_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        Option::<f64>::deserialize(d)?
            .map(|secs| Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounded(url: &str) -> RunConfig {
        RunConfig {
            max_requests: Some(1),
            ..RunConfig::new(url, "m")
        }
    }

    #[test]
    fn unbounded_runs_are_refused() {
        let cfg = RunConfig::new("http://127.0.0.1:1", "m");
        assert_eq!(cfg.validate().unwrap_err(), ConfigError::Unbounded);
        let cfg = RunConfig {
            duration: Some(Duration::from_secs(1)),
            ..cfg
        };
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn only_loopback_targets_are_allowed_by_default() {
        for url in [
            "http://127.0.0.1:8090",
            "http://127.3.2.1:1",
            "http://localhost:8090/",
            "http://[::1]:8090",
        ] {
            let endpoint = bounded(url).validate().unwrap();
            assert!(endpoint.loopback, "{url}");
        }
        for url in [
            "http://10.0.0.1:8090",
            "http://example.com",
            "http://[::2]:1",
        ] {
            assert!(
                matches!(bounded(url).validate(), Err(ConfigError::Remote(_))),
                "{url}"
            );
            let cfg = RunConfig {
                allow_remote: true,
                ..bounded(url)
            };
            assert!(cfg.validate().is_ok(), "{url}");
        }
    }

    #[test]
    fn chat_path_is_appended_to_the_base_url() {
        let e = bounded("http://127.0.0.1:8090").validate().unwrap();
        assert_eq!(
            e.chat_uri.to_string(),
            "http://127.0.0.1:8090/v1/chat/completions"
        );
        let e = bounded("http://localhost:1/prefix/").validate().unwrap();
        assert_eq!(
            e.chat_uri.to_string(),
            "http://localhost:1/prefix/v1/chat/completions"
        );
    }

    #[test]
    fn unusable_urls_and_numbers_are_refused() {
        for url in [
            "127.0.0.1:8090",
            "https://127.0.0.1:1",
            "http://127.0.0.1:1/?a=b",
        ] {
            assert!(
                matches!(bounded(url).validate(), Err(ConfigError::BadUrl { .. })),
                "{url}"
            );
        }
        let cfg = RunConfig {
            load: Load::Open {
                rate: 0.0,
                max_in_flight: 10,
            },
            ..bounded("http://127.0.0.1:1")
        };
        assert!(matches!(cfg.validate(), Err(ConfigError::Invalid(_))));
        let cfg = RunConfig {
            load: Load::Closed { concurrency: 0 },
            ..bounded("http://127.0.0.1:1")
        };
        assert!(matches!(cfg.validate(), Err(ConfigError::Invalid(_))));
    }

    #[test]
    fn config_round_trips_through_json_without_the_api_key() {
        let cfg = RunConfig {
            api_key: Some("secret".into()),
            duration: Some(Duration::from_millis(1500)),
            workload: "mix:short-chat=70,agent=30".parse().unwrap(),
            ..bounded("http://127.0.0.1:1")
        };
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(!json.contains("secret"));
        assert!(json.contains("\"duration\":1.5"));
        let back: RunConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back.workload, cfg.workload);
        assert_eq!(back.duration, cfg.duration);
        assert_eq!(back.api_key, None);
    }
}
