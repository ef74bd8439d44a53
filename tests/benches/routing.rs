//! Routing overhead: the same chat load sent to a provider node directly (its own
//! OpenAI-compatible API) and through a router that places it on that node over the QUIC
//! data plane with signature verification, measured in the same run; reported as the
//! throughput ratio and the latency the router adds. A one-token workload isolates the
//! added latency from generation.
//!
//! Not a test: run with `ops/bench-routing.sh`. Placement time at scale is the criterion
//! bench `cargo bench -p beacon-router --bench placement`.

use std::time::Duration;

use beacon_tests::bench::{Target, run_load};
use beacon_tests::{NodeServer, RouterServer, wait_until};

fn question(i: usize) -> serde_json::Value {
    const TOPICS: [&str; 6] = ["rivers", "bread", "trains", "bees", "glass", "music"];
    serde_json::json!([{"role": "user", "content": format!("Write two sentences about {}.", TOPICS[i % TOPICS.len()])}])
}

fn main() {
    let max_tokens: u32 = std::env::var("BEACON_BENCH_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let node = NodeServer::start(&["--parallel", "8", "--keep-alive=-1"]);
    let router = RouterServer::start(Some(&node.bootstrap_addr()), &["--audit-rate", "0"]);
    let peer = node.peer_id();
    assert!(wait_until(Duration::from_secs(60), || router
        .providers()
        .contains(&peer)));
    let targets = [
        Target {
            name: "direct",
            base: format!("http://{}", node.addr),
            pid: node.pid(),
        },
        Target {
            name: "routed",
            base: router.url(""),
            pid: 0,
        },
    ];
    for t in &targets {
        let _ = run_load(t, 2, 6, question, 8);
    }
    let mut rows = Vec::new();
    println!("\n## Routed vs direct chat ({max_tokens} tokens each, same run, same node)\n");
    println!(
        "| concurrency | direct tok/s | routed tok/s | ratio | direct p50 / p99 ms | routed p50 / p99 ms | added p50 ms | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for c in [1usize, 4, 8] {
        let n = (c * 3).max(8);
        let (d, r) = if c % 2 == 0 {
            let d = run_load(&targets[0], c, n, question, max_tokens);
            (d, run_load(&targets[1], c, n, question, max_tokens))
        } else {
            let r = run_load(&targets[1], c, n, question, max_tokens);
            (run_load(&targets[0], c, n, question, max_tokens), r)
        };
        println!(
            "| {c} | {:.1} | {:.1} | {:.2}x | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} | {} / {} |",
            d.tokens_per_second,
            r.tokens_per_second,
            r.tokens_per_second / d.tokens_per_second.max(1e-9),
            d.p50_ms,
            d.p99_ms,
            r.p50_ms,
            r.p99_ms,
            r.p50_ms - d.p50_ms,
            d.errors,
            r.errors
        );
        rows.push(serde_json::json!({"direct": d, "routed": r}));
    }
    println!("\n## Added latency alone (1-token answers, concurrency 1, 30 requests)\n");
    let d = run_load(&targets[0], 1, 30, question, 1);
    let r = run_load(&targets[1], 1, 30, question, 1);
    println!("| path | p50 ms | p99 ms |");
    println!("|---|---|---|");
    println!("| direct | {:.1} | {:.1} |", d.p50_ms, d.p99_ms);
    println!("| routed | {:.1} | {:.1} |", r.p50_ms, r.p99_ms);
    println!(
        "\nThe router adds {:.1} ms at the median (placement, QUIC hop, signing and verification).",
        r.p50_ms - d.p50_ms
    );
    let report = serde_json::json!({"load": rows, "one_token": {"direct": d, "routed": r}});
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("routing.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .unwrap();
    println!("\nwritten: target/bench/routing.json");
}
