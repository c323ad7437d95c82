//! One chat request on the wire, measured.
//!
//! The generator must not become the bottleneck at thousands of requests per second, so this
//! path does as little as it can: the request body is serialised once from borrowed messages,
//! SSE frames go through the incremental parser without copies, each chunk's JSON is decoded into
//! borrowed views that skip every field we do not use, and the clock is read once per body frame
//! (chunks that arrive in the same frame did arrive together).

use std::borrow::Cow;
use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use super::record::ErrorKind;
use super::workload::Message;
use crate::sse::SseParser;

/// The pooled HTTP/1.1 client the generator sends through.
pub(crate) type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Longest error text kept per failed request.
const MAX_ERROR_MESSAGE: usize = 240;
/// How much of an error response body is read to find its message.
const MAX_ERROR_BODY: usize = 8 * 1024;

/// A client whose pool can keep one idle connection per possible concurrent request, so a closed
/// loop never pays for reconnecting, with Nagle's algorithm off so small requests leave at once.
pub(crate) fn build_client(max_connections: usize, connect_timeout: Duration) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(max_connections)
        .build(connector)
}

/// Where and how to send.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub uri: http::Uri,
    pub auth: Option<HeaderValue>,
}

/// The JSON body of a chat request.
#[derive(Serialize)]
pub(crate) struct ChatRequest<'a> {
    pub model: &'a str,
    pub messages: &'a [Message],
    pub stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: u32,
}

/// Asks for the usage chunk at the end of a stream, which carries the token counts.
#[derive(Serialize)]
pub(crate) struct StreamOptions {
    pub include_usage: bool,
}

/// What a finished exchange measured.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub status: Option<u16>,
    pub ttft: Option<Duration>,
    pub e2e: Duration,
    pub content_chunks: u64,
    pub itl_sum: Duration,
    pub itl_max: Duration,
    pub usage_completion: Option<u64>,
    pub usage_prompt: Option<u64>,
    pub usage_cached: Option<u64>,
    pub timings_predicted: Option<u64>,
    pub timings_prompt: Option<u64>,
    pub timings_cached: Option<u64>,
    pub error: Option<(ErrorKind, String)>,
    /// The reply text, kept only when the caller asked for it.
    pub reply: String,
    finished: bool,
}

impl Outcome {
    fn fail(&mut self, kind: ErrorKind, message: impl Into<String>) {
        if self.error.is_none() {
            let mut message = message.into();
            truncate_on_char(&mut message, MAX_ERROR_MESSAGE);
            self.error = Some((kind, message));
        }
    }

    /// Tokens generated: the server's own count if it gave one.
    pub fn completion_tokens(&self) -> u64 {
        self.usage_completion
            .or(self.timings_predicted)
            .unwrap_or(self.content_chunks)
    }

    /// Prompt tokens: `usage`, else `timings` (where `prompt_n` excludes the cached part).
    pub fn prompt_tokens(&self) -> Option<u64> {
        self.usage_prompt
            .or(match (self.timings_prompt, self.timings_cached) {
                (Some(p), c) => Some(p + c.unwrap_or(0)),
                (None, c) => c,
            })
    }

    /// Prompt tokens served from the server's cache.
    pub fn cached_tokens(&self) -> Option<u64> {
        self.usage_cached.or(self.timings_cached)
    }
}

/// Per-request options.
pub(crate) struct Exchange<'a> {
    pub client: &'a HttpClient,
    pub target: &'a Target,
    pub stream: bool,
    pub keep_reply: bool,
    pub timeout: Duration,
}

impl Exchange<'_> {
    /// Sends `body` and measures the response until it ends, fails, times out or `stop`
    /// resolves. When each content-bearing chunk of a stream arrived is appended to
    /// `arrivals`, in microseconds since the request was sent.
    pub async fn run(
        &self,
        body: Bytes,
        arrivals: &mut Vec<u64>,
        stop: impl Future<Output = ()>,
    ) -> Outcome {
        let start = Instant::now();
        let mut out = Outcome::default();
        {
            let work =
                tokio::time::timeout(self.timeout, self.drive(body, start, &mut out, arrivals));
            tokio::select! {
                res = work => if res.is_err() {
                    out.fail(ErrorKind::Timeout, format!("no complete response within {:?}", self.timeout));
                },
                () = stop => out.fail(ErrorKind::Cancelled, "still running when the run ended"),
            }
        }
        out.e2e = start.elapsed();
        out
    }

    async fn drive(&self, body: Bytes, start: Instant, out: &mut Outcome, arrivals: &mut Vec<u64>) {
        let mut req = http::Request::new(Full::new(body));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.target.uri.clone();
        let headers = req.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if self.stream {
            headers.insert(ACCEPT, HeaderValue::from_static("text/event-stream"));
        }
        if let Some(auth) = &self.target.auth {
            headers.insert(AUTHORIZATION, auth.clone());
        }

        let resp = match self.client.request(req).await {
            Ok(resp) => resp,
            Err(err) => {
                let kind = if err.is_connect() {
                    ErrorKind::Connect
                } else {
                    ErrorKind::Transport
                };
                out.fail(kind, error_chain(&err));
                return;
            }
        };
        let status = resp.status();
        out.status = Some(status.as_u16());
        if !status.is_success() {
            let message = error_body_message(resp.into_body()).await;
            out.fail(
                ErrorKind::from_status(status.as_u16()),
                format!("HTTP {}: {message}", status.as_u16()),
            );
            return;
        }
        let is_sse = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
        if is_sse {
            self.read_stream(resp.into_body(), start, out, arrivals)
                .await;
        } else {
            // Without a stream the head is the first moment anything of the answer is known.
            out.ttft = Some(start.elapsed());
            self.read_whole(resp.into_body(), out).await;
        }
    }

    async fn read_stream(
        &self,
        mut body: Incoming,
        start: Instant,
        out: &mut Outcome,
        arrivals: &mut Vec<u64>,
    ) {
        let mut parser = SseParser::new();
        let mut done = false;
        let mut last_content: Option<Instant> = None;
        while let Some(frame) = body.frame().await {
            let frame = match frame {
                Ok(frame) => frame,
                Err(err) => {
                    out.fail(
                        ErrorKind::Truncated,
                        format!("stream broke: {}", error_chain(&err)),
                    );
                    return;
                }
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let now = Instant::now();
            if let Err(err) = parser.push(&data) {
                out.fail(ErrorKind::BadResponse, err.to_string());
                return;
            }
            while let Some(event) = parser.next_event() {
                if let Some(err) = event.extra_field("error") {
                    out.fail(ErrorKind::MidStream, err.to_owned());
                    return;
                }
                if event.is_done() {
                    done = true;
                    continue;
                }
                if event.data.is_empty() {
                    continue;
                }
                let content = match self.absorb(event.data, out) {
                    Ok(content) => content,
                    Err((kind, message)) => {
                        out.fail(kind, message);
                        return;
                    }
                };
                if content {
                    match last_content {
                        None => out.ttft = Some(now - start),
                        Some(prev) => {
                            let gap = now - prev;
                            out.itl_sum += gap;
                            out.itl_max = out.itl_max.max(gap);
                        }
                    }
                    last_content = Some(now);
                    arrivals.push(micros(now - start));
                }
            }
        }
        // Streams end with [DONE]; tolerate servers that omit it after a finish_reason, but a
        // stream that simply stops was cut off.
        if !done && !out.finished {
            out.fail(ErrorKind::Truncated, "stream ended before [DONE]");
        }
    }

    /// Decodes one chunk into `out`. `Ok(true)` when it carried generated text; `Err` with the
    /// failure when the chunk fails the request.
    fn absorb(&self, data: &[u8], out: &mut Outcome) -> Result<bool, (ErrorKind, String)> {
        let lossy;
        let chunk: Chunk<'_> = match serde_json::from_slice(data) {
            Ok(chunk) => chunk,
            // Some servers split a multi-byte character across chunks; JSON decoders reject the
            // broken UTF-8, so retry on a repaired copy rather than fail the request.
            Err(_) if std::str::from_utf8(data).is_err() => {
                lossy = String::from_utf8_lossy(data);
                serde_json::from_str(&lossy)
                    .map_err(|err| (ErrorKind::BadResponse, format!("undecodable chunk: {err}")))?
            }
            Err(err) => {
                return Err((ErrorKind::BadResponse, format!("undecodable chunk: {err}")));
            }
        };
        if let Some(err) = chunk.error {
            return Err((ErrorKind::MidStream, error_text(&err)));
        }
        chunk.take_counts(out);
        let mut content = false;
        for choice in chunk.choices {
            if choice.finish_reason.is_some() {
                out.finished = true;
            }
            let Some(delta) = choice.delta.or(choice.message) else {
                continue;
            };
            let text = delta.content.as_deref().unwrap_or("");
            let reasoning = delta.reasoning_content.as_deref().unwrap_or("");
            if !text.is_empty() || !reasoning.is_empty() {
                content = true;
                if self.keep_reply {
                    out.reply.push_str(text);
                }
            }
        }
        if content {
            out.content_chunks += 1;
        }
        Ok(content)
    }

    async fn read_whole(&self, body: Incoming, out: &mut Outcome) {
        let bytes = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(err) => {
                out.fail(
                    ErrorKind::Truncated,
                    format!("body broke: {}", error_chain(&err)),
                );
                return;
            }
        };
        match self.absorb(&bytes, out) {
            Ok(_) => out.finished = true,
            Err((kind, message)) => out.fail(kind, message),
        }
    }
}

/// The parts of a chunk (or a whole non-streamed completion) the generator uses.
#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<Choice<'a>>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    timings: Option<Timings>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

impl Chunk<'_> {
    fn take_counts(&self, out: &mut Outcome) {
        if let Some(usage) = &self.usage {
            out.usage_completion = usage.completion_tokens.or(out.usage_completion);
            out.usage_prompt = usage.prompt_tokens.or(out.usage_prompt);
            if let Some(details) = &usage.prompt_tokens_details {
                out.usage_cached = details.cached_tokens.or(out.usage_cached);
            }
        }
        if let Some(t) = &self.timings {
            out.timings_predicted = t.predicted_n.or(out.timings_predicted);
            out.timings_prompt = t.prompt_n.or(out.timings_prompt);
            out.timings_cached = t.cache_n.or(out.timings_cached);
        }
    }
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
    #[serde(default, borrow)]
    message: Option<Delta<'a>>,
    #[serde(default)]
    finish_reason: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    reasoning_content: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Timings {
    #[serde(default)]
    cache_n: Option<u64>,
    #[serde(default)]
    prompt_n: Option<u64>,
    #[serde(default)]
    predicted_n: Option<u64>,
}

/// The `message` of an OpenAI error object, or the JSON itself.
fn error_text(err: &serde_json::Value) -> String {
    err.get("message")
        .and_then(|m| m.as_str())
        .map(str::to_owned)
        .or_else(|| err.as_str().map(str::to_owned))
        .unwrap_or_else(|| err.to_string())
}

async fn error_body_message(mut body: Incoming) -> String {
    let mut buf = Vec::new();
    while buf.len() < MAX_ERROR_BODY {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
            _ => break,
        }
    }
    match serde_json::from_slice::<serde_json::Value>(&buf) {
        Ok(v) => v
            .get("error")
            .map(error_text)
            .unwrap_or_else(|| v.to_string()),
        Err(_) => String::from_utf8_lossy(&buf).trim().to_owned(),
    }
}

fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn truncate_on_char(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// Whole microseconds, saturating (a u64 of microseconds outlasts any run).
pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn absorb(data: &str, keep_reply: bool) -> (Result<bool, (ErrorKind, String)>, Outcome) {
        let client = build_client(1, Duration::from_secs(1));
        let target = Target {
            uri: "http://127.0.0.1:1/".parse().unwrap(),
            auth: None,
        };
        let ex = Exchange {
            client: &client,
            target: &target,
            stream: true,
            keep_reply,
            timeout: Duration::from_secs(1),
        };
        let mut out = Outcome::default();
        let res = ex.absorb(data.as_bytes(), &mut out);
        (res, out)
    }

    #[tokio::test]
    async fn role_and_finish_chunks_carry_no_content() {
        let (res, out) = absorb(
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":null}}]}"#,
            true,
        );
        assert_eq!(res, Ok(false));
        assert_eq!(out.content_chunks, 0);
        let (res, out) = absorb(
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
            true,
        );
        assert_eq!(res, Ok(false));
        assert!(out.finished);
    }

    #[tokio::test]
    async fn content_is_kept_only_when_asked_and_escapes_are_decoded() {
        let chunk = r#"{"choices":[{"delta":{"content":"a\"b\u00e9"}}]}"#;
        let (res, out) = absorb(chunk, true);
        assert_eq!(res, Ok(true));
        assert_eq!(out.reply, "a\"b\u{e9}");
        let (_, out) = absorb(chunk, false);
        assert_eq!(out.reply, "");
        assert_eq!(out.content_chunks, 1);
    }

    #[tokio::test]
    async fn usage_is_preferred_over_timings_and_timings_fill_gaps() {
        let (_, out) = absorb(
            r#"{"choices":[],"usage":{"prompt_tokens":100,"completion_tokens":7,"prompt_tokens_details":{"cached_tokens":90}},"timings":{"cache_n":1,"prompt_n":2,"predicted_n":3}}"#,
            false,
        );
        assert_eq!(out.completion_tokens(), 7);
        assert_eq!(out.prompt_tokens(), Some(100));
        assert_eq!(out.cached_tokens(), Some(90));
        let (_, out) = absorb(
            r#"{"choices":[],"timings":{"cache_n":80,"prompt_n":20,"predicted_n":5,"prompt_ms":1.5}}"#,
            false,
        );
        assert_eq!(out.completion_tokens(), 5);
        assert_eq!(out.prompt_tokens(), Some(100));
        assert_eq!(out.cached_tokens(), Some(80));
    }

    #[tokio::test]
    async fn error_chunk_fails_the_request_as_mid_stream() {
        let (res, out) = absorb(
            r#"{"error":{"code":500,"message":"slot crashed","type":"server_error"}}"#,
            false,
        );
        assert_eq!(res, Err((ErrorKind::MidStream, "slot crashed".to_owned())));
        assert_eq!(out.content_chunks, 0);
    }

    #[tokio::test]
    async fn garbage_chunk_is_a_bad_response() {
        let (res, _) = absorb("{not json", false);
        assert_eq!(res.unwrap_err().0, ErrorKind::BadResponse);
    }

    #[test]
    fn error_messages_are_truncated_on_a_character_boundary() {
        let mut s = "\u{e9}".repeat(200);
        truncate_on_char(&mut s, 241);
        assert_eq!(s.len(), 240);
    }
}
