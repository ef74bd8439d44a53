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

/// Sampling time a request may spend under its grammar, on top of [`BUDGET_PER_TOKEN`] for
/// each token sampled or scored. Grammar sampling runs on the model's runner thread, so a
/// schema whose grammar is slow to apply (many alternatives alive at once, each checked
/// against the whole vocabulary) would stall every sequence on the model (review M4).
pub(super) const BUDGET_BASE: Duration = Duration::from_secs(2);
/// Grammar time allowed per token: five times what the MinionS plan and output schemas
/// take (about 10 ms a token for SmolLM2's 49,152-token vocabulary on these CPUs).
pub(super) const BUDGET_PER_TOKEN: Duration = Duration::from_millis(50);

/// The grammar time a request has spent: charged after each constrained sampling or
/// scoring step, refused once it is over [`BUDGET_BASE`] + [`BUDGET_PER_TOKEN`] per token.
#[derive(Debug, Default)]
pub(super) struct Clock {
    spent: Duration,
    tokens: u32,
}

impl Clock {
    /// Adds one step's grammar time; an error once the request is over its budget.
    pub(super) fn charge(&mut self, took: Duration) -> Result<(), EngineError> {
        self.spent += took;
        self.tokens = self.tokens.saturating_add(1);
        if self.spent <= BUDGET_BASE + BUDGET_PER_TOKEN * self.tokens {
            return Ok(());
        }
        Err(EngineError::Grammar(format!(
            "the output grammar took {} ms for {} tokens, over this node's budget of {} ms \
             plus {} ms a token: a schema with fewer alternatives stays under it",
            self.spent.as_millis(),
            self.tokens,
            BUDGET_BASE.as_millis(),
            BUDGET_PER_TOKEN.as_millis()
        )))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{BUDGET_BASE, BUDGET_PER_TOKEN, Clock};

    #[test]
    fn the_clock_allows_a_base_and_a_share_per_token() {
        let mut c = Clock::default();
        // A burst at the start is covered by the base.
        assert!(c.charge(BUDGET_BASE).is_ok());
        for _ in 0..100 {
            assert!(c.charge(BUDGET_PER_TOKEN).is_ok());
        }
        // A step that costs more than its share, once the base is spent, is refused.
        let e = c.charge(BUDGET_PER_TOKEN * 3).unwrap_err().to_string();
        assert!(e.contains("over this node's budget"), "{e}");
        let mut slow = Clock::default();
        let steps = (0..1000)
            .take_while(|_| slow.charge(Duration::from_millis(250)).is_ok())
            .count();
        assert_eq!(steps, 10, "a 250 ms step is refused once the base is spent");
    }
}
