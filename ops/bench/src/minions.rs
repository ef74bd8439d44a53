//! Workload 2: MinionS jobs on a long document whose answers are known, each measured
//! against the remote-only baseline run in the same job (the same supervisor asked the
//! question with the whole document): accuracy, remote tokens, wall time, and where the
//! local jobs ran.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;
use serde_json::{Value, json};

use crate::http::http_within;

/// The bundled synthetic annual report (28 KB) with facts placed in it.
pub const NORTHPORT: &str = include_str!("../../data/northport-annual-report-2025.txt");

/// Questions about [`NORTHPORT`], each with the strings a correct answer contains (any one,
/// lowercase), in the order their facts appear.
const QUESTIONS: [(&str, &[&str]); 4] = [
    (
        "How many tonnes of cargo did the port handle in 2025?",
        &["14.2"],
    ),
    ("How much tariff revenue did the port earn?", &["61.5"]),
    (
        "Who succeeded the harbour master when she retired?",
        &["reyes"],
    ),
    (
        "Which terminal was closed for repairs in 2025?",
        &["north quay"],
    ),
];

/// A document and the questions asked about it.
#[derive(Clone, Debug, Serialize)]
pub struct Corpus {
    pub name: String,
    #[serde(skip)]
    pub text: String,
    pub chars: usize,
    pub metadata: String,
    pub questions: Vec<(String, Vec<String>)>,
}

// The generated report's vocabulary.
const SUBJECTS: [&str; 12] = [
    "Crane maintenance",
    "Berth scheduling",
    "Night shifts",
    "Yard congestion",
    "Pilotage",
    "Tug availability",
    "Lease income",
    "Debt service",
    "Operating costs",
    "Insurance premiums",
    "Dredging works",
    "Staff training",
];
const VERBS: [&str; 6] = [
    "was reviewed by",
    "was discussed with",
    "was reported to",
    "was audited by",
    "was planned together with",
    "remained a priority for",
];
const BODIES: [&str; 6] = [
    "the harbour board",
    "the safety committee",
    "the terminal operators",
    "external auditors",
    "the city council",
    "the regional transport office",
];
const ENDINGS: [&str; 5] = [
    "with no major findings",
    "and the results were published internally",
    "although several minor issues were noted",
    "in line with the previous year",
    "and a follow-up was scheduled for the next quarter",
];
const SECTIONS: [&str; 5] = [
    "OPERATIONS",
    "FINANCE",
    "PEOPLE",
    "INFRASTRUCTURE",
    "OUTLOOK",
];
const NAMES: [&str; 6] = ["Ana", "Tomas", "Ingrid", "Kofi", "Mei", "Rafael"];
const SURNAMES: [&str; 6] = [
    "Okafor",
    "Lindqvist",
    "Moreau",
    "Tanaka",
    "Castillo",
    "Brennan",
];
const TERMINALS: [&str; 5] = [
    "Eastern Basin",
    "Harbour Gate",
    "Pier Seven",
    "Riverside",
    "Old Mole",
];

impl Corpus {
    /// The report's first `chars` characters (cut at a paragraph) and the first `questions`
    /// questions whose facts lie inside them.
    pub fn northport(chars: usize, questions: usize) -> Corpus {
        let mut text = NORTHPORT;
        if chars < text.len() {
            let cut = text[..chars].rfind("\n\n").unwrap_or(chars);
            text = &text[..cut];
        }
        let lower = text.to_lowercase();
        let questions: Vec<(String, Vec<String>)> = QUESTIONS
            .iter()
            .filter(|(_, e)| e.iter().all(|e| lower.contains(e)))
            .take(questions)
            .map(|(q, e)| (q.to_string(), e.iter().map(|s| s.to_string()).collect()))
            .collect();
        Corpus {
            name: if text.len() == NORTHPORT.len() {
                "Northport annual report 2025".into()
            } else {
                format!(
                    "Northport annual report 2025, first {} characters",
                    text.len()
                )
            },
            chars: text.len(),
            text: text.to_string(),
            metadata: "Annual report of a harbour authority, 2025".into(),
            questions,
        }
    }
}

/// splitmix64: the generator's seeded randomness (reproducible, no dependency).
struct Seeded(u64);

impl Seeded {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len())]
    }
}

impl Corpus {
    /// A report of about `chars` characters made from `seed`: sections of routine
    /// paragraphs (the bundled report's vocabulary, no figures in them) with four facts
    /// planted at seeded places, one per question. The same seed gives the same text; a
    /// report longer than the supervisor's context is one that remote-only cannot ask.
    pub fn generated(chars: usize, seed: u64) -> Corpus {
        let mut r = Seeded(seed);
        let tonnes = format!("{}.{}", 10 + r.below(40), 1 + r.below(9));
        let revenue = format!("{}.{}", 50 + r.below(40), 1 + r.below(9));
        let (name, surname) = (r.pick(&NAMES), r.pick(&SURNAMES));
        let terminal = r.pick(&TERMINALS);
        let facts = [
            (
                format!("In 2025 the port handled a total of {tonnes} million tonnes of cargo."),
                "How many tonnes of cargo did the port handle in 2025?",
                tonnes.clone(),
            ),
            (
                format!("Tariff revenue reached {revenue} million euros in 2025."),
                "How much tariff revenue did the port earn?",
                revenue.clone(),
            ),
            (
                format!("When the harbour master retired in June, {name} {surname} succeeded her."),
                "Who succeeded the harbour master when she retired?",
                surname.to_lowercase(),
            ),
            (
                format!("The {terminal} terminal was closed for repairs for most of 2025."),
                "Which terminal was closed for repairs in 2025?",
                terminal.to_lowercase(),
            ),
        ];
        // Paragraphs of four to six sentences; each fact goes into a seeded paragraph of
        // its fifth of the report.
        let paragraph = |r: &mut Seeded| {
            let n = 4 + r.below(3);
            (0..n)
                .map(|_| {
                    format!(
                        "{} {} {} {}.",
                        r.pick(&SUBJECTS),
                        r.pick(&VERBS),
                        r.pick(&BODIES),
                        r.pick(&ENDINGS)
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        let mut paragraphs = Vec::new();
        let mut len = 0;
        while len < chars.max(2_000) {
            let p = paragraph(&mut r);
            len += p.len() + 2;
            paragraphs.push(p);
        }
        let n = paragraphs.len();
        for (i, (fact, _, _)) in facts.iter().enumerate() {
            let at = (i * n) / facts.len() + r.below((n / facts.len()).max(1));
            let p = &mut paragraphs[at.min(n - 1)];
            let cut = p.find(". ").map_or(p.len(), |c| c + 2);
            p.insert_str(cut, &format!("{fact} "));
        }
        let per_section = n.div_ceil(SECTIONS.len());
        let mut text = String::from("NORTHPORT HARBOUR AUTHORITY - ANNUAL REPORT 2025 (generated)");
        for (i, p) in paragraphs.iter().enumerate() {
            if i % per_section == 0 {
                text.push_str(&format!("\n\n{}", SECTIONS[i / per_section]));
            }
            text.push_str("\n\n");
            text.push_str(p);
        }
        text.push('\n');
        Corpus {
            name: format!("generated report, seed {seed}"),
            chars: text.len(),
            text,
            metadata: "Annual report of a harbour authority, 2025".into(),
            questions: facts
                .iter()
                .map(|(_, q, a)| (q.to_string(), vec![a.clone()]))
                .collect(),
        }
    }
}

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

/// Asks every question of `corpus` as a MinionS job through the router at `router` (which
/// has the supervisor configured), with the remote-only baseline run by the same job.
pub fn run(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shortened_report_asks_only_what_it_contains() {
        let whole = Corpus::northport(usize::MAX, 9);
        assert_eq!(whole.questions.len(), 4);
        assert_eq!(whole.chars, NORTHPORT.len());
        let short = Corpus::northport(8_300, 9);
        assert!(short.chars <= 8_300 && short.text.ends_with('.'));
        assert_eq!(short.questions.len(), 2);
        for (_, expect) in &short.questions {
            assert!(short.text.to_lowercase().contains(&expect[0]));
        }
        assert_eq!(Corpus::northport(8_300, 1).questions.len(), 1);
    }

    #[test]
    fn a_generated_report_holds_each_fact_once_and_is_reproducible() {
        for size in [30_000, 300_000] {
            let c = Corpus::generated(size, 7);
            assert!(c.chars >= size && c.chars < size + 2_000, "{}", c.chars);
            assert_eq!(c.questions.len(), 4);
            for (q, expect) in &c.questions {
                let hits = c.text.to_lowercase().matches(expect[0].as_str()).count();
                assert_eq!(hits, 1, "{q}: {:?} found {hits} times", expect[0]);
            }
            assert_eq!(Corpus::generated(size, 7).text, c.text);
            assert_ne!(Corpus::generated(size, 8).text, c.text);
        }
    }

    #[test]
    fn answers_are_marked_by_the_facts_they_contain() {
        let e = vec!["north quay".to_string()];
        assert!(contains_any("The North Quay terminal.", &e));
        assert!(!contains_any("The south terminal.", &e));
    }
}
