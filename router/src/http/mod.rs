//! The router's HTTP API (axum), one home per concern: routes, state, authentication and
//! the listing endpoints here; OpenAI chat completions and the remote fallback in
//! [`chat`]; MinionS jobs in [`minions`]; every event stream through the one pump in
//! [`sse`]; and every failure mapped to an OpenAI-shaped response once, in [`error`].
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `POST /v1/embeddings`
//! (remote only), `POST /v1/minions`, `GET /v1/models` (the
//! network's models), `GET /v1/providers`, `/metrics`, `/healthz`. Bearer API keys with a
//! per-key rate limit, a body limit.

mod chat;
mod error;
mod minions;
mod sse;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use beacon_proto::{Digest, Secret};
use serde_json::{Value, json};

pub use error::ApiError;

use crate::dispatch::Dispatcher;
use crate::metrics::Metrics;
use crate::placement::Policy;
use crate::remote::{FallbackPolicy, Remote};

/// Shared state of the API.
#[derive(Clone)]
pub struct ApiState {
    pub dispatcher: Dispatcher,
    pub remote: Option<Remote>,
    pub fallback: FallbackPolicy,
    pub http: reqwest::Client,
    pub keys: Arc<Vec<Secret>>,
    pub rate_per_minute: u32,
    pub policy: Policy,
    /// Defaults and limits for `/v1/minions`.
    pub minions: Arc<crate::minions::MinionsConfig>,
    /// MinionS jobs that may run at once (each makes supervisor calls on the operator's
    /// key and may fill the network): more wait for none, they are refused with 503.
    pub minion_jobs: Arc<tokio::sync::Semaphore>,
    /// The most jobs `minion_jobs` started with (for the gauge).
    pub max_minion_jobs: usize,
    /// Supervisor tokens each client may spend on MinionS per window.
    pub minion_budgets: crate::minions::budget::Budgets,
    /// Chat requests that may wait beyond the advertised slots (then 503).
    pub max_queue: u64,
    /// Chat requests being served or waiting, per model.
    pending: Arc<Mutex<HashMap<Digest, u64>>>,
    buckets: Arc<Mutex<HashMap<String, (f64, Instant)>>>,
    metrics: Arc<Metrics>,
}

impl ApiState {
    pub fn new(
        dispatcher: Dispatcher,
        remote: Option<Remote>,
        keys: Vec<Secret>,
        rate_per_minute: u32,
        policy: Policy,
        max_minion_jobs: usize,
        p2p_metrics: Option<Arc<prometheus_client::registry::Registry>>,
    ) -> Self {
        let minion_jobs = Arc::new(tokio::sync::Semaphore::new(max_minion_jobs));
        let metrics = Metrics::new(crate::metrics::Live {
            dispatcher: dispatcher.clone(),
            minion_jobs: minion_jobs.clone(),
            max_minion_jobs,
        });
        let metrics = match p2p_metrics {
            Some(r) => metrics.with_p2p(r),
            None => metrics,
        };
        ApiState {
            dispatcher,
            remote,
            fallback: FallbackPolicy::default(),
            http: crate::remote::client(),
            keys: Arc::new(keys),
            rate_per_minute,
            policy,
            minions: Arc::default(),
            minion_jobs,
            max_minion_jobs,
            minion_budgets: crate::minions::budget::Budgets::new(0, Duration::from_secs(3600)),
            max_queue: 64,
            pending: Arc::default(),
            buckets: Arc::default(),
            metrics: Arc::new(metrics),
        }
    }
}

/// MinionS jobs a router runs at once unless told otherwise.
pub const DEFAULT_MINION_JOBS: usize = 4;

/// The API's routes.
pub fn router(state: ApiState, max_body: usize) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat::chat))
        .route("/v1/completions", post(chat::completions))
        .route("/v1/embeddings", post(chat::embeddings))
        .route("/v1/minions", post(minions::job))
        .route("/v1/models", get(models))
        .route("/v1/providers", get(providers))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found_error", "no such endpoint")
        })
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// Buckets kept at most; past it, those that have refilled (idle clients) are dropped.
const MAX_BUCKETS: usize = 100_000;

/// Who a request counts against, for rate limits and budgets: `key:` and the digest of its
/// API key, or on an open router `ip:` and its address (an IPv6 /64).
#[derive(Clone, Debug)]
pub struct Client(pub String);

async fn auth(State(state): State<ApiState>, mut req: Request, next: Next) -> Response {
    if req.uri().path() == "/healthz" {
        return next.run(req).await;
    }
    // An open router limits each client address, a keyed one each key (review H8).
    let bucket = if state.keys.is_empty() {
        let client = req
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip());
        match client {
            Some(ip) => format!("ip:{}", beacon_net::limits::address_group(ip)),
            None => return next.run(req).await,
        }
    } else {
        match authorised_key(&state, &req) {
            Some(key) => format!("key:{}", Digest::of(key.as_bytes()).hex()),
            None => {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "authentication_error",
                    "missing or unknown API key",
                )
                .into_response();
            }
        }
    };
    req.extensions_mut().insert(Client(bucket.clone()));
    if state.rate_per_minute > 0 {
        // Token bucket per key or address: `rate_per_minute` capacity, refilled
        // continuously.
        let cap = state.rate_per_minute as f64;
        let mut buckets = state.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(&bucket) {
            buckets
                .retain(|_, (tokens, at)| *tokens + at.elapsed().as_secs_f64() * cap / 60.0 < cap);
        }
        let by_address = bucket.starts_with("ip:");
        let (tokens, at) = buckets.entry(bucket).or_insert((cap, Instant::now()));
        *tokens = (*tokens + at.elapsed().as_secs_f64() * cap / 60.0).min(cap);
        *at = Instant::now();
        if *tokens < 1.0 {
            state.metrics.rate_limited.inc();
            let wait = ((1.0 - *tokens) * 60.0 / cap).ceil() as u64;
            return ApiError {
                retry_after: Some(wait.max(1)),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    if by_address {
                        "rate limit reached for this address"
                    } else {
                        "rate limit reached for this key"
                    },
                )
            }
            .into_response();
        }
        *tokens -= 1.0;
    }
    next.run(req).await
}

/// The key a request presents, when it is one of the router's.
fn authorised_key(state: &ApiState, req: &Request) -> Option<String> {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    given.filter(|g| {
        beacon_proto::Digest::secret_in(
            g.as_bytes(),
            state.keys.iter().map(|k| k.expose().as_bytes()),
        )
    })
}

async fn models(State(state): State<ApiState>) -> axum::Json<Value> {
    let data: Vec<Value> = state
        .dispatcher
        .models()
        .into_iter()
        .map(|(name, (digest, n))| json!({"id": name, "object": "model", "owned_by": "beacon", "digest": digest.to_string(), "providers": n}))
        .collect();
    axum::Json(json!({"object": "list", "data": data}))
}

async fn providers(State(state): State<ApiState>) -> axum::Json<Value> {
    let running: std::collections::HashMap<String, u32> = state
        .dispatcher
        .in_flight()
        .into_iter()
        .map(|(peer, n)| (peer.to_string(), n))
        .collect();
    let mut list = state.dispatcher.providers();
    for p in &mut list {
        p.in_flight = running.get(&p.peer_id).copied().unwrap_or(0);
    }
    axum::Json(json!({"providers": list}))
}

async fn metrics(State(state): State<ApiState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}
