//! Several serving threads (`workers`): new connections are dealt evenly among them, each
//! serves its connections on a runtime of its own, and a graceful shutdown drains every
//! thread's streams.

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
async fn connections_are_dealt_evenly_over_the_serving_threads_which_drain_on_shutdown() {
    let backend = FakeBackend::start("b", 64, |_| Reply::Controlled).await;
    let mut gw = TestGateway::over(&[backend.url()], &format!("workers = {WORKERS}")).await;

    // Each new connection goes to the thread holding the fewest, so connections that all
    // stay open are spread exactly evenly. (Left to the kernel, the thread that happens to
    // be awake takes most of them.)
    const PER_THREAD: usize = 4;
    let mut clients = Vec::new();
    let mut streams = Vec::new();
    for i in 0..WORKERS * PER_THREAD {
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
    }
    let per_thread: Vec<u64> = (0..WORKERS).map(|t| accepted(&gw, t)).collect();
    assert_eq!(
        per_thread,
        vec![PER_THREAD as u64; WORKERS],
        "connections were not dealt evenly over the serving threads"
    );

    // Shut down with every stream still open: none may be cut.
    let addr = gw.addr;
    let shutting_down = tokio::spawn(async move {
        gw.shutdown().await;
    });
    // Accepting stops: once the socket is closed, the kernel refuses new connections.
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
