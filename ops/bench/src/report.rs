//! A run's results: the JSON file, the Markdown report and its SVG figures (plotters).

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use crate::engine::{EngineLevel, EngineResult};
use crate::minions::MinionsResult;
use crate::suite::{AuditCost, ChatResult, DishonestResult, FailureResult, PlacementResult, Scale};

/// Everything one run measured, written as `report.json`.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// `quick`, `full` or `remote` (deployed routers given by address).
    pub mode: String,
    /// Unix seconds at the start.
    pub started: u64,
    pub seconds: f64,
    pub machine: Machine,
    pub setup: Setup,
    pub scale: Option<Scale>,
    /// The engine against llama-server, when one was given, else why not.
    pub engine: Option<EngineResult>,
    pub engine_skipped: Option<String>,
    pub chat: Option<ChatResult>,
    /// Workload 2 (MinionS jobs) when it ran, else why not.
    pub minions: Option<MinionsResult>,
    pub minions_skipped: Option<String>,
    pub placement: Option<PlacementResult>,
    pub failures: Vec<FailureResult>,
    pub dishonest: Option<DishonestResult>,
    /// What audits at the default rate cost honest traffic.
    pub audits: Option<AuditCost>,
    /// What must hold whatever the speed; a failed check fails the run.
    pub checks: Vec<Check>,
    /// Workloads that could not run, and why.
    pub problems: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub memory_mib: u64,
    pub model: String,
}

#[derive(Debug, Default, Serialize)]
pub struct Setup {
    pub regions: Vec<String>,
    pub rtt_ms: Vec<Vec<f64>>,
    pub operator_region: Option<String>,
    /// The emulated WAN's subnet octet (`10.<octet>.0.0/16`).
    pub wan_octet: Option<u8>,
    pub providers: Vec<(String, String)>,
    pub threads: usize,
    pub parallel: usize,
    pub router: Option<String>,
    pub direct: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

impl Report {
    pub fn check(&mut self, name: &str, passed: bool, detail: String) {
        self.checks.push(Check {
            name: name.to_string(),
            passed,
            detail,
        });
    }

    pub fn passed(&self) -> bool {
        self.problems.is_empty() && self.checks.iter().all(|c| c.passed)
    }

    /// Writes `report.json`, `report.md` and the figures into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(self)?)?;
        let mut figures = Vec::new();
        if let Some(e) = &self.engine {
            std::fs::write(dir.join("engine.svg"), engine_svg(e)?)?;
            figures.push("engine.svg");
        }
        if let Some(c) = &self.chat {
            std::fs::write(dir.join("chat.svg"), chat_svg(c)?)?;
            figures.push("chat.svg");
        }
        if let Some(m) = self.minions.as_ref().filter(|m| m.completed > 0) {
            std::fs::write(dir.join("minions.svg"), minions_svg(m)?)?;
            figures.push("minions.svg");
        }
        if let Some(p) = &self.placement {
            std::fs::write(dir.join("placement.svg"), placement_svg(p)?)?;
            figures.push("placement.svg");
        }
        if !self.failures.is_empty() {
            std::fs::write(dir.join("failures.svg"), failures_svg(&self.failures)?)?;
            figures.push("failures.svg");
        }
        std::fs::write(dir.join("report.md"), self.markdown())?;
        Ok(())
    }

    pub fn markdown(&self) -> String {
        let mut m = String::new();
        let _ = writeln!(m, "# Beacon benchmark: {} run\n", self.mode);
        let _ = writeln!(
            m,
            "{} cores, {} MiB memory; model `{}`; {:.0} s in all.\n",
            self.machine.cores, self.machine.memory_mib, self.machine.model, self.seconds
        );
        let s = &self.setup;
        if !s.regions.is_empty() {
            let _ = writeln!(
                m,
                "Regions (round trips in ms; the router and the clients sit in {}):\n",
                s.operator_region.as_deref().unwrap_or("no region")
            );
            let _ = writeln!(m, "| | {} |", s.regions.join(" | "));
            let _ = writeln!(m, "|---|{}", "---|".repeat(s.regions.len()));
            for (r, row) in s.regions.iter().zip(&s.rtt_ms) {
                let cells: Vec<String> = row.iter().map(|v| format!("{v:.0}")).collect();
                let _ = writeln!(m, "| {r} | {} |", cells.join(" | "));
            }
            let _ = writeln!(
                m,
                "\nProviders: {} ({} llama.cpp threads, {} parallel sequences each).\n",
                s.providers
                    .iter()
                    .map(|(n, f)| if f.is_empty() {
                        n.clone()
                    } else {
                        format!("{n} ({f})")
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                s.threads,
                s.parallel
            );
        }
        if let Some(r) = &s.router {
            let _ = writeln!(
                m,
                "Router under test: {r}; direct baseline: {}.\n",
                s.direct.as_deref().unwrap_or("none")
            );
        }
        let _ = writeln!(m, "## Checks\n\n| check | result | detail |\n|---|---|---|");
        for c in &self.checks {
            let _ = writeln!(
                m,
                "| {} | {} | {} |",
                c.name,
                if c.passed { "pass" } else { "**FAIL**" },
                c.detail
            );
        }
        for p in &self.problems {
            let _ = writeln!(m, "| workload | **FAIL** | {p} |");
        }
        match (&self.engine, &self.engine_skipped) {
            (Some(e), _) => engine_md(&mut m, e),
            (None, Some(why)) => {
                let _ = writeln!(m, "\n## Engine\n\nNot run: {why}.");
            }
            (None, None) => {}
        }
        if let Some(c) = &self.chat {
            chat_md(&mut m, c);
        }
        let _ = writeln!(m, "\n## 2. MinionS jobs\n");
        match (&self.minions, &self.minions_skipped) {
            (Some(r), _) => minions_md(&mut m, r),
            (None, Some(why)) => {
                let _ = writeln!(m, "Not run: {why}");
            }
            (None, None) => {
                let _ = writeln!(m, "Not run.");
            }
        }
        if let Some(p) = &self.placement {
            placement_md(&mut m, p);
        }
        if !self.failures.is_empty() {
            failures_md(&mut m, &self.failures);
        }
        if let Some(d) = &self.dishonest {
            dishonest_md(&mut m, d);
        }
        if let Some(c) = &self.audits {
            audits_md(&mut m, c);
        }
        m
    }
}

fn engine_md(m: &mut String, e: &EngineResult) {
    let _ = writeln!(
        m,
        "\n## Engine\n\nbeacon-node off the network against llama.cpp's own server (`{}`), same \
         model, {} parallel sequences, {} threads, {}-token answers, one server under load at a \
         time, same client.\n",
        e.llama_server, e.parallel, e.threads, e.max_tokens
    );
    let _ = writeln!(
        m,
        "| concurrency | beacon-node tok/s | llama-server tok/s | ratio | beacon-node p50 / p99 ms | llama-server p50 / p99 ms | errors |\n|---|---|---|---|---|---|---|"
    );
    for l in &e.levels {
        let _ = writeln!(
            m,
            "| {} | {:.1} | {:.1} | {:.2}x | {:.0} / {:.0} | {:.0} / {:.0} | {} / {} |",
            l.concurrency,
            l.beacon.tokens_per_second,
            l.llama_server.tokens_per_second,
            l.ratio(),
            l.beacon.p50_ms,
            l.beacon.p99_ms,
            l.llama_server.p50_ms,
            l.llama_server.p99_ms,
            l.beacon.errors,
            l.llama_server.errors
        );
    }
    let _ = writeln!(m, "\n![engine throughput](engine.svg)");
}

fn chat_md(m: &mut String, c: &ChatResult) {
    let _ = writeln!(
        m,
        "\n## 1. Routed chat load\n\nBaseline, same run: {}. The router may spread a load over \
         every provider; the baseline is one.\n",
        c.baseline
    );
    let _ = writeln!(
        m,
        "| concurrency | routed tok/s | direct tok/s | ratio | routed p50 / p99 ms | direct p50 / p99 ms | errors routed / direct | routed by region | hedged |\n|---|---|---|---|---|---|---|---|---|"
    );
    for l in c.levels.iter().chain(c.overhead.iter()) {
        let r = &l.routed;
        let (dt, dl, de, ratio) = match &l.direct {
            Some(d) => (
                format!("{:.1}", d.tokens_per_second),
                format!("{:.0} / {:.0}", d.p50_ms, d.p99_ms),
                d.errors.to_string(),
                format!(
                    "{:.2}x",
                    r.tokens_per_second / d.tokens_per_second.max(1e-9)
                ),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        let label = if std::ptr::eq(l, c.overhead.as_ref().map_or(std::ptr::null(), |o| o)) {
            "1 (1-token answers)".to_string()
        } else {
            l.concurrency.to_string()
        };
        let regions: Vec<String> = l.regions.iter().map(|(r, n)| format!("{r} {n}")).collect();
        let _ = writeln!(
            m,
            "| {label} | {:.1} | {dt} | {ratio} | {:.0} / {:.0} | {dl} | {} / {de} | {} | {} |",
            r.tokens_per_second,
            r.p50_ms,
            r.p99_ms,
            r.errors,
            regions.join(", "),
            r.hedged
        );
    }
    if let Some(o) = &c.overhead
        && let Some(d) = &o.direct
    {
        let _ = writeln!(
            m,
            "\nThe router adds **{:.1} ms** at the median to a 1-token answer (routed {:.1} ms, direct {:.1} ms).",
            o.routed.p50_ms - d.p50_ms,
            o.routed.p50_ms,
            d.p50_ms
        );
    }
    let _ = writeln!(m, "\n![chat throughput and latency](chat.svg)");
}

fn minions_md(m: &mut String, r: &MinionsResult) {
    let corpus = r.corpus.as_ref();
    let _ = writeln!(
        m,
        "Each question is a MinionS job (at most {} rounds{}) on {} ({} characters); the \
         baseline, run by the same job with the same supervisor ({}), is remote-only: the \
         supervisor asked the question with the whole document. Local jobs run on the \
         providers at temperature 0; an answer counts as right when it contains the known fact.\n",
        r.max_rounds,
        r.max_jobs_per_round
            .map(|n| format!(", at most {n} local jobs per round"))
            .unwrap_or_default(),
        corpus.map_or("the document", |c| c.name.as_str()),
        corpus.map_or(0, |c| c.chars),
        r.supervisor
    );
    let _ = writeln!(
        m,
        "| question | MinionS | remote-only | fact in evidence | grounded findings | remote tokens MinionS / remote-only | wall s MinionS / remote-only | rounds | local jobs (verified) | jobs by region |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    let mark = |ok: bool| if ok { "right" } else { "wrong" };
    for q in &r.questions {
        if let Some(e) = &q.error {
            let _ = writeln!(
                m,
                "| {} | **failed** ({}): {} | - | - | - | - | - | - | - | - |",
                q.question,
                q.status,
                e.replace('|', "/")
            );
            continue;
        }
        let regions: Vec<String> = q
            .jobs_by_region
            .iter()
            .map(|(g, n)| format!("{g} {n}"))
            .collect();
        let _ = writeln!(
            m,
            "| {} | {}{} | {} | {} | {} of {} | {} / {} ({:.2}x) | {:.0} / {:.0} | {} | {} ({}) | {} |",
            q.question,
            mark(q.correct),
            if q.fallbacks > 0 { " (fallback)" } else { "" },
            mark(q.remote_only_correct),
            if q.evidence_recall { "yes" } else { "no" },
            q.grounded,
            q.findings,
            q.remote_tokens,
            q.remote_only_tokens,
            q.remote_tokens as f64 / (q.remote_only_tokens as f64).max(1.0),
            q.minions_ms / 1000.0,
            q.remote_only_ms / 1000.0,
            q.rounds,
            q.jobs,
            q.verified,
            regions.join(", ")
        );
    }
    let n = r.questions.len();
    let _ = writeln!(
        m,
        "\nIn all: MinionS right on **{} of {n}**, remote-only on **{} of {n}**; the known fact \
         was in the evidence the supervisor saw for **{} of {n}** (evidence recall); {} of {} \
         findings grounded (their quote is in their chunk); MinionS used \
         **{:.2}x** the remote tokens of remote-only ({} vs {}) and moved {} tokens to the \
         providers ({:.0}% of their prompt tokens from a KV prefix cache: the shared system prompt, \
         and chunks read again where they were cached); wall time {:.0} s vs {:.0} s. {} local jobs, {} unverified.\n",
        r.correct,
        r.remote_only_correct,
        r.evidence_recalled,
        r.grounded,
        r.findings,
        r.remote_ratio(),
        r.remote_tokens,
        r.remote_only_tokens,
        r.local_tokens,
        100.0 * r.local_cached_tokens as f64 / (r.local_prompt_tokens as f64).max(1.0),
        r.minions_s,
        r.remote_only_s,
        r.jobs,
        r.unverified_jobs
    );
    if r.completed > 0 {
        let _ = writeln!(m, "![MinionS against remote-only](minions.svg)");
    }
    for q in r.questions.iter().filter(|q| q.error.is_none()) {
        let _ = writeln!(
            m,
            "\n> **{}** MinionS: {}\n>\n> remote-only: {}",
            q.question,
            one_line(&q.answer),
            one_line(&q.remote_only_answer)
        );
    }
}

/// An answer on one line, shortened, for a quote in the report.
fn one_line(s: &str) -> String {
    let flat = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > 200 {
        format!("{}…", flat.chars().take(200).collect::<String>())
    } else {
        flat
    }
}

fn placement_md(m: &mut String, p: &PlacementResult) {
    let _ = writeln!(
        m,
        "\n## 3. Placement\n\nThe router and the clients sit in {}. Each region alone is measured \
         with a router pinned to it (`--allowed-regions`), in the same run: the best of them is \
         the best possible single-region placement.\n",
        p.operator_region
    );
    let _ = writeln!(
        m,
        "| pinned to | p50 / p99 ms | errors | answers from inside the region |\n|---|---|---|---|"
    );
    for r in &p.pinned {
        let _ = writeln!(
            m,
            "| {} | {:.0} / {:.0} | {} | {:.0}% |",
            r.region,
            r.load.p50_ms,
            r.load.p99_ms,
            r.load.errors,
            r.in_region_share * 100.0
        );
    }
    let _ = writeln!(
        m,
        "\n| concurrency | chosen p50 ms | best region | best p50 ms | chosen / best | placed in | hedged |\n|---|---|---|---|---|---|---|"
    );
    for c in &p.chosen {
        let regions: Vec<String> = c.regions.iter().map(|(r, n)| format!("{r} {n}")).collect();
        let _ = writeln!(
            m,
            "| {} | {:.0} | {} | {:.0} | {:.2}x | {} | {} |",
            c.concurrency,
            c.load.p50_ms,
            c.best_region,
            c.best_p50_ms,
            c.ratio,
            regions.join(", "),
            c.load.hedged
        );
    }
    let _ = writeln!(m, "\n![placement](placement.svg)");
}

fn failures_md(m: &mut String, f: &[FailureResult]) {
    let _ = writeln!(
        m,
        "\n## 4. Failure injection\n\nEach failure is injected a third of the way into a load; \
         the baseline is the same load's answers before it.\n"
    );
    let _ = writeln!(
        m,
        "| failure | completed | failed | retries | time to recover s | slowest ms | p50 before ms | what happened |\n|---|---|---|---|---|---|---|---|"
    );
    for r in f {
        let _ = writeln!(
            m,
            "| {} | {} of {} | {} | {} | {} | {:.0} | {:.0} | {} |",
            r.scenario,
            r.completed,
            r.requests,
            r.failed,
            r.retries,
            r.recover_s
                .map(|s| format!("{s:.1}"))
                .unwrap_or_else(|| "never".into()),
            r.max_ms,
            r.p50_before_ms,
            r.note
        );
    }
    let _ = writeln!(m, "\n![failures](failures.svg)");
}

fn dishonest_md(m: &mut String, d: &DishonestResult) {
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

fn audits_md(m: &mut String, c: &AuditCost) {
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

type Svg = anyhow::Result<String>;

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing: {e}")
}

/// The series' labels, boxed, at `position`.
fn legend<'b: 'a, 'a, C: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, SVGBackend<'b>, C>,
    position: SeriesLabelPosition,
) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(position)
        .draw()
        .map_err(err)
}

/// A named line with a dot at each point.
fn line<'b: 'a, 'a>(
    chart: &mut ChartContext<
        'a,
        SVGBackend<'b>,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
    name: &str,
    pts: &[(f64, f64)],
    color: RGBColor,
) -> anyhow::Result<()> {
    chart
        .draw_series(LineSeries::new(pts.to_vec(), color.stroke_width(2)))
        .map_err(err)?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
    chart
        .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
        .map_err(err)?;
    Ok(())
}

fn engine_svg(e: &EngineResult) -> Svg {
    let mut s = String::new();
    {
        let root = SVGBackend::with_string(&mut s, (600, 360)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let max_c = e.levels.iter().map(|l| l.concurrency).max().unwrap_or(1) as f64;
        let pts = |f: &dyn Fn(&EngineLevel) -> f64| -> Vec<(f64, f64)> {
            e.levels
                .iter()
                .map(|l| (l.concurrency as f64, f(l)))
                .collect()
        };
        let beacon = pts(&|l| l.beacon.tokens_per_second);
        let llama = pts(&|l| l.llama_server.tokens_per_second);
        let top = beacon.iter().chain(&llama).map(|p| p.1).fold(1.0, f64::max) * 1.15;
        let mut chart = ChartBuilder::on(&root)
            .caption("Engine throughput", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(0.5..max_c + 0.5, 0.0..top)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("concurrency")
            .y_desc("tokens/s")
            .draw()
            .map_err(err)?;
        line(&mut chart, "beacon-node", &beacon, RED)?;
        line(&mut chart, "llama-server (baseline)", &llama, BLUE)?;
        legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        root.present().map_err(err)?;
    }
    Ok(s)
}

fn chat_svg(c: &ChatResult) -> Svg {
    let mut s = String::new();
    {
        let root = SVGBackend::with_string(&mut s, (900, 360)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (left, right) = root.split_horizontally(450);
        let max_c = c.levels.iter().map(|l| l.concurrency).max().unwrap_or(1) as f64;
        let series = |f: &dyn Fn(&crate::load::Load) -> f64, direct: bool| -> Vec<(f64, f64)> {
            c.levels
                .iter()
                .filter_map(|l| {
                    let load = if direct {
                        l.direct.as_ref()?
                    } else {
                        &l.routed
                    };
                    Some((l.concurrency as f64, f(load)))
                })
                .collect()
        };
        for (area, title, y, f) in [
            (
                &left,
                "Throughput",
                "tokens/s",
                (&|l: &crate::load::Load| l.tokens_per_second)
                    as &dyn Fn(&crate::load::Load) -> f64,
            ),
            (&right, "Median latency", "ms", &|l: &crate::load::Load| {
                l.p50_ms
            }),
        ] {
            let routed = series(f, false);
            let direct = series(f, true);
            let top = routed
                .iter()
                .chain(&direct)
                .map(|p| p.1)
                .fold(1.0, f64::max)
                * 1.15;
            let mut chart = ChartBuilder::on(area)
                .caption(title, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(52)
                .build_cartesian_2d(0.5..max_c + 0.5, 0.0..top)
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc("concurrency")
                .y_desc(y)
                .draw()
                .map_err(err)?;
            for (name, pts, color) in [("routed", routed, RED), ("direct (baseline)", direct, BLUE)]
            {
                if !pts.is_empty() {
                    line(&mut chart, name, &pts, color)?;
                }
            }
            legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        }
        root.present().map_err(err)?;
    }
    Ok(s)
}

/// Remote tokens and wall time per question: MinionS against remote-only.
fn minions_svg(r: &MinionsResult) -> Svg {
    let mut s = String::new();
    {
        let root = SVGBackend::with_string(&mut s, (900, 360)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (left, right) = root.split_horizontally(450);
        let done: Vec<&crate::minions::Question> =
            r.questions.iter().filter(|q| q.error.is_none()).collect();
        let n = done.len();
        for (area, title, y, f) in [
            (
                &left,
                "Remote tokens",
                "tokens",
                (&|q: &crate::minions::Question| {
                    (q.remote_tokens as f64, q.remote_only_tokens as f64)
                }) as &dyn Fn(&crate::minions::Question) -> (f64, f64),
            ),
            (&right, "Wall time", "s", &|q: &crate::minions::Question| {
                (q.minions_ms / 1000.0, q.remote_only_ms / 1000.0)
            }),
        ] {
            let top = done
                .iter()
                .map(|q| f(q))
                .map(|(a, b)| a.max(b))
                .fold(1.0, f64::max)
                * 1.4; // room for the legend above the bars
            // Two bars per question: MinionS at 2i, the baseline at 2i + 1.
            let mut chart = ChartBuilder::on(area)
                .caption(title, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(60)
                .build_cartesian_2d(0..2 * n, 0.0..top)
                .map_err(err)?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(2 * n)
                .x_label_formatter(&|j| {
                    if j % 2 == 0 && j / 2 < n {
                        format!("Q{}", j / 2 + 1)
                    } else {
                        String::new()
                    }
                })
                .y_desc(y)
                .draw()
                .map_err(err)?;
            for (k, (name, color)) in [("MinionS", RED), ("remote-only (baseline)", BLUE)]
                .into_iter()
                .enumerate()
            {
                chart
                    .draw_series(done.iter().enumerate().map(|(i, q)| {
                        let (a, b) = f(q);
                        let j = 2 * i + k;
                        let mut bar = Rectangle::new(
                            [(j, 0.0), (j + 1, if k == 0 { a } else { b })],
                            color.mix(0.6).filled(),
                        );
                        bar.set_margin(0, 0, 3, 3);
                        bar
                    }))
                    .map_err(err)?
                    .label(name)
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.mix(0.6).filled())
                    });
            }
            legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        }
        root.present().map_err(err)?;
    }
    Ok(s)
}

fn placement_svg(p: &PlacementResult) -> Svg {
    let mut s = String::new();
    {
        let root = SVGBackend::with_string(&mut s, (700, 380)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        // One bar per pinned region and per unpinned level, in the order measured.
        let mut bars: Vec<(String, f64, RGBColor)> = p
            .pinned
            .iter()
            .map(|r| (format!("pinned {}", r.region), r.load.p50_ms, BLUE))
            .collect();
        bars.extend(
            p.chosen
                .iter()
                .map(|c| (format!("chosen (c={})", c.concurrency), c.load.p50_ms, RED)),
        );
        let top = bars.iter().map(|b| b.1).fold(1.0, f64::max) * 1.15;
        let n = bars.len();
        let labels: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Median latency: pinned regions vs the router's choice",
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(60)
            .y_label_area_size(52)
            .build_cartesian_2d(0..n, 0.0..top)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&|i| labels.get(*i).cloned().unwrap_or_default())
            .y_desc("p50 ms")
            .draw()
            .map_err(err)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, b)| {
                let mut r = Rectangle::new([(i, 0.0), (i + 1, b.1)], b.2.mix(0.6).filled());
                r.set_margin(0, 0, 8, 8);
                r
            }))
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(s)
}

fn failures_svg(f: &[FailureResult]) -> Svg {
    let mut s = String::new();
    {
        let root = SVGBackend::with_string(&mut s, (900, 300 * f.len() as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        for (area, r) in root.split_evenly((f.len(), 1)).iter().zip(f) {
            let end = r
                .samples
                .iter()
                .map(|s| s.at_s + s.ms / 1000.0)
                .fold(1.0, f64::max);
            let top = r.samples.iter().map(|s| s.ms / 1000.0).fold(0.1, f64::max) * 1.15;
            let mut chart = ChartBuilder::on(area)
                .caption(
                    format!("{}: latency of each request by start time", r.scenario),
                    ("sans-serif", 16),
                )
                .margin(10)
                .x_label_area_size(32)
                .y_label_area_size(52)
                .build_cartesian_2d(0.0..end * 1.02, 0.0..top)
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc("request start, s")
                .y_desc("latency, s")
                .draw()
                .map_err(err)?;
            chart
                .draw_series(
                    r.samples
                        .iter()
                        .filter(|s| s.ok())
                        .map(|s| Circle::new((s.at_s, s.ms / 1000.0), 3, GREEN.filled())),
                )
                .map_err(err)?
                .label("answered")
                .legend(|(x, y)| Circle::new((x + 8, y), 3, GREEN.filled()));
            chart
                .draw_series(
                    r.samples
                        .iter()
                        .filter(|s| !s.ok())
                        .map(|s| Cross::new((s.at_s, s.ms / 1000.0), 5, RED.stroke_width(2))),
                )
                .map_err(err)?
                .label("failed")
                .legend(|(x, y)| Cross::new((x + 8, y), 4, RED.stroke_width(2)));
            if r.event_at_s > 0.0 {
                chart
                    .draw_series(LineSeries::new(
                        vec![(r.event_at_s, 0.0), (r.event_at_s, top)],
                        BLACK.stroke_width(1),
                    ))
                    .map_err(err)?
                    .label("failure injected")
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK));
            }
            legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        }
        root.present().map_err(err)?;
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineLevel;
    use crate::load::Load;
    use crate::minions::{Corpus, Question};

    fn load(tps: f64) -> Load {
        Load {
            tokens_per_second: tps,
            p50_ms: 100.0,
            ..Load::default()
        }
    }

    #[test]
    fn minions_and_engine_sections_and_figures() {
        let answered = Question {
            question: "How much?".into(),
            expect: vec!["61.5".into()],
            status: 200,
            answer: "61.5 million euros".into(),
            correct: true,
            remote_tokens: 900,
            remote_only_tokens: 3000,
            minions_ms: 40_000.0,
            remote_only_ms: 20_000.0,
            jobs: 8,
            verified: 8,
            jobs_by_region: vec![("eu-west".into(), 3), ("us-east".into(), 5)],
            ..Question::default()
        };
        let failed = Question {
            question: "Who?".into(),
            status: 502,
            error: Some("supervisor | down".into()),
            ..Question::default()
        };
        let report = Report {
            mode: "quick".into(),
            minions: Some(MinionsResult {
                supervisor: "ai/smollm2:supervisor".into(),
                corpus: Some(Corpus::northport(8_300, 2)),
                max_rounds: 2,
                max_jobs_per_round: Some(12),
                questions: vec![answered, failed],
                completed: 1,
                correct: 1,
                remote_tokens: 900,
                remote_only_tokens: 3000,
                jobs: 8,
                ..MinionsResult::default()
            }),
            engine: Some(EngineResult {
                llama_server: "llama-server".into(),
                parallel: 4,
                threads: 2,
                max_tokens: 16,
                levels: vec![EngineLevel {
                    concurrency: 1,
                    beacon: load(90.0),
                    llama_server: load(100.0),
                }],
            }),
            ..Report::default()
        };
        let dir = tempfile::tempdir().unwrap();
        report.write(dir.path()).unwrap();
        let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        assert!(md.contains("## 2. MinionS jobs"), "{md}");
        assert!(
            md.contains("| How much? | right | wrong | no | 0 of 0 | 900 / 3000 (0.30x)"),
            "{md}"
        );
        // A failed job is a row of its own, its message kept from breaking the table.
        assert!(md.contains("**failed** (502): supervisor / down"), "{md}");
        assert!(md.contains("at most 12 local jobs per round"), "{md}");
        assert!(md.contains("| 1 | 90.0 | 100.0 | 0.90x |"), "{md}");
        for svg in ["minions.svg", "engine.svg"] {
            let s = std::fs::read_to_string(dir.path().join(svg)).unwrap();
            assert!(s.starts_with("<svg") && s.contains("</svg>"), "{svg}");
        }
    }
}
