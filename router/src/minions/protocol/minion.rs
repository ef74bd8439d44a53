//! Minion: the supervisor asks, a worker that sees the whole context answers, until the
//! supervisor gives the final answer.

use super::*;

/// The supervisor's next turn in the Minion conversation `sup` (a message for the worker,
/// or the final answer), asked again with the reason up to `plan_retries` times.
pub(super) async fn supervise(
    setup: &JobSetup,
    ledger: &mut Ledger,
    sup: &mut Vec<Msg>,
    round: u32,
    last: bool,
) -> Result<Turn, JobError> {
    let schema = turn_schema(last);
    let asked = ledger
        .ask_until_valid(
            &setup.supervisor,
            sup,
            Some(("minion_turn", &schema)),
            (Purpose::Supervise, round),
            (setup.plan_retries, None),
            |text| parse_turn(text, last),
            |e| {
                format!(
                    "That reply is not valid: {e}. Reply with one JSON object matching the schema, nothing else."
                )
            },
            |_, _, _| {},
        )
        .await?;
    match asked {
        Ok((turn, _, text)) => {
            sup.push(Msg::assistant(text));
            Ok(turn)
        }
        Err((error, attempts)) => Err(JobError::Supervisor {
            what: "turn",
            attempts,
            error,
        }),
    }
}

/// A supervisor's turn: one JSON object, final or asking the worker something (never in
/// the last turn); why it is not valid otherwise.
fn parse_turn(text: &str, last: bool) -> Result<Turn, String> {
    plan::extract_json_object(text)
        .ok_or_else(|| "the reply contains no JSON object".to_string())
        .and_then(|j| serde_json::from_str::<Turn>(j).map_err(|e| e.to_string()))
        .and_then(|t| match t.decision {
            TurnDecision::Final => Ok(t),
            TurnDecision::Ask if last => {
                Err("this is the last turn: the decision must be final".into())
            }
            TurnDecision::Ask if t.message.trim().is_empty() => {
                Err("an ask needs a message".into())
            }
            TurnDecision::Ask => Ok(t),
        })
}

/// The two conversations as they open: the supervisor's (the task and a description of
/// the documents) and the worker's (the whole context).
fn openings(setup: &JobSetup) -> (Vec<Msg>, Vec<ChatMessage>) {
    let context = setup
        .context
        .iter()
        .enumerate()
        .map(|(i, d)| format!("Document {i}:\n{d}"))
        .collect::<Vec<_>>()
        .join("\n\n");
    let sup = vec![
        Msg::system(MINION_SYSTEM),
        Msg::user(format!(
            "Task: {}\n\nThe context:\n{}\n\nYou have {} turn(s). Your first message to the worker?",
            setup.task,
            describe_documents(setup),
            setup.max_rounds
        )),
    ];
    let worker = vec![ChatMessage {
        role: Role::System,
        content: format!(
            "Answer questions about this context, only from it, briefly.\n\n{context}"
        ),
    }];
    (sup, worker)
}

pub(super) async fn minion(
    setup: &JobSetup,
    ledger: &mut Ledger,
) -> Result<(String, String, u32), JobError> {
    let (mut sup, mut worker) = openings(setup);
    for round in 1..=setup.max_rounds {
        let last = round == setup.max_rounds;
        let turn = supervise(setup, ledger, &mut sup, round, last).await?;
        if turn.decision == TurnDecision::Final {
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
        ledger.audits.push(o.audit.clone());
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
pub(super) fn conversation_request(setup: &JobSetup, messages: Vec<ChatMessage>) -> InferRequest {
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
