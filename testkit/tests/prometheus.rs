//! A real Prometheus scraping an in-test exporter, queried back through the HTTP API, and
//! `promtool check metrics` on good and bad exposition text.
//!
//! Each test skips (loudly) when Prometheus or promtool is missing, except under CI or
//! `REQUIRE_PROMETHEUS=1`, where a missing binary fails the test.

use std::io::ErrorKind;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use testkit::prometheus::{
    binary_or_skip, promtool_check_metrics, promtool_or_skip, ExpositionServer, Prometheus,
};

/// Short enough that a handful of scrapes fit in a fraction of a second.
const SCRAPE_INTERVAL: Duration = Duration::from_millis(100);
/// Generous for a loaded two-core machine; a passing test needs a small part of it.
const WAIT: Duration = Duration::from_secs(20);

fn counter_text(value: f64) -> String {
    format!(
        "# HELP demo_jobs_processed_total Jobs processed.\n\
         # TYPE demo_jobs_processed_total counter\n\
         demo_jobs_processed_total{{queue=\"fast\"}} {value}\n"
    )
}

fn exporter(text: String) -> ExpositionServer {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    ExpositionServer::serve(listener, text).unwrap()
}

fn start(binary: &Path, targets: &[String]) -> Prometheus {
    Prometheus::start(binary, targets, SCRAPE_INTERVAL).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn scraped_counter_is_queried_back_with_its_labels_and_value() {
    let Some(binary) = binary_or_skip("scraped_counter_is_queried_back_with_its_labels_and_value")
    else {
        return;
    };
    let exporter = exporter(counter_text(1234.5));
    let prometheus = start(&binary, &[exporter.target()]);

    let samples = prometheus
        .wait_for("demo_jobs_processed_total", |r| !r.is_empty(), WAIT)
        .unwrap();
    assert_eq!(samples.len(), 1, "{samples:?}");
    let (labels, value) = &samples[0];
    assert_eq!(value, &1234.5);
    assert_eq!(labels["__name__"], "demo_jobs_processed_total");
    assert_eq!(labels["queue"], "fast");
    assert_eq!(labels["job"], "targets");
    assert_eq!(labels["instance"], exporter.target());

    let up = prometheus.query("up").unwrap();
    assert_eq!(up.len(), 1, "{up:?}");
    assert_eq!(up[0].1, 1.0);

    // Scraping goes on: a new value shows up without restarting anything.
    exporter.set_text(counter_text(2000.0));
    prometheus
        .wait_for(
            r#"demo_jobs_processed_total{queue="fast"}"#,
            |r| r.len() == 1 && r[0].1 == 2000.0,
            WAIT,
        )
        .unwrap();
}

#[test]
fn query_fails_with_prometheus_parse_error_for_bad_promql() {
    let Some(binary) = binary_or_skip("query_fails_with_prometheus_parse_error_for_bad_promql")
    else {
        return;
    };
    let prometheus = start(&binary, &[]);

    let err = prometheus.query("sum(rate(x[1m])").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    assert!(err.to_string().contains("parse error"), "{err}");

    // The same server evaluates a valid expression, so the failure above is about the
    // expression and not the connection.
    let scalar = prometheus.query("scalar(vector(7))").unwrap();
    assert_eq!(scalar.len(), 1, "{scalar:?}");
    assert_eq!(scalar[0].1, 7.0);
}

#[test]
fn wait_for_gives_up_after_its_timeout_with_the_last_result() {
    let Some(binary) = binary_or_skip("wait_for_gives_up_after_its_timeout_with_the_last_result")
    else {
        return;
    };
    let prometheus = start(&binary, &[]);

    let err = prometheus
        .wait_for("vector(3)", |r| r.is_empty(), Duration::from_millis(300))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
    assert!(err.to_string().contains("3.0"), "{err}");
}

#[test]
fn dropping_prometheus_kills_it_and_removes_its_directory() {
    let Some(binary) = binary_or_skip("dropping_prometheus_kills_it_and_removes_its_directory")
    else {
        return;
    };
    let prometheus = start(&binary, &[]);
    let pid = prometheus.child().pid();
    let dir: PathBuf = prometheus.dir().to_owned();
    assert!(dir.join("data").is_dir(), "no TSDB under {}", dir.display());
    assert!(Path::new(&format!("/proc/{pid}")).exists());

    drop(prometheus);
    assert!(!dir.exists(), "{} is still there", dir.display());
    // Drop reaps the process, so its /proc entry is gone rather than a zombie's.
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} lives on"
    );
}

#[test]
fn promtool_accepts_a_well_formed_exposition() {
    if promtool_or_skip("promtool_accepts_a_well_formed_exposition").is_none() {
        return;
    }
    let (ok, report) = promtool_check_metrics(&counter_text(1.0)).unwrap();
    assert!(ok, "{report}");
}

#[test]
fn promtool_flags_a_counter_without_total_suffix() {
    if promtool_or_skip("promtool_flags_a_counter_without_total_suffix").is_none() {
        return;
    }
    let text = "# HELP demo_jobs Jobs processed.\n# TYPE demo_jobs counter\ndemo_jobs 1\n";
    let (ok, report) = promtool_check_metrics(text).unwrap();
    assert!(!ok, "{report}");
    assert!(
        report.contains(r#"demo_jobs counter metrics should have "_total" suffix"#),
        "{report}"
    );
}

#[test]
fn promtool_rejects_an_exposition_that_does_not_parse() {
    if promtool_or_skip("promtool_rejects_an_exposition_that_does_not_parse").is_none() {
        return;
    }
    let (ok, report) = promtool_check_metrics("demo_jobs_total{queue=\"fast\" 1\n").unwrap();
    assert!(!ok, "{report}");
    assert!(report.contains("parsing error"), "{report}");
}
