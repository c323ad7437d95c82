//! Prometheus metrics: one struct per component, registered on a [`Registry`] (no global
//! macros), exposed at `GET /metrics`.
//!
//! Gauges that mirror live state (in-flight, slots, up, queue depth) are not updated on the
//! hot path: they are read from the backends' atomics when Prometheus scrapes.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::backend::Health;
use crate::state::Gateway;

/// Buckets for time to first token and request duration on CPU backends: from a cached
/// prompt (well under a second) to minutes of prompt evaluation.
const LATENCY_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
const QUEUE_BUCKETS: &[f64] = &[
    0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
const RATE_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 50.0, 100.0, 500.0, 2000.0,
];

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

/// Per-request figures, recorded once when a relayed response ends.
#[derive(Debug, Clone)]
pub struct RequestMetrics {
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub ttft: HistogramVec,
    pub prompt_tokens: IntCounterVec,
    pub cached_tokens: IntCounterVec,
    pub completion_tokens: IntCounterVec,
    pub tokens_per_second: HistogramVec,
    pub by_key: IntCounterVec,
    pub auth_failures: IntCounterVec,
}

impl RequestMetrics {
    /// Register on `r`.
    pub fn register(r: &Registry) -> RequestMetrics {
        RequestMetrics {
            requests: counter(r, "bitnet_gateway_requests_total", "Requests by backend, model, endpoint and HTTP status (backend is empty when the gateway answered itself).", &["backend", "model", "endpoint", "status"]),
            duration: histogram(r, "bitnet_gateway_request_duration_seconds", "Time from a request's arrival to the end of its response body.", &["backend", "model", "endpoint"], LATENCY_BUCKETS),
            ttft: histogram(r, "bitnet_gateway_time_to_first_token_seconds", "Time from arrival to the first content-bearing chunk (streams) or to the response head (non-streaming).", &["backend", "model"], LATENCY_BUCKETS),
            prompt_tokens: counter(r, "bitnet_gateway_prompt_tokens_total", "Prompt tokens, as reported by the backend, including cached ones.", &["backend", "model"]),
            cached_tokens: counter(r, "bitnet_gateway_prompt_tokens_cached_total", "Prompt tokens the backend served from its prompt cache.", &["backend", "model"]),
            completion_tokens: counter(r, "bitnet_gateway_completion_tokens_total", "Generated tokens, as reported by the backend (or counted content chunks when it reports none).", &["backend", "model"]),
            by_key: counter(r, "bitnet_gateway_requests_by_key_total", "Requests that presented a valid key, by the key's configured name.", &["key"]),
            auth_failures: counter(r, "bitnet_gateway_auth_failures_total", "Requests refused for their key: reason is missing or invalid.", &["reason"]),
            tokens_per_second: histogram(r, "bitnet_gateway_generation_tokens_per_second", "Each request's decode rate: llama-server's predicted_per_second, or completion tokens over the time after the first token.", &["backend", "model"], RATE_BUCKETS),
        }
    }
}

/// Queue figures per model.
#[derive(Debug, Clone)]
pub struct QueueMetrics {
    pub depth: IntGaugeVec,
    pub wait: HistogramVec,
    pub rejected: IntCounterVec,
}

impl QueueMetrics {
    /// Register on `r`.
    pub fn register(r: &Registry) -> QueueMetrics {
        QueueMetrics {
            depth: gauge(
                r,
                "bitnet_gateway_queue_depth",
                "Requests waiting for a slot now.",
                &["model"],
            ),
            wait: histogram(
                r,
                "bitnet_gateway_queue_wait_seconds",
                "Time admitted requests waited for a slot (0 when one was free).",
                &["model"],
                QUEUE_BUCKETS,
            ),
            rejected: counter(
                r,
                "bitnet_gateway_queue_rejected_total",
                "Requests refused by admission: reason is full, timeout or no_backend.",
                &["model", "reason"],
            ),
        }
    }
}

/// Backend state and upstream trouble.
#[derive(Debug, Clone)]
pub struct BackendMetrics {
    pub inflight: IntGaugeVec,
    pub slots: IntGaugeVec,
    pub up: IntGaugeVec,
    pub upstream_errors: IntCounterVec,
    pub retries: IntCounterVec,
    pub client_disconnects: IntCounterVec,
}

impl BackendMetrics {
    /// Register on `r`.
    pub fn register(r: &Registry) -> BackendMetrics {
        BackendMetrics {
            inflight: gauge(r, "bitnet_gateway_backend_inflight", "Requests holding a slot on the backend now.", &["backend"]),
            slots: gauge(r, "bitnet_gateway_backend_slots", "The backend's slot count (configured or read from /props).", &["backend"]),
            up: gauge(r, "bitnet_gateway_backend_up", "1 when the backend is healthy and routed to, else 0.", &["backend"]),
            upstream_errors: counter(r, "bitnet_gateway_upstream_errors_total", "Failures talking to a backend: kind is connect, status_502, status_503 or broken_stream.", &["backend", "kind"]),
            retries: counter(r, "bitnet_gateway_retries_total", "Requests retried on another backend after this one failed before the first byte.", &["backend"]),
            client_disconnects: counter(r, "bitnet_gateway_client_disconnects_total", "Responses abandoned by the client before they ended.", &["backend"]),
        }
    }
}

/// Signed error buckets: predicted time to first token subtracted from the actual one.
const ERROR_BUCKETS: &[f64] = &[
    -60.0, -30.0, -10.0, -5.0, -2.0, -1.0, -0.5, -0.1, 0.0, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
    60.0,
];

/// What predicted-TTFT routing decided and how well it predicted.
#[derive(Debug, Clone)]
pub struct RoutingMetrics {
    pub affinity: IntCounterVec,
    pub ttft_error: HistogramVec,
    pub predicted_cached: IntCounterVec,
}

impl RoutingMetrics {
    /// Register on `r`.
    pub fn register(r: &Registry) -> RoutingMetrics {
        RoutingMetrics {
            affinity: counter(r, "bitnet_gateway_affinity_decisions_total", "Routing decisions where some backend held more of the prompt in cache than another: taken (sent to a backend holding the longest prefix) or overridden (a colder, idler backend was predicted to answer sooner).", &["model", "decision"]),
            ttft_error: histogram(r, "bitnet_gateway_ttft_prediction_error_seconds", "Actual minus predicted time to first token, from the slot being claimed (predicted-ttft policy only). Positive: slower than predicted.", &["backend"], ERROR_BUCKETS),
            predicted_cached: counter(r, "bitnet_gateway_predicted_cached_tokens_total", "Prompt tokens the routing predicted the backend would take from its cache; compare with bitnet_gateway_prompt_tokens_cached_total, which the backend reports.", &["backend"]),
        }
    }
}

/// All of the gateway's metrics and the registry they live on.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub requests: RequestMetrics,
    pub queue: QueueMetrics,
    pub backends: BackendMetrics,
    pub routing: RoutingMetrics,
}

impl Metrics {
    /// A fresh registry with every gateway metric and the process collector.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process collector registers once");
        Metrics {
            requests: RequestMetrics::register(&registry),
            queue: QueueMetrics::register(&registry),
            backends: BackendMetrics::register(&registry),
            routing: RoutingMetrics::register(&registry),
            registry,
        }
    }

    /// Prometheus text exposition, with live gauges read from the gateway's state.
    pub fn render(&self, gw: &Gateway) -> String {
        for pool in gw.pools().iter() {
            self.queue
                .depth
                .with_label_values(&[&pool.id])
                .set(pool.queue_len() as i64);
            for b in pool.backends().iter() {
                let l = [b.name.as_str()];
                self.backends
                    .inflight
                    .with_label_values(&l)
                    .set(i64::from(b.inflight()));
                self.backends
                    .slots
                    .with_label_values(&l)
                    .set(i64::from(b.slots()));
                self.backends
                    .up
                    .with_label_values(&l)
                    .set(i64::from(b.health() == Health::Up));
            }
        }
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(out).expect("exposition is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
