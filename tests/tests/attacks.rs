//! The attack suite: one dishonest `beacon-node` per attack, each started with a hidden
//! `--fault` mode, next to honest providers, behind a router with the default audit rate
//! and its model name pinned. Chat traffic runs at the router's default temperature (1.0,
//! sampled) and greedy, streamed and not. Each attack must be caught (quarantined, refused
//! or ignored) and no honest provider may be quarantined; what each cost before it was
//! caught is printed.
//!
//! (a) honest tokens, other text; (b) text with no tokens; (c) a cheater that is honest
//! exactly when the old, predictable audit draw said "audit"; (i) a stream that differs from
//! the signed output; (d) sampling with another seed and temperature; (g) an auditor that
//! fails everything it audits; (h) a provider that advertises 4096 slots and a million
//! tokens/s; (f) a provider that
//! advertises the pinned name with another model's digest. A model file swapped on disk
//! after the pull is the last test (load-time integrity).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use beacon_harness::{
    NodeCli, NodeServer, RouterServer, TEST_MODEL_REF, http, test_model, wait_until,
};
use beacon_net::quic::DataClient;
use beacon_proto::{
    AuditRequest, ChatMessage, Digest, Id, InferRequest, Keypair, PeerId, Role, Sampling,
};
use serde_json::Value;

const INJECTED: &str = "evil.example";

fn body(i: usize, stream: bool) -> String {
    let topics = [
        "rivers", "bread", "owls", "winter", "copper", "tea", "maps", "bees",
    ];
    // Every other request is greedy; the rest use the router's default temperature.
    let temperature = if i.is_multiple_of(2) {
        r#""temperature":0,"#
    } else {
        ""
    };
    format!(
        r#"{{"model":"{TEST_MODEL_REF}",{temperature}"max_tokens":12,"stream":{stream},"messages":[{{"role":"user","content":"Write one sentence about {}."}}]}}"#,
        topics[i % topics.len()]
    )
}

/// What one routed request delivered.
struct Delivered {
    provider: String,
    text: String,
    verified: bool,
    /// A streamed answer that ended in an error event.
    stream_error: bool,
}

fn send(url: &str, i: usize, stream: bool) -> Delivered {
    let r = http("POST", url, Some(&body(i, stream)), &[]);
    assert_eq!(r.status, 200, "{r:?}");
    if !stream {
        let v = r.json();
        assert!(v["beacon"]["audited"].is_boolean(), "{v}");
        return Delivered {
            provider: v["beacon"]["provider"].as_str().unwrap().to_string(),
            text: v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string(),
            verified: v["beacon"]["verified"] == true,
            stream_error: false,
        };
    }
    let mut d = Delivered {
        provider: String::new(),
        text: String::new(),
        verified: false,
        stream_error: false,
    };
    for line in r.body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(line).unwrap();
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            d.text.push_str(t);
        }
        if v.get("error").is_some() {
            assert_eq!(v["beacon"]["verified"], false, "{v}");
            d.stream_error = true;
        }
        if let Some(p) = v["beacon"]["provider"].as_str() {
            assert!(v["beacon"]["audited"].is_boolean(), "{v}");
            d.provider = p.to_string();
            d.verified = v["beacon"]["verified"] == true;
        }
    }
    assert!(
        d.stream_error || !d.provider.is_empty(),
        "a stream that ended neither verified nor in an error: {}",
        r.body
    );
    d
}

/// Round `round` of the attack traffic: six requests at once, every third streamed.
fn six(router: &RouterServer, round: usize) -> Vec<Delivered> {
    let handles: Vec<_> = (0..6)
        .map(|k| {
            let (i, url) = (round * 6 + k, router.url("/v1/chat/completions"));
            std::thread::spawn(move || send(&url, i, k % 3 == 2))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// A node with one thread and two sequences: a dozen of them share two cores.
fn node(extra: &[&str]) -> NodeServer {
    let mut args = vec!["--parallel", "2", "--threads", "1"];
    args.extend_from_slice(extra);
    NodeServer::start(&args)
}

fn status(router: &RouterServer, peer: &str) -> Value {
    router.provider(peer)
}

#[test]
fn every_attack_on_results_is_caught_and_no_honest_provider_is_quarantined() {
    let first = node(&["--region", "eu-west"]);
    let boot = first.bootstrap_addr();
    let joined = |extra: &[&str]| {
        let mut args = vec!["--bootstrap", boot.as_str()];
        args.extend_from_slice(extra);
        node(&args)
    };
    let honest = [first, joined(&[]), joined(&[])];
    let attackers: Vec<(&str, NodeServer)> =
        ["text", "empty", "guess-audits", "stream", "resample"]
            .into_iter()
            .map(|f| (f, joined(&["--fault", f])))
            .collect();
    let liar = joined(&["--fault", "lying-auditor"]);
    // (h): honest answers, but 4096 slots and a million tokens/s advertised.
    let boaster = joined(&["--fault", "capacity"]);
    // (f): the same weights packaged with another context size (another digest) under the
    // pinned name.
    let hijack_store = NodeCli::new();
    hijack_store.ok(&[
        "model",
        "package",
        "--gguf",
        test_model().to_str().unwrap(),
        "--context-size",
        "1024",
        TEST_MODEL_REF,
    ]);
    let hijacker = NodeServer::start_with_store(
        hijack_store,
        &["--bootstrap", &boot, "--parallel", "1", "--threads", "1"],
    );
    let router = RouterServer::start(Some(&boot), &[]);

    let honest_ids: Vec<String> = honest.iter().map(NodeServer::peer_id).collect();
    let attacker_ids: HashMap<String, &str> =
        attackers.iter().map(|(f, n)| (n.peer_id(), *f)).collect();
    let liar_id = liar.peer_id();
    let boaster_id = boaster.peer_id();
    let hijacker_id = hijacker.peer_id();
    assert_ne!(hijacker.model_digest(), honest[0].model_digest());
    let everyone: Vec<String> = honest_ids
        .iter()
        .chain(attacker_ids.keys())
        .chain([&liar_id, &hijacker_id, &boaster_id])
        .cloned()
        .collect();
    assert!(
        wait_until(Duration::from_secs(90), || {
            let p = router.providers();
            everyone.iter().all(|e| p.contains(e))
        }),
        "the router sees {:?} of {everyone:?}",
        router.providers()
    );

    let caught = |peer: &str| status(&router, peer)["quarantined"] == true;
    let mut served: HashMap<String, usize> = HashMap::new();
    let mut wrong: HashMap<String, usize> = HashMap::new();
    let mut stream_errors = 0;
    let mut requests = 0;
    for round in 0..40 {
        let all_caught = attacker_ids.keys().all(|p| caught(p)) && caught(&liar_id);
        if all_caught {
            break;
        }
        for d in six(&router, round) {
            requests += 1;
            if d.stream_error {
                stream_errors += 1;
                continue;
            }
            assert!(d.verified);
            assert_ne!(d.provider, hijacker_id, "the hijacker was given work");
            *served.entry(d.provider.clone()).or_default() += 1;
            if d.text.contains(INJECTED) {
                *wrong.entry(d.provider.clone()).or_default() += 1;
            }
            if d.text.chars().any(char::is_lowercase) {
                // Streams from the stream attacker are upper case: never delivered as
                // verified.
                assert_ne!(attacker_ids.get(&d.provider), Some(&"stream"));
            }
        }
    }
    eprintln!("{requests} requests, {stream_errors} streams ended in an error event");
    for (peer, fault) in &attacker_ids {
        let s = status(&router, peer);
        eprintln!(
            "attack {fault}: served {} verified answers, {} wrong ones delivered; stats {}",
            served.get(peer).unwrap_or(&0),
            wrong.get(peer).unwrap_or(&0),
            s["stats"]
        );
        assert_eq!(s["quarantined"], true, "attack {fault} not caught: {s}");
    }
    // (a) and (c) are caught by audits, (b) and (i) refused on arrival.
    for (peer, fault) in &attacker_ids {
        let s = &status(&router, peer)["stats"];
        match *fault {
            "text" | "guess-audits" | "resample" => {
                assert!(s["audits_failed"].as_u64().unwrap() >= 1, "{fault}: {s}")
            }
            _ => {
                // Refused on arrival; on probation the first refusal quarantines.
                assert!(s["invalid"].as_u64().unwrap() >= 1, "{fault}: {s}");
                assert_eq!(served.get(peer), None, "{fault} delivered an answer");
            }
        }
    }
    // Nobody but (a) and (c) delivered injected text.
    for peer in wrong.keys() {
        assert!(
            matches!(attacker_ids.get(peer), Some(&"text" | &"guess-audits")),
            "{peer} delivered injected text"
        );
    }
    // (g): outvoted by honest auditors until quarantined.
    let l = status(&router, &liar_id);
    eprintln!("attack lying-auditor: stats {}", l["stats"]);
    assert_eq!(l["quarantined"], true, "the lying auditor: {l}");
    assert!(l["stats"]["outvoted"].as_u64().unwrap() >= 2, "{l}");
    // (h): its claims bought it no majority of the work (believed, they would draw nearly
    // all of it), and placement and admission count the slots measured, not the 4096
    // advertised.
    // Measured once the other attackers are out: 36 requests, 6 at a time, over the three
    // honest providers and the boaster.
    let mut boasted = 0;
    for round in 0..6 {
        let handles: Vec<_> = (0..6)
            .map(|k| {
                let (i, url) = (1000 + round * 6 + k, router.url("/v1/chat/completions"));
                std::thread::spawn(move || send(&url, i, false))
            })
            .collect();
        for h in handles {
            boasted += usize::from(h.join().unwrap().provider == boaster_id);
        }
    }
    let b = status(&router, &boaster_id);
    eprintln!(
        "attack capacity: served {boasted} of 36 with 3 honest providers beside it; {} slots counted of {}",
        b["slots_counted"], b["slots"]
    );
    assert_eq!(b["slots"], 4096, "{b}");
    assert!(b["slots_counted"].as_u64().unwrap() <= 8, "{b}");
    assert!(boasted <= 18, "the capacity liar served {boasted} of 36");
    // (f): ignored, and it lost reputation.
    let h = status(&router, &hijacker_id);
    eprintln!("attack hijack: stats {}", h["stats"]);
    assert_eq!(h["pin_conflict"], true, "{h}");
    assert!(h["stats"]["name_conflicts"].as_u64().unwrap() >= 1, "{h}");
    assert!(h["stats"]["reputation"].as_f64().unwrap() < 0.8, "{h}");
    // The name still means the pinned digest.
    let models = http("GET", &router.url("/v1/models"), None, &[]).json();
    assert!(
        models.to_string().contains(&honest[0].model_digest()),
        "{models}"
    );
    // What the audits cost, against what was served (probation and attacks included).
    let metrics = http("GET", &router.url("/metrics"), None, &[]).body;
    let metric = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let (audit, served) = (
        metric("beacon_router_audit_tokens_total"),
        metric("beacon_router_tokens_total"),
    );
    assert!(audit > 0.0, "{metrics}");
    eprintln!(
        "audit tokens {audit}, served tokens {served}: {:.2} of served",
        audit / served.max(1.0)
    );
    // No honest provider was quarantined, or failed an audit; as auditors they were
    // checked against results whose verdict the router knew, and judged none wrongly.
    let mut reference_checks = 0;
    for peer in &honest_ids {
        let s = status(&router, peer);
        assert_eq!(s["quarantined"], false, "honest provider quarantined: {s}");
        assert_eq!(s["stats"]["audits_failed"], 0, "{s}");
        assert_eq!(s["stats"]["reference_wrong"], 0, "{s}");
        reference_checks += s["stats"]["reference_checks"].as_u64().unwrap();
    }
    eprintln!("honest auditors judged {reference_checks} reference checks, all right");
    assert!(reference_checks >= 1, "no auditor was checked");
}

/// A store whose model blob was swapped, after the pull, for the model requantised `to`
/// (`q2_k`, `q3_k_m`) by llama.cpp's quantiser: a cheaper, faster model under the
/// advertised digest.
fn swapped_store(to: &str) -> NodeCli {
    let store = NodeCli::new();
    let model = test_model();
    store.ok(&[
        "model",
        "package",
        "--gguf",
        model.to_str().unwrap(),
        TEST_MODEL_REF,
    ]);
    let blob = store
        .store()
        .join("blobs/sha256")
        .join(beacon_harness::sha256_file(&model));
    let cheap = store.store().join(format!("cheaper-{to}.gguf"));
    store.ok(&[
        "model",
        "requantize",
        "--to",
        to,
        model.to_str().unwrap(),
        cheap.to_str().unwrap(),
    ]);
    std::fs::rename(&cheap, &blob).unwrap();
    store
}

/// Attack (e): Q2_K and Q3_K_M requantisations of the Q4_1 model served under its digest by
/// nodes that skip the load-time check (`--fault unchecked`): only audits can tell, and
/// they must, on chat traffic at the router's default audit rate, half of it sampled.
#[test]
fn a_cheaper_requantisation_served_under_the_digest_is_caught_by_audits() {
    let first = node(&["--region", "eu-west"]);
    let boot = first.bootstrap_addr();
    let honest = [
        first,
        node(&["--bootstrap", &boot]),
        node(&["--bootstrap", &boot]),
    ];
    let swappers: Vec<(&str, NodeServer)> = ["q3_k_m", "q2_k"]
        .into_iter()
        .map(|to| {
            let n = NodeServer::start_with_store(
                swapped_store(to),
                &[
                    "--bootstrap",
                    &boot,
                    "--parallel",
                    "2",
                    "--threads",
                    "1",
                    "--fault",
                    "unchecked",
                ],
            );
            (to, n)
        })
        .collect();
    // Same digest advertised: the swap is invisible to the router.
    for (_, n) in &swappers {
        assert_eq!(n.model_digest(), honest[0].model_digest());
    }
    let router = RouterServer::start(Some(&boot), &[]);
    let ids: Vec<(String, &str)> = swappers.iter().map(|(to, n)| (n.peer_id(), *to)).collect();
    let honest_ids: Vec<String> = honest.iter().map(NodeServer::peer_id).collect();
    assert!(
        wait_until(Duration::from_secs(90), || {
            let p = router.providers();
            ids.iter().all(|(e, _)| p.contains(e)) && honest_ids.iter().all(|e| p.contains(e))
        }),
        "the router sees {:?}",
        router.providers()
    );
    let caught = |peer: &str| status(&router, peer)["quarantined"] == true;
    let mut served: HashMap<String, usize> = HashMap::new();
    let mut until: HashMap<String, (usize, u64)> = HashMap::new();
    let mut requests = 0;
    // Up to 600 requests: a Q3_K_M swap is close enough to the real model to pass most
    // audits (about one in ten fails), and with the four attack tests sharing two cores it
    // was caught after 138 of 180 here once, and once not within 300; the loop ends as
    // soon as both are caught.
    for round in 0..100 {
        if ids.iter().all(|(p, _)| caught(p)) {
            break;
        }
        for d in six(&router, round) {
            requests += 1;
            assert!(d.verified);
            *served.entry(d.provider.clone()).or_default() += 1;
        }
        for (p, _) in &ids {
            if caught(p) && !until.contains_key(p) {
                let audits = status(&router, p)["stats"]["audits_passed"]
                    .as_u64()
                    .unwrap()
                    + status(&router, p)["stats"]["audits_failed"]
                        .as_u64()
                        .unwrap();
                until.insert(p.clone(), (requests, audits));
            }
        }
    }
    for (p, to) in &ids {
        let s = status(&router, p);
        eprintln!(
            "attack swap to {to}: quarantined {} after {:?} requests (its audits {:?}), {} of its answers delivered; stats {}",
            s["quarantined"],
            until.get(p).map(|u| u.0),
            until.get(p).map(|u| u.1),
            served.get(p).unwrap_or(&0),
            s["stats"]
        );
    }
    for (p, to) in &ids {
        let s = status(&router, p);
        assert_eq!(s["quarantined"], true, "swap to {to} not caught: {s}");
        // Caught by audits: of its own answers, or of others' when, auditing with the
        // cheaper model, it was outvoted by honest auditors.
        let (failed, outvoted) = (
            s["stats"]["audits_failed"].as_u64().unwrap(),
            s["stats"]["outvoted"].as_u64().unwrap(),
        );
        assert!(failed + outvoted >= 1, "{to}: {s}");
    }
    for peer in &honest_ids {
        let s = status(&router, peer);
        assert_eq!(s["quarantined"], false, "honest provider quarantined: {s}");
        assert_eq!(s["stats"]["audits_failed"], 0, "{s}");
    }
}

/// Load-time integrity: a model file changed on disk after the pull (here one byte, as a
/// cheaper requantisation would be) is refused with a clear error, never served, and
/// served again once the verified file is back.
#[test]
fn a_model_file_swapped_after_the_pull_is_never_served() {
    let node = NodeServer::start(&["--no-network"]);
    let blob = node
        .cli
        .store()
        .join("blobs/sha256")
        .join(beacon_harness::sha256_file(&test_model()));
    let original = std::fs::read(&blob).unwrap();
    let mut swapped = original.clone();
    let mid = swapped.len() / 2;
    swapped[mid] ^= 0x55;
    std::fs::write(&blob, &swapped).unwrap();
    let chat = format!(
        r#"{{"model":"{TEST_MODEL_REF}","max_tokens":4,"messages":[{{"role":"user","content":"Hi"}}]}}"#
    );
    let r = http(
        "POST",
        &node.url("/engines/v1/chat/completions"),
        Some(&chat),
        &[],
    );
    assert!(r.status >= 500, "{r:?}");
    assert!(
        r.body.contains("failed verification") && r.body.contains("changed after it was pulled"),
        "{}",
        r.body
    );
    std::fs::write(&blob, &original).unwrap();
    let r = http(
        "POST",
        &node.url("/engines/v1/chat/completions"),
        Some(&chat),
        &[],
    );
    assert_eq!(r.status, 200, "{r:?}");
}

fn sampled_request(digest: Digest, i: usize, temperature: f32) -> InferRequest {
    let topics = ["harbours", "forests", "trains", "glass", "salt", "clocks"];
    beacon_harness::infer_request(
        digest,
        vec![
            // A shared prefix: later requests reuse its KV cells.
            ChatMessage {
                role: Role::System,
                content: "You are a helpful assistant who writes short, plain sentences.".into(),
            },
            ChatMessage {
                role: Role::User,
                content: format!("Write two sentences about {}.", topics[i % topics.len()]),
            },
        ],
        Sampling {
            temperature,
            max_tokens: 24,
            seed: Some(Id::random().0 as u64),
            ..Sampling::default()
        },
    )
}

/// Sampled answers are audited by replaying their seed (attack (d) at the level of one
/// audit), calibrated on these CPUs: answers from a provider decoding up to four sequences
/// at once on two threads, with prefix-cache hits, are audited by a provider decoding one
/// sequence on one thread, at three temperatures. Every honest answer passes at the router's
/// defaults (within 0.5 logits of the replayed choice at 90 % of positions); the same tokens
/// claimed under another seed mostly fail. The figures are printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampled_answers_are_audited_by_replaying_their_seed() {
    let (batched, single) = tokio::task::spawn_blocking(|| {
        (
            NodeServer::start(&["--parallel", "4", "--threads", "2"]),
            NodeServer::start(&["--parallel", "1", "--threads", "1"]),
        )
    })
    .await
    .unwrap();
    let peer =
        |n: &NodeServer| -> (PeerId, SocketAddr) { (n.peer_id().parse().unwrap(), n.data_plane()) };
    let (pa, aa) = peer(&batched);
    let (pb, ab) = peer(&single);
    let digest: Digest = batched.model_digest().parse().unwrap();
    let client = DataClient::new(&Keypair::generate(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let dp = beacon_router::dispatch::DispatchConfig::default();
    let (tolerance, pass) = (dp.sampled_tolerance, dp.audit_pass);

    let mut honest = Vec::new();
    let mut other_seed_failed = 0;
    let mut positions = 0;
    let mut off_positions = 0;
    let mut worst_miss = 0.0f32;
    for (round, temperature) in [0.7f32, 1.0, 1.5].into_iter().enumerate() {
        // Four at once on the batched provider.
        let calls: Vec<_> = (0..4)
            .map(|k| {
                let req = sampled_request(digest, round * 4 + k, temperature);
                let c = client.clone();
                tokio::spawn(async move {
                    let r = c.infer(pa, aa, &req, |_| {}).await;
                    (req, r)
                })
            })
            .collect();
        for call in calls {
            let (req, r) = call.await.unwrap();
            let (result, _) = r.expect("honest answer");
            let tokens = result.token_ids.clone().unwrap();
            let audit = AuditRequest::of(&req, &result);
            let scored = client.audit(pb, ab, &audit).await.expect("audit runs");
            let v = scored.judge(&tokens, &result.output, Some(tolerance), pass);
            for s in scored.scores.iter().chain(scored.end.iter()) {
                positions += 1;
                if s.logprob < 0.0 {
                    off_positions += 1;
                    worst_miss = worst_miss.max(-s.logprob);
                }
            }
            honest.push((temperature, v.agreement, v.passed));
            // The same claim under another seed: a provider that ignored the seed.
            let mut forged = audit.clone();
            forged.audit_id = Id::random();
            forged.sampling.seed = Some(req.sampling.seed.unwrap() ^ 0x5eed);
            let scored = client.audit(pb, ab, &forged).await.unwrap();
            if !scored
                .judge(&tokens, &result.output, Some(tolerance), pass)
                .passed
            {
                other_seed_failed += 1;
            }
        }
    }
    let failed: Vec<_> = honest.iter().filter(|h| !h.2).collect();
    let min = honest.iter().map(|h| h.1).fold(1.0, f64::min);
    eprintln!(
        "sampled audits: {} honest answers, {} failed (false positives), lowest agreement {min:.3}; \
         {off_positions} of {positions} positions off the replayed choice (worst by {worst_miss:.4}); \
         another seed: {other_seed_failed} of {} failed",
        honest.len(),
        failed.len(),
        honest.len()
    );
    assert!(
        failed.is_empty(),
        "honest sampled answers failed: {failed:?}"
    );
    assert!(
        other_seed_failed * 2 >= honest.len(),
        "only {other_seed_failed} of {} answers under another seed failed",
        honest.len()
    );
}
