//! Two runs side by side, with B/A ratios for the figures that matter.

use std::fmt::{self, Write};

use super::report::describe;
use super::stats::{LatencyStats, Summary};
use super::RunResult;

/// One compared figure.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// What is compared, with its unit.
    pub name: &'static str,
    /// Run A's value; `None` when the run measured nothing for it (no successful request,
    /// or inter-token latency of a run that did not stream).
    pub a: Option<f64>,
    /// Run B's value, the same way.
    pub b: Option<f64>,
    /// Which way is better, if either is.
    pub better: Better,
}

/// Which way a compared figure improves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    /// Smaller is better: latencies, errors.
    Lower,
    /// Larger is better: throughput, successes.
    Higher,
    /// A setting of the run rather than an outcome (how many requests it sent).
    Neither,
}

impl Row {
    /// B divided by A; `None` when either was not measured or A is zero.
    pub fn ratio(&self) -> Option<f64> {
        match (self.a, self.b) {
            (Some(a), Some(b)) if a != 0.0 => Some(b / a),
            _ => None,
        }
    }

    /// "better", "worse", or nothing for a change under 2 %, a figure that is not an
    /// outcome, or one only one run measured. From zero, any rise counts: 0 errors
    /// becoming some is the change a comparison most has to show.
    pub fn verdict(&self) -> Option<&'static str> {
        let rose = match (self.a, self.b, self.ratio()) {
            (_, _, Some(r)) if (r - 1.0).abs() < 0.02 => return None,
            (_, _, Some(r)) => r > 1.0,
            (Some(a), Some(b), None) if a == 0.0 && b > 0.0 => true,
            _ => return None,
        };
        match self.better {
            Better::Neither => None,
            Better::Lower => Some(if rose { "worse" } else { "better" }),
            Better::Higher => Some(if rose { "better" } else { "worse" }),
        }
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

/// One quantile of a latency distribution.
type Quantile = fn(&LatencyStats) -> u64;

/// Which latency distribution of a summary.
#[derive(Clone, Copy)]
enum Dist {
    Ttft,
    Itl,
    E2e,
}

impl Dist {
    fn of(self, s: &Summary) -> &LatencyStats {
        match self {
            Dist::Ttft => &s.ttft_us,
            Dist::Itl => &s.itl_us,
            Dist::E2e => &s.e2e_us,
        }
    }
}

/// Compares the main figures of two summaries.
pub fn compare(a: &Summary, b: &Summary) -> Comparison {
    use Better::{Higher, Lower, Neither};
    // A latency only where the run measured one: an empty histogram's 0 is no figure.
    let ms =
        |l: &LatencyStats, q: fn(&LatencyStats) -> u64| (l.count > 0).then(|| q(l) as f64 / 1000.0);
    let mut rows = Vec::new();
    let mut add =
        |name, a: Option<f64>, b: Option<f64>, better| rows.push(Row { name, a, b, better });
    add(
        "requests",
        Some(a.requests as f64),
        Some(b.requests as f64),
        Neither,
    );
    add(
        "succeeded",
        Some(a.succeeded as f64),
        Some(b.succeeded as f64),
        Higher,
    );
    add(
        "error rate %",
        Some(a.error_rate() * 100.0),
        Some(b.error_rate() * 100.0),
        Lower,
    );
    add(
        "throughput req/s",
        Some(a.requests_per_s),
        Some(b.requests_per_s),
        Higher,
    );
    add(
        "throughput tok/s",
        Some(a.tokens_per_s),
        Some(b.tokens_per_s),
        Higher,
    );
    let (p50, p90, p99): (Quantile, Quantile, Quantile) = (|l| l.p50, |l| l.p90, |l| l.p99);
    for (name, dist, q) in [
        ("TTFT p50 ms", Dist::Ttft, p50),
        ("TTFT p90 ms", Dist::Ttft, p90),
        ("TTFT p99 ms", Dist::Ttft, p99),
        ("ITL p50 ms", Dist::Itl, p50),
        ("ITL p99 ms", Dist::Itl, p99),
        ("E2E p50 ms", Dist::E2e, p50),
        ("E2E p90 ms", Dist::E2e, p90),
        ("E2E p99 ms", Dist::E2e, p99),
    ] {
        add(name, ms(dist.of(a), q), ms(dist.of(b), q), Lower);
    }
    if a.decode_tokens_per_s_mean.is_some() || b.decode_tokens_per_s_mean.is_some() {
        add(
            "decode tok/s per stream",
            a.decode_tokens_per_s_mean,
            b.decode_tokens_per_s_mean,
            Higher,
        );
    }
    let cache = |s: &Summary| s.cache_hit_ratio().map(|r| r * 100.0);
    if cache(a).is_some() || cache(b).is_some() {
        add("prompt cache hit %", cache(a), cache(b), Higher);
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
            let verdict = row.verdict().map_or(String::new(), |v| format!("  {v}"));
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

fn number(v: Option<f64>) -> String {
    let Some(v) = v else {
        return "-".to_owned();
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn row(a: Option<f64>, b: Option<f64>, better: Better) -> Row {
        Row {
            name: "x",
            a,
            b,
            better,
        }
    }

    #[test]
    fn verdicts_follow_the_better_direction_and_count_a_rise_from_zero() {
        use Better::*;
        assert_eq!(row(Some(10.0), Some(20.0), Lower).verdict(), Some("worse"));
        assert_eq!(row(Some(10.0), Some(5.0), Lower).verdict(), Some("better"));
        assert_eq!(
            row(Some(10.0), Some(20.0), Higher).verdict(),
            Some("better")
        );
        assert_eq!(row(Some(10.0), Some(10.1), Lower).verdict(), None);
        // 0 % errors becoming 33 % has no ratio, and is still the worst news in the table.
        assert_eq!(row(Some(0.0), Some(33.3), Lower).verdict(), Some("worse"));
        assert_eq!(row(Some(0.0), Some(5.0), Higher).verdict(), Some("better"));
        assert_eq!(row(Some(0.0), Some(0.0), Lower).verdict(), None);
        // How many requests a run sent is a setting, not an outcome.
        assert_eq!(row(Some(20.0), Some(45.0), Neither).verdict(), None);
        // A figure only one run measured has neither ratio nor verdict.
        assert_eq!(row(None, Some(3.0), Lower).ratio(), None);
        assert_eq!(row(None, Some(3.0), Lower).verdict(), None);
    }

    #[test]
    fn unmeasured_figures_print_as_a_dash() {
        let table = Comparison {
            rows: vec![Row {
                name: "ITL p50 ms",
                a: None,
                b: Some(12.5),
                better: Better::Lower,
            }],
        }
        .to_string();
        let line = table.lines().nth(1).unwrap();
        assert_eq!(
            line.split_whitespace().collect::<Vec<_>>(),
            ["ITL", "p50", "ms", "-", "12.50", "-"]
        );
    }
}
