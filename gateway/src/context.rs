//! The context guard: refuse a prompt that cannot fit a backend's context before it is sent.
//!
//! Upstream llama-server answers an oversized prompt with a 400, but the older BitNet server
//! silently drops the start of the conversation (context shift) and answers as if nothing
//! happened. The gateway knows each backend's context per slot from `/props`, so it refuses
//! such a request itself, the same way for every backend.
//!
//! The estimate is cheap (characters / 4, plus a few tokens of template per message). Only
//! when it comes near the limit is the backend's `/tokenize` asked for the exact count, so
//! ordinary requests pay nothing; and not then either when the model's queue is full, since
//! the request is about to be refused.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::backend::Health;
use crate::error::GatewayError;
use crate::pool::ModelPool;
use crate::state::Gateway;

/// Template tokens per message (role markers, separators) added to the text's own tokens.
const PER_MESSAGE: u64 = 8;

#[derive(Deserialize)]
struct Prompted<'a> {
    #[serde(borrow, default)]
    messages: Option<Vec<Message<'a>>>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
}

/// The prompt's text and message count, as far as it can be read.
fn prompt_text(body: &[u8]) -> Option<(String, u64)> {
    let p: Prompted<'_> = serde_json::from_slice(body).ok()?;
    let mut text = String::new();
    let mut n = 0;
    if let Some(messages) = p.messages {
        for m in messages {
            n += 1;
            if let Some(c) = m.content {
                append_text(c, &mut text);
            }
        }
    } else if let Some(prompt) = p.prompt {
        n = 1;
        append_text(prompt, &mut text);
    } else {
        return None;
    }
    Some((text, n))
}

/// Append the text of a content value: a string, or an array of parts with `text`.
fn append_text(v: &RawValue, out: &mut String) {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(v.get()) else {
        return;
    };
    match v {
        serde_json::Value::String(s) => {
            out.push_str(&s);
            out.push('\n');
        }
        serde_json::Value::Array(parts) => {
            for p in parts {
                match p {
                    serde_json::Value::String(s) => out.push_str(&s),
                    other => {
                        if let Some(s) = other.get("text").and_then(|t| t.as_str()) {
                            out.push_str(s);
                        }
                    }
                }
                out.push('\n');
            }
        }
        _ => {}
    }
}

/// Refuse the request if its prompt cannot fit the smallest known per-slot context of the
/// pool's backends.
pub async fn check(
    gw: &Arc<Gateway>,
    pool: &Arc<ModelPool>,
    body: &[u8],
) -> Result<(), GatewayError> {
    let Some(n_ctx) = pool.backends().iter().filter_map(|b| b.n_ctx()).min() else {
        return Ok(());
    };
    // The estimate below is at most the body's length (a message takes more than 30 bytes
    // of JSON, its 8 template tokens less than that, and text is at least 1 byte a char), so
    // a body shorter than half the context cannot be near the limit: skip the parse.
    if (body.len() as u64) < u64::from(n_ctx) / 2 {
        return Ok(());
    }
    let Some((text, messages)) = prompt_text(body) else {
        return Ok(());
    };
    let estimate = text.chars().count() as u64 / 4 + PER_MESSAGE * messages;
    if estimate < u64::from(n_ctx) / 2 {
        return Ok(());
    }
    // A full queue is about to refuse the request: do not make a backend count its tokens
    // for nothing. The estimate still judges it, should a slot free up in between.
    let counted = if pool.queue_is_full() {
        None
    } else {
        tokenize(gw, pool, text).await
    };
    let tokens = match counted {
        Some(t) => t + PER_MESSAGE * messages,
        None => estimate,
    };
    if tokens >= u64::from(n_ctx) {
        return Err(GatewayError::ContextLengthExceeded { tokens, n_ctx });
    }
    Ok(())
}

/// Count tokens with an up backend's `/tokenize`.
async fn tokenize(gw: &Gateway, pool: &ModelPool, text: String) -> Option<u64> {
    let backend = pool
        .backends()
        .iter()
        .find(|b| b.health() == Health::Up)?
        .clone();
    let body = serde_json::json!({ "content": text }).to_string();
    let req = Request::post(backend.uri_for("/tokenize"))
        .header("content-type", "application/json")
        .body(Bytes::from(body))
        .ok()?;
    let fut = async {
        let resp = gw.client.request(req).await.ok()?;
        if resp.status() != StatusCode::OK {
            return None;
        }
        let bytes = resp.into_body().collect().await.ok()?.to_bytes();
        #[derive(Deserialize)]
        struct Tokens {
            tokens: Vec<serde::de::IgnoredAny>,
        }
        let t: Tokens = serde_json::from_slice(&bytes).ok()?;
        Some(t.tokens.len() as u64)
    };
    tokio::time::timeout(
        gw.config()
            .health_timeout
            .max(std::time::Duration::from_secs(5)),
        fut,
    )
    .await
    .ok()
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_text_from_string_and_array_contents_and_prompts() {
        let (t, n) = prompt_text(br#"{"messages":[{"role":"system","content":"abc"},{"role":"user","content":[{"type":"text","text":"de"}]},{"role":"assistant","content":null}]}"#).unwrap();
        assert_eq!(n, 3);
        assert!(t.contains("abc") && t.contains("de"));
        let (t, n) = prompt_text(br#"{"prompt":"hello"}"#).unwrap();
        assert_eq!((t.trim(), n), ("hello", 1));
        assert!(prompt_text(br#"{"input":"x"}"#).is_none());
    }
}
