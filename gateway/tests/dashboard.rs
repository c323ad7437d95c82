//! The Grafana dashboard in `deploy/grafana/` checked against a real Prometheus: it is a
//! well-formed dashboard, every query parses, and every panel shows data once the series the
//! gateway documents (README, "Metrics and logs") exist.
//!
//! The Prometheus tests skip (loudly) when Prometheus is missing, except under CI or
//! `REQUIRE_PROMETHEUS=1`, where a missing binary fails them.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::TcpListener;
use std::ops::Range;
use std::time::Duration;

use serde_json::Value;
use testkit::prometheus::{binary_or_skip, ExpositionServer, Prometheus};

const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/grafana/bitnet-gateway.json"
);
/// Stands in for Grafana's interval variables: wide enough to hold several test scrapes.
const INTERVAL: &str = "1m";
const SCRAPE_INTERVAL: Duration = Duration::from_millis(100);
/// Generous for a loaded two-core machine; Prometheus alone takes about 5 s to run its first
/// scrape.
const WAIT: Duration = Duration::from_secs(30);

fn dashboard() -> Value {
    let text = std::fs::read_to_string(DASHBOARD).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD} is not JSON: {e}"))
}

/// Every panel, including those nested in collapsed rows.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    for panel in dashboard["panels"].as_array().expect("a panels array") {
        all.push(panel);
        all.extend(panel["panels"].as_array().into_iter().flatten());
    }
    all
}

fn variables(dashboard: &Value) -> Vec<&Value> {
    dashboard["templating"]["list"]
        .as_array()
        .expect("a templating list")
        .iter()
        .collect()
}

fn variable_names(dashboard: &Value) -> Vec<String> {
    variables(dashboard)
        .iter()
        .map(|v| v["name"].as_str().expect("a variable name").to_owned())
        .collect()
}

/// `(panel title, expression)` for every query of every panel.
fn panel_queries(dashboard: &Value) -> Vec<(String, String)> {
    panels(dashboard)
        .into_iter()
        .flat_map(|panel| {
            let title = panel["title"].as_str().unwrap_or("").to_owned();
            panel["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |t| (title.clone(), t["expr"].as_str().unwrap_or("").to_owned()))
        })
        .collect()
}

/// `(variable name, series selector, label)` for every `label_values(selector, label)` variable.
fn label_values_queries(dashboard: &Value) -> Vec<(String, String, String)> {
    variables(dashboard)
        .into_iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let name = v["name"].as_str().unwrap().to_owned();
            let definition = v["definition"].as_str().unwrap_or("");
            let (selector, label) = definition
                .strip_prefix("label_values(")
                .and_then(|rest| rest.strip_suffix(')'))
                .and_then(|args| args.rsplit_once(','))
                .unwrap_or_else(|| panic!("variable {name}: unexpected query {definition:?}"));
            (name, selector.trim().to_owned(), label.trim().to_owned())
        })
        .collect()
}

/// Each `$name`, `${name}` or `${name:format}` in `expr`: the name and the byte range the
/// reference covers.
fn variable_uses(expr: &str) -> Vec<(&str, Range<usize>)> {
    let mut uses = Vec::new();
    let mut from = 0;
    while let Some(found) = expr[from..].find('$') {
        let start = from + found;
        let after = &expr[start + 1..];
        let (name, len) = if let Some(braced) = after.strip_prefix('{') {
            let inner = &braced[..braced.find('}').expect("an unterminated ${")];
            (inner.split(':').next().unwrap_or(inner), inner.len() + 2)
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        from = start + 1 + len;
        uses.push((name, start..from));
    }
    uses
}

/// `expr` with Grafana's variables replaced by values Prometheus accepts: interval variables
/// by [`INTERVAL`] and the dashboard's own (multi-value, regex-matched) variables by `.*`.
fn instantiate(expr: &str, variables: &[String]) -> String {
    let mut out = String::new();
    let mut copied = 0;
    for (name, range) in variable_uses(expr) {
        let value = match name {
            "__rate_interval" | "__interval" | "__range" => INTERVAL,
            _ if variables.iter().any(|v| v == name) => ".*",
            _ => panic!("{expr:?} uses ${name}, which the dashboard does not define"),
        };
        out.push_str(&expr[copied..range.start]);
        out.push_str(value);
        copied = range.end;
    }
    out.push_str(&expr[copied..]);
    out
}

#[test]
fn dashboard_is_an_importable_grafana_dashboard() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().unwrap() >= 36, "schemaVersion");
    assert_eq!(d["uid"], "bitnet-gateway");
    assert!(
        d["id"].is_null(),
        "an id would clash with the importing instance's dashboards"
    );

    let vars = variables(&d);
    let datasource = vars
        .iter()
        .find(|v| v["name"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(datasource["type"], "datasource");
    assert_eq!(datasource["query"], "prometheus");
    let backend = vars
        .iter()
        .find(|v| v["name"] == "backend")
        .expect("a backend variable");
    assert!(
        backend["definition"]
            .as_str()
            .unwrap()
            .starts_with("label_values("),
        "{backend}"
    );

    let mut ids = HashSet::new();
    for panel in panels(&d) {
        let title = panel["title"].as_str().expect("every panel has a title");
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "duplicate id: {title}"
        );
        let pos = &panel["gridPos"];
        assert!(
            pos["x"].as_u64().unwrap() + pos["w"].as_u64().unwrap() <= 24,
            "{title} is wider than the grid"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no query");
        let mut refs = HashSet::new();
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
            assert!(refs.insert(target["refId"].as_str().unwrap()), "{title}");
            assert!(!target["expr"].as_str().unwrap().is_empty(), "{title}");
        }
    }
}

#[test]
fn every_variable_a_query_uses_is_defined_and_regex_matched() {
    let d = dashboard();
    let names = variable_names(&d);
    let queries = panel_queries(&d);
    assert!(queries.len() > 20, "only {} queries", queries.len());
    let mut used = HashSet::new();
    for (title, expr) in &queries {
        for (name, range) in variable_uses(expr) {
            if name.starts_with("__") {
                continue;
            }
            assert!(
                names.iter().any(|n| n == name),
                "{title}: ${name} is not defined"
            );
            // Multi-value variables expand to `a|b`, which only a regex matcher understands.
            assert!(
                expr[..range.start].ends_with("=~\""),
                "{title}: ${name} outside `=~\"...\"`: {expr}"
            );
            used.insert(name.to_owned());
        }
    }
    for name in ["backend", "model", "gateway_job"] {
        assert!(used.contains(name), "no query uses ${name}");
    }
}

#[test]
fn instantiate_replaces_every_variable_form() {
    let names = vec!["backend".to_owned()];
    assert_eq!(
        instantiate(
            r#"rate(x{backend=~"$backend"}[$__rate_interval]) + y{b=~"${backend:regex}"}"#,
            &names
        ),
        r#"rate(x{backend=~".*"}[1m]) + y{b=~".*"}"#
    );
}

#[test]
fn every_dashboard_query_parses_in_prometheus() {
    let Some(binary) = binary_or_skip("every_dashboard_query_parses_in_prometheus") else {
        return;
    };
    let d = dashboard();
    let names = variable_names(&d);
    let prometheus = Prometheus::start(&binary, &[], SCRAPE_INTERVAL).unwrap();

    let mut failures = Vec::new();
    for (title, expr) in panel_queries(&d) {
        let promql = instantiate(&expr, &names);
        if let Err(e) = prometheus.query(&promql) {
            failures.push(format!("{title}: {e}"));
        }
    }
    for (name, selector, _) in label_values_queries(&d) {
        if let Err(e) = prometheus.query(&selector) {
            failures.push(format!("variable {name}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_dashboard_panel_shows_data_for_the_documented_series() {
    let Some(binary) = binary_or_skip("every_dashboard_panel_shows_data_for_the_documented_series")
    else {
        return;
    };
    let d = dashboard();
    let names = variable_names(&d);
    let exporter = ExpositionServer::serve(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        documented_series(),
    )
    .unwrap();
    let prometheus = Prometheus::start(&binary, &[exporter.target()], SCRAPE_INTERVAL).unwrap();

    // rate() needs two samples in its window, and everything needs the first scrape.
    prometheus
        .wait_for(
            "count_over_time(up[1m])",
            |r| r.first().is_some_and(|s| s.1 >= 2.0),
            WAIT,
        )
        .unwrap();
    let mut failures = Vec::new();
    for (title, expr) in panel_queries(&d) {
        let promql = instantiate(&expr, &names);
        match prometheus.query(&promql) {
            Ok(samples) if samples.is_empty() => {
                failures.push(format!("{title}: no data: {promql}"))
            }
            Ok(_) => {}
            Err(e) => failures.push(format!("{title}: {e}")),
        }
    }
    for (name, selector, label) in label_values_queries(&d) {
        let samples = prometheus.query(&selector).unwrap();
        if !samples
            .iter()
            .any(|(labels, _)| labels.get(&label).is_some_and(|v| !v.is_empty()))
        {
            failures.push(format!(
                "variable {name}: no {label} label on {selector}: {samples:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// One sample of every series the dashboard reads, under the names and labels the README
/// documents for the gateway, plus the runner's and llama-server's series.
fn documented_series() -> String {
    const B: &str = r#"backend="127.0.0.1:8101""#;
    const BM: &str = r#"backend="127.0.0.1:8101",model="falcon3-10b""#;
    const BME: &str =
        r#"backend="127.0.0.1:8101",model="falcon3-10b",endpoint="/v1/chat/completions""#;
    const M: &str = r#"model="falcon3-10b""#;
    const RUNNER: &str = r#"instance="falcon-1""#;
    let ok = format!(r#"{BME},status="200""#);
    let failed = format!(r#"{BME},status="502""#);
    let full = format!(r#"{M},reason="full""#);
    let connect = format!(r#"{B},kind="connect""#);

    let mut t = String::new();
    series(
        &mut t,
        "bitnet_gateway_requests_total",
        "counter",
        &[
            (&ok, 40.0),
            (&failed, 2.0),
            // Answered by the gateway itself: no backend, no model.
            (r#"backend="",model="",endpoint="other",status="404""#, 1.0),
        ],
    );
    histogram(&mut t, "bitnet_gateway_request_duration_seconds", BME);
    histogram(&mut t, "bitnet_gateway_time_to_first_token_seconds", BM);
    histogram(&mut t, "bitnet_gateway_generation_tokens_per_second", BM);
    histogram(&mut t, "bitnet_gateway_queue_wait_seconds", M);
    series(
        &mut t,
        "bitnet_gateway_prompt_tokens_total",
        "counter",
        &[(BM, 9000.0)],
    );
    series(
        &mut t,
        "bitnet_gateway_prompt_tokens_cached_total",
        "counter",
        &[(BM, 8000.0)],
    );
    series(
        &mut t,
        "bitnet_gateway_completion_tokens_total",
        "counter",
        &[(BM, 700.0)],
    );
    series(
        &mut t,
        "bitnet_gateway_backend_inflight",
        "gauge",
        &[(B, 2.0)],
    );
    series(&mut t, "bitnet_gateway_backend_slots", "gauge", &[(B, 4.0)]);
    series(&mut t, "bitnet_gateway_backend_up", "gauge", &[(B, 1.0)]);
    series(&mut t, "bitnet_gateway_queue_depth", "gauge", &[(M, 3.0)]);
    series(
        &mut t,
        "bitnet_gateway_queue_rejected_total",
        "counter",
        &[(&full, 1.0)],
    );
    series(
        &mut t,
        "bitnet_gateway_upstream_errors_total",
        "counter",
        &[(&connect, 1.0)],
    );
    series(
        &mut t,
        "bitnet_gateway_retries_total",
        "counter",
        &[(B, 1.0)],
    );
    series(
        &mut t,
        "bitnet_gateway_client_disconnects_total",
        "counter",
        &[(B, 1.0)],
    );
    series(
        &mut t,
        "process_cpu_seconds_total",
        "counter",
        &[("", 12.5)],
    );
    series(
        &mut t,
        "process_resident_memory_bytes",
        "gauge",
        &[("", 3e7)],
    );
    series(&mut t, "process_open_fds", "gauge", &[("", 20.0)]);
    series(
        &mut t,
        "bitnet_runner_instance_up",
        "gauge",
        &[(RUNNER, 1.0)],
    );
    series(
        &mut t,
        "bitnet_runner_restarts_total",
        "counter",
        &[(RUNNER, 1.0)],
    );
    series(
        &mut t,
        "bitnet_runner_instance_uptime_seconds",
        "gauge",
        &[(RUNNER, 60.0)],
    );
    series(
        &mut t,
        "bitnet_runner_instance_rss_bytes",
        "gauge",
        &[(RUNNER, 5e9)],
    );
    series(
        &mut t,
        "llamacpp:requests_processing",
        "gauge",
        &[("", 1.0)],
    );
    series(&mut t, "llamacpp:requests_deferred", "gauge", &[("", 0.0)]);
    t
}

/// Appends a metric family of `kind` with one sample per `(labels, value)`.
fn series(out: &mut String, name: &str, kind: &str, samples: &[(&str, f64)]) {
    writeln!(out, "# HELP {name} Test series.\n# TYPE {name} {kind}").unwrap();
    for (labels, value) in samples {
        writeln!(out, "{name}{{{labels}}} {value}").unwrap();
    }
}

/// Appends a histogram family with three buckets for one label set.
fn histogram(out: &mut String, name: &str, labels: &str) {
    writeln!(out, "# HELP {name} Test series.\n# TYPE {name} histogram").unwrap();
    for (le, count) in [("1", 3), ("10", 7), ("+Inf", 9)] {
        writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {count}").unwrap();
    }
    writeln!(out, "{name}_sum{{{labels}}} 42\n{name}_count{{{labels}}} 9").unwrap();
}
