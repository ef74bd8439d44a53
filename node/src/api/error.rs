//! The one place the node's errors become HTTP: each layer's error mapped to the
//! OpenAI-shaped [`ApiError`] both APIs answer with (`beacon_net::api`), with a stable
//! `type`.

use axum::http::StatusCode;

use crate::engine::EngineError;
use crate::scheduler::SchedError;
use crate::store::StoreError;

pub use beacon_net::api::ApiError;

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
