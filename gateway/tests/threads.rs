//! Several serving threads (`workers`): each accepts from the same socket and serves its
//! connections on a runtime of its own; a graceful shutdown drains every thread's streams.

mod common;

use std::time::Duration;

use common::*;
use http_body_util::BodyExt;
use testkit::fake_backend::{FakeBackend, Reply};

const WORKERS: usize = 3;

fn accepted(gw: &TestGateway, thread: usize) -> u64 {
    gw.gw
        .metrics
        .server
        .connections
        .with_label_values(&[&thread.to_string()])
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_serving_thread_takes_connections_and_drains_its_streams_on_shutdown() {
    let backend = FakeBackend::start("b", 64, |_| Reply::Controlled).await;
    let mut gw = TestGateway::over(&[backend.url()], &format!("workers = {WORKERS}")).await;

    // The kernel hands each new connection to whichever thread accepts first; keep
    // opening connections (one streamed request each, all left open) until every thread
    // holds at least one. Bounded, so a thread that never accepts fails the test.
    let mut clients = Vec::new();
    let mut streams = Vec::new();
    for i in 0..200 {
        let req = post(&gw.url("/v1/chat/completions"), chat(i, true));
        // A client of its own: a connection of its own.
        let resp = tokio::spawn(async move {
            let c = client();
            let resp = c.request(req).await;
            (c, resp)
        });
        let stream = backend.next_stream().await;
        assert!(stream.send(format!("data: {{\"n\":{i}}}\n\n")).await);
        clients.push((i, resp));
        streams.push(stream);
        if (0..WORKERS).all(|t| accepted(&gw, t) > 0) {
            break;
        }
    }
    let per_thread: Vec<u64> = (0..WORKERS).map(|t| accepted(&gw, t)).collect();
    assert!(
        per_thread.iter().all(|&n| n > 0),
        "some serving thread accepted nothing: {per_thread:?}"
    );
    assert_eq!(
        per_thread.iter().sum::<u64>(),
        clients.len() as u64,
        "one accepted connection per client"
    );

    // Shut down with every stream still open: none may be cut.
    let addr = gw.addr;
    let shutting_down = tokio::spawn(async move {
        gw.shutdown().await;
    });
    // Every thread stops accepting: once all have closed their copy of the socket, the
    // kernel refuses new connections.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway still accepts connections after shutdown began"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for stream in &streams {
        assert!(stream.send("data: [DONE]\n\n").await);
    }
    drop(streams);
    for (i, resp) in clients {
        let (_client, resp) = resp.await.unwrap();
        let resp = resp.expect("the gateway answered");
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            String::from_utf8_lossy(&body),
            format!("data: {{\"n\":{i}}}\n\ndata: [DONE]\n\n"),
            "stream {i} was cut or altered"
        );
    }
    tokio::time::timeout(Duration::from_secs(10), shutting_down)
        .await
        .expect("every serving thread drained and returned")
        .unwrap();
}
