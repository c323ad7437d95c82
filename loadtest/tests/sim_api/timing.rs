//! Prompt evaluation and generation take the configured rates, scaled by the time scale.

use std::time::Duration;

use loadtest::sim::{Dialect, SimConfig};
use serde_json::{json, Value};

use crate::support::{assert_near, words, End, TestSim};

/// Streams a native completion of `prompt_tokens` prompt tokens and `n` generated ones; returns
/// the times from the request to the first and to the last token, and the final event.
async fn measure(cfg: SimConfig, prompt_tokens: usize, n: usize) -> (Duration, Duration, Value) {
    let sim = TestSim::start(cfg).await;
    let body = json!({"prompt": words(prompt_tokens), "n_predict": n, "stream": true});
    let mut open = sim.open("/completion", &body).await;
    assert_eq!(open.finish().await, End::Complete);
    let arrivals = open.token_arrivals();
    assert_eq!(arrivals.len(), n, "{}", open.text());
    let last = open.data_json().pop().expect("final event");
    assert_eq!(last["stop"], true);
    (
        arrivals[0] - open.started,
        arrivals[n - 1] - open.started,
        last,
    )
}

fn ms(v: &Value, key: &str) -> f64 {
    v["timings"][key].as_f64().expect(key)
}

#[tokio::test(start_paused = true)]
async fn prompt_and_generation_run_at_the_bitnet_rates_by_default() {
    // 120 tokens at 60 tok/s, then 36 tokens at 18 tok/s.
    let (ttft, total, last) = measure(SimConfig::new(Dialect::LlamaCpp), 120, 36).await;
    let tol = Duration::from_millis(3);
    assert_near(
        ttft,
        Duration::from_millis(2000) + Duration::from_secs(1) / 18,
        tol,
    );
    assert_near(total - ttft, Duration::from_secs(35) / 18, tol);
    assert_near(total, Duration::from_millis(4000), tol);

    assert_eq!(last["timings"]["prompt_n"], 120);
    assert_eq!(last["timings"]["predicted_n"], 36);
    assert!((ms(&last, "prompt_ms") - 2000.0).abs() < 0.01);
    assert!((ms(&last, "predicted_ms") - 2000.0).abs() < 0.01);
    assert!((ms(&last, "prompt_per_second") - 60.0).abs() < 0.01);
    assert!((ms(&last, "predicted_per_second") - 18.0).abs() < 0.01);
}

#[tokio::test(start_paused = true)]
async fn configured_rates_and_time_scale_set_every_delay() {
    let mut cfg = SimConfig::new(Dialect::LlamaCpp);
    cfg.prefill_rate = 200.0;
    cfg.decode_rate = 10.0;
    cfg.time_scale = 0.1;
    // 400 tokens at 200 tok/s is 2 s, scaled to 200 ms; 10 tok/s scaled is 10 ms a token.
    let (ttft, total, last) = measure(cfg, 400, 21).await;
    let tol = Duration::from_millis(3);
    assert_near(ttft, Duration::from_millis(210), tol);
    assert_near(total, Duration::from_millis(410), tol);
    // Timings report what the time took under the scale.
    assert!((ms(&last, "prompt_ms") - 200.0).abs() < 0.01);
    assert!((ms(&last, "predicted_per_second") - 100.0).abs() < 0.01);
}

#[tokio::test]
async fn tokens_arrive_on_real_timers_when_time_is_not_paused() {
    let mut cfg = SimConfig::new(Dialect::LlamaCpp);
    cfg.time_scale = 0.02;
    // Scaled: 120 tokens take 40 ms to evaluate and 36 tokens 40 ms to generate, at 900 tok/s,
    // finer than the timer's resolution, so tokens also come in batches. A loaded machine may
    // make the server late, never early.
    let (ttft, total, _) = measure(cfg, 120, 36).await;
    assert!(ttft >= Duration::from_micros(41_100), "{ttft:?}");
    assert!(ttft < Duration::from_millis(400), "{ttft:?}");
    assert!(total >= Duration::from_millis(80), "{total:?}");
    assert!(total < Duration::from_millis(800), "{total:?}");
}

#[tokio::test(start_paused = true)]
async fn zero_latency_answers_at_once_and_still_reports_modelled_timings() {
    let mut cfg = SimConfig::new(Dialect::LlamaCpp);
    cfg.zero_latency = true;
    let sim = TestSim::start(cfg).await;
    let reply = sim
        .post(
            "/completion",
            &json!({"prompt": words(120), "n_predict": 16}),
        )
        .await;
    assert_eq!(reply.status, 200);
    assert!(
        reply.elapsed < Duration::from_millis(1),
        "{:?}",
        reply.elapsed
    );
    assert!(reply.body.len() < 2048, "{} bytes", reply.body.len());
    let v = reply.json();
    assert_eq!(v["tokens_predicted"], 16);
    assert!((ms(&v, "prompt_ms") - 2000.0).abs() < 0.01);

    let stream = sim
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "stream": true}),
        )
        .await;
    assert!(stream.elapsed < Duration::from_millis(1));
    assert!(stream.text().ends_with("data: [DONE]\n\n"));
    assert_eq!(stream.text().matches("\"content\":\"").count(), 16);
}
