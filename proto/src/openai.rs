//! Pieces of OpenAI's chat request that the node and the router read alike, so a client
//! gets the same answer from either: message content as a string or an array of parts,
//! and a clear refusal of the fields Beacon does not serve instead of silently ignoring
//! them.

use serde::Deserialize;
use serde_json::Value;

use crate::{ChatMessage, Role};

/// Sampling defaults of the OpenAI surface where a request leaves a field out: llama.cpp
/// server's, which the node's API follows and the router applies too, so that a request
/// sent to a provider directly and the same request routed draw from one distribution.
pub mod defaults {
    pub const TEMPERATURE: f32 = 0.8;
    pub const TOP_P: f32 = 1.0;
    pub const TOP_K: u32 = 40;
    pub const MIN_P: f32 = 0.05;
}

/// One message of a chat request.
#[derive(Clone, Debug, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

impl Message {
    /// Message `i` as Beacon's: a known role (`developer` is `system`) and its text;
    /// otherwise the field (`messages[i].role`, `messages[i].content[j].type`) and why.
    pub fn into_chat(self, i: usize) -> Result<ChatMessage, (String, String)> {
        let role = match self.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return Err((
                    format!("messages[{i}].role"),
                    format!("unsupported role {other:?}"),
                ));
            }
        };
        let content = match self.content {
            None => String::new(),
            Some(c) => c.into_text().map_err(|(j, kind)| {
                (
                    format!("messages[{i}].content[{j}].type"),
                    format!("content part type {kind:?} is not supported"),
                )
            })?,
        };
        Ok(ChatMessage { role, content })
    }
}

/// A message's `content`: a string, or an array of parts (only text parts are served).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// One part of an array `content`.
#[derive(Clone, Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

impl Content {
    /// The text: a string as it is, text parts joined. A part of another type (an image,
    /// audio, a file) is refused with its index and type.
    pub fn into_text(self) -> Result<String, (usize, String)> {
        match self {
            Content::Text(t) => Ok(t),
            Content::Parts(parts) => {
                let mut out = String::new();
                for (i, p) in parts.into_iter().enumerate() {
                    if p.kind != "text" {
                        return Err((i, p.kind));
                    }
                    out.push_str(&p.text.unwrap_or_default());
                }
                Ok(out)
            }
        }
    }
}

/// Request fields that change what an answer must be and that Beacon does not serve.
/// Each is accepted at its no-op value (what clients send by default) and otherwise
/// refused by [`Unserved::check`].
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Unserved {
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    functions: Option<Vec<Value>>,
    #[serde(default)]
    function_call: Option<Value>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default)]
    top_logprobs: Option<u32>,
}

impl Unserved {
    /// The first field set to something Beacon cannot do, with why.
    pub fn check(&self) -> Result<(), (&'static str, &'static str)> {
        let none_or = |v: &Option<Value>, ok: &str| {
            v.as_ref()
                .is_none_or(|v| v.is_null() || v.as_str() == Some(ok))
        };
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) || !none_or(&self.tool_choice, "none")
        {
            return Err((
                "tools",
                "tool calls are not served: the answer would be text that ignores the tools",
            ));
        }
        if self.functions.as_ref().is_some_and(|f| !f.is_empty())
            || !none_or(&self.function_call, "none")
        {
            return Err(("functions", "function calls are not served"));
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(("n", "only one choice per request (n = 1) is served"));
        }
        if self.logprobs == Some(true) || self.top_logprobs.is_some_and(|n| n > 0) {
            return Err(("logprobs", "log probabilities are not returned"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(v: Value) -> Result<String, (usize, String)> {
        serde_json::from_value::<Content>(v).unwrap().into_text()
    }

    fn unserved(v: Value) -> Result<(), (&'static str, &'static str)> {
        serde_json::from_value::<Unserved>(v).unwrap().check()
    }

    #[test]
    fn content_is_a_string_or_text_parts() {
        assert_eq!(content(serde_json::json!("hi")).unwrap(), "hi");
        let parts =
            serde_json::json!([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]);
        assert_eq!(content(parts).unwrap(), "ab");
        let image = serde_json::json!([{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}]);
        assert_eq!(content(image), Err((1, "image_url".into())));
    }

    #[test]
    fn no_op_values_pass_and_the_rest_is_named() {
        let ok = serde_json::json!({"tools": [], "tool_choice": "none", "n": 1, "logprobs": false, "top_logprobs": 0});
        assert_eq!(unserved(ok), Ok(()));
        assert_eq!(unserved(serde_json::json!({})), Ok(()));
        let tools = serde_json::json!({"tools": [{"type": "function", "function": {"name": "f"}}]});
        assert_eq!(unserved(tools).unwrap_err().0, "tools");
        assert_eq!(
            unserved(serde_json::json!({"tool_choice": "required"}))
                .unwrap_err()
                .0,
            "tools"
        );
        assert_eq!(unserved(serde_json::json!({"n": 2})).unwrap_err().0, "n");
        assert_eq!(
            unserved(serde_json::json!({"logprobs": true}))
                .unwrap_err()
                .0,
            "logprobs"
        );
        assert_eq!(
            unserved(serde_json::json!({"top_logprobs": 3}))
                .unwrap_err()
                .0,
            "logprobs"
        );
    }
}
