//! Routing and the endpoints: generation, health, models, props, slots, metrics, tokenize.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::body::{self, Msg, SimBody};
use super::config::{Dialect, SimConfig};
use super::error::ApiError;
use super::generate::{self, Channel, Collect};
use super::request::{self, Endpoint};
use super::state::{MidStream, Sim};
use super::tokens::{self, CHAT_TEMPLATE, N_VOCAB};

/// Largest request body read; OpenClaw's first request alone is about 50 KB.
const MAX_BODY: usize = 32 * 1024 * 1024;

/// Stream messages buffered between a generation task and its connection. Small, so that a
/// client that stops reading soon stalls the task, as a blocked socket write stalls the server.
const STREAM_BUFFER: usize = 8;

/// Answers one request.
pub(crate) async fn handle(sim: Arc<Sim>, req: Request<Incoming>) -> Response<SimBody> {
    if sim.loading() {
        return body::error(&ApiError::Unavailable("Loading model"));
    }
    let endpoint = match (req.method(), req.uri().path()) {
        (&Method::GET, "/health" | "/v1/health") => {
            return body::json(StatusCode::OK, &br#"{"status":"ok"}"#[..]);
        }
        (&Method::GET, "/v1/models" | "/models") => return models(&sim),
        _ if !authorized(&sim.cfg, req.headers()) => {
            return body::error(&ApiError::Unauthorized);
        }
        (&Method::GET, "/props") => return props(&sim),
        (&Method::GET, "/slots") => return slots(&sim, req.uri().query()),
        (&Method::GET, "/metrics") => return metrics(&sim),
        (&Method::POST, "/tokenize") => return tokenize(&sim, req).await,
        (&Method::POST, "/v1/chat/completions" | "/chat/completions") => Endpoint::Chat,
        // The fork's `/v1/completions` is its native endpoint under another name.
        (&Method::POST, "/v1/completions") if sim.cfg.dialect == Dialect::LlamaCpp => {
            Endpoint::Completion
        }
        (&Method::POST, "/completion" | "/completions" | "/v1/completions") => Endpoint::Native,
        _ => return body::error(&ApiError::NotFound),
    };
    completion(&sim, endpoint, req).await
}

/// Whether the request carries the `--api-key` key, when there is one: as a bearer token,
/// or (upstream only) in `X-Api-Key`.
fn authorized(cfg: &SimConfig, headers: &http::HeaderMap) -> bool {
    let Some(key) = cfg.api_key.as_deref() else {
        return true;
    };
    let bearer = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let x_api_key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .filter(|_| cfg.dialect == Dialect::LlamaCpp);
    bearer == Some(key) || x_api_key == Some(key)
}

/// Reads the request body, within [`MAX_BODY`].
async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| ApiError::InvalidRequest(format!("could not read the request body: {e}")))
}

/// A chat, completion or native completion request.
async fn completion(
    sim: &Arc<Sim>,
    endpoint: Endpoint,
    req: Request<Incoming>,
) -> Response<SimBody> {
    let raw = match read_body(req).await {
        Ok(b) => b,
        Err(e) => return body::error(&e),
    };
    let seq = sim.next_request();
    let faults = &sim.cfg.faults;
    if faults.crash_after == Some(seq) && faults.crash_after_tokens.is_none() {
        sim.crash();
        return std::future::pending().await;
    }
    let selected = faults.selects(seq);
    if selected && faults.hang_before_first_byte {
        return std::future::pending().await;
    }
    if selected && !faults.slow_start.is_zero() {
        tokio::time::sleep(sim.cfg.scaled(faults.slow_start)).await;
    }
    if selected && faults.fail_503 {
        return body::error(&ApiError::Unavailable("Loading model"));
    }
    let job = match request::parse(&sim.cfg, endpoint, &raw) {
        Ok(job) => job,
        Err(e) => return body::error(&e),
    };
    let stream = job.stream;
    let fault = sim.mid_stream_fault(seq);

    // Zero latency: everything in one body, no task, no channel. Faults that must leave a
    // partial answer on the wire still need the streaming path.
    let needs_stream = matches!(fault, Some((_, MidStream::Hang | MidStream::Crash)));
    if sim.cfg.zero_latency && !needs_stream {
        let mut out = Collect::default();
        // Collecting never loses its client.
        let _ = generate::run(sim, job, seq, fault, &mut out).await;
        return match out.fail {
            Some(e) => body::error(&e),
            None if stream => body::event_stream(SimBody::Full(Some(out.data.freeze()))),
            None => body::json(StatusCode::OK, out.data.freeze()),
        };
    }

    let (tx, mut rx) = mpsc::channel(STREAM_BUFFER);
    let task_sim = sim.clone();
    let notices_disconnect = sim.cfg.dialect == Dialect::LlamaCpp;
    tokio::spawn(async move {
        let mut out = Channel {
            tx,
            notices_disconnect,
        };
        // Ending early because the client left is the normal way out.
        let _ = generate::run(&task_sim, job, seq, fault, &mut out).await;
    });
    // The fork starts its event stream at once; upstream waits for the first token, so that
    // errors before it are plain HTTP errors.
    if stream && sim.cfg.dialect == Dialect::Bitnet {
        return body::event_stream(SimBody::Stream { first: None, rx });
    }
    match rx.recv().await {
        Some(Msg::Data(first)) if stream => body::event_stream(SimBody::Stream {
            first: Some(first),
            rx,
        }),
        Some(Msg::Data(whole)) => body::json(StatusCode::OK, whole),
        Some(Msg::Fail(e)) => body::error(&e),
        None => body::error(&ApiError::Server(
            "generation ended without an answer".to_owned(),
        )),
    }
}

fn models(sim: &Sim) -> Response<SimBody> {
    let id = sim.cfg.model_id();
    let entry = json!({
        "id": id,
        "object": "model",
        "created": 0,
        "owned_by": "llamacpp",
        "meta": {
            "vocab_type": 2,
            "n_vocab": N_VOCAB,
            "n_ctx_train": 32768,
            "n_ctx": sim.cfg.ctx,
            "n_embd": 3072,
            "n_params": 10_305_653_760_u64,
            "size": 3_989_612_544_u64,
        },
    });
    let mut list = json!({"object": "list", "data": [entry]});
    if sim.cfg.dialect == Dialect::LlamaCpp {
        list["models"] = json!([{
            "name": id,
            "model": id,
            "type": "model",
            "capabilities": ["completion"],
        }]);
    }
    body::json_value(StatusCode::OK, &list)
}

fn props(sim: &Sim) -> Response<SimBody> {
    let cfg = &sim.cfg;
    let props = match cfg.dialect {
        Dialect::LlamaCpp => json!({
            "default_generation_settings": {
                "id": 0,
                "id_task": -1,
                "n_ctx": cfg.ctx,
                "is_processing": false,
                "params": {"n_predict": -1, "cache_prompt": true},
            },
            "total_slots": cfg.slots,
            "model_path": cfg.model_path,
            "modalities": {"vision": false, "audio": false},
            "chat_template": CHAT_TEMPLATE,
            "build_info": "b0-llama-sim",
        }),
        Dialect::Bitnet => json!({
            "system_prompt": "",
            "default_generation_settings": {
                "n_ctx": cfg.ctx,
                "n_predict": -1,
                "model": cfg.model_path,
                "cache_prompt": false,
            },
            "total_slots": cfg.slots,
            "chat_template": CHAT_TEMPLATE,
        }),
    };
    body::json_value(StatusCode::OK, &props)
}

fn slots(sim: &Sim, query: Option<&str>) -> Response<SimBody> {
    let cfg = &sim.cfg;
    if !cfg.slots_endpoint {
        return body::error(&ApiError::NotSupported(
            "This server does not support slots endpoint.",
        ));
    }
    let views = sim.pool.views();
    let fail_on_no_slot = query.is_some_and(|q| q.split('&').any(|kv| kv == "fail_on_no_slot=1"));
    if fail_on_no_slot && views.iter().all(|v| v.task.is_some()) {
        return body::error(&ApiError::Unavailable("no slot available"));
    }
    let list: Vec<Value> = views
        .iter()
        .map(|v| {
            let id_task = v.task.map_or(-1, |t| t.id_task as i64);
            let n_predict = v.task.map_or(-1, |t| t.n_predict as i64);
            let next_token = json!({
                "has_next_token": v.task.is_some(),
                "n_remain": v.task.map_or(-1, |t| t.n_predict.saturating_sub(v.n_decoded) as i64),
                "n_decoded": v.n_decoded,
            });
            match cfg.dialect {
                Dialect::LlamaCpp => json!({
                    "id": v.id,
                    "id_task": id_task,
                    "n_ctx": cfg.ctx,
                    "speculative": false,
                    "is_processing": v.task.is_some(),
                    "n_cached": v.n_cached,
                    "params": {"n_predict": n_predict},
                    "next_token": next_token,
                }),
                Dialect::Bitnet => json!({
                    "id": v.id,
                    "id_task": id_task,
                    "n_ctx": cfg.ctx,
                    "state": u8::from(v.task.is_some()),
                    "n_cached": v.n_cached,
                    "n_predict": n_predict,
                    "next_token": next_token,
                }),
            }
        })
        .collect();
    body::json_value(StatusCode::OK, &Value::Array(list))
}

fn metrics(sim: &Sim) -> Response<SimBody> {
    let text = sim.metrics.render(
        sim.cfg.dialect,
        sim.pool.stats(),
        sim.pool.n_ctx() * sim.pool.n_slots(),
    );
    body::text("text/plain; version=0.0.4", text)
}

async fn tokenize(sim: &Sim, req: Request<Incoming>) -> Response<SimBody> {
    let bad = |msg: String| match sim.cfg.dialect {
        Dialect::LlamaCpp => ApiError::InvalidRequest(msg),
        Dialect::Bitnet => ApiError::Server(msg),
    };
    let parsed = match read_body(req).await {
        Ok(raw) => {
            serde_json::from_slice::<Value>(&raw).map_err(|e| bad(format!("Invalid JSON: {e}")))
        }
        Err(e) => Err(e),
    };
    let body = match parsed {
        Ok(b) => b,
        Err(e) => return body::error(&e),
    };
    let content = body
        .get("content")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let with_pieces = body
        .get("with_pieces")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let list: Vec<Value> = tokens::pieces(content)
        .map(|p| {
            let id = tokens::token_id(p);
            if with_pieces {
                json!({"id": id, "piece": p})
            } else {
                json!(id)
            }
        })
        .collect();
    body::json_value(StatusCode::OK, &json!({ "tokens": list }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> http::HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_static(k),
                    http::HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    #[test]
    fn an_api_key_is_taken_as_the_dialect_takes_it() {
        let mut up = SimConfig::new(Dialect::LlamaCpp);
        assert!(authorized(&up, &headers(&[])), "no key configured: open");
        up.api_key = Some("k".into());
        let mut bn = SimConfig::new(Dialect::Bitnet);
        bn.api_key = Some("k".into());
        for cfg in [&up, &bn] {
            assert!(authorized(cfg, &headers(&[("authorization", "Bearer k")])));
            assert!(!authorized(cfg, &headers(&[("authorization", "Bearer x")])));
            assert!(!authorized(cfg, &headers(&[])));
        }
        assert!(authorized(&up, &headers(&[("x-api-key", "k")])));
        assert!(!authorized(&bn, &headers(&[("x-api-key", "k")])));
    }
}
