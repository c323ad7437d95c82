//! The summary table printed at the end of a run.

use std::fmt::Write;

use super::config::Load;
use super::stats::{LatencyStats, Summary};
use super::RunResult;

/// Microseconds as milliseconds for display.
pub fn ms(us: u64) -> String {
    format!("{:.1}", us as f64 / 1000.0)
}

/// One-line description of how a run was driven, e.g. `agent, closed loop x8, stream`.
pub fn describe(result: &RunResult) -> String {
    let cfg = &result.config;
    let load = match cfg.load {
        Load::Closed { concurrency } => format!("closed loop x{concurrency}"),
        Load::Open { rate, .. } => format!("open loop {rate} sessions/s"),
    };
    let mode = if cfg.stream { "stream" } else { "no stream" };
    format!("{}, {load}, {mode}, seed {}", cfg.workload, cfg.seed)
}

fn latency_row(out: &mut String, name: &str, s: &LatencyStats) {
    if s.count == 0 {
        let _ = writeln!(out, "  {name:<6}{:>10}", "-");
        return;
    }
    let _ = writeln!(
        out,
        "  {name:<6}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}",
        ms(s.p50),
        ms(s.p90),
        ms(s.p99),
        ms(s.max),
        format!("{:.1}", s.mean / 1000.0),
        s.count
    );
}

/// The end-of-run table: counts, throughput, latency percentiles and errors by kind.
pub fn table(result: &RunResult) -> String {
    let s: &Summary = &result.summary;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "bitnet-loadtest: {} requests in {:.2} s against {} ({})",
        s.requests,
        s.wall_secs,
        result.config.url,
        describe(result)
    );
    let _ = writeln!(
        out,
        "  requests    {} ok, {} failed ({:.2}%){}{}",
        s.succeeded,
        s.failed,
        s.error_rate() * 100.0,
        if s.cancelled > 0 {
            format!(", {} cancelled at the end of the run", s.cancelled)
        } else {
            String::new()
        },
        if s.dropped_arrivals > 0 {
            format!(", {} arrivals dropped (max in flight)", s.dropped_arrivals)
        } else {
            String::new()
        }
    );
    let _ = write!(
        out,
        "  throughput  {:.2} req/s, {:.1} completion tok/s",
        s.requests_per_s, s.tokens_per_s
    );
    if let Some(decode) = s.decode_tokens_per_s_mean {
        let _ = write!(out, ", {decode:.1} tok/s per stream");
    }
    out.push('\n');
    if let Some(ratio) = s.cache_hit_ratio() {
        let _ = writeln!(
            out,
            "  prompt      {} tokens, {:.1}% from cache",
            s.prompt_tokens,
            ratio * 100.0
        );
    } else if s.prompt_tokens > 0 {
        let _ = writeln!(
            out,
            "  prompt      {} tokens (the server did not report cache hits)",
            s.prompt_tokens
        );
    }
    let _ = writeln!(
        out,
        "  {:<6}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}",
        "ms", "p50", "p90", "p99", "max", "mean", "n"
    );
    latency_row(&mut out, "TTFT", &s.ttft_us);
    latency_row(&mut out, "ITL", &s.itl_us);
    latency_row(&mut out, "E2E", &s.e2e_us);
    if s.by_workload.len() > 1 {
        for (kind, k) in &s.by_workload {
            let _ = writeln!(
                out,
                "  {kind:<12} {} requests, {} failed, TTFT p50 {} p99 {} ms, E2E p50 {} p99 {} ms",
                k.requests,
                k.failed,
                ms(k.ttft_us.p50),
                ms(k.ttft_us.p99),
                ms(k.e2e_us.p50),
                ms(k.e2e_us.p99),
            );
        }
    }
    if s.errors.is_empty() {
        let _ = writeln!(out, "  errors      none");
    } else {
        let list: Vec<String> = s.errors.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let _ = writeln!(out, "  errors      {}", list.join(", "));
        for (kind, message) in &s.error_examples {
            let _ = writeln!(out, "              first {kind}: {message}");
        }
    }
    if !s.statuses.is_empty() {
        let list: Vec<String> = s
            .statuses
            .iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect();
        let _ = writeln!(out, "  statuses    {}", list.join(", "));
    }
    out
}
