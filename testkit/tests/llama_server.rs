//! A real `llama-server` serving the generated tiny model: startup on an OS-assigned port,
//! the endpoints the gateway relies on, and process cleanup.
//!
//! Each test skips (loudly) when no binary is found, except under CI or
//! `REQUIRE_LLAMA_SERVER=1`, where a missing binary fails the test.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use testkit::child::Signal;
use testkit::llama_server::{binary_or_skip, LlamaServer, LlamaServerOpts};

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

fn start(binary: &std::path::Path, slots: u32) -> LlamaServer {
    let opts = LlamaServerOpts {
        slots,
        ..LlamaServerOpts::default()
    };
    LlamaServer::start(binary, &opts).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn two_servers_run_side_by_side_with_the_requested_slots() {
    let Some(binary) = binary_or_skip("two_servers_run_side_by_side_with_the_requested_slots")
    else {
        return;
    };
    let a = start(&binary, 2);
    let b = start(&binary, 3);
    assert_ne!(a.port(), b.port());
    assert_ne!(a.pid(), b.pid());
    assert_eq!(a.url(), format!("http://127.0.0.1:{}", a.port()));

    for (server, slots) in [(&a, 2), (&b, 3)] {
        let health = server.get("/health").unwrap();
        assert_eq!(health.status, 200, "{}", health.body);
        assert_eq!(json(&health.body)["status"], "ok");

        let props = server.get("/props").unwrap();
        assert_eq!(props.status, 200, "{}", props.body);
        assert_eq!(json(&props.body)["total_slots"], slots);

        let listed = server.get("/slots").unwrap();
        assert_eq!(listed.status, 200, "{}", listed.body);
        assert_eq!(json(&listed.body).as_array().map(Vec::len), Some(slots));

        let metrics = server.get("/metrics").unwrap();
        assert_eq!(metrics.status, 200, "{}", metrics.body);
        assert!(metrics.body.contains("llamacpp:"), "{}", metrics.body);
    }
}

#[test]
fn chat_completion_answers_without_and_with_streaming() {
    let Some(binary) = binary_or_skip("chat_completion_answers_without_and_with_streaming") else {
        return;
    };
    let server = start(&binary, 2);
    let request = |stream: bool| {
        format!(
            r#"{{"messages":[{{"role":"user","content":"hello"}}],"max_tokens":8,"stream":{stream}}}"#
        )
    };

    let reply = server
        .post_json("/v1/chat/completions", &request(false))
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let completion = json(&reply.body);
    assert_eq!(completion["object"], "chat.completion");
    assert_eq!(completion["choices"][0]["message"]["role"], "assistant");
    assert!(completion["choices"][0]["message"]["content"].is_string());
    // The ChatML template wraps the one-word message in several tokens of framing.
    assert!(completion["usage"]["prompt_tokens"].as_u64().unwrap() > 5);
    assert!(completion["usage"]["completion_tokens"].as_u64().unwrap() <= 8);

    let reply = server
        .post_json("/v1/chat/completions", &request(true))
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let events: Vec<&str> = reply
        .body
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not SSE data: {e:?}"))
        })
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{}", reply.body);
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| json(e)).collect();
    assert!(chunks.len() >= 2, "{}", reply.body);
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    // No assertion that the first chunk carries the role: upstream omits that chunk when the
    // first sampled tokens are incomplete UTF-8, which random weights produce now and then.
    for chunk in &chunks {
        let role = &chunk["choices"][0]["delta"]["role"];
        assert!(role.is_null() || role == "assistant", "{chunk}");
    }
    let finish = &chunks.last().unwrap()["choices"][0]["finish_reason"];
    assert!(finish == "length" || finish == "stop", "{finish}");
}

#[test]
fn tokenizer_round_trips_text_that_needs_byte_fallback() {
    let Some(binary) = binary_or_skip("tokenizer_round_trips_text_that_needs_byte_fallback") else {
        return;
    };
    let server = start(&binary, 1);
    let text = "hello world, caf\u{e9} \u{2713}";
    let reply = server
        .post_json(
            "/tokenize",
            &serde_json::json!({ "content": text }).to_string(),
        )
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let tokens = json(&reply.body)["tokens"].clone();
    assert!(tokens.as_array().is_some_and(|t| !t.is_empty()));

    let reply = server
        .post_json(
            "/detokenize",
            &serde_json::json!({ "tokens": tokens }).to_string(),
        )
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        json(&reply.body)["content"].as_str().map(str::trim_start),
        Some(text)
    );
}

#[test]
fn sigkill_stops_the_server_like_a_crash() {
    let Some(binary) = binary_or_skip("sigkill_stops_the_server_like_a_crash") else {
        return;
    };
    let mut server = start(&binary, 1);
    server.child_mut().signal(Signal::SIGKILL).unwrap();
    let status = server
        .child_mut()
        .wait_timeout(Duration::from_secs(10))
        .unwrap()
        .expect("server exits after SIGKILL");
    assert_eq!(status.signal(), Some(Signal::SIGKILL as i32));
    assert!(
        server.get("/health").is_err(),
        "nothing should listen any more"
    );
}

#[test]
fn dropping_the_server_kills_its_process() {
    let Some(binary) = binary_or_skip("dropping_the_server_kills_its_process") else {
        return;
    };
    let server = start(&binary, 1);
    let pid = server.pid();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    drop(server);
    // The guard reaps the server, so its /proc entry is gone on return.
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}

#[test]
fn start_fails_with_the_server_log_when_the_model_is_missing() {
    let Some(binary) = binary_or_skip("start_fails_with_the_server_log_when_the_model_is_missing")
    else {
        return;
    };
    let missing = PathBuf::from("/nonexistent/testkit-missing-model.gguf");
    let opts = LlamaServerOpts {
        model: Some(missing),
        startup_timeout: Duration::from_secs(20),
        ..LlamaServerOpts::default()
    };
    let err = LlamaServer::start(&binary, &opts).expect_err("a missing model cannot be served");
    let message = err.to_string();
    assert!(message.contains("testkit-missing-model.gguf"), "{message}");
}
