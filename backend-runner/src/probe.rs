//! HTTP probes of an instance: `/health` for readiness and liveness, `/slots` and `/metrics`
//! for whether it is working on something.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Largest probe response read; `/metrics` of a busy server is a few kilobytes.
const MAX_BODY: usize = 1 << 20;

/// What one `/health` probe saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// 200: ready.
    Ok,
    /// 503: up but still loading the model.
    Loading,
    /// Some other status.
    Status(u16),
    /// No answer in time.
    Timeout,
    /// Connection refused or broken.
    Unreachable,
}

/// Whether an instance is working, as far as its own endpoints tell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Activity {
    /// Slots processing a request, from `/slots`; `None` if it did not answer usefully.
    pub busy_slots: Option<usize>,
    /// Requests processing plus requests queued, from `/metrics`; `None` if unavailable.
    pub requests: Option<u64>,
}

impl Activity {
    /// True if either source shows work.
    pub fn is_busy(&self) -> bool {
        self.busy_slots.is_some_and(|n| n > 0) || self.requests.is_some_and(|n| n > 0)
    }

    /// `Some(true)` if at least one source answered and none shows work; `None` if neither
    /// answered, so nothing can be said.
    pub fn is_idle(&self) -> Option<bool> {
        if self.busy_slots.is_none() && self.requests.is_none() {
            return None;
        }
        Some(!self.is_busy())
    }
}

/// A small HTTP client for probes, shared by every instance.
#[derive(Debug, Clone)]
pub struct Prober {
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Default for Prober {
    fn default() -> Self {
        Self::new()
    }
}

impl Prober {
    /// A client that keeps at most one idle connection per instance.
    pub fn new() -> Prober {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1)
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Prober { client }
    }

    /// `GET base/health`.
    pub async fn health(&self, base: &str, timeout: Duration) -> Health {
        match self.get(base, "/health", timeout).await {
            Ok((200, _)) => Health::Ok,
            Ok((503, _)) => Health::Loading,
            Ok((status, _)) => Health::Status(status),
            Err(GetError::Timeout) => Health::Timeout,
            Err(GetError::Failed) => Health::Unreachable,
        }
    }

    /// `GET base/slots` and `GET base/metrics`, concurrently.
    pub async fn activity(&self, base: &str, timeout: Duration) -> Activity {
        let (slots, metrics) = tokio::join!(
            self.get(base, "/slots", timeout),
            self.get(base, "/metrics", timeout)
        );
        Activity {
            busy_slots: match slots {
                Ok((200, body)) => busy_slots(&body),
                _ => None,
            },
            requests: match metrics {
                Ok((200, body)) => requests_in_flight(&String::from_utf8_lossy(&body)),
                _ => None,
            },
        }
    }

    async fn get(
        &self,
        base: &str,
        path: &str,
        timeout: Duration,
    ) -> Result<(u16, Bytes), GetError> {
        let uri: http::Uri = format!("{base}{path}")
            .parse()
            .map_err(|_| GetError::Failed)?;
        let exchange = async {
            let response = self.client.get(uri).await.map_err(|_| GetError::Failed)?;
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|_| GetError::Failed)?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or(Err(GetError::Timeout))
    }
}

enum GetError {
    Timeout,
    Failed,
}

/// Counts busy slots in a `/slots` answer: upstream marks them `"is_processing": true`, the
/// older server gives `"state"` other than 0.
pub fn busy_slots(body: &[u8]) -> Option<usize> {
    let slots: Vec<serde_json::Value> = serde_json::from_slice(body).ok()?;
    let mut busy = 0;
    for slot in &slots {
        let processing = match (slot.get("is_processing"), slot.get("state")) {
            (Some(p), _) => p.as_bool()?,
            (None, Some(s)) => s.as_u64()? != 0,
            (None, None) => return None,
        };
        busy += usize::from(processing);
    }
    Some(busy)
}

/// `llamacpp:requests_processing + llamacpp:requests_deferred` from a `/metrics` answer, so
/// that a request queued behind full slots also counts as in flight.
pub fn requests_in_flight(text: &str) -> Option<u64> {
    let mut total = None;
    for line in text.lines() {
        let Some((name, value)) = line.split_once(' ') else {
            continue;
        };
        if matches!(
            name,
            "llamacpp:requests_processing" | "llamacpp:requests_deferred"
        ) {
            let v: f64 = value.trim().parse().ok()?;
            *total.get_or_insert(0) += v.max(0.0) as u64;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_slots_are_counted_in_both_dialects() {
        let upstream = br#"[{"id":0,"is_processing":true},{"id":1,"is_processing":false}]"#;
        assert_eq!(busy_slots(upstream), Some(1));
        let older = br#"[{"id":0,"state":1},{"id":1,"state":0},{"id":2,"state":1}]"#;
        assert_eq!(busy_slots(older), Some(2));
        assert_eq!(busy_slots(b"[]"), Some(0));
    }

    #[test]
    fn unexpected_slot_answers_say_nothing() {
        assert_eq!(busy_slots(br#"{"error":"disabled"}"#), None);
        assert_eq!(busy_slots(br#"[{"id":0}]"#), None);
        assert_eq!(busy_slots(b"not json"), None);
    }

    #[test]
    fn queued_requests_count_as_in_flight() {
        let text = "# HELP llamacpp:requests_processing x\n\
                    llamacpp:requests_processing 1\n\
                    llamacpp:requests_deferred 2\n\
                    llamacpp:tokens_predicted_total 500\n";
        assert_eq!(requests_in_flight(text), Some(3));
        assert_eq!(
            requests_in_flight("llamacpp:tokens_predicted_total 5\n"),
            None
        );
    }

    #[test]
    fn activity_is_idle_only_when_some_source_answered() {
        let none = Activity::default();
        assert_eq!(none.is_idle(), None);
        assert!(!none.is_busy());
        let idle = Activity {
            busy_slots: Some(0),
            requests: None,
        };
        assert_eq!(idle.is_idle(), Some(true));
        let queued = Activity {
            busy_slots: Some(0),
            requests: Some(1),
        };
        assert_eq!(queued.is_idle(), Some(false));
        assert!(queued.is_busy());
    }
}
