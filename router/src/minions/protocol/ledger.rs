//! A job's accounting: every supervisor call and local job, the remote-only baseline
//! (measured or estimated), and the answer with its usage, timing and verification.

use super::*;

/// Accumulates a job's accounting.
pub(super) struct Ledger {
    pub(super) calls: Vec<RemoteCall>,
    pub(super) jobs: Vec<JobRecord>,
    /// The audit of each entry of `jobs`, when it was drawn for one.
    pub(super) audits: Vec<Option<AuditHandle>>,
    pub(super) remote_ms: u64,
    pub(super) local_ms: u64,
    /// Bytes of the prompts sent to the supervisor, to calibrate the baseline estimate.
    pub(super) remote_prompt_bytes: u64,
    pub(super) progress: Option<mpsc::UnboundedSender<Progress>>,
    pub(super) budget: Option<crate::minions::budget::Budget>,
    /// Grounded findings over every round.
    pub(super) evidence: Collector,
    /// Fallbacks taken, for the answer.
    pub(super) notes: Vec<String>,
}

impl Ledger {
    pub(super) fn emit(&self, p: Progress) {
        if let Some(tx) = &self.progress {
            let _ = tx.send(p);
        }
    }

    /// Asks the supervisor until `parse` accepts its reply, up to `retries` times more: a
    /// refused reply goes back into `messages` with the reason as `again` words it (after
    /// cutting `messages` back to its first `keep` when given: earlier refusals add tokens,
    /// not help), and `refused` hears of each refusal. `Ok` holds the value, the attempts
    /// made and the reply; `Err`, once the retries are spent, the last reason and the
    /// attempts made.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn ask_until_valid<T>(
        &mut self,
        sup: &Supervisor,
        messages: &mut Vec<Msg>,
        schema: Option<(&str, &Value)>,
        (purpose, round): (Purpose, u32),
        (retries, keep): (u32, Option<usize>),
        mut parse: impl FnMut(&str) -> Result<T, String>,
        again: impl Fn(&str) -> String,
        mut refused: impl FnMut(&mut Ledger, u32, &str),
    ) -> Result<Result<(T, u32, String), (String, u32)>, JobError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let text = self.ask(sup, messages, schema, purpose, round).await?;
            let e = match parse(&text) {
                Ok(v) => return Ok(Ok((v, attempt, text))),
                Err(e) => e,
            };
            refused(self, attempt, &e);
            if attempt > retries {
                return Ok(Err((e, attempt)));
            }
            if let Some(n) = keep {
                messages.truncate(n);
            }
            messages.push(Msg::assistant(text));
            messages.push(Msg::user(again(&e)));
        }
    }

    pub(super) async fn ask(
        &mut self,
        sup: &Supervisor,
        messages: &[Msg],
        schema: Option<(&str, &Value)>,
        purpose: Purpose,
        round: u32,
    ) -> Result<String, RemoteError> {
        // A conversation that already holds a rejected reply is a retry: sample, so that a
        // deterministic supervisor can answer differently.
        let retry = messages.iter().filter(|m| m.role == "assistant").count() > 0
            && purpose != Purpose::Supervise;
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
        if purpose != Purpose::RemoteOnly {
            self.remote_prompt_bytes +=
                messages.iter().map(|m| m.content.len() as u64).sum::<u64>();
        }
        self.calls.push(call);
        Ok(text)
    }
}

/// The remote tokens a remote-only run (the supervisor given the task and every document)
/// would use: measured by running it, or estimated from its prompt size at this job's
/// measured tokens per byte.
pub(super) async fn baseline(
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
                .ask(&setup.supervisor, &messages, None, Purpose::RemoteOnly, 0)
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
pub(super) fn estimate(ledger: &Ledger, messages: &[Msg], answer: &str) -> RemoteOnly {
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

pub(super) fn finish(
    setup: &JobSetup,
    mut ledger: Ledger,
    answer: String,
    explanation: String,
    rounds: u32,
    remote_only: RemoteOnly,
    started: Instant,
) -> JobAnswer {
    // Attach the audits that have been decided.
    for (rec, audit) in ledger.jobs.iter_mut().zip(&ledger.audits) {
        rec.audit = audit.as_ref().and_then(AuditHandle::outcome);
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
