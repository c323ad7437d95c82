//! Injected faults: crashes, hangs, mid-stream errors, slow starts and 503s.

use std::time::Duration;

use loadtest::sim::{Dialect, Exit, SimConfig};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout};

use crate::support::{fast, End, TestSim};

fn native(n: usize, stream: bool) -> Value {
    json!({"prompt": "Tell me a story", "n_predict": n, "stream": stream})
}

fn chat_stream(n: usize) -> Value {
    json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": n, "stream": true})
}

#[tokio::test(start_paused = true)]
async fn crash_after_n_takes_the_server_down_when_request_n_arrives() {
    let mut cfg = fast(Dialect::LlamaCpp);
    cfg.faults.crash_after = Some(2);
    let mut sim = TestSim::start(cfg).await;
    // Other endpoints do not count.
    assert_eq!(sim.get("/health").await.status, 200);
    assert_eq!(sim.post("/completion", &native(2, false)).await.status, 200);
    assert!(sim
        .try_post("/completion", &native(2, false))
        .await
        .is_err());
    assert_eq!(sim.ended().await, Exit::Crashed);
    assert!(TcpStream::connect(sim.addr).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn crash_after_tokens_breaks_request_n_mid_stream() {
    let mut cfg = fast(Dialect::LlamaCpp);
    cfg.faults.crash_after = Some(1);
    cfg.faults.crash_after_tokens = Some(3);
    let mut sim = TestSim::start(cfg).await;
    let mut open = sim.open("/completion", &native(10, true)).await;
    assert_eq!(open.status, 200);
    assert_eq!(open.finish().await, End::Broken);
    assert_eq!(open.token_arrivals().len(), 3);
    assert_eq!(sim.ended().await, Exit::Crashed);
}

#[tokio::test(start_paused = true)]
async fn hang_before_first_byte_hits_every_nth_request() {
    let mut cfg = fast(Dialect::LlamaCpp);
    cfg.faults.hang_before_first_byte = true;
    cfg.faults.every = 2;
    let sim = TestSim::start(cfg).await;
    assert_eq!(sim.post("/completion", &native(2, false)).await.status, 200);
    let hung = timeout(
        Duration::from_secs(3600),
        sim.post("/completion", &native(2, false)),
    )
    .await;
    assert!(hung.is_err(), "request 2 was answered");
    assert_eq!(sim.post("/completion", &native(2, false)).await.status, 200);
}

#[tokio::test(start_paused = true)]
async fn hang_mid_stream_holds_the_slot_until_the_client_leaves() {
    let mut cfg = fast(Dialect::LlamaCpp);
    cfg.faults.hang_mid_stream_after = Some(3);
    let sim = TestSim::start(cfg).await;
    let mut open = sim.open("/v1/chat/completions", &chat_stream(10)).await;
    let more = timeout(Duration::from_secs(3600), open.finish()).await;
    assert!(more.is_err(), "the stream ended: {}", open.text());
    assert_eq!(open.token_arrivals().len(), 3);
    assert!(!open.text().contains("[DONE]"));
    assert_eq!(sim.metric("requests_processing").await, 1.0);
    drop(open);
    sleep(Duration::from_millis(10)).await;
    assert_eq!(sim.metric("requests_processing").await, 0.0);
}

#[tokio::test(start_paused = true)]
async fn upstream_mid_stream_error_is_a_data_event_without_done() {
    let mut cfg = fast(Dialect::LlamaCpp);
    cfg.faults.error_mid_stream_after = Some(2);
    let sim = TestSim::start(cfg).await;
    let mut open = sim.open("/v1/chat/completions", &chat_stream(10)).await;
    assert_eq!(open.status, 200);
    assert_eq!(open.finish().await, End::Complete);
    assert_eq!(open.token_arrivals().len(), 2);
    let last = open.events().pop().expect("events");
    assert!(!open.text().contains("[DONE]"));
    let data: Value =
        serde_json::from_str(last.strip_prefix("data: ").expect("a data event")).expect("json");
    assert_eq!(data["error"]["code"], 500);
    assert_eq!(data["error"]["type"], "server_error");
}

#[tokio::test(start_paused = true)]
async fn bitnet_mid_stream_error_is_an_error_field_then_done() {
    let mut cfg = fast(Dialect::Bitnet);
    cfg.faults.error_mid_stream_after = Some(2);
    let sim = TestSim::start(cfg).await;
    let mut open = sim.open("/v1/chat/completions", &chat_stream(10)).await;
    assert_eq!(open.status, 200);
    assert_eq!(open.finish().await, End::Complete);
    assert_eq!(open.token_arrivals().len(), 2);
    let events = open.events();
    let [.., error, done] = &events[..] else {
        panic!("too few events: {events:?}");
    };
    assert_eq!(done, "data: [DONE]");
    let body: Value =
        serde_json::from_str(error.strip_prefix("error: ").expect("an error field")).expect("json");
    assert_eq!(body["code"], 500);
    assert_eq!(body["type"], "server_error");
}

#[tokio::test(start_paused = true)]
async fn errors_before_any_byte_is_sent_are_plain_http_500s() {
    let mut cfg = fast(Dialect::LlamaCpp);
    cfg.faults.error_mid_stream_after = Some(0);
    let sim = TestSim::start(cfg).await;
    let streamed = sim.post("/v1/chat/completions", &chat_stream(10)).await;
    assert_eq!(streamed.status, 500);
    assert_eq!(streamed.json()["error"]["type"], "server_error");

    let mut cfg = fast(Dialect::Bitnet);
    cfg.faults.error_mid_stream_after = Some(4);
    let sim = TestSim::start(cfg).await;
    let whole = sim.post("/completion", &native(10, false)).await;
    assert_eq!(whole.status, 500);
    assert_eq!(whole.json()["error"]["code"], 500);
}

#[tokio::test(start_paused = true)]
async fn slow_start_delays_the_first_byte() {
    let mut cfg = SimConfig::new(Dialect::Bitnet);
    cfg.faults.slow_start = Duration::from_secs(5);
    let sim = TestSim::start(cfg).await;
    // The fork answers streams with headers at once, so the head is the first byte.
    let open = sim.open("/completion", &native(2, true)).await;
    let first_byte = open.head_at - open.started;
    assert!(
        first_byte >= Duration::from_secs(5) && first_byte < Duration::from_millis(5010),
        "{first_byte:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn fail_503_refuses_selected_requests_while_health_stays_ok() {
    let mut cfg = fast(Dialect::LlamaCpp);
    cfg.faults.fail_503 = true;
    cfg.faults.every = 2;
    let sim = TestSim::start(cfg).await;
    assert_eq!(sim.post("/completion", &native(2, false)).await.status, 200);
    let refused = sim.post("/completion", &native(2, false)).await;
    assert_eq!(refused.status, 503);
    assert_eq!(
        refused.json(),
        json!({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}})
    );
    assert_eq!(sim.get("/health").await.status, 200);
    assert_eq!(sim.post("/completion", &native(2, false)).await.status, 200);
}
