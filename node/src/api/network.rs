//! `/beacon/...`: the node's view of the network, for operators and tests — its identity
//! and addresses, connected peers, the providers it knows from adverts, kademlia lookups of
//! who has a model, and its ledger of served requests.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, AppState, NetState};

fn net(state: &AppState) -> Result<Arc<NetState>, ApiError> {
    state.net.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            "this node is not on a network (started without it)",
        )
    })
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        e.to_string(),
    )
}

pub(super) async fn node(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let net = net(&state)?;
    let addrs = net.network.listen_addrs().await.map_err(internal)?;
    let advert = net
        .advert
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .map(advert_json);
    Ok(Json(json!({
        "peer_id": net.network.peer_id().to_string(),
        "region": net.region,
        "listen_addrs": addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "data_plane": net.data_plane,
        "version": crate::VERSION,
        "advert": advert,
    })))
}

/// What this node last advertised: its capabilities as the network sees them.
fn advert_json(a: &beacon_proto::ProviderAdvert) -> Value {
    json!({
        "seq": a.seq,
        "engines": a.engines,
        "host": {
            "cpu_model": a.host.cpu_model,
            "cores": a.host.cores,
            "ram_total": a.host.ram_total,
            "ram_free": a.host.ram_free,
        },
        "accelerators": a.accelerators.iter().map(|g| format!(
            "{} {} ({} MiB)", g.vendor, g.name, g.memory_total >> 20
        )).collect::<Vec<_>>(),
        "slots": {"total": a.slots.total, "busy": a.slots.busy, "queued": a.slots.queued},
        "models": a.models.iter().map(|m| json!({
            "digest": m.digest.to_string(), "references": m.references,
            "quantization": m.quantization, "parameters": m.parameters, "size": m.size,
        })).collect::<Vec<_>>(),
        "throughput": a.throughput.iter().map(|t| json!({
            "model": t.model.to_string(), "tokens_per_second": t.tokens_per_second,
        })).collect::<Vec<_>>(),
    })
}

pub(super) async fn peers(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let net = net(&state)?;
    let peers = net.network.peers().await.map_err(internal)?;
    Ok(Json(json!({ "peers": peers })))
}

/// The providers this node knows from adverts.
pub(super) async fn providers(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let net = net(&state)?;
    let dir = net.directory.read().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    let list: Vec<Value> = dir
        .entries()
        .map(|e| {
            json!({
                "peer_id": e.advert.peer_id.to_string(),
                "region": e.advert.region,
                "data_plane": e.advert.data_plane,
                "listen_addrs": e.advert.listen_addrs,
                "seq": e.advert.seq,
                "age_ms": now.duration_since(e.received).as_millis() as u64,
                "rtt_ms": e.rtt.map(|r| r.as_secs_f64() * 1000.0),
                "slots": {"total": e.advert.slots.total, "busy": e.advert.slots.busy, "queued": e.advert.slots.queued},
                "models": e.advert.models.iter().map(|m| json!({
                    "digest": m.digest.to_string(), "references": m.references,
                    "quantization": m.quantization, "parameters": m.parameters,
                })).collect::<Vec<_>>(),
                "accelerators": e.advert.accelerators.len(),
                "cores": e.advert.host.cores,
            })
        })
        .collect();
    Ok(Json(json!({ "providers": list })))
}

/// Who provides a model digest, according to the DHT.
pub(super) async fn find_providers(
    State(state): State<AppState>,
    Path(digest): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let net = net(&state)?;
    let digest: beacon_proto::Digest = digest
        .parse()
        .map_err(|e: beacon_proto::ProtoError| ApiError::bad_request("digest", e.to_string()))?;
    let found = net.network.find_providers(digest).await.map_err(internal)?;
    Ok(Json(json!({
        "digest": digest.to_string(),
        "providers": found.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
    })))
}

#[derive(Deserialize)]
pub(super) struct LedgerQuery {
    limit: Option<usize>,
}

pub(super) async fn ledger(
    State(state): State<AppState>,
    Query(q): Query<LedgerQuery>,
) -> Result<Json<Value>, ApiError> {
    let net = net(&state)?;
    let limit = q.limit.unwrap_or(50).min(1000);
    let recent = net.ledger.recent(limit).map_err(internal)?;
    let totals = net.ledger.totals().map_err(internal)?;
    let receipts: Vec<Value> = recent
        .iter()
        .filter_map(|s| s.verify().ok())
        .map(|r| {
            // The requester's half, when it sent one (checked against the receipt when it
            // was stored).
            let countersigned = net
                .ledger
                .countersignature(r.request_id)
                .and_then(|c| {
                    let signer = c.signer_peer_id();
                    c.verify_from(&signer).ok().map(|v| (signer, v))
                })
                .map(|(signer, c)| {
                    json!({"by": signer.to_string(), "verified_ms": c.verified_ms,
                           "result_digest": c.result_digest.to_string()})
                });
            json!({
                "request_id": r.request_id.to_string(),
                "requester": r.requester.to_string(),
                "model": r.model_digest.to_string(),
                "prompt_tokens": r.usage.prompt_tokens,
                "completion_tokens": r.usage.completion_tokens,
                "finished_ms": r.finished_ms,
                "result_digest": r.result_digest.to_string(),
                "countersigned": countersigned,
            })
        })
        .collect();
    Ok(Json(json!({ "totals": totals, "receipts": receipts })))
}
