//! llama-server's error answers: `{"error":{"code","message","type"}}` with a matching status.

use http::StatusCode;
use serde_json::{json, Value};

/// A request the simulated server refuses or fails, in llama-server's terms.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum ApiError {
    /// 400 `invalid_request_error`: the request itself is wrong.
    #[error("{0}")]
    InvalidRequest(String),
    /// 400 `exceed_context_size_error`: the prompt does not fit a slot (upstream only).
    #[error("request ({n_prompt} tokens) exceeds the available context size ({n_ctx} tokens), try increasing it")]
    ExceedContext { n_prompt: usize, n_ctx: usize },
    /// 401 `authentication_error`: `--api-key` is set and the request lacks it.
    #[error("Invalid API Key")]
    Unauthorized,
    /// 404 `not_found_error`.
    #[error("File Not Found")]
    NotFound,
    /// 500 `server_error`: what the server reports for anything it fails at.
    #[error("{0}")]
    Server(String),
    /// 501 `not_supported_error`: the endpoint is switched off.
    #[error("{0}")]
    NotSupported(&'static str),
    /// 503 `unavailable_error`: loading, or nothing free.
    #[error("{0}")]
    Unavailable(&'static str),
}

impl ApiError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest(_) | ApiError::ExceedContext { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::Server(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::NotSupported(_) => StatusCode::NOT_IMPLEMENTED,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest(_) => "invalid_request_error",
            ApiError::ExceedContext { .. } => "exceed_context_size_error",
            ApiError::Unauthorized => "authentication_error",
            ApiError::NotFound => "not_found_error",
            ApiError::Server(_) => "server_error",
            ApiError::NotSupported(_) => "not_supported_error",
            ApiError::Unavailable(_) => "unavailable_error",
        }
    }

    /// The inner `{"code","message","type",...}` object.
    pub(crate) fn object(&self) -> Value {
        let mut obj = json!({
            "code": self.status().as_u16(),
            "message": self.to_string(),
            "type": self.kind(),
        });
        if let ApiError::ExceedContext { n_prompt, n_ctx } = self {
            obj["n_prompt_tokens"] = json!(n_prompt);
            obj["n_ctx"] = json!(n_ctx);
        }
        obj
    }

    /// The whole JSON body of an error answer.
    pub(crate) fn body(&self) -> Value {
        json!({ "error": self.object() })
    }
}
