//! Dispatch: runs one subtask on the network. Placement picks a provider; the call goes over
//! the QUIC data plane with a per-attempt timeout, bounded in-flight work per provider (its
//! advertised slots), and a hedged duplicate on a second provider when the first is slower
//! than the observed p95; the loser is cancelled. A failed or unverifiable attempt is
//! charged to its provider and the subtask is placed again elsewhere. Every accepted result
//! has been verified (signature, signer, request digest, model digest); a sample is audited.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use beacon_net::{CallError, DataClient};
use beacon_proto::{
    AuditRequest, AuditVerdict, Digest, Id, InferRequest, InferResult, PeerId, Signed,
};
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc};
use tracing::{debug, info, instrument, warn};

use crate::directory::{EXPLORE_SHARE, RouterDirectory};
use crate::placement::{Policy, Prefix, ProviderView, Subtask, eligible, place};

/// A prompt prefix a request shares with others (a MinionS chunk that several tasks
/// read): the dispatcher sends such requests where the prefix was sent before, when that
/// is expected to finish no later, so the provider reuses its KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedPrefix {
    key: u64,
    tokens: u32,
}

impl SharedPrefix {
    /// The prefix made of `parts`, in order (e.g. the system prompt, then the chunk).
    pub fn of(parts: &[&str]) -> Self {
        let mut bytes = Vec::new();
        for p in parts {
            bytes.extend_from_slice(&(p.len() as u64).to_le_bytes());
            bytes.extend_from_slice(p.as_bytes());
        }
        let d = Digest::of(&bytes);
        let mut key = [0u8; 8];
        key.copy_from_slice(&d.0[..8]);
        let chars: usize = parts.iter().map(|p| p.len()).sum();
        SharedPrefix {
            key: u64::from_le_bytes(key),
            // The same estimate placement uses for whole prompts.
            tokens: (chars / 4).min(u32::MAX as usize) as u32,
        }
    }
}

/// Prefixes whose last providers the dispatcher remembers.
const PREFIX_HOMES: usize = 4096;

/// Providers remembered per prefix.
const HOMES_PER_PREFIX: usize = 4;

/// Where shared prefixes were sent: key -> (when last used, providers, latest last).
#[derive(Default)]
struct Homes {
    clock: u64,
    map: HashMap<u64, (u64, Vec<PeerId>)>,
}

impl Homes {
    fn get(&self, key: u64) -> Vec<PeerId> {
        self.map.get(&key).map(|e| e.1.clone()).unwrap_or_default()
    }

    fn add(&mut self, key: u64, peer: PeerId) {
        self.clock += 1;
        if self.map.len() >= PREFIX_HOMES && !self.map.contains_key(&key) {
            // Forget the older half: amortised O(1) per insert, bounded memory.
            let keep_after = self.clock.saturating_sub(PREFIX_HOMES as u64 / 2);
            self.map.retain(|_, (at, _)| *at > keep_after);
            if self.map.len() >= PREFIX_HOMES {
                self.map.clear();
            }
        }
        let (at, peers) = self.map.entry(key).or_default();
        *at = self.clock;
        peers.retain(|p| *p != peer);
        peers.push(peer);
        if peers.len() > HOMES_PER_PREFIX {
            peers.remove(0);
        }
    }

    fn remove(&mut self, key: u64, peer: &PeerId) {
        if let Some((_, peers)) = self.map.get_mut(&key) {
            peers.retain(|p| p != peer);
        }
    }
}

/// A verified answer and how many requests the provider was answering for us then.
type Answered = ((InferResult, Signed<InferResult>), u32);
type Attempted = Result<Answered, CallError>;

/// Which copy of a request owns its stream: none yet, the first attempt, its hedge.
const NO_OWNER: u8 = 0;
const PRIMARY: u8 = 1;
const HEDGE: u8 = 2;

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
    /// Fraction of claimed tokens that must agree for an audit to pass.
    pub audit_pass: f64,
    /// A sampled token whose key (logit + T · Gumbel noise, replayed from the seed) is
    /// within this many logits of the replayed choice counts as agreeing.
    pub sampled_tolerance: f32,
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
            sampled_tolerance: 0.5,
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
    /// How many auditors voted.
    pub auditors: usize,
    /// Why the result failed, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
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
    /// Whether this result was drawn for an audit (which runs after it is returned).
    pub audited: bool,
    /// The audit's outcome once it is decided, when the result was drawn for one.
    pub audit: Option<AuditHandle>,
}

/// Where an audit's outcome appears once it is decided (it runs after the result is
/// returned); cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct AuditHandle(Arc<std::sync::OnceLock<AuditOutcome>>);

impl AuditHandle {
    /// The outcome, when the audit has been decided (an inconclusive one never is).
    pub fn outcome(&self) -> Option<AuditOutcome> {
        self.0.get().cloned()
    }
}

/// Runs subtasks; cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    client: DataClient,
    directory: RouterDirectory,
    config: DispatchConfig,
    /// Per provider: the slots its semaphore was made for, and the semaphore.
    limits: Arc<Mutex<HashMap<PeerId, Limit>>>,
    /// Requests this router has in flight per provider (adverts lag behind).
    in_flight: Arc<Mutex<HashMap<PeerId, u32>>>,
    /// Recent attempts: (milliseconds, milliseconds per generated token).
    latencies: Arc<Mutex<VecDeque<(f64, f64)>>>,
    /// Recent audit outcomes (bounded) and counts of all of them (passed, failed).
    audit_counts: Arc<Mutex<(u64, u64)>>,
    /// Tokens auditors scored (prompt and claimed output, every vote): the cost of audits.
    audit_tokens: Arc<std::sync::atomic::AtomicU64>,
    /// Results whose verdict the router knows, to test auditors with (bounded).
    references: Arc<Mutex<VecDeque<Reference>>>,
    /// Where shared prompt prefixes went (bounded).
    homes: Arc<Mutex<Homes>>,
}

/// A result whose verdict the router knows, kept to test auditors with: a good one (two
/// independent auditors passed it) or a clear cheat (two failed it, on its text or on
/// most of its positions). Sent like any other audit, so an auditor cannot tell the check
/// from work; judging it wrongly needs no second auditor to say so.
#[derive(Clone)]
struct Reference {
    good: bool,
    audit: AuditRequest,
    tokens: Vec<u32>,
    output: String,
    tolerance: Option<f32>,
    /// The provider that produced it and the auditors that passed it: never tested with
    /// it (they have seen it).
    involved: Vec<PeerId>,
}

/// Reference results kept.
const REFERENCES: usize = 64;

/// Reference checks a provider gets as soon as it is reputable (an auditor drawn before
/// others): two good results, then two clear cheats (where the router has seen any). An
/// auditor that fails good results is quarantined before it can outvote anyone (two
/// false alarms); one that passes cheats, before it can wave many through.
pub const FIRST_REFERENCE_CHECKS: u64 = 4;

/// After those, the chance per audit that one reputable auditor of the model is checked
/// again, with a good result or a clear cheat alike: an auditor that passes cheats, or
/// turns later, is caught too.
pub const REFERENCE_CHECK_SHARE: f64 = 0.25;

/// A failing vote below this agreement (or on evidence no noise explains) makes a clear
/// cheat, one no honest auditor passes.
const CLEAR_CHEAT_BELOW: f64 = 0.5;

/// A provider's in-flight bound: the slots it is sized for, its semaphore, and the
/// permits it owes (slots taken away while in use, forgotten as they come back).
struct Limit {
    slots: u32,
    semaphore: Arc<Semaphore>,
    owed: u32,
}

impl Dispatcher {
    pub fn new(client: DataClient, directory: RouterDirectory, config: DispatchConfig) -> Self {
        Dispatcher {
            client,
            directory,
            config,
            limits: Arc::default(),
            in_flight: Arc::default(),
            latencies: Arc::default(),
            audit_counts: Arc::default(),
            audit_tokens: Arc::default(),
            references: Arc::default(),
            homes: Arc::default(),
        }
    }

    /// The semaphore bounding work in flight to `peer` at its current slots (advertised,
    /// capped by what the router measured): extra work waits here, where no attempt
    /// timeout runs, instead of in the provider's queue. One semaphore per provider for
    /// good: growing adds permits; shrinking forgets free ones and, for those in use, owes
    /// the rest, paid as they come back (see `release`). A new semaphore per change would
    /// let the old one's holders and the new one's add up past the bound.
    fn limit(&self, peer: PeerId, slots: u32) -> Arc<Semaphore> {
        let slots = slots.clamp(1, 256);
        let mut limits = self.limits.lock().unwrap_or_else(|p| p.into_inner());
        let l = limits.entry(peer).or_insert_with(|| Limit {
            slots,
            semaphore: Arc::new(Semaphore::new(slots as usize)),
            owed: 0,
        });
        if slots > l.slots {
            let grow = slots - l.slots;
            let repaid = grow.min(l.owed);
            l.owed -= repaid;
            l.semaphore.add_permits((grow - repaid) as usize);
        } else if slots < l.slots {
            let shrink = l.slots - slots;
            let forgotten = l.semaphore.forget_permits(shrink as usize) as u32;
            l.owed += shrink - forgotten;
        }
        l.slots = slots;
        l.semaphore.clone()
    }

    /// Returns a permit taken from `limit`, or forgets it while the semaphore owes one.
    fn release(&self, peer: PeerId, permit: tokio::sync::OwnedSemaphorePermit) {
        let mut limits = self.limits.lock().unwrap_or_else(|p| p.into_inner());
        match limits.get_mut(&peer) {
            Some(l) if l.owed > 0 => {
                l.owed -= 1;
                permit.forget();
            }
            _ => drop(permit),
        }
    }

    /// Permits `peer`'s semaphore has free (for tests).
    #[cfg(test)]
    fn free_slots(&self, peer: &PeerId) -> usize {
        let limits = self.limits.lock().unwrap_or_else(|p| p.into_inner());
        limits
            .get(peer)
            .map_or(0, |l| l.semaphore.available_permits())
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

    /// Tokens auditors scored since the router started.
    pub fn audit_tokens(&self) -> u64 {
        self.audit_tokens.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Slots of the providers that may run `model` under `policy`: the one eligibility
    /// check placement uses, so admission and MinionS count what placement may use.
    pub fn capacity(&self, model: Digest, policy: &Policy) -> u64 {
        let probe = Subtask {
            model,
            prompt_tokens: 0,
            max_tokens: 0,
            exclude: Vec::new(),
            prefix: None,
        };
        self.directory
            .views()
            .iter()
            .filter(|(v, _)| eligible(&probe, v, policy))
            .map(|(v, _)| u64::from(v.slots))
            .sum()
    }

    /// This router's requests in flight per provider.
    pub fn in_flight(&self) -> HashMap<PeerId, u32> {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The digest `reference` names on this router: its pin, else what the network's
    /// adverts say (see [`RouterDirectory::resolve_model`]).
    pub fn resolve_model(&self, reference: &str) -> Option<Digest> {
        self.directory.resolve_model(reference)
    }

    /// The models the network serves: name → (digest, providers).
    pub fn models(&self) -> std::collections::BTreeMap<String, (Digest, usize)> {
        self.directory.models()
    }

    /// Every provider in the directory, as `/v1/providers` shows it.
    pub fn providers(&self) -> Vec<crate::directory::ProviderInfo> {
        self.directory.providers()
    }

    /// This dispatcher with at least `rate` as its audit rate: a job may ask for more
    /// audits, never fewer.
    pub fn with_audit_rate_at_least(mut self, rate: f64) -> Self {
        self.config.audit_rate = self.config.audit_rate.max(rate);
        self
    }

    /// Audits passed and failed since the router started.
    pub fn audit_counts(&self) -> (u64, u64) {
        *self.audit_counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The key under which `prefix` of a request for `model` is remembered: one prefix
    /// under two models is two caches.
    fn prefix_key(model: &Digest, prefix: &SharedPrefix) -> u64 {
        let mut m = [0u8; 8];
        m.copy_from_slice(&model.0[..8]);
        prefix.key ^ u64::from_le_bytes(m)
    }

    /// Picks a provider for `request`, avoiding `exclude`.
    fn choose(
        &self,
        request: &InferRequest,
        policy: &Policy,
        exclude: &[PeerId],
        prefix: Option<&SharedPrefix>,
    ) -> Result<(PeerId, SocketAddr, String, u32), DispatchError> {
        let mut views = self.directory.views();
        {
            let mine = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            // Load is what this router has in flight there: an advert's count lags, and a
            // provider that reports itself idle would otherwise draw the work.
            for (v, _) in views.iter_mut() {
                v.busy = mine.get(&v.peer).copied().unwrap_or(0);
            }
        }
        // A new identity gets a small share while established providers of the model
        // exist: one request at a time until it has passed its probation audits.
        let model = request.model.digest;
        let probation: Vec<bool> = views
            .iter()
            .map(|(v, _)| self.directory.on_probation(&v.peer))
            .collect();
        let established = views
            .iter()
            .zip(&probation)
            .any(|((v, _), p)| !p && !v.quarantined && v.models.contains(&model));
        if established {
            for ((v, _), p) in views.iter_mut().zip(&probation) {
                if *p {
                    v.slots = v.slots.min(1);
                }
            }
        }
        let subtask = Subtask {
            model: request.model.digest,
            prompt_tokens: request
                .messages
                .iter()
                .map(|m| m.content.len())
                .chain(request.prompt.as_ref().map(String::len))
                .map(|n| n as u32 / 4)
                .sum(),
            max_tokens: request.sampling.max_tokens,
            exclude: exclude.to_vec(),
            prefix: prefix.map(|x| {
                let key = Self::prefix_key(&model, x);
                let homes = self.homes.lock().unwrap_or_else(|p| p.into_inner());
                Prefix {
                    key,
                    tokens: x.tokens,
                    held_by: homes.get(key),
                }
            }),
        };
        // Unmeasured, a newcomer ranks last and might never be placed, audited or
        // established: a small share of requests goes to an idle one on probation.
        if established && unit_draw() < EXPLORE_SHARE {
            let policy = Policy {
                allowed_regions: policy.allowed_regions.clone(),
                ..Policy::default()
            };
            let newcomers: Vec<&(ProviderView, SocketAddr)> = views
                .iter()
                .zip(&probation)
                .filter(|((v, _), p)| **p && v.busy == 0 && eligible(&subtask, v, &policy))
                .map(|(e, _)| e)
                .collect();
            if !newcomers.is_empty() {
                let (v, addr) = newcomers[(Id::random().0 % newcomers.len() as u128) as usize];
                return Ok((v.peer, *addr, v.region.clone(), v.slots));
            }
        }
        let providers: Vec<_> = views.iter().map(|(v, _)| v.clone()).collect();
        // Each request breaks ties its own way, so equal providers share sequential traffic.
        let policy = Policy {
            seed: policy.seed ^ request.request_id.0 as u64,
            ..policy.clone()
        };
        let placed = place(std::slice::from_ref(&subtask), &providers, &policy);
        match placed.into_iter().next() {
            Some(Ok(a)) => {
                if let Some(x) = &subtask.prefix {
                    let mut homes = self.homes.lock().unwrap_or_else(|p| p.into_inner());
                    homes.add(x.key, a.provider);
                }
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
        prefix: Option<&SharedPrefix>,
    ) -> Option<(PeerId, SocketAddr, String, u32)> {
        for _ in 0..3 {
            let wait = self.directory.breaker_wait(&request.model.digest)?;
            tokio::time::sleep(wait.min(Duration::from_secs(60)) + Duration::from_millis(50)).await;
            if let Ok(c) = self.choose(request, policy, &[], prefix) {
                return Some(c);
            }
        }
        None
    }

    /// Counts a failed attempt against the provider it went to (a hedge's second copy
    /// included): an answer that does not verify as invalid, anything else as a failure.
    fn attempt_failed(&self, e: &CallError) {
        let peer = e.peer();
        warn!(provider = %peer, error = %e, "subtask attempt failed");
        match e {
            CallError::Invalid { .. } => self.directory.invalid(&peer),
            CallError::Remote { error, .. }
                if error.code == beacon_proto::DataErrorCode::BadRequest => {}
            _ => self.directory.failure(&peer),
        }
    }

    #[instrument(skip_all, fields(provider = %peer))]
    async fn attempt(
        &self,
        peer: PeerId,
        addr: SocketAddr,
        slots: u32,
        request: &InferRequest,
        deltas: Option<(&mpsc::UnboundedSender<String>, &AtomicU8, u8)>,
    ) -> Attempted {
        let permit = self.limit(peer, slots).acquire_owned().await;
        let _counted = InFlight::new(self.in_flight.clone(), peer);
        let call = self.client.infer(peer, addr, request, |d| {
            // The first copy of a request to send text owns the stream; another copy's
            // text is dropped.
            if let Some((tx, owner, me)) = deltas {
                let o = owner
                    .compare_exchange(NO_OWNER, me, Ordering::AcqRel, Ordering::Acquire)
                    .unwrap_or_else(|o| o);
                if o == NO_OWNER || o == me {
                    let _ = tx.send(d.to_string());
                }
            }
        });
        let r = match tokio::time::timeout(self.config.attempt_timeout, call).await {
            Ok(Ok(r)) => {
                // How many this provider was answering for us at once, for its capacity.
                let concurrent = self
                    .in_flight
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&peer)
                    .copied()
                    .unwrap_or(1);
                Ok((r, concurrent))
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(CallError::Connect {
                peer,
                reason: format!(
                    "no answer within the attempt timeout ({} s)",
                    self.config.attempt_timeout.as_secs()
                ),
            }),
        };
        if let Ok(permit) = permit {
            self.release(peer, permit);
        }
        r
    }

    /// The first copy of a hedged attempt to succeed (`true`: the hedge), unless the other
    /// copy owns the stream. A copy that fails leaves the other running (a hedge that errs
    /// first must not throw away a primary about to answer), unless it owned the stream;
    /// the failure not returned is counted here.
    async fn race(
        &self,
        mut primary: Pin<&mut impl Future<Output = Attempted>>,
        mut second: Pin<&mut impl Future<Output = Attempted>>,
        owner: &AtomicU8,
    ) -> Result<(Answered, bool), CallError> {
        let won = tokio::select! {
            r = &mut primary => self.settle(r, PRIMARY, second, owner).await,
            r = &mut second => self.settle(r, HEDGE, primary, owner).await,
        };
        won.map(|(r, copy)| (r, copy == HEDGE))
    }

    /// Copy `me` of a hedged attempt finished with `r`: its answer, unless the other copy
    /// owns the stream; its failure, if it owned the stream; else the other copy's outcome.
    async fn settle(
        &self,
        r: Attempted,
        me: u8,
        other: Pin<&mut impl Future<Output = Attempted>>,
        owner: &AtomicU8,
    ) -> Result<(Answered, u8), CallError> {
        let them = if me == PRIMARY { HEDGE } else { PRIMARY };
        let owned_by = owner.load(Ordering::Acquire);
        match r {
            Ok(r) if owned_by != them => Ok((r, me)),
            Err(e) if owned_by == me => Err(e),
            r => {
                if let Err(e) = &r {
                    self.attempt_failed(e);
                }
                other.await.map(|r| (r, them))
            }
        }
    }

    /// Runs `request` to a verified result. With `deltas`, text is streamed as it comes:
    /// an attempt that fails before its first token is retried elsewhere like any other,
    /// one that fails after it is not (text already sent cannot be taken back), and a
    /// hedged copy may run beside a straggler that has sent nothing, but the first copy
    /// to send text owns the stream, so it never mixes two providers.
    pub async fn run(
        &self,
        request: &InferRequest,
        policy: &Policy,
        deltas: Option<mpsc::UnboundedSender<String>>,
    ) -> Result<Outcome, DispatchError> {
        self.run_sharing(request, policy, deltas, None).await
    }

    /// [`Dispatcher::run`] for a request whose prompt starts with `prefix`, shared with
    /// other requests: placed where that prefix went before when no slower.
    #[instrument(skip_all, fields(request = %request.request_id.short(), model = %request.model.reference))]
    pub async fn run_sharing(
        &self,
        request: &InferRequest,
        policy: &Policy,
        deltas: Option<mpsc::UnboundedSender<String>>,
        prefix: Option<SharedPrefix>,
    ) -> Result<Outcome, DispatchError> {
        let prefix = prefix.as_ref();
        let mut exclude = Vec::new();
        let mut last = String::new();
        // Which copy of this request has streamed text to the client (none, primary,
        // hedge); per attempt, since a retry starts only before any text was sent.
        let owner = AtomicU8::new(NO_OWNER);
        for attempt in 1..=self.config.max_attempts {
            let (peer, addr, region, slots) = match self.choose(request, policy, &exclude, prefix) {
                Ok(c) => c,
                Err(e) if attempt == 1 => {
                    match self.after_breakers(request, policy, prefix).await {
                        Some(c) => c,
                        None => return Err(e),
                    }
                }
                Err(_) => break,
            };
            let started = Instant::now();
            let outcome = self
                .attempt_hedged(
                    request,
                    (policy, &exclude, prefix),
                    (peer, addr, region, slots),
                    deltas.as_ref(),
                    &owner,
                )
                .await;
            match outcome {
                Ok((((result, signed), concurrent), (winner, winner_addr), region, hedged)) => {
                    let ms = started.elapsed().as_secs_f64() * 1000.0;
                    self.observe(ms, result.usage.completion_tokens);
                    self.directory
                        .success(&winner, ms, result.usage.completion_tokens, concurrent);
                    let audit = self.maybe_audit(request, &result, winner);
                    self.countersign(winner, winner_addr, &result, &signed);
                    return Ok(Outcome {
                        audited: audit.is_some(),
                        audit,
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
                    if let Some(x) = prefix {
                        let key = Self::prefix_key(&request.model.digest, x);
                        let mut homes = self.homes.lock().unwrap_or_else(|p| p.into_inner());
                        homes.remove(key, &e.peer());
                    }
                    if let CallError::Remote { error, .. } = &e
                        && error.code == beacon_proto::DataErrorCode::BadRequest
                    {
                        return Err(DispatchError::Refused(error.message.clone()));
                    }
                    self.attempt_failed(&e);
                    last = e.to_string();
                    exclude.push(peer);
                    if e.peer() != peer {
                        // Both copies of a hedged attempt failed.
                        exclude.push(e.peer());
                    }
                    if owner.load(Ordering::Acquire) != NO_OWNER {
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

    /// One attempt on the chosen provider, hedged on a second one (placed as `placing`
    /// says, never on the first) when it straggles past the hedge delay and its stream has
    /// not begun: the answer, where it ran, its region, and whether a hedge was sent.
    async fn attempt_hedged(
        &self,
        request: &InferRequest,
        (policy, exclude, prefix): (&Policy, &[PeerId], Option<&SharedPrefix>),
        (peer, addr, region, slots): (PeerId, SocketAddr, String, u32),
        deltas: Option<&mpsc::UnboundedSender<String>>,
        owner: &AtomicU8,
    ) -> Result<(Answered, (PeerId, SocketAddr), String, bool), CallError> {
        let primary = self.attempt(
            peer,
            addr,
            slots,
            request,
            deltas.map(|tx| (tx, owner, PRIMARY)),
        );
        let Some(after) = self.hedge_after(request.sampling.max_tokens) else {
            return primary.await.map(|r| (r, (peer, addr), region, false));
        };
        tokio::pin!(primary);
        tokio::select! {
            r = &mut primary => return r.map(|r| (r, (peer, addr), region, false)),
            _ = tokio::time::sleep(after) => {}
        }
        let others = [exclude, &[peer]].concat();
        // A stream that has begun is not hedged: its text is the primary's.
        let second = match owner.load(Ordering::Acquire) {
            NO_OWNER => self.choose(request, policy, &others, prefix).ok(),
            _ => None,
        };
        let Some((p2, a2, r2, s2)) = second else {
            return primary.await.map(|r| (r, (peer, addr), region, false));
        };
        info!(first = %peer, second = %p2, "hedging a straggler");
        let second = self.attempt(p2, a2, s2, request, deltas.map(|tx| (tx, owner, HEDGE)));
        tokio::pin!(second);
        let (r, hedge_won) = self.race(primary.as_mut(), second, owner).await?;
        Ok(match hedge_won {
            true => (r, (p2, a2), r2, true),
            false => (r, (peer, addr), region, true),
        })
    }

    /// Sends the provider this router's countersignature of a verified result, in the
    /// background, so its receipt is backed by both sides. The provider's address is the
    /// one placement used; failures only cost the provider its half of the proof.
    fn countersign(
        &self,
        peer: PeerId,
        addr: SocketAddr,
        result: &InferResult,
        signed: &Signed<InferResult>,
    ) {
        let (client, result, signed) = (self.client.clone(), result.clone(), signed.clone());
        tokio::spawn(async move {
            let now = crate::directory::now_ms();
            if let Err(e) = client.countersign(peer, addr, &result, &signed, now).await {
                debug!(%peer, error = %e, "countersignature not delivered");
            }
        });
    }

    /// Decides, after the result is in, whether to audit it: a fresh draw from the
    /// operating system's CSPRNG against the provider's audit rate (higher on probation
    /// and as reputation falls), so nothing a provider sees tells it which answers will be
    /// audited. An audited result is re-scored in the background by auditors drawn at
    /// random among reputable providers of the same model digest (never by advertised
    /// speed). A failed audit counts against the provider only when a second, independent
    /// auditor agrees; an auditor outvoted by the others loses reputation itself.
    /// Returns where the outcome will appear, when an audit was scheduled.
    fn maybe_audit(
        &self,
        request: &InferRequest,
        result: &InferResult,
        peer: PeerId,
    ) -> Option<AuditHandle> {
        let tokens = result.token_ids.clone()?;
        let rate = self.directory.audit_rate(&peer, self.config.audit_rate);
        if rate <= 0.0 || unit_draw() >= rate {
            return None;
        }
        let audit = AuditRequest::of(request, result);
        if self.auditor(&audit.model.digest, &[peer]).is_none() {
            debug!("no second provider to audit with");
            return None;
        }
        let handle = AuditHandle::default();
        let outcome = handle.clone();
        let this = self.clone();
        let request_id = request.request_id;
        let output = result.output.clone();
        // Greedy tokens are judged against the argmax, sampled ones by replaying their
        // seed; a sampled result without a seed only on text, grammar and its end.
        let tolerance = if request.sampling.temperature <= 0.0 {
            Some(self.config.near_tie)
        } else if request.sampling.seed.is_some() {
            Some(self.config.sampled_tolerance)
        } else {
            None
        };
        tokio::spawn(async move {
            let model = audit.model.digest;
            this.run_audit(
                peer,
                (request_id, outcome),
                audit,
                tokens,
                output,
                tolerance,
            )
            .await;
            this.check_an_auditor(&model).await;
        });
        Some(handle)
    }

    /// Tests one reputable auditor of `model` with a reference result (a good one or a
    /// clear cheat, see [`Reference`]), sent as an ordinary audit: an auditor reputable
    /// for the first time is always checked ([`FIRST_REFERENCE_CHECKS`] times), the
    /// others now and then ([`REFERENCE_CHECK_SHARE`]).
    async fn check_an_auditor(&self, model: &Digest) {
        let candidates: Vec<(PeerId, SocketAddr, u64, bool)> = self
            .directory
            .views()
            .into_iter()
            .filter(|(v, _)| !v.quarantined && v.models.contains(model))
            .filter(|(v, _)| self.directory.reputable(&v.peer))
            .map(|(v, addr)| {
                let checks = self.directory.stats(&v.peer).reference_checks;
                (v.peer, addr, checks, self.directory.trusted(&v.peer))
            })
            .collect();
        // The operator's own auditors (`--trusted-provider`) skip the first checks; they
        // are checked now and then like the others.
        let unchecked: Vec<_> = candidates
            .iter()
            .filter(|c| c.2 < FIRST_REFERENCE_CHECKS && !c.3)
            .collect();
        let pool: Vec<_> = if !unchecked.is_empty() {
            unchecked
        } else if unit_draw() < REFERENCE_CHECK_SHARE {
            candidates.iter().collect()
        } else {
            return;
        };
        let Some(&&(target, addr, checks, _)) = pick(&pool) else {
            return;
        };
        // Two good results first, then two cheats, later either, evenly.
        let good = match checks {
            0 | 1 => true,
            2 | 3 => false,
            _ => unit_draw() < 0.5,
        };
        let reference = {
            let refs = self.references.lock().unwrap_or_else(|p| p.into_inner());
            let fits =
                |r: &&Reference| r.audit.model.digest == *model && !r.involved.contains(&target);
            let mut usable: Vec<&Reference> = refs
                .iter()
                .filter(fits)
                .filter(|r| r.good == good)
                .collect();
            if usable.is_empty() && !good {
                usable = refs.iter().filter(fits).collect();
            }
            let Some(r) = pick(&usable) else {
                return;
            };
            (*r).clone()
        };
        let mut request = reference.audit.clone();
        request.audit_id = Id::random();
        match self.client.audit(target, addr, &request).await {
            Ok(scored) => {
                self.audit_tokens.fetch_add(
                    u64::from(scored.prompt_tokens) + reference.tokens.len() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
                let v = scored.judge(
                    &reference.tokens,
                    &reference.output,
                    reference.tolerance,
                    self.config.audit_pass,
                );
                if v.passed == reference.good {
                    info!(auditor = %target, good = reference.good, agreement = v.agreement,
                          "auditor judged a reference result right");
                } else {
                    warn!(auditor = %target, good = reference.good, agreement = v.agreement,
                          reason = v.reason.as_deref().unwrap_or(""),
                          "auditor judged a reference result wrongly");
                }
                self.directory
                    .reference_checked(&target, v.passed, reference.good);
            }
            Err(e) => debug!(auditor = %target, error = %e, "reference check could not run"),
        }
    }

    /// A random auditor for `model` outside `exclude`: reputable providers first (past
    /// probation, not quarantined), anyone not quarantined when there are none.
    fn auditor(&self, model: &Digest, exclude: &[PeerId]) -> Option<(PeerId, SocketAddr)> {
        let candidates: Vec<(PeerId, SocketAddr, bool)> = self
            .directory
            .views()
            .into_iter()
            .filter(|(v, _)| !v.quarantined && v.models.contains(model))
            .filter(|(v, _)| !exclude.contains(&v.peer))
            .map(|(v, addr)| (v.peer, addr, self.directory.reputable(&v.peer)))
            .collect();
        let reputable: Vec<_> = candidates.iter().filter(|c| c.2).collect();
        let pool: Vec<_> = if reputable.is_empty() {
            candidates.iter().collect()
        } else {
            reputable
        };
        pick(&pool).map(|p| (p.0, p.1))
    }

    /// Runs one audit to a decision: up to three independent auditors, stopping as soon
    /// as two agree (or the first passes the result).
    /// `(request_id, handle)`: the audited request, and where its outcome goes.
    async fn run_audit(
        &self,
        peer: PeerId,
        (request_id, handle): (Id, AuditHandle),
        audit: AuditRequest,
        tokens: Vec<u32>,
        output: String,
        tolerance: Option<f32>,
    ) {
        let votes = self
            .collect_votes(peer, &audit, &tokens, &output, tolerance)
            .await;
        let passes = votes.iter().filter(|(_, v)| v.passed).count();
        let fails = votes.len() - passes;
        // A failure only newcomers voted for (no reputable provider existed to ask: two
        // cheaper models, or two colluders, can agree) convicts nobody; once providers have
        // a record, auditors are drawn among them and failures are decided by them (see
        // `convicting`).
        let decided = if passes > fails {
            Some(true)
        } else if fails > passes && self.convicting(&votes) {
            Some(false)
        } else {
            None
        };
        let Some(passed) = decided else {
            if !votes.is_empty() {
                info!(provider = %peer, passes, fails, "audit inconclusive: no second auditor agreed");
                self.directory.inconclusive(&peer);
            }
            return;
        };
        let clear_cheat = !passed
            && votes
                .iter()
                .filter(|(_, v)| !v.passed)
                .all(|(_, v)| v.hard || v.agreement < CLEAR_CHEAT_BELOW);
        if ((passed && passes >= 2) || clear_cheat) && tolerance.is_some() {
            let mut involved: Vec<PeerId> = votes.iter().map(|(a, _)| *a).collect();
            involved.push(peer);
            let mut refs = self.references.lock().unwrap_or_else(|p| p.into_inner());
            if refs.len() >= REFERENCES {
                refs.pop_front();
            }
            refs.push_back(Reference {
                good: passed,
                audit,
                tokens,
                output,
                tolerance,
                involved,
            });
        }
        self.record_audit(peer, passed, &votes, (request_id, handle));
    }

    /// Asks auditors until the votes decide: the first auditor passing an established
    /// provider, two agreeing, a failure that can convict, or four votes.
    async fn collect_votes(
        &self,
        peer: PeerId,
        audit: &AuditRequest,
        tokens: &[u32],
        output: &str,
        tolerance: Option<f32>,
    ) -> Vec<(PeerId, AuditVerdict)> {
        let mut votes: Vec<(PeerId, AuditVerdict)> = Vec::new();
        let mut asked = vec![peer];
        // On probation one auditor's pass is not enough: a colluding auditor could wave a
        // new identity through. Two must agree (when a second exists).
        let passes_needed = if self.directory.on_probation(&peer) {
            2
        } else {
            1
        };
        // Transport failures do not count as votes; a few are tolerated.
        for _ in 0..6 {
            let passes = votes.iter().filter(|(_, v)| v.passed).count();
            let fails = votes.len() - passes;
            // The first auditor passing an established provider settles it; otherwise two
            // must agree, and a failure must be one that can convict.
            if (votes.len() == 1 && passes == passes_needed)
                || passes >= 2
                || self.convicting(&votes)
                || votes.len() >= 4
            {
                break;
            }
            let Some((auditor, addr)) = self.auditor(&audit.model.digest, &asked) else {
                break;
            };
            // Two failures that cannot convict yet: only another reputable vote can change
            // that; a newcomer's would only spend tokens.
            if fails >= 2 && !self.directory.reputable(&auditor) {
                break;
            }
            asked.push(auditor);
            let mut request = audit.clone();
            request.audit_id = Id::random();
            match self.client.audit(auditor, addr, &request).await {
                Ok(scored) => {
                    self.audit_tokens.fetch_add(
                        u64::from(scored.prompt_tokens) + tokens.len() as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    let v = scored.judge(tokens, output, tolerance, self.config.audit_pass);
                    info!(provider = %peer, %auditor, agreement = v.agreement, passed = v.passed,
                          reason = v.reason.as_deref().unwrap_or(""), "audit vote");
                    votes.push((auditor, v));
                }
                Err(e) => debug!(%auditor, error = %e, "audit could not run"),
            }
        }
        votes
    }

    /// Whether the failing votes can convict: a reputable auditor's, or, when the failure
    /// is hard (evidence every honest auditor sees the same way), any auditor's once a
    /// reputable one agrees. A soft failure (argmax agreement below the bar) needs two
    /// reputable auditors: a near copy of the model (a Q3_K_M requantisation) passes
    /// enough audits to become reputable, and with a newcomer running an even cheaper copy
    /// it would otherwise convict honest providers on probation.
    fn convicting(&self, votes: &[(PeerId, AuditVerdict)]) -> bool {
        let fails: Vec<(bool, bool)> = votes
            .iter()
            .filter(|(_, v)| !v.passed)
            .map(|(a, v)| (self.directory.reputable(a), v.hard))
            .collect();
        convicts(&fails)
    }

    /// A decided audit: the provider's and the auditors' records, the counts, and the
    /// outcome for whoever holds the audited result's handle.
    fn record_audit(
        &self,
        peer: PeerId,
        passed: bool,
        votes: &[(PeerId, AuditVerdict)],
        (request_id, handle): (Id, AuditHandle),
    ) {
        // Failed on evidence no hardware noise explains, by every auditor that failed it.
        let hard = !passed && votes.iter().filter(|(_, v)| !v.passed).all(|(_, v)| v.hard);
        self.directory.audited(&peer, passed, hard);
        for (auditor, v) in votes {
            if v.passed != passed {
                warn!(%auditor, provider = %peer, "auditor outvoted");
                self.directory.outvoted(auditor, passed);
            } else {
                self.directory.vote_agreed(auditor, passed);
            }
        }
        let first = votes
            .iter()
            .find(|(_, v)| v.passed == passed)
            .map(|(a, v)| (*a, v.clone()));
        let Some((auditor, verdict)) = first else {
            return;
        };
        info!(provider = %peer, %auditor, passed, auditors = votes.len(), "audit");
        {
            let mut c = self.audit_counts.lock().unwrap_or_else(|p| p.into_inner());
            if passed {
                c.0 += 1;
            } else {
                c.1 += 1;
            }
        }
        let _ = handle.0.set(AuditOutcome {
            request_id,
            auditor: auditor.to_string(),
            passed,
            agreement: verdict.agreement,
            auditors: votes.len(),
            reason: if passed { None } else { verdict.reason },
        });
    }
}

/// Whether these failing votes (each: the auditor is reputable, the failure is hard) can
/// convict: two reputable ones, or, for a hard failure, one reputable beside any other.
fn convicts(fails: &[(bool, bool)]) -> bool {
    let reputable = fails.iter().filter(|(r, _)| *r).count();
    let hard = !fails.is_empty() && fails.iter().all(|(_, h)| *h);
    reputable >= 2 || (hard && reputable >= 1 && fails.len() >= 2)
}

/// An element drawn uniformly at random (the operating system's CSPRNG), if any.
fn pick<T>(items: &[T]) -> Option<&T> {
    if items.is_empty() {
        return None;
    }
    items.get((Id::random().0 % items.len() as u128) as usize)
}

/// A uniform draw in [0, 1) from the operating system's CSPRNG.
fn unit_draw() -> f64 {
    (Id::random().0 >> 75) as f64 / (1u64 << 53) as f64
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

#[cfg(test)]
mod tests {
    use super::*;
    use beacon_proto::identity::Keypair;
    use std::time::Duration;

    fn dispatcher() -> Dispatcher {
        let key = Keypair::generate();
        let client = DataClient::new(&key, "127.0.0.1:0".parse().unwrap()).unwrap();
        let live = Arc::new(std::sync::RwLock::new(
            beacon_net::directory::Directory::new(Duration::from_secs(60), Duration::from_secs(10)),
        ));
        Dispatcher::new(
            client,
            RouterDirectory::new(live, None),
            DispatchConfig::default(),
        )
    }

    /// The attack `attacks.rs` once hit: a Q3_K_M swapper that passed enough audits to be
    /// reputable and a newcomer running a Q2_K copy both fail an honest result on argmax
    /// agreement. The rule before (two failing votes, one of them reputable) convicted
    /// that; two reputable soft failures, or a hard one a reputable auditor confirms, still do.
    #[test]
    fn one_reputable_soft_failure_and_a_newcomer_convict_nobody() {
        // (reputable, hard) per failing vote.
        assert!(!convicts(&[(true, false), (false, false)]));
        assert!(!convicts(&[(false, false), (false, false)]));
        assert!(!convicts(&[(false, true), (false, true)]));
        assert!(!convicts(&[(true, true)]));
        assert!(convicts(&[(true, false), (true, false)]));
        assert!(convicts(&[(true, true), (false, true)]));
        assert!(!convicts(&[(true, true), (false, false)]));
    }

    #[test]
    fn prefix_homes_stay_bounded_and_forget_failed_providers() {
        let mut homes = Homes::default();
        let peers: Vec<PeerId> = (0..6).map(|_| Keypair::generate().peer_id()).collect();
        for p in &peers {
            homes.add(1, *p);
        }
        // The latest few providers of a prefix, newest last.
        assert_eq!(homes.get(1), peers[6 - HOMES_PER_PREFIX..].to_vec());
        homes.remove(1, &peers[5]);
        assert_eq!(homes.get(1), peers[6 - HOMES_PER_PREFIX..5].to_vec());
        // Many prefixes: memory stays bounded and the recent ones are kept.
        for key in 0..3 * PREFIX_HOMES as u64 {
            homes.add(key + 10, peers[0]);
            assert!(homes.map.len() <= PREFIX_HOMES);
        }
        assert_eq!(homes.get(3 * PREFIX_HOMES as u64 + 9), vec![peers[0]]);
        // Two prompts that only differ in where one part ends are different prefixes.
        assert_ne!(
            SharedPrefix::of(&["ab", "c"]),
            SharedPrefix::of(&["a", "bc"])
        );
        assert_eq!(SharedPrefix::of(&["ab", "cd"]).tokens, 1);
    }

    /// Attack (h)'s other half: slots that change while work is in flight never let more
    /// than the current slots run at once. Shrinking below what is in use is paid back as
    /// permits return; growing again first cancels what is still owed.
    #[tokio::test]
    async fn slots_that_change_in_flight_never_exceed_the_bound() {
        let d = dispatcher();
        let p = Keypair::generate().peer_id();
        let take = |slots| {
            d.limit(p, slots)
                .try_acquire_owned()
                .expect("a free permit")
        };
        let held: Vec<_> = (0..4).map(|_| take(4)).collect();
        assert!(d.limit(p, 4).try_acquire_owned().is_err());
        // Down to 2 with 4 in use: owes 2. Up to 3: one of those is cancelled, none added.
        let _ = d.limit(p, 2);
        let _ = d.limit(p, 3);
        assert_eq!(d.free_slots(&p), 0);
        // The first return is forgotten (owed), the next ones come back: 3 slots, 2 in use.
        let mut held = held.into_iter();
        d.release(p, held.next().unwrap());
        assert_eq!(d.free_slots(&p), 0);
        d.release(p, held.next().unwrap());
        assert_eq!(d.free_slots(&p), 1);
        // Down to 1 with 2 in use: the free one is forgotten and one more owed.
        let _ = d.limit(p, 1);
        assert_eq!(d.free_slots(&p), 0);
        d.release(p, held.next().unwrap());
        assert_eq!(d.free_slots(&p), 0);
        // Up to 5 with 1 in use: 4 free, and 5 once it is back.
        let _ = d.limit(p, 5);
        assert_eq!(d.free_slots(&p), 4);
        d.release(p, held.next().unwrap());
        assert_eq!(d.free_slots(&p), 5);
        let _ = take(5);
    }
}
