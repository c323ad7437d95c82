//! Failover before the first byte, never after it; health states and re-admission.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use gateway::backend::Health;
use testkit::fake_backend::{FakeBackend, Reply};

fn ok(_: &testkit::fake_backend::Seen) -> Reply {
    Reply::Json(200, completion_json("fine"))
}

/// Backend `a` has more slots, so least-loaded tries it first.
async fn pair(
    a: FakeBackend,
    b: FakeBackend,
    extra: &str,
) -> (FakeBackend, FakeBackend, TestGateway) {
    let gw = TestGateway::over(&[a.url(), b.url()], extra).await;
    (a, b, gw)
}

#[tokio::test]
async fn a_reset_before_the_answer_is_retried_on_another_backend_which_is_marked_down() {
    let a = FakeBackend::start("a", 4, |_| Reply::Reset).await;
    let b = FakeBackend::start("b", 1, ok).await;
    let (a, b, gw) = pair(a, b, "[health]\ninterval_secs = 60").await;
    let got = post_json(&gw.url("/v1/chat/completions"), &chat(0, false)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.headers["x-fake-backend"], "b");
    assert_eq!((a.count(), b.count()), (1, 1));
    assert_eq!(gw.gw.pools()[0].backends()[0].health(), Health::Down);
    assert_eq!(gw.inflight(0) + gw.inflight(1), 0);
}

#[tokio::test]
async fn a_refused_connection_fails_over() {
    let mut a = FakeBackend::start("a", 4, ok).await;
    let b = FakeBackend::start("b", 1, ok).await;
    let gw = TestGateway::over(&[a.url(), b.url()], "[health]\ninterval_secs = 60").await;
    a.stop();
    let got = post_json(&gw.url("/v1/chat/completions"), &chat(0, false)).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.headers["x-fake-backend"], "b");
    assert_eq!(gw.gw.pools()[0].backends()[0].health(), Health::Down);
}

#[tokio::test]
async fn a_503_answer_fails_over_and_the_backend_is_not_routed_to() {
    let a = FakeBackend::start("a", 4, |_| {
        Reply::Json(
            503,
            r#"{"error":{"message":"Loading model","type":"unavailable_error","code":503}}"#.into(),
        )
    })
    .await;
    let b = FakeBackend::start("b", 1, ok).await;
    let (a, _b, gw) = pair(a, b, "[health]\ninterval_secs = 60").await;
    let got = post_json(&gw.url("/v1/chat/completions"), &chat(0, false)).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.headers["x-fake-backend"], "b");
    assert_ne!(gw.gw.pools()[0].backends()[0].health(), Health::Up);
    for i in 1..4 {
        let got = post_json(&gw.url("/v1/chat/completions"), &chat(i, false)).await;
        assert_eq!(got.headers["x-fake-backend"], "b");
    }
    assert_eq!(a.count(), 1);
}

#[tokio::test]
async fn attempts_are_bounded_and_the_last_failure_is_an_openai_502() {
    let a = FakeBackend::start("a", 1, |_| Reply::Reset).await;
    let b = FakeBackend::start("b", 1, |_| Reply::Reset).await;
    let c = FakeBackend::start("c", 1, |_| Reply::Reset).await;
    let gw = TestGateway::over(&[a.url(), b.url(), c.url()], "[health]\ninterval_secs = 60").await;
    let got = post_json(&gw.url("/v1/chat/completions"), &chat(0, false)).await;
    got.assert_openai_error(502, "upstream_error");
    assert_eq!(
        a.count() + b.count() + c.count(),
        2,
        "default max_attempts is 2"
    );
}

#[tokio::test]
async fn once_bytes_reached_the_client_there_is_no_retry() {
    let a = FakeBackend::start("a", 4, |_| {
        Reply::SseThenBreak(vec![Bytes::from_static(b"data: {\"x\":1}\n\n")])
    })
    .await;
    let b = FakeBackend::start("b", 1, ok).await;
    let (a, b, gw) = pair(a, b, "[health]\ninterval_secs = 60").await;
    let got = post_json(&gw.url("/v1/chat/completions"), &chat(0, true)).await;
    assert_eq!(got.status, 200);
    assert!(got.text().starts_with("data: {\"x\":1}\n\n"));
    assert!(got.text().contains("upstream_stream_broken"));
    assert_eq!(
        (a.count(), b.count()),
        (1, 0),
        "no retry after the first byte"
    );
}

#[tokio::test]
async fn a_loading_backend_is_not_routed_to_until_it_is_up() {
    let a = FakeBackend::start("a", 4, ok).await;
    let b = FakeBackend::start("b", 1, ok).await;
    let gw = TestGateway::over(&[a.url(), b.url()], "").await;
    a.set_health(503);
    gw.wait_until(|g| g.pools()[0].backends()[0].health() == Health::Loading)
        .await;
    for i in 0..3 {
        let got = post_json(&gw.url("/v1/chat/completions"), &chat(i, false)).await;
        assert_eq!(got.headers["x-fake-backend"], "b");
    }
    let health = get(&gw.url("/health")).await;
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["backends"][0]["state"], "loading");
    a.set_health(200);
    gw.wait_until(|g| g.pools()[0].backends()[0].health() == Health::Up)
        .await;
    let got = post_json(&gw.url("/v1/chat/completions"), &chat(9, false)).await;
    assert_eq!(got.headers["x-fake-backend"], "a");
}

#[tokio::test]
async fn a_down_backend_is_probed_and_readmitted_when_healthy() {
    let a = FakeBackend::start("a", 4, ok).await;
    let gw = TestGateway::over(&[a.url()], "").await;
    gw.gw.pools()[0].backends()[0].set_health(Health::Down);
    gw.wait_until(|g| g.pools()[0].backends()[0].health() == Health::Up)
        .await;
    let got = post_json(&gw.url("/v1/chat/completions"), &chat(0, false)).await;
    assert_eq!(got.status, 200);
}

#[tokio::test]
async fn requests_queued_while_every_backend_is_loading_start_when_one_comes_up() {
    let a = FakeBackend::start("a", 1, ok).await;
    let gw = TestGateway::over(&[a.url()], "").await;
    a.set_health(503);
    gw.wait_until(|g| g.pools()[0].backends()[0].health() == Health::Loading)
        .await;
    let url = gw.url("/v1/chat/completions");
    let waiting = tokio::spawn(async move { post_json(&url, &chat(0, false)).await });
    gw.wait_until(|g| g.pools()[0].queue_len() == 1).await;
    a.set_health(200);
    let got = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.status, 200);
}

#[tokio::test]
async fn with_every_backend_down_requests_fail_fast_with_503() {
    let mut a = FakeBackend::start("a", 1, ok).await;
    let gw = TestGateway::over(&[a.url()], "").await;
    a.stop();
    gw.wait_until(|g| g.pools()[0].backends()[0].health() == Health::Down)
        .await;
    let got = post_json(&gw.url("/v1/chat/completions"), &chat(0, false)).await;
    got.assert_openai_error(503, "no_backend_available");
    let health = get(&gw.url("/health")).await;
    assert_eq!(health.status, 503);
    assert_eq!(health.json()["backends"][0]["state"], "down");
}

#[tokio::test]
async fn a_busy_backend_with_slow_health_is_not_marked_down_but_an_idle_one_is() {
    let busy = FakeBackend::start("busy", 2, |_| {
        Reply::Held(Box::new(Reply::Json(200, completion_json("done"))))
    })
    .await;
    let idle = FakeBackend::start("idle", 1, ok).await;
    let gw = TestGateway::over(
        &[busy.url(), idle.url()],
        "[health]\ninterval_secs = 0.05\ntimeout_secs = 0.1\nfailure_threshold = 2",
    )
    .await;
    let url = gw.url("/v1/chat/completions");
    let running = tokio::spawn(async move { post_json(&url, &chat(0, false)).await });
    gw.wait_until(|g| g.pools()[0].backends()[0].inflight() == 1)
        .await;
    busy.set_health_delay(Duration::from_secs(5));
    idle.set_health_delay(Duration::from_secs(5));
    // Many probe periods later: the idle slow one is down, the busy slow one is still up.
    gw.wait_until(|g| g.pools()[0].backends()[1].health() == Health::Down)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gw.gw.pools()[0].backends()[0].health(), Health::Up);
    busy.release(1);
    assert_eq!(running.await.unwrap().status, 200);
}
