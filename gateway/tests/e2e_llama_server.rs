//! End to end through the gateway against real llama-server processes running a tiny
//! model that the tests generate. Skipped with a loud line when no llama-server is
//! installed, except in CI (`CI=true`), where a missing server fails the run.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use testkit::llama_server::{binary_or_skip, LlamaServer, LlamaServerOpts};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn servers(test: &str, n: usize, opts: LlamaServerOpts) -> Option<Vec<LlamaServer>> {
    let bin = binary_or_skip(test)?;
    Some(
        (0..n)
            .map(|_| LlamaServer::start(&bin, &opts).expect("llama-server starts"))
            .collect(),
    )
}

const QUESTION: &str =
    r#"{"model":"m","messages":[{"role":"user","content":"What is 2+2?"}],"max_tokens":16}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_work_through_the_gateway_streamed_and_not() {
    let Some(servers) = servers(
        "chat_completions_work_through_the_gateway_streamed_and_not",
        2,
        LlamaServerOpts::default(),
    ) else {
        return;
    };
    let urls: Vec<String> = servers.iter().map(|s| s.url()).collect();
    let gw = TestGateway::over(&urls, "").await;
    assert_eq!(
        gw.gw.pools()[0].total_slots(),
        4,
        "slots discovered from /props"
    );
    let url = gw.url("/v1/chat/completions");

    let mut backends = HashSet::new();
    for _ in 0..4 {
        let got = post_json(&url, QUESTION).await;
        assert_eq!(got.status, 200, "{}", got.text());
        let v = got.json();
        assert_eq!(v["object"], "chat.completion");
        assert!(v["choices"][0]["message"]["content"].is_string());
        assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0);
        backends.insert(got.headers["x-backend"].to_str().unwrap().to_string());
    }
    assert_eq!(backends.len(), 2, "ties between idle backends rotate");

    let streamed = QUESTION.replace("\"max_tokens\":16", "\"max_tokens\":16,\"stream\":true");
    let got = post_json(&url, &streamed).await;
    assert_eq!(got.status, 200);
    assert_eq!(
        got.headers["content-type"]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap(),
        "text/event-stream"
    );
    let text = got.text();
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| e.starts_with("data: "))
        .collect();
    assert_eq!(events.last().copied(), Some("data: [DONE]"), "{text}");
    let chunks: Vec<serde_json::Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(&e["data: ".len()..]).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"].is_string()));

    // A native endpoint passes through too.
    let got = post_json(&gw.url("/tokenize"), r#"{"content":"hello world"}"#).await;
    assert_eq!(got.status, 200);
    assert!(!got.json()["tokens"].as_array().unwrap().is_empty());
    gw.wait_until(|g| g.pools()[0].backends().iter().all(|b| b.inflight() == 0))
        .await;
}

fn slot_busy(server: &LlamaServer) -> bool {
    let r = server.get("/slots").expect("/slots answers");
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("/slots is JSON");
    v.as_array()
        .unwrap()
        .iter()
        .any(|s| s["is_processing"] == true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_disconnect_frees_the_llama_server_slot_within_two_seconds() {
    // One slot with a long context, so generation would run for many seconds if not cancelled.
    let opts = LlamaServerOpts {
        slots: 1,
        ctx: 65536,
        ..LlamaServerOpts::default()
    };
    let Some(servers) = servers(
        "a_client_disconnect_frees_the_llama_server_slot_within_two_seconds",
        1,
        opts,
    ) else {
        return;
    };
    let gw = TestGateway::over(&[servers[0].url()], "").await;

    let body = r#"{"model":"m","stream":true,"max_tokens":60000,"ignore_eos":true,"messages":[{"role":"user","content":"Count forever."}]}"#;
    let mut sock = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 16384];
    let mut seen = 0;
    while seen < 4096 {
        let n = sock.read(&mut buf).await.unwrap();
        assert!(n > 0, "stream ended early");
        seen += n;
    }
    assert!(slot_busy(&servers[0]), "the slot is generating");
    drop(sock);
    let t = Instant::now();
    while slot_busy(&servers[0]) {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "slot still busy {:?} after the client left",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.wait_until(|g| g.pools()[0].backends()[0].inflight() == 0)
        .await;
    eprintln!("slot idle {:?} after the client disconnected", t.elapsed());
}
