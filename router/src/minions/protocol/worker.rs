//! A round's local jobs: which (task, chunk, sample) run, their requests with the prompt
//! prefix they share, and their dispatch on the network with bounded parallelism.

use super::*;

/// A local job that completed: which task and chunk (indices into the plan's tasks and the
/// round's chunks), what the worker said, and who said it.
pub(super) struct JobResult {
    pub(super) task: usize,
    pub(super) chunk: usize,
    pub(super) output: Option<WorkerOutput>,
    pub(super) provider: String,
}

/// Runs every job of a round on the network; returns the jobs that completed, in job order.
pub(super) async fn execute(
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
                (i, r, t0.elapsed().as_millis() as u64)
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
    while let Some((i, r, ms)) = stream.next().await {
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
        // Audits run in the background; their outcomes are attached at the end.
        let mut audit = None;
        match r {
            Ok(o) => {
                audit = o.audit.clone();
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
        ledger.audits.push(audit);
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
pub(super) fn job_specs(
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
pub(super) fn job_requests(
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
pub(super) fn worker_request(
    setup: &JobSetup,
    job_id: Id,
    schema: &str,
    (t, single): (&crate::minions::plan::TaskSpec, bool),
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
pub(super) fn answer_text(w: &WorkerOutput) -> Option<String> {
    match w.answer.as_ref()? {
        Value::Null => None,
        Value::String(s) if s.trim().is_empty() || s.trim().eq_ignore_ascii_case("null") => None,
        Value::String(s) => Some(s.trim().to_string()),
        other => Some(other.to_string()),
    }
}
