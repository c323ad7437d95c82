//! Rewrites for the older llama-server that bitnet.cpp builds.
//!
//! Requests: only the fields that must change are touched; every other top-level field
//! keeps its value byte for byte (values are carried as raw JSON, never re-serialised).
//! Responses: `error:` SSE lines become standard `data: {"error":…}` events, and errors the
//! server reports with the wrong status become proper HTTP errors.

use std::fmt::Write as _;

use bytes::{Bytes, BytesMut};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::ToolsMode;

/// A JSON object's members in their original order, values left as raw JSON.
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, &'de RawValue>()? {
                    out.push((k, v));
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

fn write_object<'a>(members: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::from("{");
    for (i, (k, v)) in members.enumerate() {
        if i > 0 {
            out.push(',');
        }
        // Keys came from valid JSON, so re-escaping them cannot fail.
        out.push_str(&serde_json::to_string(k).expect("string serialises"));
        out.push(':');
        out.push_str(v);
    }
    out.push('}');
    out
}

/// A request rewritten for a BitNet backend.
#[derive(Debug, PartialEq, Eq)]
pub struct Rewritten {
    /// The new body.
    pub body: Bytes,
    /// `tools`/`tool_choice` were removed (the client should be told).
    pub dropped_tools: bool,
}

/// Why a request cannot go to a BitNet backend.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RewriteError {
    /// The request needs tool calling, which the server lacks, and `tools = "reject"`.
    #[error("this model's backend has no tool calling: remove `tools` from the request (or ask the operator to set `tools = \"drop\"`)")]
    ToolsUnsupported,
    /// The body is not a JSON object.
    #[error("the request body is not a JSON object: {0}")]
    NotAnObject(String),
}

/// Rewrite an OpenAI chat or completion request for the BitNet server:
/// - `model` becomes the configured id, so responses echo it rather than a file path;
/// - `max_completion_tokens` becomes `max_tokens` (which the server honours);
/// - `content: null` in messages becomes `""` (the server answers null with a 500);
/// - `cache_prompt: true` is added unless the client set it (the fork defaults it off, and
///   re-evaluating a whole conversation at 60 tokens/s costs minutes);
/// - `tools`, `tool_choice` and `parallel_tool_calls` are dropped or refused per `tools`.
///
/// `stream_options` is left alone: the fork ignores it but always puts `usage` on the
/// finish chunk, so clients that asked for usage still receive it.
pub fn rewrite_request(
    body: &[u8],
    model_id: &str,
    tools: ToolsMode,
) -> Result<Rewritten, RewriteError> {
    let Members(members) =
        serde_json::from_slice(body).map_err(|e| RewriteError::NotAnObject(e.to_string()))?;
    let has = |name: &str| members.iter().any(|(k, _)| k == name);
    let has_max_tokens = has("max_tokens");
    let model_json = serde_json::to_string(model_id).expect("string serialises");
    let mut dropped_tools = false;
    let mut out: Vec<(&str, String)> = Vec::with_capacity(members.len() + 2);
    for (k, v) in &members {
        let raw = v.get();
        match k.as_str() {
            "model" => out.push(("model", model_json.clone())),
            "max_completion_tokens" if !has_max_tokens => out.push(("max_tokens", raw.to_string())),
            "max_completion_tokens" => {}
            "tools" | "tool_choice" | "parallel_tool_calls" => {
                let meaningful = k == "tools" && !matches!(raw.trim(), "null" | "[]");
                if meaningful && tools == ToolsMode::Reject {
                    return Err(RewriteError::ToolsUnsupported);
                }
                dropped_tools |= meaningful;
            }
            "messages" => out.push(("messages", fix_null_contents(raw))),
            _ => out.push((k.as_str(), raw.to_string())),
        }
    }
    if !has("model") {
        out.push(("model", model_json));
    }
    if !has("cache_prompt") {
        out.push(("cache_prompt", "true".to_string()));
    }
    let body = write_object(out.iter().map(|(k, v)| (*k, v.as_str())));
    Ok(Rewritten {
        body: Bytes::from(body),
        dropped_tools,
    })
}

/// Replace `"content": null` in each message with `""`, keeping everything else raw.
fn fix_null_contents(messages: &str) -> String {
    let Ok(list) = serde_json::from_str::<Vec<&RawValue>>(messages) else {
        return messages.to_string();
    };
    let mut changed = false;
    let fixed: Vec<String> = list
        .iter()
        .map(|m| match serde_json::from_str::<Members<'_>>(m.get()) {
            Ok(Members(fields))
                if fields
                    .iter()
                    .any(|(k, v)| k == "content" && v.get().trim() == "null") =>
            {
                changed = true;
                write_object(fields.iter().map(|(k, v)| {
                    let v = if k == "content" && v.get().trim() == "null" {
                        "\"\""
                    } else {
                        v.get()
                    };
                    (k.as_str(), v)
                }))
            }
            _ => m.get().to_string(),
        })
        .collect();
    if !changed {
        return messages.to_string();
    }
    format!("[{}]", fixed.join(","))
}

/// Turns the fork's `error: {…}` SSE lines into `data: {"error":{…}}` events.
///
/// Complete lines pass through as they arrive; only a trailing partial line is held until
/// its end, because an `error:` prefix can only be recognised on a whole line start.
#[derive(Debug, Default)]
pub struct SseFixer {
    partial: BytesMut,
}

impl SseFixer {
    /// Fix one frame. Returns the bytes to send now (possibly empty).
    pub fn feed(&mut self, chunk: &[u8]) -> Bytes {
        let cut = match chunk.iter().rposition(|&b| b == b'\n') {
            Some(i) => i + 1,
            None => {
                self.partial.extend_from_slice(chunk);
                return Bytes::new();
            }
        };
        let mut out = BytesMut::with_capacity(self.partial.len() + cut + 16);
        let mut pending = std::mem::take(&mut self.partial);
        pending.extend_from_slice(&chunk[..cut]);
        for line in pending.split_inclusive(|&b| b == b'\n') {
            match line.strip_prefix(b"error:") {
                Some(rest) => {
                    let rest = rest.strip_prefix(b" ").unwrap_or(rest);
                    let body = trim_line_end(rest);
                    out.extend_from_slice(b"data: {\"error\":");
                    out.extend_from_slice(body);
                    out.extend_from_slice(b"}\n");
                }
                None => out.extend_from_slice(line),
            }
        }
        self.partial.extend_from_slice(&chunk[cut..]);
        out.freeze()
    }

    /// Whatever partial line is left at the end of the stream.
    pub fn finish(&mut self) -> Bytes {
        std::mem::take(&mut self.partial).freeze()
    }
}

fn trim_line_end(b: &[u8]) -> &[u8] {
    let b = b.strip_suffix(b"\n").unwrap_or(b);
    b.strip_suffix(b"\r").unwrap_or(b)
}

/// An error the fork reported, normalised to an HTTP status and OpenAI error body.
#[derive(Debug, PartialEq, Eq)]
pub struct NormalisedError {
    /// The status the client should see.
    pub status: u16,
    /// `{"error":{"message","type","code"}}`.
    pub body: Bytes,
}

/// Messages with which the fork answers 500 for what is really a bad request.
const CLIENT_FAULTS: &[&str] = &[
    "unsupported param",
    "invalid",
    "parse",
    "json",
    "required",
    "must be",
    "expected",
];

/// Normalise an error object the fork sent (`{"code":…, "message":…, "type":…}`, or an
/// `{"error":{…}}` wrapper) given the HTTP status it came with.
pub fn normalise_error(status: u16, body: &[u8]) -> Option<NormalisedError> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let e = v.get("error").unwrap_or(&v);
    let message = e.get("message").and_then(|m| m.as_str())?;
    let code = e
        .get("code")
        .and_then(|c| c.as_u64())
        .and_then(|c| u16::try_from(c).ok());
    let mut status = match (status, code) {
        (200, Some(c)) if c >= 400 => c,
        (200, _) => 500,
        (s, _) => s,
    };
    let lower = message.to_ascii_lowercase();
    if status == 500 && CLIENT_FAULTS.iter().any(|p| lower.contains(p)) {
        status = 400;
    }
    let kind = match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        404 => "not_found_error",
        503 => "unavailable_error",
        _ => "server_error",
    };
    let mut code_s = String::new();
    let _ = write!(code_s, "{status}");
    Some(NormalisedError {
        status,
        body: crate::error::error_body(message, kind, &code_s),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(body: &str) -> (serde_json::Value, Rewritten) {
        let r = rewrite_request(body.as_bytes(), "falcon3-10b", ToolsMode::Drop).unwrap();
        (serde_json::from_slice(&r.body).unwrap(), r)
    }

    #[test]
    fn max_completion_tokens_becomes_max_tokens_and_cache_prompt_is_added() {
        let (v, r) = rw(r#"{"model":"bitnet","max_completion_tokens":7,"messages":[]}"#);
        assert_eq!(v["max_tokens"], 7);
        assert!(v.get("max_completion_tokens").is_none());
        assert_eq!(v["cache_prompt"], true);
        assert_eq!(v["model"], "falcon3-10b");
        assert!(!r.dropped_tools);
        // A client's own choices win.
        let (v, _) = rw(r#"{"max_tokens":3,"max_completion_tokens":9,"cache_prompt":false}"#);
        assert_eq!(
            (v["max_tokens"].as_u64(), v["cache_prompt"].as_bool()),
            (Some(3), Some(false))
        );
    }

    #[test]
    fn other_fields_keep_their_exact_bytes_and_order() {
        let body = r#"{"model":"x","temperature":0.70,"stop":["\n\n"],"x":{"deep":[1,2.50e3]},"stream":true}"#;
        let r = rewrite_request(body.as_bytes(), "m", ToolsMode::Drop).unwrap();
        let s = std::str::from_utf8(&r.body).unwrap();
        assert_eq!(
            s,
            r#"{"model":"m","temperature":0.70,"stop":["\n\n"],"x":{"deep":[1,2.50e3]},"stream":true,"cache_prompt":true}"#
        );
    }

    #[test]
    fn null_content_becomes_empty_string_only_where_null() {
        let (v, _) = rw(
            r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":null},{"role":"user","content":[{"type":"text","text":"x"}]}]}"#,
        );
        assert_eq!(v["messages"][0]["content"], "hi");
        assert_eq!(v["messages"][1]["content"], "");
        assert_eq!(v["messages"][2]["content"][0]["text"], "x");
    }

    #[test]
    fn tools_are_dropped_or_refused() {
        let body = r#"{"tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"auto","messages":[]}"#;
        let (v, r) = rw(body);
        assert!(v.get("tools").is_none() && v.get("tool_choice").is_none());
        assert!(r.dropped_tools);
        assert_eq!(
            rewrite_request(body.as_bytes(), "m", ToolsMode::Reject),
            Err(RewriteError::ToolsUnsupported)
        );
        // An empty tools list asks for nothing: dropped quietly even in reject mode.
        let r = rewrite_request(br#"{"tools":[]}"#, "m", ToolsMode::Reject).unwrap();
        assert!(!r.dropped_tools);
    }

    #[test]
    fn error_lines_become_standard_data_events_across_any_split() {
        let input = b"data: {\"a\":1}\n\nerror: {\"code\":500,\"message\":\"boom\"}\r\n\r\ndata: [DONE]\n\n";
        let want = b"data: {\"a\":1}\n\ndata: {\"error\":{\"code\":500,\"message\":\"boom\"}}\n\r\ndata: [DONE]\n\n";
        for cut in 0..input.len() {
            let mut f = SseFixer::default();
            let mut out = f.feed(&input[..cut]).to_vec();
            out.extend_from_slice(&f.feed(&input[cut..]));
            out.extend_from_slice(&f.finish());
            assert_eq!(out, want.to_vec(), "split at {cut}");
        }
    }

    #[test]
    fn errors_are_normalised_to_proper_statuses() {
        let e = normalise_error(
            500,
            br#"{"error":{"code":500,"message":"Unsupported param: tools","type":"server_error"}}"#,
        )
        .unwrap();
        assert_eq!(e.status, 400);
        let v: serde_json::Value = serde_json::from_slice(&e.body).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["message"], "Unsupported param: tools");
        let e = normalise_error(200, br#"{"code":503,"message":"busy"}"#).unwrap();
        assert_eq!(e.status, 503);
        let e = normalise_error(500, br#"{"code":500,"message":"out of memory"}"#).unwrap();
        assert_eq!(e.status, 500);
        assert!(normalise_error(500, b"not json").is_none());
    }
}
