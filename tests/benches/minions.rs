//! MinionS vs Minion vs remote-only, with the same supervisor, on a long document with
//! known answers: accuracy and remote tokens, reported as a table (and
//! `target/bench/minions.json`).
//!
//! The network: two provider nodes (SmolLM2-135M) in two regions and a router. The
//! supervisor is the API named by `BEACON_BENCH_REMOTE_URL` / `BEACON_BENCH_REMOTE_MODEL` /
//! `BEACON_BENCH_REMOTE_KEY` when set (a real frontier model), otherwise a local Beacon node
//! serving Gemma 3 270M (`ops/setup.sh --supervisor-model`). The remote-only figure is
//! measured, not estimated: each MinionS job runs with `remote_only_baseline: "run"`, which
//! asks the same supervisor the question with the whole document.
//!
//! Not a test: run with `ops/bench-minions.sh`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use beacon_tests::{NodeServer, RouterServer, SUPERVISOR_MODEL_REF, http_within, wait_until};
use serde_json::{Value, json};

const DOC: &str = "ops/data/northport-annual-report-2025.txt";

/// Questions about the document and a string every correct answer contains.
const QUESTIONS: [(&str, &str); 4] = [
    (
        "How many tonnes of cargo did the port handle in 2025?",
        "14.2",
    ),
    (
        "Which terminal was closed for repairs in 2025?",
        "north quay",
    ),
    (
        "Who succeeded the harbour master when she retired?",
        "reyes",
    ),
    ("How much tariff revenue did the port earn?", "61.5"),
];

#[derive(Default, serde::Serialize)]
struct Tally {
    correct: usize,
    runs: usize,
    failed: usize,
    remote_tokens: u64,
    seconds: f64,
}

impl Tally {
    fn add(&mut self, answer: &str, expect: &str, remote: u64, secs: f64) {
        self.runs += 1;
        self.correct += answer.to_lowercase().contains(expect) as usize;
        self.remote_tokens += remote;
        self.seconds += secs;
    }
    fn accuracy(&self) -> f64 {
        self.correct as f64 / self.runs.max(1) as f64
    }
    fn mean_tokens(&self) -> f64 {
        self.remote_tokens as f64 / (self.runs - self.failed).max(1) as f64
    }
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc = std::fs::read_to_string(root.join(DOC)).expect("the bundled document");
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
    // The supervisor: a real API when configured, else Gemma 3 270M on a local node.
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
    let router = RouterServer::start(Some(&boot), &flags);
    let (pa, pb) = (a.peer_id(), b.peer_id());
    assert!(wait_until(Duration::from_secs(60), || {
        let p = router.providers();
        p.contains(&pa) && p.contains(&pb)
    }));
    eprintln!("supervisor: {model} at {url}");

    let (mut minions, mut minion, mut remote_only) =
        (Tally::default(), Tally::default(), Tally::default());
    let mut runs = Vec::new();
    // BEACON_BENCH_QUESTIONS=N: only the first N questions (a shorter run on slow machines).
    let questions = &QUESTIONS[..std::env::var("BEACON_BENCH_QUESTIONS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(QUESTIONS.len())
        .clamp(1, QUESTIONS.len())];
    for (i, (question, expect)) in questions.iter().enumerate() {
        eprintln!("[{}/{}] {question}", i + 1, questions.len());
        for protocol in ["minions", "minion"] {
            let body = json!({
                "task": question,
                "context": [doc],
                "doc_metadata": "Annual report of a harbour authority, 2025",
                "protocol": protocol,
                "max_rounds": if protocol == "minions" { 2 } else { 3 },
                "policy": {
                    "remote_only_baseline": if protocol == "minions" { "run" } else { "estimate" }
                }
            });
            let t = Instant::now();
            // A CPU supervisor reading the whole document for the remote-only run needs
            // minutes: far past `http`'s two.
            let r = http_within(
                "POST",
                &router.url("/v1/minions"),
                Some(&body.to_string()),
                &[],
                3600,
            );
            let secs = t.elapsed().as_secs_f64();
            let tally = if protocol == "minions" {
                &mut minions
            } else {
                &mut minion
            };
            if r.status != 200 {
                eprintln!("  {protocol}: failed ({}): {}", r.status, r.body);
                tally.runs += 1;
                tally.failed += 1;
                runs.push(json!({"question": question, "protocol": protocol, "error": r.body}));
                continue;
            }
            let v: Value = r.json();
            let answer = v["answer"].as_str().unwrap_or("").to_string();
            let remote = v["usage"]["remote"]["total_tokens"].as_u64().unwrap_or(0);
            let wall = v["timing"]["total_ms"].as_f64().unwrap_or(0.0) / 1000.0;
            tally.add(&answer, expect, remote, wall);
            eprintln!("  {protocol}: {remote} remote tokens, {secs:.0} s: {answer:.80}");
            if protocol == "minions" {
                let only = &v["usage"]["remote_only"];
                let ro_answer = only["answer"].as_str().unwrap_or("").to_string();
                remote_only.add(
                    &ro_answer,
                    expect,
                    only["total_tokens"].as_u64().unwrap_or(0),
                    only["ms"].as_f64().unwrap_or(0.0) / 1000.0,
                );
                eprintln!(
                    "  remote-only: {} remote tokens: {ro_answer:.80}",
                    only["total_tokens"]
                );
            }
            runs.push(json!({"question": question, "protocol": protocol, "answer": v}));
        }
    }
    println!(
        "\n## MinionS vs Minion vs remote-only ({} questions, supervisor {model}, local SmolLM2-135M)\n",
        questions.len()
    );
    println!(
        "| method | accuracy | mean remote tokens | remote tokens vs remote-only | failed runs | mean wall s |"
    );
    println!("|---|---|---|---|---|---|");
    let base = remote_only.mean_tokens().max(1.0);
    for (name, t) in [
        ("remote-only", &remote_only),
        ("MinionS", &minions),
        ("Minion", &minion),
    ] {
        println!(
            "| {name} | {}/{} ({:.0}%) | {:.0} | {:.3} | {} | {:.0} |",
            t.correct,
            t.runs,
            t.accuracy() * 100.0,
            t.mean_tokens(),
            t.mean_tokens() / base,
            t.failed,
            t.seconds / (t.runs - t.failed).max(1) as f64
        );
    }
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("minions.json"),
        serde_json::to_string_pretty(&json!({
            "supervisor": model,
            "remote_only": remote_only, "minions": minions, "minion": minion, "runs": runs
        }))
        .unwrap(),
    )
    .unwrap();
    println!("\nwritten: target/bench/minions.json");
}
