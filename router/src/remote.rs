//! The remote OpenAI-compatible API: the operator's supervisor for MinionS and the
//! fallback for chat requests the network cannot serve, and the rules for what may go there.

use std::collections::BTreeSet;
use std::time::Duration;

use beacon_proto::Secret;

/// The remote (supervisor / fallback) OpenAI-compatible API.
#[derive(Clone, Debug)]
pub struct Remote {
    /// e.g. `https://api.openai.com/v1`
    pub base_url: String,
    /// Never printed (`Secret`).
    pub api_key: Option<Secret>,
}

/// What may go to the remote API when no provider serves a chat request (reviews H8,
/// M2): the remote is the operator's paid account, and it runs outside the network's
/// regions.
#[derive(Clone, Debug)]
pub struct FallbackPolicy {
    /// Models the remote may be asked for; `None`: any.
    pub models: Option<BTreeSet<String>>,
    /// The most completion tokens a forwarded request may ask for (and what it asks for
    /// when it names no limit).
    pub max_tokens: u64,
    /// The region the remote runs in, as its operator declares it. With
    /// `--allowed-regions`, nothing is forwarded unless it is one of them.
    pub region: Option<String>,
}

impl Default for FallbackPolicy {
    /// Nothing is forwarded until the operator names the models.
    fn default() -> Self {
        FallbackPolicy {
            models: Some(BTreeSet::new()),
            max_tokens: 4096,
            region: None,
        }
    }
}

/// The client for the remote API: bounded connect and read times, and no redirects (a
/// redirect would carry the operator's key, or a job's, somewhere nobody chose: L1).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(900))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap_or_default()
}
