//! Workload 5: dishonest providers (one per attack, `beacon-node --fault`) next to the
//! honest ones, behind a router that audits: each caught, no honest one quarantined.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use beacon_harness::load::{Target, run_load};
use serde::Serialize;

use super::{Check, Ctx, Scale, Section, establish, question};
use crate::cluster::Cluster;

/// One dishonest provider per attack (`beacon-node --fault`); the quick run keeps the two
/// that each stand for a way of being caught (audit, refusal).
pub fn attacks(quick: bool) -> &'static [&'static str] {
    if quick {
        &["tamper", "wrong-model"]
    } else {
        &[
            "tamper",
            "wrong-model",
            "text",
            "empty",
            "guess-audits",
            "stream",
            "resample",
            "lying-auditor",
            "q3-swap",
            "q2-swap",
        ]
    }
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

/// The attackers of `faults` next to the honest providers, behind a router auditing at the
/// scale's rate; in full runs one more honest provider of another shape.
pub fn run(ctx: &mut Ctx, faults: &[&str]) -> anyhow::Result<DishonestResult> {
    let (op, quick) = (ctx.op.clone(), ctx.quick);
    let rate = ctx.scale.audit_rate.to_string();
    // Honest providers differ in thread count and batch shape, as on a real network
    // (their logits differ a little): one more with two threads and one sequence, in
    // full runs (a quick run keeps its time).
    let shaped = if quick {
        None
    } else {
        Some(ctx.cluster.add_provider_shaped(&op, None, Some((2, 1)))?)
    };
    let auditor = ctx.cluster.add_router(
        &["--audit-rate", &rate, "--attempt-timeout", &ctx.timeout],
        ctx.honest + usize::from(shaped.is_some()),
    )?;
    let other = ctx
        .cluster
        .wan
        .regions()
        .iter()
        .find(|r| **r != op)
        .cloned()
        .unwrap_or(op.clone());
    // The tampering provider sits next to the router, where placement favours it; the
    // others alternate between the far region and the router's.
    let placed: Vec<(&str, &str)> = faults
        .iter()
        .enumerate()
        .map(|(i, f)| {
            (
                if i.is_multiple_of(2) {
                    op.as_str()
                } else {
                    other.as_str()
                },
                *f,
            )
        })
        .collect();
    let d = measure(ctx.cluster, auditor, &placed, ctx.scale, ctx.say);
    ctx.cluster.remove_router(auditor);
    if let Some(i) = shaped {
        ctx.cluster.kill_provider(i);
    }
    d
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
    router: &beacon_harness::RouterServer,
    cluster: &Cluster,
    bad: &[usize],
    verdicts: &mut [Verdict],
) {
    let listed = router.listing();
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

fn measure(
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
    while router.listing().len() < all && start.elapsed() < Duration::from_secs(90) {
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
            .listing()
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

pub fn checks(d: &DishonestResult) -> Vec<Check> {
    let caught = d.providers.iter().filter(|v| v.caught()).count();
    vec![
        Check::new(
            "no honest provider quarantined",
            d.false_quarantines == 0,
            format!(
                "{} of {} honest providers quarantined",
                d.false_quarantines, d.honest
            ),
        ),
        Check::new(
            "dishonest providers quarantined (a lying auditor: or never given a vote)",
            caught == d.providers.len(),
            format!(
                "{caught} of {} within {} requests",
                d.providers.len(),
                d.requests
            ),
        ),
    ]
}

pub fn render(d: &DishonestResult) -> Section {
    Section::new(|m| markdown(m, d), None)
}

fn markdown(m: &mut String, d: &DishonestResult) {
    let _ = writeln!(
        m,
        "\n## 5. Dishonest providers\n\nThe attackers join once the router knows the honest \
         providers ({} of {} past probation after {} requests). Audit rate {:.2}; {} requests \
         in {:.0} s; {} honest providers in the same run, **{} of them quarantined** (false \
         quarantines).\n",
        d.established,
        d.honest,
        d.warmup_requests,
        d.audit_rate,
        d.requests,
        d.seconds,
        d.honest,
        d.false_quarantines
    );
    let _ = writeln!(
        m,
        "| provider | fault | quarantined | after requests | after s | audits run by then | audit tokens by then | its answers delivered | reference checks judged wrongly / given |\n|---|---|---|---|---|---|---|---|---|"
    );
    let opt = |v: Option<f64>| v.map(|x| format!("{x:.0}")).unwrap_or_else(|| "-".into());
    for v in &d.providers {
        let _ = writeln!(
            m,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} / {} |",
            v.name,
            v.fault,
            if v.quarantined {
                "yes"
            } else if v.caught() {
                "no: never given a vote"
            } else {
                "**no**"
            },
            v.requests_until
                .map(|x| x.to_string())
                .unwrap_or_else(|| "-".into()),
            opt(v.seconds_until),
            opt(v.audits_until),
            opt(v.audit_tokens_until),
            v.answers_delivered,
            v.reference_wrong,
            v.reference_checks
        );
    }
}
