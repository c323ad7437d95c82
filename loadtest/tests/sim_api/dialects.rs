//! Each dialect's response shapes and refusals.

use loadtest::sim::Dialect;
use serde_json::{json, Value};

use crate::support::{chat, fast, metric_value, words, End, TestSim};

fn streamed_chat(extra: Value) -> Value {
    let mut body = json!({
        "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": 5,
        "stream": true,
    });
    for (k, v) in extra.as_object().expect("object") {
        body[k] = v.clone();
    }
    body
}

#[tokio::test(start_paused = true)]
async fn upstream_stream_opens_with_the_role_and_ends_with_a_usage_chunk_and_done() {
    let sim = TestSim::start(fast(Dialect::LlamaCpp)).await;
    let body = streamed_chat(json!({"stream_options": {"include_usage": true}}));
    let mut open = sim.open("/v1/chat/completions", &body).await;
    assert_eq!(open.status, 200);
    assert_eq!(open.headers["content-type"], "text/event-stream");
    assert_eq!(open.finish().await, End::Complete);

    assert_eq!(
        open.events().last().map(String::as_str),
        Some("data: [DONE]")
    );
    let chunks = open.data_json();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let contents = chunks
        .iter()
        .filter(|c| c["choices"][0]["delta"]["content"].is_string())
        .count();
    assert_eq!(contents, 5);
    let (finish, usage) = (&chunks[chunks.len() - 2], &chunks[chunks.len() - 1]);
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    assert!(finish.get("usage").is_none());
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    assert!(usage["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64());
    // Timings ride on the last chunk only.
    assert!(usage["timings"]["prompt_n"].is_u64());
    assert_eq!(
        chunks.iter().filter(|c| c.get("timings").is_some()).count(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn upstream_stream_without_include_usage_has_timings_on_the_finish_chunk() {
    let sim = TestSim::start(fast(Dialect::LlamaCpp)).await;
    let mut open = sim
        .open("/v1/chat/completions", &streamed_chat(json!({})))
        .await;
    open.finish().await;
    let chunks = open.data_json();
    let finish = chunks.last().expect("chunks");
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    assert!(finish["timings"]["predicted_n"].is_u64());
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
}

#[tokio::test(start_paused = true)]
async fn bitnet_stream_carries_usage_on_the_finish_chunk_and_no_timings() {
    let sim = TestSim::start(fast(Dialect::Bitnet)).await;
    let body = streamed_chat(json!({"stream_options": {"include_usage": true}}));
    let mut open = sim.open("/v1/chat/completions", &body).await;
    assert_eq!(open.finish().await, End::Complete);
    assert_eq!(
        open.events().last().map(String::as_str),
        Some("data: [DONE]")
    );
    let chunks = open.data_json();
    let finish = chunks.last().expect("chunks");
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    assert_eq!(finish["usage"]["completion_tokens"], 5);
    assert!(chunks.iter().all(|c| c.get("timings").is_none()));
    assert!(chunks.iter().all(|c| c["choices"] != json!([])));
}

#[tokio::test(start_paused = true)]
async fn bitnet_refuses_tools_and_null_content_with_500_and_upstream_takes_both() {
    let tools = json!({
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "max_tokens": 2,
    });
    let null_content = json!({
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function"}]},
            {"role": "tool", "content": "ok", "tool_call_id": "c1"},
        ],
        "max_tokens": 2,
    });
    let bitnet = TestSim::start(fast(Dialect::Bitnet)).await;
    let reply = bitnet.post("/v1/chat/completions", &tools).await;
    assert_eq!(reply.status, 500);
    assert_eq!(
        reply.json()["error"],
        json!({"code": 500, "message": "Unsupported param: tools", "type": "server_error"})
    );
    let reply = bitnet.post("/v1/chat/completions", &null_content).await;
    assert_eq!(reply.status, 500);
    assert_eq!(reply.json()["error"]["message"], "Invalid 'content' type");

    let upstream = TestSim::start(fast(Dialect::LlamaCpp)).await;
    assert_eq!(
        upstream.post("/v1/chat/completions", &tools).await.status,
        200
    );
    assert_eq!(
        upstream
            .post("/v1/chat/completions", &null_content)
            .await
            .status,
        200
    );
}

#[tokio::test(start_paused = true)]
async fn max_completion_tokens_is_honoured_upstream_and_ignored_by_bitnet() {
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 3});
    let answer = |v: &Value| {
        (
            v["usage"]["completion_tokens"].as_u64().expect("tokens"),
            v["choices"][0]["finish_reason"]
                .as_str()
                .expect("reason")
                .to_owned(),
        )
    };
    for (dialect, expected) in [
        (Dialect::LlamaCpp, (3, "length")),
        (Dialect::Bitnet, (7, "stop")),
    ] {
        let mut cfg = fast(dialect);
        cfg.default_max_tokens = 7;
        let sim = TestSim::start(cfg).await;
        let v = sim.post("/v1/chat/completions", &body).await.json();
        assert_eq!(
            answer(&v),
            (expected.0, expected.1.to_owned()),
            "{dialect:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn model_id_is_the_alias_else_the_model_path() {
    let mut cfg = fast(Dialect::LlamaCpp);
    cfg.alias = Some("falcon3-10b".into());
    let sim = TestSim::start(cfg).await;
    let models = sim.get("/v1/models").await.json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "falcon3-10b");

    let mut cfg = fast(Dialect::Bitnet);
    cfg.model_path = "/models/falcon3/ggml-model-i2_s.gguf".into();
    let sim = TestSim::start(cfg).await;
    let models = sim.get("/v1/models").await.json();
    assert_eq!(
        models["data"][0]["id"],
        "/models/falcon3/ggml-model-i2_s.gguf"
    );
}

#[tokio::test(start_paused = true)]
async fn bitnet_echoes_the_request_model_or_names_gpt_3_5() {
    let sim = TestSim::start(fast(Dialect::Bitnet)).await;
    let mut body = chat("hi");
    body["max_tokens"] = json!(1);
    let v = sim.post("/v1/chat/completions", &body).await.json();
    assert_eq!(v["model"], "gpt-3.5-turbo-0613");
    body["model"] = json!("falcon3-10b");
    let v = sim.post("/v1/chat/completions", &body).await.json();
    assert_eq!(v["model"], "falcon3-10b");
}

#[tokio::test(start_paused = true)]
async fn malformed_json_is_400_upstream_and_500_in_bitnet_and_unknown_paths_404() {
    for (dialect, status, kind) in [
        (Dialect::LlamaCpp, 400, "invalid_request_error"),
        (Dialect::Bitnet, 500, "server_error"),
    ] {
        let sim = TestSim::start(fast(dialect)).await;
        let reply = sim.post_raw("/v1/chat/completions", "{not json").await;
        assert_eq!(reply.status, status);
        assert_eq!(reply.json()["error"]["type"], kind);
        assert_eq!(reply.json()["error"]["code"], status);

        let missing = sim.get("/v2/nothing").await;
        assert_eq!(missing.status, 404);
        assert_eq!(
            missing.json(),
            json!({"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})
        );
    }
}

#[tokio::test(start_paused = true)]
async fn oversized_prompt_is_refused_upstream_and_truncated_by_bitnet() {
    let body = json!({"messages": [{"role": "user", "content": words(100)}], "max_tokens": 2});
    let mut cfg = fast(Dialect::LlamaCpp);
    cfg.ctx = 64;
    let sim = TestSim::start(cfg).await;
    let reply = sim.post("/v1/chat/completions", &body).await;
    assert_eq!(reply.status, 400);
    let err = &reply.json()["error"];
    assert_eq!(err["type"], "exceed_context_size_error");
    assert_eq!(err["n_ctx"], 64);
    assert!(err["n_prompt_tokens"].as_u64().expect("n") > 100);

    let mut cfg = fast(Dialect::Bitnet);
    cfg.ctx = 64;
    let sim = TestSim::start(cfg).await;
    let reply = sim.post("/v1/chat/completions", &body).await;
    assert_eq!(reply.status, 200);
    let prompt_tokens = reply.json()["usage"]["prompt_tokens"].as_u64().expect("n");
    assert!(prompt_tokens < 64, "{prompt_tokens}");
}

#[tokio::test(start_paused = true)]
async fn native_completion_streams_end_with_a_stop_event_and_no_done() {
    for (dialect, path) in [
        (Dialect::LlamaCpp, "/completion"),
        // The fork's /v1/completions is the native endpoint.
        (Dialect::Bitnet, "/v1/completions"),
    ] {
        let sim = TestSim::start(fast(dialect)).await;
        let body = json!({"prompt": "Once upon", "n_predict": 4, "stream": true});
        let mut open = sim.open(path, &body).await;
        assert_eq!(open.finish().await, End::Complete);
        assert!(!open.text().contains("[DONE]"));
        let events = open.data_json();
        assert_eq!(events.len(), 5, "{dialect:?}");
        assert!(events[..4]
            .iter()
            .all(|e| e["stop"] == false && e["content"].is_string()));
        assert_eq!(events[4]["stop"], true);
        assert_eq!(events[4]["tokens_predicted"], 4);
        assert!(events[4]["timings"]["predicted_ms"].is_f64());
    }
}

#[tokio::test(start_paused = true)]
async fn upstream_text_completions_use_openai_text_chunks() {
    let sim = TestSim::start(fast(Dialect::LlamaCpp)).await;
    let body = json!({"prompt": "Once upon", "max_tokens": 3, "stream": true});
    let mut open = sim.open("/v1/completions", &body).await;
    open.finish().await;
    assert!(open.text().ends_with("data: [DONE]\n\n"));
    let chunks = open.data_json();
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    assert_eq!(
        chunks
            .iter()
            .filter(|c| c["choices"][0]["text"]
                .as_str()
                .is_some_and(|t| !t.is_empty()))
            .count(),
        3
    );
    let whole = sim
        .post(
            "/v1/completions",
            &json!({"prompt": "Once upon", "max_tokens": 3}),
        )
        .await
        .json();
    assert_eq!(whole["usage"]["completion_tokens"], 3);
    assert!(whole["choices"][0]["text"].is_string());
}

#[tokio::test(start_paused = true)]
async fn props_slots_and_metrics_follow_the_dialect() {
    let mut cfg = fast(Dialect::LlamaCpp);
    cfg.ctx = 2048;
    let sim = TestSim::start(cfg).await;
    let props = sim.get("/props").await.json();
    assert_eq!(props["total_slots"], 4);
    assert_eq!(props["default_generation_settings"]["n_ctx"], 2048);
    let slots = sim.get("/slots").await.json();
    assert_eq!(slots.as_array().map(Vec::len), Some(4));
    assert_eq!(slots[3]["id"], 3);
    assert_eq!(slots[3]["n_ctx"], 2048);
    assert_eq!(slots[3]["is_processing"], false);
    assert_eq!(slots[3]["id_task"], -1);
    let metrics = sim.get("/metrics").await.text();
    assert!(metric_value(&metrics, "prompt_tokens_cached_total").is_some());
    assert!(metric_value(&metrics, "kv_cache_tokens").is_none());

    let sim = TestSim::start(fast(Dialect::Bitnet)).await;
    assert_eq!(sim.get("/props").await.json()["total_slots"], 1);
    let slots = sim.get("/slots").await;
    assert_eq!(slots.status, 501);
    assert_eq!(slots.json()["error"]["type"], "not_supported_error");
    let metrics = sim.get("/metrics").await.text();
    assert!(metric_value(&metrics, "prompt_tokens_cached_total").is_none());
    assert!(metric_value(&metrics, "kv_cache_tokens").is_some());

    let mut cfg = fast(Dialect::Bitnet);
    cfg.slots_endpoint = true;
    let sim = TestSim::start(cfg).await;
    let slots = sim.get("/slots").await.json();
    assert_eq!(slots[0]["state"], 0);
}

#[tokio::test(start_paused = true)]
async fn metrics_count_evaluated_cached_and_generated_tokens() {
    let sim = TestSim::start(fast(Dialect::LlamaCpp)).await;
    let body = json!({"prompt": words(30), "n_predict": 5});
    sim.post("/completion", &body).await;
    sim.post("/completion", &body).await;
    let text = sim.get("/metrics").await.text();
    let m = |name| metric_value(&text, name).expect(name);
    // The second request re-evaluates only the prompt's last token.
    assert_eq!(m("prompt_tokens_total"), 31.0);
    assert_eq!(m("prompt_tokens_cached_total"), 29.0);
    assert_eq!(m("tokens_predicted_total"), 10.0);
    assert!(m("prompt_seconds_total") > 0.0);
    assert!(m("tokens_predicted_seconds_total") > 0.0);
    assert!(text.contains("# TYPE llamacpp:prompt_tokens_total counter"));
}

#[tokio::test(start_paused = true)]
async fn tokenize_returns_the_deterministic_split() {
    let sim = TestSim::start(fast(Dialect::LlamaCpp)).await;
    let v = sim
        .post("/tokenize", &json!({"content": "Hello, world <|im_end|>"}))
        .await
        .json();
    let tokens = v["tokens"].as_array().expect("tokens");
    assert_eq!(tokens.len(), 4);
    let again = sim
        .post(
            "/tokenize",
            &json!({"content": "world", "with_pieces": true}),
        )
        .await
        .json();
    assert_eq!(again["tokens"][0]["id"], tokens[2]);
    assert_eq!(again["tokens"][0]["piece"], "world");
}
