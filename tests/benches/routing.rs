//! Routing overhead: the same chat load sent to a provider node directly (its own
//! OpenAI-compatible API) and through a router that places it on that node over the QUIC
//! data plane with signature verification, measured in the same run; reported as the
//! throughput ratio and the latency the router adds. A one-token workload isolates the
//! added latency from generation.
//!
//! Not a test: run with `ops/bench-routing.sh`. Placement time at scale is the criterion
//! bench `cargo bench -p beacon-router --bench placement`.

use std::time::Duration;

use beacon_harness::load::{Load, Target, run_load, run_load_streamed, summarize};
use beacon_harness::{NodeServer, RouterServer, http, wait_until};

fn question(i: usize) -> serde_json::Value {
    const TOPICS: [&str; 6] = ["rivers", "bread", "trains", "bees", "glass", "music"];
    serde_json::json!([{"role": "user", "content": format!("Write two sentences about {}.", TOPICS[i % TOPICS.len()])}])
}

fn main() {
    let max_tokens: u32 = std::env::var("BEACON_BENCH_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    // Every core for the node's engine (the test harness gives its nodes one thread).
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .to_string();
    let node = NodeServer::start(&["--parallel", "8", "--keep-alive=-1", "--threads", &threads]);
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
        through("routed", &router),
    ];
    // Warm-up at the highest concurrency measured: the router learns the node's capacity
    // from answers (slow start), as a router that has been running has.
    for t in &targets {
        let _ = run_load_streamed(t, 8, 24, question, 8);
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
            let d = run_load_streamed(&targets[0], c, n, question, max_tokens);
            (
                d,
                run_load_streamed(&targets[1], c, n, question, max_tokens),
            )
        } else {
            let r = run_load_streamed(&targets[1], c, n, question, max_tokens);
            (
                run_load_streamed(&targets[0], c, n, question, max_tokens),
                r,
            )
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
    let (d, r) = one_token(&targets);
    // The first node's threads would share the cores with the next two.
    drop(router);
    drop(node);
    let audits = audit_cost(max_tokens);
    let report = serde_json::json!({
        "load": rows,
        "one_token": {"direct": d, "routed": r},
        "audits": audits,
    });
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("routing.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .unwrap();
    println!("\nwritten: target/bench/routing.json");
}

/// The latency the router adds alone: 1-token answers at concurrency 1, direct and routed.
fn one_token(targets: &[Target; 2]) -> (Load, Load) {
    // Interleaved rounds, so drift on the machine (a warming cache, a busy core) falls on
    // both paths alike.
    println!(
        "\n## Added latency alone (1-token answers, concurrency 1, 4 x 25 requests each, interleaved)\n"
    );
    let (mut d, mut r) = ((0.0, Vec::new()), (0.0, Vec::new()));
    for _ in 0..4 {
        for (t, acc) in [(&targets[0], &mut d), (&targets[1], &mut r)] {
            let l = run_load_streamed(t, 1, 25, question, 1);
            acc.0 += l.seconds;
            acc.1.extend(l.samples);
        }
    }
    let (d, r) = (summarize(1, d.0, d.1), summarize(1, r.0, r.1));
    println!("| path | p50 ms | p99 ms | first token p50 ms | errors |");
    println!("|---|---|---|---|---|");
    for (name, l) in [("direct", &d), ("routed", &r)] {
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} | {} |",
            l.p50_ms, l.p99_ms, l.ttft_p50_ms, l.errors
        );
    }
    println!(
        "\nThe router adds {:.2} ms at the median (placement, QUIC hop, signing and verification; \
         streamed requests from an in-process client with kept-alive connections).",
        r.p50_ms - d.p50_ms
    );
    (d, r)
}

/// The load target of a router's OpenAI API.
fn through(name: &'static str, router: &RouterServer) -> Target {
    Target {
        name,
        base: router.url(""),
        pid: 0,
    }
}

/// The sum of a Prometheus counter at a router (all label sets).
fn metric(router: &RouterServer, name: &str) -> f64 {
    http("GET", &router.url("/metrics"), None, &[])
        .body
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What audits cost honest traffic: two nodes of one llama.cpp thread each (an auditor
/// needs a second provider of the digest; one thread each shares the two cores without
/// oversubscribing them), and the same chat load alternately through a router auditing
/// at its default rate and through one that never audits, over those two nodes. Both
/// routers are told to trust both nodes (`--trusted-provider`), so neither puts them on
/// probation and the auditing one audits at its base rate from the start.
fn audit_cost(max_tokens: u32) -> serde_json::Value {
    let first = NodeServer::start(&["--parallel", "8", "--keep-alive=-1", "--threads", "1"]);
    let boot = first.bootstrap_addr();
    let second = NodeServer::start(&[
        "--parallel",
        "8",
        "--keep-alive=-1",
        "--threads",
        "1",
        "--bootstrap",
        &boot,
    ]);
    let trusted = format!("{},{}", first.peer_id(), second.peer_id());
    let auditing = RouterServer::start(Some(&boot), &["--trusted-provider", &trusted]);
    let plain = RouterServer::start(
        Some(&boot),
        &["--trusted-provider", &trusted, "--audit-rate", "0"],
    );
    for r in [&auditing, &plain] {
        assert!(wait_until(Duration::from_secs(60), || {
            let p = r.providers();
            p.contains(&first.peer_id()) && p.contains(&second.peer_id())
        }));
    }
    let targets = [through("auditing", &auditing), through("plain", &plain)];
    for t in &targets {
        let _ = run_load(t, 4, 8, question, 8);
    }
    let counters = || {
        (
            metric(&auditing, "beacon_router_audits_total"),
            metric(&auditing, "beacon_router_audit_tokens_total"),
            metric(&auditing, "beacon_router_tokens_total"),
        )
    };
    let before = counters();
    let (c, n, rounds) = (4usize, 40usize, 6usize);
    let (mut a, mut p) = (Vec::new(), Vec::new());
    let (mut a_s, mut p_s) = (0.0, 0.0);
    for k in 0..rounds {
        // Alternate which goes first, so neither always runs on a warmer machine.
        let order = if k % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let l = run_load(&targets[i], c, n, |j| question(k * n + j), max_tokens);
            if i == 0 {
                a_s += l.seconds;
                a.extend(l.samples);
            } else {
                p_s += l.seconds;
                p.extend(l.samples);
            }
            // Audits of the last answers finish before the next load.
            std::thread::sleep(Duration::from_secs(2));
        }
    }
    let after = counters();
    let (audited, unaudited): (Load, Load) = (summarize(c, a_s, a), summarize(c, p_s, p));
    let ratio = audited.tokens_per_second / unaudited.tokens_per_second.max(1e-9);
    let share = (after.1 - before.1) / (after.2 - before.2).max(1.0);
    println!(
        "\n## What audits cost ({c} clients, {rounds} alternating rounds of {n} requests, two nodes)\n"
    );
    println!("| router | tok/s | p50 / p99 ms | errors |");
    println!("|---|---|---|---|");
    for (name, l) in [
        ("auditing (rate 0.05)", &audited),
        ("never audits", &unaudited),
    ] {
        println!(
            "| {name} | {:.1} | {:.0} / {:.0} | {} |",
            l.tokens_per_second, l.p50_ms, l.p99_ms, l.errors
        );
    }
    println!(
        "\nAuditing at the default rate: {ratio:.2}x the throughput of never auditing; {:.0} audits scored {:.0} tokens, {:.1} % of the {:.0} served.",
        after.0 - before.0,
        after.1 - before.1,
        100.0 * share,
        after.2 - before.2
    );
    serde_json::json!({
        "concurrency": c,
        "rounds": rounds,
        "requests_per_round": n,
        "auditing": audited,
        "plain": unaudited,
        "throughput_ratio": ratio,
        "audits": after.0 - before.0,
        "audit_tokens": after.1 - before.1,
        "served_tokens": after.2 - before.2,
        "cost_share": share,
    })
}
