//! What one request measured.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::workload::WorkloadKind;

/// Why a request did not succeed. Kinds are kept apart because they mean different things for a
/// gateway: 429 is admission control pushing back, 503 is "no backend", a mid-stream error is a
/// backend failing after it was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ErrorKind {
    /// HTTP 429 Too Many Requests.
    #[serde(rename = "http_429")]
    RateLimited,
    /// HTTP 503 Service Unavailable.
    #[serde(rename = "http_503")]
    Unavailable,
    /// Any other 4xx status.
    #[serde(rename = "http_4xx")]
    ClientError,
    /// Any other 5xx status (or an unexpected non-2xx status).
    #[serde(rename = "http_5xx")]
    ServerError,
    /// The TCP connection could not be made.
    #[serde(rename = "connect")]
    Connect,
    /// The request did not finish within the configured timeout.
    #[serde(rename = "timeout")]
    Timeout,
    /// A successful stream carried an error event (`data: {"error":...}` or `error: ...`).
    #[serde(rename = "mid_stream")]
    MidStream,
    /// The body ended or broke before the response was complete.
    #[serde(rename = "truncated")]
    Truncated,
    /// The transport failed before a response head arrived, for a reason other than connecting.
    #[serde(rename = "transport")]
    Transport,
    /// A 2xx response whose body could not be understood.
    #[serde(rename = "bad_response")]
    BadResponse,
    /// Still running when the run's drain period ended.
    #[serde(rename = "cancelled")]
    Cancelled,
}

impl ErrorKind {
    /// Classifies a non-success HTTP status.
    pub fn from_status(status: u16) -> Self {
        match status {
            429 => Self::RateLimited,
            503 => Self::Unavailable,
            400..=499 => Self::ClientError,
            _ => Self::ServerError,
        }
    }

    /// The name used in results and reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::RateLimited => "http_429",
            Self::Unavailable => "http_503",
            Self::ClientError => "http_4xx",
            Self::ServerError => "http_5xx",
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::MidStream => "mid_stream",
            Self::Truncated => "truncated",
            Self::Transport => "transport",
            Self::BadResponse => "bad_response",
            Self::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One request's measurements. Times are microseconds; offsets are from the start of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Index of the session the request belongs to.
    pub session: u64,
    /// Turn number within the session, from 1.
    pub turn: u32,
    /// Kind of the session.
    pub workload: WorkloadKind,
    /// Open loop only: when the session's arrival was scheduled (first turn only).
    pub scheduled_us: Option<u64>,
    /// When the request was sent.
    pub start_us: u64,
    /// Time to first token: the first content-bearing chunk of a stream, or the response head
    /// of a non-streaming request.
    pub ttft_us: Option<u64>,
    /// Time from sending to the end of the response (or to the failure).
    pub e2e_us: u64,
    /// Mean gap between content-bearing chunks.
    pub itl_mean_us: Option<u64>,
    /// Largest gap between content-bearing chunks.
    pub itl_max_us: Option<u64>,
    /// Tokens generated, from `usage`, else `timings`, else the number of content chunks.
    pub completion_tokens: u64,
    /// Prompt tokens, from `usage` or `timings`.
    pub prompt_tokens: Option<u64>,
    /// Prompt tokens the server reused from its cache
    /// (`usage.prompt_tokens_details.cached_tokens` or `timings.cache_n`).
    pub cached_tokens: Option<u64>,
    /// Generation speed after the first token: `(completion_tokens - 1) / (e2e - ttft)`.
    pub decode_tokens_per_s: Option<f64>,
    /// HTTP status, if a response head arrived.
    pub status: Option<u16>,
    /// Why the request failed; `None` on success.
    pub error: Option<ErrorKind>,
    /// A short description of the failure.
    pub error_message: Option<String>,
    /// With `--token-times`: when each content-bearing chunk of the stream arrived, in
    /// microseconds since the run started (the first is the TTFT's moment). Absent otherwise,
    /// and for requests recorded after the run's budget of
    /// [`MAX_TOKEN_TIMES`](super::MAX_TOKEN_TIMES) was spent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_us: Option<Vec<u64>>,
}

impl RequestRecord {
    /// Whether the request succeeded.
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }

    /// Whether the request was cut by the end of the run rather than failed by the target.
    pub fn cancelled(&self) -> bool {
        self.error == Some(ErrorKind::Cancelled)
    }

    /// Offset of the end of the request from the start of the run.
    pub fn end_us(&self) -> u64 {
        self.start_us + self.e2e_us
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_distinct_kinds() {
        assert_eq!(ErrorKind::from_status(429), ErrorKind::RateLimited);
        assert_eq!(ErrorKind::from_status(503), ErrorKind::Unavailable);
        assert_eq!(ErrorKind::from_status(400), ErrorKind::ClientError);
        assert_eq!(ErrorKind::from_status(500), ErrorKind::ServerError);
        assert_eq!(ErrorKind::from_status(302), ErrorKind::ServerError);
    }

    #[test]
    fn kind_names_match_their_serialised_form() {
        for kind in [
            ErrorKind::RateLimited,
            ErrorKind::Unavailable,
            ErrorKind::ClientError,
            ErrorKind::ServerError,
            ErrorKind::Connect,
            ErrorKind::Timeout,
            ErrorKind::MidStream,
            ErrorKind::Truncated,
            ErrorKind::Transport,
            ErrorKind::BadResponse,
            ErrorKind::Cancelled,
        ] {
            assert_eq!(
                serde_json::to_string(&kind).unwrap(),
                format!("\"{}\"", kind.name())
            );
        }
    }
}
