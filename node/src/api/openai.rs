//! OpenAI-compatible inference endpoints: chat completions and completions, JSON or SSE,
//! with the request validated field by field (a bad field is a 400 that names it).

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::sse::{Event as SseEvent, KeepAlive as SseKeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use beacon_proto::{ChatMessage, FinishReason, MAX_COMPLETION_TOKENS, MAX_MESSAGES, Sampling};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};

use beacon_proto::openai::{Unserved, defaults};

use super::{ApiError, AppState, body_json, parse_value};
use crate::engine::{Event, GenerateRequest, OutputFormat, Prompt};
use crate::scheduler::KeepAlive;

#[derive(Deserialize)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    json_schema: Option<JsonSchemaFormat>,
}

#[derive(Deserialize)]
struct JsonSchemaFormat {
    schema: Value,
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The sampling fields shared by both endpoints.
#[derive(Deserialize)]
struct Params {
    model: String,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<u32>,
    #[serde(default)]
    min_p: Option<f32>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<StopField>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    response_format: Option<ResponseFormat>,
    #[serde(default)]
    keep_alive: Option<Value>,
    #[serde(flatten)]
    unserved: Unserved,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptField {
    One(String),
    Many(Vec<String>),
}

impl Params {
    fn sampling(&self) -> Result<Sampling, ApiError> {
        self.unserved
            .check()
            .map_err(|(field, why)| ApiError::bad_request(field, why))?;
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        let sampling = Sampling {
            temperature: self.temperature.unwrap_or(defaults::TEMPERATURE),
            top_p: self.top_p.unwrap_or(defaults::TOP_P),
            top_k: self.top_k.unwrap_or(defaults::TOP_K),
            min_p: self.min_p.unwrap_or(defaults::MIN_P),
            max_tokens: self
                .max_completion_tokens
                .or(self.max_tokens)
                .unwrap_or(MAX_COMPLETION_TOKENS),
            seed: self.seed,
            stop,
        };
        // The same check as the data plane's (`Sampling::check`).
        sampling
            .check()
            .map_err(|e| ApiError::bad_request(e.field, e.to_string()))?;
        Ok(sampling)
    }

    fn format(&self) -> Result<OutputFormat, ApiError> {
        match &self.response_format {
            None => Ok(OutputFormat::Text),
            Some(f) => match f.kind.as_str() {
                "text" => Ok(OutputFormat::Text),
                "json_object" => Ok(OutputFormat::JsonObject),
                "json_schema" => {
                    let schema = f.json_schema.as_ref().ok_or_else(|| {
                        ApiError::bad_request(
                            "response_format.json_schema",
                            "json_schema.schema is required",
                        )
                    })?;
                    Ok(OutputFormat::JsonSchema(schema.schema.to_string()))
                }
                other => Err(ApiError::bad_request(
                    "response_format.type",
                    format!("unknown response_format type {other:?}"),
                )),
            },
        }
    }

    fn keep_alive(&self) -> Result<Option<KeepAlive>, ApiError> {
        match &self.keep_alive {
            None => Ok(None),
            Some(Value::Number(n)) => KeepAlive::parse(&n.to_string()).map(Some),
            Some(Value::String(s)) => KeepAlive::parse(s).map(Some),
            Some(_) => Err("keep_alive must be a number or a duration string".to_string()),
        }
        .map_err(|e| ApiError::bad_request("keep_alive", e))
    }
}

fn convert_messages(
    messages: Vec<beacon_proto::openai::Message>,
) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request(
            "messages",
            "messages must not be empty",
        ));
    }
    if messages.len() > MAX_MESSAGES {
        return Err(ApiError::bad_request(
            "messages",
            format!("at most {MAX_MESSAGES} messages"),
        ));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            m.into_chat(i)
                .map_err(|(field, why)| ApiError::bad_request(field, why))
        })
        .collect()
}

fn finish_str(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        _ => "stop",
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub async fn chat_completions(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    state.metrics.request("chat");
    let result = async {
        let mut value = body_json(body)?;
        let messages = value
            .get_mut("messages")
            .map(serde_json::Value::take)
            .ok_or_else(|| ApiError::bad_request("messages", "messages is required"))?;
        let messages: Vec<beacon_proto::openai::Message> = parse_value(messages, "messages")?;
        let params: Params = parse_value(value, "")?;
        let sampling = params.sampling()?;
        let format = params.format()?;
        let keep_alive = params.keep_alive()?;
        let messages = convert_messages(messages)?;
        let request = GenerateRequest {
            prompt: Prompt::Chat(messages),
            sampling,
            format,
            return_tokens: false,
        };
        run(state.clone(), params, request, keep_alive, true).await
    }
    .await;
    result.unwrap_or_else(|e| {
        state.metrics.error();
        e.into_response()
    })
}

pub async fn completions(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    state.metrics.request("completions");
    let result = async {
        let mut value = body_json(body)?;
        let prompt = value
            .get_mut("prompt")
            .map(serde_json::Value::take)
            .ok_or_else(|| ApiError::bad_request("prompt", "prompt is required"))?;
        let prompt: PromptField = parse_value(prompt, "prompt")?;
        let params: Params = parse_value(value, "")?;
        let prompt = match prompt {
            PromptField::One(p) => p,
            PromptField::Many(mut v) if v.len() == 1 => v.remove(0),
            PromptField::Many(_) => {
                return Err(ApiError::bad_request(
                    "prompt",
                    "exactly one prompt is supported",
                ));
            }
        };
        let sampling = params.sampling()?;
        let format = params.format()?;
        let keep_alive = params.keep_alive()?;
        let request = GenerateRequest {
            prompt: Prompt::Text(prompt),
            sampling,
            format,
            return_tokens: false,
        };
        run(state.clone(), params, request, keep_alive, false).await
    }
    .await;
    result.unwrap_or_else(|e| {
        state.metrics.error();
        e.into_response()
    })
}

async fn run(
    state: AppState,
    params: Params,
    request: GenerateRequest,
    keep_alive: Option<KeepAlive>,
    chat: bool,
) -> Result<Response, ApiError> {
    let lease = state.scheduler.acquire(&params.model, keep_alive).await?;
    let model = params.model.clone();
    let id = format!(
        "{}-{}",
        if chat { "chatcmpl" } else { "cmpl" },
        beacon_proto::Id::random().short()
    );
    let created = now_secs();
    let mut rx = lease.engine.generate(request)?;
    if !params.stream {
        let c = whole(&mut rx).await;
        drop(lease);
        let c = c?;
        state.metrics.completed(&model, &c);
        return Ok(Json(answer(chat, &id, created, &model, &c)).into_response());
    }
    let include_usage = params.stream_options.is_some_and(|o| o.include_usage);
    let metrics_model = model.clone();
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunk = move |delta: Value, finish: Option<&str>| {
        let choice = if chat {
            json!({"index": 0, "delta": delta, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": delta.get("content").cloned().unwrap_or(Value::String(String::new())), "finish_reason": finish})
        };
        json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]})
    };
    let metrics = state.metrics.clone();
    let first = chat.then(|| chunk(json!({"role": "assistant", "content": ""}), None));
    let stream = futures::stream::unfold(
        (rx, Some(lease), false, first),
        move |(mut rx, lease, done, first)| {
            let chunk = chunk.clone();
            let metrics = metrics.clone();
            let metrics_model = metrics_model.clone();
            async move {
                if let Some(f) = first {
                    return Some((vec![sse(&f)], (rx, lease, done, None)));
                }
                if done {
                    return None;
                }
                match rx.recv().await {
                    Some(Ok(Event::Token { text, .. })) if text.is_empty() => Some((vec![], (rx, lease, false, None))),
                    Some(Ok(Event::Token { text, .. })) => Some((vec![sse(&chunk(json!({"content": text}), None))], (rx, lease, false, None))),
                    Some(Ok(Event::Done(c))) => {
                        metrics.completed(&metrics_model, &c);
                        let mut out = vec![sse(&chunk(json!({}), Some(finish_str(c.finish_reason))))];
                        if include_usage {
                            let mut u = chunk(json!({}), None);
                            u["choices"] = json!([]);
                            u["usage"] = json!({"prompt_tokens": c.usage.prompt_tokens, "completion_tokens": c.usage.completion_tokens, "total_tokens": c.usage.prompt_tokens + c.usage.completion_tokens});
                            out.push(sse(&u));
                        }
                        out.push(SseEvent::default().data("[DONE]"));
                        drop(lease);
                        Some((out, (rx, None, true, None)))
                    }
                    Some(Err(e)) => {
                        let body = json!({"error": {"message": e.to_string(), "type": "server_error"}});
                        Some((vec![sse(&body), SseEvent::default().data("[DONE]")], (rx, None, true, None)))
                    }
                    None => None,
                }
            }
        },
    )
    .flat_map(|events| futures::stream::iter(events.into_iter().map(Ok::<_, Infallible>)));
    Ok(Sse::new(Box::pin(stream)
        as std::pin::Pin<
            Box<dyn Stream<Item = Result<SseEvent, Infallible>> + Send>,
        >)
    .keep_alive(SseKeepAlive::default())
    .into_response())
}

/// The whole generation, when the client did not ask for a stream.
async fn whole(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Result<Event, crate::engine::EngineError>>,
) -> Result<crate::engine::Completion, ApiError> {
    let mut completion = None;
    while let Some(ev) = rx.recv().await {
        if let Event::Done(c) = ev? {
            completion = Some(c);
        }
    }
    completion.ok_or_else(|| ApiError::from(crate::engine::EngineError::Stopped))
}

/// A finished chat completion or text completion, as OpenAI shapes it.
fn answer(chat: bool, id: &str, created: u64, model: &str, c: &crate::engine::Completion) -> Value {
    let usage = json!({"prompt_tokens": c.usage.prompt_tokens, "completion_tokens": c.usage.completion_tokens,
        "total_tokens": c.usage.prompt_tokens + c.usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": c.usage.cached_prompt_tokens}});
    let (object, choice) = if chat {
        (
            "chat.completion",
            json!({"index": 0, "message": {"role": "assistant", "content": c.text}, "finish_reason": finish_str(c.finish_reason)}),
        )
    } else {
        (
            "text_completion",
            json!({"index": 0, "text": c.text, "finish_reason": finish_str(c.finish_reason)}),
        )
    };
    json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice], "usage": usage})
}

fn sse(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

#[derive(Deserialize)]
#[serde(untagged)]
enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct EmbeddingRequest {
    model: String,
    input: EmbeddingInput,
}

/// Most inputs in one embeddings request.
const MAX_EMBEDDING_INPUTS: usize = 256;

pub async fn embeddings(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    state.metrics.request("embeddings");
    let result = async {
        let value = body_json(body)?;
        let req: EmbeddingRequest = parse_value(value, "")?;
        let inputs = match req.input {
            EmbeddingInput::One(s) => vec![s],
            EmbeddingInput::Many(v) => v,
        };
        if inputs.is_empty() || inputs.len() > MAX_EMBEDDING_INPUTS {
            return Err(ApiError::bad_request(
                "input",
                format!("give 1..={MAX_EMBEDDING_INPUTS} inputs"),
            ));
        }
        let lease = state.scheduler.acquire(&req.model, None).await?;
        let e = lease.engine.embed(inputs).await.map_err(|e| match e {
            crate::engine::EngineError::InvalidRequest(m) => ApiError::bad_request("input", m),
            crate::engine::EngineError::PromptTooLong { .. } => {
                ApiError::bad_request("input", e.to_string())
            }
            other => other.into(),
        })?;
        let data: Vec<Value> = e
            .vectors
            .iter()
            .enumerate()
            .map(|(i, v)| json!({"object": "embedding", "index": i, "embedding": v}))
            .collect();
        Ok(
            Json(json!({"object": "list", "data": data, "model": req.model,
            "usage": {"prompt_tokens": e.prompt_tokens, "total_tokens": e.prompt_tokens}}))
            .into_response(),
        )
    }
    .await;
    result.unwrap_or_else(|e: ApiError| {
        state.metrics.error();
        e.into_response()
    })
}
