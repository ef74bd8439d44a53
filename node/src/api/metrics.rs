//! `GET /metrics`: the node's metrics ([`crate::metrics`]) in the OpenMetrics text format.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::AppState;

pub async fn render(State(state): State<AppState>) -> Response {
    let ps = state.scheduler.ps().await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(&ps),
    )
        .into_response()
}
