//! Workload 2: MinionS jobs on a long document whose answers are known, each measured
//! against the remote-only baseline run in the same job (the same supervisor asked the
//! question with the whole document): accuracy, remote tokens, wall time, and where the
//! local jobs ran.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use beacon_harness::SUPERVISOR_MODEL_REF;
use plotters::prelude::*;
use serde::Serialize;
use serde_json::{Value, json};

use beacon_harness::corpus::Corpus;
use beacon_harness::http_within;

use super::{Check, Ctx, Section};
use crate::chart::{Svg, err, legend};

/// One question's MinionS job and its remote-only baseline.
#[derive(Debug, Default, Serialize)]
pub struct Question {
    pub question: String,
    pub expect: Vec<String>,
    /// HTTP status of the job (0: no answer).
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub answer: String,
    pub correct: bool,
    /// The known fact is in the evidence the supervisor was shown (a quote or an answer).
    pub evidence_recall: bool,
    /// Workers' findings (non-null answers), and those whose citation was in their chunk.
    pub findings: u64,
    pub grounded: u64,
    /// The job fell back (a default plan, an answer from the evidence).
    pub fallbacks: usize,
    pub rounds: u64,
    /// Remote tokens MinionS used (every supervisor call of the job).
    pub remote_tokens: u64,
    /// Tokens the providers read and wrote.
    pub local_tokens: u64,
    /// Prompt tokens the providers served from their KV cache (jobs on one chunk placed
    /// together).
    pub local_cached_tokens: u64,
    pub local_prompt_tokens: u64,
    /// Wall time of the MinionS job, remote-only baseline excluded.
    pub minions_ms: f64,
    pub remote_only_answer: String,
    pub remote_only_correct: bool,
    pub remote_only_tokens: u64,
    pub remote_only_ms: f64,
    /// Local jobs run, and how many came back verified.
    pub jobs: usize,
    pub verified: usize,
    pub retried: usize,
    pub jobs_by_region: Vec<(String, usize)>,
    /// The whole answer of the router, for the record.
    #[serde(skip_serializing_if = "Value::is_null")]
    pub raw: Value,
}

/// Workload 2's results.
#[derive(Debug, Default, Serialize)]
pub struct MinionsResult {
    /// The supervisor: model and where it runs.
    pub supervisor: String,
    pub corpus: Option<Corpus>,
    pub max_rounds: u32,
    /// Most local jobs per round, when capped below the router's default.
    pub max_jobs_per_round: Option<u32>,
    pub questions: Vec<Question>,
    /// Jobs answered (HTTP 200).
    pub completed: usize,
    pub correct: usize,
    pub remote_only_correct: usize,
    /// Questions whose known fact was in the evidence the supervisor saw.
    pub evidence_recalled: usize,
    pub findings: u64,
    pub grounded: u64,
    pub remote_tokens: u64,
    pub remote_only_tokens: u64,
    pub local_tokens: u64,
    pub local_cached_tokens: u64,
    pub local_prompt_tokens: u64,
    pub minions_s: f64,
    pub remote_only_s: f64,
    pub jobs: usize,
    pub unverified_jobs: usize,
    pub jobs_by_region: Vec<(String, usize)>,
}

impl MinionsResult {
    /// Remote tokens MinionS used per remote token of the remote-only baseline.
    pub fn remote_ratio(&self) -> f64 {
        self.remote_tokens as f64 / (self.remote_only_tokens as f64).max(1.0)
    }
}

fn contains_any(answer: &str, expect: &[String]) -> bool {
    let a = answer.to_lowercase();
    expect.iter().any(|e| a.contains(e.as_str()))
}

impl MinionsResult {
    /// Counts an answered question in the totals.
    fn add(&mut self, q: &Question) {
        self.completed += 1;
        self.correct += q.correct as usize;
        self.remote_only_correct += q.remote_only_correct as usize;
        self.evidence_recalled += q.evidence_recall as usize;
        self.findings += q.findings;
        self.grounded += q.grounded;
        self.remote_tokens += q.remote_tokens;
        self.remote_only_tokens += q.remote_only_tokens;
        self.local_tokens += q.local_tokens;
        self.local_prompt_tokens += q.local_prompt_tokens;
        self.local_cached_tokens += q.local_cached_tokens;
        self.minions_s += q.minions_ms / 1000.0;
        self.remote_only_s += q.remote_only_ms / 1000.0;
        self.jobs += q.jobs;
        self.unverified_jobs += q.jobs - q.verified;
    }
}

/// What one MinionS answer `v` says: the answer and whether it is right, the evidence,
/// tokens, times and jobs (counted per region in `regions` too).
fn read_answer(
    one: &mut Question,
    v: &Value,
    expect: &[String],
    regions: &mut BTreeMap<String, usize>,
) {
    let u = &v["usage"];
    one.answer = v["answer"].as_str().unwrap_or_default().to_string();
    one.correct = contains_any(&one.answer, expect);
    let evidence = v["evidence"].as_array().cloned().unwrap_or_default();
    one.evidence_recall = evidence.iter().any(|e| {
        contains_any(e["citation"].as_str().unwrap_or_default(), expect)
            || contains_any(e["answer"].as_str().unwrap_or_default(), expect)
    });
    one.findings = v["grounding"]["findings"].as_u64().unwrap_or(0);
    one.grounded = v["grounding"]["grounded"].as_u64().unwrap_or(0);
    one.fallbacks = v["notes"].as_array().map_or(0, Vec::len);
    one.rounds = v["rounds"].as_u64().unwrap_or(0);
    one.remote_tokens = u["remote"]["total_tokens"].as_u64().unwrap_or(0);
    one.local_tokens = u["local"]["total_tokens"].as_u64().unwrap_or(0);
    one.local_prompt_tokens = u["local"]["prompt_tokens"].as_u64().unwrap_or(0);
    one.local_cached_tokens = u["local"]["cached_prompt_tokens"].as_u64().unwrap_or(0);
    one.remote_only_answer = u["remote_only"]["answer"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    one.remote_only_correct = contains_any(&one.remote_only_answer, expect);
    one.remote_only_tokens = u["remote_only"]["total_tokens"].as_u64().unwrap_or(0);
    one.remote_only_ms = u["remote_only"]["ms"].as_f64().unwrap_or(0.0);
    one.minions_ms = v["timing"]["total_ms"].as_f64().unwrap_or(0.0) - one.remote_only_ms;
    let jobs = v["jobs"].as_array().cloned().unwrap_or_default();
    one.jobs = jobs.len();
    one.verified = jobs.iter().filter(|j| j["verified"] == true).count();
    one.retried = jobs
        .iter()
        .filter(|j| j["attempts"].as_u64().unwrap_or(1) > 1)
        .count();
    let mut mine: BTreeMap<String, usize> = BTreeMap::new();
    for j in &jobs {
        let r = j["region"].as_str().unwrap_or("?").to_string();
        *mine.entry(r.clone()).or_insert(0) += 1;
        *regions.entry(r).or_insert(0) += 1;
    }
    one.jobs_by_region = mine.into_iter().collect();
}

/// Who supervises the jobs: a remote OpenAI-compatible API (its key, if any, in
/// `BEACON_REMOTE_API_KEY`), or a node of the cluster's serving a GGUF off the network.
pub enum Supervisor {
    Remote { url: String, model: String },
    Local { gguf: PathBuf, threads: usize },
}

/// The supervisor (started here when local), a router that uses it, and the jobs.
pub fn run(ctx: &mut Ctx, supervisor: &Supervisor) -> anyhow::Result<MinionsResult> {
    let (cluster, scale, say) = (&mut *ctx.cluster, ctx.scale, ctx.say);
    let (url, model, env) = match supervisor {
        Supervisor::Remote { url, model } => {
            let env: Vec<(String, String)> = std::env::var("BEACON_REMOTE_API_KEY")
                .ok()
                .map(|k| ("BEACON_REMOTE_API_KEY".to_string(), k))
                .into_iter()
                .collect();
            (url.clone(), model.clone(), env)
        }
        Supervisor::Local { gguf, threads } => {
            anyhow::ensure!(
                gguf.is_file(),
                "supervisor model {} missing: run ops/setup.sh, pass --supervisor-model, or \
                 name a remote API with --remote-base-url",
                gguf.display()
            );
            cluster.add_supervisor(gguf, *threads)?;
            let s = cluster.supervisor.as_ref().context("supervisor")?;
            say(&format!(
                "supervisor {SUPERVISOR_MODEL_REF} up at {}",
                s.addr
            ));
            (s.base_url(), SUPERVISOR_MODEL_REF.to_string(), Vec::new())
        }
    };
    let router = cluster.add_router_env(
        &[
            "--audit-rate",
            "0",
            // A CPU worker reading a chunk, or a CPU supervisor reading the whole report
            // for the baseline, can pass the default attempt timeout.
            "--attempt-timeout",
            "600",
            "--remote-base-url",
            &url,
            "--remote-model",
            &model,
        ],
        &env,
        ctx.honest,
    )?;
    let corpus = Corpus::northport(scale.minions_chars, scale.minions_questions);
    say(&format!(
        "minions: {} question(s) on {} ({} characters), supervisor {model}",
        corpus.questions.len(),
        corpus.name,
        corpus.chars
    ));
    let m = measure(
        &cluster.routers[router].url(""),
        &format!("{model} at {url}"),
        &corpus,
        scale.minions_rounds,
        scale.minions_max_jobs,
        say,
    );
    cluster.remove_router(router);
    Ok(m)
}

/// Asks every question of `corpus` as a MinionS job through the router at `router` (which
/// has the supervisor configured), with the remote-only baseline run by the same job.
pub fn measure(
    router: &str,
    supervisor: &str,
    corpus: &Corpus,
    max_rounds: u32,
    max_jobs_per_round: Option<u32>,
    say: &dyn Fn(&str),
) -> MinionsResult {
    let mut out = MinionsResult {
        supervisor: supervisor.to_string(),
        corpus: Some(corpus.clone()),
        max_rounds,
        max_jobs_per_round,
        ..MinionsResult::default()
    };
    let mut regions: BTreeMap<String, usize> = BTreeMap::new();
    for (i, (q, expect)) in corpus.questions.iter().enumerate() {
        let mut body = json!({
            "task": q,
            "context": [corpus.text],
            "doc_metadata": corpus.metadata,
            "max_rounds": max_rounds,
            "policy": {"remote_only_baseline": "run"}
        });
        if let Some(n) = max_jobs_per_round {
            body["policy"]["max_jobs_per_round"] = json!(n);
        }
        let t = Instant::now();
        // A CPU supervisor reading the whole report for the baseline takes minutes.
        let r = http_within(
            "POST",
            &format!("{router}/v1/minions"),
            Some(&body.to_string()),
            &[],
            3600,
        );
        let mut one = Question {
            question: q.clone(),
            expect: expect.clone(),
            status: r.status,
            ..Question::default()
        };
        let v = r.try_json().unwrap_or(Value::Null);
        if r.status != 200 {
            one.error = Some(
                v["error"]["message"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or(r.body.chars().take(300).collect()),
            );
            say(&format!(
                "minions [{}/{}] failed after {:.0} s: {}",
                i + 1,
                corpus.questions.len(),
                t.elapsed().as_secs_f64(),
                one.error.as_deref().unwrap_or_default()
            ));
            out.questions.push(one);
            continue;
        }
        read_answer(&mut one, &v, expect, &mut regions);
        say(&format!(
            "minions [{}/{}] {} (fact {}in the evidence) in {:.0} s, {} remote tokens (remote-only {} in {:.0} s, {}); {} jobs, {} verified",
            i + 1,
            corpus.questions.len(),
            if one.correct { "right" } else { "wrong" },
            if one.evidence_recall { "" } else { "not " },
            one.minions_ms / 1000.0,
            one.remote_tokens,
            one.remote_only_tokens,
            one.remote_only_ms / 1000.0,
            if one.remote_only_correct {
                "right"
            } else {
                "wrong"
            },
            one.jobs,
            one.verified
        ));
        one.raw = v;
        out.add(&one);
        out.questions.push(one);
    }
    out.jobs_by_region = regions.into_iter().collect();
    out
}

pub fn checks(m: &MinionsResult) -> Vec<Check> {
    let asked = m.questions.len();
    vec![
        Check::new(
            "every MinionS job answered",
            asked > 0 && m.completed == asked,
            format!("{} of {asked} jobs answered", m.completed),
        ),
        Check::new(
            "every local MinionS job verified",
            m.jobs > 0 && m.unverified_jobs == 0,
            format!(
                "{} of {} local jobs came back signed and verified",
                m.jobs - m.unverified_jobs,
                m.jobs
            ),
        ),
    ]
}

/// Its section; the figure only when a job was answered.
pub fn render(m: &MinionsResult) -> Section {
    Section::new(
        |md| markdown(md, m),
        (m.completed > 0).then(|| ("minions.svg", figure(m))),
    )
}

fn markdown(m: &mut String, r: &MinionsResult) {
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

/// Remote tokens and wall time per question: MinionS against remote-only.
fn figure(r: &MinionsResult) -> Svg {
    let mut s = String::new();
    {
        let root = SVGBackend::with_string(&mut s, (900, 360)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (left, right) = root.split_horizontally(450);
        let done: Vec<&Question> = r.questions.iter().filter(|q| q.error.is_none()).collect();
        let n = done.len();
        for (area, title, y, f) in [
            (
                &left,
                "Remote tokens",
                "tokens",
                (&|q: &Question| (q.remote_tokens as f64, q.remote_only_tokens as f64))
                    as &dyn Fn(&Question) -> (f64, f64),
            ),
            (&right, "Wall time", "s", &|q: &Question| {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_marked_by_the_facts_they_contain() {
        let e = vec!["north quay".to_string()];
        assert!(contains_any("The North Quay terminal.", &e));
        assert!(!contains_any("The south terminal.", &e));
    }
}
