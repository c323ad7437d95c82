//! Run summaries: HDR-histogram percentiles, throughput and error counts.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::record::{ErrorKind, RequestRecord};
use super::workload::WorkloadKind;

/// Highest latency the histograms track: one hour, in microseconds. Larger values are clamped.
const MAX_TRACKABLE_US: u64 = 3_600_000_000;

/// A histogram of microseconds with three significant digits.
pub(crate) fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_TRACKABLE_US, 3).expect("static histogram bounds are valid")
}

/// Percentiles of one latency, in microseconds. All zero when nothing was measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyStats {
    /// Number of samples.
    pub count: u64,
    /// Arithmetic mean.
    pub mean: f64,
    /// Smallest sample.
    pub min: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest sample.
    pub max: u64,
}

impl LatencyStats {
    /// Percentiles of the histogram's samples.
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            mean: h.mean(),
            min: h.min(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            max: h.max(),
        }
    }

    fn from_values(values: impl Iterator<Item = u64>) -> Self {
        let mut h = latency_histogram();
        for v in values {
            h.saturating_record(v.max(1));
        }
        Self::from_histogram(&h)
    }
}

/// Latencies of one workload kind within a mixed run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KindSummary {
    /// Requests of this kind.
    pub requests: u64,
    /// Of which failed (cancelled ones excluded).
    pub failed: u64,
    /// Time to first token of successful requests, microseconds.
    pub ttft_us: LatencyStats,
    /// End-to-end latency of successful requests, microseconds.
    pub e2e_us: LatencyStats,
}

/// The figures a run is judged by. Latencies cover successful requests only: a fast 503 is not a
/// fast answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Requests sent.
    pub requests: u64,
    /// Requests that completed without error.
    pub succeeded: u64,
    /// Requests the target failed, for any reason but the end of the run.
    pub failed: u64,
    /// Requests still running when the run ended (its drain period, or an interrupt) and cut
    /// then. They say nothing about the target, so they count neither as failed nor in
    /// [`errors`](Self::errors).
    #[serde(default)]
    pub cancelled: u64,
    /// Open loop only: arrivals not sent because `max_in_flight` sessions were already running.
    pub dropped_arrivals: u64,
    /// From the start of the run until the last request ended, or until the end of its
    /// `--duration` if that came later (and the run was neither interrupted nor ended by its
    /// request budget).
    pub wall_secs: f64,
    /// Successful requests per second of wall time.
    pub requests_per_s: f64,
    /// Completion tokens of successful requests.
    pub completion_tokens: u64,
    /// Completion tokens per second of wall time.
    pub tokens_per_s: f64,
    /// Prompt tokens of successful requests, where the server reported them.
    pub prompt_tokens: u64,
    /// Of those, served from the server's prompt cache.
    pub cached_tokens: u64,
    /// Prompt tokens of the successful requests whose server also said how many came from
    /// its cache: the base of [`cache_hit_ratio`](Self::cache_hit_ratio). The older BitNet
    /// server's streamed answers carry no cache figure, and counting their prompts as all
    /// uncached would show a 0 % hit rate for a cache that may be working. `None` in results
    /// written before this field existed, whose ratio is taken over all prompt tokens.
    #[serde(default)]
    pub cache_reported_prompt_tokens: Option<u64>,
    /// Mean per-request generation speed after the first token.
    pub decode_tokens_per_s_mean: Option<f64>,
    /// Time to first token, microseconds.
    pub ttft_us: LatencyStats,
    /// Gaps between content-bearing chunks, microseconds.
    pub itl_us: LatencyStats,
    /// Time from sending to the end of the response, microseconds.
    pub e2e_us: LatencyStats,
    /// Failed requests by kind.
    pub errors: BTreeMap<ErrorKind, u64>,
    /// Responses by HTTP status.
    pub statuses: BTreeMap<u16, u64>,
    /// The message of the first failure of each kind, so a summary says why requests failed
    /// and not only how many (a context overflow and a missing model are both a 400).
    #[serde(default)]
    pub error_examples: BTreeMap<ErrorKind, String>,
    /// Per-kind figures, for runs that mix kinds.
    pub by_workload: BTreeMap<WorkloadKind, KindSummary>,
}

impl Summary {
    /// Summarises `records`; inter-token gaps come from `itl`, which holds every gap of the
    /// successful requests (records keep only their mean and maximum).
    pub fn compute(
        records: &[RequestRecord],
        itl: &Histogram<u64>,
        wall_secs: f64,
        dropped_arrivals: u64,
    ) -> Self {
        let ok = || records.iter().filter(|r| r.ok());
        let succeeded = ok().count() as u64;
        let completion_tokens = ok().map(|r| r.completion_tokens).sum();
        let mut errors = BTreeMap::new();
        let mut statuses = BTreeMap::new();
        let mut error_examples = BTreeMap::new();
        for r in records {
            if let Some(kind) = r.error.filter(|_| !r.cancelled()) {
                *errors.entry(kind).or_insert(0) += 1;
                if let Some(message) = &r.error_message {
                    error_examples
                        .entry(kind)
                        .or_insert_with(|| message.clone());
                }
            }
            if let Some(status) = r.status {
                *statuses.entry(status).or_insert(0) += 1;
            }
        }
        let decode: Vec<f64> = ok().filter_map(|r| r.decode_tokens_per_s).collect();
        let per_second = |n: f64| if wall_secs > 0.0 { n / wall_secs } else { 0.0 };

        let mut by_workload = BTreeMap::new();
        for kind in WorkloadKind::ALL {
            let of_kind = || records.iter().filter(move |r| r.workload == kind);
            let requests = of_kind().count() as u64;
            if requests == 0 {
                continue;
            }
            by_workload.insert(
                kind,
                KindSummary {
                    requests,
                    failed: of_kind().filter(|r| !r.ok() && !r.cancelled()).count() as u64,
                    ttft_us: LatencyStats::from_values(
                        of_kind().filter(|r| r.ok()).filter_map(|r| r.ttft_us),
                    ),
                    e2e_us: LatencyStats::from_values(
                        of_kind().filter(|r| r.ok()).map(|r| r.e2e_us),
                    ),
                },
            );
        }

        Self {
            requests: records.len() as u64,
            succeeded,
            failed: records.iter().filter(|r| !r.ok() && !r.cancelled()).count() as u64,
            cancelled: records.iter().filter(|r| r.cancelled()).count() as u64,
            dropped_arrivals,
            wall_secs,
            requests_per_s: per_second(succeeded as f64),
            completion_tokens,
            tokens_per_s: per_second(completion_tokens as f64),
            prompt_tokens: ok().filter_map(|r| r.prompt_tokens).sum(),
            cached_tokens: ok().filter_map(|r| r.cached_tokens).sum(),
            cache_reported_prompt_tokens: Some(
                ok().filter(|r| r.cached_tokens.is_some())
                    .filter_map(|r| r.prompt_tokens)
                    .sum(),
            ),
            decode_tokens_per_s_mean: (!decode.is_empty())
                .then(|| decode.iter().sum::<f64>() / decode.len() as f64),
            ttft_us: LatencyStats::from_values(ok().filter_map(|r| r.ttft_us)),
            itl_us: LatencyStats::from_histogram(itl),
            e2e_us: LatencyStats::from_values(ok().map(|r| r.e2e_us)),
            errors,
            statuses,
            error_examples,
            by_workload,
        }
    }

    /// Failed requests as a share of the requests that finished (cancelled ones left out).
    pub fn error_rate(&self) -> f64 {
        let finished = self.succeeded + self.failed;
        if finished == 0 {
            0.0
        } else {
            self.failed as f64 / finished as f64
        }
    }

    /// Share of prompt tokens served from the server's cache, over the requests that reported
    /// it; `None` when none did.
    pub fn cache_hit_ratio(&self) -> Option<f64> {
        let base = self
            .cache_reported_prompt_tokens
            .unwrap_or(self.prompt_tokens);
        (base > 0).then(|| self.cached_tokens as f64 / base as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ttft: u64, e2e: u64, error: Option<ErrorKind>) -> RequestRecord {
        RequestRecord {
            session: 0,
            turn: 1,
            workload: WorkloadKind::ShortChat,
            scheduled_us: None,
            start_us: 0,
            ttft_us: Some(ttft),
            e2e_us: e2e,
            itl_mean_us: None,
            itl_max_us: None,
            completion_tokens: 10,
            prompt_tokens: Some(100),
            cached_tokens: Some(25),
            decode_tokens_per_s: None,
            status: match error {
                None => Some(200),
                Some(ErrorKind::RateLimited) => Some(429),
                Some(ErrorKind::Unavailable) => Some(503),
                Some(_) => None,
            },
            error,
            error_message: None,
            token_us: None,
        }
    }

    #[test]
    fn percentiles_cover_successful_requests_and_errors_are_counted_by_kind() {
        let mut records: Vec<_> = (1..=100)
            .map(|i| record(i * 1000, i * 10_000, None))
            .collect();
        let failed = |kind, message: &str| RequestRecord {
            error_message: Some(message.to_string()),
            token_us: None,
            ..record(1, 1, Some(kind))
        };
        records.push(failed(ErrorKind::Unavailable, "first 503"));
        records.push(failed(ErrorKind::Unavailable, "second 503"));
        records.push(record(1, 1, Some(ErrorKind::RateLimited)));
        records.push(failed(ErrorKind::Cancelled, "cut at the end"));
        let s = Summary::compute(&records, &latency_histogram(), 2.0, 0);
        assert_eq!(s.requests, 104);
        assert_eq!(s.succeeded, 100);
        assert_eq!(s.failed, 3);
        assert_eq!(s.cancelled, 1);
        assert!(!s.errors.contains_key(&ErrorKind::Cancelled));
        assert_eq!(s.errors[&ErrorKind::Unavailable], 2);
        assert_eq!(s.errors[&ErrorKind::RateLimited], 1);
        assert_eq!(s.statuses[&200], 100);
        assert_eq!(s.statuses[&503], 2);
        assert_eq!(s.statuses[&429], 1);
        assert_eq!(s.statuses.len(), 3);
        // The first message of each kind that had one; cancelled requests are not failures.
        let examples: BTreeMap<ErrorKind, String> =
            [(ErrorKind::Unavailable, "first 503".to_string())].into();
        assert_eq!(s.error_examples, examples);
        // The failed requests' 1 µs latencies must not drag the minimum down.
        assert_eq!(s.ttft_us.min, 1000);
        let near = |a: u64, b: u64| a.abs_diff(b) * 100 <= b;
        assert!(near(s.ttft_us.p50, 50_000), "{}", s.ttft_us.p50);
        assert!(near(s.ttft_us.p90, 90_000), "{}", s.ttft_us.p90);
        assert!(near(s.e2e_us.p99, 990_000), "{}", s.e2e_us.p99);
        assert!(near(s.e2e_us.max, 1_000_000));
        assert_eq!(s.completion_tokens, 1000);
        assert!((s.requests_per_s - 50.0).abs() < 1e-9);
        assert!((s.tokens_per_s - 500.0).abs() < 1e-9);
        assert_eq!(s.cache_hit_ratio(), Some(0.25));
        assert!((s.error_rate() - 3.0 / 103.0).abs() < 1e-12);
    }

    #[test]
    fn the_cache_hit_ratio_counts_only_requests_that_reported_their_cache() {
        // 100 prompt tokens with 25 cached, and 100 more from a server that says nothing of
        // its cache (the older BitNet server): 25 %, not 12.5 %.
        let silent = RequestRecord {
            cached_tokens: None,
            ..record(1000, 2000, None)
        };
        let records = vec![record(1000, 2000, None), silent.clone()];
        let s = Summary::compute(&records, &latency_histogram(), 1.0, 0);
        assert_eq!(s.prompt_tokens, 200);
        assert_eq!(s.cache_hit_ratio(), Some(0.25));
        // Nobody reported: no ratio at all rather than 0 %.
        let s = Summary::compute(&[silent.clone(), silent], &latency_histogram(), 1.0, 0);
        assert_eq!(s.cache_hit_ratio(), None);
        // Results written before the field existed keep their old ratio.
        let mut old =
            serde_json::to_value(Summary::compute(&records, &latency_histogram(), 1.0, 0)).unwrap();
        old.as_object_mut()
            .unwrap()
            .remove("cache_reported_prompt_tokens");
        let old: Summary = serde_json::from_value(old).unwrap();
        assert_eq!(old.cache_hit_ratio(), Some(0.125));
    }

    #[test]
    fn summary_survives_a_json_round_trip() {
        let records = vec![
            record(5, 9, None),
            RequestRecord {
                error_message: Some("stream cut".into()),
                token_us: None,
                ..record(1, 1, Some(ErrorKind::MidStream))
            },
        ];
        let s = Summary::compute(&records, &latency_histogram(), 1.0, 4);
        let back: Summary = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
