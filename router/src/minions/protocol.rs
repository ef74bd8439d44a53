//! The MinionS and Minion protocols, run on the provider network.
//!
//! MinionS, per round: (1) *decompose*: the supervisor sees the task, the documents'
//! metadata (never the documents) and earlier rounds' scratchpad, and answers a JSON plan,
//! validated here and sent back with the error when invalid (a bounded number of times);
//! (2) *execute*: chunks × tasks × samples become jobs, one local call each, placed,
//! dispatched and verified like any subtask, with output constrained to
//! `{citation, answer|null, explanation}`; a plan's `top_k` runs each task on the chunks
//! that best match it only ([`super::retrieval`]); (3) *filter*: null answers are dropped,
//! and a finding counts only when its citation is in its chunk; the supervisor sees these
//! grounded quotes, de-duplicated, never the workers' prose ([`super::evidence`]);
//! (4) *aggregate*: the supervisor answers `{decision: final|more, answer, explanation,
//! scratchpad}`; the last round must be final.
//!
//! A weak supervisor never sinks a job: after the retries, a round runs the router's
//! default plan (the task as the one instruction over the paragraphs that match it best;
//! in a later round, the next best); a supervisor whose recent plans were rarely valid is
//! not asked for one at all ([`super::retries`]); and a job whose supervisor cannot
//! aggregate answers with the evidence found most often. The answer's `notes` say so.
//!
//! Minion: the supervisor asks, a worker on a provider that sees the whole context answers,
//! until the supervisor gives a final answer.
//!
//! Nothing the models write is executed; everything they return is data checked here.

use std::collections::BTreeMap;
use std::time::Instant;

use beacon_proto::{ChatMessage, Digest, Id, InferRequest, ModelSpec, Role, Sampling};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::chunk::{Chunk, Lengths, cap, chunk, estimate_from};
use super::evidence::{Collector, Finding};
use super::job::{
    Baseline, JobAnswer, JobRecord, LocalUsage, Progress, Protocol, RemoteOnly, RemoteUsage,
    Timing, Usage, Verification,
};
use super::plan::{self, Chunking, Limits, Plan, PlanError, Strategy, TaskSpec};
use super::remote::{Msg, RemoteCall, RemoteError, Supervisor};
use super::retrieval;
use crate::dispatch::{DispatchError, Dispatcher, SharedPrefix};
use crate::placement::Policy;

/// Everything a job needs, resolved from the request and the router's settings.
pub struct JobSetup {
    pub protocol: Protocol,
    pub task: String,
    pub context: Vec<String>,
    pub doc_metadata: Option<String>,
    pub max_rounds: u32,
    pub local_model: String,
    pub local_digest: Digest,
    pub supervisor: Supervisor,
    pub dispatcher: Dispatcher,
    pub policy: Policy,
    pub max_jobs_per_round: u32,
    pub plan_retries: u32,
    /// The supervisor is not asked for plans: of its last `.1` plan calls, `.0` gave a
    /// valid one ([`super::retries::Planning::Skip`]); every round runs the default plan.
    pub skip_plan: Option<(u32, u32)>,
    /// Where this job's plan calls are recorded, and under which supervisor.
    pub plan_record: Option<(std::sync::Arc<super::retries::PlanRecord>, String)>,
    pub max_chunk_chars: usize,
    pub worker_max_tokens: u32,
    pub baseline: Baseline,
    /// Concurrent local jobs at most.
    pub parallelism: usize,
    /// The client's remote-token budget, when the job spends the operator's supervisor.
    pub budget: Option<super::budget::Budget>,
    /// The job names its own supervisor (`--allow-remote-override`): the operator's key
    /// is not spent.
    pub own_supervisor: bool,
}

/// Why a job failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("the supervisor gave no valid {what} after {attempts} attempts; last error: {error}")]
    Supervisor {
        what: &'static str,
        attempts: u32,
        error: String,
    },
    #[error("every local job of round {round} failed; last error: {error}")]
    LocalFailed { round: u32, error: String },
    #[error("the local model refused the job: {0}")]
    LocalRefused(String),
    #[error("no provider can run the local model: {0}")]
    NoProvider(String),
}

/// What the worker returns for one job: the sentence it quotes (the citation) and the
/// answer it reads there.
#[derive(Clone, Debug, Deserialize)]
struct WorkerOutput {
    #[serde(default, rename = "sentence")]
    citation: Option<String>,
    answer: Option<Value>,
}

/// What the supervisor returns when aggregating.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Aggregate {
    decision: String,
    #[serde(default)]
    answer: String,
    #[serde(default)]
    explanation: String,
    #[serde(default)]
    scratchpad: String,
}

/// What the supervisor says in a Minion conversation.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Turn {
    decision: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    answer: String,
    #[serde(default)]
    explanation: String,
}

/// The worker's reply: the sentence it quotes first, then the answer read from it. (With
/// a 135M worker, "citation" drew made-up URLs and an explanation only cost tokens; the
/// router never forwards a worker's prose anyway.)
fn worker_schema() -> Value {
    json!({
        "type": "object", "additionalProperties": false,
        "required": ["sentence", "answer"],
        "properties": {
            "sentence": {"anyOf": [{"type": "string", "maxLength": 300}, {"type": "null"}]},
            "answer": {"anyOf": [{"type": "string", "maxLength": 120}, {"type": "null"}]}
        }
    })
}

fn aggregate_schema(last: bool) -> Value {
    let decisions = if last {
        json!(["final"])
    } else {
        json!(["final", "more"])
    };
    json!({
        "type": "object", "additionalProperties": false,
        "required": ["decision", "answer", "explanation", "scratchpad"],
        "properties": {
            "decision": {"enum": decisions},
            "answer": {"type": "string", "maxLength": 200},
            "explanation": {"type": "string", "maxLength": 120},
            "scratchpad": {"type": "string", "maxLength": 200}
        }
    })
}

fn turn_schema(last: bool) -> Value {
    let decisions = if last {
        json!(["final"])
    } else {
        json!(["final", "ask"])
    };
    json!({
        "type": "object", "additionalProperties": false,
        "required": ["decision", "message", "answer", "explanation"],
        "properties": {
            "decision": {"enum": decisions},
            "message": {"type": "string", "maxLength": 400},
            "answer": {"type": "string", "maxLength": 600},
            "explanation": {"type": "string", "maxLength": 300}
        }
    })
}

/// Accumulates a job's accounting.
struct Ledger {
    calls: Vec<RemoteCall>,
    jobs: Vec<JobRecord>,
    /// The request id of each entry of `jobs`.
    request_ids: Vec<Id>,
    remote_ms: u64,
    local_ms: u64,
    /// Bytes of the prompts sent to the supervisor, to calibrate the baseline estimate.
    remote_prompt_bytes: u64,
    progress: Option<mpsc::UnboundedSender<Progress>>,
    budget: Option<super::budget::Budget>,
    /// Grounded findings over every round.
    evidence: Collector,
    /// Fallbacks taken, for the answer.
    notes: Vec<String>,
}

impl Ledger {
    fn emit(&self, p: Progress) {
        if let Some(tx) = &self.progress {
            let _ = tx.send(p);
        }
    }

    async fn ask(
        &mut self,
        sup: &Supervisor,
        messages: &[Msg],
        schema: Option<(&str, &Value)>,
        purpose: &'static str,
        round: u32,
    ) -> Result<String, RemoteError> {
        // A conversation that already holds a rejected reply is a retry: sample, so that a
        // deterministic supervisor can answer differently.
        let retry =
            messages.iter().filter(|m| m.role == "assistant").count() > 0 && purpose != "supervise";
        let temperature = if retry { 0.7 } else { 0.0 };
        if let Some(b) = &self.budget {
            b.check().map_err(|s| RemoteError::BudgetSpent {
                tokens: s.tokens,
                renews_in_s: s.renews_in.as_secs().max(1),
            })?;
        }
        let (text, call) = sup
            .chat_at(messages, schema, purpose, round, temperature)
            .await?;
        self.remote_ms += call.ms;
        if let Some(b) = &self.budget {
            b.charge(call.prompt_tokens + call.completion_tokens);
        }
        if purpose != "remote_only" {
            self.remote_prompt_bytes +=
                messages.iter().map(|m| m.content.len() as u64).sum::<u64>();
        }
        self.calls.push(call);
        Ok(text)
    }
}

/// Runs a job to its answer; progress goes to `progress` while it runs.
pub async fn run(
    setup: JobSetup,
    progress: Option<mpsc::UnboundedSender<Progress>>,
) -> Result<JobAnswer, JobError> {
    let started = Instant::now();
    let mut ledger = Ledger {
        calls: Vec::new(),
        jobs: Vec::new(),
        request_ids: Vec::new(),
        remote_ms: 0,
        local_ms: 0,
        remote_prompt_bytes: 0,
        progress,
        budget: setup.budget.clone(),
        evidence: Collector::default(),
        notes: Vec::new(),
    };
    let (answer, explanation, rounds) = match setup.protocol {
        Protocol::Minions => minions(&setup, &mut ledger).await?,
        Protocol::Minion => minion(&setup, &mut ledger).await?,
    };
    let remote_only = baseline(&setup, &mut ledger, &answer).await?;
    Ok(finish(
        &setup,
        ledger,
        answer,
        explanation,
        rounds,
        remote_only,
        started,
    ))
}

fn describe_documents(setup: &JobSetup) -> String {
    let sizes: Vec<String> = setup
        .context
        .iter()
        .enumerate()
        .map(|(i, d)| {
            format!(
                "document {i}: {} characters, {} paragraphs, {} pages",
                d.chars().count(),
                d.split("\n\n").filter(|p| !p.trim().is_empty()).count(),
                d.split('\x0c').filter(|p| !p.trim().is_empty()).count()
            )
        })
        .collect();
    let meta = setup
        .doc_metadata
        .as_deref()
        .map(|m| format!("Metadata: {m}\n"))
        .unwrap_or_default();
    format!("{meta}{}", sizes.join("\n"))
}

const DECOMPOSE_SYSTEM: &str = "You supervise small local language models that read long documents for you. \
You cannot see the documents. Plan how the documents are cut into chunks and which short, \
self-contained instructions the small models run on every chunk. Each small model sees one \
chunk and one instruction, and answers with JSON {sentence, answer}: the sentence of the \
chunk that answers it and the answer read there, or null when its chunk does not contain \
what was asked. Small models follow simple \
extraction instructions well and reasoning poorly: keep instructions concrete. Use distinct \
task ids. Reply with one JSON object only, no code.
top_k runs each task only on the top_k chunks whose words best match it (0: every chunk); \
use it for long documents.
Example: for the task \"Who signed the lease and when?\" a good plan is
{\"chunking\": {\"strategy\": \"paragraphs\", \"size\": 1, \"overlap\": 0}, \"tasks\": [{\"id\": \"signer\", \"instruction\": \"Who signed the lease? Quote the name.\", \"advice\": \"Answer null if no signature is mentioned.\"}, {\"id\": \"date\", \"instruction\": \"On what date was the lease signed?\", \"advice\": \"\"}], \"samples_per_task\": 1, \"top_k\": 8}
The plan must match this JSON schema:";

/// The last round's aggregation: a plain answer from the evidence.
const FINAL_SYSTEM: &str = "You answer a question from evidence: sentences quoted from \
documents you cannot see, each checked to be in them, with the answer a reader found there. \
Answer in one short sentence, using only the evidence.";

/// Chunks the default plan's task runs on at most.
const DEFAULT_TOP_K: u32 = 8;
/// Samples per chunk the default plan asks for when the job budget has room: the first
/// greedy, the second sampled. A 135M worker that reads the paragraph holding the fact
/// still misquotes it now and then (the bench's evidence recall was 10 of 12 with one).
const DEFAULT_SAMPLES: u32 = 2;

/// The plan a round runs when the supervisor gave no valid one: the job's task as the one
/// instruction, over the paragraphs (sized to the job budget) that match it best, each
/// read twice when the budget has room.
fn default_plan(setup: &JobSetup, limits: &Limits) -> Plan {
    let budget = setup.max_jobs_per_round.max(1);
    let samples = if budget >= DEFAULT_TOP_K * DEFAULT_SAMPLES {
        DEFAULT_SAMPLES
    } else {
        1
    };
    let instruction: String = setup
        .task
        .chars()
        .take(limits.max_instruction_chars)
        .collect();
    Plan {
        chunking: Chunking {
            strategy: Strategy::Paragraphs,
            size: 1,
            overlap: 0,
        },
        tasks: vec![TaskSpec {
            id: "task".into(),
            instruction,
            advice: String::new(),
        }],
        samples_per_task: samples,
        top_k: DEFAULT_TOP_K.min(budget),
    }
}

/// The default plan with its chunks.
fn fitted_default_plan(setup: &JobSetup, limits: &Limits) -> Result<(Plan, Vec<Chunk>), PlanError> {
    let mut p = default_plan(setup, limits);
    fit_chunks(setup, &mut p).map(|chunks| (p, chunks))
}

/// (1) Decompose: the supervisor's plan, checked and fitted to the documents, asked
/// again with the reason up to `plan_retries` times, else the router's default plan (also
/// when the supervisor's plans have rarely been valid). Returns the plan and its chunks,
/// the attempts made, and whether it is the default plan.
async fn decompose(
    setup: &JobSetup,
    ledger: &mut Ledger,
    planner: &Supervisor,
    scratchpad: &str,
    round: u32,
) -> Result<((Plan, Vec<Chunk>), u32, bool), JobError> {
    let limits = Limits::default();
    let plan_schema = plan::schema(&limits);
    let docs = describe_documents(setup);
    Ok(if let Some((valid, seen)) = setup.skip_plan {
        let fitted = fitted_default_plan(setup, &limits).map_err(|e| JobError::Supervisor {
            what: "plan",
            attempts: 0,
            error: format!("the default plan does not fit: {e}"),
        })?;
        ledger.notes.push(format!(
            "round {round}: the router's default plan was used without asking the supervisor, whose plans were rarely valid ({valid} of its last {seen})"
        ));
        (fitted, 0, true)
    } else {
        let mut messages = vec![
            Msg::system(format!("{DECOMPOSE_SYSTEM}\n{plan_schema}")),
            Msg::user(format!(
                "Task: {}\n\nDocuments:\n{docs}\n\nRound {round} of {}.{}\nReturn the plan.",
                setup.task,
                setup.max_rounds,
                if scratchpad.is_empty() {
                    String::new()
                } else {
                    format!("\nWhat earlier rounds found (your scratchpad):\n{scratchpad}")
                }
            )),
        ];
        let mut attempt = 0;
        loop {
            attempt += 1;
            let text = ledger
                .ask(
                    planner,
                    &messages,
                    Some(("minions_plan", &plan_schema)),
                    "decompose",
                    round,
                )
                .await?;
            let checked = plan::parse(&text, &limits)
                .and_then(|mut p| fit_chunks(setup, &mut p).map(|chunks| (p, chunks)));
            if let Some((record, supervisor)) = &setup.plan_record {
                record.record(supervisor, checked.is_ok());
            }
            match checked {
                Ok(ok) => break (ok, attempt, false),
                Err(e) => {
                    tracing::info!(round, attempt, error = %e, "supervisor plan rejected");
                    ledger.emit(Progress::PlanRejected {
                        round,
                        attempt,
                        error: e.to_string(),
                    });
                    if attempt > setup.plan_retries {
                        let fitted = fitted_default_plan(setup, &limits).map_err(|d| {
                            JobError::Supervisor {
                                what: "plan",
                                attempts: attempt,
                                error: format!("{e}; nor does the default plan fit: {d}"),
                            }
                        })?;
                        ledger.notes.push(format!(
                            "round {round}: the supervisor gave no valid plan after {attempt} attempts (last error: {e}); the router's default plan was used"
                        ));
                        break (fitted, attempt, true);
                    }
                    // The retry shows the last refused plan only: earlier ones add
                    // tokens, not help.
                    messages.truncate(2);
                    messages.push(Msg::assistant(text));
                    messages.push(Msg::user(format!(
                        "That plan is not valid: {e}. Reply with a corrected plan: one JSON object matching the schema, nothing else."
                    )));
                }
            }
        }
    })
}

/// (3) Filter: only findings whose citation is in their chunk go on, into the job's
/// evidence. Returns how many jobs gave an answer.
fn filter(
    setup: &JobSetup,
    ledger: &mut Ledger,
    round: u32,
    plan: &Plan,
    chunks: &[Chunk],
    results: &[JobResult],
) -> usize {
    let mut answered = 0;
    for r in results {
        let Some(answer) = r.output.as_ref().and_then(answer_text) else {
            continue;
        };
        answered += 1;
        let c = &chunks[r.chunk];
        let kept = ledger.evidence.add(Finding {
            question: &format!("{} {}", setup.task, plan.tasks[r.task].instruction),
            round,
            task: &plan.tasks[r.task].id,
            chunk: format!("{}#{}", c.doc, c.index),
            chunk_text: &c.text,
            citation: r.output.as_ref().and_then(|w| w.citation.as_deref()),
            answer: &answer,
            provider: r.provider.clone(),
        });
        tracing::debug!(
            round,
            chunk = %format!("{}#{}", c.doc, c.index),
            kept,
            answer = %answer,
            citation = ?r.output.as_ref().and_then(|w| w.citation.as_deref()),
            "worker finding"
        );
    }
    answered
}

/// A supervisor's aggregation reply: in the last round the plain-text answer, else one
/// JSON object deciding `final` or `more`; why it is not valid otherwise.
fn parse_aggregate(text: &str, last: bool, quotes: usize) -> Result<Aggregate, String> {
    if last {
        let answer = text.trim();
        if answer.is_empty() {
            Err("the reply is empty".to_string())
        } else {
            Ok(Aggregate {
                decision: "final".into(),
                answer: shorten(answer, 1_000).to_string(),
                explanation: format!(
                    "From the evidence: {} quote(s) found in the documents, listed with this answer.",
                    quotes
                ),
                scratchpad: String::new(),
            })
        }
    } else {
        plan::extract_json_object(text)
            .ok_or_else(|| "the reply contains no JSON object".to_string())
            .and_then(|j| serde_json::from_str::<Aggregate>(j).map_err(|e| e.to_string()))
            .and_then(|a| match a.decision.as_str() {
                "final" | "more" => Ok(a),
                other => Err(format!("decision must be final or more, not {other:?}")),
            })
    }
}

/// (4) Aggregate: the supervisor's answer from the evidence (in the last round, asked as
/// plain text), asked again with the reason up to `plan_retries` times, else the evidence
/// found most often.
async fn aggregate(
    setup: &JobSetup,
    ledger: &mut Ledger,
    round: u32,
    last: bool,
) -> Result<Aggregate, JobError> {
    let evidence = ledger.evidence.render(EVIDENCE_BYTES);
    // (4) Aggregate.
    let schema = aggregate_schema(last);
    let mut messages = if last {
        // The last round is final: the answer is asked for as plain text (a small
        // supervisor constrained to the aggregation JSON wrote empty or looping answers
        // where, asked plainly, it answers from the evidence).
        vec![
            Msg::system(FINAL_SYSTEM),
            Msg::user(format!("Evidence:\n{evidence}\nQuestion: {}", setup.task)),
        ]
    } else {
        vec![
            Msg::system(
                "You supervise small local models that read documents you cannot see. You get \
             evidence: quotes they found in the documents (each checked to be there), with \
             the answer they read from the quote when it supports one. Answer the task from \
             the evidence. Reply with one JSON object only: \
             {\"decision\": \"final\" or \"more\", \"answer\", \"explanation\", \"scratchpad\"}. \
             Choose \"more\" only if another round with new instructions would find what is \
             missing; the scratchpad carries what you know to that round.",
            ),
            Msg::user(format!(
                "Task: {}\n\nRound {round} of {}.\n\nEvidence:\n{evidence}",
                setup.task, setup.max_rounds,
            )),
        ]
    };
    let mut attempt = 0;
    let agg = loop {
        attempt += 1;
        let text = ledger
            .ask(
                &setup.supervisor,
                &messages,
                (!last).then_some(("minions_aggregate", &schema)),
                "aggregate",
                round,
            )
            .await?;
        let parsed = parse_aggregate(&text, last, ledger.evidence.evidence.len());
        match parsed {
            Ok(a) => break a,
            Err(e) if attempt > setup.plan_retries => {
                // The evidence found most often answers, when there is any.
                let Some(best) = ledger.evidence.most_seen() else {
                    return Err(JobError::Supervisor {
                        what: "aggregation",
                        attempts: attempt,
                        error: e,
                    });
                };
                let agg = from_evidence(best);
                ledger.notes.push(format!(
                    "round {round}: the supervisor gave no valid aggregation after {attempt} attempts (last error: {e}); the answer is the evidence found most often"
                ));
                break agg;
            }
            Err(e) => {
                messages.push(Msg::assistant(text));
                messages.push(Msg::user(if last {
                    "Answer the question in one short sentence from the evidence.".to_string()
                } else {
                    format!(
                        "That reply is not valid: {e}. Reply with one JSON object matching the schema, nothing else."
                    )
                }));
            }
        }
    };
    Ok(agg)
}

/// A final answer, in any round, that is empty or draws on none of the evidence (a weak
/// supervisor's junk: a list of numbers, a fragment of the prompt) is not passed off as the
/// answer: the evidence found most often is, and the answer says so. Not asked again: a
/// supervisor that wrote junk from this evidence tends to.
fn grounded(ledger: &mut Ledger, agg: Aggregate, round: u32, last: bool) -> Aggregate {
    match ledger.evidence.most_seen() {
        Some(best)
            if (last || agg.decision == "final")
                && (agg.answer.trim().is_empty() || !ledger.evidence.supports(&agg.answer)) =>
        {
            ledger.notes.push(format!(
                "round {round}: the supervisor's answer drew on none of the evidence ({:?}); the answer is the evidence found most often",
                shorten(agg.answer.trim(), 120)
            ));
            from_evidence(best)
        }
        _ => agg,
    }
}

async fn minions(setup: &JobSetup, ledger: &mut Ledger) -> Result<(String, String, u32), JobError> {
    let limits = Limits::default();
    // Room for the longest plan the schema allows, so that a constrained reply closes.
    let mut planner = setup.supervisor.clone();
    planner.max_tokens = planner
        .max_tokens
        .max(u32::try_from(plan::max_reply_chars(&limits)).unwrap_or(u32::MAX));
    let mut scratchpad = String::new();
    let mut default_rounds = 0;
    for round in 1..=setup.max_rounds {
        let last = round == setup.max_rounds;
        // (1) Decompose.
        let ((plan, chunks), attempt, default) =
            decompose(setup, ledger, &planner, &scratchpad, round).await?;
        ledger.emit(Progress::Plan {
            round,
            attempt,
            plan: plan.clone(),
            default,
        });
        // (2) Execute.
        // A default plan in a later round reads the chunks after those earlier default
        // rounds read (the same plan would find the same evidence again).
        let skip = if default {
            default_rounds * plan.top_k as usize
        } else {
            0
        };
        default_rounds += usize::from(default);
        let results = execute(setup, ledger, round, &plan, &chunks, skip).await?;
        // (3) Filter.
        let answered = filter(setup, ledger, round, &plan, &chunks, &results);
        // (4) Aggregate, and keep the answer to the evidence.
        let agg = aggregate(setup, ledger, round, last).await?;
        let agg = grounded(ledger, agg, round, last);
        // The last round is final whatever the supervisor says.
        let decision = if last { "final" } else { agg.decision.as_str() };
        let placed = ledger.jobs.iter().filter(|j| j.round == round).count();
        ledger.emit(Progress::Round {
            round,
            decision: decision.to_string(),
            jobs: placed,
            answered,
            failed: placed.saturating_sub(results.len()),
        });
        if decision == "final" {
            return Ok((agg.answer, agg.explanation, round));
        }
        let mut pad = agg.scratchpad;
        pad.truncate(floor_char_boundary(&pad, 8_000));
        scratchpad = format!("{scratchpad}\nRound {round}: {pad}");
    }
    unreachable!("the last round always returns")
}

/// The answer a job gives from its evidence alone (`best`: found most often), when its
/// supervisor gave none worth passing on.
fn from_evidence(best: &super::evidence::Evidence) -> Aggregate {
    Aggregate {
        decision: "final".into(),
        answer: best.answer.clone().unwrap_or_else(|| best.citation.clone()),
        explanation: format!(
            "Found in document {} as \"{}\"",
            best.chunk.replace('#', " chunk "),
            best.citation
        ),
        scratchpad: String::new(),
    }
}

/// Chunks for a plan. When its chunks are so small that the jobs exceed the round's budget,
/// the chunk size is doubled (within the strategy's bounds) until they fit: a plan that is
/// right apart from its granularity is repaired rather than refused. Sizes are chosen on
/// estimated counts (`chunk::estimate_from`, the documents measured once), so chunks are
/// built once, for the size chosen, and not at all for a plan that is still far over the
/// budget (a plan bomb costs a pass over the documents, review H7).
fn fit_chunks(setup: &JobSetup, p: &mut Plan) -> Result<Vec<Chunk>, PlanError> {
    let per_chunk = p.tasks.len() * p.samples_per_task as usize;
    let budget = setup.max_jobs_per_round as usize;
    let lengths = Lengths::of(&setup.context, p.chunking.strategy);
    // With top_k, a task runs on at most k of the chunks.
    let top_k = p.top_k as usize;
    let per_task = move |chunks: usize| {
        if top_k == 0 {
            chunks
        } else {
            chunks.min(top_k)
        }
    };
    let jobs = |c: &plan::Chunking| {
        per_task(estimate_from(&lengths, c, setup.max_chunk_chars)).saturating_mul(per_chunk)
    };
    let (_, hi) = plan::size_bounds(p.chunking.strategy);
    let mut now = jobs(&p.chunking);
    while now > budget && p.chunking.size < hi {
        let mut c = p.chunking.clone();
        c.size = (c.size.saturating_mul(2)).min(hi);
        let bigger = jobs(&c);
        if bigger >= now {
            break; // capped by max_chunk_chars: larger sizes do not help
        }
        p.chunking = c;
        now = bigger;
    }
    let too_many = |jobs: usize, chunks: String| {
        PlanError(format!(
            "the plan makes {jobs} jobs ({chunks} chunks x {} tasks x {} samples); at most {budget} are allowed: use larger chunks, fewer tasks or fewer samples",
            p.tasks.len(),
            p.samples_per_task,
        ))
    };
    // The estimate is within a few chunks of the count: twice the budget is far over it.
    if now > budget.saturating_mul(2) {
        return Err(too_many(now, format!("about {}", now / per_chunk.max(1))));
    }
    let chunks = cap(chunk(&setup.context, &p.chunking), setup.max_chunk_chars);
    let jobs = per_task(chunks.len()) * per_chunk;
    if chunks.is_empty() {
        Err(PlanError("this chunking gives no chunks".into()))
    } else if jobs > budget {
        Err(too_many(jobs, chunks.len().to_string()))
    } else {
        Ok(chunks)
    }
}

fn floor_char_boundary(s: &str, at: usize) -> usize {
    if at >= s.len() {
        return s.len();
    }
    (0..=at).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0)
}

fn shorten(s: &str, n: usize) -> &str {
    &s[..floor_char_boundary(s, n)]
}

/// The supervisor's evidence listing is at most this long.
const EVIDENCE_BYTES: usize = 24_000;

/// A local job that completed: which task and chunk (indices into the plan's tasks and the
/// round's chunks), what the worker said, and who said it.
struct JobResult {
    task: usize,
    chunk: usize,
    output: Option<WorkerOutput>,
    provider: String,
}

/// Runs every job of a round on the network; returns the jobs that completed, in job order.
async fn execute(
    setup: &JobSetup,
    ledger: &mut Ledger,
    round: u32,
    plan: &Plan,
    chunks: &[Chunk],
    skip: usize,
) -> Result<Vec<JobResult>, JobError> {
    let started = Instant::now();
    let specs = job_specs(setup, plan, chunks, skip);
    ledger.emit(Progress::JobsPlaced {
        round,
        jobs: specs.len(),
        chunks: chunks.len(),
        tasks: plan.tasks.len(),
        top_k: plan.top_k,
    });
    let requests = job_requests(setup, plan, chunks, &specs);
    let policy = std::sync::Arc::new(setup.policy.clone());
    let runs = requests
        .into_iter()
        .enumerate()
        .map(|(i, (request, prefix))| {
            let dispatcher = setup.dispatcher.clone();
            let policy = policy.clone();
            async move {
                let t0 = Instant::now();
                let r = dispatcher
                    .run_sharing(&request, &policy, None, Some(prefix))
                    .await;
                (i, request.request_id, r, t0.elapsed().as_millis() as u64)
            }
        });
    // No more jobs in flight than the eligible providers have slots: extra ones would only
    // queue at the providers, where their wait would count against the attempt timeout.
    let slots = setup.dispatcher.capacity(setup.local_digest, &setup.policy);
    let parallelism = usize::try_from(slots)
        .unwrap_or(usize::MAX)
        .clamp(1, setup.parallelism.max(1));
    let mut stream = futures::stream::iter(runs).buffer_unordered(parallelism);
    let mut out = Vec::new();
    let mut last_error = String::new();
    while let Some((i, request_id, r, ms)) = stream.next().await {
        let (ti, ci, s) = specs[i];
        let c = &chunks[ci];
        let mut rec = JobRecord::new(
            round,
            i,
            plan.tasks[ti].id.clone(),
            format!("{}#{}", c.doc, c.index),
            s,
            ms,
        );
        match r {
            Ok(o) => {
                let parsed = serde_json::from_str::<WorkerOutput>(o.result.output.trim()).ok();
                let answer = parsed.filter(|w| answer_text(w).is_some());
                rec.answered_by(&o, answer.is_some());
                out.push((
                    i,
                    JobResult {
                        task: ti,
                        chunk: ci,
                        output: answer,
                        provider: o.provider.to_string(),
                    },
                ));
            }
            Err(DispatchError::Refused(m)) => return Err(JobError::LocalRefused(m)),
            // Providers were there when the round started (checked before it): one that
            // cannot be placed now is a failed job, not a failed round.
            Err(e) => {
                last_error = e.to_string();
                rec.error = Some(last_error.clone());
            }
        }
        ledger.emit(Progress::JobFinished(Box::new(rec.clone())));
        ledger.jobs.push(rec);
        // Audits run in the background; their outcomes are attached at the end.
        ledger.request_ids.push(request_id);
    }
    ledger.local_ms += started.elapsed().as_millis() as u64;
    if out.is_empty() {
        return Err(JobError::LocalFailed {
            round,
            error: last_error,
        });
    }
    out.sort_by_key(|r| r.0);
    Ok(out.into_iter().map(|(_, r)| r).collect())
}

/// (task, chunk, sample) per job of a round, task-major; with `top_k`, each task's best
/// chunks only.
fn job_specs(
    setup: &JobSetup,
    plan: &Plan,
    chunks: &[Chunk],
    skip: usize,
) -> Vec<(usize, usize, u32)> {
    let mut specs = Vec::new();
    for (ti, t) in plan.tasks.iter().enumerate() {
        let query = format!("{} {} {}", setup.task, t.instruction, t.advice);
        for ci in retrieval::select_after(chunks, &query, plan.top_k, skip) {
            for s in 0..plan.samples_per_task {
                specs.push((ti, ci, s));
            }
        }
    }
    specs
}

/// Each job's request, with the prompt prefix it shares. Jobs on one chunk share the
/// system prompt and the text: they gather on the provider that has it cached when that is
/// no slower (task-major order leaves time for the first to be prefilled before the next
/// arrives).
fn job_requests(
    setup: &JobSetup,
    plan: &Plan,
    chunks: &[Chunk],
    specs: &[(usize, usize, u32)],
) -> Vec<(InferRequest, SharedPrefix)> {
    let job_id = Id::random();
    let schema = worker_schema().to_string();
    specs
        .iter()
        .map(|&(t, c, s)| {
            let task = (&plan.tasks[t], plan.tasks.len() == 1);
            let request = worker_request(setup, job_id, &schema, task, &chunks[c], s);
            let prefix = SharedPrefix::of(&[&request.messages[0].content, &chunks[c].text]);
            (request, prefix)
        })
        .collect()
}

/// One MinionS job: one chunk, one instruction, one sample, in its own conversation.
fn worker_request(
    setup: &JobSetup,
    job_id: Id,
    schema: &str,
    (t, single): (&super::plan::TaskSpec, bool),
    c: &Chunk,
    s: u32,
) -> InferRequest {
    InferRequest {
        prompt: None,
        request_id: Id::random(),
        job_id: Some(job_id),
        model: ModelSpec {
            reference: setup.local_model.clone(),
            digest: setup.local_digest,
        },
        messages: vec![
            ChatMessage {
                role: Role::System,
                content: "You find the answer to a question in a text. Reply with JSON: \
                          sentence (the sentence of the text that answers the question, \
                          copied exactly from the text, or null if no sentence does) and \
                          answer (a few words from that sentence, or null)."
                    .into(),
            },
            // The text first (tasks on one chunk share its prefix), then the question: with
            // one task, the job's own, as asked (a 135M worker answers it better than a
            // paraphrase with advice); with several, the task's instruction, a part of it,
            // and its advice.
            ChatMessage {
                role: Role::User,
                content: format!(
                    "Text:\n{}\n\nQuestion: {}{}",
                    c.text,
                    if single {
                        setup.task.clone()
                    } else {
                        format!("{}\n(Part of: {})", t.instruction, setup.task)
                    },
                    if single || t.advice.is_empty() {
                        String::new()
                    } else {
                        format!("\nAdvice: {}", t.advice)
                    }
                ),
            },
        ],
        sampling: Sampling {
            // The first sample is greedy (and auditable); further samples vary.
            temperature: if s == 0 { 0.0 } else { 0.7 },
            seed: Some(u64::from(s) + 1),
            max_tokens: setup.worker_max_tokens,
            ..Sampling::default()
        },
        json_schema: Some(schema.to_string()),
        deadline_ms: None,
        return_tokens: true,
    }
}

/// The worker's answer as text, when it gave one.
fn answer_text(w: &WorkerOutput) -> Option<String> {
    match w.answer.as_ref()? {
        Value::Null => None,
        Value::String(s) if s.trim().is_empty() || s.trim().eq_ignore_ascii_case("null") => None,
        Value::String(s) => Some(s.trim().to_string()),
        other => Some(other.to_string()),
    }
}

const MINION_SYSTEM: &str = "You supervise a small local language model that can read a \
long context you cannot see. Ask it short, simple questions about the context, one at a \
time, and answer the task from what it tells you. Reply with one JSON object only: \
{\"decision\": \"ask\" to send `message` to the worker, or \"final\" with `answer` and \
`explanation`}.";

/// The supervisor's next turn in the Minion conversation `sup` (a message for the worker,
/// or the final answer), asked again with the reason up to `plan_retries` times.
async fn supervise(
    setup: &JobSetup,
    ledger: &mut Ledger,
    sup: &mut Vec<Msg>,
    round: u32,
    last: bool,
) -> Result<Turn, JobError> {
    let schema = turn_schema(last);
    let mut attempt = 0;
    let turn = loop {
        attempt += 1;
        let text = ledger
            .ask(
                &setup.supervisor,
                sup,
                Some(("minion_turn", &schema)),
                "supervise",
                round,
            )
            .await?;
        let parsed = plan::extract_json_object(&text)
            .ok_or_else(|| "the reply contains no JSON object".to_string())
            .and_then(|j| serde_json::from_str::<Turn>(j).map_err(|e| e.to_string()))
            .and_then(|t| match t.decision.as_str() {
                "final" => Ok(t),
                "ask" if !last && !t.message.trim().is_empty() => Ok(t),
                "ask" if last => Err("this is the last turn: the decision must be final".into()),
                "ask" => Err("an ask needs a message".into()),
                other => Err(format!("decision must be ask or final, not {other:?}")),
            });
        match parsed {
            Ok(t) => {
                sup.push(Msg::assistant(text));
                break t;
            }
            Err(e) if attempt > setup.plan_retries => {
                return Err(JobError::Supervisor {
                    what: "turn",
                    attempts: attempt,
                    error: e,
                });
            }
            Err(e) => {
                sup.push(Msg::assistant(text));
                sup.push(Msg::user(format!(
                    "That reply is not valid: {e}. Reply with one JSON object matching the schema, nothing else."
                )));
            }
        }
    };
    Ok(turn)
}

async fn minion(setup: &JobSetup, ledger: &mut Ledger) -> Result<(String, String, u32), JobError> {
    let context = setup
        .context
        .iter()
        .enumerate()
        .map(|(i, d)| format!("Document {i}:\n{d}"))
        .collect::<Vec<_>>()
        .join("\n\n");
    let mut sup = vec![
        Msg::system(MINION_SYSTEM),
        Msg::user(format!(
            "Task: {}\n\nThe context:\n{}\n\nYou have {} turn(s). Your first message to the worker?",
            setup.task,
            describe_documents(setup),
            setup.max_rounds
        )),
    ];
    let mut worker = vec![ChatMessage {
        role: Role::System,
        content: format!(
            "Answer questions about this context, only from it, briefly.\n\n{context}"
        ),
    }];
    for round in 1..=setup.max_rounds {
        let last = round == setup.max_rounds;
        let turn = supervise(setup, ledger, &mut sup, round, last).await?;
        if turn.decision == "final" {
            ledger.emit(Progress::Round {
                round,
                decision: "final".into(),
                jobs: 0,
                answered: 0,
                failed: 0,
            });
            return Ok((turn.answer, turn.explanation, round));
        }
        ledger.emit(Progress::Message {
            round,
            from: "supervisor",
            text: turn.message.clone(),
        });
        worker.push(ChatMessage {
            role: Role::User,
            content: turn.message.clone(),
        });
        let request = conversation_request(setup, worker.clone());
        let t0 = Instant::now();
        let r = setup.dispatcher.run(&request, &setup.policy, None).await;
        let ms = t0.elapsed().as_millis() as u64;
        ledger.local_ms += ms;
        let o = match r {
            Ok(o) => o,
            Err(DispatchError::Refused(m)) => {
                return Err(JobError::LocalRefused(format!(
                    "{m} (the Minion protocol gives the worker the whole context; use minions for longer contexts)"
                )));
            }
            Err(DispatchError::NoProvider(m)) => return Err(JobError::NoProvider(m)),
            Err(e) => {
                return Err(JobError::LocalFailed {
                    round,
                    error: e.to_string(),
                });
            }
        };
        let reply = o.result.output.trim().to_string();
        let mut rec = JobRecord::new(
            round,
            ledger.jobs.len(),
            "worker".into(),
            "all".into(),
            0,
            ms,
        );
        rec.answered_by(&o, !reply.is_empty());
        ledger.emit(Progress::JobFinished(Box::new(rec.clone())));
        ledger.jobs.push(rec);
        ledger.request_ids.push(request.request_id);
        ledger.emit(Progress::Message {
            round,
            from: "worker",
            text: reply.clone(),
        });
        worker.push(ChatMessage {
            role: Role::Assistant,
            content: reply.clone(),
        });
        sup.push(Msg::user(format!(
            "The worker says:\n{}\n\n{}",
            shorten(&reply, 8_000),
            if round + 1 == setup.max_rounds {
                "Your next reply is the last: give the final answer."
            } else {
                "Your next message, or the final answer?"
            }
        )));
    }
    unreachable!("the last turn always returns")
}

/// The Minion worker's next turn: the whole conversation so far, greedy.
fn conversation_request(setup: &JobSetup, messages: Vec<ChatMessage>) -> InferRequest {
    InferRequest {
        prompt: None,
        request_id: Id::random(),
        job_id: None,
        model: ModelSpec {
            reference: setup.local_model.clone(),
            digest: setup.local_digest,
        },
        messages,
        sampling: Sampling {
            temperature: 0.0,
            max_tokens: setup.worker_max_tokens,
            ..Sampling::default()
        },
        json_schema: None,
        deadline_ms: None,
        return_tokens: true,
    }
}

/// The remote tokens a remote-only run (the supervisor given the task and every document)
/// would use: measured by running it, or estimated from its prompt size at this job's
/// measured tokens per byte.
async fn baseline(
    setup: &JobSetup,
    ledger: &mut Ledger,
    answer: &str,
) -> Result<RemoteOnly, JobError> {
    let messages = vec![
        Msg::system("Answer the task from the documents."),
        Msg::user(format!(
            "{}\n\nTask: {}",
            setup
                .context
                .iter()
                .enumerate()
                .map(|(i, d)| format!("Document {i}:\n{d}"))
                .collect::<Vec<_>>()
                .join("\n\n"),
            setup.task
        )),
    ];
    match setup.baseline {
        Baseline::Run => {
            match ledger
                .ask(&setup.supervisor, &messages, None, "remote_only", 0)
                .await
            {
                Ok(text) => {
                    let call = ledger.calls.pop().expect("ask recorded the call");
                    ledger.remote_ms -= call.ms;
                    Ok(RemoteOnly {
                        prompt_tokens: call.prompt_tokens,
                        completion_tokens: call.completion_tokens,
                        total_tokens: call.prompt_tokens + call.completion_tokens,
                        method: Baseline::Run,
                        answer: Some(text),
                        ms: Some(call.ms),
                        error: None,
                    })
                }
                Err(e @ RemoteError::BudgetSpent { .. }) => Err(e.into()),
                // A document longer than the supervisor's context cannot be asked
                // remote-only at all: the job keeps its answer, and the baseline is the
                // estimate, saying why.
                Err(e) => {
                    let mut est = estimate(ledger, &messages, answer);
                    est.error = Some(format!("the remote-only run failed: {e}"));
                    Ok(est)
                }
            }
        }
        Baseline::Estimate => Ok(estimate(ledger, &messages, answer)),
    }
}

/// The remote-only cost estimated from the size of its prompt, at the tokens per byte this
/// job's own supervisor calls measured.
fn estimate(ledger: &Ledger, messages: &[Msg], answer: &str) -> RemoteOnly {
    let sent: u64 = ledger.calls.iter().map(|c| c.prompt_tokens).sum();
    let per_byte = if ledger.remote_prompt_bytes > 0 {
        sent as f64 / ledger.remote_prompt_bytes as f64
    } else {
        0.25
    };
    let bytes: u64 = messages.iter().map(|m| m.content.len() as u64).sum();
    let prompt = (bytes as f64 * per_byte).ceil() as u64;
    // The remote-only answer is about as long as this job's final answer.
    let completion = ((answer.len() as f64 * per_byte).ceil() as u64).max(1);
    RemoteOnly {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        method: Baseline::Estimate,
        answer: None,
        ms: None,
        error: None,
    }
}

fn finish(
    setup: &JobSetup,
    mut ledger: Ledger,
    answer: String,
    explanation: String,
    rounds: u32,
    remote_only: RemoteOnly,
    started: Instant,
) -> JobAnswer {
    // Attach the audits that have finished.
    let audits = setup.dispatcher.audit_log();
    for (rec, id) in ledger.jobs.iter_mut().zip(&ledger.request_ids) {
        rec.audit = audits
            .iter()
            .find(|(_, a)| a.request_id == *id)
            .map(|(_, a)| a.clone());
    }
    let mut remote = RemoteUsage {
        calls: std::mem::take(&mut ledger.calls),
        ..Default::default()
    };
    for c in &remote.calls {
        remote.prompt_tokens += c.prompt_tokens;
        remote.completion_tokens += c.completion_tokens;
    }
    remote.total_tokens = remote.prompt_tokens + remote.completion_tokens;
    let mut local = LocalUsage::default();
    let mut verification = Verification::default();
    let mut regions = BTreeMap::new();
    for j in &ledger.jobs {
        local.prompt_tokens += j.prompt_tokens;
        local.cached_prompt_tokens += j.cached_prompt_tokens;
        local.completion_tokens += j.completion_tokens;
        if j.verified {
            local.jobs += 1;
            verification.verified += 1;
        } else {
            verification.failed_jobs += 1;
        }
        match &j.audit {
            Some(a) if a.passed => verification.audits_passed += 1,
            Some(_) => verification.audits_failed += 1,
            None => {}
        }
        if let Some(r) = &j.region {
            *regions.entry(r.clone()).or_insert(0) += 1;
        }
    }
    local.total_tokens = local.prompt_tokens + local.completion_tokens;
    let ratio = if remote_only.total_tokens > 0 {
        remote.total_tokens as f64 / remote_only.total_tokens as f64
    } else {
        0.0
    };
    JobAnswer {
        id: format!("minions-{}", Id::random().short()),
        object: "minions.job",
        protocol: setup.protocol,
        answer,
        explanation,
        rounds,
        local_model: setup.local_model.clone(),
        remote_model: setup.supervisor.model.clone(),
        timing: Timing {
            total_ms: started.elapsed().as_millis() as u64,
            remote_ms: ledger.remote_ms,
            local_ms: ledger.local_ms,
        },
        usage: Usage {
            remote,
            local,
            remote_only,
            remote_ratio: ratio,
            remote_savings: 1.0 - ratio,
        },
        verification,
        regions,
        grounding: ledger.evidence.counts.clone(),
        evidence: ledger.evidence.evidence,
        notes: ledger.notes,
        jobs: ledger.jobs,
    }
}
