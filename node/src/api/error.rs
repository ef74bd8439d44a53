//! The one place errors become HTTP: status code plus an OpenAI-shaped body
//! `{"error":{"message","type","param","code"}}` with a stable `type`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::engine::EngineError;
use crate::scheduler::SchedError;
use crate::store::StoreError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }
    pub fn bad_request(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.into()),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status.as_u16()}});
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::NotFound(_) => ApiError::not_found(e.to_string()),
            StoreError::Reference(_) => ApiError::bad_request("model", e.to_string()),
            StoreError::Unauthorized { .. } => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                e.to_string(),
            ),
            StoreError::Registry { .. }
            | StoreError::DigestMismatch { .. }
            | StoreError::SizeMismatch { .. } => {
                ApiError::new(StatusCode::BAD_GATEWAY, "registry_error", e.to_string())
            }
            StoreError::NoRoom(_) => ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "insufficient_storage",
                e.to_string(),
            ),
            StoreError::UnsupportedMediaType { .. } | StoreError::Manifest(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unsupported_model",
                e.to_string(),
            ),
            _ => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                e.to_string(),
            ),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match &e {
            EngineError::PromptTooLong { .. } => ApiError::bad_request("messages", e.to_string()),
            EngineError::Grammar(_) => ApiError::bad_request("response_format", e.to_string()),
            EngineError::InvalidRequest(_) | EngineError::Template(_) => {
                ApiError::bad_request("messages", e.to_string())
            }
            EngineError::Stopped | EngineError::Busy(_) => ApiError {
                retry_after: Some(1),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    e.to_string(),
                )
            },
            _ => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                e.to_string(),
            ),
        }
    }
}

impl From<SchedError> for ApiError {
    fn from(e: SchedError) -> Self {
        match e {
            SchedError::Store(s) => s.into(),
            SchedError::Engine(x) => x.into(),
            SchedError::Busy(_) | SchedError::Stopped => ApiError {
                retry_after: Some(2),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", e.to_string())
            },
            SchedError::TooLarge { .. } => ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "insufficient_memory",
                e.to_string(),
            ),
        }
    }
}
