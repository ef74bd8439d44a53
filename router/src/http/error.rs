//! The HTTP layer's one error: OpenAI-shaped, with the status and `Retry-After` each
//! failure of the layers below maps to, mapped here once.

use axum::body::Bytes;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::dispatch::DispatchError;
use crate::minions::protocol::JobError;
use crate::minions::remote::RemoteError;

/// An OpenAI-shaped error.
pub struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) kind: &'static str,
    pub(crate) message: String,
    pub(crate) param: Option<String>,
    pub(crate) retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }
    pub(crate) fn bad(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.into()),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": null}});
        let mut r = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        r
    }
}

/// The body, or a 413 / 400 saying why it could not be read.
pub(crate) fn read_body(
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "request body is too large",
            )
        } else {
            ApiError::bad("body", e.body_text())
        }
    })
}

impl From<DispatchError> for ApiError {
    fn from(e: DispatchError) -> Self {
        match e {
            DispatchError::Refused(m) => ApiError::bad("body", m),
            DispatchError::NoProvider(m) => {
                ApiError::new(StatusCode::NOT_FOUND, "model_not_found", m)
            }
            e @ DispatchError::Exhausted { .. } => ApiError {
                retry_after: Some(2),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", e.to_string())
            },
        }
    }
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::LocalRefused(m) => ApiError::bad("context", m),
            JobError::NoProvider(m) => ApiError {
                retry_after: Some(5),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_provider", m)
            },
            e @ JobError::LocalFailed { .. } => ApiError {
                retry_after: Some(5),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", e.to_string())
            },
            JobError::Remote(e @ RemoteError::BudgetSpent { renews_in_s, .. }) => ApiError {
                retry_after: Some(renews_in_s),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    e.to_string(),
                )
            },
            e @ (JobError::Remote(_) | JobError::Supervisor { .. }) => {
                ApiError::new(StatusCode::BAD_GATEWAY, "supervisor_error", e.to_string())
            }
        }
    }
}
