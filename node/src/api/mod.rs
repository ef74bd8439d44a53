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
use beacon_proto::Secret;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;

pub use crate::metrics::Metrics;
pub use error::ApiError;

use crate::scheduler::Scheduler;
use crate::store::Store;
use crate::store::registry::Registry;

/// Settings of the HTTP API.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// Required `Authorization: Bearer` token, if any.
    pub token: Option<Secret>,
    /// Largest request body in bytes.
    pub max_body: usize,
    /// How long a client may take to send a request's headers.
    pub header_timeout: std::time::Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 12434)),
            token: None,
            max_body: 16 << 20,
            header_timeout: std::time::Duration::from_secs(30),
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
    token: Option<Secret>,
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
        token: Option<Secret>,
    ) -> Self {
        AppState {
            store,
            scheduler,
            registry,
            metrics: Arc::new(Metrics::default()),
            net: None,
            token,
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
    let loopback = config.listen.ip().is_loopback();
    let app = router(state, config.max_body)
        .layer(middleware::from_fn_with_state(loopback, browser_guard));
    let limits = beacon_net::http::HttpLimits {
        header_timeout: config.header_timeout,
        ..Default::default()
    };
    beacon_net::http::serve(beacon_net::http::no_delay(listener), app, limits, shutdown).await;
    Ok(())
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
        if !given.is_some_and(|g| {
            beacon_proto::Digest::secret_eq(g.as_bytes(), token.expose().as_bytes())
        }) {
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

/// Refuses what only a web page would send (review H5). A cross-origin request: an
/// `Origin` naming neither this node's host nor a loopback name (CSRF: a page POSTing
/// `/models/create` to 127.0.0.1). On a loopback listener, a `Host` that is not a loopback
/// name (DNS rebinding: a page whose own name resolves to 127.0.0.1 reading answers). And
/// a body that is not JSON (form and text bodies are what a page can send without the
/// browser asking first).
async fn browser_guard(State(loopback): State<bool>, req: Request, next: Next) -> Response {
    match browser_refusal(loopback, &req) {
        Some(refused) => refused,
        None => next.run(req).await,
    }
}

fn browser_refusal(loopback: bool, req: &Request) -> Option<Response> {
    let header = |name| {
        req.headers()
            .get(name)
            .and_then(|v: &axum::http::HeaderValue| v.to_str().ok())
    };
    let forbidden = |message: String| {
        Some(ApiError::new(StatusCode::FORBIDDEN, "permission_error", message).into_response())
    };
    let host = header(header::HOST).map(host_name);
    if loopback && let Some(h) = host.filter(|h| !is_loopback_name(h)) {
        return forbidden(format!(
            "Host {h:?} is not a loopback name: this node serves localhost only"
        ));
    }
    if let Some(origin) = header(header::ORIGIN) {
        let o = host_name(origin.split_once("://").map_or(origin, |(_, rest)| rest));
        if !(is_loopback_name(o) || Some(o) == host) {
            return forbidden(format!(
                "cross-origin requests are refused (Origin {origin:?})"
            ));
        }
    }
    let has_body = header(header::CONTENT_LENGTH).is_some_and(|l| l != "0")
        || req.headers().contains_key(header::TRANSFER_ENCODING);
    let json = header(header::CONTENT_TYPE).is_some_and(|t| {
        t.split(';')
            .next()
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
    });
    if has_body && !json && req.method() != axum::http::Method::GET {
        return Some(
            ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                "send the body as JSON (Content-Type: application/json)",
            )
            .into_response(),
        );
    }
    None
}

/// The host of a `Host` header or an origin's authority, without port or brackets.
fn host_name(authority: &str) -> &str {
    let authority = authority.split('/').next().unwrap_or(authority);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    match authority.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

fn is_loopback_name(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
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
    let bytes = beacon_net::api::read_body(body)?;
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
