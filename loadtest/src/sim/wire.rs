//! Response shapes of each endpoint and dialect: SSE chunks, final objects, usage and timings.
//!
//! Token events are the hot path: each is the same JSON with a different token text, so the text
//! around the token is rendered once per request and a token event is three slice copies.
//! Everything else (first, last and error events, non-streamed answers) is built with
//! `serde_json`, which sorts keys as llama-server's JSON library does.

use bytes::BytesMut;
use serde_json::{json, Map, Value};

use super::config::Dialect;
use super::error::ApiError;
use super::request::{Endpoint, Job};

/// Stands in for a token's text while rendering the token event template. It needs no JSON
/// escaping, so it appears verbatim in the rendered text, and the token's field comes before any
/// field a client controls (`model`), so its first occurrence is the right one.
const TOKEN_MARK: &str = "@@llama-sim-token@@";

/// `system_fingerprint` of upstream answers.
const FINGERPRINT: &str = "b0-llama-sim";

/// What one finished request did, for `usage`, `timings` and the native final object.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stats {
    /// Prompt tokens reused from the slot's cache.
    pub(crate) cache_n: usize,
    /// Prompt tokens evaluated.
    pub(crate) prompt_n: usize,
    pub(crate) prompt_ms: f64,
    pub(crate) predicted_n: usize,
    pub(crate) predicted_ms: f64,
}

/// Renders one request's answer.
pub(crate) struct Wire {
    endpoint: Endpoint,
    dialect: Dialect,
    stream: bool,
    include_usage: bool,
    limited: bool,
    truncated: bool,
    id: String,
    created: u64,
    model: String,
    id_slot: usize,
    /// Streaming: the token event's text before and after the token's text.
    head: String,
    tail: String,
    /// Non-streaming: the generated text so far.
    text: String,
    /// Whether the opening event (the chat role chunk) is written.
    opened: bool,
}

impl Wire {
    /// Prepares the answer to `job`, which runs on slot `id_slot` as request `seq`.
    pub(crate) fn new(job: &Job, dialect: Dialect, id_slot: usize, seq: u64, created: u64) -> Wire {
        let prefix = match job.endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion | Endpoint::Native => "cmpl",
        };
        let mut wire = Wire {
            endpoint: job.endpoint,
            dialect,
            stream: job.stream,
            include_usage: job.include_usage,
            limited: job.limited,
            truncated: job.truncated,
            id: format!("{prefix}-{:016x}", mix(seq ^ created.rotate_left(32))),
            created,
            model: job.model.clone(),
            id_slot,
            head: String::new(),
            tail: String::new(),
            text: String::new(),
            opened: false,
        };
        if job.stream {
            let event = sse_data(&wire.token_event(TOKEN_MARK));
            let at = event.find(TOKEN_MARK).expect("the mark survives rendering");
            wire.tail = event[at + TOKEN_MARK.len()..].to_owned();
            wire.head = event;
            wire.head.truncate(at);
        }
        wire
    }

    /// Adds one generated token.
    pub(crate) fn token(&mut self, buf: &mut BytesMut, piece: &str) {
        if !self.stream {
            self.text.push_str(piece);
            return;
        }
        self.open(buf);
        buf.extend_from_slice(self.head.as_bytes());
        buf.extend_from_slice(piece.as_bytes());
        buf.extend_from_slice(self.tail.as_bytes());
    }

    /// Writes the end of a successful answer: finish and usage events and `[DONE]` when
    /// streaming, the whole object otherwise.
    pub(crate) fn finish(&mut self, buf: &mut BytesMut, stats: &Stats) {
        if !self.stream {
            let body = self.full_object(stats);
            buf.extend_from_slice(body.to_string().as_bytes());
            return;
        }
        self.open(buf);
        let upstream = self.dialect == Dialect::LlamaCpp;
        match self.endpoint {
            Endpoint::Native => {
                let mut last = self.native_object(stats, String::new());
                last.insert("stop".into(), json!(true));
                buf.extend_from_slice(sse_data(&Value::Object(last)).as_bytes());
            }
            Endpoint::Chat | Endpoint::Completion => {
                let finish = match self.endpoint {
                    Endpoint::Chat => json!([{
                        "finish_reason": self.finish_reason(),
                        "index": 0,
                        "delta": {},
                    }]),
                    _ => json!([{
                        "text": "",
                        "index": 0,
                        "logprobs": null,
                        "finish_reason": self.finish_reason(),
                    }]),
                };
                let mut chunk = self.chunk(finish);
                if !upstream {
                    // The fork always puts usage on the finish chunk and never timings.
                    chunk.insert("usage".into(), self.usage(stats));
                } else if !self.include_usage {
                    chunk.insert("timings".into(), self.timings(stats));
                }
                buf.extend_from_slice(sse_data(&Value::Object(chunk)).as_bytes());
                if upstream && self.include_usage {
                    let mut usage = self.chunk(json!([]));
                    usage.insert("usage".into(), self.usage(stats));
                    usage.insert("timings".into(), self.timings(stats));
                    buf.extend_from_slice(sse_data(&Value::Object(usage)).as_bytes());
                }
                buf.extend_from_slice(b"data: [DONE]\n\n");
            }
        }
    }

    /// Writes a mid-stream failure the way the dialect reports it. The stream ends after it.
    pub(crate) fn error(&self, buf: &mut BytesMut, err: &ApiError) {
        match self.dialect {
            // Upstream sends the error as an ordinary data event and closes without `[DONE]`.
            Dialect::LlamaCpp => buf.extend_from_slice(sse_data(&err.body()).as_bytes()),
            // The fork invents an `error` field, and still ends OpenAI-style streams properly.
            Dialect::Bitnet => {
                buf.extend_from_slice(b"error: ");
                buf.extend_from_slice(err.object().to_string().as_bytes());
                buf.extend_from_slice(b"\n\n");
                if self.endpoint != Endpoint::Native {
                    buf.extend_from_slice(b"data: [DONE]\n\n");
                }
            }
        }
    }

    /// The chat role chunk, before the first token.
    fn open(&mut self, buf: &mut BytesMut) {
        if std::mem::replace(&mut self.opened, true) || self.endpoint != Endpoint::Chat {
            return;
        }
        let delta = match self.dialect {
            Dialect::LlamaCpp => json!({"role": "assistant", "content": null}),
            Dialect::Bitnet => json!({"role": "assistant"}),
        };
        let chunk = self.chunk(json!([{"finish_reason": null, "index": 0, "delta": delta}]));
        buf.extend_from_slice(sse_data(&Value::Object(chunk)).as_bytes());
    }

    /// The streamed event for one token with text `piece`.
    fn token_event(&self, piece: &str) -> Value {
        match self.endpoint {
            Endpoint::Chat => Value::Object(self.chunk(json!([{
                "finish_reason": null,
                "index": 0,
                "delta": {"content": piece},
            }]))),
            Endpoint::Completion => Value::Object(self.chunk(json!([{
                "text": piece,
                "index": 0,
                "logprobs": null,
                "finish_reason": null,
            }]))),
            Endpoint::Native => {
                let mut event = json!({
                    "content": piece,
                    "stop": false,
                    "id_slot": self.id_slot,
                    "index": 0,
                });
                if self.dialect == Dialect::Bitnet {
                    event["multimodal"] = json!(false);
                }
                event
            }
        }
    }

    /// An OpenAI chunk or object with `choices` and the fields every one of them carries.
    fn chunk(&self, choices: Value) -> Map<String, Value> {
        let object = match (self.endpoint, self.stream) {
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Chat, false) => "chat.completion",
            _ => "text_completion",
        };
        let mut m = Map::new();
        m.insert("choices".into(), choices);
        m.insert("created".into(), json!(self.created));
        m.insert("id".into(), json!(self.id));
        m.insert("model".into(), json!(self.model));
        m.insert("object".into(), json!(object));
        if self.dialect == Dialect::LlamaCpp {
            m.insert("system_fingerprint".into(), json!(FINGERPRINT));
        }
        m
    }

    /// The non-streamed answer.
    fn full_object(&mut self, stats: &Stats) -> Value {
        let text = std::mem::take(&mut self.text);
        let mut obj = match self.endpoint {
            Endpoint::Native => {
                let mut obj = self.native_object(stats, text);
                obj.insert("stop".into(), json!(true));
                return Value::Object(obj);
            }
            Endpoint::Chat => self.chunk(json!([{
                "finish_reason": self.finish_reason(),
                "index": 0,
                "message": {"role": "assistant", "content": text},
            }])),
            Endpoint::Completion => self.chunk(json!([{
                "text": text,
                "index": 0,
                "logprobs": null,
                "finish_reason": self.finish_reason(),
            }])),
        };
        obj.insert("usage".into(), self.usage(stats));
        obj.insert("timings".into(), self.timings(stats));
        Value::Object(obj)
    }

    /// llama.cpp's native final object, without `stop`.
    fn native_object(&self, stats: &Stats, content: String) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("content".into(), json!(content));
        m.insert("id_slot".into(), json!(self.id_slot));
        m.insert("index".into(), json!(0));
        m.insert("model".into(), json!(self.model));
        m.insert("tokens_predicted".into(), json!(stats.predicted_n));
        m.insert(
            "tokens_evaluated".into(),
            json!(stats.cache_n + stats.prompt_n),
        );
        m.insert(
            "tokens_cached".into(),
            json!(stats.cache_n + stats.prompt_n + stats.predicted_n),
        );
        m.insert("truncated".into(), json!(self.truncated));
        m.insert("stopping_word".into(), json!(""));
        match self.dialect {
            Dialect::LlamaCpp => {
                let stop_type = if self.limited { "limit" } else { "eos" };
                m.insert("stop_type".into(), json!(stop_type));
            }
            Dialect::Bitnet => {
                m.insert("stopped_eos".into(), json!(!self.limited));
                m.insert("stopped_limit".into(), json!(self.limited));
                m.insert("stopped_word".into(), json!(false));
            }
        }
        m.insert("timings".into(), self.timings(stats));
        m
    }

    fn finish_reason(&self) -> &'static str {
        if self.limited {
            "length"
        } else {
            "stop"
        }
    }

    fn usage(&self, s: &Stats) -> Value {
        let prompt_tokens = s.cache_n + s.prompt_n;
        let mut usage = json!({
            "completion_tokens": s.predicted_n,
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + s.predicted_n,
        });
        if self.dialect == Dialect::LlamaCpp {
            usage["prompt_tokens_details"] = json!({"cached_tokens": s.cache_n});
        }
        usage
    }

    fn timings(&self, s: &Stats) -> Value {
        // A zero duration gives an infinite rate, which JSON writes as null, as llama-server's
        // JSON library does.
        let per_token = |ms: f64, n: usize| ms / n as f64;
        let per_second = |ms: f64, n: usize| 1e3 / ms * n as f64;
        let mut t = json!({
            "prompt_n": s.prompt_n,
            "prompt_ms": s.prompt_ms,
            "prompt_per_token_ms": per_token(s.prompt_ms, s.prompt_n),
            "prompt_per_second": per_second(s.prompt_ms, s.prompt_n),
            "predicted_n": s.predicted_n,
            "predicted_ms": s.predicted_ms,
            "predicted_per_token_ms": per_token(s.predicted_ms, s.predicted_n),
            "predicted_per_second": per_second(s.predicted_ms, s.predicted_n),
        });
        // `cache_n` came to the timings after the fork's base.
        if self.dialect == Dialect::LlamaCpp {
            t["cache_n"] = json!(s.cache_n);
        }
        t
    }
}

/// `data: <json>\n\n`.
fn sse_data(v: &Value) -> String {
    format!("data: {v}\n\n")
}

/// Scrambles a counter into an id-looking number.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
