//! Honest work under attack: each attack the other tests stage, against a provider while
//! an honest client works, with the honest throughput compared with the throughput
//! without the attack in the same run. Its own test binary: it pins this process to one
//! core and the provider to the other.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use beacon_harness::data_plane::{
    deprioritise_this_thread, joined_at, keep_alive_transport, new_client, provider_of,
    raw_connect, request, stalled_streams,
};
use beacon_harness::{
    NodeServer, RouterServer, ScriptedRemote, TEST_MODEL_REF, advert_of, http, now_ms, wait_until,
};
use beacon_net::quic::{CallError, DataClient, quinn};
use beacon_proto::{DataErrorCode, Digest, Keypair, PeerId, Signed, Wire};

/// Pins every thread of process `pid` to `cpu` (`taskset`); false when it cannot.
fn pin(pid: u32, cpu: usize) -> bool {
    std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A number for the next honest request's word: every request differs, so no round finds
/// its prompts cached by an earlier one and rounds cost the same.
fn next_word() -> usize {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Honest requests to a provider, `n` (even) of them two at a time, each retried while the
/// provider answers Busy (as a router would place it again): the time they all took.
async fn honest_round(
    client: &DataClient,
    peer: PeerId,
    addr: SocketAddr,
    digest: Digest,
    n: usize,
) -> Duration {
    let start = Instant::now();
    let one = |i: usize| async move {
        let req = request(digest, &format!("apple{i:03}"));
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            match client.infer(peer, addr, &req, |_| {}).await {
                Ok(_) => return,
                Err(CallError::Remote { error, .. })
                    if error.code == DataErrorCode::Busy && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => panic!("an honest request failed under attack: {e}"),
            }
        }
    };
    for _ in (0..n).step_by(2) {
        tokio::join!(one(next_word()), one(next_word()));
    }
    start.elapsed()
}

/// Honest chat requests through a router, `n` (even) of them two at a time: the time they
/// all took.
fn router_round(router: &RouterServer, n: usize) -> Duration {
    let start = Instant::now();
    for _ in (0..n).step_by(2) {
        let calls: Vec<_> = [next_word(), next_word()]
            .into_iter()
            .map(|j| {
                let url = router.url("/v1/chat/completions");
                let body = format!(
                    r#"{{"model":"{TEST_MODEL_REF}","temperature":0,"max_tokens":12,"messages":[{{"role":"user","content":"Say the word \"apple{j:03}\" and nothing else."}}]}}"#
                );
                std::thread::spawn(move || http("POST", &url, Some(&body), &[]))
            })
            .collect();
        for c in calls {
            let r = c.join().unwrap();
            assert_eq!(
                r.status, 200,
                "an honest request failed under attack: {r:?}"
            );
        }
    }
    start.elapsed()
}

/// The plans a persuaded supervisor answers a plan bomb with, in turn: one window per
/// character of the review's H7, and the most chunks the validator's bounds allow, by
/// characters and by tokens.
fn bomb_plans() -> Vec<String> {
    let tasks: Vec<String> = (0..beacon_proto::plan::Limits::default().max_tasks)
        .map(|i| format!(r#"{{"id":"t{i}","instruction":"Find code {i}.","advice":""}}"#))
        .collect();
    let samples = beacon_proto::plan::Limits::default().max_samples;
    let plan = |strategy: &str, size: u32, overlap: u32| {
        format!(
            r#"{{"chunking":{{"strategy":"{strategy}","size":{size},"overlap":{overlap}}},"tasks":[{}],"samples_per_task":{samples}}}"#,
            tasks.join(",")
        )
    };
    vec![
        plan("chars", 50_000, 49_999),
        plan("chars", 200, 100),
        plan("tokens", 50, 25),
    ]
}

/// Issue 19's target: under the attacks these tests stage (an advert flood from fresh
/// identities, slow-reader streams, connection exhaustion from one host), honest requests
/// keep completing. Each attack runs alone against a provider with two slots while an
/// honest client sends the same requests it sent without an attack, in the same run; the
/// ratio of the two throughputs is printed (`attack ratio`) for the table in SECURITY.md.
/// The provider runs on one core and this process (the attackers and the honest client)
/// on the other, so the attackers' own work is not counted against the provider. What is
/// asserted is that every honest request is served, under every attack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_requests_keep_completing_under_floods_slow_readers_and_connection_exhaustion() {
    const N: usize = 10;
    let node =
        tokio::task::spawn_blocking(|| NodeServer::start(&["--parallel", "2", "--threads", "1"]))
            .await
            .unwrap();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pinned = cores >= 2 && pin(node.pid(), 1) && pin(std::process::id(), 0);
    println!("attack ratio: provider and attackers on separate cores: {pinned}");
    let (peer, addr, digest) = provider_of(&node);
    let (_, honest) = new_client();
    honest_round(&honest, peer, addr, digest, 2).await; // loads the model
    let baseline = honest_round(&honest, peer, addr, digest, N).await;
    let mut ratios = Vec::new();

    // 1. An advert flood: 48 fresh identities join and each publishes a valid advert of
    // its own every 100 ms (five times the rate a source is heard at).
    // The flooders run on a runtime of their own whose thread has the least priority.
    let attackers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .on_thread_start(|| {
            deprioritise_this_thread();
        })
        .build()
        .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flooders = Vec::new();
    let boot = node.bootstrap_addr();
    for _ in 0..48 {
        let key = Keypair::generate();
        let net = attackers
            .spawn({
                let (boot, key) = (boot.clone(), key.clone());
                async move { joined_at(&boot, key).await }
            })
            .await
            .unwrap();
        let stop = stop.clone();
        flooders.push(attackers.spawn(async move {
            let mut seq = 1;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let advert = Signed::sign(&key, &advert_of(key.peer_id(), now_ms(), seq)).unwrap();
                let _ = net.publish_raw(advert.encode().unwrap()).await;
                seq += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            net.shutdown().await;
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let flooded = honest_round(&honest, peer, addr, digest, N).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for f in flooders {
        f.await.unwrap();
    }
    attackers.shutdown_background();
    ratios.push(("advert flood, 48 identities", flooded));

    // 2. Slow readers: one connection whose receive window takes 8 bytes, with four
    // requests whose answers it never reads. Measured once their generation is over: a
    // slot is held while generating, and no longer.
    let stalled = stalled_streams(peer, addr, digest, 4, 48).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let slowed = honest_round(&honest, peer, addr, digest, N).await;
    stalled.close();
    ratios.push(("slow readers, 4 streams", slowed));

    // 3. Connection exhaustion: one host opens 64 connections and holds them.
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut held = Vec::new();
    for _ in 0..64 {
        if let Ok(c) = raw_connect(
            &endpoint,
            &Keypair::generate(),
            peer,
            addr,
            keep_alive_transport(),
        )
        .await
        {
            held.push(c);
        }
    }
    let exhausted = honest_round(&honest, peer, addr, digest, N).await;
    for c in &held {
        c.close(0u32.into(), b"done");
    }
    ratios.push(("connection exhaustion, 64 from one host", exhausted));
    // The rate without attacks: the mean of a round before them and one after (which also
    // shows the provider recovered).
    let after = honest_round(&honest, peer, addr, digest, N).await;
    let baseline = (baseline + after) / 2;
    let mut ratios: Vec<_> = ratios.into_iter().map(|(a, t)| (a, t, baseline)).collect();

    // 4. A plan bomb: clients post MinionS jobs over 4 MiB of context, and the router's
    // supervisor, persuaded by them, plans the most chunks it can. The router runs on the
    // attackers' core: what the bombs cost it is what honest requests through it wait for.
    // Compared with honest requests through the same router without the bombs.
    let supervisor = ScriptedRemote::start(bomb_plans());
    let remote = supervisor.base_url();
    let router = RouterServer::start(
        Some(&node.bootstrap_addr()),
        &[
            "--remote-base-url",
            &remote,
            "--remote-model",
            "persuaded",
            "--trusted-provider",
            &node.peer_id(),
        ],
    );
    pin(router.pid(), 0);
    assert!(wait_until(Duration::from_secs(60), || !router
        .providers()
        .is_empty()));
    router_round(&router, 2); // the router measures the provider
    let router_base = router_round(&router, N);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Once its plans are refused, a job runs the router's default plan, bounded by the
    // job's budget: one local job here, so that the bombs' own work on the provider stays
    // small beside what is measured (the router's cost).
    let bomb = serde_json::json!({
        "task": "Find the launch code.",
        "context": ["x".repeat((4 << 20) - 4096)],
        "max_rounds": 1,
        "policy": {"max_jobs_per_round": 1},
    })
    .to_string();
    let bomb = Arc::new(bomb);
    let url = router.url("/v1/minions");
    let bombers: Vec<_> = (0..2)
        .map(|_| {
            let (stop, bomb, url) = (stop.clone(), bomb.clone(), url.clone());
            std::thread::spawn(move || {
                deprioritise_this_thread();
                let mut answers = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    answers.push(http("POST", &url, Some(&bomb), &[]));
                }
                answers
            })
        })
        .collect();
    while supervisor.calls.load(std::sync::atomic::Ordering::SeqCst) < 3 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bombed = router_round(&router, N);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answers: Vec<_> = bombers
        .into_iter()
        .flat_map(|b| b.join().unwrap())
        .collect();
    let router_base = (router_base + router_round(&router, N)) / 2;
    // Every bomb plan is refused: the job is turned away as over the router's limits, or
    // fails, or answers from the router's default plan (one job), never from a bomb.
    assert!(!answers.is_empty());
    for a in &answers {
        let ran_default = a.status == 200
            && a.body.contains("default plan was used")
            && a.json()["jobs"].as_array().is_some_and(|j| j.len() <= 1);
        assert!(
            a.status >= 400 || ran_default,
            "a plan bomb was accepted: {a:?}"
        );
    }
    println!(
        "plan bombs: {} jobs refused, {} supervisor calls",
        answers.len(),
        supervisor.calls.load(std::sync::atomic::Ordering::SeqCst)
    );
    ratios.push((
        "plan bomb, 4 MiB jobs from 2 clients, honest requests through the router",
        bombed,
        router_base,
    ));

    for (attack, took, base) in ratios {
        let base_rate = N as f64 / base.as_secs_f64();
        let rate = N as f64 / took.as_secs_f64();
        println!(
            "attack ratio: {attack}: {:.2} ({rate:.2} req/s under attack, {base_rate:.2} without)",
            rate / base_rate
        );
    }
    assert_eq!(http("GET", &node.url("/healthz"), None, &[]).status, 200);
}
