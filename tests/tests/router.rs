//! The router with real provider nodes on loopback: discovery, routed chat (plain and
//! streamed) with verified results, residency pinning, surviving a provider's death, the
//! remote fallback, API keys and rate limits, and bad input.

use std::time::Duration;

use beacon_harness::{NodeServer, RouterServer, http, wait_until};

fn chat(word: &str, extra: &str) -> String {
    format!(
        r#"{{"model":"ai/smollm2:test","temperature":0,"max_tokens":12,"messages":[{{"role":"user","content":"Say the word \"{word}\" and nothing else."}}]{extra}}}"#
    )
}

#[test]
fn routes_chat_to_providers_verifies_pins_and_survives_a_death() {
    let mut a = NodeServer::start(&["--region", "eu-west"]);
    let boot = a.bootstrap_addr();
    let mut b = NodeServer::start(&["--region", "us-east", "--bootstrap", &boot]);
    let (pa, pb) = (a.peer_id(), b.peer_id());
    let router = RouterServer::start(Some(&boot), &[]);
    // No queue beyond the slots of the providers it may use: what it admits shows them.
    let pinned = RouterServer::start(
        Some(&boot),
        &["--allowed-regions", "eu-west", "--max-queue", "0"],
    );
    let both = wait_until(Duration::from_secs(60), || {
        let (r, p) = (router.providers(), pinned.providers());
        r.contains(&pa) && r.contains(&pb) && p.contains(&pa) && p.contains(&pb)
    });
    assert!(
        both,
        "router sees {:?}\n{}",
        router.providers(),
        router.log()
    );
    // Every provider gets a measured ping RTT for placement (the router connects to the
    // providers it knows of, including B, which only ever talked to A).
    let measured = wait_until(Duration::from_secs(45), || {
        let v = http("GET", &router.url("/v1/providers"), None, &[]).json();
        v["providers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["rtt_ms"].as_f64().is_some())
    });
    assert!(
        measured,
        "{}",
        http("GET", &router.url("/v1/providers"), None, &[]).body
    );

    let models = http("GET", &router.url("/v1/models"), None, &[]).json();
    let entry = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "ai/smollm2:test")
        .unwrap_or_else(|| panic!("{models}"));
    assert_eq!(entry["providers"], 2);

    // Routed, verified answers; with several requests both providers take part.
    let mut seen = std::collections::HashSet::new();
    let handles: Vec<_> = ["apple", "river", "stone", "cloud", "tiger", "piano"]
        .into_iter()
        .map(|w| {
            let url = router.url("/v1/chat/completions");
            std::thread::spawn(move || (w, http("POST", &url, Some(&chat(w, "")), &[])))
        })
        .collect();
    for h in handles {
        let (w, r) = h.join().unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        let v = r.json();
        let text = v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_lowercase();
        assert!(text.contains(w), "{w}: {text}");
        assert_eq!(v["beacon"]["verified"], true);
        assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0);
        seen.insert(v["beacon"]["provider"].as_str().unwrap().to_string());
    }
    assert!(seen.iter().all(|p| *p == pa || *p == pb));
    assert_eq!(seen.len(), 2, "load was not spread: {seen:?}");

    // Receipts both sides hold: every receipt on each provider carries the router's
    // countersignature of the result it verified.
    for node in [&a, &b] {
        let countersigned = wait_until(Duration::from_secs(10), || {
            let l = http("GET", &node.url("/beacon/ledger"), None, &[]).json();
            let receipts = l["receipts"].as_array().unwrap().clone();
            !receipts.is_empty()
                && receipts.iter().all(|r| {
                    r["countersigned"]["by"] == r["requester"]
                        && r["countersigned"]["result_digest"] == r["result_digest"]
                })
                && l["totals"]["countersigned"] == l["totals"]["requests"]
        });
        assert!(
            countersigned,
            "{}",
            http("GET", &node.url("/beacon/ledger"), None, &[]).body
        );
    }

    // Streaming: OpenAI chunks that add up to the answer, a usage chunk, [DONE].
    let r = http(
        "POST",
        &router.url("/v1/chat/completions"),
        Some(&chat(
            "lemon",
            r#","stream":true,"stream_options":{"include_usage":true}"#,
        )),
        &[],
    );
    assert_eq!(r.status, 200);
    let mut text = String::new();
    let mut usage = false;
    for line in r.body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if let Some(d) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(d);
        }
        usage |= v["usage"]["completion_tokens"]
            .as_u64()
            .is_some_and(|n| n > 0);
    }
    assert!(text.to_lowercase().contains("lemon"), "{text}");
    assert!(usage);
    // The last chunk says the deltas were checked against the signed result.
    let last = r
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v.get("beacon").is_some())
        .expect("a chunk with the beacon fields");
    assert_eq!(last["beacon"]["verified"], true, "{last}");
    assert!(last["beacon"]["audited"].is_boolean(), "{last}");
    assert!(r.body.trim_end().ends_with("data: [DONE]"));

    // Residency: the pinned router only uses eu-west.
    for w in ["grape", "melon", "peach"] {
        let r = http(
            "POST",
            &pinned.url("/v1/chat/completions"),
            Some(&chat(w, "")),
            &[],
        );
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.json()["beacon"]["provider"], pa.as_str());
    }
    // Its capacity is the slots of eu-west's provider alone (A, two until it has shown it
    // runs more at once, at most the four it advertises), never counting B's: of eight
    // requests at once, those beyond A's slots are shed, and the refusal says how many
    // slots it counted (it once counted both regions: four or more).
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let url = pinned.url("/v1/chat/completions");
            let body = format!(
                r#"{{"model":"ai/smollm2:test","max_tokens":64,"messages":[{{"role":"user","content":"Count from {i} to 100."}}]}}"#
            );
            std::thread::spawn(move || http("POST", &url, Some(&body), &[]))
        })
        .collect();
    let mut counted = Vec::new();
    for r in handles.into_iter().map(|h| h.join().unwrap()) {
        match r.status {
            200 => assert_eq!(r.json()["beacon"]["provider"], pa.as_str()),
            503 => {
                let v = r.json();
                assert_eq!(v["error"]["type"], "overloaded");
                let m = v["error"]["message"].as_str().unwrap();
                let slots: u32 = m
                    .split(" in the router for ")
                    .nth(1)
                    .and_then(|t| t.split(' ').next()?.parse().ok())
                    .unwrap_or_else(|| panic!("{m}"));
                counted.push(slots);
            }
            _ => panic!("{r:?}"),
        }
    }
    assert!(!counted.is_empty(), "eight requests at once, none shed");
    assert!(
        counted.iter().min() < Some(&4),
        "the pinned router counted other regions' slots: {counted:?}"
    );

    // Bad input is a clear 4xx.
    let r = http(
        "POST",
        &router.url("/v1/chat/completions"),
        Some("{not json"),
        &[],
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    let r = http(
        "POST",
        &router.url("/v1/chat/completions"),
        Some(r#"{"model":"ai/smollm2:test","messages":[{"role":"robot","content":"x"}]}"#),
        &[],
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "messages[0].role");
    let r = http(
        "POST",
        &router.url("/v1/chat/completions"),
        Some(r#"{"model":"ai/none:1","messages":[{"role":"user","content":"x"}]}"#),
        &[],
    );
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["type"], "model_not_found");

    // The official `openai` Python client works against the router.
    let script = format!(
        r#"
import openai
client = openai.OpenAI(base_url="{}", api_key="unused")
r = client.chat.completions.create(model="ai/smollm2:test", messages=[{{"role": "user", "content": "Say the word \"mango\" and nothing else."}}], temperature=0, max_tokens=12)
assert "mango" in r.choices[0].message.content.lower(), r
assert r.usage.completion_tokens > 0
parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(model="ai/smollm2:test", messages=[{{"role": "user", "content": "Say hello."}}], max_tokens=8, stream=True) if c.choices]
assert "".join(parts).strip(), parts
assert "ai/smollm2:test" in [m.id for m in client.models.list()]
# Content as an array of text parts, as the node takes it.
r = client.chat.completions.create(model="ai/smollm2:test", messages=[{{"role": "user", "content": [{{"type": "text", "text": "Say the word \"kiwi\" "}}, {{"type": "text", "text": "and nothing else."}}]}}], temperature=0, max_tokens=12)
assert "kiwi" in r.choices[0].message.content.lower(), r
# What Beacon does not serve is refused by name, never silently dropped.
for extra, param in [({{"tools": [{{"type": "function", "function": {{"name": "f", "parameters": {{"type": "object"}}}}}}]}}, "tools"), ({{"n": 2}}, "n"), ({{"logprobs": True}}, "logprobs")]:
    try:
        client.chat.completions.create(model="ai/smollm2:test", messages=[{{"role": "user", "content": "x"}}], max_tokens=4, **extra)
        raise SystemExit(f"expected a 400 for {{param}}")
    except openai.BadRequestError as e:
        assert e.body["param"] == param, e.body
try:
    client.chat.completions.create(model="ai/absent", messages=[{{"role": "user", "content": "x"}}])
    raise SystemExit("expected NotFoundError")
except openai.NotFoundError:
    pass
# Raw-prompt completions, plain and streamed, routed and verified like chat.
r = client.completions.create(model="ai/smollm2:test", prompt="One, two, three,", temperature=0, max_tokens=8)
assert r.object == "text_completion" and r.choices[0].text.strip(), r
assert r.usage.completion_tokens > 0, r
assert r.model_extra["beacon"]["verified"] is True, r
parts = [c.choices[0].text for c in client.completions.create(model="ai/smollm2:test", prompt="Once upon a time", max_tokens=8, stream=True) if c.choices]
assert "".join(parts).strip(), parts
for extra, param in [({{"echo": True}}, "echo"), ({{"suffix": "end"}}, "suffix"), ({{"best_of": 2}}, "best_of"), ({{"n": 2}}, "n"), ({{"logprobs": 2}}, "logprobs")]:
    try:
        client.completions.create(model="ai/smollm2:test", prompt="x", max_tokens=4, **extra)
        raise SystemExit(f"expected a 400 for {{param}}")
    except openai.BadRequestError as e:
        assert e.body["param"] == param, e.body
try:
    client.completions.create(model="ai/smollm2:test", prompt=["a", "b"], max_tokens=4)
    raise SystemExit("expected a 400 for two prompts")
except openai.BadRequestError as e:
    assert e.body["param"] == "prompt", e.body
print("openai client ok")
"#,
        router.url("/v1")
    );
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("openai client ok"));

    // A provider dies while requests run on it: they are completed on the other one, and
    // the router drops it from its directory.
    let long = |n: usize| {
        format!(
            r#"{{"model":"ai/smollm2:test","temperature":0,"max_tokens":96,"messages":[{{"role":"user","content":"Count from {n} to 200, separated by commas."}}]}}"#
        )
    };
    let handles: Vec<_> = (1..=6)
        .map(|n| {
            let (url, body) = (router.url("/v1/chat/completions"), long(n));
            std::thread::spawn(move || http("POST", &url, Some(&body), &[]))
        })
        .collect();
    // Kill a provider while it is generating for some of them (the router's own count of
    // requests there: an engine may be busy with an audit instead). Which one gets work
    // is placement's choice (it measured their speeds); the survivor answers everything.
    let running = |p: &str| {
        provider_status(&router, p)["in_flight"]
            .as_u64()
            .is_some_and(|n| n > 0)
    };
    let start = std::time::Instant::now();
    let victim = loop {
        if let Some(p) = [&pa, &pb].into_iter().find(|p| running(p)) {
            break p.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no provider got a request\n{}",
            router.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let survivor = if victim == pa {
        a.kill();
        pb.clone()
    } else {
        b.kill();
        pa.clone()
    };
    let mut retried = 0;
    for h in handles {
        let r = h.join().unwrap();
        assert_eq!(r.status, 200, "{r:?}\n{}", router.log());
        let v = r.json();
        assert_eq!(v["beacon"]["provider"], survivor.as_str(), "{v}");
        if v["beacon"]["attempts"].as_u64().unwrap() > 1 {
            retried += 1;
        }
    }
    assert!(retried > 0, "no request was running on the killed provider");
    for w in ["ocean", "forest"] {
        let r = http(
            "POST",
            &router.url("/v1/chat/completions"),
            Some(&chat(w, "")),
            &[],
        );
        assert_eq!(r.status, 200, "{r:?}\n{}", router.log());
        let v = r.json();
        assert_eq!(v["beacon"]["provider"], survivor.as_str());
        assert!(
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_lowercase()
                .contains(w)
        );
    }
    let dropped = wait_until(Duration::from_secs(60), || {
        !router.providers().contains(&victim)
    });
    assert!(dropped, "dead provider kept");
    let metrics = http("GET", &router.url("/metrics"), None, &[]).body;
    assert!(metrics.contains("beacon_router_routed_total"), "{metrics}");
    // Latency, time to first token (the openai client's stream above), tokens per second
    // and queue wait as histograms, labelled with the model, provider and region; and
    // libp2p's own metrics from the router's swarm.
    let routed = format!(r#"{{model="ai/smollm2:test",provider="{survivor}",region=""#);
    let observed = |text: &str, name: &str, labels: &str| {
        text.lines()
            .filter_map(|l| l.strip_prefix(&format!("{name}_count{labels}")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    for name in [
        "beacon_router_request_latency_seconds",
        "beacon_router_tokens_per_second",
        "beacon_router_queue_wait_seconds",
    ] {
        assert!(observed(&metrics, name, &routed) >= 2, "{name}\n{metrics}");
    }
    assert!(
        observed(
            &metrics,
            "beacon_router_time_to_first_token_seconds",
            r#"{model="ai/smollm2:test""#
        ) >= 1,
        "{metrics}"
    );
    assert!(metrics.contains("libp2p_swarm_"), "{metrics}");
    // The survivor counts what it served over the data plane, per model, and its swarm's
    // metrics too.
    let node = if victim == pa { &b } else { &a };
    let served = http("GET", &node.url("/metrics"), None, &[]).body;
    assert!(
        observed(
            &served,
            "beacon_request_latency_seconds",
            r#"{model="ai/smollm2:test"}"#
        ) >= 2,
        "{served}"
    );
    assert!(served.contains("libp2p_swarm_"), "{served}");
}

#[test]
fn falls_back_to_the_remote_api_with_keys_and_rate_limits() {
    // Review H8: beyond loopback without keys the router would spend its remote key for
    // anyone; it refuses to start unless told --open.
    let data = tempfile::tempdir().unwrap();
    let refused = std::process::Command::new(beacon_harness::bin("beacon-router"))
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(data.path())
        .args(["--p2p-listen", "/ip4/127.0.0.1/tcp/0"])
        .env_remove("BEACON_ROUTER_API_KEYS")
        .env_remove("BEACON_ROUTER_OPEN")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("--open"), "{err}");
    // The "remote" is a Beacon node serving the same OpenAI API; the router has no
    // providers at all, so everything goes there.
    let remote = NodeServer::start(&["--no-network"]);
    let remote_url = remote.url("/v1");
    let remote_calls = || {
        let m = http("GET", &remote.url("/metrics"), None, &[]).body;
        m.lines()
            .find_map(|l| l.strip_prefix("beacon_requests_total{endpoint=\"chat\"} "))
            .map_or(0, |n| n.trim().parse::<u64>().unwrap())
    };

    // Review H8 and M2, on open routers (no keys needed to attack them):
    // a model the operator did not offer is not forwarded on its key;
    let open = RouterServer::start(
        None,
        &["--remote-base-url", &remote_url, "--rate-limit", "1"],
    );
    let open_url = open.url("/v1/chat/completions");
    let r = http("POST", &open_url, Some(&chat("apple", "")), &[]);
    assert_eq!(r.status, 404, "{r:?}");
    assert!(r.body.contains("--fallback-models"), "{}", r.body);
    assert_eq!(remote_calls(), 0, "the remote was called");
    // an open router limits each client address (it had no limit without keys);
    let r = http("POST", &open_url, Some(&chat("apple", "")), &[]);
    assert_eq!(r.status, 429, "{r:?}");
    assert!(r.body.contains("for this address"), "{}", r.body);
    drop(open);
    // a request for a huge completion gets the operator's limit;
    let capped = RouterServer::start(
        None,
        &[
            "--remote-base-url",
            &remote_url,
            "--fallback-models",
            "ai/smollm2:test",
            "--fallback-max-tokens",
            "3",
        ],
    );
    let long = r#"{"model":"ai/smollm2:test","temperature":0,"max_tokens":100000,"n":4,"messages":[{"role":"user","content":"Write a long story about a dragon."}]}"#;
    let r = http("POST", &capped.url("/v1/chat/completions"), Some(long), &[]);
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(v["usage"]["completion_tokens"], 3, "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 1, "{v}");
    // Embeddings, which the network does not serve, go to the remote as they came.
    let r = http(
        "POST",
        &capped.url("/v1/embeddings"),
        Some(r#"{"model":"ai/smollm2:test","input":["a harbour","a port"]}"#),
        &[],
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.headers.to_lowercase().contains("x-beacon-route: remote"));
    let v = r.json();
    assert_eq!(v["data"].as_array().unwrap().len(), 2, "{v}");
    assert!(
        v["data"][0]["embedding"].as_array().unwrap().len() > 8,
        "{v}"
    );
    // A model the operator does not offer is refused, saying why.
    let r = http(
        "POST",
        &capped.url("/v1/embeddings"),
        Some(r#"{"model":"ai/other:1","input":"x"}"#),
        &[],
    );
    assert_eq!(r.status, 404, "{r:?}");
    assert!(r.body.contains("does not serve embeddings"), "{}", r.body);
    assert!(r.body.contains("--fallback-models"), "{}", r.body);
    drop(capped);
    // and data kept in a region never leaves for a remote not declared in it.
    for (declared, status) in [(None, 404), (Some("us-east"), 404), (Some("eu-west"), 200)] {
        let mut args = vec![
            "--remote-base-url",
            &remote_url,
            "--fallback-models",
            "*",
            "--allowed-regions",
            "eu-west",
        ];
        if let Some(region) = declared {
            args.extend(["--remote-region", region]);
        }
        let resident = RouterServer::start(None, &args);
        let before = remote_calls();
        let r = http(
            "POST",
            &resident.url("/v1/chat/completions"),
            Some(&chat("apple", "")),
            &[],
        );
        assert_eq!(r.status, status, "remote in {declared:?}: {r:?}");
        if status == 404 {
            assert!(r.body.contains("--remote-region"), "{}", r.body);
            assert_eq!(remote_calls(), before, "the remote was called");
        }
    }

    let router = RouterServer::start(
        None,
        &[
            "--remote-base-url",
            &remote_url,
            "--fallback-models",
            "ai/smollm2:test",
            "--api-key",
            "k-one,k-two",
            "--rate-limit",
            "2",
            "--max-body-mib",
            "1",
        ],
    );
    let url = router.url("/v1/chat/completions");
    let r = http("POST", &url, Some(&chat("apple", "")), &[]);
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    assert_eq!(http("GET", &router.url("/healthz"), None, &[]).status, 200);

    // Two requests in the same minute on one key spend its budget, whatever they ask for
    // (here a model the router does not offer: answered at once, so no refill can happen
    // while a slow machine generates); the third is limited with Retry-After and never
    // reaches the remote.
    let key = ["Authorization: Bearer k-one"];
    let unoffered = r#"{"model":"ai/other:1","messages":[{"role":"user","content":"hi"}]}"#;
    for _ in 0..2 {
        let r = http("POST", &url, Some(unoffered), &key);
        assert_eq!(r.status, 404, "{r:?}");
    }
    let before = remote_calls();
    let r = http("POST", &url, Some(&chat("plum", "")), &key);
    assert_eq!(r.status, 429, "{r:?}");
    assert!(r.headers.to_lowercase().contains("retry-after:"));
    assert_eq!(
        remote_calls(),
        before,
        "a limited request reached the remote"
    );
    // Another key has its own budget and is served by the remote; an oversized body is
    // refused with 413.
    let other = ["Authorization: Bearer k-two"];
    let r = http("POST", &url, Some(&chat("apple", "")), &other);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.headers.to_lowercase().contains("x-beacon-route: remote"));
    let text = r.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_lowercase();
    assert!(text.contains("apple"), "{text}");
    let huge = format!(
        r#"{{"model":"ai/smollm2:test","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(2 << 20)
    );
    let r = http("POST", &url, Some(&huge), &other);
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
}

/// Stragglers and dead-slow providers. A provider that stalls every subtask is hedged
/// around once the router knows the usual latency (the stalled copy is cancelled), and with
/// hedging off the per-attempt timeout moves its subtasks elsewhere until its circuit
/// breaker opens and keeps it out of placement.
/// A streamed chat answer: its text and the last chunk's `beacon` fields.
fn streamed(r: &beacon_harness::HttpReply, word: &str) -> serde_json::Value {
    assert_eq!(r.status, 200, "{r:?}");
    let chunks: Vec<serde_json::Value> = r
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    let beacon = chunks
        .iter()
        .find_map(|c| c.get("beacon"))
        .unwrap_or_else(|| panic!("{}", r.body))
        .clone();
    assert_eq!(beacon["verified"], true, "{}", r.body);
    assert!(text.to_lowercase().contains(word), "{word}: {text}");
    beacon
}

#[test]
fn stragglers_are_hedged_and_timeouts_open_the_circuit_breaker() {
    let fast = NodeServer::start(&["--region", "eu-west"]);
    let boot = fast.bootstrap_addr();
    let pf = fast.peer_id();
    // The hedging router learns the latency distribution from the fast provider alone.
    let hedging = RouterServer::start(Some(&boot), &[]);
    assert!(wait_until(Duration::from_secs(60), || hedging
        .providers()
        .contains(&pf)));
    for i in 0..20 {
        let r = http(
            "POST",
            &hedging.url("/v1/chat/completions"),
            Some(&chat(&format!("w{i}"), "")),
            &[],
        );
        assert_eq!(r.status, 200, "{r:?}");
    }
    let slow = NodeServer::start(&[
        "--region",
        "eu-west",
        "--bootstrap",
        &boot,
        "--fault",
        "stall",
    ]);
    let ps = slow.peer_id();
    let timing = RouterServer::start(
        Some(&boot),
        &[
            "--hedge-quantile",
            "0",
            "--attempt-timeout",
            "60",
            "--breaker-failures",
            "2",
            "--breaker-open",
            "600",
        ],
    );
    // Streams, no hedging, breaker kept shut: a streamed request that lands on the staller.
    let streaming = RouterServer::start(
        Some(&boot),
        &[
            "--hedge-quantile",
            "0",
            "--attempt-timeout",
            "30",
            "--breaker-failures",
            "1000",
        ],
    );
    let seen = wait_until(Duration::from_secs(60), || {
        [&hedging, &timing, &streaming]
            .iter()
            .all(|r| r.providers().contains(&pf) && r.providers().contains(&ps))
    });
    assert!(seen, "{}", hedging.log());

    // Concurrent waves until one lands on the staller first and is hedged.
    let wave = |router: &RouterServer| -> Vec<serde_json::Value> {
        let handles: Vec<_> = ["red", "green", "blue", "brown"]
            .into_iter()
            .map(|w| {
                let url = router.url("/v1/chat/completions");
                std::thread::spawn(move || http("POST", &url, Some(&chat(w, "")), &[]))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                let r = h.join().unwrap();
                assert_eq!(r.status, 200, "{r:?}\n{}", router.log());
                r.json()
            })
            .collect()
    };
    let straggler = format!("first={ps}");
    let mut hedged = 0;
    for _ in 0..8 {
        for v in wave(&hedging) {
            // The staller never wins, and no request waited for it (no second attempt).
            assert_eq!(v["beacon"]["provider"], pf.as_str(), "{v}");
            assert_eq!(v["beacon"]["attempts"], 1, "{v}");
            hedged += v["beacon"]["hedged"].as_bool().unwrap() as u32;
        }
        if hedging.log().contains(&straggler) {
            break;
        }
    }
    assert!(
        hedging.log().contains(&straggler),
        "no subtask was hedged away from the staller\n{}",
        hedging.log()
    );
    assert!(hedged > 0);
    let metrics = http("GET", &hedging.url("/metrics"), None, &[]).body;
    assert!(
        !metrics.contains("beacon_router_hedged_total 0\n"),
        "{metrics}"
    );
    // Streams are hedged too: a stream whose provider has sent nothing by then gets a
    // second copy, and the first copy to send text owns the stream (here the fast one).
    let mut stream_hedged = false;
    for _ in 0..8 {
        let handles: Vec<_> = ["red", "green", "blue", "brown"]
            .into_iter()
            .map(|w| {
                let url = hedging.url("/v1/chat/completions");
                let body = chat(w, r#","stream":true"#);
                std::thread::spawn(move || (w, http("POST", &url, Some(&body), &[])))
            })
            .collect();
        for h in handles {
            let (w, r) = h.join().unwrap();
            let b = streamed(&r, w);
            assert_eq!(b["provider"], pf.as_str(), "{b}");
            assert_eq!(b["attempts"], 1, "{b}");
            stream_hedged |= b["hedged"] == true;
        }
        if stream_hedged {
            break;
        }
    }
    assert!(
        stream_hedged,
        "no stream was hedged away from the staller\n{}",
        hedging.log()
    );

    // The losing copy was cancelled on the staller, not left running.
    assert!(wait_until(Duration::from_secs(20), || slow
        .log()
        .contains("the client cancelled the subtask while it stalled")));

    // No hedging, a 60 s attempt timeout (far above a normal answer even on a loaded CI
    // machine, where 25 s once was not: a request on the fast provider timed out, was
    // retried on the staller and failed; far below the staller's ten minutes): subtasks on
    // the staller time out and are retried on the fast provider, until the breaker opens.
    let mut retried = 0;
    for _ in 0..8 {
        for v in wave(&timing) {
            assert_eq!(v["beacon"]["provider"], pf.as_str(), "{v}");
            if v["beacon"]["attempts"].as_u64().unwrap() > 1 {
                retried += 1;
            }
        }
        if provider_status(&timing, &ps)["circuit_open"] == true {
            break;
        }
    }
    let status = provider_status(&timing, &ps);
    assert_eq!(status["circuit_open"], true, "{status}");
    assert!(retried >= 2, "{retried}");
    // While it is open the staller gets no work: its failure count stays put.
    let failures = status["stats"]["failures"].clone();
    for v in wave(&timing) {
        assert_eq!(v["beacon"]["attempts"], 1, "{v}");
    }
    assert_eq!(provider_status(&timing, &ps)["stats"]["failures"], failures);
    assert_eq!(provider_status(&timing, &pf)["circuit_open"], false);

    // A streamed request whose provider fails before its first token (the staller sends
    // none until the attempt timeout) is placed again: the client gets the whole answer,
    // from the fast provider, in one stream. Requests until one lands on the staller.
    let mut restreamed = false;
    for i in 0..60 {
        let word = ["red", "green", "blue", "brown"][i % 4];
        let r = http(
            "POST",
            &streaming.url("/v1/chat/completions"),
            Some(&chat(word, r#","stream":true"#)),
            &[],
        );
        let b = streamed(&r, word);
        assert_eq!(b["provider"], pf.as_str(), "{b}");
        if b["attempts"].as_u64() > Some(1) {
            restreamed = true;
            break;
        }
    }
    assert!(
        restreamed,
        "no streamed request was placed on the staller\n{}",
        streaming.log()
    );
}

/// Dishonest providers: one whose signatures do not verify (every result rejected and
/// re-placed) and one that signs tampered token ids (only audits catch it, and a failed
/// audit counts once a second auditor agrees: two honest providers can). Both end up
/// quarantined; the honest providers do not, and every request is answered.
#[test]
fn verification_and_audits_quarantine_dishonest_providers_only() {
    let honest = NodeServer::start(&["--region", "eu-west"]);
    let boot = honest.bootstrap_addr();
    let honest2 = NodeServer::start(&["--bootstrap", &boot]);
    let badsig = NodeServer::start(&["--bootstrap", &boot, "--fault", "bad-signature"]);
    let tamper = NodeServer::start(&["--bootstrap", &boot, "--fault", "tamper"]);
    let (ph, ph2, ps, pt) = (
        honest.peer_id(),
        honest2.peer_id(),
        badsig.peer_id(),
        tamper.peer_id(),
    );
    let router = RouterServer::start(Some(&boot), &["--audit-rate", "1"]);
    assert!(wait_until(Duration::from_secs(60), || {
        let p = router.providers();
        p.contains(&ph) && p.contains(&ph2) && p.contains(&ps) && p.contains(&pt)
    }));

    let status = |peer: &str| provider_status(&router, peer);
    let words = [
        "apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "ocean",
    ];
    let mut rounds = 0;
    while rounds < 12 && !(status(&ps)["quarantined"] == true && status(&pt)["quarantined"] == true)
    {
        rounds += 1;
        let handles: Vec<_> = words
            .iter()
            .map(|w| {
                let (url, body) = (router.url("/v1/chat/completions"), chat(w, ""));
                std::thread::spawn(move || http("POST", &url, Some(&body), &[]))
            })
            .collect();
        for (h, w) in handles.into_iter().zip(words) {
            let r = h.join().unwrap();
            assert_eq!(r.status, 200, "{r:?}");
            let v = r.json();
            assert_ne!(
                v["beacon"]["provider"],
                ps.as_str(),
                "a result with a bad signature was accepted"
            );
            assert!(
                v["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_lowercase()
                    .contains(w)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let (s, t, h, h2) = (status(&ps), status(&pt), status(&ph), status(&ph2));
    assert_eq!(
        s["quarantined"], true,
        "bad signatures not quarantined: {s}"
    );
    assert!(s["stats"]["invalid"].as_u64().unwrap() >= 1);
    assert_eq!(
        t["quarantined"],
        true,
        "tampered outputs not caught by audits: {t}\n{}",
        router.log()
    );
    assert!(t["stats"]["audits_failed"].as_u64().unwrap() >= 1, "{t}");
    for h in [h, h2] {
        assert_eq!(h["quarantined"], false, "honest provider quarantined: {h}");
        assert_eq!(h["stats"]["audits_failed"], 0, "{h}");
    }

    // Quarantined providers get no more work.
    for w in ["grape", "melon"] {
        let r = http(
            "POST",
            &router.url("/v1/chat/completions"),
            Some(&chat(w, "")),
            &[],
        );
        let p = r.json()["beacon"]["provider"].clone();
        assert!(p == ph.as_str() || p == ph2.as_str(), "{p}");
    }
    let metrics = http("GET", &router.url("/metrics"), None, &[]).body;
    assert!(metrics.contains("beacon_router_quarantined 2"), "{metrics}");

    // Reputation survives a restart of the router. Restarted with the first honest node
    // vouched for by the operator, it shows that node trusted (never on probation).
    let data = router.stop();
    let router = RouterServer::start_in(
        data,
        Some(&boot),
        &["--audit-rate", "1", "--trusted-provider", &ph],
    );
    assert!(wait_until(Duration::from_secs(60), || router
        .providers()
        .len()
        == 4));
    let status = |peer: &str| provider_status(&router, peer);
    assert_eq!(status(&pt)["quarantined"], true);
    assert_eq!(status(&ps)["quarantined"], true);
    assert_eq!(status(&ph)["quarantined"], false);
    assert_eq!(status(&ph2)["quarantined"], false);
    assert_eq!(status(&ph)["trusted"], true);
    assert_eq!(status(&ph)["probation"], false);
    assert_eq!(status(&ph2)["trusted"], false);

    // A raw-prompt completion (`/v1/completions`) is verified and audited like a chat
    // answer: the auditor scores the claimed tokens after the same raw prompt, so honest
    // answers, greedy and sampled, pass their audits.
    let audits = |result: &str| {
        let m = http("GET", &router.url("/metrics"), None, &[]).body;
        m.lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "beacon_router_audits_total{{result=\"{result}\"}} "
                ))
            })
            .map_or(0, |n| n.trim().parse::<u64>().unwrap())
    };
    let (passed, failed) = (audits("pass"), audits("fail"));
    for temperature in ["0", "1"] {
        let r = http(
            "POST",
            &router.url("/v1/completions"),
            Some(&format!(
                r#"{{"model":"ai/smollm2:test","prompt":"The capital of France is","max_tokens":8,"temperature":{temperature}}}"#
            )),
            &[],
        );
        assert_eq!(r.status, 200, "{r:?}");
        let v = r.json();
        assert_eq!(v["object"], "text_completion", "{v}");
        assert!(v["choices"][0]["text"].is_string(), "{v}");
        assert_eq!(v["beacon"]["verified"], true, "{v}");
        assert_eq!(v["beacon"]["audited"], true, "{v}");
    }
    assert!(
        wait_until(Duration::from_secs(60), || audits("pass") >= passed + 2),
        "completions were not audited: {} passed before, {} now\n{}",
        passed,
        audits("pass"),
        router.log()
    );
    assert_eq!(audits("fail"), failed, "{}", router.log());
}

/// With a certificate, the API is HTTPS only.
#[test]
fn serves_https_when_given_a_certificate() {
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success());
    let port = beacon_harness::free_port();
    let child = Command::new(beacon_harness::bin("beacon-router"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--p2p-listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _guard = beacon_harness::ChildGuard(child);
    let curl = |scheme: &str| {
        Command::new("curl")
            .args(["-s", "--max-time", "5", "--cacert"])
            .arg(&cert)
            .arg(format!("{scheme}://127.0.0.1:{port}/healthz"))
            .output()
            .unwrap()
    };
    assert!(wait_until(Duration::from_secs(30), || curl("https").stdout == b"ok"));
    let plain = curl("http");
    assert_ne!(plain.stdout, b"ok", "plain HTTP must not be served");
    // A broken handshake does not stop the listener.
    assert!(curl("https").stdout == b"ok");
}

fn provider_status(router: &RouterServer, peer: &str) -> serde_json::Value {
    router.provider(peer)
}

/// Review M9: a router dialled whatever addresses adverts named, loopback and private ones
/// included, so any peer could point it into the router's own network. A router on the
/// internet (`--dial-private false`) places no work on a provider at such an address; one on
/// a private network (bootstrapped at a private address, the default there) does.
#[test]
fn a_router_on_the_internet_dials_no_private_address_from_an_advert() {
    let a = NodeServer::start(&[]);
    let boot = a.bootstrap_addr();
    let pa = a.peer_id();
    let internet = RouterServer::start(Some(&boot), &["--dial-private", "false"]);
    let private = RouterServer::start(Some(&boot), &[]);
    // Both hear the provider's advert over the bootstrap connection their operator chose.
    assert!(wait_until(Duration::from_secs(60), || {
        internet.providers().contains(&pa) && private.providers().contains(&pa)
    }));
    let ask = |router: &RouterServer| {
        let url = router.url("/v1/chat/completions");
        http("POST", &url, Some(&chat("apple", "")), &[])
    };
    let r = ask(&private);
    assert_eq!(r.status, 200, "{r:?}");
    let r = ask(&internet);
    assert_ne!(r.status, 200, "work went to a loopback address: {r:?}");
    assert_eq!(a.log().matches("subtask served").count(), 1, "{}", a.log());
}
