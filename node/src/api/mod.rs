//! The node's HTTP API (axum), where Docker Model Runner has it: OpenAI-compatible
//! inference under `/engines/llama.cpp/v1/…`, `/engines/v1/…` and `/v1/…`, DMR's model
//! management under `/models` and `/engines/…`, `/metrics` and `/healthz`. Optional bearer
//! token auth and a body size limit; every error is OpenAI-shaped (`error.rs`).

mod error;
mod metrics;
mod models;
mod network;
mod openai;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;

pub use error::ApiError;
pub use metrics::Metrics;

use crate::scheduler::Scheduler;
use crate::store::Store;
use crate::store::registry::Registry;

/// Settings of the HTTP API.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// Required `Authorization: Bearer` token, if any.
    pub token: Option<String>,
    /// Largest request body in bytes.
    pub max_body: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 12434)),
            token: None,
            max_body: 16 << 20,
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub scheduler: Scheduler,
    pub registry: Registry,
    pub metrics: Arc<Metrics>,
    /// The provider's network side, when the node is on a network.
    pub net: Option<Arc<NetState>>,
    token: Option<Arc<str>>,
}

/// What the API shows of the network.
pub struct NetState {
    pub network: beacon_net::Network,
    pub directory: beacon_net::SharedDirectory,
    pub ledger: crate::ledger::Ledger,
    pub region: String,
    pub data_plane: String,
    pub advert: crate::provider::advert::LastAdvert,
}

impl AppState {
    pub fn new(
        store: Store,
        scheduler: Scheduler,
        registry: Registry,
        token: Option<String>,
    ) -> Self {
        AppState {
            store,
            scheduler,
            registry,
            metrics: Arc::new(Metrics::default()),
            net: None,
            token: token.map(Into::into),
        }
    }
}

/// The router with every route.
pub fn router(state: AppState, max_body: usize) -> Router {
    let inference = Router::new()
        .route("/chat/completions", post(openai::chat_completions))
        .route("/completions", post(openai::completions))
        .route("/embeddings", post(openai::embeddings))
        .route("/models", get(models::openai_list))
        .route("/models/{*name}", get(models::openai_get));
    Router::new()
        .nest("/engines/llama.cpp/v1", inference.clone())
        .nest("/engines/v1", inference.clone())
        .nest("/v1", inference)
        .route("/models", get(models::dmr_list))
        .route("/models/create", post(models::create))
        .route(
            "/models/{namespace}/{name}",
            get(models::dmr_get).delete(models::dmr_delete),
        )
        .route("/engines/ps", get(models::ps))
        .route("/engines/df", get(models::df))
        .route("/engines/unload", post(models::unload))
        .route("/beacon/node", get(network::node))
        .route("/beacon/peers", get(network::peers))
        .route("/beacon/providers", get(network::providers))
        .route("/beacon/providers/{digest}", get(network::find_providers))
        .route("/beacon/ledger", get(network::ledger))
        .route("/metrics", get(metrics::render))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// Serves the API until `shutdown` resolves; returns the bound address through `bound`.
pub async fn serve(
    state: AppState,
    config: ApiConfig,
    bound: tokio::sync::oneshot::Sender<SocketAddr>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(config.listen).await?;
    let _ = bound.send(listener.local_addr()?);
    axum::serve(listener, router(state, config.max_body))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn auth(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(token) = &state.token
        && req.uri().path() != "/healthz"
    {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| beacon_proto::Digest::secret_eq(g.as_bytes(), token.as_bytes())) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "missing or wrong bearer token",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Parses a JSON body; errors name the offending field.
pub(crate) fn parse_body<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let value = body_json(body)?;
    parse_value(value, "")
}

/// The body as JSON (413 when over the limit, 400 when malformed).
pub(crate) fn body_json(
    body: Result<Bytes, BytesRejection>,
) -> Result<serde_json::Value, ApiError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "request body is too large",
            )
        } else {
            ApiError::bad_request("body", e.body_text())
        }
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request("body", format!("malformed JSON: {e}")))
}

/// Deserialises `value`; an error names the field path (prefixed with `prefix`).
pub(crate) fn parse_value<T: DeserializeOwned>(
    value: serde_json::Value,
    prefix: &str,
) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let mut path = e.path().to_string();
        let message = e.inner().to_string();
        // A missing field is reported at its parent; name the field itself.
        if let Some(field) = message
            .strip_prefix("missing field `")
            .and_then(|m| m.split('`').next())
        {
            path = if path == "." {
                field.to_string()
            } else {
                format!("{path}.{field}")
            };
        }
        let param = match (prefix, path.as_str()) {
            ("", ".") => "body".to_string(),
            (p, ".") => p.to_string(),
            ("", path) => path.to_string(),
            (p, path) if path.starts_with('[') => format!("{p}{path}"),
            (p, path) => format!("{p}.{path}"),
        };
        ApiError::bad_request(param, e.into_inner().to_string())
    })
}
