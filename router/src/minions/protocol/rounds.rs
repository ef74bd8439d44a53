//! MinionS: per round, decompose (the plan, or the default plan), execute, filter and
//! aggregate, and the answer kept to the evidence.

use super::*;

/// Chunks the default plan's task runs on at most.
pub(super) const DEFAULT_TOP_K: u32 = 8;
/// Samples per chunk the default plan asks for when the job budget has room: the first
/// greedy, the second sampled. A 135M worker that reads the paragraph holding the fact
/// still misquotes it now and then (the bench's evidence recall was 10 of 12 with one).
pub(super) const DEFAULT_SAMPLES: u32 = 2;

/// The plan a round runs when the supervisor gave no valid one: the job's task as the one
/// instruction, over the paragraphs (sized to the job budget) that match it best, each
/// read twice when the budget has room.
pub(super) fn default_plan(setup: &JobSetup, limits: &Limits) -> Plan {
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
pub(super) fn fitted_default_plan(
    setup: &JobSetup,
    limits: &Limits,
) -> Result<(Plan, Vec<Chunk>), PlanError> {
    let mut p = default_plan(setup, limits);
    fit_chunks(setup, &mut p).map(|chunks| (p, chunks))
}

/// (1) Decompose: the supervisor's plan, checked and fitted to the documents, asked
/// again with the reason up to `plan_retries` times, else the router's default plan (also
/// when the supervisor's plans have rarely been valid). Returns the plan and its chunks,
/// the attempts made, and whether it is the default plan.
pub(super) async fn decompose(
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
        let asked = ledger
            .ask_until_valid(
                planner,
                &mut messages,
                Some(("minions_plan", &plan_schema)),
                (Purpose::Decompose, round),
                (setup.plan_retries, Some(2)),
                |text| {
                    let checked = plan::parse(text, &limits)
                        .and_then(|mut p| fit_chunks(setup, &mut p).map(|chunks| (p, chunks)));
                    if let Some((record, supervisor)) = &setup.plan_record {
                        record.record(supervisor, checked.is_ok());
                    }
                    checked.map_err(|e| e.to_string())
                },
                |e| {
                    format!(
                        "That plan is not valid: {e}. Reply with a corrected plan: one JSON object matching the schema, nothing else."
                    )
                },
                |ledger, attempt, e| {
                    tracing::info!(round, attempt, error = %e, "supervisor plan rejected");
                    ledger.emit(Progress::PlanRejected {
                        round,
                        attempt,
                        error: e.to_string(),
                    });
                },
            )
            .await?;
        match asked {
            Ok((planned, attempt, _)) => (planned, attempt, false),
            Err((e, attempt)) => {
                let fitted =
                    fitted_default_plan(setup, &limits).map_err(|d| JobError::Supervisor {
                        what: "plan",
                        attempts: attempt,
                        error: format!("{e}; nor does the default plan fit: {d}"),
                    })?;
                ledger.notes.push(format!(
                    "round {round}: the supervisor gave no valid plan after {attempt} attempts (last error: {e}); the router's default plan was used"
                ));
                (fitted, attempt, true)
            }
        }
    })
}

/// (3) Filter: only findings whose citation is in their chunk go on, into the job's
/// evidence. Returns how many jobs gave an answer.
pub(super) fn filter(
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
pub(super) fn parse_aggregate(text: &str, last: bool, quotes: usize) -> Result<Aggregate, String> {
    if last {
        let answer = text.trim();
        if answer.is_empty() {
            Err("the reply is empty".to_string())
        } else {
            Ok(Aggregate {
                decision: Decision::Final,
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
    }
}

/// (4) Aggregate: the supervisor's answer from the evidence (in the last round, asked as
/// plain text), asked again with the reason up to `plan_retries` times, else the evidence
/// found most often.
pub(super) async fn aggregate(
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
    let quotes = ledger.evidence.evidence.len();
    let asked = ledger
        .ask_until_valid(
            &setup.supervisor,
            &mut messages,
            (!last).then_some(("minions_aggregate", &schema)),
            (Purpose::Aggregate, round),
            (setup.plan_retries, None),
            |text| parse_aggregate(text, last, quotes),
            |e| {
                if last {
                    "Answer the question in one short sentence from the evidence.".to_string()
                } else {
                    format!(
                        "That reply is not valid: {e}. Reply with one JSON object matching the schema, nothing else."
                    )
                }
            },
            |_, _, _| {},
        )
        .await?;
    let agg = match asked {
        Ok((agg, _, _)) => agg,
        Err((e, attempt)) => {
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
            agg
        }
    };
    Ok(agg)
}

/// A final answer, in any round, that is empty or draws on none of the evidence (a weak
/// supervisor's junk: a list of numbers, a fragment of the prompt) is not passed off as the
/// answer: the evidence found most often is, and the answer says so. Not asked again: a
/// supervisor that wrote junk from this evidence tends to.
pub(super) fn grounded(ledger: &mut Ledger, agg: Aggregate, round: u32, last: bool) -> Aggregate {
    match ledger.evidence.most_seen() {
        Some(best)
            if (last || agg.decision == Decision::Final)
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

pub(super) async fn minions(
    setup: &JobSetup,
    ledger: &mut Ledger,
) -> Result<(String, String, u32), JobError> {
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
        let decision = if last { Decision::Final } else { agg.decision };
        let placed = ledger.jobs.iter().filter(|j| j.round == round).count();
        ledger.emit(Progress::Round {
            round,
            decision: match decision {
                Decision::Final => "final",
                Decision::More => "more",
            }
            .to_string(),
            jobs: placed,
            answered,
            failed: placed.saturating_sub(results.len()),
        });
        if decision == Decision::Final {
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
pub(super) fn from_evidence(best: &crate::minions::evidence::Evidence) -> Aggregate {
    Aggregate {
        decision: Decision::Final,
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
pub(super) fn fit_chunks(setup: &JobSetup, p: &mut Plan) -> Result<Vec<Chunk>, PlanError> {
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

/// The supervisor's evidence listing is at most this long.
pub(super) const EVIDENCE_BYTES: usize = 24_000;
