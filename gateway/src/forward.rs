//! Forward: send the request to the backend that holds our slot, over a pooled keep-alive
//! connection, and fail over to another backend while nothing has reached the client yet.
//!
//! Failover is safe only before the response head is passed on: after that the client has
//! seen bytes and a retry would duplicate or splice output. Connection errors and 502/503
//! answers therefore mark the backend unhealthy, release the slot, and admit again (the
//! unhealthy backend is no longer routable, so the retry lands elsewhere or waits).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::admit::{admit, Admission};
use crate::backend::Health;
use crate::body::GatewayBody;
use crate::config::Config;
use crate::error::GatewayError;
use crate::pool::ModelPool;
use crate::relay::{Exchange, RelayBody};
use crate::state::Gateway;

/// The client used for every backend: HTTP/1.1 keep-alive, one idle pool per backend.
pub type UpstreamClient = Client<HttpConnector, Full<Bytes>>;

/// Build the upstream client.
pub fn upstream_client(cfg: &Config) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    // Tokens are small writes; Nagle would hold each one back waiting for an ACK.
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(cfg.connect_timeout));
    connector.set_keepalive(Some(Duration::from_secs(30)));
    Client::builder(TokioExecutor::new())
        // llama-server closes idle keep-alive connections after 5 s; dropping ours first
        // avoids sending a request into a connection the server is closing.
        .pool_idle_timeout(Duration::from_secs(4))
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .build(connector)
}

/// What the gateway keeps of a client request to send it (again, on failover).
#[derive(Debug)]
pub struct Outbound {
    /// The request id, for logs and the `X-Request-Id` header.
    pub request_id: String,
    /// Endpoint label for metrics.
    pub endpoint: &'static str,
    /// When the request arrived.
    pub arrived: tokio::time::Instant,
    /// HTTP method.
    pub method: Method,
    /// Path and query, appended to the backend's base URL.
    pub path_and_query: String,
    /// End-to-end headers of the client request.
    pub headers: HeaderMap,
    /// The whole body, already read (and cheap to clone).
    pub body: Bytes,
}

/// Headers that describe one connection, not the message, and so never cross the proxy.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Remove hop-by-hop headers, including any the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for h in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(h);
    }
}

impl Outbound {
    fn to_request(&self, uri: http::Uri) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = uri;
        let headers = req.headers_mut();
        headers.clone_from(&self.headers);
        // The backend's own host, and a length for the body we actually send.
        headers.remove(header::HOST);
        headers.remove(header::CONTENT_LENGTH);
        headers.remove(header::EXPECT);
        req
    }
}

/// Admit, send, and fail over before the first byte. Returns the response to relay.
pub async fn forward(
    gw: &Arc<Gateway>,
    pool: &Arc<ModelPool>,
    out: Outbound,
) -> Result<Response<GatewayBody>, GatewayError> {
    let max_attempts = gw.config.max_attempts;
    let m = &gw.metrics;
    let mut attempt = 0;
    loop {
        attempt += 1;
        if gw.is_shutting_down() {
            return Err(GatewayError::ShuttingDown);
        }
        let admission = admit(pool).await;
        let reason = match &admission {
            Admission::Admitted { .. } => None,
            Admission::QueueFull { .. } => Some("full"),
            Admission::TimedOut { .. } => Some("timeout"),
            Admission::NoBackend => Some("no_backend"),
        };
        if let Some(reason) = reason {
            m.queue
                .rejected
                .with_label_values(&[&pool.id, reason])
                .inc();
        }
        let (guard, queue_wait) = match admission {
            Admission::Admitted { guard, waited } => {
                m.queue
                    .wait
                    .with_label_values(&[&pool.id])
                    .observe(waited.as_secs_f64());
                (guard, waited)
            }
            Admission::QueueFull { queued } => {
                return Err(GatewayError::QueueFull {
                    model: pool.id.clone(),
                    slots: pool.total_slots(),
                    queued,
                    retry_after: retry_hint(pool),
                })
            }
            Admission::TimedOut { waited } => {
                return Err(GatewayError::QueueTimeout {
                    model: pool.id.clone(),
                    waited,
                    retry_after: retry_hint(pool),
                })
            }
            Admission::NoBackend => return Err(GatewayError::NoBackend(pool.id.clone())),
        };
        let backend = guard.backend().clone();
        let req = out.to_request(backend.uri_for(&out.path_and_query));
        let last = attempt >= max_attempts;
        match gw.client.request(req).await {
            Ok(resp) if is_failover_status(resp.status()) && !last => {
                let loading = resp.status() == StatusCode::SERVICE_UNAVAILABLE;
                let kind = if loading { "status_503" } else { "status_502" };
                m.backends
                    .upstream_errors
                    .with_label_values(&[&backend.name, kind])
                    .inc();
                m.backends.retries.with_label_values(&[&backend.name]).inc();
                let to = if loading {
                    Health::Loading
                } else {
                    Health::Down
                };
                backend.set_health(to);
                tracing::warn!(backend = %backend.name, status = %resp.status(), attempt,
                    "backend refused the request before the first byte; failing over");
            }
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                let sse = is_event_stream(&parts.headers);
                if sse {
                    // Keep every proxy and cache between us and the client from holding
                    // tokens back.
                    parts
                        .headers
                        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                    parts.headers.insert(
                        HeaderName::from_static("x-accel-buffering"),
                        HeaderValue::from_static("no"),
                    );
                }
                if let Ok(v) = HeaderValue::from_str(&backend.name) {
                    parts
                        .headers
                        .insert(HeaderName::from_static("x-backend"), v);
                }
                let exchange = Exchange {
                    request_id: out.request_id,
                    endpoint: out.endpoint,
                    arrived: out.arrived,
                    head_at: tokio::time::Instant::now(),
                    queue_wait,
                    status: parts.status.as_u16(),
                    metrics: gw.metrics.clone(),
                };
                let body = GatewayBody::Relay {
                    inner: RelayBody::new(body, guard, sse, exchange),
                };
                return Ok(Response::from_parts(parts, body));
            }
            Err(err) => {
                m.backends
                    .upstream_errors
                    .with_label_values(&[&backend.name, "connect"])
                    .inc();
                if !last {
                    m.backends.retries.with_label_values(&[&backend.name]).inc();
                }
                if backend.set_health(Health::Down) != Health::Down {
                    tracing::warn!(backend = %backend.name, error = %err, attempt,
                        "backend unreachable; marked down");
                }
                if last {
                    return Err(GatewayError::Upstream {
                        backend: backend.name.clone(),
                        reason: error_chain(&err),
                    });
                }
            }
        }
        // Release the failed backend's slot before waiting for another one.
        drop(guard);
    }
}

fn is_failover_status(s: StatusCode) -> bool {
    s == StatusCode::BAD_GATEWAY || s == StatusCode::SERVICE_UNAVAILABLE
}

fn is_event_stream(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"))
}

/// A rough hint for `Retry-After`: a second per queued request per slot, within [1, 60] s.
fn retry_hint(pool: &ModelPool) -> Duration {
    let per_slot = pool.queue_len() as u64 / u64::from(pool.total_slots().max(1));
    Duration::from_secs(per_slot.clamp(1, 60))
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut src = err.source();
    while let Some(e) = src {
        s.push_str(": ");
        s.push_str(&e.to_string());
        src = e.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_named_by_connection_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::AUTHORIZATION));
    }
}
