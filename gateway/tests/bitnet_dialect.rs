//! OpenClaw's real request through the gateway to the older BitNet server (simulated by
//! `llama-sim --dialect bitnet`), and the same tests against a real upstream llama-server.
//!
//! The fixture is the exact body OpenClaw 2026.9.6 sends: streaming, 12 tools,
//! `tool_choice`, `max_completion_tokens`, `stream_options.include_usage`, array content
//! parts, and a system prompt of about 10,000 tokens.

mod common;

use common::*;
use loadtest::sim::{serve as sim_serve, Dialect, SimConfig};
use serde_json::Value;
use testkit::llama_server::{binary_or_skip, LlamaServer, LlamaServerOpts};

const FIXTURE: &str = include_str!("fixtures/openclaw-2026.9.6-chat-request.json");

/// A backend for one test: a simulated BitNet server, or a real upstream llama-server.
enum Server {
    Sim(tokio::task::JoinHandle<()>, String),
    Real(LlamaServer),
}

impl Server {
    fn url(&self) -> String {
        match self {
            Server::Sim(_, u) => u.clone(),
            Server::Real(s) => s.url(),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Server::Sim(t, _) = self {
            t.abort();
        }
    }
}

async fn bitnet_sim(tweak: impl FnOnce(&mut SimConfig)) -> Server {
    let mut cfg = SimConfig::new(Dialect::Bitnet);
    cfg.time_scale = 0.001;
    cfg.model_path = "/models/ggml-model-i2_s.gguf".into();
    tweak(&mut cfg);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let _ = sim_serve(listener, cfg, std::future::pending()).await;
    });
    Server::Sim(task, url)
}

fn real(test: &str) -> Option<Server> {
    let bin = binary_or_skip(test)?;
    // --jinja: upstream needs it to accept `tools`; one slot of 4,096 tokens, like BitNet.
    let opts = LlamaServerOpts {
        slots: 1,
        ctx: 4096,
        extra_args: vec!["--jinja".into()],
        ..Default::default()
    };
    Some(Server::Real(LlamaServer::start(&bin, &opts).unwrap()))
}

async fn gateway(server: &Server, compat: &str) -> TestGateway {
    let toml = format!(
        "{compat}\n[health]\ninterval_secs = 0.05\n[[models]]\nid = \"falcon3-10b\"\naliases = [\"bitnet\"]\nbackends = [{{ url = \"{}\" }}]\n",
        server.url()
    );
    let gw = TestGateway::start(&toml).await;
    gw.wait_until(|g| g.pools()[0].backends()[0].n_ctx().is_some())
        .await;
    gw
}

/// The fixture with a short system prompt so it fits 4,096 tokens.
fn short_variant(max_completion_tokens: u64) -> Value {
    let mut v: Value = serde_json::from_str(FIXTURE).unwrap();
    v["messages"][0]["content"] = Value::from("You are a helpful coding agent.");
    v["max_completion_tokens"] = Value::from(max_completion_tokens);
    v["model"] = Value::from("bitnet");
    v
}

/// Parse an SSE body into its JSON data events; asserts it ends with [DONE].
fn events(text: &str) -> Vec<Value> {
    let data: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.trim_start_matches('\r').strip_prefix("data: "))
        .collect();
    assert_eq!(
        data.last().copied(),
        Some("[DONE]"),
        "stream must end with [DONE]: {text}"
    );
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

async fn streamed_answer_with_usage_and_token_limit(server: Server) {
    let gw = gateway(&server, "").await;
    let mut body = short_variant(5);
    if let Server::Real(..) = server {
        // The test model has random weights: sampled, it may end after two tokens, or
        // spend all five on tokens that print as nothing. Greedy decoding that cannot stop
        // early makes the limit the only end and the answer the same on every run.
        body["temperature"] = Value::from(0);
        body["seed"] = Value::from(7);
        body["ignore_eos"] = Value::from(true);
    }
    let got = post_json(&gw.url("/v1/chat/completions"), &body.to_string()).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert!(got.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let evs = events(&got.text());
    assert!(evs.iter().all(|e| e.get("error").is_none()), "{evs:?}");
    let usage = evs
        .iter()
        .find_map(|e| e.get("usage").filter(|u| u.is_object()))
        .expect("usage reaches the client");
    assert_eq!(
        usage["completion_tokens"], 5,
        "max_completion_tokens is respected"
    );
    let content: String = evs
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(!content.is_empty(), "{evs:?}");
    if let Server::Sim(..) = server {
        // Tools were dropped (the fork would have answered 500), and the client is told.
        assert!(got.headers["x-gateway-warning"]
            .to_str()
            .unwrap()
            .contains("tools"));
        assert!(
            evs.iter().all(|e| e["model"] == "falcon3-10b"),
            "model id is the configured one"
        );
    }
}

#[tokio::test]
async fn openclaw_request_streams_a_well_formed_answer_with_usage_from_bitnet() {
    streamed_answer_with_usage_and_token_limit(bitnet_sim(|_| {}).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openclaw_request_streams_a_well_formed_answer_with_usage_from_upstream() {
    if let Some(s) = real("openclaw_request_streams_a_well_formed_answer_with_usage_from_upstream")
    {
        streamed_answer_with_usage_and_token_limit(s).await;
    }
}

async fn full_size_prompt_is_refused(server: Server) {
    let gw = gateway(&server, "").await;
    let got = post_json(&gw.url("/v1/chat/completions"), FIXTURE).await;
    got.assert_openai_error(400, "context_length_exceeded");
    assert!(got.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("4096"));
}

#[tokio::test]
async fn the_context_guard_refuses_the_full_openclaw_prompt_on_a_4096_token_bitnet_backend() {
    full_size_prompt_is_refused(bitnet_sim(|_| {}).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_context_guard_refuses_the_full_openclaw_prompt_on_a_4096_token_upstream_backend() {
    if let Some(s) =
        real("the_context_guard_refuses_the_full_openclaw_prompt_on_a_4096_token_upstream_backend")
    {
        full_size_prompt_is_refused(s).await;
    }
}

async fn assistant_null_content_is_accepted(server: Server) {
    let gw = gateway(&server, "").await;
    let mut v = short_variant(3);
    let msgs = v["messages"].as_array_mut().unwrap();
    msgs.push(serde_json::json!({"role": "assistant", "content": null}));
    msgs.push(serde_json::json!({"role": "user", "content": "go on"}));
    let got = post_json(&gw.url("/v1/chat/completions"), &v.to_string()).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert!(!events(&got.text()).is_empty());
}

#[tokio::test]
async fn an_assistant_turn_with_null_content_works_on_bitnet() {
    assistant_null_content_is_accepted(bitnet_sim(|_| {}).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assistant_turn_with_null_content_works_on_upstream() {
    if let Some(s) = real("an_assistant_turn_with_null_content_works_on_upstream") {
        assistant_null_content_is_accepted(s).await;
    }
}

#[tokio::test]
async fn in_reject_mode_tools_get_a_clear_400() {
    let server = bitnet_sim(|_| {}).await;
    let gw = gateway(&server, "[compat]\ntools = \"reject\"").await;
    let got = post_json(
        &gw.url("/v1/chat/completions"),
        &short_variant(5).to_string(),
    )
    .await;
    got.assert_openai_error(400, "tools_unsupported");
    assert!(got.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("tool"));
}

#[tokio::test]
async fn the_dialect_is_detected_and_the_model_id_is_the_configured_one() {
    let server = bitnet_sim(|_| {}).await;
    let gw = gateway(&server, "").await;
    assert_eq!(
        gw.gw.pools()[0].backends()[0].dialect.get(),
        gateway::dialect::Dialect::Bitnet
    );
    assert_eq!(gw.gw.pools()[0].backends()[0].n_ctx(), Some(4096));
    let models = get(&gw.url("/v1/models")).await.json();
    assert_eq!(models["data"][0]["id"], "falcon3-10b");
    let got = post_json(
        &gw.url("/v1/chat/completions"),
        r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":2}"#,
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(
        got.json()["model"],
        "falcon3-10b",
        "not the fork's gpt-3.5-turbo-0613 default"
    );

    let up = bitnet_sim(|c| {
        *c = SimConfig {
            time_scale: 0.001,
            ..SimConfig::new(Dialect::LlamaCpp)
        }
    })
    .await;
    let gw = gateway(&up, "").await;
    assert_eq!(
        gw.gw.pools()[0].backends()[0].dialect.get(),
        gateway::dialect::Dialect::LlamaCpp
    );
}

#[tokio::test]
async fn a_mid_stream_error_line_becomes_a_standard_error_event() {
    let server = bitnet_sim(|c| c.faults.error_mid_stream_after = Some(2)).await;
    let gw = gateway(&server, "").await;
    let body = r#"{"model":"falcon3-10b","stream":true,"max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;
    let got = post_json(&gw.url("/v1/chat/completions"), body).await;
    assert_eq!(got.status, 200);
    let text = got.text();
    assert!(
        !text.contains("\nerror:") && !text.starts_with("error:"),
        "{text}"
    );
    let evs = events(&text);
    let err = evs
        .iter()
        .find(|e| e.get("error").is_some())
        .expect("a data: {\"error\":…} event");
    assert!(err["error"]["message"].is_string());
}

#[tokio::test]
async fn an_error_before_any_content_becomes_a_proper_http_error() {
    let server = bitnet_sim(|c| c.faults.error_mid_stream_after = Some(0)).await;
    let gw = gateway(&server, "").await;
    let body = r#"{"model":"falcon3-10b","stream":true,"max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;
    let got = post_json(&gw.url("/v1/chat/completions"), body).await;
    assert!(got.status.as_u16() >= 500, "{} {}", got.status, got.text());
    let v = got.json();
    assert!(v["error"]["message"].is_string(), "{v}");
    gw.wait_until(|g| g.pools()[0].backends()[0].inflight() == 0)
        .await;
}
