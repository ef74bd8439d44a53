//! Dispatch: runs one subtask on the network. Placement picks a provider; the call goes over
//! the QUIC data plane with a per-attempt timeout, bounded in-flight work per provider (its
//! advertised slots), and a hedged duplicate on a second provider when the first is slower
//! than the observed p95; the loser is cancelled. A failed or unverifiable attempt is
//! charged to its provider and the subtask is placed again elsewhere. Every accepted result
//! has been verified (signature, signer, request digest, model digest); a sample is audited.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use beacon_net::{CallError, DataClient};
use beacon_proto::{AuditRequest, Id, InferRequest, InferResult, PeerId, Signed};
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc};
use tracing::{debug, info, warn};

use crate::directory::RouterDirectory;
use crate::placement::{Policy, Subtask, place};

/// How subtasks are run.
#[derive(Clone, Debug)]
pub struct DispatchConfig {
    pub attempt_timeout: Duration,
    pub max_attempts: usize,
    /// Hedge after this quantile of observed latencies per generated token, times the
    /// request's token budget (None: never hedge).
    pub hedge_quantile: Option<f64>,
    /// Base fraction of results audited (raised for low-reputation providers).
    pub audit_rate: f64,
    /// A claimed token within this many nats of the auditor's argmax counts as agreeing.
    pub near_tie: f32,
    /// Fraction of claimed greedy tokens that must agree for an audit to pass.
    pub audit_pass: f64,
    /// Circuit breaker: this many failures in a row take a provider out of placement...
    pub breaker_failures: u32,
    /// ...for this long.
    pub breaker_open: Duration,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            attempt_timeout: Duration::from_secs(120),
            max_attempts: 3,
            hedge_quantile: Some(0.95),
            audit_rate: 0.05,
            near_tie: 0.5,
            audit_pass: 0.9,
            breaker_failures: 3,
            breaker_open: Duration::from_secs(30),
        }
    }
}

/// Why a subtask could not be completed.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("{0}")]
    NoProvider(String),
    #[error("all {attempts} attempts failed; last: {last}")]
    Exhausted { attempts: usize, last: String },
    #[error("the provider refused the request: {0}")]
    Refused(String),
}

/// What happened to one audit.
#[derive(Clone, Debug, Serialize)]
pub struct AuditOutcome {
    /// The audited request.
    #[serde(skip)]
    pub request_id: Id,
    pub auditor: String,
    pub passed: bool,
    pub agreement: f64,
}

/// A verified result and how it was obtained.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub result: InferResult,
    pub signed: Signed<InferResult>,
    pub provider: PeerId,
    pub region: String,
    pub attempts: usize,
    pub hedged: bool,
    pub latency_ms: f64,
}

/// Runs subtasks; cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    pub client: DataClient,
    pub directory: RouterDirectory,
    pub config: DispatchConfig,
    limits: Arc<Mutex<HashMap<PeerId, Arc<Semaphore>>>>,
    /// Requests this router has in flight per provider (adverts lag behind).
    in_flight: Arc<Mutex<HashMap<PeerId, u32>>>,
    /// Recent attempts: (milliseconds, milliseconds per generated token).
    latencies: Arc<Mutex<VecDeque<(f64, f64)>>>,
    /// Recent audit outcomes (bounded) and counts of all of them (passed, failed).
    audits: Arc<Mutex<VecDeque<(PeerId, AuditOutcome)>>>,
    audit_counts: Arc<Mutex<(u64, u64)>>,
}

/// Audit outcomes kept for lookups (jobs attach theirs when they finish).
const RECENT_AUDITS: usize = 10_000;

impl Dispatcher {
    pub fn new(client: DataClient, directory: RouterDirectory, config: DispatchConfig) -> Self {
        Dispatcher {
            client,
            directory,
            config,
            limits: Arc::default(),
            in_flight: Arc::default(),
            latencies: Arc::default(),
            audits: Arc::default(),
            audit_counts: Arc::default(),
        }
    }

    fn limit(&self, peer: PeerId, slots: u32) -> Arc<Semaphore> {
        self.limits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(peer)
            // Exactly the advertised slots: extra work waits here, where no attempt timeout
            // runs, instead of in the provider's queue.
            .or_insert_with(|| Arc::new(Semaphore::new(slots.clamp(1, 256) as usize)))
            .clone()
    }

    /// How long an attempt for `max_tokens` may run before it is hedged: the configured
    /// quantile of recent latencies per generated token, times this request's budget. A
    /// latency window mixing 1-token and long answers would otherwise hedge every long one.
    fn hedge_after(&self, max_tokens: u32) -> Option<Duration> {
        let q = self
            .config
            .hedge_quantile
            .filter(|q| *q > 0.0 && *q < 1.0)?;
        let l = self.latencies.lock().unwrap_or_else(|p| p.into_inner());
        if l.len() < 20 {
            return None;
        }
        let mut v: Vec<f64> = l.iter().map(|(_, per_token)| *per_token).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        let per_token = v[((v.len() - 1) as f64 * q) as usize];
        Some(Duration::from_millis(
            (per_token * (1.0 + f64::from(max_tokens))) as u64,
        ))
    }

    /// Median latency of recent attempts, when there are any.
    pub fn median_latency_ms(&self) -> Option<f64> {
        let l = self.latencies.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<f64> = l.iter().map(|(ms, _)| *ms).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied()
    }

    /// Records an attempt's latency and its latency per generated token.
    fn observe(&self, ms: f64, completion_tokens: u32) {
        let mut l = self.latencies.lock().unwrap_or_else(|p| p.into_inner());
        if l.len() >= 512 {
            l.pop_front();
        }
        l.push_back((ms, ms / (1.0 + f64::from(completion_tokens))));
    }

    /// Audit outcomes so far (for the trace and metrics).
    pub fn audit_log(&self) -> Vec<(PeerId, AuditOutcome)> {
        self.audits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Audits passed and failed since the router started.
    pub fn audit_counts(&self) -> (u64, u64) {
        *self.audit_counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Picks a provider for `request`, avoiding `exclude`.
    fn choose(
        &self,
        request: &InferRequest,
        policy: &Policy,
        exclude: &[PeerId],
    ) -> Result<(PeerId, SocketAddr, String, u32), DispatchError> {
        let mut views = self.directory.views();
        {
            let mine = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            for (v, _) in views.iter_mut() {
                v.busy += mine.get(&v.peer).copied().unwrap_or(0);
            }
        }
        let subtask = Subtask {
            model: request.model.digest,
            prompt_tokens: request
                .messages
                .iter()
                .map(|m| m.content.len() as u32 / 4)
                .sum(),
            max_tokens: request.sampling.max_tokens,
            exclude: exclude.to_vec(),
        };
        let providers: Vec<_> = views.iter().map(|(v, _)| v.clone()).collect();
        // Each request breaks ties its own way, so equal providers share sequential traffic.
        let policy = Policy {
            seed: policy.seed ^ request.request_id.0 as u64,
            ..policy.clone()
        };
        let placed = place(std::slice::from_ref(&subtask), &providers, &policy);
        match placed.into_iter().next() {
            Some(Ok(a)) => {
                let (v, addr) = views
                    .iter()
                    .find(|(v, _)| v.peer == a.provider)
                    .expect("placement chose a listed provider");
                Ok((a.provider, *addr, v.region.clone(), v.slots))
            }
            Some(Err(e)) => Err(DispatchError::NoProvider(e.to_string())),
            None => Err(DispatchError::NoProvider("nothing to place".into())),
        }
    }

    /// When every provider of the model is held back only by an open circuit breaker,
    /// waits for the first breaker to close (a bounded wait) and places again.
    async fn after_breakers(
        &self,
        request: &InferRequest,
        policy: &Policy,
    ) -> Option<(PeerId, SocketAddr, String, u32)> {
        for _ in 0..3 {
            let wait = self.directory.breaker_wait(&request.model.digest)?;
            tokio::time::sleep(wait.min(Duration::from_secs(60)) + Duration::from_millis(50)).await;
            if let Ok(c) = self.choose(request, policy, &[]) {
                return Some(c);
            }
        }
        None
    }

    async fn attempt(
        &self,
        peer: PeerId,
        addr: SocketAddr,
        slots: u32,
        request: &InferRequest,
        deltas: Option<mpsc::UnboundedSender<String>>,
    ) -> Result<(InferResult, Signed<InferResult>), CallError> {
        let permit = self.limit(peer, slots).acquire_owned().await;
        let _counted = InFlight::new(self.in_flight.clone(), peer);
        let call = self.client.infer(peer, addr, request, |d| {
            if let Some(tx) = &deltas {
                let _ = tx.send(d.to_string());
            }
        });
        let r = match tokio::time::timeout(self.config.attempt_timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Connect {
                peer,
                reason: format!(
                    "no answer within the attempt timeout ({} s)",
                    self.config.attempt_timeout.as_secs()
                ),
            }),
        };
        drop(permit);
        r
    }

    /// Runs `request` to a verified result. With `deltas`, text is streamed from the first
    /// attempt only (no hedging then, so the stream never mixes two providers).
    pub async fn run(
        &self,
        request: &InferRequest,
        policy: &Policy,
        deltas: Option<mpsc::UnboundedSender<String>>,
    ) -> Result<Outcome, DispatchError> {
        let mut exclude = Vec::new();
        let mut last = String::new();
        for attempt in 1..=self.config.max_attempts {
            let (peer, addr, region, slots) = match self.choose(request, policy, &exclude) {
                Ok(c) => c,
                Err(e) if attempt == 1 => match self.after_breakers(request, policy).await {
                    Some(c) => c,
                    None => return Err(e),
                },
                Err(_) => break,
            };
            let started = Instant::now();
            let hedge = if deltas.is_none() {
                self.hedge_after(request.sampling.max_tokens)
            } else {
                None
            };
            let primary = self.attempt(peer, addr, slots, request, deltas.clone());
            let outcome = match hedge {
                None => primary.await.map(|r| (r, peer, region.clone(), false)),
                Some(after) => {
                    tokio::pin!(primary);
                    tokio::select! {
                        r = &mut primary => r.map(|r| (r, peer, region.clone(), false)),
                        _ = tokio::time::sleep(after) => {
                            match self.choose(request, policy, &[exclude.clone(), vec![peer]].concat()) {
                                Ok((p2, a2, r2, s2)) => {
                                    info!(first = %peer, second = %p2, "hedging a straggler");
                                    let second = self.attempt(p2, a2, s2, request, None);
                                    tokio::select! {
                                        r = &mut primary => r.map(|r| (r, peer, region.clone(), true)),
                                        r = second => r.map(|r| (r, p2, r2, true)),
                                    }
                                }
                                Err(_) => primary.await.map(|r| (r, peer, region.clone(), false)),
                            }
                        }
                    }
                }
            };
            match outcome {
                Ok(((result, signed), winner, region, hedged)) => {
                    let ms = started.elapsed().as_secs_f64() * 1000.0;
                    self.observe(ms, result.usage.completion_tokens);
                    self.directory.success(
                        &winner,
                        ms,
                        result.usage.completion_tokens,
                        result.timings.decode_ms,
                    );
                    self.maybe_audit(request, &result, winner, policy);
                    return Ok(Outcome {
                        result,
                        signed,
                        provider: winner,
                        region,
                        attempts: attempt,
                        hedged,
                        latency_ms: ms,
                    });
                }
                Err(e) => {
                    warn!(provider = %peer, error = %e, attempt, "subtask attempt failed");
                    match &e {
                        CallError::Invalid { peer, .. } => self.directory.invalid(peer),
                        CallError::Remote { error, .. }
                            if error.code == beacon_proto::DataErrorCode::BadRequest =>
                        {
                            return Err(DispatchError::Refused(error.message.clone()));
                        }
                        _ => self.directory.failure(&peer),
                    }
                    last = e.to_string();
                    exclude.push(peer);
                    if deltas.is_some() {
                        // Text already streamed cannot be taken back: stop here.
                        break;
                    }
                }
            }
        }
        Err(DispatchError::Exhausted {
            attempts: exclude.len(),
            last,
        })
    }

    /// Audits a sample of results in the background on another provider with the same
    /// model digest; only greedy outputs with token ids can be audited this way.
    fn maybe_audit(
        &self,
        request: &InferRequest,
        result: &InferResult,
        peer: PeerId,
        policy: &Policy,
    ) {
        let Some(tokens) = result.token_ids.clone() else {
            return;
        };
        if tokens.is_empty() || request.sampling.temperature > 0.0 {
            return;
        }
        let rate = self.directory.audit_rate(&peer, self.config.audit_rate);
        let draw = (request.request_id.0 % 10_000) as f64 / 10_000.0;
        if draw >= rate {
            return;
        }
        let Ok((auditor, addr, _, _)) = self.choose(request, policy, &[peer]) else {
            debug!("no second provider to audit with");
            return;
        };
        let audit = AuditRequest {
            audit_id: Id::random(),
            model: request.model.clone(),
            messages: request.messages.clone(),
            claimed_tokens: tokens.clone(),
            json_schema: request.json_schema.clone(),
        };
        let this = self.clone();
        let request_id = request.request_id;
        tokio::spawn(async move {
            match this.client.audit(auditor, addr, &audit).await {
                Ok(scored) => {
                    let s = scored.summarize(&tokens, this.config.near_tie);
                    let agreement =
                        (s.greedy_matches + s.near_ties) as f64 / s.tokens.max(1) as f64;
                    let passed = agreement >= this.config.audit_pass;
                    info!(provider = %peer, %auditor, agreement, passed, "audit");
                    this.directory.audited(&peer, passed);
                    {
                        let mut c = this.audit_counts.lock().unwrap_or_else(|p| p.into_inner());
                        if passed {
                            c.0 += 1;
                        } else {
                            c.1 += 1;
                        }
                    }
                    let mut log = this.audits.lock().unwrap_or_else(|p| p.into_inner());
                    if log.len() >= RECENT_AUDITS {
                        log.pop_front();
                    }
                    log.push_back((
                        peer,
                        AuditOutcome {
                            request_id,
                            auditor: auditor.to_string(),
                            passed,
                            agreement,
                        },
                    ));
                }
                Err(e) => debug!(error = %e, "audit could not run"),
            }
        });
    }
}

/// Counts one request in flight to a provider for as long as it lives (also when a hedged
/// loser is cancelled).
struct InFlight {
    map: Arc<Mutex<HashMap<PeerId, u32>>>,
    peer: PeerId,
}

impl InFlight {
    fn new(map: Arc<Mutex<HashMap<PeerId, u32>>>, peer: PeerId) -> Self {
        *map.lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(peer)
            .or_default() += 1;
        InFlight { map, peer }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(n) = self
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&self.peer)
        {
            *n = n.saturating_sub(1);
        }
    }
}
