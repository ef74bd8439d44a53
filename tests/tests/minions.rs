//! MinionS and Minion jobs end to end: real provider nodes in two regions, a router, and a
//! supervisor that is itself a Beacon node (SmolLM2-135M-Instruct behind its OpenAI API). Checks the
//! protocol's shape, placement, verification and that every token is accounted for: the
//! remote tokens a job reports equal what the supervisor node counted, and its local tokens
//! equal what the providers' signed ledgers recorded.

use std::time::Duration;

use beacon_harness::{NodeServer, RouterServer, bin, http, http_within, wait_until};
use serde_json::{Value, json};

const MODEL: &str = "ai/smollm2:test";

/// A short report with one fact in it, in paragraphs.
fn document() -> String {
    let filler = [
        "The committee reviewed the maintenance schedule for the northern depot.",
        "Rainfall in the valley was close to the ten-year average this spring.",
        "Staff training sessions moved to the second floor conference room.",
        "The library extended its weekend opening hours during the exam period.",
    ];
    let mut paras: Vec<String> = (0..6)
        .map(|i| format!("{} {}", filler[i % 4], filler[(i + 1) % 4]))
        .collect();
    paras.insert(
        3,
        "The launch code for Project Heron is BLUE-4471, set by the chief engineer.".into(),
    );
    paras.join("\n\n")
}

fn metric(url: &str, line_prefix: &str) -> u64 {
    let body = http("GET", url, None, &[]).body;
    body.lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{line_prefix} not in {body}"))
}

fn supervisor_tokens(sup: &NodeServer) -> (u64, u64) {
    (
        metric(&sup.url("/metrics"), "beacon_tokens_total{kind=\"prompt\"}"),
        metric(
            &sup.url("/metrics"),
            "beacon_tokens_total{kind=\"completion\"}",
        ),
    )
}

fn ledger_tokens(node: &NodeServer) -> (u64, u64) {
    let v = http("GET", &node.url("/beacon/ledger?limit=1"), None, &[]).json();
    (
        v["totals"]["prompt_tokens"].as_u64().unwrap(),
        v["totals"]["completion_tokens"].as_u64().unwrap(),
    )
}

struct Net {
    a: NodeServer,
    b: NodeServer,
    sup: NodeServer,
    router: RouterServer,
}

fn network(router_flags: &[&str]) -> Net {
    let a = NodeServer::start(&["--region", "eu-west"]);
    let boot = a.bootstrap_addr();
    let b = NodeServer::start(&["--region", "us-east", "--bootstrap", &boot]);
    let sup = NodeServer::supervisor();
    let router = RouterServer::with_supervisor(Some(&boot), &sup, router_flags);
    let (pa, pb) = (a.peer_id(), b.peer_id());
    assert!(
        wait_until(Duration::from_secs(60), || {
            let p = router.providers();
            p.contains(&pa) && p.contains(&pb)
        }),
        "{}",
        router.log()
    );
    Net { a, b, sup, router }
}

fn job(router: &RouterServer, body: &Value) -> (u16, Value) {
    let r = http_within(
        "POST",
        &router.url("/v1/minions"),
        Some(&body.to_string()),
        &[],
        900,
    );
    let v = serde_json::from_str(&r.body).unwrap_or(Value::Null);
    (r.status, v)
}

fn check_accounting(answer: &Value) {
    let u = &answer["usage"];
    let calls = u["remote"]["calls"].as_array().unwrap();
    assert!(!calls.is_empty());
    let sum = |k: &str| calls.iter().map(|c| c[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(
        u["remote"]["prompt_tokens"].as_u64().unwrap(),
        sum("prompt_tokens")
    );
    assert_eq!(
        u["remote"]["completion_tokens"].as_u64().unwrap(),
        sum("completion_tokens")
    );
    assert!(calls.iter().all(|c| c["estimated"] == false), "{calls:?}");
    let jobs = answer["jobs"].as_array().unwrap();
    let jsum = |k: &str| jobs.iter().map(|j| j[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(
        u["local"]["prompt_tokens"].as_u64().unwrap(),
        jsum("prompt_tokens")
    );
    assert_eq!(
        u["local"]["completion_tokens"].as_u64().unwrap(),
        jsum("completion_tokens")
    );
    let remote = u["remote"]["total_tokens"].as_f64().unwrap();
    let only = u["remote_only"]["total_tokens"].as_f64().unwrap();
    assert!(only > 0.0);
    assert!((u["remote_ratio"].as_f64().unwrap() - remote / only).abs() < 1e-9);
}

/// Lower case, whitespace runs as one space.
fn normalised(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// The evidence an answer lists is what grounding promises: every quote is in the
/// documents (each fragment between ellipses), verified, and the counts add up.
fn check_evidence(answer: &Value, docs: &[String]) {
    let docs: Vec<String> = docs.iter().map(|d| normalised(d)).collect();
    let g = &answer["grounding"];
    let n = |k: &str| {
        g[k].as_u64()
            .unwrap_or_else(|| panic!("grounding.{k}: {answer}"))
    };
    assert_eq!(n("findings"), n("grounded") + n("ungrounded"), "{g}");
    let evidence = answer["evidence"].as_array().unwrap();
    assert_eq!(
        evidence.len() as u64,
        n("grounded") - n("duplicates"),
        "{answer}"
    );
    for e in evidence {
        assert_eq!(e["verified"], true, "{e}");
        assert!(e["provider"].is_string(), "{e}");
        let quote = normalised(e["citation"].as_str().unwrap()).replace('\u{2026}', "...");
        for fragment in quote.split("...") {
            let f =
                fragment.trim_matches(|c: char| c.is_whitespace() || "\"'.,;:!?()[]".contains(c));
            assert!(
                docs.iter().any(|d| d.contains(f)),
                "evidence not in the documents: {f:?} ({e})"
            );
        }
    }
}

/// A MinionS job over two providers in two regions: a validated plan, jobs placed on both
/// regions and verified, and token accounting that matches the supervisor's own counters
/// and the providers' signed ledgers exactly. Then the Minion protocol, the CLI, and bad
/// requests.
#[test]
fn minions_and_minion_jobs_run_on_the_network_with_exact_accounting() {
    let net = network(&[]);
    let sup_before = supervisor_tokens(&net.sup);
    let (la, lb) = (ledger_tokens(&net.a), ledger_tokens(&net.b));
    let body = json!({
        "task": "What is the launch code for Project Heron?",
        "context": [document()],
        "doc_metadata": "Meeting notes of an engineering team",
        "max_rounds": 1,
        "local_model": MODEL,
        "policy": {"worker_max_tokens": 48, "max_jobs_per_round": 64}
    });
    let (status, a) = job(&net.router, &body);
    assert_eq!(status, 200, "{a}\n{}", net.router.log());
    assert_eq!(a["protocol"], "minions");
    assert_eq!(a["rounds"], 1);
    assert!(a["answer"].is_string());
    check_accounting(&a);
    check_evidence(&a, &[document()]);
    // Every remote token is one the supervisor node counted, and no other call was made.
    let sup_after = supervisor_tokens(&net.sup);
    let u = &a["usage"];
    assert_eq!(
        sup_after.0 - sup_before.0,
        u["remote"]["prompt_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        sup_after.1 - sup_before.1,
        u["remote"]["completion_tokens"].as_u64().unwrap()
    );
    // Every local token is one a provider signed a receipt for.
    let (la2, lb2) = (ledger_tokens(&net.a), ledger_tokens(&net.b));
    assert_eq!(
        (la2.0 - la.0) + (lb2.0 - lb.0),
        u["local"]["prompt_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        (la2.1 - la.1) + (lb2.1 - lb.1),
        u["local"]["completion_tokens"].as_u64().unwrap()
    );
    // Every job ran on a provider, verified; with several jobs both regions took part.
    let jobs = a["jobs"].as_array().unwrap();
    assert!(!jobs.is_empty());
    let unverified: Vec<&Value> = jobs
        .iter()
        .filter(|j| j["verified"] != true || !j["provider"].is_string())
        .collect();
    assert!(
        unverified.is_empty(),
        "jobs not verified: {unverified:?}\n{}",
        net.router.log()
    );
    assert_eq!(a["verification"]["failed_jobs"], 0);
    // Audited at the router's default rate (new providers on probation: more often); no
    // honest output fails.
    assert_eq!(
        a["verification"]["audits_failed"], 0,
        "{}",
        a["verification"]
    );
    if jobs.len() >= 4 {
        assert_eq!(
            a["regions"].as_object().unwrap().len(),
            2,
            "{}",
            a["regions"]
        );
    }
    // The remote-only baseline reads the whole document; this job sent the supervisor
    // only metadata and findings.
    assert!(
        u["remote_only"]["prompt_tokens"].as_u64().unwrap()
            > u["remote"]["calls"][0]["prompt_tokens"].as_u64().unwrap() / 4
    );

    // Minion: the supervisor talks to one worker that sees the whole context.
    let (status, m) = job(
        &net.router,
        &json!({
            "task": "What is the launch code for Project Heron?",
            "context": [document()],
            "protocol": "minion",
            "max_rounds": 2,
            "policy": {"worker_max_tokens": 48}
        }),
    );
    assert_eq!(status, 200, "{m}\n{}", net.router.log());
    assert_eq!(m["protocol"], "minion");
    assert!(m["answer"].is_string());
    check_accounting(&m);

    // The command-line client, which asks for SSE progress and shows it on stderr.
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("notes.txt");
    std::fs::write(&doc, document()).unwrap();
    let out = std::process::Command::new(bin("beacon-router"))
        .args([
            "minions",
            "--router",
            &net.router.url(""),
            "--task",
            "What is the launch code for Project Heron?",
            "--context",
            doc.to_str().unwrap(),
            "--max-rounds",
            "1",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Remote tokens saved"), "{stdout}");
    let progress = String::from_utf8_lossy(&out.stderr);
    for line in [
        "round 1: plan with",
        "placed on the network",
        " done on ",
        "supervisor decided final",
    ] {
        assert!(progress.contains(line), "{line:?} missing in {progress}");
    }

    // Bad requests: 400 naming the field.
    let bad = |body: Value, param: &str| {
        let (status, v) = job(&net.router, &body);
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    };
    bad(json!({"task": " ", "context": ["x"]}), "task");
    bad(json!({"task": "q", "context": []}), "context");
    bad(json!({"task": "q", "context": vec!["x"; 65]}), "context");
    bad(
        json!({"task": "q", "context": ["x".repeat(5 << 20)]}),
        "context",
    );
    bad(
        json!({"task": "q", "context": ["x"], "max_rounds": 99}),
        "max_rounds",
    );
    let (status, v) = job(
        &net.router,
        &json!({"task": "q", "context": ["x"], "exec": "rm -rf /"}),
    );
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("exec"),
        "{v}"
    );
    bad(
        json!({"task": "q", "context": ["x"], "remote": {"base_url": "http://127.0.0.1:1/v1"}}),
        "remote",
    );
    // Review H8: nor may a client pick the supervisor model the operator pays for.
    bad(
        json!({"task": "q", "context": ["x"], "remote": {"model": "o1-pro"}}),
        "remote",
    );
    let r = http("POST", &net.router.url("/v1/minions"), Some("{oops"), &[]);
    assert_eq!(r.status, 400);
}

/// A supervisor that cannot plan (the review's "no JSON object" failure, a plan out of
/// bounds, a plan over the job budget): each invalid plan goes back with the reason, a
/// bounded number of times, and then the round runs the router's default plan (the task as
/// the one instruction, on the chunk that matches it best) instead of failing; the answer
/// says so. The supervisor here is scripted, as a weak remote model would answer; the rest
/// is real (providers, router, worker model). Also: one job at a time (admission), and
/// each client's supervisor tokens budgeted.
#[test]
fn invalid_plans_are_sent_back_a_bounded_number_of_times_then_the_default_plan_runs() {
    let invalid = [
        "I would cut the report into paragraphs and look for the code.".to_string(),
        r#"{"chunking":{"strategy":"paragraphs","size":0,"overlap":0},"tasks":[{"id":"t","instruction":"Find the code.","advice":""}],"samples_per_task":1,"top_k":0}"#.to_string(),
        r#"{"chunking":{"strategy":"paragraphs","size":1,"overlap":0},"tasks":[{"id":"t","instruction":"Find the code.","advice":""}],"samples_per_task":1,"top_k":0}"#.to_string(),
        // The last round's answer is plain text.
        "The launch code for Project Heron is BLUE-4471.".to_string(),
    ];
    // Each reply takes a second, as a model's would: the job is still running when the
    // second one is posted.
    let sup = beacon_harness::ScriptedRemote::start_slow(invalid.to_vec(), Duration::from_secs(1));
    let a = NodeServer::start(&[]);
    let boot = a.bootstrap_addr();
    let remote = sup.base_url();
    // One MinionS job at a time on this router (review H8: jobs skipped admission).
    let router =
        RouterServer::with_remote(Some(&boot), &remote, "weak", &["--max-minions-jobs", "1"]);
    assert!(wait_until(Duration::from_secs(60), || !router
        .providers()
        .is_empty()));
    let body = json!({
        "task": "What is the launch code for Project Heron?",
        "context": [document(), document()],
        "max_rounds": 1,
        "stream": true,
        "policy": {"max_jobs_per_round": 1, "plan_retries": 2}
    });
    let url = router.url("/v1/minions");
    let first = {
        let (url, body) = (url.clone(), body.to_string());
        std::thread::spawn(move || http_within("POST", &url, Some(&body), &[], 900))
    };
    let running = wait_until(Duration::from_secs(60), || {
        metric(&router.url("/metrics"), "beacon_router_minions_jobs ") == 1
    });
    assert!(running, "the first job never showed as running");
    let second = http("POST", &url, Some(&body.to_string()), &[]);
    assert_eq!(second.status, 503, "{second:?}");
    assert_eq!(second.json()["error"]["type"], "overloaded");
    assert!(second.header("retry-after").is_some(), "{second:?}");
    let r = first.join().unwrap();
    assert_eq!(r.status, 200);
    let events: Vec<(&str, Value)> = r
        .body
        .split("\n\n")
        .filter_map(|b| {
            let (event, data) = b.split_once('\n')?;
            let data = serde_json::from_str(data.strip_prefix("data: ")?).ok()?;
            Some((event.strip_prefix("event: ")?, data))
        })
        .collect();
    // Each rejection carries the reason sent back to the supervisor.
    let reasons: Vec<&str> = events
        .iter()
        .filter(|(e, _)| *e == "plan_rejected")
        .map(|(_, d)| d["error"].as_str().unwrap())
        .collect();
    assert_eq!(reasons.len(), 3, "{}", r.body);
    assert!(reasons[0].contains("no JSON object"), "{reasons:?}");
    assert!(reasons[1].contains("chunking.size"), "{reasons:?}");
    assert!(reasons[2].contains("at most 1 are allowed"), "{reasons:?}");
    // Then the default plan: one task, one paragraph per chunk, the job budget's one chunk,
    // the best match (the documents are the same: the first's fourth paragraph, which holds
    // the code).
    let plan = &events.iter().find(|(e, _)| *e == "plan").expect("a plan").1;
    assert_eq!(plan["default"], true, "{plan}");
    assert_eq!(plan["plan"]["top_k"], 1, "{plan}");
    let (_, answer) = events
        .iter()
        .find(|(e, _)| *e == "answer")
        .unwrap_or_else(|| panic!("no answer: {}", r.body));
    let jobs = answer["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 1, "{answer}");
    assert_eq!(jobs[0]["chunk"], "0#3", "{answer}");
    assert_eq!(jobs[0]["verified"], true, "{answer}");
    assert!(
        answer["notes"][0]
            .as_str()
            .unwrap()
            .contains("no valid plan after 3 attempts"),
        "{answer}"
    );
    assert_eq!(
        answer["answer"],
        "The launch code for Project Heron is BLUE-4471."
    );
    // Three plan calls and one aggregation: nothing else reached the supervisor.
    let purposes: Vec<&str> = answer["usage"]["remote"]["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["purpose"].as_str().unwrap())
        .collect();
    assert_eq!(
        purposes,
        ["decompose", "decompose", "decompose", "aggregate"]
    );
    assert_eq!(sup.calls.load(std::sync::atomic::Ordering::SeqCst), 4);

    // Review H8: each client's supervisor tokens are budgeted. On a router whose budget is
    // one token an hour, the first plan call spends it, the retry is refused and so is the
    // next job, before any call: the supervisor sees exactly one request.
    let budgeted = RouterServer::with_remote(
        Some(&boot),
        &remote,
        "weak",
        &["--minions-token-budget", "1"],
    );
    assert!(wait_until(Duration::from_secs(60), || !budgeted
        .providers()
        .is_empty()));
    let mut plain = body.clone();
    plain["stream"] = json!(false);
    let before = sup.calls.load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..2 {
        let r = http_within(
            "POST",
            &budgeted.url("/v1/minions"),
            Some(&plain.to_string()),
            &[],
            900,
        );
        assert_eq!(r.status, 429, "{}", r.body);
        assert_eq!(r.json()["error"]["type"], "rate_limit_error");
        assert!(r.body.contains("budget"), "{}", r.body);
        assert!(r.header("retry-after").is_some(), "{r:?}");
    }
    let after = sup.calls.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(after - before, 1, "one supervisor call, then none");
}

/// A provider killed while a round's jobs run on it: its jobs are placed again on the other
/// provider and the job completes with every local job verified.
#[test]
fn a_job_whose_provider_dies_is_placed_again() {
    // The plan is fixed (a scripted supervisor): one paragraph per chunk, every chunk, which
    // the router grows to two paragraphs to fit 16 jobs: 11 jobs, more than the providers'
    // eight slots, so some are in flight on A when it dies. This test is about re-placement
    // after a death; the real supervisor's plans are the other tests'.
    let plan = r#"{"chunking":{"strategy":"paragraphs","size":1,"overlap":0},"tasks":[{"id":"code","instruction":"What is the launch code for Project Heron?","advice":""}],"samples_per_task":1,"top_k":0}"#;
    let sup = beacon_harness::ScriptedRemote::start(vec![
        plan.to_string(),
        "The launch code is BLUE-4471.".to_string(),
    ]);
    let mut a = NodeServer::start(&["--region", "eu-west"]);
    let boot = a.bootstrap_addr();
    let b = NodeServer::start(&["--region", "us-east", "--bootstrap", &boot]);
    let remote = sup.base_url();
    // A generous attempt timeout: debug builds on two cores are slow, and this test is
    // about re-placement after a death, not about timeouts.
    let router = RouterServer::with_remote(
        Some(&boot),
        &remote,
        "scripted",
        &["--attempt-timeout", "600"],
    );
    let (pa, pb) = (a.peer_id(), b.peer_id());
    assert!(wait_until(Duration::from_secs(60), || {
        let p = router.providers();
        p.contains(&pa) && p.contains(&pb)
    }));
    let doc = (0..3).map(|_| document()).collect::<Vec<_>>().join("\n\n");
    let body = json!({
        "task": "What is the launch code for Project Heron?",
        "context": [doc],
        "max_rounds": 1,
        // At most 16 jobs (chunks grow until they fit): more than the providers' eight
        // slots, so the rest finish on B alone in minutes. (With 64, B alone took over 12
        // minutes on a loaded CI machine.)
        "policy": {"worker_max_tokens": 24, "max_jobs_per_round": 16}
    });
    let url = router.url("/v1/minions");
    let handle =
        std::thread::spawn(move || http_within("POST", &url, Some(&body.to_string()), &[], 900));
    // Kill A while it has this job's subtasks in flight.
    let served = wait_until(Duration::from_secs(600), || {
        a.in_flight() > 0.0 || handle.is_finished()
    });
    assert!(served);
    a.kill();
    let r = handle.join().unwrap();
    assert_eq!(r.status, 200, "{}\n{}", r.body, router.log());
    let v = r.json();
    let jobs = v["jobs"].as_array().unwrap();
    assert_eq!(v["verification"]["failed_jobs"], 0, "{v}");
    assert!(jobs.iter().all(|j| j["verified"] == true));
    let retried = jobs
        .iter()
        .filter(|j| j["attempts"].as_u64().unwrap() > 1)
        .count();
    let after_kill_on_b = jobs.iter().any(|j| j["provider"] != pa.as_str());
    assert!(after_kill_on_b);
    assert!(
        retried > 0,
        "no job was running on the killed provider: {}",
        serde_json::to_string_pretty(jobs).unwrap()
    );
}
