//! Slots: FIFO waiting beyond the slot count, pinning with `id_slot`, release on disconnect.

use std::time::Duration;

use loadtest::sim::{Dialect, SimConfig};
use serde_json::{json, Value};
use tokio::time::{sleep, Instant};

use crate::support::{assert_near, words, End, TestSim};

/// 120 prompt tokens (2 s at 60 tok/s) starting with `tag`, then 18 tokens (1 s at 18 tok/s).
fn two_plus_one_seconds(tag: &str) -> Value {
    json!({"prompt": format!("{tag} {}", words(119)), "n_predict": 18, "stream": true})
}

#[tokio::test(start_paused = true)]
async fn requests_beyond_the_slots_wait_their_turn_and_count_as_deferred() {
    let mut cfg = SimConfig::new(Dialect::LlamaCpp);
    cfg.slots = 2;
    let sim = TestSim::start(cfg).await;
    let t0 = Instant::now();
    let mut runs = Vec::new();
    for tag in ["a", "b", "c"] {
        let api = sim.api();
        runs.push(tokio::spawn(async move {
            let mut open = api.open("/completion", &two_plus_one_seconds(tag)).await;
            assert_eq!(open.finish().await, End::Complete);
            (
                open.token_arrivals()[0],
                open.frames.last().expect("frames").0,
            )
        }));
        // Arrive in order.
        sleep(Duration::from_millis(1)).await;
    }

    sleep(Duration::from_secs(1)).await;
    assert_eq!(sim.occupancy().await, (2.0, 1.0));
    let slots = sim.get("/slots").await.json();
    let busy: Vec<bool> = slots
        .as_array()
        .expect("array")
        .iter()
        .map(|s| s["is_processing"].as_bool().expect("bool"))
        .collect();
    assert_eq!(busy, [true, true]);

    let mut results = Vec::new();
    for run in runs {
        results.push(run.await.expect("run"));
    }
    let ttft = |i: usize| results[i].0 - t0;
    let first_token = Duration::from_secs(2) + Duration::from_secs(1) / 18;
    let tol = Duration::from_millis(5);
    assert_near(ttft(0), first_token, tol);
    assert_near(ttft(1), first_token, tol);
    // The third waits for a slot (3 s), then evaluates its own prompt.
    assert_near(ttft(2), Duration::from_secs(3) + first_token, tol);
    assert_eq!(sim.occupancy().await, (0.0, 0.0));
}

#[tokio::test(start_paused = true)]
async fn id_slot_pins_a_request_to_that_slot_and_its_cache() {
    let sim = TestSim::start(SimConfig::new(Dialect::LlamaCpp)).await;
    let prompt = words(50);
    let on = |slot: usize| json!({"prompt": prompt, "n_predict": 2, "id_slot": slot});
    let first = sim.post("/completion", &on(2)).await.json();
    assert_eq!(first["id_slot"], 2);
    let again = sim.post("/completion", &on(2)).await.json();
    assert_eq!(again["timings"]["cache_n"], 49);
    // Slot 3 never saw the prompt, although slot 2 holds it.
    let elsewhere = sim.post("/completion", &on(3)).await.json();
    assert_eq!(elsewhere["id_slot"], 3);
    assert_eq!(elsewhere["timings"]["cache_n"], 0);
}

#[tokio::test(start_paused = true)]
async fn upstream_refuses_an_id_slot_it_does_not_have() {
    let sim = TestSim::start(SimConfig::new(Dialect::LlamaCpp)).await;
    let reply = sim
        .post("/completion", &json!({"prompt": "hi", "id_slot": 4}))
        .await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"]["type"], "invalid_request_error");
}

#[tokio::test(start_paused = true)]
async fn bitnet_defers_a_request_for_a_missing_slot_forever() {
    let sim = TestSim::start(SimConfig::new(Dialect::Bitnet)).await;
    let api = sim.api();
    let waiting = tokio::spawn(async move {
        api.post("/completion", &json!({"prompt": "hi", "id_slot": 3}))
            .await
    });
    sleep(Duration::from_secs(600)).await;
    assert!(!waiting.is_finished());
    assert_eq!(sim.occupancy().await, (0.0, 1.0));
    // The only slot still serves everyone else.
    let other = sim.post("/completion", &json!({"prompt": "hi"})).await;
    assert_eq!(other.status, 200);
    waiting.abort();
}

/// Starts a 10 s prompt evaluation, abandons it after 1 s, and reports `requests_processing`
/// just after and 10 s later.
async fn processing_after_client_leaves(dialect: Dialect) -> (f64, f64) {
    let sim = TestSim::start(SimConfig::new(dialect)).await;
    let api = sim.api();
    let body = json!({"prompt": words(600), "n_predict": 4, "stream": true});
    let client = tokio::spawn(async move {
        let mut open = api.open("/completion", &body).await;
        open.finish().await
    });
    sleep(Duration::from_secs(1)).await;
    assert_eq!(sim.occupancy().await, (1.0, 0.0));
    client.abort();
    let _ = client.await;
    sleep(Duration::from_millis(50)).await;
    let soon = sim.metric("requests_processing").await;
    sleep(Duration::from_secs(10)).await;
    (soon, sim.metric("requests_processing").await)
}

#[tokio::test(start_paused = true)]
async fn upstream_frees_the_slot_as_soon_as_the_client_leaves() {
    assert_eq!(
        processing_after_client_leaves(Dialect::LlamaCpp).await,
        (0.0, 0.0)
    );
}

#[tokio::test(start_paused = true)]
async fn bitnet_keeps_evaluating_for_a_departed_client_until_it_writes() {
    assert_eq!(
        processing_after_client_leaves(Dialect::Bitnet).await,
        (1.0, 0.0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_that_does_not_stream_shows_its_progress_as_it_goes() {
    // Like the real server's, a non-streamed answer's tokens show in /slots and /metrics
    // while it is generated, not only at its end.
    let sim = TestSim::start(SimConfig::new(Dialect::LlamaCpp)).await;
    let api = sim.api();
    let run = tokio::spawn(async move {
        // 6 prompt tokens (0.1 s), then 36 tokens at 18 tok/s (2 s).
        let body = json!({"prompt": words(6), "n_predict": 36, "stream": false});
        api.post("/completion", &body).await.json()
    });
    sleep(Duration::from_millis(100 + 1000 + 10)).await;
    let slots = sim.get("/slots").await.json();
    let busy = slots
        .as_array()
        .expect("array")
        .iter()
        .find(|s| s["is_processing"] == true)
        .unwrap_or_else(|| panic!("no slot busy: {slots}"))
        .clone();
    let decoded = busy["next_token"]["n_decoded"].as_u64().expect("n_decoded");
    assert!(
        (14..=18).contains(&decoded),
        "halfway, {decoded} decoded: {busy}"
    );
    let predicted = sim.metric("tokens_predicted_total").await;
    assert_eq!(predicted, decoded as f64);
    let answer = run.await.expect("run");
    assert_eq!(answer["tokens_predicted"], 36, "{answer}");
    assert_eq!(sim.metric("tokens_predicted_total").await, 36.0);
}
