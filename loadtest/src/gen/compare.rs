//! Two runs side by side, with B/A ratios for the figures that matter.

use std::fmt::{self, Write};

use super::report::describe;
use super::stats::Summary;
use super::RunResult;

/// One compared figure.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// What is compared, with its unit.
    pub name: &'static str,
    /// Run A's value.
    pub a: f64,
    /// Run B's value.
    pub b: f64,
    /// Whether a smaller value is the better one (latencies, errors).
    pub lower_is_better: bool,
}

impl Row {
    /// B divided by A; `None` when A is zero.
    pub fn ratio(&self) -> Option<f64> {
        (self.a != 0.0).then(|| self.b / self.a)
    }
}

/// The compared figures of two runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// The rows, in display order.
    pub rows: Vec<Row>,
}

impl Comparison {
    /// The row called `name`, if there is one.
    pub fn row(&self, name: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.name == name)
    }
}

/// Compares the main figures of two summaries.
pub fn compare(a: &Summary, b: &Summary) -> Comparison {
    let ms = |us: u64| us as f64 / 1000.0;
    let mut rows = Vec::new();
    let mut add = |name, a: f64, b: f64, lower_is_better| {
        rows.push(Row {
            name,
            a,
            b,
            lower_is_better,
        })
    };
    add("requests", a.requests as f64, b.requests as f64, false);
    add("succeeded", a.succeeded as f64, b.succeeded as f64, false);
    add(
        "error rate %",
        a.error_rate() * 100.0,
        b.error_rate() * 100.0,
        true,
    );
    add(
        "throughput req/s",
        a.requests_per_s,
        b.requests_per_s,
        false,
    );
    add("throughput tok/s", a.tokens_per_s, b.tokens_per_s, false);
    add("TTFT p50 ms", ms(a.ttft_us.p50), ms(b.ttft_us.p50), true);
    add("TTFT p90 ms", ms(a.ttft_us.p90), ms(b.ttft_us.p90), true);
    add("TTFT p99 ms", ms(a.ttft_us.p99), ms(b.ttft_us.p99), true);
    add("ITL p50 ms", ms(a.itl_us.p50), ms(b.itl_us.p50), true);
    add("ITL p99 ms", ms(a.itl_us.p99), ms(b.itl_us.p99), true);
    add("E2E p50 ms", ms(a.e2e_us.p50), ms(b.e2e_us.p50), true);
    add("E2E p90 ms", ms(a.e2e_us.p90), ms(b.e2e_us.p90), true);
    add("E2E p99 ms", ms(a.e2e_us.p99), ms(b.e2e_us.p99), true);
    if let (Some(x), Some(y)) = (a.decode_tokens_per_s_mean, b.decode_tokens_per_s_mean) {
        add("decode tok/s per stream", x, y, false);
    }
    if let (Some(x), Some(y)) = (a.cache_hit_ratio(), b.cache_hit_ratio()) {
        add("prompt cache hit %", x * 100.0, y * 100.0, false);
    }
    Comparison { rows }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:<26}{:>14}{:>14}{:>10}", "", "A", "B", "B/A")?;
        for row in &self.rows {
            let ratio = row
                .ratio()
                .map_or_else(|| "-".to_owned(), |r| format!("{r:.3}"));
            let verdict = match row.ratio() {
                Some(r) if (r - 1.0).abs() < 0.02 => "",
                Some(r) if (r < 1.0) == row.lower_is_better => "  better",
                Some(_) => "  worse",
                None => "",
            };
            writeln!(
                f,
                "{:<26}{:>14}{:>14}{:>10}{verdict}",
                row.name,
                number(row.a),
                number(row.b),
                ratio
            )?;
        }
        Ok(())
    }
}

fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e12 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// The full comparison text: which runs, then the table.
pub fn render(a_label: &str, a: &RunResult, b_label: &str, b: &RunResult) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "A: {a_label}  ({})", describe(a));
    let _ = writeln!(out, "B: {b_label}  ({})", describe(b));
    let _ = write!(out, "{}", compare(&a.summary, &b.summary));
    out
}
