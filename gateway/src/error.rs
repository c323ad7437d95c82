//! Errors the gateway produces itself, and the one place they become HTTP.
//!
//! Every step of the request path returns its own small error; [`GatewayError`]
//! gathers them and [`GatewayError::into_response`] is the only function that decides a
//! status code, an OpenAI error `type` and `code`, and extra headers such as `Retry-After`.
//! Responses produced by a backend are never rewritten here: they pass through untouched.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::GatewayBody;

/// Why the gateway answered a request itself instead of relaying a backend's answer.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// No route matches the path.
    #[error("unknown endpoint {0}")]
    NotFound(String),
    /// The path exists but not for this method.
    #[error("method {method} is not allowed on {path}; use {allow}")]
    MethodNotAllowed {
        method: String,
        path: String,
        allow: &'static str,
    },
    /// The body exceeds `max_body_bytes`.
    #[error("request body exceeds the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    /// The request head exceeds `limits.max_header_bytes` or the most headers a request may
    /// carry (the HTTP/1 server side's refusal, before any route is matched).
    #[error("the request head exceeds the limit of {limit} bytes or {headers} headers")]
    HeadTooLarge { limit: usize, headers: usize },
    /// The request head cannot be read, or its body's length cannot be told without
    /// ambiguity; the connection is closed after the answer.
    #[error("malformed request: {0}")]
    MalformedRequest(&'static str),
    /// The body could not be read from the client.
    #[error("could not read the request body: {0}")]
    BodyRead(String),
    /// The request bodies held in memory have reached `limits.max_buffered_body_bytes`.
    #[error("the request bodies held in memory would go over the gateway's limit of {budget} bytes; retry later")]
    BodyBudget { budget: usize },
    /// The client did not send its whole body within `limits.body_read_timeout_secs`.
    #[error("the request body did not arrive within {}", seconds(*.0))]
    BodyTimeout(Duration),
    /// The body is not the JSON this endpoint needs.
    #[error("{0}")]
    InvalidRequest(String),
    /// An admin request names a backend no model has.
    #[error("no backend is named '{0}'; GET /admin/backends lists them")]
    BackendNotFound(String),
    /// The `model` names no configured model or alias, and there is no default.
    #[error("the model '{0}' does not exist; GET /v1/models lists the models served here")]
    ModelNotFound(String),
    /// The model's queue is at its limit.
    #[error("all {slots} slots of model '{model}' are busy and its queue is full ({queued} waiting); retry later")]
    QueueFull {
        model: String,
        slots: u32,
        queued: usize,
        retry_after: Duration,
    },
    /// The request is predicted to wait longer than the queue timeout: refused on arrival.
    #[error("model '{model}' is predicted to start this request in {}s, beyond the queue timeout of {}s; retry later", eta.as_secs(), timeout.as_secs())]
    QueueWait {
        model: String,
        eta: Duration,
        timeout: Duration,
        retry_after: Duration,
    },
    /// The request waited in the queue for the whole queue timeout.
    #[error("no slot of model '{model}' became free within {}; retry later", seconds(*waited))]
    QueueTimeout {
        model: String,
        waited: Duration,
        retry_after: Duration,
    },
    /// Every backend of the model is down: waiting would not help.
    #[error("no backend of model '{0}' is available")]
    NoBackend(String),
    /// The chosen backend (and any failover target) could not be reached.
    #[error("backend {backend} is unreachable: {reason}")]
    Upstream { backend: String, reason: String },
    /// The backend sent no response head within the first-byte timeout.
    #[error("backend {backend} sent nothing within {}", seconds(*waited))]
    UpstreamTimeout { backend: String, waited: Duration },
    /// The backend has no tool calling and `compat.tools = "reject"`.
    #[error("{0}")]
    ToolsUnsupported(String),
    /// The prompt cannot fit the backend's context.
    #[error("this request's prompt is about {tokens} tokens, more than the model's context of {n_ctx} tokens per request; shorten the conversation")]
    ContextLengthExceeded { tokens: u64, n_ctx: u32 },
    /// No valid API key was presented.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// The admin endpoints are off (no admin key is configured).
    #[error("the admin endpoints are off: configure an admin key to use them")]
    AdminDisabled,
    /// The gateway is shutting down and takes no new work.
    #[error("the gateway is shutting down")]
    ShuttingDown,
}

impl GatewayError {
    /// The HTTP status, OpenAI error `type` and `code` for this error.
    fn classify(&self) -> (StatusCode, &'static str, &'static str) {
        use GatewayError::*;
        match self {
            NotFound(_) => (StatusCode::NOT_FOUND, "invalid_request_error", "not_found"),
            MethodNotAllowed { .. } => (
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "method_not_allowed",
            ),
            BodyTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "request_too_large",
            ),
            HeadTooLarge { .. } => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "invalid_request_error",
                "request_header_fields_too_large",
            ),
            MalformedRequest(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "malformed_request",
            ),
            BodyRead(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "body_read_error",
            ),
            BodyTimeout(_) => (
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                "request_timeout",
            ),
            InvalidRequest(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_request",
            ),
            ModelNotFound(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
            ),
            BackendNotFound(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "backend_not_found",
            ),
            QueueFull { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "queue_full",
            ),
            QueueWait { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "queue_wait_too_long",
            ),
            QueueTimeout { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable_error",
                "queue_timeout",
            ),
            NoBackend(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable_error",
                "no_backend_available",
            ),
            Upstream { .. } => (StatusCode::BAD_GATEWAY, "server_error", "upstream_error"),
            UpstreamTimeout { .. } => (
                StatusCode::GATEWAY_TIMEOUT,
                "server_error",
                "upstream_timeout",
            ),
            Unauthorized(_) => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "invalid_api_key",
            ),
            AdminDisabled => (
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                "admin_disabled",
            ),
            ToolsUnsupported(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "tools_unsupported",
            ),
            ContextLengthExceeded { .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "context_length_exceeded",
            ),
            ShuttingDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable_error",
                "shutting_down",
            ),
            BodyBudget { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable_error",
                "request_bytes_limit",
            ),
        }
    }

    /// The OpenAI error `code` string, used as a metrics label.
    pub fn code(&self) -> &'static str {
        self.classify().2
    }

    /// The HTTP status this error maps to.
    pub fn status(&self) -> StatusCode {
        self.classify().0
    }

    /// The OpenAI error body, for sending inside a stream that has already begun.
    pub fn body(&self) -> Bytes {
        let (_, kind, code) = self.classify();
        error_body(&self.to_string(), kind, code)
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            GatewayError::QueueFull { retry_after, .. }
            | GatewayError::QueueWait { retry_after, .. }
            | GatewayError::QueueTimeout { retry_after, .. } => Some(*retry_after),
            GatewayError::NoBackend(_) | GatewayError::ShuttingDown => Some(Duration::from_secs(5)),
            GatewayError::BodyBudget { .. } => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// The one mapping from a gateway error to an HTTP response with an OpenAI error body.
    pub fn into_response(self) -> Response<GatewayBody> {
        let (status, kind, code) = self.classify();
        let mut resp = json_response(status, error_body(&self.to_string(), kind, code));
        if let Some(after) = self.retry_after() {
            // Whole seconds, rounded up, as the header requires; never 0 so clients back off.
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        if let GatewayError::Unauthorized(_) = self {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let GatewayError::MethodNotAllowed { allow, .. } = self {
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        resp
    }
}

/// A wait as a person reads it: `2.0s`, not `2.000602489s`.
fn seconds(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// `{"error":{"message":...,"type":...,"code":...}}` as bytes.
pub fn error_body(message: &str, kind: &str, code: &str) -> Bytes {
    let v = serde_json::json!({ "error": { "message": message, "type": kind, "code": code } });
    Bytes::from(v.to_string())
}

/// A complete JSON response produced by the gateway.
pub fn json_response(status: StatusCode, body: Bytes) -> Response<GatewayBody> {
    let mut resp = Response::new(GatewayBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_json(resp: Response<GatewayBody>) -> serde_json::Value {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn queue_full_is_429_with_retry_after_and_openai_body() {
        let resp = GatewayError::QueueFull {
            model: "m".into(),
            slots: 2,
            queued: 8,
            retry_after: Duration::from_millis(1500),
        }
        .into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "2");
        let v = body_json(resp).await;
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert_eq!(v["error"]["code"], "queue_full");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("queue is full"));
    }

    #[test]
    fn waits_are_written_in_tenths_of_a_second() {
        let e = GatewayError::QueueTimeout {
            model: "m".into(),
            waited: Duration::from_nanos(2_000_602_489),
            retry_after: Duration::from_secs(1),
        };
        assert_eq!(
            e.to_string(),
            "no slot of model 'm' became free within 2.0s; retry later"
        );
    }

    #[tokio::test]
    async fn method_not_allowed_names_the_allowed_method() {
        let resp = GatewayError::MethodNotAllowed {
            method: "GET".into(),
            path: "/v1/chat/completions".into(),
            allow: "POST",
        }
        .into_response();
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(resp.headers()[header::ALLOW], "POST");
    }
}
