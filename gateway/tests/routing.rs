//! Slot-aware least-loaded routing and the bounded FIFO queue, against fake backends.

mod common;

use std::time::Duration;

use common::*;
use testkit::fake_backend::FakeBackend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn requests_go_to_the_backend_with_most_free_slots_and_never_exceed_slots() {
    let a = FakeBackend::start("a", 3, held()).await;
    let b = FakeBackend::start("b", 1, held()).await;
    let gw = TestGateway::over(&[a.url(), b.url()], "").await;
    let url = gw.url("/v1/chat/completions");
    let mut tasks = Vec::new();
    // a has 3 free, b 1: the first two must go to a; then 1:1 ties; then both are full.
    for i in 0..2 {
        let u = url.clone();
        tasks.push(tokio::spawn(
            async move { post_json(&u, &chat(i, false)).await },
        ));
        wait_for(|| a.active() + b.active() == i + 1).await;
        assert_eq!((a.active(), b.active()), (i + 1, 0), "request {i}");
    }
    for i in 2..5 {
        let u = url.clone();
        tasks.push(tokio::spawn(
            async move { post_json(&u, &chat(i, false)).await },
        ));
    }
    wait_for(|| a.active() + b.active() == 4 && gw.queue_len() == 1).await;
    assert_eq!((a.active(), b.active()), (3, 1), "slots are never exceeded");
    assert_eq!((gw.inflight(0), gw.inflight(1)), (3, 1));
    a.release(10);
    b.release(10);
    for t in tasks {
        assert_eq!(t.await.unwrap().status, 200);
    }
    assert_eq!(a.count() + b.count(), 5);
    wait_for(|| gw.inflight(0) == 0 && gw.inflight(1) == 0).await;
}

#[tokio::test]
async fn queued_requests_are_served_in_arrival_order() {
    let be = FakeBackend::start("a", 1, held()).await;
    let gw = TestGateway::over(&[be.url()], "").await;
    let url = gw.url("/v1/chat/completions");
    let mut tasks = Vec::new();
    for i in 0..5 {
        let u = url.clone();
        tasks.push(tokio::spawn(
            async move { post_json(&u, &chat(i, false)).await },
        ));
        // Wait until it is running or queued, so arrival order is certain.
        wait_for(|| be.count() + gw.queue_len() == i + 1).await;
    }
    for i in 1..=5 {
        be.release(1);
        wait_for(|| be.count() == (i + 1).min(5)).await;
    }
    be.release(10);
    for t in tasks {
        assert_eq!(t.await.unwrap().status, 200);
    }
    let order: Vec<String> = be.seen().iter().map(|s| s.first_message()).collect();
    let expected: Vec<String> = (0..5).map(|i| format!("request {i}")).collect();
    assert_eq!(order, expected);
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after() {
    let be = FakeBackend::start("a", 1, held()).await;
    let gw = TestGateway::over(&[be.url()], "[queue]\nmax = 1").await;
    let url = gw.url("/v1/chat/completions");
    let u = url.clone();
    let first = tokio::spawn(async move { post_json(&u, &chat(0, false)).await });
    wait_for(|| be.active() == 1).await;
    let u = url.clone();
    let second = tokio::spawn(async move { post_json(&u, &chat(1, false)).await });
    wait_for(|| gw.queue_len() == 1).await;
    let third = post_json(&url, &chat(2, false)).await;
    third.assert_openai_error(429, "queue_full");
    let retry: u64 = third.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    be.release(2);
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(second.await.unwrap().status, 200);
}

#[tokio::test]
async fn a_request_that_waits_past_the_queue_timeout_gets_503_with_retry_after() {
    let be = FakeBackend::start("a", 1, held()).await;
    let gw = TestGateway::over(&[be.url()], "[queue]\ntimeout_secs = 0.3").await;
    let url = gw.url("/v1/chat/completions");
    let u = url.clone();
    let first = tokio::spawn(async move { post_json(&u, &chat(0, false)).await });
    wait_for(|| be.active() == 1).await;
    let started = std::time::Instant::now();
    let late = post_json(&url, &chat(1, false)).await;
    late.assert_openai_error(503, "queue_timeout");
    assert!(late.headers.contains_key("retry-after"));
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(gw.queue_len(), 0, "the timed-out request left the queue");
    assert_eq!(be.count(), 1, "it never reached the backend");
    be.release(1);
    assert_eq!(first.await.unwrap().status, 200);
}

#[tokio::test]
async fn a_client_that_disconnects_while_queued_leaves_the_queue_at_once() {
    let be = FakeBackend::start("a", 1, held()).await;
    let gw = TestGateway::over(&[be.url()], "").await;
    let url = gw.url("/v1/chat/completions");
    let u = url.clone();
    let first = tokio::spawn(async move { post_json(&u, &chat(0, false)).await });
    wait_for(|| be.active() == 1).await;

    // A raw client, so that dropping it really closes the TCP connection.
    let mut sock = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let body = chat(1, false);
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    wait_for(|| gw.queue_len() == 1).await;
    drop(sock);
    let t = std::time::Instant::now();
    wait_for(|| gw.queue_len() == 0).await;
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "left after {:?}",
        t.elapsed()
    );

    be.release(1);
    assert_eq!(first.await.unwrap().status, 200);
    // The departed request never reached the backend, and no slot leaked.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(be.count(), 1);
    wait_for(|| gw.inflight(0) == 0).await;

    // The departed request left a trace.
    let metrics = get(&gw.url("/metrics")).await.text();
    assert!(
        metrics.contains("endpoint=\"/v1/chat/completions\",model=\"\",status=\"499\"} 1"),
        "{metrics}"
    );

    // And the gateway still serves.
    let mut sock = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    sock.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    sock.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

#[tokio::test]
async fn the_default_queue_cap_is_sized_from_the_slot_counts() {
    let a = FakeBackend::start("a", 2, held()).await;
    let b = FakeBackend::start("b", 3, held()).await;
    let gw = TestGateway::over(&[a.url(), b.url()], "[queue]\nper_slot = 2").await;
    gw.wait_until(|g| g.pools()[0].total_slots() == 5).await;
    assert_eq!(gw.gw.pools()[0].max_queue(), 10);
}
