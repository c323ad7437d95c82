//! Reading a generation request into a [`Job`], with each dialect's rules and refusals.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::config::{Dialect, SimConfig};
use super::error::ApiError;
use super::tokens::{self, MSG_END, MSG_START};

/// Most tokens the bitnet fork generates for one request: its launcher starts the server with
/// `-n 4096`, which caps every request's own limit.
const BITNET_MAX_PREDICT: usize = 4096;

/// The model name the bitnet fork reports when a chat request names none.
const BITNET_DEFAULT_MODEL: &str = "gpt-3.5-turbo-0613";

/// Which API a generation request came through; it decides the response shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// OpenAI chat completions.
    Chat,
    /// OpenAI text completions (upstream's `/v1/completions`).
    Completion,
    /// llama.cpp's own `/completion` (and the bitnet fork's `/v1/completions`).
    Native,
}

/// One generation request, ready to run.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub(crate) endpoint: Endpoint,
    pub(crate) stream: bool,
    /// `stream_options.include_usage`.
    pub(crate) include_usage: bool,
    /// Prompt tokens, after any truncation.
    pub(crate) prompt: Arc<[u32]>,
    /// The prompt was cut to fit the context (bitnet dialect).
    pub(crate) truncated: bool,
    /// Tokens to generate.
    pub(crate) n_predict: usize,
    /// Whether reaching `n_predict` is hitting a limit ("length") rather than the model stopping
    /// by itself ("stop").
    pub(crate) limited: bool,
    pub(crate) cache_prompt: bool,
    pub(crate) id_slot: Option<usize>,
    /// The `model` the response names.
    pub(crate) model: String,
    /// Seed of the generated text.
    pub(crate) seed: u64,
}

/// Reads `body` as a request to `endpoint`.
pub(crate) fn parse(cfg: &SimConfig, endpoint: Endpoint, body: &[u8]) -> Result<Job, ApiError> {
    let dialect = cfg.dialect;
    // The fork answers anything it cannot use with a 500; upstream calls it a bad request.
    let bad = |msg: String| match dialect {
        Dialect::LlamaCpp => ApiError::InvalidRequest(msg),
        Dialect::Bitnet => ApiError::Server(msg),
    };
    let body: Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("Invalid JSON: {e}")))?;
    let Value::Object(body) = body else {
        return Err(bad("the request body must be a JSON object".to_owned()));
    };

    let mut prompt = Vec::new();
    match endpoint {
        Endpoint::Chat => {
            if dialect == Dialect::Bitnet && body.contains_key("tools") {
                return Err(ApiError::Server("Unsupported param: tools".to_owned()));
            }
            let text = render_chat(&body, dialect).map_err(bad)?;
            tokens::tokenize_into(&text, &mut prompt);
        }
        Endpoint::Completion | Endpoint::Native => match body.get("prompt") {
            Some(Value::String(s)) => tokens::tokenize_into(s, &mut prompt),
            Some(Value::Array(items)) if items.iter().all(Value::is_u64) => {
                // Already token ids, as llama.cpp accepts.
                prompt.extend(items.iter().filter_map(Value::as_u64).map(|t| t as u32));
            }
            Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
                tokens::tokenize_into(items[0].as_str().unwrap_or_default(), &mut prompt);
            }
            Some(_) => {
                return Err(bad(
                    "\"prompt\" must be a string or an array of token ids".to_owned()
                ))
            }
            None => return Err(bad("\"prompt\" is required".to_owned())),
        },
    }

    let n_ctx = cfg.ctx;
    let mut truncated = false;
    if prompt.len() >= n_ctx {
        match dialect {
            Dialect::LlamaCpp => {
                return Err(ApiError::ExceedContext {
                    n_prompt: prompt.len(),
                    n_ctx,
                })
            }
            Dialect::Bitnet => {
                // The fork keeps the end of the prompt, dropping whole blocks of half the
                // context from the front until it fits.
                let block = (n_ctx / 2).max(1);
                let erased = (prompt.len() - block) / block;
                prompt.drain(..erased * block);
                truncated = true;
            }
        }
    }

    let limit = max_tokens(&body, endpoint, dialect).map_err(bad)?;
    let (mut n_predict, mut limited) = match limit {
        Some(n) => (n, true),
        None => (cfg.default_max_tokens, false),
    };
    match dialect {
        // Upstream stops when the slot's context is full.
        Dialect::LlamaCpp if prompt.len() + n_predict > n_ctx => {
            n_predict = n_ctx - prompt.len();
            limited = true;
        }
        _ => {}
    }
    // The server-wide `-n`; the fork shifts the context and goes on up to it, its
    // launcher's 4096 when none was given.
    let cap = match dialect {
        Dialect::LlamaCpp => cfg.n_predict,
        Dialect::Bitnet => Some(cfg.n_predict.unwrap_or(BITNET_MAX_PREDICT)),
    };
    if let Some(cap) = cap.filter(|&cap| n_predict > cap) {
        n_predict = cap;
        limited = true;
    }

    let id_slot = match body.get("id_slot").and_then(Value::as_i64) {
        None | Some(-1) => None,
        Some(n) if n >= 0 && (n as usize) < cfg.slots => Some(n as usize),
        // The fork queues such a request for a slot that never comes; upstream refuses it.
        Some(n) => match dialect {
            Dialect::LlamaCpp => {
                return Err(ApiError::InvalidRequest(format!("Invalid id_slot: {n}")))
            }
            Dialect::Bitnet => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        },
    };

    let requested_model = body.get("model").and_then(Value::as_str);
    let model = match (endpoint, dialect, requested_model) {
        (Endpoint::Native, _, _) => cfg.model_id().to_owned(),
        (_, _, Some(m)) => m.to_owned(),
        (_, Dialect::Bitnet, None) => BITNET_DEFAULT_MODEL.to_owned(),
        (_, Dialect::LlamaCpp, None) => cfg.model_id().to_owned(),
    };

    let seed = tokens::seed_of(&prompt);
    Ok(Job {
        endpoint,
        stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
        include_usage: body
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false),
        prompt: prompt.into(),
        truncated,
        n_predict,
        limited,
        cache_prompt: body
            .get("cache_prompt")
            .and_then(Value::as_bool)
            .unwrap_or(dialect.default_cache_prompt()),
        id_slot,
        model,
        seed,
    })
}

/// The generation limit the request sets, if any. Negative means "no limit".
fn max_tokens(
    body: &Map<String, Value>,
    endpoint: Endpoint,
    dialect: Dialect,
) -> Result<Option<usize>, String> {
    let keys: &[&str] = match (endpoint, dialect) {
        (Endpoint::Native, _) => &["n_predict", "max_tokens"],
        // The fork predates `max_completion_tokens` and ignores it.
        (_, Dialect::Bitnet) => &["max_tokens", "n_predict"],
        (_, Dialect::LlamaCpp) => &["max_completion_tokens", "max_tokens", "n_predict"],
    };
    for key in keys {
        match body.get(*key) {
            None | Some(Value::Null) => continue,
            Some(v) => {
                let n = v
                    .as_i64()
                    .ok_or_else(|| format!("\"{key}\" must be an integer"))?;
                return Ok(usize::try_from(n).ok());
            }
        }
    }
    Ok(None)
}

/// Renders the chat as one prompt with a ChatML-like template, ending with the opening of the
/// assistant's turn. Re-sent history renders to the same text, so it is a prefix of the next
/// turn's prompt.
fn render_chat(body: &Map<String, Value>, dialect: Dialect) -> Result<String, String> {
    let Some(Value::Array(messages)) = body.get("messages") else {
        return Err("\"messages\" is required and must be an array".to_owned());
    };
    let mut out = String::with_capacity(256);
    // Upstream's templates put the tool definitions in the prompt, so they cost tokens.
    if let Some(tools) = body.get("tools").filter(|t| !t.is_null()) {
        out.push_str(MSG_START);
        out.push_str("system\n# Tools\n");
        out.push_str(&tools.to_string());
        out.push_str(MSG_END);
    }
    for msg in messages {
        let role = msg
            .get("role")
            .and_then(Value::as_str)
            .ok_or("every message needs a string \"role\"")?;
        out.push_str(MSG_START);
        out.push_str(role);
        out.push('\n');
        match msg.get("content") {
            None => {}
            Some(Value::String(s)) => out.push_str(s),
            Some(Value::Array(parts)) => {
                for (i, part) in parts.iter().enumerate() {
                    if i > 0 {
                        out.push('\n');
                    }
                    if let Some(text) = part.get("text").and_then(Value::as_str) {
                        out.push_str(text);
                    }
                }
            }
            // Upstream accepts a null content (an assistant turn that only calls tools).
            Some(Value::Null) if dialect == Dialect::LlamaCpp => {}
            Some(_) => return Err("Invalid 'content' type".to_owned()),
        }
        if let Some(calls) = msg.get("tool_calls").filter(|c| !c.is_null()) {
            out.push('\n');
            out.push_str(&calls.to_string());
        }
        out.push_str(MSG_END);
    }
    out.push_str(MSG_START);
    out.push_str("assistant\n");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(dialect: Dialect, endpoint: Endpoint, body: Value) -> Result<Job, ApiError> {
        parse(
            &SimConfig::new(dialect),
            endpoint,
            body.to_string().as_bytes(),
        )
    }

    #[test]
    fn chat_history_renders_as_a_prefix_of_the_next_turn() {
        let turn1 = json!({"messages": [{"role": "user", "content": "Hi there"}]});
        let turn2 = json!({"messages": [
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello, how are you"},
            {"role": "user", "content": "Fine"},
        ]});
        let a = job(Dialect::LlamaCpp, Endpoint::Chat, turn1)
            .unwrap()
            .prompt;
        let b = job(Dialect::LlamaCpp, Endpoint::Chat, turn2)
            .unwrap()
            .prompt;
        // Turn 1's prompt ends with the assistant opening, which turn 2 has too.
        assert_eq!(&b[..a.len()], &a[..]);
    }

    #[test]
    fn bitnet_ignores_max_completion_tokens_and_upstream_honours_it() {
        let body =
            json!({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 3});
        assert_eq!(
            job(Dialect::LlamaCpp, Endpoint::Chat, body.clone())
                .unwrap()
                .n_predict,
            3
        );
        let bn = job(Dialect::Bitnet, Endpoint::Chat, body).unwrap();
        assert_eq!((bn.n_predict, bn.limited), (128, false));
    }

    #[test]
    fn upstream_refuses_and_bitnet_truncates_an_oversized_prompt() {
        let long = "word ".repeat(5000);
        let body = json!({"prompt": long});
        let err = job(Dialect::LlamaCpp, Endpoint::Native, body.clone()).unwrap_err();
        assert_eq!(
            err,
            ApiError::ExceedContext {
                n_prompt: 5000,
                n_ctx: 4096
            }
        );
        let bn = job(Dialect::Bitnet, Endpoint::Native, body).unwrap();
        assert!(bn.truncated);
        assert!(bn.prompt.len() < 4096, "{}", bn.prompt.len());
        assert_eq!(bn.prompt.len(), 5000 - 2048);
    }

    #[test]
    fn upstream_caps_generation_at_the_context_end() {
        let body = json!({"prompt": "a ".repeat(4000), "n_predict": 500});
        let j = job(Dialect::LlamaCpp, Endpoint::Native, body).unwrap();
        assert_eq!((j.n_predict, j.limited), (96, true));
    }

    #[test]
    fn bitnet_caps_generation_at_its_server_limit() {
        let body = json!({"prompt": "x", "n_predict": 1_000_000_000});
        let j = job(Dialect::Bitnet, Endpoint::Native, body).unwrap();
        assert_eq!((j.n_predict, j.limited), (4096, true));
    }

    #[test]
    fn a_server_wide_n_predict_caps_both_dialects() {
        for dialect in [Dialect::LlamaCpp, Dialect::Bitnet] {
            let mut cfg = SimConfig::new(dialect);
            cfg.n_predict = Some(10);
            let body = json!({"prompt": "x", "n_predict": 100});
            let j = parse(&cfg, Endpoint::Native, body.to_string().as_bytes()).unwrap();
            assert_eq!((j.n_predict, j.limited), (10, true), "{dialect:?}");
            let body = json!({"prompt": "x", "n_predict": 5});
            let j = parse(&cfg, Endpoint::Native, body.to_string().as_bytes()).unwrap();
            assert_eq!((j.n_predict, j.limited), (5, true), "{dialect:?}");
        }
        // Without -n, upstream has no cap beyond the context.
        let body = json!({"prompt": "x", "n_predict": 5000, "stream": false});
        let j = job(Dialect::LlamaCpp, Endpoint::Native, body).unwrap();
        assert_eq!(j.n_predict, 4095);
    }

    #[test]
    fn content_null_is_fine_upstream_and_a_500_in_bitnet() {
        let body = json!({"messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "1"}]},
        ]});
        assert!(job(Dialect::LlamaCpp, Endpoint::Chat, body.clone()).is_ok());
        assert_eq!(
            job(Dialect::Bitnet, Endpoint::Chat, body).unwrap_err(),
            ApiError::Server("Invalid 'content' type".to_owned())
        );
    }

    #[test]
    fn model_falls_back_per_dialect() {
        let body = json!({"messages": [{"role": "user", "content": "x"}]});
        let up = job(Dialect::LlamaCpp, Endpoint::Chat, body.clone()).unwrap();
        assert_eq!(up.model, crate::sim::DEFAULT_MODEL_PATH);
        let bn = job(Dialect::Bitnet, Endpoint::Chat, body).unwrap();
        assert_eq!(bn.model, "gpt-3.5-turbo-0613");
    }
}
