//! The messages of the Beacon protocol: provider adverts (gossip), inference requests and
//! signed results (data plane), audits (teacher-forced re-scoring), plus the pure checks a
//! receiver runs on them before trusting anything they say.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::codec::Wire;
use crate::signed::{Domain, Signed};
use crate::{Digest, PeerId, ProtoError};

/// Gossipsub topic that carries signed [`ProviderAdvert`]s.
pub const ADVERT_TOPIC: &str = "beacon/adverts/1";
/// Kademlia protocol name of the Beacon DHT.
pub const KAD_PROTOCOL: &str = "/beacon/kad/1";
/// Data-plane protocol id (QUIC ALPN).
pub const INFER_PROTOCOL: &str = "/beacon/infer/1";

/// 128-bit random identifier of a request, job or audit; shown as 32 hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Id(pub u128);

impl Id {
    /// A fresh random id.
    pub fn random() -> Self {
        let mut bytes = [0u8; 16];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
        Id(u128::from_le_bytes(bytes))
    }
    /// First 8 hex characters, for log spans.
    pub fn short(&self) -> String {
        format!("{:032x}", self.0)[..8].to_string()
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Id({})", self.short())
    }
}

// ---------------------------------------------------------------------------------------
// Adverts

/// One GPU (or other accelerator) of a provider.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Accelerator {
    pub vendor: String,
    pub name: String,
    pub memory_total: u64,
    pub memory_free: u64,
    pub compute_capability: Option<String>,
    pub driver: Option<String>,
    pub utilisation_pct: Option<u8>,
}

/// CPU and memory of a provider; always reported, GPU or not.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    pub cpu_model: String,
    pub cores: u32,
    pub ram_total: u64,
    pub ram_free: u64,
    pub cpu_flags: Vec<String>,
}

/// A model in a provider's store, identified by its manifest digest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CachedModel {
    pub references: Vec<String>,
    pub digest: Digest,
    pub size: u64,
    pub quantization: String,
    pub parameters: String,
    pub architecture: String,
    pub context_size: Option<u32>,
}

/// Parallel capacity of a provider right now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slots {
    pub total: u32,
    pub busy: u32,
    pub queued: u32,
}

/// Measured decode throughput of one model on this provider.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    pub model: Digest,
    pub tokens_per_second: f32,
}

/// Optional price, in millionths of a currency unit per million tokens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Price {
    pub currency: String,
    pub micros_per_mtok_prompt: u64,
    pub micros_per_mtok_completion: u64,
}

/// What a provider tells the network about itself; gossiped signed, small.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProviderAdvert {
    pub peer_id: PeerId,
    pub region: String,
    /// libp2p multiaddrs, as strings.
    pub listen_addrs: Vec<String>,
    /// QUIC data-plane socket address (`host:port`).
    pub data_plane: Option<String>,
    pub version: String,
    pub accelerators: Vec<Accelerator>,
    pub host: HostInfo,
    pub engines: Vec<String>,
    pub models: Vec<CachedModel>,
    pub slots: Slots,
    pub throughput: Vec<Throughput>,
    pub price: Option<Price>,
    /// Strictly increasing per provider; a receiver drops anything not newer than it has.
    pub seq: u64,
    /// Milliseconds since the Unix epoch when the advert was made.
    pub timestamp_ms: u64,
}

impl Wire for ProviderAdvert {
    const KIND: &'static str = "provider advert";
    const MAX_BYTES: usize = 60 * 1024;
}
impl Domain for ProviderAdvert {
    const DOMAIN: &'static str = "beacon/advert/v1";
}

/// Freshness rules for adverts.
#[derive(Clone, Copy, Debug)]
pub struct AdvertPolicy {
    /// Older adverts are stale.
    pub max_age_ms: u64,
    /// Adverts this far in the future are refused (clock skew allowance).
    pub max_skew_ms: u64,
}

impl Default for AdvertPolicy {
    fn default() -> Self {
        AdvertPolicy {
            max_age_ms: 120_000,
            max_skew_ms: 30_000,
        }
    }
}

/// Longest region name.
pub const MAX_REGION_LEN: usize = 64;

/// Everything a receiver checks before it believes or forwards an advert: the signature,
/// that the signer is the peer it came from and the peer it describes, freshness, a newer
/// sequence number than `last_seq`, and sane field sizes.
pub fn validate_advert(
    signed: &Signed<ProviderAdvert>,
    source: &PeerId,
    now_ms: u64,
    last_seq: Option<u64>,
    policy: AdvertPolicy,
) -> Result<ProviderAdvert, ProtoError> {
    let advert = signed.verify_from(source)?;
    let reject = |reason: String| ProtoError::Rejected {
        kind: ProviderAdvert::KIND,
        reason,
    };
    if &advert.peer_id != source {
        return Err(reject(format!(
            "describes {} but was signed by {source}",
            advert.peer_id
        )));
    }
    let outdated = |reason: String| ProtoError::Outdated {
        kind: ProviderAdvert::KIND,
        reason,
    };
    if advert.timestamp_ms.saturating_add(policy.max_age_ms) < now_ms {
        return Err(outdated(format!(
            "stale: made {} ms ago",
            now_ms.saturating_sub(advert.timestamp_ms)
        )));
    }
    if advert.timestamp_ms > now_ms.saturating_add(policy.max_skew_ms) {
        return Err(reject("timestamp is in the future".into()));
    }
    if let Some(last) = last_seq
        && advert.seq <= last
    {
        return Err(outdated(format!(
            "sequence {} is not newer than {last}",
            advert.seq
        )));
    }
    if advert.region.is_empty() || advert.region.len() > MAX_REGION_LEN {
        return Err(reject(format!(
            "region must be 1..={MAX_REGION_LEN} characters"
        )));
    }
    if advert.slots.busy > advert.slots.total.saturating_mul(4) + 1024 {
        return Err(reject("implausible slot counts".into()));
    }
    Ok(advert)
}

// ---------------------------------------------------------------------------------------
// Inference

/// A model as a request names it: the reference for humans, the manifest digest for trust.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModelSpec {
    pub reference: String,
    pub digest: Digest,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

/// Sampling parameters; `temperature == 0` means greedy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: u32,
    pub min_p: f32,
    pub max_tokens: u32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            max_tokens: 256,
            seed: None,
            stop: Vec::new(),
        }
    }
}

/// Most stop strings in one request.
pub const MAX_STOPS: usize = 16;
/// Longest stop string, in bytes (each is searched for after every token).
pub const MAX_STOP_BYTES: usize = 256;
/// Most tokens one request may ask for.
pub const MAX_COMPLETION_TOKENS: u32 = 32_768;
/// Most messages in one request.
pub const MAX_MESSAGES: usize = 4096;

/// A request field out of bounds: the field, and what it must be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: &'static str,
    pub reason: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.field, self.reason)
    }
}

impl Sampling {
    /// The one check of sampling parameters, applied by every receiver: a node's HTTP API,
    /// its data plane (where any peer may send a request) and the router. NaN and
    /// infinities fail every range.
    pub fn check(&self) -> Result<(), FieldError> {
        let bad = |field, reason: &str| {
            Err(FieldError {
                field,
                reason: reason.to_string(),
            })
        };
        if !(0.0..=2.0).contains(&self.temperature) {
            return bad("temperature", "must be between 0 and 2");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", "must be between 0 and 1");
        }
        if self.max_tokens == 0 || self.max_tokens > MAX_COMPLETION_TOKENS {
            return bad(
                "max_tokens",
                &format!("must be 1..={MAX_COMPLETION_TOKENS}"),
            );
        }
        if self.stop.len() > MAX_STOPS {
            return bad("stop", &format!("must have at most {MAX_STOPS} strings"));
        }
        if self.stop.iter().any(|s| s.len() > MAX_STOP_BYTES) {
            return bad(
                "stop",
                &format!("strings must be at most {MAX_STOP_BYTES} bytes each"),
            );
        }
        Ok(())
    }
}

/// One subtask for a provider.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InferRequest {
    pub request_id: Id,
    pub job_id: Option<Id>,
    pub model: ModelSpec,
    pub messages: Vec<ChatMessage>,
    /// A raw text prompt (`/v1/completions`), given to the model as it is instead of
    /// `messages` rendered with the model's chat template; `messages` is then empty.
    pub prompt: Option<String>,
    pub sampling: Sampling,
    /// JSON schema (as JSON text) the output must satisfy.
    pub json_schema: Option<String>,
    /// Milliseconds since the Unix epoch after which the answer is useless.
    pub deadline_ms: Option<u64>,
    /// Return the generated token ids, so the result can be audited.
    pub return_tokens: bool,
}

/// At most [`MAX_MESSAGES`] messages, or a text prompt and no messages.
fn check_prompt(messages: &[ChatMessage], prompt: &Option<String>) -> Result<(), FieldError> {
    if messages.len() > MAX_MESSAGES {
        return Err(FieldError {
            field: "messages",
            reason: format!("must be at most {MAX_MESSAGES}"),
        });
    }
    if prompt.is_some() && !messages.is_empty() {
        return Err(FieldError {
            field: "prompt",
            reason: "a request has messages or a prompt, not both".into(),
        });
    }
    Ok(())
}

impl Wire for InferRequest {
    const KIND: &'static str = "infer request";
    const MAX_BYTES: usize = 8 << 20;
}

impl InferRequest {
    /// Bounds a provider checks before any work: its sampling, its message count, and
    /// messages or a prompt, not both.
    pub fn check(&self) -> Result<(), FieldError> {
        check_prompt(&self.messages, &self.prompt)?;
        self.sampling.check()
    }

    /// Digest of the canonical encoding: what a result must name to answer this request.
    pub fn digest(&self) -> Result<Digest, ProtoError> {
        Ok(Digest::of(&self.encode()?))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinishReason {
    Stop,
    Length,
    Cancelled,
    Error,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens served from a shared KV prefix rather than prefilled.
    pub cached_prompt_tokens: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    pub queue_ms: u32,
    pub prefill_ms: u32,
    pub decode_ms: u32,
}

/// A provider's answer to one [`InferRequest`]; travels signed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InferResult {
    pub request_id: Id,
    pub request_digest: Digest,
    pub model_digest: Digest,
    pub output: String,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub timings: Timings,
    pub token_ids: Option<Vec<u32>>,
}

impl Wire for InferResult {
    const KIND: &'static str = "infer result";
    const MAX_BYTES: usize = 4 << 20;
}
impl Domain for InferResult {
    const DOMAIN: &'static str = "beacon/result/v1";
}

/// Checks a signed result against what was asked of which peer: signature, signer, request
/// id, request digest, model digest, and the token ids when they were asked for.
pub fn verify_result(
    signed: &Signed<InferResult>,
    expected_peer: &PeerId,
    request: &InferRequest,
) -> Result<InferResult, ProtoError> {
    let result = signed.verify_from(expected_peer)?;
    let reject = |reason: String| ProtoError::Rejected {
        kind: InferResult::KIND,
        reason,
    };
    if result.request_id != request.request_id {
        return Err(reject(format!(
            "answers request {} instead of {}",
            result.request_id, request.request_id
        )));
    }
    let digest = request.digest()?;
    if result.request_digest != digest {
        return Err(reject(format!(
            "request digest {} does not match {digest}",
            result.request_digest
        )));
    }
    if result.model_digest != request.model.digest {
        return Err(reject(format!(
            "ran model {} instead of {}",
            result.model_digest, request.model.digest
        )));
    }
    // Text comes from tokens: an answer with text but no generated tokens cannot be
    // audited and is refused outright (an empty answer is fine, and audited like any other).
    if result.usage.completion_tokens == 0 && !result.output.is_empty() {
        return Err(reject(format!(
            "{} bytes of text from 0 generated tokens",
            result.output.len()
        )));
    }
    match (&result.token_ids, request.return_tokens) {
        (None, true) => return Err(reject("token ids were requested but not returned".into())),
        (Some(ids), _) if ids.len() != result.usage.completion_tokens as usize => {
            return Err(reject(format!(
                "{} token ids for {} completion tokens",
                ids.len(),
                result.usage.completion_tokens
            )));
        }
        _ => {}
    }
    Ok(result)
}

// ---------------------------------------------------------------------------------------
// Audits

/// Re-score a claimed output by teacher-forced prefill on another provider.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRequest {
    pub audit_id: Id,
    pub model: ModelSpec,
    /// The prompt exactly as the audited request sent it (rendered with the same template).
    pub messages: Vec<ChatMessage>,
    /// The audited request's raw text prompt, when it had one instead of messages.
    pub prompt: Option<String>,
    /// The token ids the audited provider claims it generated.
    pub claimed_tokens: Vec<u32>,
    /// The JSON schema the audited output was constrained by, so the auditor scores under
    /// the same grammar (a constrained argmax differs from the model's raw argmax).
    pub json_schema: Option<String>,
    /// The audited request's sampling: its stop strings (the auditor turns the claimed
    /// tokens into text exactly as a provider does, stop strings cut, so the text can be
    /// compared) and, when it has a temperature, the seed and filters to replay the
    /// sampling with ([`crate::sampling`]).
    pub sampling: Sampling,
    /// How the audited result says generation ended. `Stop` without a stop string in the
    /// text means the model chose to end: the auditor scores that end-of-generation too,
    /// so a truncated or empty answer is audited like any other.
    pub finish_reason: FinishReason,
}

impl Wire for AuditRequest {
    const KIND: &'static str = "audit request";
    const MAX_BYTES: usize = 12 << 20;
}

impl AuditRequest {
    /// The bounds of the request it audits, and no more claimed tokens than one may ask
    /// for.
    pub fn check(&self) -> Result<(), FieldError> {
        check_prompt(&self.messages, &self.prompt)?;
        if self.claimed_tokens.len() > MAX_COMPLETION_TOKENS as usize {
            return Err(FieldError {
                field: "claimed_tokens",
                reason: format!("must be at most {MAX_COMPLETION_TOKENS}"),
            });
        }
        self.sampling.check()
    }

    /// The audit of `result` as the answer to `request`, with a fresh audit id: the same
    /// prompt, grammar and sampling, the claimed tokens and how generation ended.
    pub fn of(request: &InferRequest, result: &InferResult) -> AuditRequest {
        AuditRequest {
            audit_id: Id::random(),
            model: request.model.clone(),
            messages: request.messages.clone(),
            prompt: request.prompt.clone(),
            claimed_tokens: result.token_ids.clone().unwrap_or_default(),
            json_schema: request.json_schema.clone(),
            sampling: request.sampling.clone(),
            finish_reason: result.finish_reason,
        }
    }

    pub fn digest(&self) -> Result<Digest, ProtoError> {
        Ok(Digest::of(&self.encode()?))
    }
}

/// How the auditing model scores one claimed token.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenScore {
    /// Log-probability of the claimed token.
    pub logprob: f32,
    /// The auditor's most likely token at this position.
    pub argmax: u32,
    /// Its log-probability.
    pub argmax_logprob: f32,
}

/// The auditor's scores for every claimed token; travels signed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditResult {
    pub audit_id: Id,
    pub request_digest: Digest,
    pub model_digest: Digest,
    pub prompt_tokens: u32,
    pub scores: Vec<TokenScore>,
    /// Digest of the text the claimed tokens decode to (stop strings applied): what the
    /// audited provider's `output` must be.
    pub output_digest: Digest,
    /// The auditor's score for ending generation after the claimed tokens (the most
    /// likely end-of-generation token), when the result claims the model stopped by
    /// itself; `None` when a stop string or the token budget ended it.
    pub end: Option<TokenScore>,
}

impl Wire for AuditResult {
    const KIND: &'static str = "audit result";
    const MAX_BYTES: usize = 4 << 20;
}
impl Domain for AuditResult {
    const DOMAIN: &'static str = "beacon/audit/v1";
}

/// A summary of an audit, from which the router decides pass or fail.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AuditSummary {
    /// Positions judged: the claimed tokens, plus the end of generation when scored.
    pub tokens: usize,
    /// Claimed token is the auditor's argmax.
    pub greedy_matches: usize,
    /// Not the argmax, but within `near_tie` nats of it (hardware noise).
    pub near_ties: usize,
    pub mean_logprob: f32,
}

impl AuditResult {
    /// Counts argmax agreement, treating a claimed token within `near_tie` nats of the
    /// argmax as a tie (different hardware may break near-ties differently).
    pub fn summarize(&self, claimed: &[u32], near_tie: f32) -> AuditSummary {
        let mut greedy_matches = 0;
        let mut near_ties = 0;
        let mut sum = 0.0f32;
        for (score, &token) in self.scores.iter().zip(claimed) {
            if score.argmax == token {
                greedy_matches += 1;
            } else if score.argmax_logprob - score.logprob <= near_tie {
                near_ties += 1;
            }
            sum += score.logprob;
        }
        let mut tokens = self.scores.len().min(claimed.len());
        if let Some(end) = &self.end {
            // The claimed "token" here is the end of generation: it agrees when ending is
            // the auditor's choice too, or within `near_tie` of it.
            tokens += 1;
            if end.argmax_logprob - end.logprob <= 0.0 {
                greedy_matches += 1;
            } else if end.argmax_logprob - end.logprob <= near_tie {
                near_ties += 1;
            }
            sum += end.logprob;
        }
        AuditSummary {
            tokens,
            greedy_matches,
            near_ties,
            mean_logprob: if tokens == 0 {
                0.0
            } else {
                sum / tokens as f32
            },
        }
    }
}

/// What an audit says about a result.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditVerdict {
    pub passed: bool,
    /// Share of judged positions where the claimed token agrees with the auditor
    /// (1.0 when agreement is not judged).
    pub agreement: f64,
    /// Why it failed, in words.
    pub reason: Option<String>,
    /// It failed on evidence no hardware difference explains (text that is not what the
    /// tokens decode to, a token the grammar forbids, unscored tokens), not on argmax
    /// agreement.
    pub hard: bool,
}

impl AuditResult {
    /// Judges a result against this audit: the text must be exactly what the claimed
    /// tokens decode to, every claimed token must have been scored, and none may be one
    /// the output grammar forbids. With a `tolerance`, at least `pass` of its positions
    /// must also agree with the auditor: the claimed token is the auditor's choice, or
    /// within `tolerance` of it (in logits: from the argmax for a greedy result, from the
    /// replayed seeded choice for a sampled one, see [`crate::sampling`]). Hardware and batch shapes move logits a little, hence the tolerance. Without
    /// one (a sampled result with no seed to replay) agreement is not judged.
    pub fn judge(
        &self,
        claimed: &[u32],
        output: &str,
        tolerance: Option<f32>,
        pass: f64,
    ) -> AuditVerdict {
        let fail = |agreement: f64, reason: String| AuditVerdict {
            passed: false,
            agreement,
            reason: Some(reason),
            hard: true,
        };
        if Digest::of(output.as_bytes()) != self.output_digest {
            return fail(0.0, "the text is not what its tokens decode to".into());
        }
        if self.scores.len() != claimed.len() {
            return fail(
                0.0,
                format!(
                    "the auditor scored {} of {} tokens",
                    self.scores.len(),
                    claimed.len()
                ),
            );
        }
        if self
            .scores
            .iter()
            .chain(self.end.iter())
            .any(|s| s.logprob == f32::MIN)
        {
            return fail(0.0, "a token the output grammar forbids".into());
        }
        let Some(near_tie) = tolerance else {
            return AuditVerdict {
                passed: true,
                agreement: 1.0,
                reason: None,
                hard: false,
            };
        };
        let s = self.summarize(claimed, near_tie);
        let agreement = if s.tokens == 0 {
            1.0
        } else {
            (s.greedy_matches + s.near_ties) as f64 / s.tokens as f64
        };
        AuditVerdict {
            passed: agreement >= pass,
            agreement,
            reason: (agreement < pass).then(|| {
                format!(
                    "{} of {} positions agree with the auditor",
                    s.greedy_matches + s.near_ties,
                    s.tokens
                )
            }),
            hard: false,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Data plane

/// What a client sends on a fresh data-plane stream (one per subtask).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum DataRequest {
    Infer(InferRequest),
    Audit(AuditRequest),
    /// The requester's countersignature of a result it verified, for the provider to
    /// keep beside its receipt.
    Countersign(Signed<Countersignature>),
}

impl Wire for DataRequest {
    const KIND: &'static str = "data-plane request";
    const MAX_BYTES: usize = 12 << 20;
}

/// Why a provider refused or failed a data-plane request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataErrorCode {
    /// The request is malformed or asks for something impossible; do not retry as is.
    BadRequest,
    /// The provider does not have the model digest.
    ModelNotFound,
    /// Queue full or deadline cannot be met; retry elsewhere or after `retry_after_ms`.
    Busy,
    /// The deadline passed before the work could finish.
    DeadlineExceeded,
    /// Something failed on the provider.
    Internal,
}

/// A refusal or failure, with a human-readable reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataError {
    pub code: DataErrorCode,
    pub message: String,
    pub retry_after_ms: Option<u64>,
}

/// What a provider sends back on a data-plane stream: any number of `Delta`s, then exactly
/// one of `Result`, `Audit`, `Stored` or `Error`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum DataFrame {
    /// Newly generated text.
    Delta(String),
    Result(Signed<InferResult>),
    Audit(Signed<AuditResult>),
    Error(DataError),
    /// A countersignature was checked and stored.
    Stored,
}

impl Wire for DataFrame {
    const KIND: &'static str = "data-plane frame";
    const MAX_BYTES: usize = 5 << 20;
}

// ---------------------------------------------------------------------------------------
// Accounting

/// A provider's record of one served request, kept signed in its ledger: who asked, what
/// was answered (digest of the signed result's payload), with which model, at what cost.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    pub request_id: Id,
    pub job_id: Option<Id>,
    pub requester: PeerId,
    pub request_digest: Digest,
    pub result_digest: Digest,
    pub model_digest: Digest,
    pub usage: Usage,
    pub timings: Timings,
    pub finished_ms: u64,
}

impl Wire for Receipt {
    const KIND: &'static str = "receipt";
    const MAX_BYTES: usize = 4 * 1024;
}
impl Domain for Receipt {
    const DOMAIN: &'static str = "beacon/receipt/v1";
}

/// The requester's half of a receipt: it verified the provider's result (the digest of the
/// signed result's payload, as in the provider's [`Receipt`]) for this usage. Signed by the
/// requester and kept by the provider, so both sides hold proof of the work for settlement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Countersignature {
    pub request_id: Id,
    pub provider: PeerId,
    pub result_digest: Digest,
    pub model_digest: Digest,
    pub usage: Usage,
    /// Milliseconds since the Unix epoch when the requester verified the result.
    pub verified_ms: u64,
}

impl Wire for Countersignature {
    const KIND: &'static str = "countersignature";
    const MAX_BYTES: usize = 1024;
}
impl Domain for Countersignature {
    const DOMAIN: &'static str = "beacon/countersignature/v1";
}
