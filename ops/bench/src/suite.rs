//! The suite's workloads, run on a [`Cluster`] (or, for chat load, on routers and nodes
//! deployed elsewhere), each measured against a baseline taken in the same run.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cluster::{Cluster, routable};
use crate::load::{Load, Sample, Target, run_load, run_load_observed};

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
const ADVERT_SETTLE: Duration = Duration::from_millis(2500);

/// Request `i` of every workload: a short question on one of a few topics.
pub fn question(i: usize) -> serde_json::Value {
    const TOPICS: [&str; 8] = [
        "rivers", "bread", "trains", "bees", "glass", "music", "maps", "tides",
    ];
    serde_json::json!([{"role": "user", "content": format!("Write two sentences about {}.", TOPICS[i % TOPICS.len()])}])
}

/// Workload 1: chat load through a router and, as the baseline, straight to one provider.
#[derive(Debug, Default, Serialize)]
pub struct ChatResult {
    /// What the baseline is.
    pub baseline: String,
    pub levels: Vec<ChatLevel>,
    /// One-token answers at concurrency 1: the latency the router adds.
    pub overhead: Option<ChatLevel>,
    /// The router's `/v1/providers` at the end: what placement knew (RTTs, throughput).
    pub providers: serde_json::Value,
}

#[derive(Debug, Default, Serialize)]
pub struct ChatLevel {
    pub concurrency: usize,
    pub direct: Option<Load>,
    pub routed: Load,
    /// Routed requests per region.
    pub regions: Vec<(String, usize)>,
}

fn by_region(samples: &[Sample]) -> Vec<(String, usize)> {
    let mut m = std::collections::BTreeMap::new();
    for s in samples.iter().filter(|s| s.ok()) {
        *m.entry(s.region.clone().unwrap_or_else(|| "?".into()))
            .or_insert(0) += 1;
    }
    m.into_iter().collect()
}

pub fn chat(
    routed: &Target,
    direct: Option<&Target>,
    scale: &Scale,
    say: &dyn Fn(&str),
) -> ChatResult {
    let mut out = ChatResult {
        baseline: direct
            .map(|d| format!("{} called directly", d.name))
            .unwrap_or_else(|| "none (no --direct given)".into()),
        ..ChatResult::default()
    };
    // Warm both paths (model load, QUIC connections) outside the measurement.
    let _ = run_load(routed, 2, 4, question, 4);
    if let Some(d) = direct {
        let _ = run_load(d, 2, 4, question, 4);
    }
    for (k, &c) in scale.concurrency.iter().enumerate() {
        let n = scale.min_requests.max(scale.per_client * c);
        // Alternate which goes first, so neither always runs on a warmer machine. Between
        // the two, one advert interval passes: the direct load makes its provider look busy
        // in its adverts, which would push the routed load elsewhere.
        let pause = || std::thread::sleep(ADVERT_SETTLE);
        let run_direct = || direct.map(|d| run_load(d, c, n, question, scale.max_tokens));
        let (d, r) = if k % 2 == 0 {
            let d = run_direct();
            pause();
            (d, run_load(routed, c, n, question, scale.max_tokens))
        } else {
            let r = run_load(routed, c, n, question, scale.max_tokens);
            pause();
            (run_direct(), r)
        };
        pause();
        if let Some(e) = r.samples.iter().find_map(|s| s.error.as_deref()) {
            say(&format!("chat c={c}: a routed request failed: {e}"));
        }
        say(&format!(
            "chat c={c}: routed {:.1} tok/s p50 {:.0} ms ({} errors){}",
            r.tokens_per_second,
            r.p50_ms,
            r.errors,
            d.as_ref()
                .map(|d| format!(
                    ", direct {:.1} tok/s p50 {:.0} ms ({} errors)",
                    d.tokens_per_second, d.p50_ms, d.errors
                ))
                .unwrap_or_default()
        ));
        out.levels.push(ChatLevel {
            concurrency: c,
            regions: by_region(&r.samples),
            direct: d,
            routed: r,
        });
    }
    let n = scale.min_requests.max(10);
    let d = direct.map(|d| run_load(d, 1, n, question, 1));
    std::thread::sleep(ADVERT_SETTLE);
    let r = run_load(routed, 1, n, question, 1);
    say(&format!(
        "chat 1-token: routed p50 {:.1} ms{}",
        r.p50_ms,
        d.as_ref()
            .map(|d| format!(", direct p50 {:.1} ms", d.p50_ms))
            .unwrap_or_default()
    ));
    out.overhead = Some(ChatLevel {
        concurrency: 1,
        regions: by_region(&r.samples),
        direct: d,
        routed: r,
    });
    out.providers = crate::http::http("GET", &format!("{}/v1/providers", routed.base), None, &[])
        .try_json()
        .unwrap_or_default();
    out
}

/// Workload 3: where the router places work, against the best it could have done.
#[derive(Debug, Default, Serialize)]
pub struct PlacementResult {
    /// The region the router (and the clients) sit in.
    pub operator_region: String,
    /// Each region alone (a router pinned to it): the expected completion time there.
    pub pinned: Vec<PinnedRegion>,
    /// The unpinned router at concurrency 1 and at the load level.
    pub chosen: Vec<Chosen>,
}

#[derive(Debug, Default, Serialize)]
pub struct PinnedRegion {
    pub region: String,
    pub load: Load,
    /// Share of the pinned router's answers that came from inside its region (must be 1).
    pub in_region_share: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct Chosen {
    pub concurrency: usize,
    pub load: Load,
    /// Best single region's p50 at this concurrency.
    pub best_region: String,
    pub best_p50_ms: f64,
    /// Chosen p50 / best p50 (1: as good as the best region; below 1: spreading beat it).
    pub ratio: f64,
    pub regions: Vec<(String, usize)>,
}

pub fn placement(
    cluster: &Cluster,
    unpinned: usize,
    pinned: &[(String, usize)],
    scale: &Scale,
    say: &dyn Fn(&str),
) -> PlacementResult {
    let target = |i: usize, name: &'static str| Target {
        name,
        base: cluster.routers[i].url(""),
        pid: 0,
    };
    let levels = [1, scale.failure_concurrency];
    let n = scale.placement_requests;
    let mut out = PlacementResult {
        operator_region: cluster.wan.operator_region().unwrap_or("none").to_string(),
        ..PlacementResult::default()
    };
    let mut best: Vec<(usize, String, f64)> = Vec::new();
    for &c in &levels {
        for (region, i) in pinned {
            let t = target(*i, "pinned");
            let _ = run_load(&t, 1, 2, question, 4);
            let load = run_load(&t, c, n.max(2 * c), question, scale.max_tokens);
            let inside = load
                .samples
                .iter()
                .filter(|s| s.ok() && s.region.as_deref() == Some(region.as_str()))
                .count();
            let ok = load.samples.iter().filter(|s| s.ok()).count();
            let share = if ok == 0 {
                0.0
            } else {
                inside as f64 / ok as f64
            };
            say(&format!(
                "placement c={c}: pinned to {region}: p50 {:.0} ms, {:.0}% in region, {} errors",
                load.p50_ms,
                share * 100.0,
                load.errors
            ));
            if load.errors < load.requests {
                best.push((c, region.clone(), load.p50_ms));
            }
            out.pinned.push(PinnedRegion {
                region: format!("{region} (c={c})"),
                load,
                in_region_share: share,
            });
        }
        let t = target(unpinned, "unpinned");
        let load = run_load(&t, c, n.max(2 * c), question, scale.max_tokens);
        let (best_region, best_p50) = best
            .iter()
            .filter(|b| b.0 == c)
            .min_by(|a, b| a.2.total_cmp(&b.2))
            .map(|b| (b.1.clone(), b.2))
            .unwrap_or_default();
        let ratio = if best_p50 > 0.0 {
            load.p50_ms / best_p50
        } else {
            0.0
        };
        say(&format!(
            "placement c={c}: chosen p50 {:.0} ms vs best region {best_region} {best_p50:.0} ms ({ratio:.2}x)",
            load.p50_ms
        ));
        out.chosen.push(Chosen {
            concurrency: c,
            regions: by_region(&load.samples),
            load,
            best_region,
            best_p50_ms: best_p50,
            ratio,
        });
    }
    out
}

/// Workload 4: one failure injected a third of the way into a load.
#[derive(Debug, Default, Serialize)]
pub struct FailureResult {
    pub scenario: String,
    /// Seconds into the load when the failure was injected.
    pub event_at_s: f64,
    pub requests: usize,
    pub completed: usize,
    pub failed: usize,
    /// Extra attempts the router made (placed again after a failure).
    pub retries: u64,
    /// From the event to the first success of a request that started after it.
    pub recover_s: Option<f64>,
    /// The slowest answer, against the p50 of the answers before the event.
    pub max_ms: f64,
    pub p50_before_ms: f64,
    pub samples: Vec<Sample>,
    pub note: String,
    /// Every honest provider could be placed on again within two minutes after it.
    pub rejoined: bool,
}

/// Runs a load on router `r` and calls `inject` once a third of it is done.
fn with_failure(
    cluster: &Cluster,
    r: usize,
    scale: &Scale,
    scenario: &str,
    inject: &(dyn Fn() -> String + Sync),
) -> FailureResult {
    let target = Target {
        name: "router",
        base: cluster.routers[r].url(""),
        pid: 0,
    };
    let n = scale.failure_requests;
    let fired = AtomicBool::new(false);
    let event = Mutex::new((None::<Instant>, String::new()));
    let start = Instant::now();
    let load = run_load_observed(
        &target,
        scale.failure_concurrency,
        n,
        question,
        scale.max_tokens,
        |done, _| {
            if done >= n / 3 && !fired.swap(true, Ordering::SeqCst) {
                let note = inject();
                *event.lock().unwrap_or_else(|p| p.into_inner()) = (Some(Instant::now()), note);
            }
        },
    );
    let (at, note) = event.into_inner().unwrap_or_else(|p| p.into_inner());
    let event_at_s = at.map(|t| (t - start).as_secs_f64()).unwrap_or(0.0);
    // Where the work went before and after: a failure nobody's work met proves nothing.
    let (before, after): (Vec<Sample>, Vec<Sample>) = load
        .samples
        .iter()
        .cloned()
        .partition(|s| s.at_s < event_at_s);
    let show = |v: &[(String, usize)]| {
        v.iter()
            .map(|(r, n)| format!("{r} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let note = format!(
        "{note}; answered from {} before, {} after",
        show(&by_region(&before)),
        show(&by_region(&after))
    );
    summarize_failure(scenario, event_at_s, load, note)
}

fn summarize_failure(scenario: &str, event_at_s: f64, load: Load, note: String) -> FailureResult {
    let recover_s = load
        .samples
        .iter()
        .filter(|s| s.ok() && s.at_s >= event_at_s)
        .map(|s| s.at_s + s.ms / 1000.0 - event_at_s)
        .min_by(f64::total_cmp);
    let mut before: Vec<f64> = load
        .samples
        .iter()
        .filter(|s| s.ok() && s.at_s + s.ms / 1000.0 <= event_at_s)
        .map(|s| s.ms)
        .collect();
    before.sort_by(f64::total_cmp);
    FailureResult {
        scenario: scenario.to_string(),
        event_at_s,
        requests: load.requests,
        completed: load.requests - load.errors,
        failed: load.errors,
        retries: load
            .samples
            .iter()
            .map(|s| s.attempts.saturating_sub(1))
            .sum(),
        recover_s,
        max_ms: load.samples.iter().map(|s| s.ms).fold(0.0, f64::max),
        p50_before_ms: crate::load::percentile(&before, 0.5),
        samples: load.samples,
        note,
        rejoined: false,
    }
}

/// Kills a provider mid-load, cuts a region off mid-load, then restarts the router.
pub fn failures(
    cluster: &mut Cluster,
    r: usize,
    scale: &Scale,
    say: &dyn Fn(&str),
) -> anyhow::Result<Vec<FailureResult>> {
    let mut out = Vec::new();
    let honest: Vec<usize> = (0..cluster.providers.len())
        .filter(|&i| cluster.providers[i].alive() && cluster.providers[i].fault.is_none())
        .collect();
    let expect = honest.len();
    // A provider outside the operator's region dies (SIGKILL), the rest carry on.
    let op = cluster.wan.operator_region().map(str::to_string);
    let victim = *honest
        .iter()
        .find(|&&i| Some(&cluster.providers[i].region) != op.as_ref())
        .unwrap_or(&honest[0]);
    let victim_name = cluster.providers[victim].name.clone();
    let pid = cluster.providers[victim].pid();
    let res = with_failure(cluster, r, scale, "provider killed", &|| {
        if let Some(pid) = pid {
            // SAFETY: kill(2) on a child this process started and has not reaped.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL)
            };
        }
        format!("{victim_name} killed with SIGKILL")
    });
    let mut res = res;
    cluster.kill_provider(victim);
    cluster.start_provider(victim)?;
    res.rejoined = wait_routable(cluster, r, expect, say);
    say(&failure_line(&res));
    out.push(res);

    // A whole region cut off: every packet to or from it dropped.
    let cut = cluster
        .wan
        .regions()
        .iter()
        .find(|x| Some(*x) != op.as_ref())
        .cloned();
    if let Some(region) = cut {
        let wan = &cluster.wan;
        let res = with_failure(cluster, r, scale, "region cut off", &|| {
            let _ = wan.set_cut(&region, true);
            format!("{region} cut off")
        });
        let mut res = res;
        cluster.wan.set_cut(&region, false)?;
        res.rejoined = wait_routable(cluster, r, expect, say);
        say(&failure_line(&res));
        out.push(res);
    }

    // The router killed and started again on its data directory.
    let before = Instant::now();
    let t = cluster.restart_router(r, expect)?;
    let target = Target {
        name: "router",
        base: cluster.routers[r].url(""),
        pid: 0,
    };
    let first = run_load(&target, 1, 1, question, scale.max_tokens);
    let recovered = before.elapsed().as_secs_f64();
    let load = run_load(
        &target,
        scale.failure_concurrency,
        scale.failure_requests / 2,
        question,
        scale.max_tokens,
    );
    let mut res = summarize_failure("router restarted", 0.0, load, String::new());
    res.recover_s = first.samples.first().filter(|s| s.ok()).map(|_| recovered);
    res.rejoined = true; // restart_router waited for every provider
    res.note = format!(
        "SIGKILL, then started on its data directory: knew all {expect} providers again after {:.1} s; \
         the load ran after the restart",
        t.as_secs_f64()
    );
    say(&failure_line(&res));
    out.push(res);
    Ok(out)
}

fn failure_line(r: &FailureResult) -> String {
    format!(
        "failure '{}': {} of {} completed, {} retries, recovered in {}{}",
        r.scenario,
        r.completed,
        r.requests,
        r.retries,
        r.recover_s
            .map(|s| format!("{s:.1} s"))
            .unwrap_or_else(|| "never".into()),
        if r.rejoined {
            ""
        } else {
            "; NOT every provider back within two minutes"
        }
    )
}

/// Waits (up to two minutes) until router `r` can place on `n` providers again.
fn wait_routable(cluster: &Cluster, r: usize, n: usize, say: &dyn Fn(&str)) -> bool {
    let start = Instant::now();
    while routable(&cluster.routers[r]) < n && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(250));
    }
    if routable(&cluster.routers[r]) < n {
        let seen: Vec<String> = cluster.routers[r]
            .providers()
            .iter()
            .map(|p| {
                format!(
                    "{} rtt {:?} quarantined {} circuit open {}",
                    p["region"], p["rtt_ms"], p["quarantined"], p["circuit_open"]
                )
            })
            .collect();
        say(&format!(
            "the router can place on fewer than {n} providers after two minutes: {}",
            seen.join("; ")
        ));
        return false;
    }
    true
}

/// Workload 5: dishonest providers against a router that audits.
#[derive(Debug, Default, Serialize)]
pub struct DishonestResult {
    pub audit_rate: f64,
    pub requests: usize,
    pub providers: Vec<Verdict>,
    /// Honest providers the router quarantined (must be 0).
    pub false_quarantines: usize,
    pub honest: usize,
    pub seconds: f64,
    /// Requests the honest providers were sent before the attackers joined, and how many
    /// of them were past probation then.
    pub warmup_requests: usize,
    pub established: usize,
}

#[derive(Debug, Default, Serialize)]
pub struct Verdict {
    pub name: String,
    pub fault: String,
    pub quarantined: bool,
    /// Requests sent (all providers) until it was quarantined.
    pub requests_until: Option<usize>,
    pub seconds_until: Option<f64>,
    /// Audits the router had run (all providers) when it was quarantined.
    pub audits_until: Option<f64>,
    /// Tokens the auditors had scored (all providers) by then.
    pub audit_tokens_until: Option<f64>,
    /// Its answers that reached a client (tampered ones only an audit can catch).
    pub answers_delivered: usize,
    /// Audit votes it cast for the router (a lying auditor's only way to do harm),
    /// reference checks included.
    pub votes_cast: u64,
    /// Reference checks it was given as an auditor (results whose verdict the router
    /// knew), and those it judged wrongly.
    pub reference_checks: u64,
    pub reference_wrong: u64,
}

impl Verdict {
    /// Quarantined, or, for a lying auditor, never trusted with a vote (auditors are drawn
    /// among providers past probation, and it honestly served too little to get there).
    pub fn caught(&self) -> bool {
        self.quarantined || (self.fault == "lying-auditor" && self.votes_cast == 0)
    }
}

impl Verdict {
    /// Provider `i`'s verdict before any request.
    fn of(cluster: &Cluster, i: usize) -> Self {
        Verdict {
            name: cluster.providers[i].name.clone(),
            fault: cluster.providers[i].fault.clone().unwrap_or_default(),
            ..Verdict::default()
        }
    }
}

/// One provider per (region, fault), started and named in the log.
fn add_attackers(
    cluster: &mut Cluster,
    faults: &[(&str, &str)],
    say: &dyn Fn(&str),
) -> anyhow::Result<Vec<usize>> {
    let mut bad = Vec::new();
    for (region, fault) in faults {
        let i = cluster.add_provider(region, Some(fault))?;
        say(&format!(
            "dishonest provider {} ({fault}) up in {region}",
            cluster.providers[i].name
        ));
        bad.push(i);
    }
    Ok(bad)
}

/// What the router's record says each dishonest provider did as an auditor: votes cast,
/// reference checks and how many it got wrong.
fn votes(
    router: &crate::cluster::Router,
    cluster: &Cluster,
    bad: &[usize],
    verdicts: &mut [Verdict],
) {
    let listed = router.providers();
    for (v, &i) in verdicts.iter_mut().zip(bad) {
        let id = cluster.providers[i].peer_id.as_str();
        if let Some(p) = listed.iter().find(|p| p["peer_id"].as_str() == Some(id)) {
            let n = |k: &str| p["stats"][k].as_u64().unwrap_or(0);
            v.votes_cast = n("votes_agreed") + n("outvoted");
            v.reference_checks = n("reference_checks");
            v.reference_wrong = n("reference_wrong");
        }
    }
}

pub fn dishonest(
    cluster: &mut Cluster,
    r: usize,
    faults: &[(&str, &str)],
    scale: &Scale,
    say: &dyn Fn(&str),
) -> anyhow::Result<DishonestResult> {
    // The attackers join a network whose honest providers the router already knows (the
    // threat a new key poses): the router's record of them is built first.
    let honest = cluster.providers.iter().filter(|p| p.alive()).count();
    let (warmup, established) = {
        let router = &cluster.routers[r];
        let target = Target {
            name: "auditing router",
            base: router.url(""),
            pid: 0,
        };
        establish(router, &target, honest, 4, scale.max_tokens)
    };
    say(&format!(
        "dishonest: {established} of {honest} honest providers past probation after {warmup} requests"
    ));
    let bad = add_attackers(cluster, faults, say)?;
    let all = cluster.providers.iter().filter(|p| p.alive()).count();
    let router = &cluster.routers[r];
    // Wait until the router sees every provider, the dishonest ones included.
    let start = Instant::now();
    while router.providers().len() < all && start.elapsed() < Duration::from_secs(90) {
        std::thread::sleep(Duration::from_millis(250));
    }
    let target = Target {
        name: "auditing router",
        base: router.url(""),
        pid: 0,
    };
    let mut verdicts: Vec<Verdict> = bad.iter().map(|&i| Verdict::of(cluster, i)).collect();
    let start = Instant::now();
    let mut sent = 0;
    let quarantined = |id: &str| {
        router
            .providers()
            .iter()
            .any(|p| p["peer_id"].as_str() == Some(id) && p["quarantined"].as_bool() == Some(true))
    };
    while sent < scale.dishonest_budget && verdicts.iter().any(|v| !v.quarantined) {
        let batch = run_load(&target, 2, 4, |k| question(sent + k), scale.max_tokens);
        sent += batch.requests;
        for (v, &i) in verdicts.iter_mut().zip(&bad) {
            let id = &cluster.providers[i].peer_id;
            v.answers_delivered += batch
                .samples
                .iter()
                .filter(|s| s.ok() && s.provider.as_deref() == Some(id.as_str()))
                .count();
            if !v.quarantined && quarantined(id) {
                v.quarantined = true;
                v.requests_until = Some(sent);
                v.seconds_until = Some(start.elapsed().as_secs_f64());
                v.audits_until = Some(router.metric("beacon_router_audits_total", ""));
                v.audit_tokens_until = Some(router.metric("beacon_router_audit_tokens_total", ""));
                say(&format!(
                    "{} ({}) quarantined after {sent} requests, {:.0} audits",
                    v.name,
                    v.fault,
                    v.audits_until.unwrap_or(0.0)
                ));
            }
        }
    }
    let honest: Vec<&str> = cluster
        .providers
        .iter()
        .filter(|p| p.alive() && p.fault.is_none())
        .map(|p| p.peer_id.as_str())
        .collect();
    let false_q = honest.iter().filter(|id| quarantined(id)).count();
    votes(router, cluster, &bad, &mut verdicts);
    for v in verdicts.iter().filter(|v| !v.caught()) {
        say(&format!(
            "{} ({}) NOT quarantined within {sent} requests",
            v.name, v.fault
        ));
    }
    let out = DishonestResult {
        warmup_requests: warmup,
        established,
        audit_rate: scale.audit_rate,
        requests: sent,
        providers: verdicts,
        false_quarantines: false_q,
        honest: honest.len(),
        seconds: start.elapsed().as_secs_f64(),
    };
    // The later workloads run on honest providers only.
    for i in bad {
        cluster.kill_provider(i);
    }
    Ok(out)
}

/// Workload 6: what audits cost honest traffic. The same chat load runs alternately
/// through a router auditing at its default rate and one that never audits, over the same
/// honest providers, after a warm-up that takes them past probation at the auditing one.
#[derive(Debug, Default, Serialize)]
pub struct AuditCost {
    /// The auditing router's `--audit-rate`.
    pub rate: f64,
    pub concurrency: usize,
    /// Alternating rounds per router.
    pub rounds: usize,
    /// Requests the warm-up took, and providers past probation after it.
    pub warmup_requests: usize,
    pub established: usize,
    pub honest: usize,
    pub audited: Load,
    pub plain: Load,
    /// Audited tokens/s over plain tokens/s (1: audits cost nothing).
    pub throughput_ratio: f64,
    /// Audited p50 over plain p50.
    pub p50_ratio: f64,
    /// Audits run, tokens the auditors scored, and tokens served (prompt and completion)
    /// by the auditing router during the measurement.
    pub audits: f64,
    pub audit_tokens: f64,
    pub served_tokens: f64,
    /// `audit_tokens / served_tokens`.
    pub cost_share: f64,
}

/// Sends chat load through `router` until `providers` of them are past probation there
/// (new identities are audited at half their traffic until 3 audits pass), within a
/// bounded number of requests; returns the requests sent and the providers established.
fn establish(
    router: &crate::cluster::Router,
    target: &Target,
    providers: usize,
    concurrency: usize,
    max_tokens: u32,
) -> (usize, usize) {
    let past_probation = || {
        router
            .providers()
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

/// Runs workload 6 with routers `audited` (default audit rate) and `plain` (rate 0).
pub fn audit_cost(
    cluster: &Cluster,
    audited: usize,
    plain: usize,
    rate: f64,
    scale: &Scale,
    say: &dyn Fn(&str),
) -> AuditCost {
    let (ra, rp) = (&cluster.routers[audited], &cluster.routers[plain]);
    let target = |r: &crate::cluster::Router, name| Target {
        name,
        base: r.url(""),
        pid: 0,
    };
    let (ta, tp) = (target(ra, "auditing router"), target(rp, "plain router"));
    let c = scale.failure_concurrency;
    let honest = cluster.providers.iter().filter(|p| p.alive()).count();
    let (warmup, established) = establish(ra, &ta, honest, c, scale.max_tokens);
    let _ = run_load(&tp, c, 2 * c, question, scale.max_tokens);
    std::thread::sleep(ADVERT_SETTLE);
    let counters = || {
        (
            ra.metric("beacon_router_audits_total", ""),
            ra.metric("beacon_router_audit_tokens_total", ""),
            ra.metric("beacon_router_tokens_total", ""),
        )
    };
    let before = counters();
    let rounds = 2 * (scale.concurrency.len() / 2).max(1);
    let n = scale.min_requests.max(scale.per_client * c);
    let (mut a, mut p) = (Vec::new(), Vec::new());
    let (mut a_s, mut p_s) = (0.0, 0.0);
    for k in 0..rounds {
        // Alternate which goes first, so neither always runs on a warmer machine.
        let order: [(&Target, bool); 2] = if k % 2 == 0 {
            [(&ta, true), (&tp, false)]
        } else {
            [(&tp, false), (&ta, true)]
        };
        for (t, is_audited) in order {
            let l = run_load(t, c, n, |i| question(k * n + i), scale.max_tokens);
            if is_audited {
                a_s += l.seconds;
                a.extend(l.samples);
            } else {
                p_s += l.seconds;
                p.extend(l.samples);
            }
            // Audits of the last answers finish in the background before the next load.
            std::thread::sleep(ADVERT_SETTLE);
        }
    }
    let after = counters();
    let (audited_load, plain_load) = (
        crate::load::summarize(c, a_s, a),
        crate::load::summarize(c, p_s, p),
    );
    let ratio = |x: f64, y: f64| if y > 0.0 { x / y } else { 0.0 };
    let out = AuditCost {
        rate,
        concurrency: c,
        rounds,
        warmup_requests: warmup,
        established,
        honest,
        throughput_ratio: ratio(audited_load.tokens_per_second, plain_load.tokens_per_second),
        p50_ratio: ratio(audited_load.p50_ms, plain_load.p50_ms),
        audits: after.0 - before.0,
        audit_tokens: after.1 - before.1,
        served_tokens: after.2 - before.2,
        cost_share: ratio(after.1 - before.1, after.2 - before.2),
        audited: audited_load,
        plain: plain_load,
    };
    say(&format!(
        "audits at {rate}: {:.1} tok/s audited vs {:.1} plain ({:.2}x), p50 {:.2}x; {:.0} audits scored {:.0} tokens, {:.1} % of the {:.0} served",
        out.audited.tokens_per_second,
        out.plain.tokens_per_second,
        out.throughput_ratio,
        out.p50_ratio,
        out.audits,
        out.audit_tokens,
        100.0 * out.cost_share,
        out.served_tokens
    ));
    out
}
