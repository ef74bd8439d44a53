//! A MinionS / Minion job as applications send it to `POST /v1/minions`, its validation,
//! and what comes back (the answer, usage, placement and verification), plus the progress
//! events streamed while it runs.

use serde::{Deserialize, Serialize};

use super::remote::RemoteCall;

/// Which protocol runs the job.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Decompose into many small jobs over chunks, run them on the network, aggregate.
    #[default]
    Minions,
    /// A supervisor/worker conversation where only the worker sees the context.
    Minion,
}

/// How the remote-only baseline is obtained.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Baseline {
    /// From the size of the remote-only prompt, at the tokens-per-byte ratio this job's own
    /// remote calls measured.
    #[default]
    Estimate,
    /// Really ask the supervisor the task with the whole context (costs those tokens).
    Run,
}

/// A supervisor named in the request.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteSpec {
    pub base_url: Option<String>,
    pub model: Option<String>,
    pub api_key: Option<beacon_proto::Secret>,
}

/// Per-job policy; anything left out takes the router's setting.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobPolicy {
    pub allowed_regions: Option<Vec<String>>,
    pub audit_rate: Option<f64>,
    pub max_jobs_per_round: Option<u32>,
    pub plan_retries: Option<u32>,
    pub max_chunk_chars: Option<u32>,
    pub worker_max_tokens: Option<u32>,
    pub remote_only_baseline: Option<Baseline>,
}

/// The body of `POST /v1/minions`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    pub task: String,
    pub context: Vec<String>,
    #[serde(default)]
    pub doc_metadata: Option<String>,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub max_rounds: Option<u32>,
    #[serde(default)]
    pub local_model: Option<String>,
    #[serde(default)]
    pub remote: Option<RemoteSpec>,
    #[serde(default)]
    pub policy: JobPolicy,
    #[serde(default)]
    pub stream: bool,
}

/// Bounds on jobs, set by the router operator.
#[derive(Clone, Debug)]
pub struct JobLimits {
    pub max_task_chars: usize,
    pub max_documents: usize,
    pub max_context_bytes: usize,
    pub max_metadata_chars: usize,
    pub max_rounds: u32,
    pub max_jobs_per_round: u32,
    pub max_plan_retries: u32,
}

impl Default for JobLimits {
    fn default() -> Self {
        JobLimits {
            max_task_chars: 8_000,
            max_documents: 64,
            max_context_bytes: 4 << 20,
            max_metadata_chars: 4_000,
            max_rounds: 8,
            max_jobs_per_round: 512,
            max_plan_retries: 4,
        }
    }
}

/// A request that does not satisfy the limits: which field, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{param}: {message}")]
pub struct Invalid {
    pub param: String,
    pub message: String,
}

fn invalid(param: &str, message: impl Into<String>) -> Invalid {
    Invalid {
        param: param.into(),
        message: message.into(),
    }
}

impl JobRequest {
    /// Checks the request against `limits`.
    pub fn validate(&self, limits: &JobLimits) -> Result<(), Invalid> {
        if self.task.trim().is_empty() {
            return Err(invalid("task", "must not be empty"));
        }
        if self.task.chars().count() > limits.max_task_chars {
            return Err(invalid(
                "task",
                format!("longer than {} characters", limits.max_task_chars),
            ));
        }
        if self.context.is_empty() {
            return Err(invalid("context", "at least one document is required"));
        }
        if self.context.len() > limits.max_documents {
            return Err(invalid(
                "context",
                format!(
                    "{} documents; at most {} are allowed",
                    self.context.len(),
                    limits.max_documents
                ),
            ));
        }
        let bytes: usize = self.context.iter().map(String::len).sum();
        if bytes > limits.max_context_bytes {
            return Err(invalid(
                "context",
                format!(
                    "{bytes} bytes of context; at most {} are allowed",
                    limits.max_context_bytes
                ),
            ));
        }
        if self.context.iter().all(|d| d.trim().is_empty()) {
            return Err(invalid("context", "every document is empty"));
        }
        if self
            .doc_metadata
            .as_ref()
            .is_some_and(|m| m.chars().count() > limits.max_metadata_chars)
        {
            return Err(invalid(
                "doc_metadata",
                format!("longer than {} characters", limits.max_metadata_chars),
            ));
        }
        if let Some(r) = self.max_rounds
            && !(1..=limits.max_rounds).contains(&r)
        {
            return Err(invalid(
                "max_rounds",
                format!("must be 1..={}", limits.max_rounds),
            ));
        }
        let p = &self.policy;
        if let Some(a) = p.audit_rate
            && !(0.0..=1.0).contains(&a)
        {
            return Err(invalid("policy.audit_rate", "must be between 0 and 1"));
        }
        if let Some(n) = p.max_jobs_per_round
            && !(1..=limits.max_jobs_per_round).contains(&n)
        {
            return Err(invalid(
                "policy.max_jobs_per_round",
                format!("must be 1..={}", limits.max_jobs_per_round),
            ));
        }
        if let Some(n) = p.plan_retries
            && n > limits.max_plan_retries
        {
            return Err(invalid(
                "policy.plan_retries",
                format!("at most {}", limits.max_plan_retries),
            ));
        }
        if let Some(n) = p.max_chunk_chars
            && !(200..=200_000).contains(&n)
        {
            return Err(invalid("policy.max_chunk_chars", "must be 200..=200000"));
        }
        if let Some(n) = p.worker_max_tokens
            && !(16..=4096).contains(&n)
        {
            return Err(invalid("policy.worker_max_tokens", "must be 16..=4096"));
        }
        if let Some(regions) = &p.allowed_regions
            && (regions.is_empty() || regions.len() > 64)
        {
            return Err(invalid(
                "policy.allowed_regions",
                "must name 1..=64 regions",
            ));
        }
        Ok(())
    }
}

/// One local job's placement, cost and verification.
#[derive(Clone, Debug, Serialize)]
pub struct JobRecord {
    pub round: u32,
    pub job: usize,
    pub task: String,
    /// `document#chunk`
    pub chunk: String,
    pub sample: u32,
    pub provider: Option<String>,
    pub region: Option<String>,
    pub attempts: usize,
    pub hedged: bool,
    /// Signature, signer, request and model digests all checked.
    pub verified: bool,
    /// The worker gave a non-null answer.
    pub answered: bool,
    pub prompt_tokens: u64,
    /// Prompt tokens the provider served from its KV cache (a prefix it held).
    pub cached_prompt_tokens: u64,
    pub completion_tokens: u64,
    pub ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit: Option<crate::dispatch::AuditOutcome>,
}

impl JobRecord {
    /// A job that has not been answered (yet).
    pub fn new(round: u32, job: usize, task: String, chunk: String, sample: u32, ms: u64) -> Self {
        JobRecord {
            round,
            job,
            task,
            chunk,
            sample,
            provider: None,
            region: None,
            attempts: 0,
            hedged: false,
            verified: false,
            answered: false,
            prompt_tokens: 0,
            cached_prompt_tokens: 0,
            completion_tokens: 0,
            ms,
            error: None,
            audit: None,
        }
    }

    /// The job as the dispatcher's verified `outcome` answered it; `answered`: whether the
    /// worker's output held an answer.
    pub fn answered_by(&mut self, o: &crate::dispatch::Outcome, answered: bool) {
        self.provider = Some(o.provider.to_string());
        self.region = Some(o.region.clone());
        self.attempts = o.attempts;
        self.hedged = o.hedged;
        self.verified = true;
        self.answered = answered;
        self.prompt_tokens = o.result.usage.prompt_tokens as u64;
        self.cached_prompt_tokens = o.result.usage.cached_prompt_tokens as u64;
        self.completion_tokens = o.result.usage.completion_tokens as u64;
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RemoteUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub calls: Vec<RemoteCall>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct LocalUsage {
    pub prompt_tokens: u64,
    /// Of the prompt tokens, those served from a provider's KV cache rather than
    /// prefilled: what sending jobs on one chunk to one provider saved.
    pub cached_prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub jobs: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct RemoteOnly {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub method: Baseline,
    /// The remote-only answer, when it was run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// How long the remote-only call took, when it was run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ms: Option<u64>,
    /// Why the remote-only run asked for failed (a document longer than the supervisor's
    /// context), when it did: the figures are then the estimate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Usage {
    pub remote: RemoteUsage,
    pub local: LocalUsage,
    pub remote_only: RemoteOnly,
    /// Remote tokens this job used / remote tokens a remote-only run would use.
    pub remote_ratio: f64,
    /// 1 - remote_ratio.
    pub remote_savings: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Timing {
    pub total_ms: u64,
    pub remote_ms: u64,
    /// Wall time of the local (network) phases.
    pub local_ms: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Verification {
    pub verified: usize,
    pub failed_jobs: usize,
    pub audits_passed: usize,
    pub audits_failed: usize,
}

/// The answer to a job.
#[derive(Clone, Debug, Serialize)]
pub struct JobAnswer {
    pub id: String,
    pub object: &'static str,
    pub protocol: Protocol,
    pub answer: String,
    pub explanation: String,
    pub rounds: u32,
    pub local_model: String,
    pub remote_model: String,
    pub usage: Usage,
    pub timing: Timing,
    pub verification: Verification,
    /// Providers used per region.
    pub regions: std::collections::BTreeMap<String, usize>,
    /// The grounded evidence the supervisor was shown, every round's (MinionS): quotes
    /// that are in the document, so a reader can check the answer against it.
    pub evidence: Vec<super::evidence::Evidence>,
    /// What grounding kept and dropped of the workers' findings.
    pub grounding: super::evidence::Grounding,
    /// Fallbacks the job took, in words (a default plan when the supervisor gave no valid
    /// one, an answer from the evidence when it could not aggregate).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    pub jobs: Vec<JobRecord>,
}

/// Progress, streamed as SSE events while a job runs.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Progress {
    Plan {
        round: u32,
        attempt: u32,
        plan: super::plan::Plan,
        /// The router's default plan, taken when the supervisor gave no valid one, or
        /// not asked for one (`attempt` 0) as its plans are rarely valid.
        default: bool,
    },
    PlanRejected {
        round: u32,
        attempt: u32,
        error: String,
    },
    JobsPlaced {
        round: u32,
        jobs: usize,
        chunks: usize,
        tasks: usize,
        /// Each task ran on its `top_k` best chunks (0: on every chunk).
        top_k: u32,
    },
    JobFinished(Box<JobRecord>),
    Message {
        round: u32,
        from: &'static str,
        text: String,
    },
    Round {
        round: u32,
        decision: String,
        /// Jobs run this round, failed ones included.
        jobs: usize,
        /// Jobs whose worker found an answer (not null).
        answered: usize,
        /// Jobs that produced no verified result on any provider.
        failed: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: &str) -> Result<JobRequest, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn validation_names_the_field() {
        let l = JobLimits {
            max_documents: 2,
            max_context_bytes: 10,
            ..Default::default()
        };
        let check = |j: &str| req(j).unwrap().validate(&l).map_err(|e| e.param);
        assert_eq!(check(r#"{"task":"q","context":["abc"]}"#), Ok(()));
        assert_eq!(
            check(r#"{"task":"  ","context":["abc"]}"#),
            Err("task".into())
        );
        assert_eq!(check(r#"{"task":"q","context":[]}"#), Err("context".into()));
        assert_eq!(
            check(r#"{"task":"q","context":["a","b","c"]}"#),
            Err("context".into())
        );
        assert_eq!(
            check(r#"{"task":"q","context":["01234567890"]}"#),
            Err("context".into())
        );
        assert_eq!(
            check(r#"{"task":"q","context":["a"],"max_rounds":0}"#),
            Err("max_rounds".into())
        );
        assert_eq!(
            check(r#"{"task":"q","context":["a"],"policy":{"audit_rate":2}}"#),
            Err("policy.audit_rate".into())
        );
        assert!(req(r#"{"task":"q","context":["a"],"code":"import os"}"#).is_err());
        assert!(req(r#"{"task":"q","context":["a"],"protocol":"python"}"#).is_err());
    }
}
