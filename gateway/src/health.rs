//! Health probing: one background task per backend polls `GET /health` and writes the
//! backend's state. The request path only reads that state.
//!
//! - 200 → `Up` (and the slot count is read from `/props` unless configured);
//! - 503 → `Loading` (llama-server answers "Loading model" while it maps the weights);
//! - connection refused or reset → `Down` at once;
//! - a timeout or another status counts as a failure, and `failure_threshold` failures in
//!   a row mark the backend `Down` — except while it has requests in flight: a CPU box
//!   deep in prompt evaluation can answer `/health` slowly, and its live connections are
//!   better evidence than a slow probe. If the process really dies, those connections
//!   break and the relay marks it down.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tokio::time::Instant;

use crate::backend::{Backend, Health};
use crate::dialect;
use crate::forward::UpstreamClient;
use crate::pool::ModelPool;
use crate::state::Gateway;

/// What one probe saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// 200.
    Ok,
    /// 503: alive, loading.
    Loading,
    /// Any other status.
    BadStatus(u16),
    /// No answer within the probe timeout.
    Timeout,
    /// Refused, reset, or otherwise not connectable.
    Unreachable,
}

/// Start a prober for every backend configured at start.
pub fn spawn_probers(gw: &Arc<Gateway>) {
    for pool in gw.pools().iter() {
        for backend in pool.backends().iter() {
            spawn_prober(gw, pool.clone(), backend.clone());
        }
    }
}

/// Start probing one backend. The task ends when the backend is retired or the gateway
/// stops its background tasks.
pub fn spawn_prober(gw: &Arc<Gateway>, pool: Arc<ModelPool>, backend: Arc<Backend>) {
    gw.spawn_background(probe_loop(gw.clone(), pool, backend));
}

async fn probe_loop(gw: Arc<Gateway>, pool: Arc<ModelPool>, backend: Arc<Backend>) {
    let cfg = &gw.config();
    let mut failures = 0u32;
    let mut next_health_at = Instant::now();
    let mut next_load_at = Instant::now();
    let mut load_source = LoadSource::Metrics;
    while !backend.is_retired() {
        let now = Instant::now();
        if now >= next_health_at {
            next_health_at = now + cfg.health_interval;
            probe_once(&gw, &pool, &backend, &mut failures).await;
        }
        if cfg.remote_load && now >= next_load_at && backend.health() == Health::Up {
            next_load_at = now + cfg.load_interval;
            let own_when_asked = backend.inflight();
            if let Some(busy) =
                read_load(&gw.client, &backend, cfg.health_timeout, &mut load_source).await
            {
                let before = backend.free_slots();
                backend.set_reported_busy(busy, own_when_asked);
                if backend.free_slots() > before {
                    pool.dispatch_waiting();
                }
            }
        }
        let wake = if cfg.remote_load {
            next_health_at.min(next_load_at)
        } else {
            next_health_at
        };
        tokio::time::sleep_until(wake).await;
    }
}

async fn probe_once(gw: &Gateway, pool: &Arc<ModelPool>, backend: &Backend, failures: &mut u32) {
    let cfg = &gw.config();
    let seen = probe(&gw.client, backend, cfg.health_timeout).await;
    if seen == Probe::Ok && backend.health() != Health::Up {
        // Learn slots, context and dialect before admitting work, so the first burst is
        // spread right and rewritten right.
        learn_props(&gw.client, backend, cfg.health_timeout).await;
    }
    let next = next_health(
        backend.health(),
        seen,
        failures,
        cfg.health_failure_threshold,
        backend.inflight(),
    );
    let prev = backend.set_health(next);
    if prev != next {
        tracing::info!(backend = %backend.name, from = prev.as_str(), to = next.as_str(), probe = ?seen, slots = backend.slots(), "backend state changed");
    }
    if next == Health::Up {
        // A backend that came up (or whose slots grew) may serve waiting requests now.
        pool.dispatch_waiting();
    }
}

/// Where a backend's own load figures come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoadSource {
    /// `/metrics`: `requests_processing` + `requests_deferred` (needs `--metrics`).
    Metrics,
    /// `/slots`: slots processing (on by default upstream; `--slots` on the fork).
    Slots,
    /// Neither answers: rely on our own counts.
    None,
}

/// Read how many requests the backend is working on or holding, counting other gateways'.
async fn read_load(
    client: &UpstreamClient,
    backend: &Backend,
    timeout: Duration,
    source: &mut LoadSource,
) -> Option<u32> {
    if *source == LoadSource::Metrics {
        match get(client, backend, "/metrics", timeout).await {
            Ok((StatusCode::OK, body)) => {
                if let Some(n) = load_from_metrics(&body) {
                    return Some(n);
                }
                *source = LoadSource::Slots;
            }
            Ok(_) => *source = LoadSource::Slots,
            Err(_) => return None,
        }
    }
    if *source == LoadSource::Slots {
        match get(client, backend, "/slots", timeout).await {
            Ok((StatusCode::OK, body)) => return load_from_slots(&body),
            Ok(_) => {
                tracing::info!(backend = %backend.name, "backend reports no load (/metrics and /slots are off); using this gateway's own counts");
                *source = LoadSource::None;
            }
            Err(_) => return None,
        }
    }
    None
}

/// `llamacpp:requests_processing` + `llamacpp:requests_deferred` from Prometheus text.
pub fn load_from_metrics(text: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(text).ok()?;
    let mut found = false;
    let mut total = 0.0;
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let (Some(name), Some(value)) = (parts.next(), parts.next()) else {
            continue;
        };
        if name == "llamacpp:requests_processing" || name == "llamacpp:requests_deferred" {
            total += value.parse::<f64>().ok()?;
            found = true;
        }
    }
    found.then(|| total.max(0.0) as u32)
}

/// Slots processing, from upstream's `is_processing` or the fork's `state` (0 = idle).
pub fn load_from_slots(body: &[u8]) -> Option<u32> {
    let slots: Vec<serde_json::Value> = serde_json::from_slice(body).ok()?;
    let busy = slots
        .iter()
        .filter(|s| {
            s.get("is_processing")
                .and_then(|v| v.as_bool())
                .unwrap_or(false)
                || s.get("state")
                    .and_then(|v| v.as_u64())
                    .is_some_and(|v| v != 0)
        })
        .count();
    u32::try_from(busy).ok()
}

/// The state machine: the next health from the current one and a probe result.
pub fn next_health(
    current: Health,
    seen: Probe,
    failures: &mut u32,
    threshold: u32,
    inflight: u32,
) -> Health {
    match seen {
        Probe::Ok => {
            *failures = 0;
            Health::Up
        }
        Probe::Loading => {
            *failures = 0;
            Health::Loading
        }
        Probe::Unreachable => {
            *failures = threshold;
            Health::Down
        }
        Probe::Timeout if inflight > 0 && current == Health::Up => current,
        Probe::Timeout | Probe::BadStatus(_) => {
            *failures = failures.saturating_add(1);
            if *failures >= threshold {
                Health::Down
            } else {
                current
            }
        }
    }
}

async fn get(
    client: &UpstreamClient,
    backend: &Backend,
    path: &str,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), Probe> {
    let req = Request::get(backend.uri_for(path))
        .body(Bytes::new())
        .expect("static request is valid");
    let fut = async {
        let resp = client.request(req).await.map_err(|_| Probe::Unreachable)?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|_| Probe::Unreachable)?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or(Err(Probe::Timeout))
}

/// Probe `GET /health` once.
pub async fn probe(client: &UpstreamClient, backend: &Backend, timeout: Duration) -> Probe {
    match get(client, backend, "/health", timeout).await {
        Ok((StatusCode::OK, _)) => Probe::Ok,
        Ok((StatusCode::SERVICE_UNAVAILABLE, _)) => Probe::Loading,
        Ok((s, _)) => Probe::BadStatus(s.as_u16()),
        Err(p) => p,
    }
}

/// Read `total_slots`, the per-slot `n_ctx` and the dialect from llama-server's `GET /props`.
async fn learn_props(client: &UpstreamClient, backend: &Backend, timeout: Duration) {
    let Ok((StatusCode::OK, body)) = get(client, backend, "/props", timeout).await else {
        return;
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return;
    };
    let int = |v: Option<&serde_json::Value>| {
        v.and_then(|n| n.as_u64())
            .and_then(|n| u32::try_from(n).ok())
    };
    if let Some(n) = int(v.get("total_slots")) {
        backend.set_discovered_slots(n);
    }
    let n_ctx = int(v
        .get("default_generation_settings")
        .and_then(|g| g.get("n_ctx")));
    if let Some(n) = n_ctx.filter(|&n| n > 0) {
        backend.set_n_ctx(n);
    }
    if backend.detect_dialect {
        let d = dialect::detect(&v);
        if backend.dialect.get() != d {
            tracing::info!(backend = %backend.name, dialect = d.as_str(), "detected the backend's API dialect from /props");
        }
        backend.dialect.set(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_connection_marks_down_at_once() {
        let mut f = 0;
        assert_eq!(
            next_health(Health::Up, Probe::Unreachable, &mut f, 3, 0),
            Health::Down
        );
    }

    #[test]
    fn timeouts_mark_down_only_after_the_threshold() {
        let mut f = 0;
        assert_eq!(
            next_health(Health::Up, Probe::Timeout, &mut f, 3, 0),
            Health::Up
        );
        assert_eq!(
            next_health(Health::Up, Probe::Timeout, &mut f, 3, 0),
            Health::Up
        );
        assert_eq!(
            next_health(Health::Up, Probe::Timeout, &mut f, 3, 0),
            Health::Down
        );
        assert_eq!(
            next_health(Health::Down, Probe::Ok, &mut f, 3, 0),
            Health::Up
        );
        assert_eq!(f, 0);
    }

    #[test]
    fn busy_backend_with_slow_health_stays_up() {
        let mut f = 0;
        for _ in 0..10 {
            assert_eq!(
                next_health(Health::Up, Probe::Timeout, &mut f, 3, 1),
                Health::Up
            );
        }
    }

    #[test]
    fn backend_load_is_read_from_metrics_or_slots() {
        let m = b"# HELP x\nllamacpp:requests_processing 2\nllamacpp:requests_deferred 3\nllamacpp:n_decode_total 99\n";
        assert_eq!(load_from_metrics(m), Some(5));
        assert_eq!(load_from_metrics(b"other 1\n"), None);
        let up = br#"[{"id":0,"is_processing":true},{"id":1,"is_processing":false}]"#;
        assert_eq!(load_from_slots(up), Some(1));
        let fork = br#"[{"id":0,"state":1},{"id":1,"state":0},{"id":2,"state":1}]"#;
        assert_eq!(load_from_slots(fork), Some(2));
    }

    #[test]
    fn loading_is_not_up() {
        let mut f = 0;
        assert_eq!(
            next_health(Health::Unknown, Probe::Loading, &mut f, 3, 0),
            Health::Loading
        );
    }
}
