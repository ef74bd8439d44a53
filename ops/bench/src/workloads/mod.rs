//! The suite's workloads, one module each: `run` measures it (against a baseline taken in
//! the same run), `checks` says what must hold whatever the speed, `render` writes its
//! section of the report (Markdown, and a figure where it draws one).

pub mod audits;
pub mod chat;
pub mod dishonest;
pub mod engine;
pub mod failures;
pub mod minions;
pub mod placement;

use std::time::Duration;

use beacon_harness::load::{Sample, Target, run_load};
use serde::Serialize;

use crate::cluster::Cluster;

/// How much of each workload to run.
#[derive(Clone, Debug, Serialize)]
pub struct Scale {
    pub concurrency: Vec<usize>,
    /// Requests per concurrency level: `max(min_requests, per_client * concurrency)`.
    pub min_requests: usize,
    pub per_client: usize,
    /// Tokens per answer.
    pub max_tokens: u32,
    /// Requests per pinned router in the placement workload.
    pub placement_requests: usize,
    /// Requests per failure scenario.
    pub failure_requests: usize,
    pub failure_concurrency: usize,
    /// Most requests sent to catch dishonest providers.
    pub dishonest_budget: usize,
    /// Audit rate of the router that faces dishonest providers.
    pub audit_rate: f64,
    /// Per-attempt timeout of the routers, seconds.
    pub attempt_timeout: u64,
    /// MinionS: how much of the bundled report (characters), how many questions, and the
    /// rounds each job may take.
    pub minions_chars: usize,
    pub minions_questions: usize,
    pub minions_rounds: u32,
    /// Most local jobs per MinionS round (a plan with more gets larger chunks); `None`: the
    /// router's default.
    pub minions_max_jobs: Option<u32>,
}

impl Scale {
    pub fn quick() -> Scale {
        Scale {
            concurrency: vec![1, 4],
            min_requests: 6,
            per_client: 2,
            max_tokens: 16,
            placement_requests: 6,
            failure_requests: 12,
            failure_concurrency: 4,
            // Runs stop as soon as both are caught (8 to 24 requests so far); the budget
            // only bounds a run where one is not.
            dishonest_budget: 80,
            audit_rate: 0.3,
            attempt_timeout: 20,
            minions_chars: 8_300,
            minions_questions: 1,
            minions_rounds: 2,
            minions_max_jobs: Some(12),
        }
    }

    pub fn full() -> Scale {
        Scale {
            concurrency: vec![1, 2, 4, 8],
            min_requests: 12,
            per_client: 4,
            max_tokens: 32,
            placement_requests: 16,
            failure_requests: 32,
            failure_concurrency: 4,
            dishonest_budget: 240,
            audit_rate: 0.1,
            attempt_timeout: 20,
            minions_chars: usize::MAX,
            minions_questions: 4,
            minions_rounds: 2,
            minions_max_jobs: None,
        }
    }
}

/// Longer than the providers' advert interval (2 s): what a router knows of their load is
/// fresh again after it.
pub(crate) const ADVERT_SETTLE: Duration = Duration::from_millis(2500);

/// Request `i` of every workload: a short question on one of a few topics.
pub fn question(i: usize) -> serde_json::Value {
    const TOPICS: [&str; 8] = [
        "rivers", "bread", "trains", "bees", "glass", "music", "maps", "tides",
    ];
    serde_json::json!([{"role": "user", "content": format!("Write two sentences about {}.", TOPICS[i % TOPICS.len()])}])
}

/// The suite's workloads, as `--only` names them, in the order they run.
/// The suite's workloads, as `--only` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// beacon-node against llama-server, same model and settings.
    Engine,
    /// Chat load through the router and direct.
    Chat,
    /// MinionS jobs and their remote-only baseline.
    Minions,
    /// Placement and residency.
    Placement,
    /// What audits cost honest traffic.
    Audits,
    /// One dishonest provider per attack.
    Dishonest,
    /// Providers killed, partitioned and restarted under load.
    Failures,
}

/// What must hold whatever the speed; a failed check fails the run.
#[derive(Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

impl Check {
    pub fn new(name: impl Into<String>, passed: bool, detail: String) -> Check {
        Check {
            name: name.into(),
            passed,
            detail,
        }
    }
}

/// A workload's part of the report: its Markdown section and, where it draws one, its
/// figure (the file name and the SVG).
pub struct Section {
    pub markdown: String,
    pub figure: Option<(&'static str, crate::chart::Svg)>,
}

impl Section {
    /// The Markdown that `write` appends, and the figure, if any.
    pub fn new(
        write: impl FnOnce(&mut String),
        figure: Option<(&'static str, crate::chart::Svg)>,
    ) -> Section {
        let mut markdown = String::new();
        write(&mut markdown);
        Section { markdown, figure }
    }
}

/// What a workload on the cluster is given.
pub struct Ctx<'a> {
    pub cluster: &'a mut Cluster,
    /// The router every workload may use: never audits.
    pub main: usize,
    /// Honest providers up at the start.
    pub honest: usize,
    /// The routers' `--attempt-timeout`, seconds.
    pub timeout: String,
    /// The region the routers and the clients sit in.
    pub op: String,
    pub scale: &'a Scale,
    pub quick: bool,
    pub say: &'a dyn Fn(&str),
}

/// Answered requests per region.
pub(crate) fn by_region(samples: &[Sample]) -> Vec<(String, usize)> {
    let mut m = std::collections::BTreeMap::new();
    for s in samples.iter().filter(|s| s.ok()) {
        *m.entry(s.region.clone().unwrap_or_else(|| "?".into()))
            .or_insert(0) += 1;
    }
    m.into_iter().collect()
}

/// Sends chat load through `router` until `providers` of them are past probation there
/// (new identities are audited at half their traffic until 3 audits pass), within a
/// bounded number of requests; returns the requests sent and the providers established.
pub(crate) fn establish(
    router: &beacon_harness::RouterServer,
    target: &Target,
    providers: usize,
    concurrency: usize,
    max_tokens: u32,
) -> (usize, usize) {
    let past_probation = || {
        router
            .listing()
            .iter()
            .filter(|p| p["stats"]["audits_passed"].as_u64().unwrap_or(0) >= 3)
            .count()
    };
    let mut sent = 0;
    while past_probation() < providers && sent < 30 * providers {
        sent += run_load(
            target,
            concurrency,
            2 * concurrency,
            |i| question(sent + i),
            max_tokens,
        )
        .requests;
    }
    (sent, past_probation())
}
