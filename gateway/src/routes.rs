//! Route: match method and path, read the body within its limit, inspect it, and hand the
//! request to [`forward`]. The gateway's own endpoints
//! (`/health`, `/v1/models`) are answered here.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::auth::{endpoint_is_public, AuthError};
use crate::body::{GatewayBody, RequestBody};
use crate::context;
use crate::error::{json_response, GatewayError};
use crate::forward::{forward, strip_gateway_credentials, strip_hop_by_hop, Outbound};
use crate::inspect::inspect;
use crate::job::{Job, MAX_PRIORITY};
use crate::state::Gateway;
use crate::waiting::forward_streaming;

/// Endpoints proxied to a backend: the OpenAI ones and llama-server's native ones, so that
/// llama.cpp-native clients work unchanged through the gateway.
const PROXIED: &[&str] = &[
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/completion",
    "/tokenize",
    "/detokenize",
    "/apply-template",
    "/embedding",
    "/infill",
    "/rerank",
];

/// The `X-Request-Id` header, taken from the client or generated.
pub(crate) static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A client's conversation id, which helps prompt-cache routing when prefixes are ambiguous.
static SESSION_ID: HeaderName = HeaderName::from_static("x-session-id");

/// Endpoints whose prompt the context guard checks.
const GENERATION: &[&str] = &["/v1/chat/completions", "/v1/completions", "/completion"];

/// The gateway's own endpoints.
const OWN: &[&str] = &["/health", "/v1/models", "/metrics"];

/// Serve one request from `peer`. Never fails: gateway errors become OpenAI error responses.
pub async fn handle(
    gw: Arc<Gateway>,
    mut req: Request<RequestBody>,
    peer: SocketAddr,
) -> Response<GatewayBody> {
    let arrived = tokio::time::Instant::now();
    let id = request_id(req.headers());
    let id_header = HeaderValue::from_str(&id).ok();
    if let Some(v) = &id_header {
        req.headers_mut().insert(REQUEST_ID.clone(), v.clone());
    }
    let endpoint = endpoint_label(req.uri().path());
    let authorized = authorize(&gw, &req, peer);
    if let Ok(Some(key)) = &authorized {
        gw.metrics.requests.by_key.with_label_values(&[key]).inc();
    }
    // If the client goes away before an answer exists, the server drops this future: the
    // guard still leaves a trace (status 499, as nginx logs it).
    let mut unanswered = Unanswered {
        gw: &gw,
        id: &id,
        endpoint,
        armed: true,
    };
    let routed = match authorized {
        Ok(key) => route(&gw, req, &id, endpoint, arrived, key.as_deref()).await,
        Err(e) => Err(e),
    };
    unanswered.armed = false;
    let mut resp = match routed {
        Ok(resp) => resp,
        Err(err) => {
            tracing::info!(target: "access", request_id = %id, endpoint, status = err.status().as_u16(), code = err.code(), error = %err, "request refused by the gateway");
            let status = err.status().as_u16().to_string();
            gw.metrics
                .requests
                .requests
                .with_label_values(&["", "", endpoint, &status])
                .inc();
            err.into_response()
        }
    };
    if let Some(v) = id_header {
        resp.headers_mut().insert(REQUEST_ID.clone(), v);
    }
    resp
}

/// Records a request whose client left before it was answered.
struct Unanswered<'a> {
    gw: &'a Gateway,
    id: &'a str,
    endpoint: &'static str,
    armed: bool,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if self.armed {
            tracing::info!(target: "access", request_id = %self.id, endpoint = self.endpoint, status = 499u16, "client went away before the response");
            self.gw
                .metrics
                .requests
                .requests
                .with_label_values(&["", "", self.endpoint, "499"])
                .inc();
        }
    }
}

/// Check the request's key for what it asks. Returns the key's name (for logs and
/// metrics), or `None` when no key is needed.
fn authorize(
    gw: &Gateway,
    req: &Request<RequestBody>,
    peer: SocketAddr,
) -> Result<Option<String>, GatewayError> {
    let cfg = &gw.config();
    let path = req.uri().path();
    let keys = if path.starts_with("/admin/") {
        if cfg.admin_keys.is_open() {
            return Err(GatewayError::AdminDisabled);
        }
        &cfg.admin_keys
    } else if cfg.keys.is_open()
        || ((path == "/health" || path == "/metrics")
            && endpoint_is_public(cfg.public_health_metrics, peer))
    {
        return Ok(None);
    } else {
        &cfg.keys
    };
    match keys.check(req.headers()) {
        Ok(name) => Ok(Some(name.to_string())),
        Err(e) => {
            let reason = match e {
                AuthError::Missing => "missing",
                AuthError::Invalid => "invalid",
            };
            gw.metrics
                .requests
                .auth_failures
                .with_label_values(&[reason])
                .inc();
            Err(GatewayError::Unauthorized(match e {
                AuthError::Missing => {
                    "no API key: send Authorization: Bearer KEY (or x-api-key: KEY)"
                }
                AuthError::Invalid => "the API key is not valid here",
            }))
        }
    }
}

/// At most `max` characters of client-supplied text, for error messages.
fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// The client's request id when it is short printable ASCII, else a fresh one.
// Out of line, so that a profile of the whole-program-optimised release build names
// it (loadtest/bench/instructions.sh breaks the gateway's work down by function).
#[inline(never)]
fn request_id(headers: &http::HeaderMap) -> String {
    if let Some(v) = headers.get(&REQUEST_ID).and_then(|v| v.to_str().ok()) {
        if !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()) {
            return v.to_string();
        }
    }
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static SEED: OnceLock<u64> = OnceLock::new();
    // Unique within the process; the start time makes ids differ across restarts.
    let seed = *SEED.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    generated_id(seed, NEXT.fetch_add(1, Ordering::Relaxed))
}

/// `format!("{seed:016x}-{n:08x}")`, without the formatting machinery on every request.
fn generated_id(seed: u64, n: u64) -> String {
    let mut id = String::with_capacity(25);
    push_hex(&mut id, seed, 16);
    id.push('-');
    push_hex(&mut id, n, 8.max(hex_digits(n)));
    id
}

/// Hexadecimal digits needed for `n` (at least one).
fn hex_digits(n: u64) -> usize {
    (16 - n.leading_zeros() as usize / 4).max(1)
}

/// Append the last `width` hexadecimal digits of `n`, lowercase, zero-padded.
fn push_hex(out: &mut String, n: u64, width: usize) {
    for i in (0..width).rev() {
        let d = (n >> (4 * i)) & 0xf;
        out.push(char::from_digit(d as u32, 16).expect("a hex digit"));
    }
}

/// The endpoint as a metrics label: one of the known paths, or "other", so that clients
/// cannot create label values.
fn endpoint_label(path: &str) -> &'static str {
    PROXIED
        .iter()
        .chain(OWN.iter())
        .find(|p| **p == path)
        .copied()
        .unwrap_or("other")
}

async fn route(
    gw: &Arc<Gateway>,
    req: Request<RequestBody>,
    id: &str,
    endpoint: &'static str,
    arrived: tokio::time::Instant,
    key: Option<&str>,
) -> Result<Response<GatewayBody>, GatewayError> {
    let path = req.uri().path();
    let method = req.method();
    if let Some(rest) = path.strip_prefix("/admin/") {
        return admin(gw, method, rest);
    }
    let allow = if PROXIED.contains(&path) {
        if method == Method::POST {
            return proxy(gw, req, id, endpoint, arrived, key).await;
        }
        "POST"
    } else if OWN.contains(&path) {
        if method == Method::GET || method == Method::HEAD {
            return Ok(match path {
                "/health" => health(gw),
                "/metrics" => metrics(gw),
                _ => models(gw),
            });
        }
        "GET"
    } else {
        return Err(GatewayError::NotFound(clip(path, 200)));
    };
    Err(GatewayError::MethodNotAllowed {
        method: clip(method.as_str(), 32),
        path: clip(path, 200),
        allow,
    })
}

async fn proxy(
    gw: &Arc<Gateway>,
    req: Request<RequestBody>,
    id: &str,
    endpoint: &'static str,
    arrived: tokio::time::Instant,
    key: Option<&str>,
) -> Result<Response<GatewayBody>, GatewayError> {
    let cfg = gw.config();
    let limit = cfg.max_body_bytes;
    let (parts, body) = req.into_parts();
    // Refuse an announced oversize body before reading any of it.
    let announced = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return Err(GatewayError::BodyTooLarge { limit });
    }
    // Bounded in time as well as size: a client that sends its headers and then trickles
    // or withholds the body would otherwise hold its connection for ever.
    let wait = cfg.body_read_timeout;
    let budget = (&gw.body_budget, cfg.max_buffered_body_bytes);
    let (body, body_claim) = tokio::time::timeout(wait, read_body(body, limit, budget))
        .await
        .map_err(|_| GatewayError::BodyTimeout(wait))??;
    let seen = inspect(&body).map_err(GatewayError::InvalidRequest)?;
    let pool = gw
        .resolve(seen.model.as_deref())
        .map_err(|name| match name {
            Some(name) => GatewayError::ModelNotFound(clip(&name, 64)),
            None => GatewayError::InvalidRequest(
                "the request names no model, and several are served here: set `model` \
                 (GET /v1/models lists them)"
                    .into(),
            ),
        })?;
    let stream = seen.stream;
    let generation = GENERATION.contains(&endpoint);
    if cfg.context_guard && generation {
        context::check(gw, &pool, &body).await?;
    }
    let priority = priority(&cfg, &parts.headers, key);
    // Reading the prompt is a second pass over the body; only a policy that uses it pays.
    let job = if generation && pool.reads_prompt() {
        let session = parts.headers.get(&SESSION_ID).and_then(|v| v.to_str().ok());
        Job::from_body(&body, session, priority)
    } else {
        Job {
            priority,
            ..Job::default()
        }
    };
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    // Let in on one of the gateway's keys: decided by the check that let it in, so a
    // reload in between cannot change the answer.
    if key.is_some() {
        strip_gateway_credentials(&mut headers);
    }
    let out = Outbound {
        request_id: id.to_string(),
        endpoint,
        arrived,
        method: parts.method,
        path_and_query: parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
        headers,
        body,
        body_claim,
        job: Arc::new(job),
        place: None,
    };
    match cfg.queue_comments {
        Some(every) if stream && generation => {
            forward_streaming(gw.clone(), pool, out, every).await
        }
        _ => forward(gw, &pool, out).await,
    }
}

/// Read a request body of at most `limit` bytes, claiming each piece from the gateway's
/// budget for request bytes in memory (`budget`: the semaphore and its configured size) as
/// it arrives, so that many large bodies read at once cannot exhaust memory. The claim is
/// held until the request is dropped.
async fn read_body(
    mut body: RequestBody,
    limit: usize,
    (budget, size): (&Arc<Semaphore>, usize),
) -> Result<(Bytes, Option<OwnedSemaphorePermit>), GatewayError> {
    let mut claim: Option<OwnedSemaphorePermit> = None;
    // Nearly every body arrives as one piece, which is kept as it is; more are joined.
    let mut first: Option<Bytes> = None;
    let mut more: Vec<Bytes> = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| GatewayError::BodyRead(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers: not forwarded
        };
        if data.is_empty() {
            continue;
        }
        total += data.len();
        if total > limit {
            return Err(GatewayError::BodyTooLarge { limit });
        }
        let piece = u32::try_from(data.len())
            .ok()
            .and_then(|n| budget.clone().try_acquire_many_owned(n).ok())
            .ok_or(GatewayError::BodyBudget { budget: size })?;
        match &mut claim {
            Some(c) => c.merge(piece),
            None => claim = Some(piece),
        }
        if first.is_none() {
            first = Some(data);
        } else {
            more.push(data);
        }
    }
    let body = match first {
        None => Bytes::new(),
        Some(one) if more.is_empty() => one,
        Some(one) => {
            let mut joined = Vec::with_capacity(total);
            joined.extend_from_slice(&one);
            for piece in &more {
                joined.extend_from_slice(piece);
            }
            Bytes::from(joined)
        }
    };
    Ok((body, claim))
}

/// The request's queue priority: from the trusted header if one is configured and sent,
/// else from its API key's configured priority, else 0.
fn priority(cfg: &crate::config::Config, headers: &http::HeaderMap, key: Option<&str>) -> i32 {
    let from_header = cfg
        .priority_header
        .as_ref()
        .and_then(|h| headers.get(h))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i32>().ok());
    from_header
        .or_else(|| key.and_then(|k| cfg.key_priority.get(k).copied()))
        .unwrap_or(0)
        .clamp(-MAX_PRIORITY, MAX_PRIORITY)
}

/// `GET /health`: 200 when any backend can take work, 503 otherwise, with each backend's
/// state so an operator sees at a glance what is wrong.
fn health(gw: &Gateway) -> Response<GatewayBody> {
    let backends = backends_json(gw);
    let any_up = backends
        .iter()
        .any(|b| b["state"] == "up" && b["held"] == false);
    let mut queues = serde_json::Map::new();
    for pool in gw.pools().iter() {
        queues.insert(pool.id.clone(), json!(pool.queue_len()));
    }
    let ok = any_up && !gw.is_shutting_down();
    let body = json!({
        "status": if ok { "ok" } else { "unavailable" },
        "backends": backends,
        "queued": queues,
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, Bytes::from(body.to_string()))
}

/// Every backend's state, for `/health` and `/admin/backends`.
fn backends_json(gw: &Gateway) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for pool in gw.pools().iter() {
        for b in pool.backends().iter() {
            out.push(json!({
                "name": b.name,
                "model": pool.id,
                "url": b.base.to_string(),
                "state": b.health().as_str(),
                "slots": b.slots(),
                "inflight": b.inflight(),
                "busy": b.busy(),
                "held": b.is_held(),
                "dialect": b.dialect.get().as_str(),
            }));
        }
    }
    out
}

/// The admin endpoints: `GET /admin/backends`, and `POST /admin/backends/NAME/drain` or
/// `/resume` to hold a backend out of rotation (its running requests finish) or return it.
fn admin(gw: &Gateway, method: &Method, rest: &str) -> Result<Response<GatewayBody>, GatewayError> {
    let parts: Vec<&str> = rest.split('/').collect();
    match (method, parts.as_slice()) {
        (&Method::GET, ["backends"]) => Ok(json_response(
            StatusCode::OK,
            Bytes::from(json!({ "backends": backends_json(gw) }).to_string()),
        )),
        (&Method::POST, ["backends", name, action @ ("drain" | "resume")]) => {
            let found = gw.pools().iter().find_map(|p| {
                p.backends()
                    .iter()
                    .find(|b| b.name == *name)
                    .map(|b| (p.clone(), b.clone()))
            });
            let Some((pool, backend)) = found else {
                return Err(GatewayError::BackendNotFound(clip(name, 64)));
            };
            let hold = *action == "drain";
            backend.set_held(hold);
            if !hold {
                pool.dispatch_waiting();
            }
            tracing::info!(backend = %backend.name, action, "admin changed a backend's rotation");
            let body =
                json!({ "backend": backend.name, "held": hold, "inflight": backend.inflight() });
            Ok(json_response(StatusCode::OK, Bytes::from(body.to_string())))
        }
        (_, ["backends"]) => Err(GatewayError::MethodNotAllowed {
            method: method.to_string(),
            path: "/admin/backends".into(),
            allow: "GET",
        }),
        (_, ["backends", _, "drain" | "resume"]) => Err(GatewayError::MethodNotAllowed {
            method: method.to_string(),
            path: format!("/admin/{}", clip(rest, 64)),
            allow: "POST",
        }),
        _ => Err(GatewayError::NotFound(format!("/admin/{}", clip(rest, 64)))),
    }
}

/// `GET /metrics`: Prometheus text format.
fn metrics(gw: &Gateway) -> Response<GatewayBody> {
    let mut resp = Response::new(GatewayBody::full(gw.metrics.render(gw)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// `GET /v1/models`: every configured id and alias, in OpenAI list format.
fn models(gw: &Gateway) -> Response<GatewayBody> {
    let mut data = Vec::new();
    for m in &gw.config().models {
        let entry = |id: &str| {
            json!({
                "id": id,
                "object": "model",
                "created": 0,
                "owned_by": "bitnet-gateway",
                "root": m.id,
                "aliases": m.aliases,
            })
        };
        data.push(entry(&m.id));
        data.extend(m.aliases.iter().map(|a| entry(a)));
    }
    let body = json!({ "object": "list", "data": data });
    json_response(StatusCode::OK, Bytes::from(body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_request_ids_are_the_seed_and_counter_in_padded_hex() {
        for (seed, n) in [
            (0, 0),
            (0x18eb_a6f9_19c4_db34, 0x6284),
            (0xf, 0xffff_ffff),
            (1, 0x1_0000_0000),
            (u64::MAX, u64::MAX),
        ] {
            assert_eq!(generated_id(seed, n), format!("{seed:016x}-{n:08x}"));
        }
    }
}
