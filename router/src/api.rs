//! The router's HTTP API (axum): OpenAI-compatible `POST /v1/chat/completions` routed to the
//! best provider for the model (streaming too), falling back to the configured remote API
//! when the network cannot serve it; `GET /v1/models` (the network's models), `GET
//! /v1/providers`, `/metrics`, `/healthz`. Bearer API keys with a per-key rate limit, a body
//! limit, and OpenAI-shaped errors.

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use beacon_proto::{ChatMessage, Digest, Id, InferRequest, ModelSpec, Role, Sampling, Secret};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::dispatch::{DispatchError, Dispatcher};
use crate::metrics::Metrics;
use crate::placement::Policy;

/// The remote (supervisor / fallback) OpenAI-compatible API.
#[derive(Clone, Debug)]
pub struct Remote {
    /// e.g. `https://api.openai.com/v1`
    pub base_url: String,
    /// Never printed (`Secret`).
    pub api_key: Option<Secret>,
}

/// What may go to the remote API when no provider serves a chat request (reviews H8,
/// M2): the remote is the operator's paid account, and it runs outside the network's
/// regions.
#[derive(Clone, Debug)]
pub struct FallbackPolicy {
    /// Models the remote may be asked for; `None`: any.
    pub models: Option<BTreeSet<String>>,
    /// The most completion tokens a forwarded request may ask for (and what it asks for
    /// when it names no limit).
    pub max_tokens: u64,
    /// The region the remote runs in, as its operator declares it. With
    /// `--allowed-regions`, nothing is forwarded unless it is one of them.
    pub region: Option<String>,
}

impl Default for FallbackPolicy {
    /// Nothing is forwarded until the operator names the models.
    fn default() -> Self {
        FallbackPolicy {
            models: Some(BTreeSet::new()),
            max_tokens: 4096,
            region: None,
        }
    }
}

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
    pub minions: Arc<crate::minions::http::MinionsConfig>,
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
            http: remote_client(),
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

/// The client for the remote API: bounded connect and read times, and no redirects (a
/// redirect would carry the operator's key, or a job's, somewhere nobody chose: L1).
fn remote_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(900))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap_or_default()
}

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

/// The API's routes.
pub fn router(state: ApiState, max_body: usize) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/minions", post(crate::minions::http::job))
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

#[derive(Deserialize)]
struct ChatBody {
    model: String,
    messages: Vec<InMessage>,
    #[serde(default, alias = "max_completion_tokens")]
    max_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<Value>,
    #[serde(default)]
    response_format: Option<Value>,
    #[serde(flatten)]
    unserved: beacon_proto::openai::Unserved,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Option<beacon_proto::openai::Content>,
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

fn parse(bytes: &Bytes) -> Result<(ChatBody, Value), ApiError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad("body", format!("malformed JSON: {e}")))?;
    let body: ChatBody = serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let p = e.path().to_string();
        ApiError::bad(
            if p == "." { "body" } else { &p },
            e.into_inner().to_string(),
        )
    })?;
    Ok((body, value))
}

fn to_request(body: &ChatBody, digest: beacon_proto::Digest) -> Result<InferRequest, ApiError> {
    if body.messages.is_empty() {
        return Err(ApiError::bad(
            "messages",
            "at least one message is required",
        ));
    }
    let messages = body
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                other => {
                    return Err(ApiError::bad(
                        &format!("messages[{i}].role"),
                        format!("unknown role {other:?}"),
                    ));
                }
            };
            let content = match m.content.clone() {
                None => String::new(),
                Some(c) => c.into_text().map_err(|(j, kind)| {
                    ApiError::bad(
                        &format!("messages[{i}].content[{j}].type"),
                        format!("content part type {kind:?} is not supported"),
                    )
                })?,
            };
            Ok(ChatMessage { role, content })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let temperature = body.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad("temperature", "must be between 0 and 2"));
    }
    let json_schema = match &body.response_format {
        None => None,
        Some(f) => match f.get("type").and_then(Value::as_str) {
            Some("text") => None,
            Some("json_object") => Some(r#"{"type":"object"}"#.to_string()),
            Some("json_schema") => Some(
                f.pointer("/json_schema/schema")
                    .ok_or_else(|| ApiError::bad("response_format.json_schema.schema", "missing"))?
                    .to_string(),
            ),
            _ => {
                return Err(ApiError::bad(
                    "response_format.type",
                    "must be text, json_object or json_schema",
                ));
            }
        },
    };
    let request = InferRequest {
        request_id: Id::random(),
        job_id: None,
        model: ModelSpec {
            reference: body.model.clone(),
            digest,
        },
        messages,
        sampling: Sampling {
            temperature,
            top_p: body.top_p.unwrap_or(1.0),
            max_tokens: body.max_tokens.unwrap_or(512).clamp(1, 8192),
            // The router chooses the seed (unless the client asks for one), so a sampled
            // answer can be replayed by an auditor.
            seed: Some(body.seed.unwrap_or_else(|| Id::random().0 as u64)),
            stop: match &body.stop {
                None => vec![],
                Some(Stop::One(s)) => vec![s.clone()],
                Some(Stop::Many(v)) => v.iter().take(4).cloned().collect(),
            },
            ..Sampling::default()
        },
        json_schema,
        deadline_ms: None,
        return_tokens: true,
    };
    // The check providers apply: refused here with a 400 rather than by every provider.
    request
        .check()
        .map_err(|e| ApiError::bad(e.field, e.to_string()))?;
    Ok(request)
}

/// A chat request counted against its model's queue until it is answered (or its stream
/// ends).
struct Admitted {
    pending: Arc<Mutex<HashMap<Digest, u64>>>,
    model: Digest,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = p.get_mut(&self.model) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                p.remove(&self.model);
            }
        }
    }
}

/// Admits a request for `model` while the requests already in the router fit in the slots
/// its providers advertise plus `max_queue`; otherwise refuses it with 503 and a
/// `Retry-After` from the queue ahead and the median latency. The queue is bounded, and a
/// request either is answered or is refused at once, never dropped after it was admitted.
fn admit(state: &ApiState, model: Digest) -> Result<Admitted, ApiError> {
    // Only the providers this router may place on (its regions, not quarantined).
    let slots = state.dispatcher.capacity(model, &state.policy);
    let mut pending = state.pending.lock().unwrap_or_else(|p| p.into_inner());
    let n = pending.entry(model).or_insert(0);
    if *n >= slots.max(1) + state.max_queue {
        let ahead = *n;
        drop(pending);
        state.metrics.shed.inc();
        let per_request_s = state.dispatcher.median_latency_ms().unwrap_or(1000.0) / 1000.0;
        let wait = (ahead as f64 / slots.max(1) as f64 * per_request_s).ceil() as u64;
        return Err(ApiError {
            retry_after: Some(wait.clamp(1, 60)),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                format!(
                    "the network is busy: {ahead} requests for this model are in the router \
                     for {slots} provider slots; retry later"
                ),
            )
        });
    }
    *n += 1;
    Ok(Admitted {
        pending: state.pending.clone(),
        model,
    })
}

fn finish(r: beacon_proto::FinishReason) -> &'static str {
    match r {
        beacon_proto::FinishReason::Length => "length",
        _ => "stop",
    }
}

async fn chat(
    State(state): State<ApiState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    state.metrics.requests.inc();
    let span = tracing::info_span!(
        "chat",
        model = tracing::field::Empty,
        request = tracing::field::Empty,
        stream = tracing::field::Empty
    );
    let r = chat_inner(&state, body).instrument(span).await;
    r.unwrap_or_else(|e| {
        state.metrics.errors.inc();
        e.into_response()
    })
}

async fn chat_inner(
    state: &ApiState,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = read_body(body)?;
    let (body, raw) = parse(&bytes)?;
    let digest = state.dispatcher.directory.resolve_model(&body.model);
    let Some(digest) = digest else {
        let reason = format!("no provider serves {}", body.model);
        return fallback(state, &body.model, raw, &reason).await;
    };
    if let Err((field, why)) = body.unserved.check() {
        // The network does not serve it (tools, several choices, log probabilities); the
        // remote API may, when the operator offers it for this model. Never dropped.
        if state.remote.is_some() && fallback_refusal(state, &body.model).is_none() {
            return fallback(state, &body.model, raw, why).await;
        }
        return Err(ApiError::bad(field, why));
    }
    let request = to_request(&body, digest)?;
    let span = tracing::Span::current();
    span.record("model", body.model.as_str());
    span.record("request", request.request_id.short().as_str());
    span.record("stream", body.stream);
    let admitted = admit(state, digest)?;
    let id = format!("chatcmpl-{}", request.request_id.short());
    let created = crate::directory::now_ms() / 1000;
    let model = body.model.clone();
    if !body.stream {
        let outcome = match state.dispatcher.run(&request, &state.policy, None).await {
            Ok(o) => o,
            Err(DispatchError::NoProvider(reason)) => {
                return fallback(state, &body.model, raw, &reason).await;
            }
            Err(e) => return Err(dispatch_error(e)),
        };
        state.metrics.answered(&model, &outcome, None);
        let r = &outcome.result;
        return Ok(axum::Json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": r.output}, "finish_reason": finish(r.finish_reason)}],
            "usage": {"prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens,
                      "total_tokens": r.usage.prompt_tokens + r.usage.completion_tokens},
            "beacon": {"provider": outcome.provider.to_string(), "region": outcome.region, "attempts": outcome.attempts,
                       "hedged": outcome.hedged, "verified": true, "audited": outcome.audited,
                       "latency_ms": outcome.latency_ms},
        })).into_response());
    }
    // Streaming: deltas as OpenAI chunks, then the finish and (when asked) usage chunks.
    let include_usage = body
        .stream_options
        .as_ref()
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let (out_tx, out_rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    let st = state.clone();
    tokio::spawn(async move {
        let _admitted = admitted;
        let chunk = |delta: Value, finish: Value| {
            let c = chunk_value(&id, created, &model, delta, finish);
            Bytes::from(format!("data: {c}\n\n"))
        };
        let _ = out_tx
            .send(Ok(chunk(
                json!({"role": "assistant", "content": ""}),
                Value::Null,
            )))
            .await;
        let started = Instant::now();
        let mut first_token = None;
        let run = st.dispatcher.run(&request, &st.policy, Some(tx));
        tokio::pin!(run);
        let outcome = loop {
            tokio::select! {
                Some(d) = rx.recv() => {
                    first_token.get_or_insert_with(|| started.elapsed());
                    if out_tx.send(Ok(chunk(json!({"content": d}), Value::Null))).await.is_err() {
                        return;
                    }
                }
                o = &mut run => break o,
            }
        };
        while let Ok(d) = rx.try_recv() {
            let _ = out_tx
                .send(Ok(chunk(json!({"content": d}), Value::Null)))
                .await;
        }
        match outcome {
            Ok(o) => {
                st.metrics.answered(&model, &o, first_token);
                // The last chunk says what the client got: every delta above was compared
                // with the signed output before it (a mismatch ends in an error event).
                let mut last = chunk_value(
                    &id,
                    created,
                    &model,
                    json!({}),
                    json!(finish(o.result.finish_reason)),
                );
                last["beacon"] = json!({"provider": o.provider.to_string(), "region": o.region,
                    "attempts": o.attempts, "hedged": o.hedged, "verified": true, "audited": o.audited});
                let _ = out_tx
                    .send(Ok(Bytes::from(format!("data: {last}\n\n"))))
                    .await;
                if include_usage {
                    let u = o.result.usage;
                    let c = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
                        "usage": {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.prompt_tokens + u.completion_tokens}});
                    let _ = out_tx.send(Ok(Bytes::from(format!("data: {c}\n\n")))).await;
                }
            }
            Err(e) => {
                st.metrics.errors.inc();
                let c = json!({"error": {"message": e.to_string(), "type": "server_error"},
                    "beacon": {"verified": false, "audited": false}});
                let _ = out_tx.send(Ok(Bytes::from(format!("data: {c}\n\n")))).await;
            }
        }
        let _ = out_tx.send(Ok(Bytes::from("data: [DONE]\n\n"))).await;
    }
    .instrument(tracing::Span::current()));
    let stream =
        futures::stream::unfold(
            out_rx,
            |mut rx| async move { rx.recv().await.map(|x| (x, rx)) },
        );
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
}

/// One OpenAI `chat.completion.chunk`.
fn chunk_value(id: &str, created: u64, model: &str, delta: Value, finish: Value) -> Value {
    json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
}

fn dispatch_error(e: DispatchError) -> ApiError {
    match e {
        DispatchError::Refused(m) => ApiError::bad("body", m),
        DispatchError::NoProvider(m) => ApiError::new(StatusCode::NOT_FOUND, "model_not_found", m),
        e @ DispatchError::Exhausted { .. } => ApiError {
            retry_after: Some(2),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", e.to_string())
        },
    }
}

/// Why a request may not go to the remote API, if it may not.
fn fallback_refusal(state: &ApiState, model: &str) -> Option<String> {
    let policy = &state.fallback;
    if let Some(allowed) = &state.policy.allowed_regions
        && !policy.region.as_ref().is_some_and(|r| allowed.contains(r))
    {
        return Some(format!(
            "this router keeps data in {}, and its remote API is not declared in one of \
             them (--remote-region)",
            allowed.iter().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    if policy.models.as_ref().is_some_and(|m| !m.contains(model)) {
        return Some(format!(
            "its remote API is not offered for {model:?} (--fallback-models)"
        ));
    }
    None
}

/// The client's request as the remote API gets it: what the operator allows, within the
/// token limit the operator set (a client asking for a huge completion, or many, on the
/// operator's key gets the limit).
fn forwarded(mut raw: Value, max_tokens: u64) -> Value {
    let Some(body) = raw.as_object_mut() else {
        return raw;
    };
    let mut limited = false;
    for field in ["max_tokens", "max_completion_tokens"] {
        if let Some(v) = body.get_mut(field) {
            *v = json!(v.as_u64().unwrap_or(max_tokens).min(max_tokens));
            limited = true;
        }
    }
    if !limited {
        body.insert("max_tokens".into(), json!(max_tokens));
    }
    body.insert("n".into(), json!(1));
    raw
}

/// Sends the request to the remote API, within the operator's fallback policy, or explains
/// why it cannot be served.
async fn fallback(
    state: &ApiState,
    model: &str,
    raw: Value,
    reason: &str,
) -> Result<Response, ApiError> {
    let Some(remote) = &state.remote else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("{reason}, and no remote API is configured"),
        ));
    };
    if let Some(refusal) = fallback_refusal(state, model) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("{reason}, and {refusal}"),
        ));
    }
    state.metrics.fallback.inc();
    let url = format!("{}/chat/completions", remote.base_url.trim_end_matches('/'));
    let raw = forwarded(raw, state.fallback.max_tokens);
    let mut req = state.http.post(url).json(&raw);
    if let Some(k) = &remote.api_key {
        req = req.bearer_auth(k.expose());
    }
    let resp = req.send().await.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            format!("remote API: {e}"),
        )
    })?;
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let ctype = resp.headers().get(reqwest::header::CONTENT_TYPE).cloned();
    let stream = resp.bytes_stream();
    let mut r = Response::builder().status(status);
    if let Some(c) = ctype {
        r = r.header(header::CONTENT_TYPE, c.as_bytes());
    }
    r = r.header("x-beacon-route", "remote");
    Ok(r.body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response()))
}

async fn models(State(state): State<ApiState>) -> axum::Json<Value> {
    let data: Vec<Value> = state
        .dispatcher
        .directory
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
    let mut list = state.dispatcher.directory.providers();
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
