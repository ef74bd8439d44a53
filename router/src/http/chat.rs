//! `POST /v1/chat/completions` and `POST /v1/completions`: parsed and checked here,
//! admitted against the capacity of the providers this router may use, dispatched like
//! any subtask (placed, verified, retried, hedged, audited; streamed through
//! [`super::sse`] when asked), and sent to the remote API when the network cannot serve
//! them and the operator allows it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use beacon_proto::openai::defaults;
use beacon_proto::{ChatMessage, Digest, Id, InferRequest, ModelSpec, Sampling};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::Instrument;

use super::error::{ApiError, read_body};
use super::{ApiState, sse};
use crate::dispatch::{DispatchError, Outcome};

/// The OpenAI endpoint a request came to: chat messages or a raw text prompt. Placement,
/// dispatch, verification and audits are the same; the request and answer shapes differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Endpoint {
    Chat,
    Completions,
}

/// What the remote API is asked for: a generation (its tokens capped by the operator's
/// limit) or embeddings, which the network does not serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Upstream {
    Generation(Endpoint),
    Embeddings,
}

impl From<Endpoint> for Upstream {
    fn from(e: Endpoint) -> Self {
        Upstream::Generation(e)
    }
}

impl Upstream {
    /// The path under the remote API's base URL.
    fn path(self) -> &'static str {
        match self {
            Upstream::Generation(Endpoint::Chat) => "chat/completions",
            Upstream::Generation(Endpoint::Completions) => "completions",
            Upstream::Embeddings => "embeddings",
        }
    }
}

#[derive(Deserialize)]
struct ChatBody {
    model: String,
    #[serde(default)]
    messages: Vec<beacon_proto::openai::Message>,
    /// `/v1/completions`: one prompt, as a string or an array of one string.
    #[serde(default)]
    prompt: Option<PromptField>,
    #[serde(default, alias = "max_completion_tokens")]
    max_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    /// llama.cpp's sampling extensions, as a provider's own API takes them.
    #[serde(default)]
    top_k: Option<u32>,
    #[serde(default)]
    min_p: Option<f32>,
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
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptField {
    One(String),
    Many(Vec<String>),
}

/// `/v1/completions` fields that change what an answer must be and that Beacon does not
/// serve; accepted at their no-op values, refused otherwise.
#[derive(Deserialize)]
struct TextUnserved {
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    best_of: Option<u32>,
    #[serde(default)]
    logprobs: Option<u32>,
    #[serde(default)]
    echo: Option<bool>,
    #[serde(default)]
    suffix: Option<String>,
}

impl TextUnserved {
    fn check(&self) -> Result<(), (&'static str, &'static str)> {
        if self.n.is_some_and(|n| n > 1) {
            return Err(("n", "several choices are not served: ask once per choice"));
        }
        if self.best_of.is_some_and(|n| n > 1) {
            return Err(("best_of", "best-of sampling is not served"));
        }
        if self.logprobs.is_some_and(|n| n > 0) {
            return Err(("logprobs", "log probabilities are not served"));
        }
        if self.echo == Some(true) {
            return Err(("echo", "echoing the prompt is not served"));
        }
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(("suffix", "insertion (a suffix) is not served"));
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

fn parse(bytes: &Bytes) -> Result<(ChatBody, Value), ApiError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request("body", format!("malformed JSON: {e}")))?;
    let body: ChatBody = read_value(&value)?;
    Ok((body, value))
}

/// `value` as a `T`, or a 400 naming the field that did not fit.
fn read_value<T: serde::de::DeserializeOwned>(value: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let p = e.path().to_string();
        ApiError::bad_request(
            if p == "." { "body" } else { &p },
            e.into_inner().to_string(),
        )
    })
}

/// The first field of the request the network cannot serve, with why (`Ok(Err)`).
fn unserved(
    endpoint: Endpoint,
    value: &Value,
) -> Result<Result<(), (&'static str, &'static str)>, ApiError> {
    Ok(match endpoint {
        Endpoint::Chat => read_value::<beacon_proto::openai::Unserved>(value)?.check(),
        Endpoint::Completions => read_value::<TextUnserved>(value)?.check(),
    })
}

/// A chat request's messages, each role and content checked.
fn chat_messages(body: &ChatBody) -> Result<Vec<ChatMessage>, ApiError> {
    body.messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.clone()
                .into_chat(i)
                .map_err(|(field, why)| ApiError::bad_request(&field, why))
        })
        .collect()
}

/// The prompt of a completions request: exactly one string.
fn text_prompt(body: &ChatBody) -> Result<String, ApiError> {
    match &body.prompt {
        Some(PromptField::One(p)) => Ok(p.clone()),
        Some(PromptField::Many(v)) if v.len() == 1 => Ok(v[0].clone()),
        Some(PromptField::Many(_)) => Err(ApiError::bad_request(
            "prompt",
            "exactly one prompt is served: send one request per prompt",
        )),
        None => Err(ApiError::bad_request("prompt", "a prompt is required")),
    }
}

fn to_request(
    endpoint: Endpoint,
    body: &ChatBody,
    digest: beacon_proto::Digest,
) -> Result<InferRequest, ApiError> {
    let (messages, prompt) = match endpoint {
        Endpoint::Completions => (Vec::new(), Some(text_prompt(body)?)),
        Endpoint::Chat if body.messages.is_empty() => {
            return Err(ApiError::bad_request(
                "messages",
                "at least one message is required",
            ));
        }
        Endpoint::Chat => (chat_messages(body)?, None),
    };
    let temperature = body.temperature.unwrap_or(defaults::TEMPERATURE);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_request(
            "temperature",
            "must be between 0 and 2",
        ));
    }
    let json_schema = match &body.response_format {
        None => None,
        Some(f) => match f.get("type").and_then(Value::as_str) {
            Some("text") => None,
            Some("json_object") => Some(r#"{"type":"object"}"#.to_string()),
            Some("json_schema") => Some(
                f.pointer("/json_schema/schema")
                    .ok_or_else(|| {
                        ApiError::bad_request("response_format.json_schema.schema", "missing")
                    })?
                    .to_string(),
            ),
            _ => {
                return Err(ApiError::bad_request(
                    "response_format.type",
                    "must be text, json_object or json_schema",
                ));
            }
        },
    };
    let request = InferRequest {
        prompt,
        request_id: Id::random(),
        job_id: None,
        model: ModelSpec {
            reference: body.model.clone(),
            digest,
        },
        messages,
        sampling: Sampling {
            temperature,
            top_p: body.top_p.unwrap_or(defaults::TOP_P),
            top_k: body.top_k.unwrap_or(defaults::TOP_K),
            min_p: body.min_p.unwrap_or(defaults::MIN_P),
            max_tokens: body.max_tokens.unwrap_or(512).clamp(1, 8192),
            // The router chooses the seed (unless the client asks for one), so a sampled
            // answer can be replayed by an auditor.
            seed: Some(body.seed.unwrap_or_else(|| Id::random().0 as u64)),
            stop: match &body.stop {
                None => vec![],
                Some(Stop::One(s)) => vec![s.clone()],
                Some(Stop::Many(v)) => v.iter().take(4).cloned().collect(),
            },
        },
        json_schema,
        deadline_ms: None,
        return_tokens: true,
    };
    // The check providers apply: refused here with a 400 rather than by every provider.
    request
        .check()
        .map_err(|e| ApiError::bad_request(e.field, e.to_string()))?;
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

pub(super) async fn chat(
    State(state): State<ApiState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    serve(state, Endpoint::Chat, body).await
}

/// `/v1/embeddings`: the network does not serve embeddings yet (a vector cannot be audited
/// by scoring tokens, as answers are), so a request goes to the remote API where the
/// operator offers it for the model, else is refused saying so.
pub(super) async fn embeddings(
    State(state): State<ApiState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    state.metrics.requests.inc();
    let r = async {
        let bytes = read_body(body)?;
        let raw: Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::bad_request("body", format!("malformed JSON: {e}")))?;
        let model = raw
            .get("model")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad_request("model", "a model is required"))?
            .to_string();
        let reason = "the network does not serve embeddings";
        fallback(&state, Upstream::Embeddings, &model, raw, reason).await
    }
    .await;
    r.unwrap_or_else(|e| {
        state.metrics.errors.inc();
        e.into_response()
    })
}

pub(super) async fn completions(
    State(state): State<ApiState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    serve(state, Endpoint::Completions, body).await
}

async fn serve(
    state: ApiState,
    endpoint: Endpoint,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    state.metrics.requests.inc();
    let span = tracing::info_span!(
        "chat",
        ?endpoint,
        model = tracing::field::Empty,
        request = tracing::field::Empty,
        stream = tracing::field::Empty
    );
    let r = serve_inner(&state, endpoint, body).instrument(span).await;
    r.unwrap_or_else(|e| {
        state.metrics.errors.inc();
        e.into_response()
    })
}

async fn serve_inner(
    state: &ApiState,
    endpoint: Endpoint,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = read_body(body)?;
    let (body, raw) = parse(&bytes)?;
    let digest = state.dispatcher.resolve_model(&body.model);
    let Some(digest) = digest else {
        let reason = format!("no provider serves {}", body.model);
        return fallback(state, endpoint.into(), &body.model, raw, &reason).await;
    };
    if let Err((field, why)) = unserved(endpoint, &raw)? {
        // The network does not serve it (tools, several choices, log probabilities); the
        // remote API may, when the operator offers it for this model. Never dropped.
        if state.remote.is_some() && fallback_refusal(state, &body.model).is_none() {
            return fallback(state, endpoint.into(), &body.model, raw, why).await;
        }
        return Err(ApiError::bad_request(field, why));
    }
    let request = to_request(endpoint, &body, digest)?;
    let span = tracing::Span::current();
    span.record("model", body.model.as_str());
    span.record("request", request.request_id.short().as_str());
    span.record("stream", body.stream);
    let admitted = admit(state, digest)?;
    let chunks = Chunks {
        endpoint,
        id: format!(
            "{}-{}",
            match endpoint {
                Endpoint::Chat => "chatcmpl",
                Endpoint::Completions => "cmpl",
            },
            request.request_id.short()
        ),
        created: crate::directory::now_ms() / 1000,
        model: body.model.clone(),
    };
    if body.stream {
        let include_usage = body
            .stream_options
            .as_ref()
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        return Ok(stream(
            state.clone(),
            request,
            admitted,
            chunks,
            include_usage,
        ));
    }
    let outcome = match state.dispatcher.run(&request, &state.policy, None).await {
        Ok(o) => o,
        Err(DispatchError::NoProvider(reason)) => {
            return fallback(state, endpoint.into(), &body.model, raw, &reason).await;
        }
        Err(e) => return Err(e.into()),
    };
    state.metrics.answered(&chunks.model, &outcome, None);
    Ok(axum::Json(chunks.answer(&outcome)).into_response())
}

/// What every chunk of one answer names, and the shapes of its endpoint.
struct Chunks {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
}

impl Chunks {
    /// A stream chunk: `text` added (and the finish reason, at the end).
    fn delta(&self, text: Option<&str>, finish: Value) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let delta = text.map_or(json!({}), |t| json!({"content": t}));
                json!({"index": 0, "delta": delta, "finish_reason": finish})
            }
            Endpoint::Completions => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
        };
        json!({"id": self.id, "object": self.object(true), "created": self.created,
            "model": self.model, "choices": [choice]})
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completions, _) => "text_completion",
        }
    }

    /// The whole answer, with what was verified about it.
    fn answer(&self, o: &Outcome) -> Value {
        let r = &o.result;
        let finish = finish(r.finish_reason);
        let choice = match self.endpoint {
            Endpoint::Chat => {
                json!({"index": 0, "message": {"role": "assistant", "content": r.output},
                "finish_reason": finish})
            }
            Endpoint::Completions => {
                json!({"index": 0, "text": r.output, "logprobs": null, "finish_reason": finish})
            }
        };
        json!({
            "id": self.id, "object": self.object(false), "created": self.created, "model": self.model,
            "choices": [choice],
            "usage": usage(&r.usage),
            "beacon": {"provider": o.provider.to_string(), "region": o.region, "attempts": o.attempts,
                       "hedged": o.hedged, "verified": true, "audited": o.audited,
                       "latency_ms": o.latency_ms},
        })
    }
}

fn usage(u: &beacon_proto::Usage) -> Value {
    json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens})
}

/// A streamed answer: deltas as OpenAI chunks, then the finish chunk (saying what was
/// verified) and, when asked, the usage chunk.
fn stream(
    st: ApiState,
    request: InferRequest,
    admitted: Admitted,
    chunks: Chunks,
    include_usage: bool,
) -> Response {
    sse::pump(move |sink| async move {
        let _admitted = admitted;
        if chunks.endpoint == Endpoint::Chat {
            let mut role = chunks.delta(Some(""), Value::Null);
            role["choices"][0]["delta"]["role"] = json!("assistant");
            sink.data(&role).await;
        }
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let started = Instant::now();
        let mut first_token = None;
        let run = st.dispatcher.run(&request, &st.policy, Some(tx));
        let each = |d: String| {
            first_token.get_or_insert_with(|| started.elapsed());
            Event::default().data(chunks.delta(Some(&d), Value::Null).to_string())
        };
        let Some(outcome) = sink.forward(run, &mut rx, each).await else {
            return; // the client left
        };
        match outcome {
            Ok(o) => {
                st.metrics.answered(&chunks.model, &o, first_token);
                // The last chunk says what the client got: every delta above was compared
                // with the signed output before it (a mismatch ends in an error event).
                let mut last = chunks.delta(None, json!(finish(o.result.finish_reason)));
                last["beacon"] = json!({"provider": o.provider.to_string(), "region": o.region,
                    "attempts": o.attempts, "hedged": o.hedged, "verified": true, "audited": o.audited});
                sink.data(&last).await;
                if include_usage {
                    let mut c = chunks.delta(None, Value::Null);
                    c["choices"] = json!([]);
                    c["usage"] = usage(&o.result.usage);
                    sink.data(&c).await;
                }
            }
            Err(e) => {
                st.metrics.errors.inc();
                sink.data(
                    &json!({"error": {"message": e.to_string(), "type": "server_error"},
                    "beacon": {"verified": false, "audited": false}}),
                )
                .await;
            }
        }
        sink.done().await;
    })
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
    upstream: Upstream,
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
    let url = format!(
        "{}/{}",
        remote.base_url.trim_end_matches('/'),
        upstream.path()
    );
    // An embeddings request has no tokens to cap; it goes as it came.
    let raw = match upstream {
        Upstream::Embeddings => raw,
        Upstream::Generation(_) => forwarded(raw, state.fallback.max_tokens),
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: Value) -> InferRequest {
        let body: ChatBody = serde_json::from_value(body).unwrap();
        let Ok(r) = to_request(Endpoint::Chat, &body, Digest::of(b"model")) else {
            panic!("refused")
        };
        r
    }

    #[test]
    fn sampling_defaults_and_extensions_are_the_providers() {
        // Left out: the provider API's defaults, so routed and direct draw alike.
        let r = request(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}));
        let s = &r.sampling;
        assert_eq!(
            (s.temperature, s.top_p, s.top_k, s.min_p),
            (
                defaults::TEMPERATURE,
                defaults::TOP_P,
                defaults::TOP_K,
                defaults::MIN_P
            )
        );
        // llama.cpp's extensions pass through, and are checked like the rest.
        let r = request(
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "temperature": 0.5, "top_k": 7, "min_p": 0.2}),
        );
        assert_eq!((r.sampling.top_k, r.sampling.min_p), (7, 0.2));
        let body: ChatBody = serde_json::from_value(json!({"model": "m",
            "messages": [{"role": "user", "content": "hi"}], "min_p": 3.0}))
        .unwrap();
        assert!(to_request(Endpoint::Chat, &body, Digest::of(b"model")).is_err());
    }
}
