//! `POST /v1/minions`: validates a job, resolves its models, supervisor and policy against
//! the router's settings, runs it, and answers JSON or (with `"stream": true`) SSE progress
//! events ending in the answer.

use std::collections::BTreeSet;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::sync::mpsc;

use super::error::{ApiError, read_body};
use super::{ApiState, Client, sse};
use crate::minions::job::{JobRequest, Progress, Protocol};
use crate::minions::protocol::{JobError, JobSetup, run};
use crate::minions::remote::{RemoteError, Supervisor};
use crate::minions::retries::Planning;
use crate::remote::Remote;

pub async fn job(
    State(state): State<ApiState>,
    client: Option<axum::Extension<Client>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let client = client.map(|c| c.0.0);
    let span = tracing::info_span!("minions");
    match tracing::Instrument::instrument(job_inner(&state, client, body), span).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn job_inner(
    state: &ApiState,
    client: Option<String>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = read_body(body)?;
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let request: JobRequest = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let p = e.path().to_string();
        ApiError::bad_request(
            if p == "." { "body" } else { &p },
            e.into_inner().to_string(),
        )
    })?;
    request
        .validate(&state.minions.limits)
        .map_err(|e| ApiError::bad_request(&e.param, e.message))?;
    let stream = request.stream;
    let mut setup = resolve(state, request)?;
    // The operator's supervisor is spent against the client's budget (review H8); a job
    // that brings its own supervisor key spends its own.
    if !setup.own_supervisor {
        setup.budget = client.and_then(|c| state.minion_budgets.client(c));
        if let Some(spent) = setup.budget.as_ref().and_then(|b| b.check().err()) {
            return Err(ApiError::from(JobError::Remote(RemoteError::BudgetSpent {
                tokens: spent.tokens,
                renews_in_s: spent.renews_in.as_secs().max(1),
            })));
        }
    }
    // Admission (review H8): a job runs only while the router has room for one; the
    // permit goes with the job and ends with it (or with the client that leaves).
    let permit = state
        .minion_jobs
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError {
            retry_after: Some(30),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                format!(
                    "this router runs {} MinionS jobs at once and all are taken",
                    state.max_minion_jobs
                ),
            )
        })?;
    if !stream {
        let answer = run(setup, None).await.map_err(ApiError::from)?;
        drop(permit);
        return Ok(axum::Json(answer).into_response());
    }
    Ok(sse::pump(move |sink| async move {
        let _permit = permit;
        let (tx, mut rx) = mpsc::unbounded_channel::<Progress>();
        let each = |p: Progress| {
            let v = serde_json::to_value(&p).unwrap_or_default();
            let name = v["event"].as_str().unwrap_or("progress").to_string();
            Event::default().event(name).data(v.to_string())
        };
        // None: the client left, and dropping the job cancelled its calls.
        let Some(outcome) = sink.forward(run(setup, Some(tx)), &mut rx, each).await else {
            return;
        };
        match outcome {
            Ok(a) => {
                sink.event("answer", serde_json::to_string(&a).unwrap_or_default())
                    .await;
            }
            Err(e) => {
                let e = ApiError::from(e);
                let body = json!({"error": {"message": e.message, "type": e.kind}});
                sink.event("error", body.to_string()).await;
            }
        }
        sink.done().await;
    }))
}

/// Resolves a validated request against the router's settings.
fn resolve(state: &ApiState, r: JobRequest) -> Result<JobSetup, ApiError> {
    let cfg = &state.minions;
    let (local_model, local_digest) = local_model(state, &r)?;
    let (base, model, own_supervisor) = supervisor(state, &r)?;
    let policy = job_policy(state, &r)?;
    // A job may ask for more audits, never fewer: audits are how the network learns
    // which providers to trust, so no client can turn them off for its jobs.
    let dispatcher = match r.policy.audit_rate {
        Some(a) => state.dispatcher.clone().with_audit_rate_at_least(a),
        None => state.dispatcher.clone(),
    };
    let limits = &cfg.limits;
    // Plan calls are remembered per supervisor: its URL and model. A job that sets
    // `plan_retries` is always asked for a plan.
    let supervisor_key = format!("{} {model}", base.base_url);
    let planning = match (r.policy.plan_retries, r.protocol) {
        (Some(retries), _) => Planning::Ask { retries },
        (None, Protocol::Minions) => cfg.plan_record.planning(&supervisor_key, 2),
        (None, Protocol::Minion) => Planning::Ask { retries: 2 },
    };
    let (plan_retries, skip_plan) = match planning {
        Planning::Ask { retries } => (retries, None),
        Planning::Skip { valid, seen } => (2, Some((valid, seen))),
    };
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
        plan_retries,
        skip_plan,
        plan_record: Some((cfg.plan_record.clone(), supervisor_key)),
        max_chunk_chars: r.policy.max_chunk_chars.unwrap_or(4_000) as usize,
        worker_max_tokens: r.policy.worker_max_tokens.unwrap_or(200),
        baseline: r.policy.remote_only_baseline.unwrap_or_default(),
        parallelism: 64,
        budget: None,
        own_supervisor,
    })
}

/// The job's local model (the one the network serves, when it serves one and the job
/// names none) and its digest.
fn local_model(
    state: &ApiState,
    r: &JobRequest,
) -> Result<(String, beacon_proto::Digest), ApiError> {
    let cfg = &state.minions;
    let directory = &state.dispatcher;
    let local_model = match r.local_model.clone().or_else(|| cfg.local_model.clone()) {
        Some(m) => m,
        None => {
            let models = directory.models();
            let digests: BTreeSet<_> = models.values().map(|(d, _)| *d).collect();
            match (digests.len(), models.keys().next()) {
                (1, Some(name)) => name.clone(),
                _ => {
                    return Err(ApiError::bad_request(
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
    Ok((local_model, local_digest))
}

/// The job's supervisor: the router's unless the operator allows a job its own; whether
/// it is the job's own (which spends its own key); and the supervisor model.
fn supervisor(state: &ApiState, r: &JobRequest) -> Result<(Remote, String, bool), ApiError> {
    let cfg = &state.minions;
    let spec = r.remote.clone();
    // The supervisor runs on the operator's key: which one, and which model (a client
    // naming the priciest model spends the operator's money: review H8), is the
    // operator's choice unless it allows otherwise.
    let overrides = spec.as_ref().is_some_and(|s| {
        s.base_url.is_some()
            || s.api_key.is_some()
            || s.model
                .as_ref()
                .is_some_and(|m| Some(m) != cfg.remote_model.as_ref())
    });
    if overrides && !cfg.allow_remote_override {
        return Err(ApiError::bad_request(
            "remote",
            "this router does not accept a supervisor or supervisor model in the request (its operator can allow it with --allow-remote-override); leave out base_url, api_key and model to use the router's supervisor",
        ));
    }
    let own_supervisor = spec.as_ref().is_some_and(|s| s.base_url.is_some());
    let base = match spec.as_ref().and_then(|s| s.base_url.clone()) {
        Some(u) => {
            check_override_url(&u).map_err(|why| ApiError::bad_request("remote.base_url", why))?;
            Remote {
                base_url: u,
                api_key: spec.as_ref().and_then(|s| s.api_key.clone()),
            }
        }
        None => state.remote.clone().ok_or_else(|| {
            ApiError::bad_request(
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
            ApiError::bad_request(
                "remote.model",
                "required (the router has no --remote-model)",
            )
        })?;
    Ok((base, model, own_supervisor))
}

/// The router's placement policy, narrowed to the regions the job allows.
fn job_policy(state: &ApiState, r: &JobRequest) -> Result<crate::placement::Policy, ApiError> {
    let mut policy = state.policy.clone();
    if let Some(wanted) = &r.policy.allowed_regions {
        let wanted: BTreeSet<String> = wanted.iter().cloned().collect();
        // A job can narrow the router's residency rule, never widen it.
        let allowed: BTreeSet<String> = match &policy.allowed_regions {
            Some(router) => router.intersection(&wanted).cloned().collect(),
            None => wanted,
        };
        if allowed.is_empty() {
            return Err(ApiError::bad_request(
                "policy.allowed_regions",
                "none of these regions is allowed by this router",
            ));
        }
        policy.allowed_regions = Some(allowed);
    }
    Ok(policy)
}

/// Whether a job's own supervisor URL may be called (review L1): http(s) only; no user
/// name, query or fragment (they change what is called, or where the key goes); and no
/// loopback, private, link-local or other non-public address, literal or named `localhost`,
/// so a job cannot make the router call into its own network. (A public name that resolves
/// to a private address is not caught here; routers that allow overrides should not sit
/// beside services they would not expose.)
fn check_override_url(u: &str) -> Result<(), String> {
    if u.len() > 2048 {
        return Err("longer than 2048 characters".into());
    }
    let url = reqwest::Url::parse(u).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("must be an http(s) URL".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry a user name or password (send the key as api_key)".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must not have a query or fragment".into());
    }
    let host = url.host_str().ok_or("must name a host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let lower = host.to_ascii_lowercase();
    if lower == "localhost" || lower.ends_with(".localhost") {
        return Err("must not name this machine".into());
    }
    if let Ok(ip) = host.parse::<std::net::IpAddr>()
        && !beacon_net::addr::is_public(ip)
    {
        return Err(format!("{ip} is not a public address"));
    }
    Ok(())
}

#[cfg(test)]
mod url_tests {
    use super::check_override_url;

    #[test]
    fn override_urls_must_be_public_and_plain() {
        for ok in [
            "https://api.openai.com/v1",
            "http://203.0.114.7:8080/v1",
            "https://[2606:4700::1111]/v1",
        ] {
            assert_eq!(check_override_url(ok), Ok(()), "{ok}");
        }
        for bad in [
            "ftp://api.example/v1",
            "file:///etc/passwd",
            "http://127.0.0.1:12434/v1",
            "http://localhost:8080/v1",
            "http://metadata.localhost/v1",
            "http://10.0.0.5/v1",
            "http://169.254.169.254/latest",
            "http://100.64.0.1/v1",
            "http://0.0.0.0/v1",
            "http://[::1]/v1",
            "http://[fd00::1]/v1",
            "http://[::ffff:192.168.1.1]/v1",
            "https://user:pw@api.example/v1",
            "https://api.example/v1?x=1",
            "https://api.example/v1#frag",
            "not a url",
        ] {
            assert!(check_override_url(bad).is_err(), "{bad} was accepted");
        }
    }
}
