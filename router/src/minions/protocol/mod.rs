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
//!
//! Here: the job's setup, its errors and `run`; the rounds of MinionS in [`rounds`], their
//! local jobs in [`worker`], the Minion conversation in [`minion`], prompts and schemas in
//! [`prompts`], and the accounting in [`ledger`].

mod ledger;
mod minion;
mod prompts;
mod rounds;
mod worker;

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
use super::remote::{Msg, Purpose, RemoteCall, RemoteError, Supervisor};
use super::retrieval;
use crate::dispatch::{AuditHandle, DispatchError, Dispatcher, SharedPrefix};
use crate::placement::Policy;
use ledger::{Ledger, baseline, finish};
use minion::minion;
use prompts::*;
use rounds::minions;
use worker::*;

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

/// A supervisor's decision after a MinionS round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Decision {
    /// The answer is final.
    Final,
    /// Another round, with what the scratchpad carries.
    More,
}

/// A supervisor's decision in a Minion conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum TurnDecision {
    /// The answer is final.
    Final,
    /// A message for the worker.
    Ask,
}

/// What the supervisor returns when aggregating.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Aggregate {
    decision: Decision,
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
    decision: TurnDecision,
    #[serde(default)]
    message: String,
    #[serde(default)]
    answer: String,
    #[serde(default)]
    explanation: String,
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
        audits: Vec::new(),
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

fn floor_char_boundary(s: &str, at: usize) -> usize {
    if at >= s.len() {
        return s.len();
    }
    (0..=at).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0)
}

fn shorten(s: &str, n: usize) -> &str {
    &s[..floor_char_boundary(s, n)]
}
