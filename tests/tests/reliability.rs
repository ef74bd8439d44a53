//! The reliability suite: Beacon under abuse it must survive. Model pulls killed with
//! SIGKILL at random moments, a provider killed in every round of a MinionS job, a router
//! driven at ten times its providers' capacity, and a flood of garbage at every QUIC port
//! while honest traffic keeps flowing.

use std::io::BufRead;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use beacon_harness::{
    ChildGuard, HttpReply, NodeCli, NodeServer, Registry, Relay, RelayOptions, RouterServer,
    TEST_MODEL_REF, advert_of, http, http_within, now_ms, sha256_file, test_model, wait_until,
};
use serde_json::{Value, json};

/// Every blob in the store is whole: its content hashes to its name.
fn assert_blobs_whole(node: &NodeCli) {
    for name in node.blobs() {
        let path = node.store().join("blobs/sha256").join(&name);
        assert_eq!(sha256_file(&path), name, "a visible blob is corrupt");
    }
}

#[test]
fn pulls_killed_at_random_moments_never_leave_a_corrupt_or_half_visible_model() {
    let registry = Registry::start();
    let publisher = NodeCli::new();
    publisher.package_test_model();
    let reference = format!("{}/ai/smollm2:kill", registry.host());
    publisher.ok(&["model", "tag", TEST_MODEL_REF, &reference]);
    publisher.ok(&["model", "push", &reference]);
    // 98 MB at 32 MB/s: about 3 s per pull, so the kills land before, during and after
    // the blob transfer.
    let slow = Relay::start(
        registry.addr,
        RelayOptions {
            bytes_per_sec: Some(32 << 20),
            ..Default::default()
        },
    );
    let reference = format!("{}/ai/smollm2:kill", slow.addr);
    let node = NodeCli::new();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("kill moments from seed {seed}");
    let mut rng = seed;
    let mut kills = Vec::new();
    for _ in 0..6 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let after = Duration::from_millis(rng % 3500);
        let mut child = ChildGuard(
            node.command()
                .args(["model", "pull", "--progress", "none", &reference])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        let start = Instant::now();
        while start.elapsed() < after && child.0.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
        let finished = child.0.try_wait().unwrap().is_some();
        child.0.kill().ok(); // SIGKILL
        child.0.wait().unwrap();
        kills.push((after, finished));
        // Whatever the moment: every visible blob is whole, and the model is either
        // listed complete (its weights present and whole) or not listed at all.
        assert_blobs_whole(&node);
        let models = node.models();
        let listed = models.as_array().unwrap();
        assert!(listed.len() <= 1, "{models}");
        if !listed.is_empty() {
            assert!(
                node.blobs().contains(&sha256_file(&test_model())),
                "a listed model without its weights: {models}"
            );
            // Start the next round from nothing, so its kill meets a transfer too.
            node.ok(&["model", "rm", &reference]);
            assert!(!node.blobs().contains(&sha256_file(&test_model())));
        }
    }
    eprintln!("kills (after, pull had finished): {kills:?}");
    // The pull completes after all of that, and the model serves.
    node.ok(&["model", "pull", "--progress", "none", &reference]);
    assert_blobs_whole(&node);
    assert!(node.blobs().contains(&sha256_file(&test_model())));
    assert_eq!(node.models().as_array().unwrap().len(), 1);
    assert!(node.partials().is_empty(), "{:?}", node.partials());
}

fn chat(topic: &str, max_tokens: u32) -> String {
    format!(
        r#"{{"model":"ai/smollm2:test","temperature":0,"max_tokens":{max_tokens},"messages":[{{"role":"user","content":"Write about {topic}."}}]}}"#
    )
}

fn metric(url: &str, name: &str) -> f64 {
    http("GET", url, None, &[])
        .body
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} "))?.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name}"))
}

#[test]
fn router_at_ten_times_capacity_sheds_with_retry_after_and_loses_nothing() {
    // Two slots in the network, two more requests may wait in the router: 4 in all.
    let node = NodeServer::start(&["--parallel", "2"]);
    let peer = node.peer_id();
    let router = RouterServer::start(
        Some(&node.bootstrap_addr()),
        &[
            "--max-queue",
            "2",
            "--audit-rate",
            "0",
            "--hedge-quantile",
            "0",
        ],
    );
    assert!(wait_until(Duration::from_secs(60), || router
        .providers()
        .contains(&peer)));
    let url = router.url("/v1/chat/completions");
    assert_eq!(http("POST", &url, Some(&chat("tea", 2)), &[]).status, 200);

    // Ten times the two slots, all at once, each asking for a long answer.
    let burst = 20;
    let handles: Vec<_> = (0..burst)
        .map(|i| {
            let (url, body) = (url.clone(), chat(&format!("the number {i}"), 64));
            std::thread::spawn(move || http("POST", &url, Some(&body), &[]))
        })
        .collect();
    let replies: Vec<HttpReply> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok: Vec<&HttpReply> = replies.iter().filter(|r| r.status == 200).collect();
    let shed: Vec<&HttpReply> = replies.iter().filter(|r| r.status == 503).collect();
    assert_eq!(
        ok.len() + shed.len(),
        burst,
        "every request is answered or refused, none cut off: {:?}",
        replies
            .iter()
            .filter(|r| r.status != 200 && r.status != 503)
            .collect::<Vec<_>>()
    );
    assert!(
        ok.len() >= 4,
        "the slots and the queue are served: {} answered",
        ok.len()
    );
    assert!(!shed.is_empty(), "beyond slots + queue the router refuses");
    for r in &ok {
        let v = r.json();
        assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{v}");
        assert_eq!(v["beacon"]["verified"], true);
    }
    for r in &shed {
        let after: u64 = r
            .header("retry-after")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("503 without Retry-After: {}", r.headers));
        assert!((1..=60).contains(&after), "Retry-After {after}");
        assert_eq!(r.json()["error"]["type"], "overloaded");
    }
    let metrics = router.url("/metrics");
    assert_eq!(
        metric(&metrics, "beacon_router_shed_total") as usize,
        shed.len()
    );
    // Nothing admitted was lost: every request the router took was answered.
    assert_eq!(
        metric(&metrics, "beacon_router_routed_total") as usize,
        ok.len() + 1
    );
    // The queue drains: the next request is served.
    assert_eq!(http("POST", &url, Some(&chat("rain", 4)), &[]).status, 200);
}

/// Random-looking bytes (xorshift), no two datagrams alike.
fn garbage(seed: &mut u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            *seed as u8
        })
        .collect()
}

/// A peer that joins through `boot` and publishes invalid adverts until `stop`: adverts
/// describing another peer, adverts signed by another key, stale ones, and bytes that are
/// no advert at all. Returns how many it got out, its peer id and its victim's.
fn advert_liar(
    boot: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(u64, String, String)> {
    use beacon_net::{Network, NetworkConfig};
    use beacon_proto::{Keypair, Signed, Wire};
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let key = Keypair::generate();
            let victim = Keypair::generate();
            let mut config = NetworkConfig::new(key.clone());
            config.listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()];
            config.bootstrap = vec![boot.parse().unwrap()];
            let net = Network::start(config).await.unwrap();
            let (me, them) = (key.peer_id(), victim.peer_id());
            let mut seed = 0x2545_f491_4f6c_dd1du64;
            let (mut sent, mut seq) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                seq += 1;
                let bytes = match seq % 4 {
                    0 => Signed::sign(&key, &advert_of(them, now_ms(), seq)),
                    1 => Signed::sign(&victim, &advert_of(me, now_ms(), seq)),
                    2 => Signed::sign(&key, &advert_of(me, now_ms() - 3_600_000, seq)),
                    _ => {
                        let len = 1 + (seq as usize * 37) % 700;
                        if net.publish_raw(garbage(&mut seed, len)).await.is_ok() {
                            sent += 1;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                }
                .unwrap()
                .encode()
                .unwrap();
                if net.publish_raw(bytes).await.is_ok() {
                    sent += 1;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            net.shutdown().await;
            (sent, me.to_string(), them.to_string())
        })
    })
}

/// Garbage datagrams shaped like QUIC packets at every QUIC port of a provider, and a peer
/// publishing invalid adverts into the network, both while routed chat runs: every request
/// is answered, no process panics, and no invalid advert enters a directory.
#[test]
fn garbage_at_every_quic_port_does_not_stop_honest_traffic() {
    let node = NodeServer::start(&["--parallel", "2"]);
    let peer = node.peer_id();
    let router = RouterServer::start(Some(&node.bootstrap_addr()), &["--audit-rate", "0"]);
    assert!(wait_until(Duration::from_secs(60), || router
        .providers()
        .contains(&peer)));
    // Every UDP port that speaks QUIC: the node's libp2p listener and data plane.
    let info = node.node_info();
    let mut targets: Vec<std::net::SocketAddr> = vec![node.data_plane()];
    for a in info["listen_addrs"].as_array().unwrap() {
        // /ip4/127.0.0.1/udp/PORT/quic-v1/p2p/ID
        let parts: Vec<&str> = a.as_str().unwrap().split('/').collect();
        if let Some(i) = parts.iter().position(|p| *p == "udp")
            && parts.get(i + 2) == Some(&"quic-v1")
            && let Some(port) = parts.get(i + 1).and_then(|p| p.parse::<u16>().ok())
        {
            targets.push(([127, 0, 0, 1], port).into());
        }
    }
    assert!(targets.len() >= 2, "{info}");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        let targets = targets.clone();
        std::thread::spawn(move || {
            let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut seed = 0x9e37_79b9_7f4a_7c15u64;
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for t in &targets {
                    // Shapes QUIC parsers meet: tiny, long-header-looking, full-size.
                    for len in [1usize, 7, 64, 1200, 1500] {
                        let mut d = garbage(&mut seed, len);
                        if len >= 7 {
                            d[0] |= 0xc0; // long header, fixed bit
                            d[1..5].copy_from_slice(&1u32.to_be_bytes()); // QUIC v1
                        }
                        let _ = sock.send_to(&d, t);
                        sent += 1;
                    }
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            sent
        })
    };
    let liar = advert_liar(node.bootstrap_addr(), stop.clone());
    // Honest traffic during the flood, through the router and to the node.
    let url = router.url("/v1/chat/completions");
    for topic in ["bread", "boats", "owls", "snow", "maps"] {
        let r = http("POST", &url, Some(&chat(topic, 8)), &[]);
        assert_eq!(r.status, 200, "{}\n{}", r.body, router.log());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = flood.join().unwrap();
    assert!(sent > 1000, "the flood sent only {sent} datagrams");
    let (lies, liar_peer, victim) = liar.join().unwrap();
    assert!(lies >= 8, "the liar published only {lies} invalid adverts");
    for known in [router.providers(), node.known_providers()] {
        assert!(
            !known.contains(&liar_peer),
            "an invalid advert entered: {known:?}"
        );
        assert!(
            !known.contains(&victim),
            "a forged advert entered: {known:?}"
        );
    }
    assert_eq!(
        http("GET", &node.url("/healthz"), None, &[]).status,
        200,
        "{}",
        node.log()
    );
    assert!(router.providers().contains(&peer));
    assert!(!node.log().contains("panicked"), "{}", node.log());
    assert!(!router.log().contains("panicked"), "{}", router.log());
}

/// Runs a MinionS job streamed, and in every round, once a provider has work in flight,
/// kills it (SIGKILL) and starts a fresh provider in its place, so the network is back to
/// four for the next round. Returns the final answer and the rounds a provider died in.
fn job_killing_one_provider_per_round(
    router: &RouterServer,
    body: &Value,
    nodes: &mut Vec<NodeServer>,
) -> (Value, Vec<u64>) {
    let mut stream = body.clone();
    stream["stream"] = json!(true);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), stream.to_string()).unwrap();
    let mut curl = ChildGuard(
        std::process::Command::new("curl")
            .args(["-s", "-N", "--max-time", "1800", "-H"])
            .arg("Content-Type: application/json")
            .arg("--data-binary")
            .arg(format!("@{}", file.path().display()))
            .arg(router.url("/v1/minions"))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let out = std::io::BufReader::new(curl.0.stdout.take().unwrap());
    let mut event = String::new();
    let mut killed_in = Vec::new();
    let mut answer = Value::Null;
    for line in out.lines() {
        let line = line.unwrap();
        if line.is_empty() {
            event.clear(); // the end of an event (the last, `data: [DONE]`, has no name)
            continue;
        }
        if let Some(e) = line.strip_prefix("event: ") {
            event = e.to_string();
            continue;
        }
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        match event.as_str() {
            "jobs_placed" => {
                let round = serde_json::from_str::<Value>(data).unwrap()["round"]
                    .as_u64()
                    .unwrap();
                // Wait for a provider with this round's work on it, then kill it. The
                // router's count of attempts in flight, not the node's busy engine: that
                // may be an audit it is scoring, or a hedged copy the router cancelled,
                // and killing it then re-runs no job.
                let mut victim = None;
                assert!(
                    wait_until(Duration::from_secs(300), || {
                        victim = nodes.iter().position(|n| {
                            router.provider(&n.peer_id())["in_flight"].as_u64() > Some(0)
                        });
                        victim.is_some()
                    }),
                    "no provider took round {round}'s jobs"
                );
                let mut dead = nodes.remove(victim.unwrap());
                eprintln!("round {round}: killing provider {}", dead.peer_id());
                dead.kill();
                killed_in.push(round);
                let boot = nodes[0].bootstrap_addr();
                let fresh = NodeServer::start(&["--threads", "1", "--bootstrap", &boot]);
                nodes.push(fresh);
            }
            "answer" => answer = serde_json::from_str(data).unwrap(),
            "error" => panic!("the job failed: {data}\n{}", router.log()),
            _ => {}
        }
    }
    (answer, killed_in)
}

/// One of four providers is killed (SIGKILL) in every round of a MinionS job while that
/// round's jobs run on it. Every job completes, every local job is verified, the killed
/// provider's jobs ran again elsewhere, and the evidence the supervisor is shown is the
/// evidence the same job gathers when nothing fails: the same quotes (temperature 0
/// throughout; a worker's short answer beside a quote may differ by a near-tie broken the
/// other way by another batch shape). The supervisor is scripted (two rounds of fixed plans), so
/// that the rounds and the jobs are the same in both runs; the real supervisor's part is
/// `minions.rs`'.
#[test]
fn a_provider_killed_in_every_minions_round_leaves_the_evidence_unchanged() {
    let plan = |instruction: &str| {
        format!(
            r#"{{"chunking":{{"strategy":"paragraphs","size":1,"overlap":0}},"tasks":[{{"id":"t","instruction":"{instruction}","advice":""}}],"samples_per_task":1,"top_k":4}}"#
        )
    };
    // Per job: plan, aggregation (more), plan, the final answer.
    let sup = beacon_harness::ScriptedRemote::start(vec![
        plan("Find the figure asked for."),
        r#"{"decision":"more","answer":"","explanation":"","scratchpad":"look again"}"#.into(),
        plan("Find the sentence that states it."),
        "From the evidence.".into(),
    ]);
    let first = NodeServer::start(&["--threads", "1"]);
    let boot = first.bootstrap_addr();
    let mut nodes = vec![first];
    for _ in 0..3 {
        nodes.push(NodeServer::start(&["--threads", "1", "--bootstrap", &boot]));
    }
    let remote = sup.base_url();
    let router = RouterServer::with_remote(
        Some(&boot),
        &remote,
        "scripted",
        // The default audit rate: MinionS jobs are audited like chat, killed auditors too.
        &["--attempt-timeout", "600"],
    );
    let all_known = |router: &RouterServer, nodes: &[NodeServer]| {
        let ids: Vec<String> = nodes.iter().map(NodeServer::peer_id).collect();
        wait_until(Duration::from_secs(90), || {
            let known = router.providers();
            ids.iter().all(|p| known.contains(p))
        })
    };
    assert!(all_known(&router, &nodes), "{}", router.log());
    let doc = &beacon_harness::corpus::NORTHPORT[..4_000];
    // Two jobs, each first undisturbed (the answer to compare with), then with a provider
    // killed in each of its rounds (however many rounds the supervisor asks for).
    let mut compared = 0;
    for task in [
        "How many tonnes of cargo did the port handle in 2025?",
        "What was the tariff revenue, and what did the quay wall repairs cost?",
    ] {
        let body = json!({
            "task": task,
            "context": [doc],
            "doc_metadata": "Annual report of a harbour authority, 2025",
            "max_rounds": 2,
            "policy": {"worker_max_tokens": 48, "max_chunk_chars": 1000}
        });
        let r = http_within(
            "POST",
            &router.url("/v1/minions"),
            Some(&body.to_string()),
            &[],
            1800,
        );
        assert_eq!(r.status, 200, "{}\n{}", r.body, router.log());
        let calm = r.json();
        assert_eq!(calm["verification"]["failed_jobs"], 0, "{calm}");

        let (hit, killed_in) = job_killing_one_provider_per_round(&router, &body, &mut nodes);
        let rounds = hit["rounds"].as_u64().unwrap();
        assert_eq!(rounds, calm["rounds"].as_u64().unwrap(), "{hit}");
        assert_eq!(
            killed_in,
            (1..=rounds).collect::<Vec<_>>(),
            "a provider dies in every round"
        );
        let jobs = hit["jobs"].as_array().unwrap();
        assert_eq!(hit["verification"]["failed_jobs"], 0, "{hit}");
        assert!(jobs.iter().all(|j| j["verified"] == true), "{hit}");
        for round in 1..=rounds {
            assert!(
                jobs.iter()
                    .any(|j| j["round"] == round && j["attempts"].as_u64().unwrap() > 1),
                "round {round}: no job ran again after the kill: {}",
                serde_json::to_string_pretty(jobs).unwrap()
            );
        }
        assert_eq!(rounds, 2, "{hit}");
        // The same jobs, and the same quotes found (whoever found them). Quotes, not the
        // workers' short answers: a job placed again runs beside other sequences, and
        // llama.cpp's CPU kernels round differently for other batch shapes, which can break
        // a near-tie the other way ("14.2 million tonnes" against "14.2 million tonnes of
        // cargo", seen twice in five runs); the quote is the document's own sentence, and
        // it is what the supervisor is shown.
        let found = |v: &Value| -> std::collections::BTreeSet<(String, String)> {
            v["evidence"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    (
                        e["chunk"].as_str().unwrap().to_string(),
                        e["citation"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        };
        assert_eq!(jobs.len(), calm["jobs"].as_array().unwrap().len(), "{hit}");
        let (before, after) = (found(&calm), found(&hit));
        assert_eq!(after, before, "the evidence changed when providers died");
        compared += before.len();
        assert!(all_known(&router, &nodes), "{}", router.log());
    }
    assert!(
        compared > 0,
        "no evidence in either job: the comparison showed nothing"
    );
}
