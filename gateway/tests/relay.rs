//! Relaying: bytes pass through untouched and unbuffered, and the slot is released exactly
//! once whether the response ends, fails, or the client goes away.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use testkit::fake_backend::{FakeBackend, Reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// SSE with the awkward parts: multi-byte UTF-8 split across chunks, CRLF, comments,
/// multi-line data, and a chunk boundary in the middle of an event.
fn awkward_sse() -> Vec<Bytes> {
    let text = "data: {\"choices\":[{\"delta\":{\"content\":\"h\u{e9}llo \u{2713}\"}}]}\n\n: ping\r\n\r\ndata: line1\ndata: line2\n\ndata: [DONE]\n\n";
    let bytes = text.as_bytes();
    // Split at odd places, including inside the two-byte 'é'.
    let cut = bytes.iter().position(|&b| b == 0xc3).unwrap() + 1;
    vec![
        Bytes::copy_from_slice(&bytes[..7]),
        Bytes::copy_from_slice(&bytes[7..cut]),
        Bytes::copy_from_slice(&bytes[cut..cut + 30]),
        Bytes::copy_from_slice(&bytes[cut + 30..]),
    ]
}

#[tokio::test]
async fn streamed_bytes_reach_the_client_identical_with_sse_headers() {
    let chunks = awkward_sse();
    let expected: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
    let be = FakeBackend::start("a", 1, move |_| {
        Reply::Sse(
            chunks
                .iter()
                .map(|c| (Duration::from_millis(2), c.clone()))
                .collect(),
        )
    })
    .await;
    let gw = TestGateway::over(&[be.url()], "").await;
    let body = chat(0, true);
    let got = post_json(&gw.url("/v1/chat/completions"), &body).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body.as_ref(), expected.as_slice());
    assert_eq!(got.headers["content-type"], "text/event-stream");
    assert_eq!(got.headers["cache-control"], "no-cache");
    assert_eq!(got.headers["x-accel-buffering"], "no");
    assert_eq!(
        got.headers["x-backend"],
        be.url().trim_start_matches("http://")
    );
    // The request body reached the backend byte for byte too.
    assert_eq!(be.seen()[0].body.as_ref(), body.as_bytes());
    wait_for(|| gw.inflight(0) == 0).await;
}

#[tokio::test]
async fn non_streaming_bodies_and_statuses_pass_through_unchanged() {
    let body = completion_json("w\u{f6}rld");
    let b2 = body.clone();
    let be = FakeBackend::start("a", 1, move |s| {
        if s.path == "/tokenize" {
            Reply::Json(400, r#"{"error":{"code":400,"message":"backend says no","type":"invalid_request_error"}}"#.into())
        } else {
            Reply::Json(200, b2.clone())
        }
    })
    .await;
    let gw = TestGateway::over(&[be.url()], "").await;
    let got = post_json(&gw.url("/v1/chat/completions?x=1"), &chat(0, false)).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), body);
    assert_eq!(be.seen()[0].path, "/v1/chat/completions?x=1");
    // A backend's own error is relayed as is, not rewritten.
    let got = post_json(&gw.url("/tokenize"), r#"{"content":"hi"}"#).await;
    assert_eq!(got.status, 400);
    assert!(got.text().contains("backend says no"));
}

#[tokio::test]
async fn a_chunk_reaches_the_client_before_the_backend_sends_the_next() {
    let be = FakeBackend::start("a", 1, |_| Reply::Controlled).await;
    let gw = TestGateway::over(&[be.url()], "").await;
    let resp = send(post(&gw.url("/v1/chat/completions"), chat(0, true))).await;
    let stream = be.next_stream().await;
    let mut body = resp.into_body();
    for i in 0..5 {
        let chunk = format!("data: {{\"n\":{i}}}\n\n");
        assert!(stream.send(chunk.clone()).await);
        // Nothing else is sent until this chunk arrives: a buffering proxy would hang here.
        let frame = tokio::time::timeout(Duration::from_secs(2), body.frame())
            .await
            .unwrap_or_else(|_| panic!("chunk {i} was held back"))
            .unwrap()
            .unwrap();
        assert_eq!(frame.into_data().unwrap(), chunk.as_bytes());
    }
    drop(stream);
    assert!(
        body.frame().await.is_none(),
        "stream ends when the backend ends it"
    );
}

#[tokio::test]
async fn the_slot_is_released_when_the_response_ends() {
    let be = FakeBackend::start("a", 1, |_| Reply::Controlled).await;
    let gw = TestGateway::over(&[be.url()], "").await;
    let resp = send(post(&gw.url("/v1/chat/completions"), chat(0, true))).await;
    let stream = be.next_stream().await;
    assert_eq!(gw.inflight(0), 1, "held while streaming");
    stream.send("data: [DONE]\n\n").await;
    drop(stream);
    let got = read(resp).await;
    assert_eq!(got.text(), "data: [DONE]\n\n");
    wait_for(|| gw.inflight(0) == 0).await;
}

#[tokio::test]
async fn the_slot_is_released_when_the_backend_fails_mid_stream_and_the_client_gets_an_error_event()
{
    let be = FakeBackend::start("a", 1, |_| {
        Reply::SseThenBreak(vec![Bytes::from_static(b"data: {\"n\":1}\n\n")])
    })
    .await;
    let gw = TestGateway::over(&[be.url()], "").await;
    let got = post_json(&gw.url("/v1/chat/completions"), &chat(0, true)).await;
    assert_eq!(got.status, 200);
    let text = got.text();
    assert!(text.starts_with("data: {\"n\":1}\n\n"), "{text}");
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let ev: serde_json::Value = serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(ev["error"]["code"], "upstream_stream_broken");
    assert!(!text.contains("[DONE]"));
    wait_for(|| gw.inflight(0) == 0).await;
}

#[tokio::test]
async fn the_slot_is_released_and_the_upstream_closed_when_the_client_disconnects() {
    let be = FakeBackend::start("a", 1, |_| Reply::Controlled).await;
    let gw = TestGateway::over(&[be.url()], "").await;
    let mut sock = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let body = chat(0, true);
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    let stream = be.next_stream().await;
    stream.send("data: {\"n\":0}\n\n").await;
    let mut buf = [0u8; 512];
    let n = sock.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    assert_eq!(gw.inflight(0), 1);
    drop(sock);
    // The gateway notices on its next write; the backend sees its connection close.
    let closed = async {
        loop {
            if !stream.send("data: {\"n\":1}\n\n").await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(2), closed)
        .await
        .expect("upstream connection closed within 2 s of the client leaving");
    wait_for(|| gw.inflight(0) == 0).await;
    wait_for(|| be.active() == 0).await;
}
