//! OpenAI-style errors, answered with `{"error": {"message", "type", "param", "code"}}`
//! (`openai::ErrorBody`).

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::openai::{ErrorBody, ErrorDetail};
use crate::engine::RequestError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds a client should wait before retrying (sent as Retry-After).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind, param: None, code: None, retry_after: None }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// A 400 that names the offending request field.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self { param: Some(param.to_string()), ..Self::bad_request(message) }
    }

    /// A 400 for a request the engine's limits refuse; a fault of the prompt names `param`
    /// (the endpoint's prompt field).
    pub fn request(param: &str, e: RequestError) -> Self {
        match e {
            RequestError::NoTokens => Self::invalid_param("max_tokens", e.to_string()),
            RequestError::BadParams(message) => Self::bad_request(message),
            _ => Self::invalid_param(param, e.to_string()),
        }
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("The model '{model}' does not exist"))
        }
    }

    pub fn unauthorized() -> Self {
        Self {
            code: Some("invalid_api_key"),
            ..Self::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "Incorrect or missing API key (send Authorization: Bearer <key>)",
            )
        }
    }

    pub fn queue_full(retry_after: u64) -> Self {
        Self {
            code: Some("queue_full"),
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "The server is at capacity and its queue is full; retry later",
            )
        }
    }

    pub fn queue_timeout(seconds: f64) -> Self {
        Self {
            code: Some("queue_timeout"),
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                format!("The request waited {seconds} s in the queue without being scheduled"),
            )
        }
    }

    pub fn shutting_down() -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "The server is shutting down")
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    pub fn not_found(path: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("No route for {path}"))
    }

    pub fn body(&self) -> ErrorBody {
        let error = ErrorDetail {
            message: self.message.clone(),
            kind: self.kind.into(),
            param: self.param.clone(),
            code: self.code.map(str::to_string),
        };
        ErrorBody { error }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
