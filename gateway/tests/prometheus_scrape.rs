//! A real Prometheus scrapes a gateway in front of two real llama-servers; after traffic,
//! its query API shows the per-backend series with the values the traffic implies, and
//! `promtool check metrics` accepts the exposition.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use testkit::llama_server::{self, LlamaServer, LlamaServerOpts};
use testkit::prometheus::{self as prom, Prometheus};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_per_backend_token_counts_equal_to_what_clients_received() {
    let test = "prometheus_sees_per_backend_token_counts_equal_to_what_clients_received";
    let Some(llama) = llama_server::binary_or_skip(test) else {
        return;
    };
    let Some(prom_bin) = prom::binary_or_skip(test) else {
        return;
    };
    let servers: Vec<LlamaServer> = (0..2)
        .map(|_| LlamaServer::start(&llama, &LlamaServerOpts::default()).unwrap())
        .collect();
    let urls: Vec<String> = servers.iter().map(|s| s.url()).collect();
    let gw = TestGateway::over(&urls, "").await;

    // Traffic: streamed with include_usage and not, spread over both backends.
    let mut sent: HashMap<String, u64> = HashMap::new();
    for i in 0..6 {
        let stream = i % 2 == 0;
        let body = format!(
            r#"{{"model":"m","stream":{stream},"stream_options":{{"include_usage":true}},"max_tokens":{},"messages":[{{"role":"user","content":"count {i}"}}]}}"#,
            8 + i
        );
        let got = post_json(&gw.url("/v1/chat/completions"), &body).await;
        assert_eq!(got.status, 200, "{}", got.text());
        let backend = got.headers["x-backend"].to_str().unwrap().to_string();
        let usage = if stream {
            let text = got.text();
            let ev = text
                .split("\n\n")
                .filter_map(|e| e.strip_prefix("data: "))
                .filter(|d| *d != "[DONE]")
                .map(|d| serde_json::from_str::<serde_json::Value>(d).unwrap())
                .find(|v| v["usage"].is_object())
                .expect("a usage chunk");
            ev["usage"].clone()
        } else {
            got.json()["usage"].clone()
        };
        *sent.entry(backend).or_default() += usage["completion_tokens"].as_u64().unwrap();
    }
    assert_eq!(sent.len(), 2, "both backends served: {sent:?}");

    let prometheus = Prometheus::start(
        &prom_bin,
        &[gw.addr.to_string()],
        Duration::from_millis(200),
    )
    .unwrap();
    for (backend, tokens) in &sent {
        let q =
            format!("bitnet_gateway_completion_tokens_total{{backend=\"{backend}\",model=\"m\"}}");
        let want = *tokens as f64;
        prometheus
            .wait_for(
                &q,
                |s| s.len() == 1 && s[0].1 == want,
                Duration::from_secs(30),
            )
            .unwrap_or_else(|e| panic!("{q} never reached {want}: {e}"));
        let q = format!("bitnet_gateway_backend_up{{backend=\"{backend}\"}}");
        let up = prometheus.query(&q).unwrap();
        assert_eq!(up.len(), 1);
        assert_eq!(up[0].1, 1.0);
    }
    let total = prometheus
        .query(
            "sum(bitnet_gateway_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"})",
        )
        .unwrap();
    assert_eq!(total[0].1, 6.0);
    let ttft = prometheus
        .query("sum(bitnet_gateway_time_to_first_token_seconds_count)")
        .unwrap();
    assert_eq!(ttft[0].1, 6.0);
    for series in [
        "bitnet_gateway_backend_slots",
        "bitnet_gateway_queue_depth",
        "process_resident_memory_bytes",
    ] {
        assert!(
            !prometheus.query(series).unwrap().is_empty(),
            "{series} missing"
        );
    }

    if prom::promtool_or_skip(test).is_some() {
        let text = get(&gw.url("/metrics")).await.text();
        let (ok, out) = prom::promtool_check_metrics(&text).unwrap();
        assert!(ok, "promtool check metrics failed:\n{out}");
    }
}
