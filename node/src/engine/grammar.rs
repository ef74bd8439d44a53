//! Output constraints as llama.cpp grammars: JSON schemas through llama.cpp's own
//! `json_schema_to_grammar`, and a generic JSON-object grammar for `json_object`.

use std::time::Duration;

use super::{EngineError, OutputFormat};

/// Any JSON object (llama.cpp's `json.gbnf`, rooted at an object).
const JSON_OBJECT: &str = r#"
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws ::= | " " | "\n" [ \t]{0,20}
"#;

/// Longest schema accepted.
const MAX_SCHEMA_BYTES: usize = 64 << 10;

/// The GBNF grammar for a format, or `None` for free text.
pub fn for_format(format: &OutputFormat) -> Result<Option<String>, EngineError> {
    match format {
        OutputFormat::Text => Ok(None),
        OutputFormat::JsonObject => Ok(Some(JSON_OBJECT.to_string())),
        OutputFormat::JsonSchema(schema) => {
            if schema.len() > MAX_SCHEMA_BYTES {
                return Err(EngineError::Grammar(format!(
                    "schema is over {MAX_SCHEMA_BYTES} bytes"
                )));
            }
            // llama.cpp's converter aborts on some malformed input; only valid JSON reaches it.
            serde_json::from_str::<serde_json::Value>(schema)
                .map_err(|e| EngineError::Grammar(format!("schema is not valid JSON: {e}")))?;
            llama_cpp_2::json_schema_to_grammar(schema)
                .map(Some)
                .map_err(|e| EngineError::Grammar(format!("unsupported schema: {e}")))
        }
    }
}

/// Sampling time (CPU time of the runner thread) a request may spend under its grammar, on top of [`PER_VOCAB_ENTRY`] per
/// token. Grammar sampling runs on the model's runner thread, so a schema whose grammar is
/// slow to apply (many alternatives alive at once, each checked against the whole
/// vocabulary) would stall every sequence on the model (review M4).
pub(super) const BUDGET_BASE: Duration = Duration::from_secs(2);
/// Grammar time allowed per token and per vocabulary entry (a grammar is applied to every
/// candidate token): about ten times what the MinionS plan and output schemas take here
/// (10 ms a token for SmolLM2's 49,152 entries, 40 to 90 ms for Gemma 3's 262,144), so
/// 98 ms a token for SmolLM2 and 524 ms for Gemma 3.
pub(super) const PER_VOCAB_ENTRY: Duration = Duration::from_nanos(2_000);

/// CPU time the calling thread has used. Grammar time is counted in it, not in wall time,
/// so a runner thread the OS leaves waiting on a busy machine is not charged for the wait
/// (grammars are applied on the runner thread, by llama.cpp, without helper threads).
#[allow(unsafe_code)] // one libc call, SAFETY below
pub(super) fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid, exclusive pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// The grammar time a request has spent: charged after each constrained sampling or
/// scoring step, refused once it is over [`BUDGET_BASE`] plus the per-token allowance.
#[derive(Debug)]
pub(super) struct Clock {
    per_token: Duration,
    spent: Duration,
    tokens: u32,
}

impl Clock {
    /// A clock for a model with `n_vocab` vocabulary entries.
    pub(super) fn new(n_vocab: u32) -> Clock {
        Clock {
            per_token: PER_VOCAB_ENTRY * n_vocab.max(1),
            spent: Duration::ZERO,
            tokens: 0,
        }
    }

    /// Adds one step's grammar time; an error once the request is over its budget.
    pub(super) fn charge(&mut self, took: Duration) -> Result<(), EngineError> {
        self.spent += took;
        self.tokens = self.tokens.saturating_add(1);
        if self.spent <= BUDGET_BASE + self.per_token * self.tokens {
            return Ok(());
        }
        Err(EngineError::Grammar(format!(
            "the output grammar took {} ms for {} tokens, over this node's budget of {} ms \
             plus {} ms a token: a schema with fewer alternatives stays under it",
            self.spent.as_millis(),
            self.tokens,
            BUDGET_BASE.as_millis(),
            self.per_token.as_millis()
        )))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{BUDGET_BASE, Clock, thread_cpu_time};

    #[test]
    fn thread_cpu_time_counts_work_not_waiting() {
        let start = thread_cpu_time();
        std::thread::sleep(Duration::from_millis(50));
        let slept = thread_cpu_time().saturating_sub(start);
        let start = thread_cpu_time();
        let wall = std::time::Instant::now();
        let mut x = 0u64;
        while thread_cpu_time().saturating_sub(start) < Duration::from_millis(20)
            && wall.elapsed() < Duration::from_secs(10)
        {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(
            slept < Duration::from_millis(20),
            "{slept:?} of CPU while asleep"
        );
        assert!(
            thread_cpu_time().saturating_sub(start) >= Duration::from_millis(20),
            "10 s of spinning did not show as CPU time ({x} rounds)"
        );
    }

    #[test]
    fn the_clock_allows_a_base_and_a_share_per_token() {
        // 50,000 entries: 100 ms a token.
        let per_token = Duration::from_millis(100);
        let mut c = Clock::new(50_000);
        // A burst at the start is covered by the base.
        assert!(c.charge(BUDGET_BASE).is_ok());
        for _ in 0..100 {
            assert!(c.charge(per_token).is_ok());
        }
        // A step that costs more than its share, once the base is spent, is refused.
        let e = c.charge(per_token * 3).unwrap_err().to_string();
        assert!(e.contains("over this node's budget"), "{e}");
        let mut slow = Clock::new(50_000);
        let steps = (0..1000)
            .take_while(|_| slow.charge(Duration::from_millis(500)).is_ok())
            .count();
        assert_eq!(steps, 5, "a 500 ms step is refused once the base is spent");
        // A larger vocabulary is allowed more per token.
        let mut big = Clock::new(250_000);
        assert!((0..100).all(|_| big.charge(Duration::from_millis(400)).is_ok()));
    }
}
