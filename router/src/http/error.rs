//! The HTTP layer's one error: OpenAI-shaped, with the status and `Retry-After` each
//! failure of the layers below maps to, mapped here once.

use axum::http::StatusCode;

use crate::dispatch::DispatchError;
use crate::minions::protocol::JobError;
use crate::minions::remote::RemoteError;

pub use beacon_net::api::{ApiError, read_body};

impl From<DispatchError> for ApiError {
    fn from(e: DispatchError) -> Self {
        match e {
            DispatchError::Refused(m) => ApiError::bad_request("body", m),
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
            JobError::LocalRefused(m) => ApiError::bad_request("context", m),
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
