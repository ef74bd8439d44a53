//! `POST /v1/minions`: validates a job, resolves its models, supervisor and policy against
//! the router's settings, runs it, and answers JSON or (with `"stream": true`) SSE progress
//! events ending in the answer.

use std::collections::BTreeSet;
use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::sync::mpsc;

use super::job::{JobLimits, JobRequest, Progress, Protocol};
use super::protocol::{JobError, JobSetup, run};
use super::remote::Supervisor;
use crate::api::{ApiError, ApiState, Remote, read_body};

/// The router's MinionS settings.
#[derive(Clone, Debug, Default)]
pub struct MinionsConfig {
    /// Local model when a job names none.
    pub local_model: Option<String>,
    /// Supervisor model on the configured remote API when a job names none.
    pub remote_model: Option<String>,
    /// Accept a supervisor URL and key in the request. Off by default: a router that
    /// fetches any URL a client names can be turned against its own network.
    pub allow_remote_override: bool,
    /// Deadline of one supervisor call (None: [`Supervisor::DEFAULT_TIMEOUT`]). A CPU-hosted
    /// supervisor reading a long prompt needs minutes.
    pub remote_timeout: Option<std::time::Duration>,
    pub limits: JobLimits,
}

pub async fn job(
    State(state): State<ApiState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    match job_inner(&state, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

fn job_error(e: JobError) -> ApiError {
    match e {
        JobError::LocalRefused(m) => ApiError::bad("context", m),
        JobError::NoProvider(m) => ApiError {
            retry_after: Some(5),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_provider", m)
        },
        e @ JobError::LocalFailed { .. } => ApiError {
            retry_after: Some(5),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", e.to_string())
        },
        e @ (JobError::Remote(_) | JobError::Supervisor { .. }) => {
            ApiError::new(StatusCode::BAD_GATEWAY, "supervisor_error", e.to_string())
        }
    }
}

fn sse(event: &str, data: String) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

async fn job_inner(
    state: &ApiState,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = read_body(body)?;
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let request: JobRequest = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let p = e.path().to_string();
        ApiError::bad(
            if p == "." { "body" } else { &p },
            e.into_inner().to_string(),
        )
    })?;
    request
        .validate(&state.minions.limits)
        .map_err(|e| ApiError::bad(&e.param, e.message))?;
    let stream = request.stream;
    let setup = resolve(state, request)?;
    if !stream {
        let answer = run(setup, None).await.map_err(job_error)?;
        return Ok(axum::Json(answer).into_response());
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<Progress>();
    let (out_tx, out_rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    tokio::spawn(async move {
        let job = run(setup, Some(tx));
        tokio::pin!(job);
        let outcome = loop {
            tokio::select! {
                Some(p) = rx.recv() => {
                    let v = serde_json::to_value(&p).unwrap_or_default();
                    let name = v["event"].as_str().unwrap_or("progress").to_string();
                    if out_tx.send(Ok(sse(&name, v.to_string()))).await.is_err() {
                        return; // the client left; dropping the job cancels its calls
                    }
                }
                o = &mut job => break o,
            }
        };
        while let Ok(p) = rx.try_recv() {
            let v = serde_json::to_value(&p).unwrap_or_default();
            let name = v["event"].as_str().unwrap_or("progress").to_string();
            let _ = out_tx.send(Ok(sse(&name, v.to_string()))).await;
        }
        let last = match outcome {
            Ok(a) => sse("answer", serde_json::to_string(&a).unwrap_or_default()),
            Err(e) => {
                let e = job_error(e);
                sse(
                    "error",
                    json!({"error": {"message": e.message, "type": e.kind}}).to_string(),
                )
            }
        };
        let _ = out_tx.send(Ok(last)).await;
        let _ = out_tx.send(Ok(Bytes::from("data: [DONE]\n\n"))).await;
    });
    let body = futures::stream::unfold(
        out_rx,
        |mut rx| async move { rx.recv().await.map(|x| (x, rx)) },
    );
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
}

/// Resolves a validated request against the router's settings.
fn resolve(state: &ApiState, r: JobRequest) -> Result<JobSetup, ApiError> {
    let cfg = &state.minions;
    let directory = &state.dispatcher.directory;
    let local_model = match r.local_model.clone().or_else(|| cfg.local_model.clone()) {
        Some(m) => m,
        None => {
            let models = directory.models();
            let digests: BTreeSet<_> = models.values().map(|(d, _)| *d).collect();
            match (digests.len(), models.keys().next()) {
                (1, Some(name)) => name.clone(),
                _ => {
                    return Err(ApiError::bad(
                        "local_model",
                        format!(
                            "required: the network serves {}",
                            if models.is_empty() {
                                "no models yet".to_string()
                            } else {
                                models.keys().cloned().collect::<Vec<_>>().join(", ")
                            }
                        ),
                    ));
                }
            }
        }
    };
    let Some(local_digest) = directory.resolve_model(&local_model) else {
        return Err(ApiError {
            param: Some("local_model".into()),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                "model_not_found",
                format!("no provider serves {local_model}"),
            )
        });
    };
    let spec = r.remote.clone();
    let overrides = spec
        .as_ref()
        .is_some_and(|s| s.base_url.is_some() || s.api_key.is_some());
    if overrides && !cfg.allow_remote_override {
        return Err(ApiError::bad(
            "remote.base_url",
            "this router does not accept a supervisor in the request (its operator can allow it with --allow-remote-override); leave out base_url and api_key to use the router's supervisor",
        ));
    }
    let base = match spec.as_ref().and_then(|s| s.base_url.clone()) {
        Some(u) => {
            if !(u.starts_with("http://") || u.starts_with("https://")) || u.len() > 2048 {
                return Err(ApiError::bad("remote.base_url", "must be an http(s) URL"));
            }
            Remote {
                base_url: u,
                api_key: spec.as_ref().and_then(|s| s.api_key.clone()),
            }
        }
        None => state.remote.clone().ok_or_else(|| {
            ApiError::bad(
                "remote",
                "this router has no supervisor configured (--remote-base-url)",
            )
        })?,
    };
    let model = spec
        .as_ref()
        .and_then(|s| s.model.clone())
        .or_else(|| cfg.remote_model.clone())
        .ok_or_else(|| {
            ApiError::bad(
                "remote.model",
                "required (the router has no --remote-model)",
            )
        })?;
    let mut policy = state.policy.clone();
    if let Some(wanted) = &r.policy.allowed_regions {
        let wanted: BTreeSet<String> = wanted.iter().cloned().collect();
        // A job can narrow the router's residency rule, never widen it.
        let allowed: BTreeSet<String> = match &policy.allowed_regions {
            Some(router) => router.intersection(&wanted).cloned().collect(),
            None => wanted,
        };
        if allowed.is_empty() {
            return Err(ApiError::bad(
                "policy.allowed_regions",
                "none of these regions is allowed by this router",
            ));
        }
        policy.allowed_regions = Some(allowed);
    }
    let mut dispatcher = state.dispatcher.clone();
    // A job may ask for more audits, never fewer: audits are how the network learns
    // which providers to trust, so no client can turn them off for its jobs.
    if let Some(a) = r.policy.audit_rate {
        dispatcher.config.audit_rate = dispatcher.config.audit_rate.max(a);
    }
    let limits = &cfg.limits;
    Ok(JobSetup {
        protocol: r.protocol,
        task: r.task,
        context: r.context,
        doc_metadata: r.doc_metadata,
        max_rounds: r.max_rounds.unwrap_or(match r.protocol {
            Protocol::Minions => 2,
            Protocol::Minion => 4,
        }),
        local_model,
        local_digest,
        supervisor: Supervisor::new(state.http.clone(), base, model)
            .with_timeout(cfg.remote_timeout.unwrap_or(Supervisor::DEFAULT_TIMEOUT)),
        dispatcher,
        policy,
        max_jobs_per_round: r
            .policy
            .max_jobs_per_round
            .unwrap_or(64)
            .min(limits.max_jobs_per_round),
        plan_retries: r.policy.plan_retries.unwrap_or(2),
        max_chunk_chars: r.policy.max_chunk_chars.unwrap_or(4_000) as usize,
        worker_max_tokens: r.policy.worker_max_tokens.unwrap_or(200),
        baseline: r.policy.remote_only_baseline.unwrap_or_default(),
        parallelism: 64,
    })
}
