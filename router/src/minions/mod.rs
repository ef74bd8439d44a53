//! MinionS and Minion over the network: the supervisor's plan as data validated against a
//! schema ([`plan`]), document chunking ([`chunk`]), the supervisor client with exact token
//! accounting ([`remote`]), chunks ranked per task ([`retrieval`]), grounded evidence
//! ([`evidence`]), the job request and answer ([`job`]) and the protocols themselves
//! ([`protocol`]), served at `POST /v1/minions`.

pub mod budget;
pub mod chunk;
pub mod client;
pub mod evidence;
pub mod job;
pub use beacon_proto::plan;
pub mod protocol;
pub mod remote;
pub mod retries;
pub mod retrieval;

/// The router's MinionS settings.
#[derive(Clone, Debug, Default)]
pub struct MinionsConfig {
    /// Local model when a job names none.
    pub local_model: Option<String>,
    /// Supervisor model on the configured remote API when a job names none.
    pub remote_model: Option<String>,
    /// Accept a supervisor URL and key in the request. Off by default: a router that
    /// fetches any URL a client names can be turned against its own network.
    pub allow_remote_override: bool,
    /// Deadline of one supervisor call (None: [`remote::Supervisor::DEFAULT_TIMEOUT`]). A CPU-hosted
    /// supervisor reading a long prompt needs minutes.
    pub remote_timeout: Option<std::time::Duration>,
    pub limits: job::JobLimits,
    /// Whether each supervisor's plan retries have been paying off.
    pub plan_record: std::sync::Arc<retries::PlanRecord>,
}
