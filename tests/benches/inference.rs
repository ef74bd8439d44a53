//! Inference throughput of `beacon-node serve` against llama.cpp's own `llama-server`,
//! measured in the same run on the same model with the same settings (parallel sequences,
//! context per sequence, threads), reported as ratios:
//!
//! - chat completions at concurrency 1, 4, 8 and 16 (aggregate completion tokens/s, p50
//!   and p99 latency);
//! - a same-prefix workload: MinionS-style jobs that share a long instruction prefix;
//! - resident memory (VmRSS) of each server with the model loaded.
//!
//! Not a test: run with `ops/bench-inference.sh`, which builds `llama-server` from the
//! llama.cpp sources vendored in the llama-cpp-python sdist and passes it in
//! `BEACON_LLAMA_SERVER`. `BEACON_BENCH_TOKENS` sets max_tokens per request (default 64).

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use beacon_harness::load::{Target, run_load};
use beacon_harness::{ChildGuard, NodeServer, free_port, http, wait_for_http};

const PARALLEL: usize = 8;
const CTX_PER_SLOT: usize = 2048;

fn question(i: usize) -> serde_json::Value {
    const TOPICS: [&str; 8] = [
        "rivers",
        "mountains",
        "the moon",
        "bread",
        "trains",
        "bees",
        "glass",
        "music",
    ];
    serde_json::json!([{"role": "user", "content": format!("Write three sentences about {}.", TOPICS[i % TOPICS.len()])}])
}

/// A MinionS-style job: a long shared instruction block, then a different chunk question.
fn prefixed(i: usize) -> serde_json::Value {
    let instructions =
        "You are a careful reading assistant. Read the excerpt below and answer the \
        question about it. Quote the sentence that supports your answer, explain your reasoning in \
        one sentence, and answer null when the excerpt does not contain the answer. Never guess. "
            .repeat(8);
    serde_json::json!([
        {"role": "system", "content": instructions},
        {"role": "user", "content": format!("Excerpt {i}: The invoice number {} was paid on day {}. Question: when was it paid?", 1000 + i, i % 28 + 1)}
    ])
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// Chat load on both servers at concurrency 1 to 16, alternating which goes first.
fn chat(targets: &[Target; 2], max_tokens: u32) -> Vec<serde_json::Value> {
    println!("\n## Chat completions, {max_tokens} tokens each (same run, same model)\n");
    println!(
        "| concurrency | beacon tok/s | llama-server tok/s | ratio | beacon p50 / p99 ms | llama-server p50 / p99 ms | errors |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut loads = Vec::new();
    for c in [1usize, 4, 8, 16] {
        let n = (c * 2).max(6);
        // Alternate the order so neither server always runs on a warmer machine.
        let (a, b) = if c % 2 == 0 {
            let a = run_load(&targets[0], c, n, question, max_tokens);
            let b = run_load(&targets[1], c, n, question, max_tokens);
            (a, b)
        } else {
            let b = run_load(&targets[1], c, n, question, max_tokens);
            let a = run_load(&targets[0], c, n, question, max_tokens);
            (a, b)
        };
        println!(
            "| {c} | {:.1} | {:.1} | {:.2}x | {:.0} / {:.0} | {:.0} / {:.0} | {} / {} |",
            a.tokens_per_second,
            b.tokens_per_second,
            a.tokens_per_second / b.tokens_per_second.max(1e-9),
            a.p50_ms,
            a.p99_ms,
            b.p50_ms,
            b.p99_ms,
            a.errors,
            b.errors
        );
        loads.push(serde_json::json!({"beacon": a, "llama_server": b}));
    }
    loads
}

/// Each server's resident memory with the model loaded, and beacon-node's own estimate.
fn memory(targets: &[Target; 2]) -> serde_json::Map<String, serde_json::Value> {
    println!("\n## Resident memory with the model loaded\n");
    println!("| server | VmRSS MiB |");
    println!("|---|---|");
    let mut mem = serde_json::Map::new();
    for t in targets {
        let m = rss_mib(t.pid);
        println!("| {} | {m:.0} |", t.name);
        mem.insert(t.name.into(), m.into());
    }
    let ps = http("GET", &format!("{}/engines/ps", targets[0].base), None, &[]).json();
    println!(
        "\nbeacon-node's own estimate for the model (weights + KV cache): {:.0} MiB",
        ps[0]["memory_estimate"].as_f64().unwrap_or(0.0) / 1048576.0
    );
    mem
}

fn main() {
    let max_tokens: u32 = std::env::var("BEACON_BENCH_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let llama_server = std::env::var("BEACON_LLAMA_SERVER")
        .expect("set BEACON_LLAMA_SERVER to a llama-server binary (ops/bench-inference.sh does)");
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .to_string();

    let node = NodeServer::start(&[
        "--no-network",
        "--parallel",
        &PARALLEL.to_string(),
        "--ctx-size",
        &CTX_PER_SLOT.to_string(),
        "--threads",
        &threads,
        "--keep-alive=-1",
    ]);
    let node_pid = node.pid();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = Command::new(&llama_server)
        .args([
            "-m",
            beacon_harness::test_model().to_str().unwrap(),
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "-np",
            &PARALLEL.to_string(),
            "-c",
            &(PARALLEL * CTX_PER_SLOT).to_string(),
            "-t",
            &threads,
            "-tb",
            &threads,
            "--no-webui",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting llama-server");
    let llama = ChildGuard(child);
    wait_for_http(addr, "/health", Duration::from_secs(120));

    let targets = [
        Target {
            name: "beacon-node",
            base: format!("http://{}", node.addr),
            pid: node_pid,
        },
        Target {
            name: "llama-server",
            base: format!("http://{addr}"),
            pid: llama.0.id(),
        },
    ];
    // Warm both (model load, first-run allocations).
    for t in &targets {
        let _ = run_load(t, 2, 4, question, 8);
    }

    let mut report = serde_json::Map::new();
    report.insert("chat".into(), chat(&targets, max_tokens).into());

    println!("\n## Same-prefix jobs (shared ~500-token instructions, 24 jobs, concurrency 8)\n");
    println!("| server | wall s | ratio |");
    println!("|---|---|---|");
    let a = run_load(&targets[0], 8, 24, prefixed, 24);
    let b = run_load(&targets[1], 8, 24, prefixed, 24);
    println!(
        "| beacon-node | {:.2} | {:.2}x faster |",
        a.seconds,
        b.seconds / a.seconds.max(1e-9)
    );
    println!("| llama-server | {:.2} | 1.00x |", b.seconds);
    report.insert(
        "same_prefix".into(),
        serde_json::json!({"beacon": a, "llama_server": b}),
    );

    report.insert("memory_mib".into(), memory(&targets).into());

    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("inference.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .unwrap();
    println!("\nwritten: target/bench/inference.json");
}
