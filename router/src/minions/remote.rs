//! The supervisor: any OpenAI-compatible chat endpoint. Every call's prompt and completion
//! tokens are recorded (from the endpoint's `usage`; when an endpoint omits it, an estimate
//! that is marked as one), so a job's remote cost adds up exactly.

use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};

use crate::remote::Remote;

/// The largest supervisor reply read.
const MAX_REPLY_BYTES: usize = 4 << 20;

/// What a supervisor call is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// A MinionS plan.
    Decompose,
    /// A MinionS round's answer from the evidence.
    Aggregate,
    /// The supervisor's turn in a Minion conversation.
    Supervise,
    /// The remote-only baseline: the task and every document.
    RemoteOnly,
}

/// One remote call, as reported in a job's usage.
#[derive(Clone, Debug, Serialize)]
pub struct RemoteCall {
    pub purpose: Purpose,
    pub round: u32,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// True when the endpoint reported no usage and the counts are estimates.
    pub estimated: bool,
    pub ms: u64,
}

/// A chat message for the supervisor.
#[derive(Clone, Debug, Serialize)]
pub struct Msg {
    pub role: &'static str,
    pub content: String,
}

impl Msg {
    pub fn system(c: impl Into<String>) -> Self {
        Msg {
            role: "system",
            content: c.into(),
        }
    }
    pub fn user(c: impl Into<String>) -> Self {
        Msg {
            role: "user",
            content: c.into(),
        }
    }
    pub fn assistant(c: impl Into<String>) -> Self {
        Msg {
            role: "assistant",
            content: c.into(),
        }
    }
}

/// Why a supervisor call failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("the supervisor at {url} could not be reached: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the supervisor answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("the supervisor's reply is not an OpenAI chat completion: {0}")]
    Malformed(String),
    #[error(
        "this client's MinionS budget of {tokens} supervisor tokens is spent; it renews in {renews_in_s} s"
    )]
    BudgetSpent { tokens: u64, renews_in_s: u64 },
}

/// A client for one supervisor model.
#[derive(Clone)]
pub struct Supervisor {
    http: reqwest::Client,
    remote: Remote,
    pub model: String,
    /// Largest completion asked for per call.
    pub max_tokens: u32,
    /// Deadline of one call, reading the whole reply included.
    pub timeout: Duration,
}

impl Supervisor {
    /// A call's deadline unless the router sets one (`--remote-timeout`).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(900);

    pub fn new(http: reqwest::Client, remote: Remote, model: String) -> Self {
        Supervisor {
            http,
            remote,
            model,
            max_tokens: 1024,
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// One chat call at a sampling temperature (retries use one above zero, so a
    /// deterministic supervisor does not repeat the same invalid reply); with `schema`, the
    /// reply is constrained to it where the endpoint supports `response_format:
    /// json_schema` (the caller still validates it).
    pub async fn chat_at(
        &self,
        messages: &[Msg],
        schema: Option<(&str, &Value)>,
        purpose: Purpose,
        round: u32,
        temperature: f32,
    ) -> Result<(String, RemoteCall), RemoteError> {
        let started = std::time::Instant::now();
        let mut body = json!({
            "model": self.model,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": self.max_tokens,
        });
        if let Some((name, schema)) = schema {
            body["response_format"] = json!({
                "type": "json_schema",
                "json_schema": {"name": name, "schema": schema, "strict": true}
            });
        }
        let url = format!(
            "{}/chat/completions",
            self.remote.base_url.trim_end_matches('/')
        );
        let mut req = self.http.post(&url).timeout(self.timeout).json(&body);
        if let Some(k) = &self.remote.api_key {
            req = req.bearer_auth(k.expose());
        }
        let unreachable = |e: reqwest::Error| RemoteError::Unreachable {
            url: url.clone(),
            reason: e.to_string(),
        };
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        let bytes = read_bounded(resp).await.map_err(unreachable)?;
        if !status.is_success() {
            let mut text = String::from_utf8_lossy(&bytes).into_owned();
            text.truncate(500);
            return Err(RemoteError::Status {
                status: status.as_u16(),
                body: text,
            });
        }
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|e| RemoteError::Malformed(format!("not JSON: {e}")))?;
        let text = v["choices"][0]["message"]["content"]
            .as_str()
            .ok_or_else(|| RemoteError::Malformed("no choices[0].message.content".into()))?
            .to_string();
        let (prompt, completion, estimated) = match (
            v["usage"]["prompt_tokens"].as_u64(),
            v["usage"]["completion_tokens"].as_u64(),
        ) {
            (Some(p), Some(c)) => (p, c, false),
            _ => {
                let chars: usize = messages.iter().map(|m| m.content.len()).sum();
                (chars as u64 / 4, text.len() as u64 / 4, true)
            }
        };
        Ok((
            text,
            RemoteCall {
                purpose,
                round,
                prompt_tokens: prompt,
                completion_tokens: completion,
                estimated,
                ms: started.elapsed().as_millis() as u64,
            },
        ))
    }
}

async fn read_bounded(mut resp: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if out.len() + chunk.len() > MAX_REPLY_BYTES {
            break;
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}
