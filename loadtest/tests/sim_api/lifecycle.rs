//! Loading, and the two ways of shutting down.

use std::time::Duration;

use loadtest::sim::{Dialect, Exit, SimConfig};
use serde_json::json;
use tokio::net::TcpStream;
use tokio::time::sleep;

use crate::support::{chat, End, TestSim};

#[tokio::test(start_paused = true)]
async fn health_reports_loading_until_the_load_time_has_passed() {
    let mut cfg = SimConfig::new(Dialect::LlamaCpp);
    cfg.load_time = Duration::from_secs(30);
    let sim = TestSim::start(cfg).await;
    let loading = sim.get("/health").await;
    assert_eq!(loading.status, 503);
    assert_eq!(
        loading.json(),
        json!({"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}})
    );
    assert_eq!(
        sim.post("/v1/chat/completions", &chat("hi")).await.status,
        503
    );

    sleep(Duration::from_secs(29)).await;
    assert_eq!(sim.get("/health").await.status, 503);
    sleep(Duration::from_secs(1)).await;
    let ready = sim.get("/health").await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json(), json!({"status": "ok"}));
    assert!(ready.content_type().starts_with("application/json"));
}

/// Starts a 4 s stream, asks for a shutdown 1 s in, and returns how the stream and serving
/// ended and whether the port still accepted connections afterwards.
async fn shutdown_mid_stream(dialect: Dialect) -> (End, bool, Exit) {
    let sim = TestSim::start(SimConfig::new(dialect)).await;
    let addr = sim.addr;
    let body = json!({"prompt": "Tell me a story", "n_predict": 72, "stream": true});
    let mut open = sim.open("/completion", &body).await;
    sleep(Duration::from_secs(1)).await;
    let exit = tokio::spawn(sim.shutdown());
    let end = open.finish().await;
    let exit = exit.await.expect("shutdown task");
    let done = open.text().contains("\"stop\":true");
    assert_eq!(done, end == End::Complete, "{}", open.text());
    (end, TcpStream::connect(addr).await.is_ok(), exit)
}

#[tokio::test(start_paused = true)]
async fn upstream_shutdown_finishes_in_flight_requests_first() {
    assert_eq!(
        shutdown_mid_stream(Dialect::LlamaCpp).await,
        (End::Complete, false, Exit::Shutdown)
    );
}

#[tokio::test(start_paused = true)]
async fn bitnet_shutdown_drops_in_flight_requests() {
    assert_eq!(
        shutdown_mid_stream(Dialect::Bitnet).await,
        (End::Broken, false, Exit::Shutdown)
    );
}
