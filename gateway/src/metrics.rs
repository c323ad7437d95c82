//! Prometheus metrics: one struct per component, registered on a [`Registry`] (no global
//! macros), exposed at `GET /metrics`.
//!
//! Gauges that mirror live state (in-flight, slots, up, queue depth) are not updated on the
//! hot path: they are read from the backends' atomics when Prometheus scrapes.

use std::sync::{Arc, OnceLock};

use dashmap::DashMap;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::backend::Health;
use crate::fasthash::FastHash;
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
            cached_tokens: counter(r, "bitnet_gateway_prompt_tokens_cached_total", "Prompt tokens the backend served from its prompt cache, as it reports them. The older BitNet server's streamed answers carry no such figure, so for it this stays 0 whatever its cache does.", &["backend", "model"]),
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

/// The serving threads' connections.
#[derive(Debug, Clone)]
pub struct ServerMetrics {
    pub connections: IntCounterVec,
}

impl ServerMetrics {
    /// Register on `r`.
    pub fn register(r: &Registry) -> ServerMetrics {
        ServerMetrics {
            connections: counter(r, "bitnet_gateway_connections_accepted_total", "Client connections accepted, by the serving thread (0 to workers - 1) they were dealt to: each new one goes to the thread with the fewest open.", &["thread"]),
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
    pub server: ServerMetrics,
    series: Arc<DashMap<SeriesKey, Arc<ExchangeSeries>, FastHash>>,
}

/// The series one relayed exchange records into, for one backend, model and endpoint.
///
/// Finding a series by its label values hashes them every time, and an exchange records
/// into up to nine; [`Metrics::series`] finds them once per combination and keeps them.
/// Each is still created on first use, as before, so that `/metrics` lists the same series.
#[derive(Debug)]
pub struct ExchangeSeries {
    backend: String,
    model: String,
    endpoint: &'static str,
    ok: OnceLock<IntCounter>,
    duration: OnceLock<Histogram>,
    ttft: OnceLock<Histogram>,
    prompt_tokens: OnceLock<IntCounter>,
    cached_tokens: OnceLock<IntCounter>,
    completion_tokens: OnceLock<IntCounter>,
    tokens_per_second: OnceLock<Histogram>,
    broken_streams: OnceLock<IntCounter>,
    client_disconnects: OnceLock<IntCounter>,
}

/// Where an exchange's series are kept: by the addresses of its backend and model objects
/// (and the endpoint label). A reload may free a backend and reuse its address, so a hit
/// counts only if the names match as well.
type SeriesKey = (usize, usize, &'static str);

impl ExchangeSeries {
    fn bm(&self) -> [&str; 2] {
        [&self.backend, &self.model]
    }

    /// `bitnet_gateway_requests_total` with status 200, the status nearly all have.
    pub fn ok(&self, m: &Metrics) -> &IntCounter {
        self.ok.get_or_init(|| {
            m.requests.requests.with_label_values(&[
                &self.backend,
                &self.model,
                self.endpoint,
                "200",
            ])
        })
    }

    pub fn duration(&self, m: &Metrics) -> &Histogram {
        self.duration.get_or_init(|| {
            m.requests
                .duration
                .with_label_values(&[&self.backend, &self.model, self.endpoint])
        })
    }

    pub fn ttft(&self, m: &Metrics) -> &Histogram {
        self.ttft
            .get_or_init(|| m.requests.ttft.with_label_values(&self.bm()))
    }

    pub fn prompt_tokens(&self, m: &Metrics) -> &IntCounter {
        self.prompt_tokens
            .get_or_init(|| m.requests.prompt_tokens.with_label_values(&self.bm()))
    }

    pub fn cached_tokens(&self, m: &Metrics) -> &IntCounter {
        self.cached_tokens
            .get_or_init(|| m.requests.cached_tokens.with_label_values(&self.bm()))
    }

    pub fn completion_tokens(&self, m: &Metrics) -> &IntCounter {
        self.completion_tokens
            .get_or_init(|| m.requests.completion_tokens.with_label_values(&self.bm()))
    }

    pub fn tokens_per_second(&self, m: &Metrics) -> &Histogram {
        self.tokens_per_second
            .get_or_init(|| m.requests.tokens_per_second.with_label_values(&self.bm()))
    }

    pub fn broken_streams(&self, m: &Metrics) -> &IntCounter {
        self.broken_streams.get_or_init(|| {
            m.backends
                .upstream_errors
                .with_label_values(&[&self.backend, "broken_stream"])
        })
    }

    pub fn client_disconnects(&self, m: &Metrics) -> &IntCounter {
        self.client_disconnects.get_or_init(|| {
            m.backends
                .client_disconnects
                .with_label_values(&[&self.backend])
        })
    }
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
            server: ServerMetrics::register(&registry),
            registry,
            series: Arc::default(),
        }
    }

    /// The series of `endpoint` on `backend` for `model`. `objects` are the addresses of
    /// the backend and model objects, which identify them without hashing their names.
    pub fn series(
        &self,
        objects: (usize, usize),
        backend: &str,
        model: &str,
        endpoint: &'static str,
    ) -> Arc<ExchangeSeries> {
        let key = (objects.0, objects.1, endpoint);
        if let Some(s) = self.series.get(&key) {
            if s.backend == backend && s.model == model {
                return s.clone();
            }
        }
        let s = Arc::new(ExchangeSeries {
            backend: backend.to_string(),
            model: model.to_string(),
            endpoint,
            ok: OnceLock::new(),
            duration: OnceLock::new(),
            ttft: OnceLock::new(),
            prompt_tokens: OnceLock::new(),
            cached_tokens: OnceLock::new(),
            completion_tokens: OnceLock::new(),
            tokens_per_second: OnceLock::new(),
            broken_streams: OnceLock::new(),
            client_disconnects: OnceLock::new(),
        });
        self.series.insert(key, s.clone());
        s
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

#[cfg(test)]
mod tests {
    use super::*;

    fn exposition(m: &Metrics) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&m.registry.gather(), &mut out)
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn kept_series_are_created_on_first_use_and_follow_renamed_objects() {
        let m = Metrics::new();
        let first = m.series((1, 2), "b1", "m", "/v1/completions");
        first.ok(&m).inc();
        assert!(Arc::ptr_eq(
            &first,
            &m.series((1, 2), "b1", "m", "/v1/completions")
        ));
        let text = exposition(&m);
        assert!(text.contains(
            r#"bitnet_gateway_requests_total{backend="b1",endpoint="/v1/completions",model="m",status="200"} 1"#
        ));
        // Nothing was recorded into these yet, so they are not listed.
        assert!(!text.contains("bitnet_gateway_client_disconnects_total{"));
        assert!(!text.contains("bitnet_gateway_time_to_first_token_seconds_count{"));

        // The same addresses, reused by another backend after a reload.
        let second = m.series((1, 2), "b2", "m", "/v1/completions");
        second.ok(&m).inc();
        second.client_disconnects(&m).inc();
        let text = exposition(&m);
        assert!(text.contains(
            r#"bitnet_gateway_requests_total{backend="b2",endpoint="/v1/completions",model="m",status="200"} 1"#
        ));
        assert!(text.contains(r#"bitnet_gateway_client_disconnects_total{backend="b2"} 1"#));
        assert!(!text.contains(r#"bitnet_gateway_client_disconnects_total{backend="b1"}"#));
    }
}
