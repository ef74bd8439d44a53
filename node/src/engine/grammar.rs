//! Output constraints as llama.cpp grammars: JSON schemas through llama.cpp's own
//! `json_schema_to_grammar`, and a generic JSON-object grammar for `json_object`.

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
