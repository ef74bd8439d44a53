//! What the supervisor and the workers are told: system prompts, the JSON schemas their
//! replies are constrained by, and how the documents are described to a supervisor that
//! never sees them.

use super::*;

/// The worker's reply: the sentence it quotes first, then the answer read from it. (With
/// a 135M worker, "citation" drew made-up URLs and an explanation only cost tokens; the
/// router never forwards a worker's prose anyway.)
pub(super) fn worker_schema() -> Value {
    json!({
        "type": "object", "additionalProperties": false,
        "required": ["sentence", "answer"],
        "properties": {
            "sentence": {"anyOf": [{"type": "string", "maxLength": 300}, {"type": "null"}]},
            "answer": {"anyOf": [{"type": "string", "maxLength": 120}, {"type": "null"}]}
        }
    })
}

pub(super) fn aggregate_schema(last: bool) -> Value {
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

pub(super) fn turn_schema(last: bool) -> Value {
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

pub(super) fn describe_documents(setup: &JobSetup) -> String {
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

pub(super) const DECOMPOSE_SYSTEM: &str = "You supervise small local language models that read long documents for you. \
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
pub(super) const FINAL_SYSTEM: &str = "You answer a question from evidence: sentences quoted from \
documents you cannot see, each checked to be in them, with the answer a reader found there. \
Answer in one short sentence, using only the evidence.";

pub(super) const MINION_SYSTEM: &str = "You supervise a small local language model that can read a \
long context you cannot see. Ask it short, simple questions about the context, one at a \
time, and answer the task from what it tells you. Reply with one JSON object only: \
{\"decision\": \"ask\" to send `message` to the worker, or \"final\" with `answer` and \
`explanation`}.";
