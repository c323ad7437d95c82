//! Forward: send the request to the backend that holds our slot, over a pooled keep-alive
//! connection, and fail over to another backend while nothing has reached the client yet.
//!
//! Failover is safe only before the response head is passed on: after that the client has
//! seen bytes and a retry would duplicate or splice output. Connection errors and 502/503
//! answers therefore mark the backend unhealthy, release the slot, and admit again (the
//! unhealthy backend is no longer routable, so the retry lands elsewhere or waits).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use tokio::sync::OwnedSemaphorePermit;

use crate::admit::{admit, Admission};
use crate::backend::Health;
use crate::body::GatewayBody;
use crate::config::Config;
use crate::dialect::bitnet::{self, SseFixer};
use crate::dialect::Dialect;
use crate::error::json_response;
use crate::error::GatewayError;
use crate::job::Job;
use crate::pool::ModelPool;
use crate::pool::SlotGuard;
use crate::relay::{Exchange, RelayBody};
use crate::state::Gateway;
use crate::tls::{upstream_tls, TlsError};

mod client;
mod h1;
pub use client::{set_shard, BodyError, UpstreamBody, UpstreamClient, UpstreamError};
pub use h1::FramingError;

/// Build the upstream client.
pub fn upstream_client(cfg: &Config) -> Result<UpstreamClient, TlsError> {
    let tls = upstream_tls(cfg.upstream_ca_file.as_deref())?;
    // llama-server closes idle keep-alive connections after 5 s; dropping ours first
    // avoids sending a request into a connection the server is closing.
    Ok(UpstreamClient::new(
        tls,
        cfg.connect_timeout,
        Duration::from_secs(4),
    ))
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
    pub path_and_query: http::uri::PathAndQuery,
    /// End-to-end headers of the client request.
    pub headers: HeaderMap,
    /// The whole body, already read (and cheap to clone).
    pub body: Bytes,
    /// The body's share of `limits.max_buffered_body_bytes`, returned when the request is
    /// dropped: once its backend has answered, or it has failed.
    pub body_claim: Option<OwnedSemaphorePermit>,
    /// What routing knows about the request.
    pub job: Arc<Job>,
    /// Set to the request's queue id (plus one) while it waits, for `: queued` comments.
    pub place: Option<Arc<AtomicU64>>,
}

// Built once: `from_static` checks the name each time it runs outside a constant.
static X_BACKEND: HeaderName = HeaderName::from_static("x-backend");
static X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");

/// Headers that describe one connection, not the message, and so never cross the proxy.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Remove the headers that carry a client's gateway API key (`Authorization` and
/// `x-api-key`, as [`crate::auth::KeySet::check`] reads them). For a gateway that checks
/// keys, the request has been let in on one of its own secrets: no backend needs it, and a
/// plain-http backend would carry it across the network. An open gateway (no keys) leaves
/// them alone: there they are the client's, perhaps for a backend's own `--api-key`.
pub fn strip_gateway_credentials(headers: &mut HeaderMap) {
    headers.remove(header::AUTHORIZATION);
    headers.remove(&crate::auth::X_API_KEY);
}

/// Remove hop-by-hop headers, including any the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names is cheaper than hashing each of
    // the eight for a removal that finds nothing.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        // The gateway sets `X-Request-Id` itself, for the backend's logs to match its
        // own: a client cannot name it away.
        .filter(|n| n != crate::routes::REQUEST_ID)
        .collect();
    for h in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(h);
    }
}

/// Whether `name` is one of [`HOP_BY_HOP`]: one match on its text, which costs a tenth of
/// comparing it with each of the eight in turn.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

impl Outbound {
    /// The OpenAI generation endpoints, whose bodies the BitNet rewrites apply to.
    fn is_openai_generation(&self) -> bool {
        matches!(self.endpoint, "/v1/chat/completions" | "/v1/completions")
    }

    fn to_request(&self, uri: http::Uri, body: Bytes) -> Request<Bytes> {
        let mut req = Request::new(body);
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
    // One snapshot for the whole request: a reload meanwhile applies to the next one.
    let cfg = gw.config();
    let max_attempts = cfg.max_attempts;
    let m = &gw.metrics;
    let mut attempt = 0;
    // Why the previous attempt failed, if one did.
    let mut failure: Option<GatewayError> = None;
    loop {
        attempt += 1;
        if gw.is_shutting_down() {
            return Err(GatewayError::ShuttingDown);
        }
        let admission = admit(pool, out.job.clone(), out.place.as_deref()).await;
        let reason = match &admission {
            Admission::Admitted { .. } => None,
            Admission::QueueFull { .. } => Some("full"),
            Admission::WontStart { .. } => Some("predicted_wait"),
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
            Admission::WontStart { eta } => {
                let timeout = pool.limits().timeout;
                return Err(GatewayError::QueueWait {
                    model: pool.id.clone(),
                    eta,
                    timeout,
                    // When enough of the queue ahead should have drained for a retry to
                    // start within the timeout.
                    retry_after: eta.saturating_sub(timeout).max(Duration::from_secs(1)),
                });
            }
            Admission::TimedOut { waited } => {
                return Err(GatewayError::QueueTimeout {
                    model: pool.id.clone(),
                    waited,
                    retry_after: retry_hint(pool),
                })
            }
            // After a failed attempt, that failure explains more than "no backend left".
            Admission::NoBackend => {
                return Err(failure.unwrap_or_else(|| GatewayError::NoBackend(pool.id.clone())))
            }
        };
        let backend = guard.backend().clone();
        if let Some(a) = guard.plan().and_then(|p| p.affinity) {
            m.routing
                .affinity
                .with_label_values(&[&pool.id, a.as_str()])
                .inc();
        }
        let bitnet = backend.dialect.get() == Dialect::Bitnet;
        let mut dropped_tools = false;
        let mut body = if bitnet && out.is_openai_generation() {
            let r =
                bitnet::rewrite_request(&out.body, &pool.id, cfg.tools).map_err(|e| match e {
                    bitnet::RewriteError::ToolsUnsupported => {
                        GatewayError::ToolsUnsupported(e.to_string())
                    }
                    bitnet::RewriteError::NotAnObject(_) => {
                        GatewayError::InvalidRequest(e.to_string())
                    }
                })?;
            dropped_tools = r.dropped_tools;
            r.body
        } else {
            out.body.clone()
        };
        if let Some(slot) = guard.pin_slot() {
            body = pin_to_slot(&body, slot);
        }
        let req = out.to_request(backend.uri_for_parsed(&out.path_and_query), body);
        let last = attempt >= max_attempts;
        let sent = tokio::time::timeout(cfg.first_byte_timeout, gw.client.request(req)).await;
        let Ok(sent) = sent else {
            // Hung before answering: another backend may do better.
            m.backends
                .upstream_errors
                .with_label_values(&[&backend.name, "first_byte_timeout"])
                .inc();
            backend.set_health(Health::Down);
            tracing::warn!(backend = %backend.name, attempt, timeout = ?cfg.first_byte_timeout,
                "backend sent no response head in time; marked down");
            if last {
                return Err(GatewayError::UpstreamTimeout {
                    backend: backend.name.clone(),
                    waited: cfg.first_byte_timeout,
                });
            }
            m.backends.retries.with_label_values(&[&backend.name]).inc();
            failure = Some(GatewayError::UpstreamTimeout {
                backend: backend.name.clone(),
                waited: cfg.first_byte_timeout,
            });
            drop(guard);
            continue;
        };
        match sent {
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
                let ctx = RespondCtx {
                    queue_wait,
                    bitnet,
                    dropped_tools,
                    first_byte_timeout: cfg.first_byte_timeout,
                    idle_timeout: cfg.upstream_idle_timeout,
                };
                return respond(gw, guard, resp, &out, ctx).await;
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
                let err = GatewayError::Upstream {
                    backend: backend.name.clone(),
                    reason: error_chain(&err),
                };
                if last {
                    return Err(err);
                }
                failure = Some(err);
            }
        }
        // Release the failed backend's slot before waiting for another one.
        drop(guard);
    }
}

/// What [`respond`] needs to know about the attempt.
struct RespondCtx {
    queue_wait: Duration,
    bitnet: bool,
    dropped_tools: bool,
    /// From the request's configuration snapshot: the longest silences before the first
    /// data and between later data.
    first_byte_timeout: Duration,
    idle_timeout: Duration,
}

/// Largest non-streaming body from a BitNet backend read whole to check it for errors.
const MAX_BUFFERED: usize = 16 * 1024 * 1024;

/// Turn the backend's response head into the client's response, with the relay body.
///
/// For the older BitNet server the body is looked at first: a non-streaming body is read
/// whole (it is small, and the server reports some errors with status 200), and a stream's
/// first event is awaited, so that an error it reports before any content becomes a proper
/// HTTP error while nothing has reached the client yet.
async fn respond(
    gw: &Arc<Gateway>,
    guard: SlotGuard,
    resp: Response<UpstreamBody>,
    out: &Outbound,
    ctx: RespondCtx,
) -> Result<Response<GatewayBody>, GatewayError> {
    let backend = guard.backend().clone();
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let sse = is_event_stream(&parts.headers);
    let mut upstream = Some(body);
    let mut prefix = None;
    let mut fixer = None;
    if ctx.bitnet {
        let mut body = upstream.take().expect("set above");
        let upstream_err = |e: BodyError| GatewayError::Upstream {
            backend: backend.name.clone(),
            reason: error_chain(&e),
        };
        if sse {
            let (first, ended) =
                tokio::time::timeout(ctx.first_byte_timeout, first_event(&mut body))
                    .await
                    .map_err(|_| GatewayError::UpstreamTimeout {
                        backend: backend.name.clone(),
                        waited: ctx.first_byte_timeout,
                    })?
                    .map_err(upstream_err)?;
            if let Some(err) = bitnet_error_event(&first) {
                return Ok(normalised_response(err, &backend.name));
            }
            prefix = Some(first);
            fixer = Some(SseFixer::default());
            upstream = (!ended).then_some(body);
        } else {
            let bytes = Limited::new(body, MAX_BUFFERED)
                .collect()
                .await
                .map_err(|e| GatewayError::Upstream {
                    backend: backend.name.clone(),
                    reason: e.to_string(),
                })?
                .to_bytes();
            let status = parts.status.as_u16();
            if status >= 400 || has_error_member(&bytes) {
                if let Some(err) = bitnet::normalise_error(status, &bytes) {
                    return Ok(normalised_response(err, &backend.name));
                }
            }
            prefix = Some(bytes);
        }
    }
    if sse {
        // Keep every proxy and cache between us and the client from holding tokens back.
        parts
            .headers
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        parts
            .headers
            .insert(X_ACCEL_BUFFERING.clone(), HeaderValue::from_static("no"));
    }
    if fixer.is_some() {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    if let Some(v) = &backend.name_header {
        parts.headers.insert(X_BACKEND.clone(), v.clone());
    }
    if ctx.dropped_tools {
        tracing::warn!(request_id = %out.request_id, backend = %backend.name,
            "dropped `tools` from a request: the backend has no tool calling");
        parts.headers.insert(
            HeaderName::from_static("x-gateway-warning"),
            HeaderValue::from_static(
                "tools and tool_choice were dropped: this model's backend has no tool calling",
            ),
        );
    }
    let exchange = Exchange {
        request_id: out.request_id.clone(),
        endpoint: out.endpoint,
        arrived: out.arrived,
        head_at: tokio::time::Instant::now(),
        queue_wait: ctx.queue_wait,
        status: parts.status.as_u16(),
        metrics: gw.metrics.clone(),
    };
    let body = GatewayBody::Relay {
        inner: RelayBody::new(
            upstream,
            prefix,
            fixer,
            guard,
            sse,
            exchange,
            (ctx.first_byte_timeout, ctx.idle_timeout),
        ),
    };
    Ok(Response::from_parts(parts, body))
}

/// The body with `"id_slot":N,"cache_prompt":true` added at the front of its top-level
/// object, so that the backend runs it on the slot that holds its prefix and reuses it.
/// Members the client wrote itself come later and so win (`id_slot` is never added over
/// the client's own, see [`Job::can_pin`]). A body that is not an object is left alone.
pub fn pin_to_slot(body: &Bytes, slot: u32) -> Bytes {
    let start = body.iter().position(|b| !b.is_ascii_whitespace());
    let Some(i) = start.filter(|&i| body[i] == b'{') else {
        return body.clone();
    };
    let rest = &body[i + 1..];
    let empty = rest
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'}');
    let member = format!(
        "\"id_slot\":{slot},\"cache_prompt\":true{}",
        if empty { "" } else { "," }
    );
    let mut out = BytesMut::with_capacity(body.len() + member.len());
    out.extend_from_slice(&body[..=i]);
    out.extend_from_slice(member.as_bytes());
    out.extend_from_slice(rest);
    out.freeze()
}

/// Read frames until the first whole SSE event (or the end). Returns the bytes read and
/// whether the body ended.
async fn first_event(body: &mut UpstreamBody) -> Result<(Bytes, bool), BodyError> {
    let mut buf = BytesMut::new();
    // A first event larger than this is not an error report; stop looking.
    const MAX_PEEK: usize = 64 * 1024;
    while buf.len() < MAX_PEEK && !has_event_end(&buf) {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
            Some(Err(e)) => return Err(e),
            None => return Ok((buf.freeze(), true)),
        }
    }
    Ok((buf.freeze(), false))
}

fn has_event_end(b: &[u8]) -> bool {
    b.windows(2).any(|w| w == b"\n\n") || b.windows(4).any(|w| w == b"\r\n\r\n")
}

/// If the first event is the fork's `error: {…}` line, its error object.
fn bitnet_error_event(first: &[u8]) -> Option<bitnet::NormalisedError> {
    let line = first
        .split(|&b| b == b'\n')
        .find(|l| !l.is_empty() && !l.starts_with(b":"))?;
    let rest = line.strip_prefix(b"error:")?;
    let rest = rest.strip_suffix(b"\r").unwrap_or(rest);
    bitnet::normalise_error(200, rest)
}

fn has_error_member(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct E {
        error: Option<serde::de::IgnoredAny>,
    }
    serde_json::from_slice::<E>(body).is_ok_and(|e| e.error.is_some())
}

fn normalised_response(err: bitnet::NormalisedError, backend: &str) -> Response<GatewayBody> {
    let status = StatusCode::from_u16(err.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut resp = json_response(status, err.body);
    if let Ok(v) = HeaderValue::from_str(backend) {
        resp.headers_mut().insert(X_BACKEND.clone(), v);
    }
    resp
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
    fn pinning_adds_the_slot_before_the_clients_own_members() {
        let pinned = pin_to_slot(
            &Bytes::from_static(b"  {\"model\":\"m\",\"cache_prompt\":false}"),
            3,
        );
        let v: serde_json::Value = serde_json::from_slice(&pinned).unwrap();
        assert_eq!(v["id_slot"], 3);
        assert_eq!(v["model"], "m");
        // serde_json keeps the last of duplicate keys, as llama-server's parser does.
        assert_eq!(v["cache_prompt"], false);
        let v: serde_json::Value =
            serde_json::from_slice(&pin_to_slot(&Bytes::from_static(b"{ }"), 0)).unwrap();
        assert_eq!(v, serde_json::json!({"id_slot": 0, "cache_prompt": true}));
        assert_eq!(&pin_to_slot(&Bytes::from_static(b"[1]"), 1)[..], b"[1]");
    }

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

        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("x-request-id"));
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.get("x-request-id").unwrap(), "abc");
        assert!(!h.contains_key(header::CONNECTION));

        for name in &HOP_BY_HOP {
            assert!(is_hop_by_hop(name), "{name}");
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_static("x"));
            h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
            strip_hop_by_hop(&mut h);
            assert_eq!(h.keys().collect::<Vec<_>>(), [header::ACCEPT], "{name}");
        }
        assert!(!is_hop_by_hop(&header::AUTHORIZATION));
    }

    #[test]
    fn gateway_credentials_are_removed_and_nothing_else() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k"));
        h.append(header::AUTHORIZATION, HeaderValue::from_static("Bearer j"));
        h.insert("x-api-key", HeaderValue::from_static("k"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        strip_gateway_credentials(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["accept", "x-request-id"]);
    }
}
