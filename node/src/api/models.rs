//! Model listing and management: OpenAI's `/v1/models` and Docker Model Runner's `/models`,
//! `/models/create` (pull with JSON-lines progress), `/engines/ps|df|unload`.

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, AppState, parse_body};
use crate::store::ListedModel;
use crate::store::progress::Progress;

fn openai_entry(name: &str, m: &ListedModel) -> Value {
    json!({"id": name, "object": "model", "created": m.record.created_unix, "owned_by": "beacon"})
}

fn dmr_entry(m: &ListedModel) -> Value {
    json!({
        "id": m.record.manifest_digest.to_string(),
        "tags": m.tags,
        "created": m.record.created_unix,
        "config": {
            "format": m.record.facts.format,
            "quantization": m.record.facts.quantization,
            "parameters": m.record.facts.parameters,
            "architecture": m.record.facts.architecture,
            "size": beacon_proto::gguf::format_bytes(m.record.size),
            "context_size": m.record.facts.context_size,
        }
    })
}

pub async fn openai_list(State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    let data: Vec<Value> = s
        .store
        .list()?
        .iter()
        .flat_map(|m| m.tags.iter().map(move |t| openai_entry(t, m)))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

pub async fn openai_get(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let record = s.store.resolve(&name)?;
    let listed = s
        .store
        .list()?
        .into_iter()
        .find(|m| m.record.manifest_digest == record.manifest_digest);
    let m = listed.ok_or_else(|| ApiError::not_found(format!("model {name} not found")))?;
    Ok(Json(openai_entry(&name, &m)))
}

pub async fn dmr_list(State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(Value::Array(
        s.store.list()?.iter().map(dmr_entry).collect(),
    )))
}

pub async fn dmr_get(
    State(s): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let record = s.store.resolve(&format!("{ns}/{name}"))?;
    let m = s
        .store
        .list()?
        .into_iter()
        .find(|m| m.record.manifest_digest == record.manifest_digest);
    m.map(|m| Json(dmr_entry(&m)))
        .ok_or_else(|| ApiError::not_found(format!("model {ns}/{name} not found")))
}

pub async fn dmr_delete(
    State(s): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let reference = format!("{ns}/{name}");
    s.scheduler.unload(Some(reference.clone())).await;
    let report = s.store.remove(&reference)?;
    Ok(Json(
        json!({"untagged": report.untagged, "deleted": report.deleted_models.iter().map(|d| d.to_string()).collect::<Vec<_>>()}),
    ))
}

#[derive(Deserialize)]
struct CreateRequest {
    from: String,
}

/// Pulls a model, streaming progress as JSON lines; the last line is `success` or `error`.
pub async fn create(
    State(s): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: CreateRequest = parse_body(body)?;
    beacon_proto::ModelRef::parse(&req.from)
        .map_err(|e| ApiError::bad_request("from", e.to_string()))?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let sink_tx = tx.clone();
    let sink: crate::store::progress::ProgressSink = std::sync::Arc::new(move |p: Progress| {
        if let Ok(line) = serde_json::to_string(&p) {
            let _ = sink_tx.send(line + "\n");
        }
    });
    tokio::spawn(async move {
        let last = match s.registry.pull(&s.store, &req.from, sink).await {
            Ok(r) => json!({"type": "success", "digest": r.manifest_digest.to_string()}),
            Err(e) => json!({"type": "error", "message": e.to_string()}),
        };
        let _ = tx.send(last.to_string() + "\n");
    });
    let stream = tokio_stream_from(rx);
    Ok((
        [("content-type", "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<String>,
) -> impl futures::Stream<Item = Result<String, std::convert::Infallible>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|o| o.map(Ok)))
}

pub async fn ps(State(s): State<AppState>) -> Json<Value> {
    Json(serde_json::to_value(s.scheduler.ps().await).unwrap_or(Value::Null))
}

pub async fn df(State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    let total: u64 = s.store.list()?.iter().map(|m| m.record.size).sum();
    Ok(Json(
        json!({"models_disk_usage": total, "default_backend_disk_usage": 0}),
    ))
}

#[derive(Deserialize, Default)]
struct UnloadRequest {
    #[serde(default)]
    all: bool,
    #[serde(default)]
    models: Vec<String>,
}

pub async fn unload(
    State(s): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: UnloadRequest = parse_body(body)?;
    let mut unloaded = Vec::new();
    if req.all || req.models.is_empty() {
        unloaded = s.scheduler.unload(None).await;
    } else {
        for m in req.models {
            unloaded.extend(s.scheduler.unload(Some(m)).await);
        }
    }
    Ok(Json(
        json!({"unloaded_runners": unloaded.len(), "models": unloaded}),
    ))
}
