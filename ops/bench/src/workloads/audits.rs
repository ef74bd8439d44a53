//! Workload 6: what audits at the router's default rate cost honest traffic, against a
//! router that never audits, over the same providers.

use std::fmt::Write as _;

use beacon_harness::load::{Load, Target, run_load};
use serde::Serialize;

use super::{ADVERT_SETTLE, Check, Ctx, Scale, Section, establish, question};
use crate::cluster::Cluster;

/// The router's default rate (`--audit-rate` 0.05), stated so the report says it.
const DEFAULT_AUDIT_RATE: f64 = 0.05;

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

/// A router auditing at the default rate against the main one, which never audits.
pub fn run(ctx: &mut Ctx) -> anyhow::Result<AuditCost> {
    let rate = DEFAULT_AUDIT_RATE.to_string();
    let auditing = ctx.cluster.add_router(
        &["--audit-rate", &rate, "--attempt-timeout", &ctx.timeout],
        ctx.honest,
    )?;
    let c = measure(
        ctx.cluster,
        auditing,
        ctx.main,
        DEFAULT_AUDIT_RATE,
        ctx.scale,
        ctx.say,
    );
    ctx.cluster.remove_router(auditing);
    Ok(c)
}

/// Runs workload 6 with routers `audited` (default audit rate) and `plain` (rate 0).
fn measure(
    cluster: &Cluster,
    audited: usize,
    plain: usize,
    rate: f64,
    scale: &Scale,
    say: &dyn Fn(&str),
) -> AuditCost {
    let (ra, rp) = (&cluster.routers[audited], &cluster.routers[plain]);
    let target = |r: &beacon_harness::RouterServer, name| Target {
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
        beacon_harness::load::summarize(c, a_s, a),
        beacon_harness::load::summarize(c, p_s, p),
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

/// A quick run sends a few dozen requests: at a 5 % rate that is one or two audits, too
/// few for a share to mean anything, so only the full run checks it.
pub fn checks(c: &AuditCost, quick: bool) -> Vec<Check> {
    if quick {
        return Vec::new();
    }
    vec![Check::new(
        "audits cost at most 10 % of served tokens",
        c.audits > 0.0 && c.cost_share <= 0.10,
        format!(
            "{:.0} audits scored {:.0} tokens: {:.1} % of {:.0} served",
            c.audits,
            c.audit_tokens,
            100.0 * c.cost_share,
            c.served_tokens
        ),
    )]
}

pub fn render(c: &AuditCost) -> Section {
    Section::new(|m| markdown(m, c), None)
}

fn markdown(m: &mut String, c: &AuditCost) {
    let _ = writeln!(
        m,
        "\n## 6. What audits cost\n\nThe same chat load (concurrency {}, {} alternating rounds \
         each) through a router auditing at its default rate {:.2} and through one that never \
         audits, over the same {} honest providers ({} of them past probation at the auditing \
         router after a warm-up of {} requests).\n",
        c.concurrency, c.rounds, c.rate, c.honest, c.established, c.warmup_requests
    );
    let _ = writeln!(
        m,
        "| router | tok/s | p50 / p99 ms | errors |\n|---|---|---|---|\n| auditing | {:.1} | {:.0} / {:.0} | {} |\n| never auditing | {:.1} | {:.0} / {:.0} | {} |",
        c.audited.tokens_per_second,
        c.audited.p50_ms,
        c.audited.p99_ms,
        c.audited.errors,
        c.plain.tokens_per_second,
        c.plain.p50_ms,
        c.plain.p99_ms,
        c.plain.errors
    );
    let _ = writeln!(
        m,
        "\nThroughput with audits **{:.2}x** the plain router's, p50 {:.2}x. {:.0} audits scored \
         {:.0} tokens during the measurement: **{:.1} %** of the {:.0} tokens served.",
        c.throughput_ratio,
        c.p50_ratio,
        c.audits,
        c.audit_tokens,
        100.0 * c.cost_share,
        c.served_tokens
    );
}
