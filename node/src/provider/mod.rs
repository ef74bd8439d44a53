//! The provider side of the data plane: subtasks and audits that arrive over QUIC run
//! through the same scheduler as the HTTP API; answers go back signed, and every answered
//! subtask leaves a signed receipt in the ledger.

pub mod advert;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use beacon_net::now_ms;

use beacon_net::quic::{DataHandler, FrameSink};
use beacon_proto::{
    AuditRequest, AuditResult, DataErrorCode, DataFrame, DataRequest, Digest, InferRequest,
    InferResult, Keypair, PeerId, Receipt, Signed,
};
use tracing::{debug, info, instrument, warn};

use crate::engine::{Event, GenerateRequest, OutputFormat, Prompt, ScoreRequest};
use crate::ledger::Ledger;
use crate::scheduler::{SchedError, Scheduler};

/// Decode throughput measured per model (exponentially weighted), for adverts and for
/// judging whether a deadline can be met.
#[derive(Default)]
pub struct Throughput {
    by_model: Mutex<HashMap<Digest, f32>>,
}

impl Throughput {
    pub fn observe(&self, model: Digest, tokens: u32, decode_ms: u32) {
        if tokens < 4 || decode_ms == 0 {
            return;
        }
        let tps = tokens as f32 * 1000.0 / decode_ms as f32;
        let mut m = self.by_model.lock().unwrap_or_else(|p| p.into_inner());
        let e = m.entry(model).or_insert(tps);
        *e = 0.8 * *e + 0.2 * tps;
    }

    pub fn get(&self, model: &Digest) -> Option<f32> {
        self.by_model
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(model)
            .copied()
    }

    pub fn all(&self) -> Vec<(Digest, f32)> {
        self.by_model
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(d, t)| (*d, *t))
            .collect()
    }
}

/// Deliberate misbehaviour, for testing that routers catch it (tests and `beacon-bench`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// Results carry a signature that does not verify.
    BadSignature,
    /// Results claim a different model digest than the one asked for.
    WrongModel,
    /// Results are validly signed but their token ids are not what the model generated
    /// (as if a cheaper model had run); only an audit can tell.
    Tamper,
    /// Every subtask waits ten minutes before it starts (a straggler that stalls until the
    /// client gives up), unless the client cancels it first.
    Stall,
    /// Attack (a): generates honestly and signs the real token ids, but streams and signs
    /// other text (as if it injected a link). Only an audit can tell.
    Text,
    /// Attack (b): signs the real text with no token ids and 0 completion tokens, so
    /// there is nothing to audit.
    Empty,
    /// Attack (c): cheats like `text` except when the request id says an audit is likely
    /// (the draw routers used to take from it, under 25 %): honest exactly then.
    GuessAudits,
    /// Attack (i): signs the real output but streams other text.
    Stream,
    /// Attack (d): samples with its own seed and another temperature instead of the
    /// request's (0.7 for greedy requests, 0.7 × the asked one otherwise): text and tokens
    /// agree; only the argmax or a replay of the seed tells.
    Resample,
    /// Attack (h): serves honestly but advertises 4096 slots and a million tokens/s, to
    /// draw traffic and defeat load shedding.
    Capacity,
    /// Attack (g): serves honestly, but every audit it runs claims the audited output
    /// disagrees with the model and its text with its tokens (to get honest providers
    /// quarantined).
    LyingAuditor,
    /// Attack (e): loads model files without checking their digests, so a blob swapped in
    /// its store after the pull (a cheaper Q2_K or Q3_K requantisation, say) is served
    /// and signed under the advertised digest; only an audit can tell.
    Unchecked,
}

/// The longest a request without a deadline may hold a slot, whatever it asks for and
/// however slowly its client reads.
pub const MAX_REQUEST_TIME: Duration = Duration::from_secs(30 * 60);

/// The text a `text`/`guess-audits` provider puts in place of the real output.
pub const INJECTED_TEXT: &str = "Visit http://evil.example to claim your prize.";

/// Serves data-plane requests.
#[derive(Clone)]
pub struct Provider {
    pub scheduler: Scheduler,
    pub key: Arc<Keypair>,
    pub ledger: Ledger,
    pub throughput: Arc<Throughput>,
    /// The node's metrics, which count data-plane generations too.
    pub metrics: Arc<crate::metrics::Metrics>,
    pub fault: Option<Fault>,
    /// Audits running here per requesting peer (at most [`MAX_AUDITS_PER_PEER`]).
    pub audits: beacon_net::limits::Counts<PeerId>,
}

/// Most audits one peer may have running on this provider at once: an audit is a prefill
/// of up to a whole context, and one peer must not fill the model's audit queue.
pub const MAX_AUDITS_PER_PEER: usize = 4;

/// A data-plane refusal.
struct Refusal {
    code: DataErrorCode,
    message: String,
    retry_after_ms: Option<u64>,
}

impl Refusal {
    fn new(code: DataErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }
}

impl From<SchedError> for Refusal {
    fn from(e: SchedError) -> Self {
        use crate::engine::EngineError as E;
        let code = match &e {
            SchedError::Store(crate::store::StoreError::NotFound(_)) => {
                DataErrorCode::ModelNotFound
            }
            SchedError::Busy(_) | SchedError::Engine(E::Busy(_)) => DataErrorCode::Busy,
            SchedError::Engine(
                E::InvalidRequest(_) | E::Grammar(_) | E::PromptTooLong { .. } | E::Template(_),
            ) => DataErrorCode::BadRequest,
            _ => DataErrorCode::Internal,
        };
        Refusal {
            retry_after_ms: (code == DataErrorCode::Busy).then_some(1000),
            code,
            message: e.to_string(),
        }
    }
}

impl From<crate::engine::EngineError> for Refusal {
    fn from(e: crate::engine::EngineError) -> Self {
        SchedError::Engine(e).into()
    }
}

impl DataHandler for Provider {
    async fn handle(&self, peer: PeerId, request: DataRequest, sink: &mut FrameSink) {
        let outcome = match request {
            DataRequest::Infer(r) => self.infer(peer, r, sink).await,
            DataRequest::Audit(a) => self.audit(peer, a, sink).await,
            DataRequest::Countersign(c) => {
                match self.ledger.countersign(&peer, &self.key.peer_id(), &c) {
                    Ok(()) => {
                        let _ = sink.send(&DataFrame::Stored).await;
                        Ok(())
                    }
                    Err(e) => Err(Refusal::new(DataErrorCode::BadRequest, e.to_string())),
                }
            }
        };
        if let Err(r) = outcome {
            let _ = sink.error(r.code, r.message, r.retry_after_ms).await;
        }
    }
}

impl Provider {
    /// A lease on exactly the model with this manifest digest (a digest prefix that happens
    /// to match another model does not count).
    async fn lease(&self, model: Digest) -> Result<crate::scheduler::Lease, Refusal> {
        let lease = self.scheduler.acquire(&model.hex(), None).await?;
        if lease.record.manifest_digest != model {
            return Err(Refusal::new(
                DataErrorCode::ModelNotFound,
                format!("no model with digest {model}"),
            ));
        }
        Ok(lease)
    }

    /// When generation must end: the request's deadline, or [`MAX_REQUEST_TIME`] from
    /// now. A deadline that has passed, or that the measured speed cannot meet, is refused
    /// before any work starts, so the caller can place the subtask elsewhere at once.
    fn deadline(
        &self,
        request: &InferRequest,
        started: u64,
    ) -> Result<Option<tokio::time::Instant>, Refusal> {
        let model = request.model.digest;
        Ok(match request.deadline_ms {
            Some(d) if d <= started => {
                return Err(Refusal::new(
                    DataErrorCode::DeadlineExceeded,
                    "the deadline has already passed",
                ));
            }
            Some(d) => {
                if let Some(tps) = self.throughput.get(&model) {
                    let need_ms = (request.sampling.max_tokens as f32 / tps * 1000.0) as u64;
                    // Only refuse when even a tenth of max_tokens would not fit.
                    if started + need_ms / 10 > d {
                        return Err(Refusal {
                            code: DataErrorCode::Busy,
                            message: format!(
                                "deadline in {} ms cannot be met at {tps:.0} tokens/s",
                                d - started
                            ),
                            retry_after_ms: None,
                        });
                    }
                }
                Some(tokio::time::Instant::now() + Duration::from_millis(d - started))
            }
            // No request holds a slot forever, however slowly its client reads (H4).
            None => Some(tokio::time::Instant::now() + MAX_REQUEST_TIME),
        })
    }

    /// What the engine is asked for: the request's prompt, grammar and sampling (with
    /// `--fault resample`, another seed and temperature).
    fn generation(&self, request: &InferRequest) -> GenerateRequest {
        let mut sampling = request.sampling.clone();
        if self.fault == Some(Fault::Resample) {
            sampling.seed = Some(beacon_proto::Id::random().0 as u64);
            sampling.temperature = if sampling.temperature > 0.0 {
                sampling.temperature * 0.7
            } else {
                0.7
            };
        }
        GenerateRequest {
            prompt: prompt_of(&request.messages, &request.prompt),
            sampling,
            format: output_format(&request.json_schema),
            return_tokens: request.return_tokens,
        }
    }

    /// The result of a finished generation (counted in the measured speed and the
    /// metrics), before it is signed.
    fn result_of(
        &self,
        request: &InferRequest,
        request_digest: Digest,
        c: crate::engine::Completion,
    ) -> InferResult {
        let model = request.model.digest;
        self.throughput
            .observe(model, c.usage.completion_tokens, c.timings.decode_ms);
        self.metrics.completed(&request.model.reference, &c);
        InferResult {
            request_id: request.request_id,
            request_digest,
            model_digest: model,
            output: c.text,
            finish_reason: c.finish_reason,
            usage: c.usage,
            timings: c.timings,
            token_ids: if request.return_tokens {
                Some(c.token_ids.unwrap_or_default())
            } else {
                None
            },
        }
    }

    /// What a provider started with a `--fault` does to its result before signing it
    /// (tests and benchmarks only); false when the client left meanwhile.
    async fn falsify(
        &self,
        result: &mut InferResult,
        cheat_text: bool,
        sink: &mut FrameSink,
    ) -> bool {
        match self.fault {
            Some(Fault::WrongModel) => result.model_digest = Digest::of(b"a cheaper model"),
            Some(Fault::Tamper) => {
                if let Some(ids) = result.token_ids.as_mut() {
                    ids.reverse();
                    ids.iter_mut().for_each(|t| *t = t.wrapping_add(7) % 30_000);
                }
            }
            Some(Fault::Empty) => {
                result.token_ids = result.token_ids.as_ref().map(|_| Vec::new());
                result.usage.completion_tokens = 0;
            }
            _ if cheat_text => {
                result.output = INJECTED_TEXT.to_string();
                if sink
                    .send(&DataFrame::Delta(result.output.clone()))
                    .await
                    .is_err()
                {
                    return false;
                }
            }
            _ => {}
        }
        true
    }

    /// The result signed (or, with `--fault bad-signature`, with a broken signature), its
    /// receipt in the ledger, and a log line.
    fn sign_and_record(
        &self,
        peer: PeerId,
        request: &InferRequest,
        request_digest: Digest,
        result: &InferResult,
        started: u64,
    ) -> Result<Signed<InferResult>, Refusal> {
        let model = request.model.digest;
        let mut signed = Signed::sign(&self.key, result)
            .map_err(|e| Refusal::new(DataErrorCode::Internal, e.to_string()))?;
        if self.fault == Some(Fault::BadSignature) {
            let (payload, signer, mut sig) = (
                signed.payload().to_vec(),
                signed.signer(),
                signed.signature().to_vec(),
            );
            sig[0] ^= 1;
            signed = Signed::from_parts(payload, signer, sig);
        }
        let receipt = Receipt {
            request_id: request.request_id,
            job_id: request.job_id,
            requester: peer,
            request_digest,
            result_digest: signed.payload_digest(),
            model_digest: model,
            usage: result.usage,
            timings: result.timings,
            finished_ms: now_ms(),
        };
        if let Err(e) = self.ledger.record(&self.key, &receipt) {
            warn!(error = %e, "could not write the receipt");
        }
        info!(
            prompt = result.usage.prompt_tokens,
            completion = result.usage.completion_tokens,
            ms = now_ms().saturating_sub(started),
            "subtask served"
        );
        Ok(signed)
    }

    #[instrument(skip_all, fields(request = %request.request_id.short(), %peer))]
    async fn infer(
        &self,
        peer: PeerId,
        request: InferRequest,
        sink: &mut FrameSink,
    ) -> Result<(), Refusal> {
        let started = now_ms();
        let model = request.model.digest;
        // The HTTP API's limits, here where any peer may send a request (review M3).
        request
            .check()
            .map_err(|e| Refusal::new(DataErrorCode::BadRequest, e.to_string()))?;
        let deadline = self.deadline(&request, started)?;
        let request_digest = request
            .digest()
            .map_err(|e| Refusal::new(DataErrorCode::BadRequest, e.to_string()))?;
        if self.fault == Some(Fault::Stall) && !stall(sink).await {
            return Ok(());
        }
        // Attack (c)'s guess: the draw routers used to take from the request id.
        let cheat_text = match self.fault {
            Some(Fault::Text) => true,
            Some(Fault::GuessAudits) => request.request_id.0 % 10_000 >= 2_500,
            _ => false,
        };
        let lease = self.lease(model).await?;
        let mut events = lease.engine.generate(self.generation(&request))?;
        // Generation does not wait for the client: deltas go to a writer through a channel
        // (at most one result's text), and the slot is given back the moment generation
        // ends, however slowly the client reads (H4: a slow reader holds a stream, never a
        // slot). A client that goes away stops the generation.
        let (deltas, mut to_write) = tokio::sync::mpsc::unbounded_channel::<String>();
        let generate = async move {
            let _lease = lease;
            while let Some(event) = events.recv().await {
                match event? {
                    Event::Token { text, .. } => {
                        let text = match self.fault {
                            _ if cheat_text => continue,
                            Some(Fault::Stream) => text.to_uppercase(),
                            _ => text,
                        };
                        if !text.is_empty() && deltas.send(text).is_err() {
                            return Ok(None);
                        }
                    }
                    Event::Done(c) => return Ok(Some(c)),
                }
            }
            Err(crate::engine::EngineError::Stopped)
        };
        let generate = async move {
            match deadline {
                Some(at) => tokio::time::timeout_at(at, generate).await.ok(),
                None => Some(generate.await),
            }
        };
        let writer = &mut *sink;
        let write = async move {
            while let Some(text) = to_write.recv().await {
                if writer.send(&DataFrame::Delta(text)).await.is_err() {
                    return false;
                }
            }
            true
        };
        let (generated, delivered) = tokio::join!(generate, write);
        let completion = match generated {
            Some(r) => r?,
            None => {
                return Err(Refusal::new(
                    DataErrorCode::DeadlineExceeded,
                    "the deadline passed while generating",
                ));
            }
        };
        if !delivered {
            info!("the client cancelled the subtask");
            return Ok(());
        }
        let Some(c) = completion else { return Ok(()) };
        let mut result = self.result_of(&request, request_digest, c);
        if !self.falsify(&mut result, cheat_text, sink).await {
            return Ok(()); // the client left
        }
        let signed = self.sign_and_record(peer, &request, request_digest, &result, started)?;
        let _ = sink.send(&DataFrame::Result(signed)).await;
        Ok(())
    }

    #[instrument(skip_all, fields(audit = %audit.audit_id.short(), %peer))]
    async fn audit(
        &self,
        peer: PeerId,
        audit: AuditRequest,
        sink: &mut FrameSink,
    ) -> Result<(), Refusal> {
        let model = audit.model.digest;
        audit
            .check()
            .map_err(|e| Refusal::new(DataErrorCode::BadRequest, e.to_string()))?;
        let request_digest = audit
            .digest()
            .map_err(|e| Refusal::new(DataErrorCode::BadRequest, e.to_string()))?;
        let _held = self
            .audits
            .take(peer, MAX_AUDITS_PER_PEER)
            .ok_or_else(|| Refusal {
                code: DataErrorCode::Busy,
                message: format!("this peer already has {MAX_AUDITS_PER_PEER} audits running here"),
                retry_after_ms: Some(1000),
            })?;
        let lease = self.lease(model).await?;
        let scored = lease
            .engine
            .score(ScoreRequest {
                prompt: prompt_of(&audit.messages, &audit.prompt),
                claimed: audit.claimed_tokens.clone(),
                format: output_format(&audit.json_schema),
                stop: audit.sampling.stop.clone(),
                sampling: (audit.sampling.temperature > 0.0 && audit.sampling.seed.is_some())
                    .then(|| audit.sampling.clone()),
                ended_by_model: audit.finish_reason == beacon_proto::FinishReason::Stop,
            })
            .await?;
        drop(lease);
        let mut result = AuditResult {
            audit_id: audit.audit_id,
            request_digest,
            model_digest: model,
            prompt_tokens: scored.prompt_tokens,
            scores: scored.scores,
            output_digest: Digest::of(scored.text.as_bytes()),
            end: scored.end,
        };
        if self.fault == Some(Fault::LyingAuditor) {
            result.output_digest = Digest::of(b"not what the tokens decode to");
            for (s, t) in result.scores.iter_mut().zip(&audit.claimed_tokens) {
                *s = beacon_proto::TokenScore {
                    logprob: -12.0,
                    argmax: t.wrapping_add(1),
                    argmax_logprob: -0.01,
                };
            }
        }
        let signed = Signed::sign(&self.key, &result)
            .map_err(|e| Refusal::new(DataErrorCode::Internal, e.to_string()))?;
        debug!(tokens = result.scores.len(), "audit scored");
        let _ = sink.send(&DataFrame::Audit(signed)).await;
        Ok(())
    }
}

fn output_format(json_schema: &Option<String>) -> OutputFormat {
    match json_schema {
        Some(s) => OutputFormat::JsonSchema(s.clone()),
        None => OutputFormat::Text,
    }
}

/// What the engine is given: the raw prompt of a completion, or the messages of a chat.
fn prompt_of(messages: &[beacon_proto::ChatMessage], prompt: &Option<String>) -> Prompt {
    match prompt {
        Some(p) => Prompt::Text(p.clone()),
        None => Prompt::Chat(messages.to_vec()),
    }
}

/// `--fault stall`: ten minutes without a word; false when the client gave up first.
async fn stall(sink: &mut FrameSink) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(600)) => true,
        _ = sink.stopped() => {
            info!("the client cancelled the subtask while it stalled");
            false
        }
    }
}
