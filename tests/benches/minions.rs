//! MinionS vs Minion vs remote-only, with the same supervisor, on documents with known
//! answers: the bundled 28 KB report and generated reports of 300 KB and 1 MB (seeded, facts
//! planted; `beacon_harness::corpus::Corpus::generated`), which remote-only cannot even ask
//! a small supervisor. Reported per document as a table (and `target/bench/minions.json`):
//! accuracy, evidence recall (the known fact was in the evidence the supervisor saw),
//! grounding rate, remote tokens and wall time against remote-only, each measured in the
//! same run.
//!
//! The network: two provider nodes (SmolLM2-135M-Instruct) in two regions and a router. The
//! supervisor is the API named by `BEACON_BENCH_REMOTE_URL` / `BEACON_BENCH_REMOTE_MODEL` /
//! `BEACON_BENCH_REMOTE_KEY` when set (a real frontier model), otherwise a local Beacon node
//! serving SmolLM2-135M-Instruct. The remote-only figure is measured, not estimated, where
//! the document fits the supervisor: each MinionS job runs with
//! `remote_only_baseline: "run"`, which asks the same supervisor the question with the
//! whole document; where it does not fit, the job says so and the figure is the estimate.
//!
//! `BEACON_BENCH_QUESTIONS=N` asks the first N questions per document; `BEACON_BENCH_SIZES`
//! lists the generated sizes in bytes (default `300000,1000000`; empty: the report only).
//!
//! Not a test: run with `ops/bench-minions.sh`.

use std::path::PathBuf;
use std::time::Duration;

use beacon_harness::corpus::Corpus;
use beacon_harness::{NodeServer, RouterServer, SUPERVISOR_MODEL_REF, http_within, wait_until};
use serde_json::{Value, json};

#[derive(Default, serde::Serialize)]
struct Tally {
    correct: usize,
    runs: usize,
    failed: usize,
    /// Runs whose evidence held the known fact (MinionS).
    recalled: usize,
    findings: u64,
    grounded: u64,
    remote_tokens: u64,
    seconds: f64,
    /// Remote-only: runs that could not be asked (the document is longer than the
    /// supervisor's context); their tokens are the estimate.
    not_asked: usize,
}

impl Tally {
    fn add(&mut self, answer: &str, expect: &[String], remote: u64, secs: f64) {
        self.runs += 1;
        self.correct += contains_any(answer, expect) as usize;
        self.remote_tokens += remote;
        self.seconds += secs;
    }
    fn answered(&self) -> usize {
        (self.runs - self.failed).max(1)
    }
    fn mean_tokens(&self) -> f64 {
        self.remote_tokens as f64 / self.answered() as f64
    }
    fn mean_seconds(&self) -> f64 {
        self.seconds / self.answered() as f64
    }
}

fn contains_any(text: &str, expect: &[String]) -> bool {
    let t = text.to_lowercase();
    expect.iter().any(|e| t.contains(e.as_str()))
}

/// Asks `question` about `doc` as one `protocol` job; counts it in `tally` (and, for
/// MinionS, its remote-only baseline in `remote_only`); returns the run's record.
fn ask(
    router: &RouterServer,
    doc: &Corpus,
    question: &str,
    expect: &[String],
    protocol: &str,
    tally: &mut Tally,
    remote_only: &mut Tally,
) -> Value {
    let body = json!({
        "task": question,
        "context": [doc.text],
        "doc_metadata": doc.metadata,
        "protocol": protocol,
        "max_rounds": if protocol == "minions" { 2 } else { 3 },
        "policy": {
            "remote_only_baseline": if protocol == "minions" { "run" } else { "estimate" }
        }
    });
    // A CPU supervisor reading the whole document for the remote-only run
    // needs minutes: far past `http`'s two.
    let r = http_within(
        "POST",
        &router.url("/v1/minions"),
        Some(&body.to_string()),
        &[],
        3600,
    );
    if r.status != 200 {
        eprintln!("  {protocol}: failed ({}): {}", r.status, r.body);
        tally.runs += 1;
        tally.failed += 1;
        return json!({"document": doc.name, "question": question, "protocol": protocol, "error": r.body});
    }
    let v: Value = r.json();
    let answer = v["answer"].as_str().unwrap_or("").to_string();
    let remote = v["usage"]["remote"]["total_tokens"].as_u64().unwrap_or(0);
    let only = &v["usage"]["remote_only"];
    let only_ms = only["ms"].as_f64().unwrap_or(0.0);
    let wall = (v["timing"]["total_ms"].as_f64().unwrap_or(0.0) - only_ms) / 1000.0;
    tally.add(&answer, expect, remote, wall);
    let recalled = v["evidence"].as_array().is_some_and(|list| {
        list.iter().any(|e| {
            contains_any(e["citation"].as_str().unwrap_or(""), expect)
                || contains_any(e["answer"].as_str().unwrap_or(""), expect)
        })
    });
    tally.recalled += recalled as usize;
    tally.findings += v["grounding"]["findings"].as_u64().unwrap_or(0);
    tally.grounded += v["grounding"]["grounded"].as_u64().unwrap_or(0);
    eprintln!(
        "  {protocol}: {} ({}), {remote} remote tokens, {wall:.0} s: {answer:.80}",
        if contains_any(&answer, expect) {
            "right"
        } else {
            "wrong"
        },
        if recalled {
            "fact in the evidence"
        } else {
            "fact not in the evidence"
        }
    );
    if protocol == "minions" {
        let ro_answer = only["answer"].as_str().unwrap_or("").to_string();
        remote_only.add(
            &ro_answer,
            expect,
            only["total_tokens"].as_u64().unwrap_or(0),
            only_ms / 1000.0,
        );
        if only["error"].is_string() {
            remote_only.not_asked += 1;
        }
        eprintln!(
            "  remote-only: {} remote tokens{}: {ro_answer:.80}",
            only["total_tokens"],
            only["error"]
                .as_str()
                .map(|e| format!(" (estimated; {e:.100})"))
                .unwrap_or_default()
        );
    }
    json!({"document": doc.name, "question": question, "protocol": protocol, "answer": v})
}

/// One document's rows: accuracy, evidence, remote tokens and time of each method.
fn table(doc: &Corpus, remote_only: &Tally, minions: &Tally, minion: &Tally) -> String {
    let mut report = format!(
        "\n### {} ({} characters, {} questions)\n\n\
         | method | accuracy | evidence recall | grounded findings | mean remote tokens | remote tokens vs remote-only | mean wall s | wall vs remote-only | failed runs |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        doc.name,
        doc.chars,
        doc.questions.len()
    );
    let base_tokens = remote_only.mean_tokens().max(1.0);
    let base_secs = remote_only.mean_seconds();
    for (name, t) in [
        ("remote-only", remote_only),
        ("MinionS", minions),
        ("Minion", minion),
    ] {
        if t.runs == 0 {
            continue;
        }
        let is_base = name == "remote-only";
        let asked = remote_only.not_asked < remote_only.runs;
        report.push_str(&format!(
            "| {name} | {} | {} | {} | {:.0}{} | {} | {} | {} | {} |\n",
            if is_base && !asked {
                "cannot be asked (longer than the supervisor's context)".to_string()
            } else {
                format!("{}/{}", t.correct, t.runs)
            },
            if is_base || name == "Minion" {
                "-".to_string()
            } else {
                format!("{}/{}", t.recalled, t.runs - t.failed)
            },
            if is_base || name == "Minion" {
                "-".to_string()
            } else {
                format!("{} of {}", t.grounded, t.findings)
            },
            t.mean_tokens(),
            if is_base && !asked { " (estimate)" } else { "" },
            if is_base {
                "1".into()
            } else {
                format!("{:.3}", t.mean_tokens() / base_tokens)
            },
            if is_base && !asked {
                "-".to_string()
            } else {
                format!("{:.0}", t.mean_seconds())
            },
            if is_base || !asked || base_secs <= 0.0 {
                "-".to_string()
            } else {
                format!("{:.2}x", t.mean_seconds() / base_secs)
            },
            t.failed
        ));
    }
    report
}

/// A router whose supervisor is a real API when `BEACON_BENCH_REMOTE_URL` names one, else
/// SmolLM2 on a local node (returned, to keep it running), with its model and URL.
fn supervised_router(boot: &str) -> (RouterServer, Option<NodeServer>, String, String) {
    // The supervisor: a real API when configured, else SmolLM2 on a local node.
    let mut _local_supervisor = None;
    let (url, model, key) = match std::env::var("BEACON_BENCH_REMOTE_URL") {
        Ok(u) => (
            u,
            std::env::var("BEACON_BENCH_REMOTE_MODEL").expect("BEACON_BENCH_REMOTE_MODEL"),
            std::env::var("BEACON_BENCH_REMOTE_KEY").ok(),
        ),
        Err(_) => {
            let sup = NodeServer::supervisor();
            let u = sup.url("/engines/v1");
            _local_supervisor = Some(sup);
            (u, SUPERVISOR_MODEL_REF.to_string(), None)
        }
    };
    let mut flags = vec![
        "--remote-base-url",
        url.as_str(),
        "--remote-model",
        model.as_str(),
        // The Minion worker reads the whole document in one call: on one CPU thread that
        // prefill alone can pass the default 120 s attempt timeout.
        "--attempt-timeout",
        "900",
    ];
    if let Some(k) = &key {
        flags.extend(["--remote-api-key", k.as_str()]);
    }
    let router = RouterServer::start(Some(boot), &flags);
    (router, _local_supervisor, model, url)
}

/// The bundled report and generated ones of `BEACON_BENCH_SIZES` characters, with
/// `BEACON_BENCH_QUESTIONS` questions each.
fn documents() -> Vec<Corpus> {
    let per_doc = std::env::var("BEACON_BENCH_QUESTIONS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(4)
        .clamp(1, 4);
    let sizes: Vec<usize> = std::env::var("BEACON_BENCH_SIZES")
        .unwrap_or_else(|_| "300000,1000000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let mut docs = vec![Corpus::northport(usize::MAX, per_doc)];
    for (i, size) in sizes.iter().enumerate() {
        let mut c = Corpus::generated(*size, 2025 + i as u64);
        c.questions.truncate(per_doc);
        docs.push(c);
    }
    docs
}

fn main() {
    // Two providers and a supervisor share this machine: one llama.cpp thread per provider
    // keeps them from oversubscribing the cores (spinning threads on shared cores stall).
    let threads = (std::thread::available_parallelism().map_or(2, |n| n.get()) / 2).max(1);
    let threads = threads.to_string();
    let a = NodeServer::start(&[
        "--region",
        "eu-west",
        "--ctx-size",
        "8192",
        "--threads",
        &threads,
    ]);
    let boot = a.bootstrap_addr();
    let b = NodeServer::start(&[
        "--region",
        "us-east",
        "--bootstrap",
        &boot,
        "--ctx-size",
        "8192",
        "--threads",
        &threads,
    ]);
    let (router, _local_supervisor, model, url) = supervised_router(&boot);
    let (pa, pb) = (a.peer_id(), b.peer_id());
    assert!(wait_until(Duration::from_secs(60), || {
        let p = router.providers();
        p.contains(&pa) && p.contains(&pb)
    }));
    eprintln!("supervisor: {model} at {url}");

    let docs = documents();
    let mut report = String::new();
    let mut runs = Vec::new();
    let mut summary = Vec::new();
    for doc in &docs {
        let (mut minions, mut minion, mut remote_only) =
            (Tally::default(), Tally::default(), Tally::default());
        // The Minion worker reads the whole document in one call: only where it fits.
        let protocols: &[&str] = if doc.chars <= 30_000 {
            &["minions", "minion"]
        } else {
            &["minions"]
        };
        for (i, (question, expect)) in doc.questions.iter().enumerate() {
            eprintln!(
                "[{} {}/{}] {question}",
                doc.name,
                i + 1,
                doc.questions.len()
            );
            for protocol in protocols {
                let tally = if *protocol == "minions" {
                    &mut minions
                } else {
                    &mut minion
                };
                runs.push(ask(
                    &router,
                    doc,
                    question,
                    expect,
                    protocol,
                    tally,
                    &mut remote_only,
                ));
            }
        }
        report.push_str(&table(doc, &remote_only, &minions, &minion));
        summary.push(json!({
            "document": doc.name, "chars": doc.chars,
            "remote_only": remote_only, "minions": minions, "minion": minion,
        }));
    }
    println!("\n## MinionS vs Minion vs remote-only (supervisor {model}, local SmolLM2-135M)");
    println!("{report}");
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("minions.json"),
        serde_json::to_string_pretty(&json!({
            "supervisor": model, "documents": summary, "runs": runs
        }))
        .unwrap(),
    )
    .unwrap();
    println!("\nwritten: target/bench/minions.json");
}
