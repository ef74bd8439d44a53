//! The supervisor's decomposition plan. MinionS' reference implementation has the remote
//! model write Python that is executed; Beacon never executes model output: the supervisor
//! returns JSON, which is parsed strictly (unknown fields are errors) and validated against
//! limits here. An invalid plan goes back to the supervisor with the error text.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// How documents are cut into chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    Chars,
    Paragraphs,
    /// Pages separated by form feeds (`\f`), as text extracted from PDFs has them.
    Pages,
    /// Approximate tokens (0.75 words per token), cut at word boundaries.
    Tokens,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chunking {
    pub strategy: Strategy,
    pub size: u32,
    #[serde(default)]
    pub overlap: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    pub id: String,
    pub instruction: String,
    #[serde(default)]
    pub advice: String,
}

fn one() -> u32 {
    1
}

/// A validated plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub chunking: Chunking,
    pub tasks: Vec<TaskSpec>,
    #[serde(default = "one")]
    pub samples_per_task: u32,
    /// Run each task on the `top_k` chunks that best match it (ranked by the router,
    /// BM25); 0 runs it on every chunk.
    #[serde(default)]
    pub top_k: u32,
}

/// Bounds a plan must respect. The schema the supervisor is given ([`schema`]) and the
/// validator ([`validate`]) both read them, with [`MAX_ID_CHARS`]: one source, so the
/// supervisor is never held to one length and judged by another.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_tasks: usize,
    pub max_samples: u32,
    pub max_instruction_chars: usize,
    pub max_advice_chars: usize,
    pub max_top_k: u32,
}

impl Default for Limits {
    fn default() -> Self {
        // Small enough that the longest plan the schema allows is about 1,400 characters:
        // a supervisor that fills every field to its bound (a small model looping) still
        // closes its reply in a bounded time. A 135M supervisor's plans ran to 700-1,400
        // tokens with 200-character instructions and 120 of advice, most of a job's remote
        // tokens and time; a concrete instruction fits in 160, advice in 60.
        Limits {
            max_tasks: 4,
            max_samples: 4,
            max_instruction_chars: 160,
            max_advice_chars: 60,
            max_top_k: 64,
        }
    }
}

/// Longest task id.
pub const MAX_ID_CHARS: usize = 32;
/// Characters a task id may use.
pub const ID_CHARS: fn(char) -> bool = |c| c.is_ascii_alphanumeric() || c == '_' || c == '-';

/// Why a plan was refused; the text is sent back to the supervisor.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid plan: {0}")]
pub struct PlanError(pub String);

/// Every strategy.
pub const STRATEGIES: [Strategy; 4] = [
    Strategy::Chars,
    Strategy::Paragraphs,
    Strategy::Pages,
    Strategy::Tokens,
];

impl Strategy {
    /// The name plans use.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Chars => "chars",
            Strategy::Paragraphs => "paragraphs",
            Strategy::Pages => "pages",
            Strategy::Tokens => "tokens",
        }
    }
}

/// Allowed chunk sizes per strategy.
pub fn size_bounds(s: Strategy) -> (u32, u32) {
    match s {
        Strategy::Chars => (200, 50_000),
        Strategy::Paragraphs => (1, 200),
        Strategy::Pages => (1, 50),
        Strategy::Tokens => (50, 12_000),
    }
}

/// Largest chunk size of any strategy, and so of the schema's `size`.
const MAX_SIZE: u32 = 50_000;

/// The JSON schema of a plan, for the supervisor's `response_format`, made from the same
/// bounds [`validate`] checks: the number of tasks and samples, `top_k`, and the length of
/// ids, instructions and advice. Every string and number is bounded, so a reply the grammar
/// constrains always closes within [`max_reply_chars`]. The size per chunking strategy,
/// the overlap against the size and the characters of ids are the validator's alone:
/// stated in the grammar (one branch per strategy, an id pattern), they made a small test
/// supervisor's plans slower to come right (`reliability.rs`' MinionS test took 231 s
/// instead of 132 s).
pub fn schema(limits: &Limits) -> Value {
    json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["chunking", "tasks", "samples_per_task"],
        "properties": {
            "chunking": {
                "type": "object", "additionalProperties": false,
                "required": ["strategy", "size", "overlap"],
                "properties": {
                    "strategy": {"enum": STRATEGIES.map(Strategy::name)},
                    "size": {"type": "integer", "minimum": 1, "maximum": MAX_SIZE},
                    "overlap": {"type": "integer", "minimum": 0, "maximum": MAX_SIZE / 2}
                }
            },
            "tasks": {
                "type": "array", "minItems": 1, "maxItems": limits.max_tasks,
                "items": {
                    "type": "object", "additionalProperties": false,
                    "required": ["id", "instruction", "advice"],
                    "properties": {
                        "id": {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS},
                        "instruction": {"type": "string", "minLength": 1,
                                        "maxLength": limits.max_instruction_chars},
                        "advice": {"type": "string", "maxLength": limits.max_advice_chars}
                    }
                }
            },
            "samples_per_task": {"type": "integer", "minimum": 1, "maximum": limits.max_samples},
            "top_k": {"type": "integer", "minimum": 0, "maximum": limits.max_top_k}
        }
    })
}

/// An upper bound on the characters of a plan that [`schema`] lets through, written
/// compactly with unescaped strings: the completion budget a plan call needs so that the
/// constrained reply closes rather than being cut off (a token is at least a character).
pub fn max_reply_chars(limits: &Limits) -> usize {
    // Keys, quotes, braces and separators of one task and of the plan around the tasks.
    const TASK_SYNTAX: usize = 48;
    const PLAN_SYNTAX: usize = 160;
    let task = MAX_ID_CHARS + limits.max_instruction_chars + limits.max_advice_chars;
    PLAN_SYNTAX + limits.max_tasks * (task + TASK_SYNTAX)
}

/// The first balanced JSON object in `text` (supervisors often wrap JSON in prose or code
/// fences). Strings and escapes are respected; nothing is evaluated.
pub fn extract_json_object(text: &str) -> Option<&str> {
    let start = text.find('{')?;
    let (mut depth, mut in_str, mut escaped) = (0usize, false, false);
    for (i, c) in text[start..].char_indices() {
        if in_str {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&text[start..start + i + 1]);
                }
            }
            _ => {}
        }
    }
    None
}

/// Parses and validates a supervisor's reply as a plan.
pub fn parse(text: &str, limits: &Limits) -> Result<Plan, PlanError> {
    let json = extract_json_object(text)
        .ok_or_else(|| PlanError("the reply contains no JSON object".into()))?;
    let mut plan: Plan = serde_json::from_str(json).map_err(|e| PlanError(e.to_string()))?;
    normalize(&mut plan);
    validate(&plan, limits)?;
    Ok(plan)
}

/// Harmless slips small supervisors make, repaired rather than sent back: a task repeated
/// word for word is dropped, and an id reused for a different task gets a suffix (ids are
/// only labels for grouping findings).
pub fn normalize(plan: &mut Plan) {
    let mut seen_tasks = HashSet::new();
    plan.tasks.retain(|t| {
        seen_tasks.insert((
            t.instruction.trim().to_string(),
            t.advice.trim().to_string(),
        ))
    });
    let mut ids: HashSet<String> = HashSet::new();
    for t in &mut plan.tasks {
        if !ids.contains(&t.id) {
            ids.insert(t.id.clone());
            continue;
        }
        if let Some(free) = (2..)
            .map(|n| {
                let suffix = format!("-{n}");
                let keep = MAX_ID_CHARS.saturating_sub(suffix.len());
                format!("{}{suffix}", t.id.chars().take(keep).collect::<String>())
            })
            .find(|c| !ids.contains(c))
        {
            t.id = free.clone();
            ids.insert(free);
        }
    }
}

/// Checks a plan against the limits.
pub fn validate(plan: &Plan, limits: &Limits) -> Result<(), PlanError> {
    let err = |m: String| Err(PlanError(m));
    let (lo, hi) = size_bounds(plan.chunking.strategy);
    if !(lo..=hi).contains(&plan.chunking.size) {
        return err(format!(
            "chunking.size must be {lo}..={hi} for {:?}",
            plan.chunking.strategy
        ));
    }
    // Windows advance by size - overlap: an overlap near the size multiplies the chunks
    // (size 50000, overlap 49999 makes one window per character). At most half keeps every
    // character in at most two chunks.
    if plan.chunking.overlap > plan.chunking.size / 2 {
        return err(format!(
            "chunking.overlap must be at most half of chunking.size ({})",
            plan.chunking.size / 2
        ));
    }
    if plan.tasks.is_empty() || plan.tasks.len() > limits.max_tasks {
        return err(format!("tasks must have 1..={} items", limits.max_tasks));
    }
    if !(1..=limits.max_samples).contains(&plan.samples_per_task) {
        return err(format!(
            "samples_per_task must be 1..={}",
            limits.max_samples
        ));
    }
    if plan.top_k > limits.max_top_k {
        return err(format!("top_k must be 0..={}", limits.max_top_k));
    }
    let mut ids = HashSet::new();
    for (i, t) in plan.tasks.iter().enumerate() {
        let valid_id =
            !t.id.is_empty() && t.id.chars().count() <= MAX_ID_CHARS && t.id.chars().all(ID_CHARS);
        if !valid_id {
            return err(format!(
                "tasks[{i}].id must be 1-{MAX_ID_CHARS} of [A-Za-z0-9_-]"
            ));
        }
        if !ids.insert(t.id.as_str()) {
            return err(format!("tasks[{i}].id {:?} is repeated", t.id));
        }
        if t.instruction.trim().is_empty() {
            return err(format!("tasks[{i}].instruction is empty"));
        }
        if t.instruction.chars().count() > limits.max_instruction_chars {
            return err(format!(
                "tasks[{i}].instruction is longer than {} characters",
                limits.max_instruction_chars
            ));
        }
        if t.advice.chars().count() > limits.max_advice_chars {
            return err(format!(
                "tasks[{i}].advice is longer than {} characters",
                limits.max_advice_chars
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{prop_assert_eq, proptest};

    const GOOD: &str = r#"{"chunking":{"strategy":"paragraphs","size":3,"overlap":1},
        "tasks":[{"id":"t1","instruction":"Find the total revenue in 2023.","advice":"Look for tables."}],
        "samples_per_task":1}"#;

    #[test]
    fn accepts_a_plan_wrapped_in_prose_and_fences() {
        let text = format!("Here is the plan:\n```json\n{GOOD}\n```\nGood luck {{}}");
        let plan = parse(&text, &Limits::default()).unwrap();
        assert_eq!(plan.chunking.strategy, Strategy::Paragraphs);
        assert_eq!(plan.tasks[0].id, "t1");
    }

    #[test]
    fn refuses_code_extra_fields_and_bad_values() {
        let l = Limits::default();
        let cases = [
            (
                r#"{"code":"import os; os.system('rm -rf /')"}"#,
                "unknown field",
            ),
            (
                &GOOD.replace(
                    r#""samples_per_task":1"#,
                    r#""samples_per_task":1,"exec":"x""#,
                ),
                "unknown field",
            ),
            (&GOOD.replace(r#""size":3"#, r#""size":0"#), "chunking.size"),
            (&GOOD.replace(r#""overlap":1"#, r#""overlap":3"#), "overlap"),
            // The chunk bomb: one window per character of the document.
            (
                &GOOD.replace(
                    r#""strategy":"paragraphs","size":3,"overlap":1"#,
                    r#""strategy":"chars","size":50000,"overlap":49999"#,
                ),
                "at most half",
            ),
            (
                &GOOD.replace(r#""overlap":1"#, r#""overlap":2"#),
                "at most half",
            ),
            (&GOOD.replace(r#""id":"t1""#, r#""id":"t 1; drop""#), "id"),
            (
                &GOOD.replace("Find the total revenue in 2023.", "  "),
                "instruction is empty",
            ),
            (
                &GOOD.replace(r#""samples_per_task":1"#, r#""samples_per_task":9"#),
                "samples_per_task",
            ),
            (&GOOD.replace("paragraphs", "sentences"), "unknown variant"),
            ("no json here", "no JSON object"),
        ];
        for (text, expect) in cases {
            let e = parse(text, &l).unwrap_err();
            assert!(e.0.contains(expect), "{text}: {e}");
        }
        let two = GOOD.replace(
            r#"[{"id":"t1","instruction":"Find the total revenue in 2023.","advice":"Look for tables."}]"#,
            r#"[{"id":"a","instruction":"x"},{"id":"a","instruction":"y"}]"#,
        );
        // Repeated ids are renamed and repeated tasks dropped (see `normalize`); `validate`
        // alone still refuses repeated ids.
        let p = parse(&two, &l).unwrap();
        let ids: Vec<_> = p.tasks.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, ["a", "a-2"]);
        let same = GOOD.replace(
            r#"[{"id":"t1","instruction":"Find the total revenue in 2023.","advice":"Look for tables."}]"#,
            r#"[{"id":"a","instruction":"x"},{"id":"a","instruction":"x"}]"#,
        );
        assert_eq!(parse(&same, &l).unwrap().tasks.len(), 1);
        let mut raw: Plan = serde_json::from_str(extract_json_object(&two).unwrap()).unwrap();
        assert!(validate(&raw, &l).unwrap_err().0.contains("repeated"));
        normalize(&mut raw);
        assert!(validate(&raw, &l).is_ok());
    }

    #[test]
    fn schema_names_every_field() {
        let s = schema(&Limits::default()).to_string();
        for f in [
            "chunking",
            "strategy",
            "overlap",
            "tasks",
            "instruction",
            "advice",
            "samples_per_task",
        ] {
            assert!(s.contains(f));
        }
    }

    /// One source of truth: every bound the schema states is the validator's bound, at the
    /// bound accepted and one past it refused.
    #[test]
    fn the_schema_and_the_validator_hold_the_same_bounds() {
        let l = Limits::default();
        let s = schema(&l);
        let p = &s["properties"];
        let task = &p["tasks"]["items"]["properties"];
        let n = |v: &Value| v.as_u64().unwrap() as usize;
        let base: Plan = serde_json::from_str(GOOD).unwrap();
        let check = |what: &str, at: Plan, past: Plan| {
            assert!(validate(&at, &l).is_ok(), "{what} at the schema's bound");
            assert!(
                validate(&past, &l).is_err(),
                "{what} past the schema's bound"
            );
        };
        let with_task = |f: &dyn Fn(&mut TaskSpec)| {
            let mut p = base.clone();
            f(&mut p.tasks[0]);
            p
        };
        let max_id = n(&task["id"]["maxLength"]);
        check(
            "id",
            with_task(&|t| t.id = "a".repeat(max_id)),
            with_task(&|t| t.id = "a".repeat(max_id + 1)),
        );
        assert!(validate(&with_task(&|t| t.id = "a.b".into()), &l).is_err());
        let max_instr = n(&task["instruction"]["maxLength"]);
        check(
            "instruction",
            with_task(&|t| t.instruction = "x".repeat(max_instr)),
            with_task(&|t| t.instruction = "x".repeat(max_instr + 1)),
        );
        let max_advice = n(&task["advice"]["maxLength"]);
        check(
            "advice",
            with_task(&|t| t.advice = "x".repeat(max_advice)),
            with_task(&|t| t.advice = "x".repeat(max_advice + 1)),
        );
        let tasks = |k: usize| {
            let mut p = base.clone();
            p.tasks = (0..k)
                .map(|i| TaskSpec {
                    id: format!("t{i}"),
                    instruction: format!("Find fact {i}."),
                    advice: String::new(),
                })
                .collect();
            p
        };
        check(
            "tasks",
            tasks(n(&p["tasks"]["maxItems"])),
            tasks(n(&p["tasks"]["maxItems"]) + 1),
        );
        assert!(validate(&tasks(n(&p["tasks"]["minItems"]) - 1), &l).is_err());
        let samples = |k: usize| Plan {
            samples_per_task: k as u32,
            ..base.clone()
        };
        let max_samples = n(&p["samples_per_task"]["maximum"]);
        check("samples", samples(max_samples), samples(max_samples + 1));
        assert!(validate(&samples(n(&p["samples_per_task"]["minimum"]) - 1), &l).is_err());
        let top = |k: usize| Plan {
            top_k: k as u32,
            ..base.clone()
        };
        let max_top = n(&p["top_k"]["maximum"]);
        check("top_k", top(max_top), top(max_top + 1));
        assert_eq!(n(&p["top_k"]["minimum"]), 0);
        assert!(validate(&top(0), &l).is_ok());
        // Every strategy the schema names, the plan type takes.
        for name in p["chunking"]["properties"]["strategy"]["enum"]
            .as_array()
            .unwrap()
        {
            serde_json::from_value::<Strategy>(name.clone()).unwrap();
        }
        // A renamed repeated id stays within the bound.
        let mut twice = tasks(2);
        twice.tasks[1].id = "a".repeat(max_id);
        twice.tasks[0].id = "a".repeat(max_id);
        twice.tasks[1].instruction = "Another.".into();
        normalize(&mut twice);
        assert!(validate(&twice, &l).is_ok(), "{:?}", twice.tasks);
    }

    /// The longest plan the schema lets through fits the completion budget a plan call is
    /// given, so a constrained reply closes.
    #[test]
    fn the_longest_plan_fits_the_reply_budget() {
        let l = Limits::default();
        let s = schema(&l);
        let p = &s["properties"];
        let n = |v: &Value| v.as_u64().unwrap();
        let longest = Plan {
            chunking: Chunking {
                strategy: Strategy::Paragraphs,
                size: n(&p["chunking"]["properties"]["size"]["maximum"]) as u32,
                overlap: n(&p["chunking"]["properties"]["overlap"]["maximum"]) as u32,
            },
            tasks: (0..l.max_tasks)
                .map(|i| TaskSpec {
                    id: format!("{i}").repeat(MAX_ID_CHARS),
                    instruction: "x".repeat(l.max_instruction_chars),
                    advice: "y".repeat(l.max_advice_chars),
                })
                .collect(),
            samples_per_task: l.max_samples,
            top_k: l.max_top_k,
        };
        let text = serde_json::to_string(&longest).unwrap();
        assert!(
            text.len() <= max_reply_chars(&l),
            "{} > {}",
            text.len(),
            max_reply_chars(&l)
        );
        assert!(max_reply_chars(&l) < text.len() * 2);
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,400}") {
            let _ = parse(&text, &Limits::default());
        }

        #[test]
        fn extraction_finds_the_object_after_noise(prefix in "[^{}\"]{0,50}", suffix in ".{0,50}") {
            let text = format!("{prefix}{GOOD}{suffix}");
            prop_assert_eq!(extract_json_object(&text), Some(GOOD));
        }
    }
}
