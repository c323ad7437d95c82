//! The HTML report: one self-contained page with inline SVG charts (a TTFT CDF, an end-to-end
//! latency histogram, throughput over time) and the summary table. No scripts, no external
//! assets, so it can be attached to a ticket or opened from an archive years later.

use std::fmt::Write;

use super::record::RequestRecord;
use super::report::{describe, ms};
use super::stats::LatencyStats;
use super::RunResult;

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 300.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 28.0;
const BOTTOM: f64 = 44.0;

/// Renders the report page.
pub fn render(result: &RunResult) -> String {
    let s = &result.summary;
    let ok: Vec<&RequestRecord> = result.records.iter().filter(|r| r.ok()).collect();
    let mut page = String::with_capacity(32 * 1024);
    page.push_str(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>bitnet-loadtest report</title><style>\
         body{font-family:system-ui,sans-serif;margin:2em;color:#222}\
         table{border-collapse:collapse;margin:1em 0}\
         td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}\
         th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}\
         svg{display:block;margin:1em 0;font-size:11px}\
         </style></head><body>\n",
    );
    let _ = writeln!(page, "<h1>bitnet-loadtest report</h1>");
    let _ = writeln!(
        page,
        "<p>{} against <code>{}</code>, model <code>{}</code>: {} requests in {:.2} s, \
         {} ok, {} failed, {} cancelled at the end of the run.</p>",
        escape(&describe(result)),
        escape(&result.config.url),
        escape(&result.config.model),
        s.requests,
        s.wall_secs,
        s.succeeded,
        s.failed,
        s.cancelled
    );

    page.push_str("<table><tr><th>ms</th><th>p50</th><th>p90</th><th>p99</th><th>max</th><th>mean</th><th>n</th></tr>\n");
    for (name, stats) in [("TTFT", &s.ttft_us), ("ITL", &s.itl_us), ("E2E", &s.e2e_us)] {
        latency_row(&mut page, name, stats);
    }
    page.push_str("</table>\n");
    let _ = writeln!(
        page,
        "<table><tr><th>throughput</th><th>value</th></tr>\
         <tr><td>requests/s</td><td>{:.2}</td></tr>\
         <tr><td>completion tokens/s</td><td>{:.1}</td></tr>\
         <tr><td>prompt tokens (cached)</td><td>{} ({})</td></tr></table>",
        s.requests_per_s,
        s.tokens_per_s,
        s.prompt_tokens,
        match s.cache_hit_ratio() {
            Some(_) => s.cached_tokens.to_string(),
            None => "not reported".to_string(),
        }
    );
    if !s.errors.is_empty() {
        page.push_str("<table><tr><th>error</th><th>count</th><th>first message</th></tr>");
        for (kind, n) in &s.errors {
            // The message is the server's text: escaped like everything else that came in.
            let first = s.error_examples.get(kind).map_or("", String::as_str);
            let _ = write!(
                page,
                "<tr><td>{kind}</td><td>{n}</td><td style=\"text-align:left\">{}</td></tr>",
                escape(first)
            );
        }
        page.push_str("</table>\n");
    }

    let ttft: Vec<f64> = ok
        .iter()
        .filter_map(|r| r.ttft_us)
        .map(|us| us as f64 / 1000.0)
        .collect();
    page.push_str(&cdf_chart("Time to first token (CDF)", "TTFT (ms)", ttft));
    let e2e: Vec<f64> = ok.iter().map(|r| r.e2e_us as f64 / 1000.0).collect();
    page.push_str(&histogram_chart(
        "End-to-end latency (histogram)",
        "E2E latency (ms)",
        &e2e,
    ));
    page.push_str(&throughput_chart(&result.records, s.wall_secs));
    page.push_str("</body></html>\n");
    page
}

fn latency_row(page: &mut String, name: &str, s: &LatencyStats) {
    let _ = writeln!(
        page,
        "<tr><td>{name}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{}</td></tr>",
        ms(s.p50),
        ms(s.p90),
        ms(s.p99),
        ms(s.max),
        s.mean / 1000.0,
        s.count
    );
}

/// Escapes text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A round axis maximum at or above `max`, fine-grained enough that the data fills most of the
/// plot, and dividing into five round ticks.
fn nice_ceiling(max: f64) -> f64 {
    if !(max.is_finite() && max > 0.0) {
        return 1.0;
    }
    let magnitude = 10f64.powf(max.log10().floor());
    [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|v| *v >= max)
        .unwrap_or(10.0 * magnitude)
}

/// Plot frame: maps data coordinates to SVG coordinates and draws axes with five ticks.
struct Frame {
    x_max: f64,
    y_max: f64,
}

impl Frame {
    fn x(&self, v: f64) -> f64 {
        LEFT + v / self.x_max * (WIDTH - LEFT - RIGHT)
    }

    fn y(&self, v: f64) -> f64 {
        HEIGHT - BOTTOM - v / self.y_max * (HEIGHT - TOP - BOTTOM)
    }

    /// Starts the SVG: title, grid, tick labels and axes. Styles are attributes rather than
    /// page CSS so each chart also renders correctly when saved on its own.
    fn open(&self, out: &mut String, title: &str, x_label: &str, y_label: &str) {
        let _ = write!(
            out,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
             viewBox=\"0 0 {WIDTH} {HEIGHT}\" font-family=\"sans-serif\" font-size=\"11\" role=\"img\">\
             <title>{t}</title>\
             <text x=\"{LEFT}\" y=\"16\" font-size=\"13\" font-weight=\"bold\">{t}</text>",
            t = escape(title)
        );
        let mut grid = String::new();
        let mut labels = String::new();
        for i in 0..=5 {
            let f = f64::from(i) / 5.0;
            let (x, y) = (self.x(f * self.x_max), self.y(f * self.y_max));
            let _ = write!(
                grid,
                "<line x1=\"{x:.1}\" y1=\"{TOP}\" x2=\"{x:.1}\" y2=\"{:.1}\"/>\
                 <line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\"/>",
                HEIGHT - BOTTOM,
                WIDTH - RIGHT
            );
            let _ = write!(
                labels,
                "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\
                 <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                HEIGHT - BOTTOM + 14.0,
                tick(f * self.x_max),
                LEFT - 6.0,
                y + 4.0,
                tick(f * self.y_max)
            );
        }
        let _ = write!(
            out,
            "<g stroke=\"#e4e4e4\">{grid}</g><g fill=\"#444\">{labels}</g>\
             <g stroke=\"#444\"><line x1=\"{LEFT}\" y1=\"{b:.1}\" x2=\"{r:.1}\" y2=\"{b:.1}\"/>\
             <line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{b:.1}\"/></g>\
             <text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\
             <text transform=\"translate(14 {cy:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
            HEIGHT - 8.0,
            escape(x_label),
            escape(y_label),
            b = HEIGHT - BOTTOM,
            r = WIDTH - RIGHT,
            cx = (LEFT + WIDTH - RIGHT) / 2.0,
            cy = (TOP + HEIGHT - BOTTOM) / 2.0,
        );
    }
}

fn tick(v: f64) -> String {
    if v == v.trunc() {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn empty_chart(title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"60\" role=\"img\">\
         <title>{t}</title><text x=\"{LEFT}\" y=\"16\" font-size=\"13\" font-weight=\"bold\">{t}</text>\
         <text x=\"{LEFT}\" y=\"40\">no data</text></svg>\n",
        t = escape(title)
    )
}

/// The cumulative share of requests whose value is at most x, as a step line.
fn cdf_chart(title: &str, x_label: &str, mut values: Vec<f64>) -> String {
    if values.is_empty() {
        return empty_chart(title);
    }
    values.sort_by(f64::total_cmp);
    let frame = Frame {
        x_max: nice_ceiling(values[values.len() - 1]),
        y_max: 1.0,
    };
    let mut out = String::new();
    frame.open(&mut out, title, x_label, "share of requests");
    // One point per pixel column is enough; thousands of samples would only bloat the file.
    let n = values.len();
    let step = (n / 600).max(1);
    let mut points = format!("{:.1},{:.1}", frame.x(0.0), frame.y(0.0));
    let mut i = 0;
    while i < n {
        let idx = (i + step - 1).min(n - 1);
        let _ = write!(
            points,
            " {:.1},{:.1}",
            frame.x(values[idx]),
            frame.y((idx + 1) as f64 / n as f64)
        );
        i += step;
    }
    let _ = writeln!(
        out,
        "<polyline fill=\"none\" stroke=\"#1f6fb2\" stroke-width=\"2\" points=\"{points}\"/></svg>"
    );
    out
}

/// Counts of values in 40 equal-width bins.
fn histogram_chart(title: &str, x_label: &str, values: &[f64]) -> String {
    if values.is_empty() {
        return empty_chart(title);
    }
    const BINS: usize = 40;
    let x_max = nice_ceiling(values.iter().copied().fold(0.0, f64::max));
    let mut counts = [0u64; BINS];
    for v in values {
        let bin = ((v / x_max) * BINS as f64) as usize;
        counts[bin.min(BINS - 1)] += 1;
    }
    let frame = Frame {
        x_max,
        y_max: nice_ceiling(*counts.iter().max().unwrap_or(&1) as f64),
    };
    let mut out = String::new();
    frame.open(&mut out, title, x_label, "requests");
    let bin_width = x_max / BINS as f64;
    for (i, count) in counts.iter().enumerate().filter(|(_, c)| **c > 0) {
        let x0 = frame.x(i as f64 * bin_width);
        let x1 = frame.x((i + 1) as f64 * bin_width);
        let y = frame.y(*count as f64);
        let _ = write!(
            out,
            "<rect x=\"{x0:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#2a9d8f\"><title>{count}</title></rect>",
            (x1 - x0 - 1.0).max(0.5),
            frame.y(0.0) - y
        );
    }
    out.push_str("</svg>\n");
    out
}

/// Completed requests and completion tokens per second over the run. A request's tokens are
/// spread evenly from its first token to its end, so long streams show as the steady flow they
/// were rather than as a spike when they finish.
pub(crate) fn throughput_series(records: &[RequestRecord], wall_secs: f64) -> (Vec<f64>, Vec<f64>) {
    let buckets = (wall_secs.ceil() as usize).clamp(1, 3600);
    let width_us = (wall_secs * 1e6 / buckets as f64).max(1.0);
    let mut requests = vec![0.0; buckets];
    let mut tokens = vec![0.0; buckets];
    let bucket_of = |us: f64| ((us / width_us) as usize).min(buckets - 1);
    for r in records.iter().filter(|r| r.ok()) {
        let end = r.end_us() as f64;
        requests[bucket_of(end)] += 1.0;
        let first = (r.start_us + r.ttft_us.unwrap_or(r.e2e_us)) as f64;
        let tokens_total = r.completion_tokens as f64;
        if tokens_total == 0.0 {
            continue;
        }
        if end <= first {
            tokens[bucket_of(end)] += tokens_total;
            continue;
        }
        let rate = tokens_total / (end - first);
        let mut t = first;
        while t < end {
            let b = bucket_of(t);
            let bucket_end = ((b + 1) as f64 * width_us).min(end);
            let span = if bucket_end > t {
                bucket_end - t
            } else {
                end - t
            };
            tokens[b] += rate * span;
            t += span;
        }
    }
    let per_second = 1e6 / width_us;
    for v in requests.iter_mut().chain(tokens.iter_mut()) {
        *v *= per_second;
    }
    (requests, tokens)
}

fn throughput_chart(records: &[RequestRecord], wall_secs: f64) -> String {
    let title = "Throughput over time";
    if !records.iter().any(RequestRecord::ok) || wall_secs <= 0.0 {
        return empty_chart(title);
    }
    let (requests, tokens) = throughput_series(records, wall_secs);
    let buckets = requests.len();
    let width = wall_secs / buckets as f64;
    let mut out = String::new();
    for (series, label, color) in [
        (&requests, "requests/s", "#e76f51"),
        (&tokens, "completion tokens/s", "#1f6fb2"),
    ] {
        let frame = Frame {
            x_max: nice_ceiling(wall_secs),
            y_max: nice_ceiling(series.iter().copied().fold(0.0, f64::max)),
        };
        frame.open(
            &mut out,
            &format!("{title}: {label}"),
            "time since start (s)",
            label,
        );
        let points: Vec<String> = series
            .iter()
            .enumerate()
            .map(|(i, v)| {
                format!(
                    "{:.1},{:.1}",
                    frame.x((i as f64 + 0.5) * width),
                    frame.y(*v)
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/></svg>",
            points.join(" ")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gen::workload::WorkloadKind;

    fn record(start_us: u64, ttft_us: u64, e2e_us: u64, tokens: u64) -> RequestRecord {
        RequestRecord {
            session: 0,
            turn: 1,
            workload: WorkloadKind::ShortChat,
            scheduled_us: None,
            start_us,
            ttft_us: Some(ttft_us),
            e2e_us,
            itl_mean_us: None,
            itl_max_us: None,
            completion_tokens: tokens,
            prompt_tokens: None,
            cached_tokens: None,
            decode_tokens_per_s: None,
            status: Some(200),
            error: None,
            error_message: None,
            token_us: None,
        }
    }

    #[test]
    fn nice_ceilings_are_round_and_not_below_the_maximum() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(1.0), 1.0);
        assert_eq!(nice_ceiling(1.3), 1.5);
        assert_eq!(nice_ceiling(37.0), 40.0);
        assert_eq!(nice_ceiling(6000.6), 8000.0);
        assert_eq!(nice_ceiling(11.04), 15.0);
        assert_eq!(nice_ceiling(801.0), 1000.0);
    }

    #[test]
    fn escape_neutralises_markup() {
        assert_eq!(
            escape("<a href=\"x\">&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn tokens_are_spread_over_the_stream_and_conserved() {
        // 300 tokens streamed from 1.0 s to 4.0 s of a 4 s run: 100 tok/s in seconds 2-4.
        let records = vec![record(500_000, 500_000, 3_500_000, 300)];
        let (requests, tokens) = throughput_series(&records, 4.0);
        assert_eq!(requests, vec![0.0, 0.0, 0.0, 1.0]);
        let expected = [0.0, 100.0, 100.0, 100.0];
        for (got, want) in tokens.iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{tokens:?}");
        }
    }
}
