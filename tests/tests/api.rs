//! The node's HTTP API with the real model, spoken to by curl and the official `openai`
//! Python client: chat (JSON and SSE), JSON-schema output, concurrency, Docker Model Runner
//! endpoints, idle unload and reload, queue-full behaviour, and every kind of bad input.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use beacon_harness::*;

fn chat_body(content: &str, extra: &str) -> String {
    format!(
        r#"{{"model":"{TEST_MODEL_REF}","messages":[{{"role":"user","content":{}}}],"temperature":0{extra}}}"#,
        serde_json::to_string(content).unwrap()
    )
}

#[test]
fn chat_completions_json_and_sse() {
    let node = NodeServer::start(&[]);
    for prefix in ["/engines/llama.cpp/v1", "/engines/v1", "/v1"] {
        let r = http(
            "POST",
            &node.url(&format!("{prefix}/chat/completions")),
            Some(&chat_body(
                "What is the capital of France?",
                r#","max_tokens":16"#,
            )),
            &[],
        );
        assert_eq!(r.status, 200, "{r:?}");
        let v = r.json();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert!(
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .contains("Paris"),
            "{v}"
        );
        assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    }

    let r = http(
        "POST",
        &node.url("/v1/chat/completions"),
        Some(&chat_body(
            "Say hello.",
            r#","max_tokens":12,"stream":true,"stream_options":{"include_usage":true}"#,
        )),
        &[],
    );
    assert_eq!(r.status, 200);
    assert!(
        r.headers.to_lowercase().contains("text/event-stream"),
        "{}",
        r.headers
    );
    let events: Vec<&str> = r
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(*events.last().unwrap(), "[DONE]");
    let chunks: Vec<serde_json::Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(!text.trim().is_empty());
    let finish = chunks
        .iter()
        .find(|c| c["choices"][0]["finish_reason"].is_string())
        .expect("a finish chunk");
    assert!(["stop", "length"].contains(&finish["choices"][0]["finish_reason"].as_str().unwrap()));
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], serde_json::json!([]));
    assert!(usage["usage"]["completion_tokens"].as_u64().unwrap() > 0);

    // Embeddings endpoint.
    let r = http(
        "POST",
        &node.url("/engines/llama.cpp/v1/embeddings"),
        Some(&format!(
            r#"{{"model":"{TEST_MODEL_REF}","input":"hello"}}"#
        )),
        &[],
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json()["data"][0]["embedding"].as_array().unwrap().len(),
        576
    );
    let r = http(
        "POST",
        &node.url("/v1/embeddings"),
        Some(&format!(r#"{{"model":"{TEST_MODEL_REF}","input":[]}}"#)),
        &[],
    );
    assert_eq!(r.status, 400, "{r:?}");

    // Completions endpoint.
    let r = http(
        "POST",
        &node.url("/v1/completions"),
        Some(&format!(
            r#"{{"model":"{TEST_MODEL_REF}","prompt":"The capital of France is","max_tokens":4,"temperature":0}}"#
        )),
        &[],
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["object"], "text_completion");
}

#[test]
fn json_schema_response_format() {
    let node = NodeServer::start(&[]);
    let schema = r#"{"type":"object","properties":{"explanation":{"type":"string","maxLength":60},"citation":{"type":"string","maxLength":40},"answer":{"type":["string","null"],"maxLength":30}},"required":["explanation","citation","answer"]}"#;
    let body = chat_body(
        "Which planet is closest to the sun?",
        &format!(
            r#","max_tokens":200,"response_format":{{"type":"json_schema","json_schema":{{"name":"a","schema":{schema}}}}}"#
        ),
    );
    let r = http("POST", &node.url("/v1/chat/completions"), Some(&body), &[]);
    assert_eq!(r.status, 200, "{r:?}");
    let content = r.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let v: serde_json::Value =
        serde_json::from_str(&content).unwrap_or_else(|e| panic!("{e}: {content}"));
    for k in ["explanation", "citation"] {
        assert!(v[k].is_string(), "{v}");
    }
    assert!(v["answer"].is_string() || v["answer"].is_null(), "{v}");
}

#[test]
fn concurrent_requests_complete_with_their_own_answers() {
    let node = NodeServer::start(&["--parallel", "8"]);
    let words = [
        "apple", "river", "planet", "guitar", "window", "pencil", "castle", "rocket",
    ];
    let url = node.url("/v1/chat/completions");
    let handles: Vec<_> = words
        .iter()
        .map(|w| {
            let (url, body) = (
                url.clone(),
                chat_body(
                    &format!("Say the word \"{w}\" and nothing else."),
                    r#","max_tokens":12"#,
                ),
            );
            std::thread::spawn(move || http("POST", &url, Some(&body), &[]))
        })
        .collect();
    for (w, h) in words.iter().zip(handles) {
        let r = h.join().unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        let text = r.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_lowercase();
        assert!(text.contains(w), "{w}: {text}");
    }
}

#[test]
fn bad_inputs_get_openai_shaped_errors() {
    let node = NodeServer::start(&["--max-body-mib", "1"]);
    let url = node.url("/v1/chat/completions");
    let check = |r: HttpReply, status: u16, param: Option<&str>| {
        assert_eq!(r.status, status, "{r:?}");
        let v = r.json();
        assert!(v["error"]["message"].is_string(), "{v}");
        assert!(v["error"]["type"].is_string(), "{v}");
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p, "{v}");
        }
    };
    check(
        http("POST", &url, Some(r#"{"model": "#), &[]),
        400,
        Some("body"),
    );
    check(
        http(
            "POST",
            &url,
            Some(&chat_body("hi", r#","temperature":"hot""#).replace(r#""temperature":0,"#, "")),
            &[],
        ),
        400,
        Some("temperature"),
    );
    check(
        http(
            "POST",
            &url,
            Some(&chat_body("hi", r#","temperature":7"#).replace(r#""temperature":0,"#, "")),
            &[],
        ),
        400,
        Some("temperature"),
    );
    check(
        http(
            "POST",
            &url,
            Some(&chat_body("hi", r#","max_tokens":0"#)),
            &[],
        ),
        400,
        Some("max_tokens"),
    );
    check(
        http(
            "POST",
            &url,
            Some(&format!(r#"{{"model":"{TEST_MODEL_REF}","messages":[]}}"#)),
            &[],
        ),
        400,
        Some("messages"),
    );
    check(
        http(
            "POST",
            &url,
            Some(&format!(
                r#"{{"model":"{TEST_MODEL_REF}","messages":[{{"role":"wizard","content":"x"}}]}}"#
            )),
            &[],
        ),
        400,
        Some("messages[0].role"),
    );
    check(
        http(
            "POST",
            &url,
            Some(&format!(
                r#"{{"model":"{TEST_MODEL_REF}","messages":[{{"role":"user","content":5}}]}}"#
            )),
            &[],
        ),
        400,
        None,
    );
    check(
        http(
            "POST",
            &url,
            Some(r#"{"messages":[{"role":"user","content":"x"}]}"#),
            &[],
        ),
        400,
        Some("model"),
    );
    check(
        http(
            "POST",
            &url,
            Some(&chat_body("hi", r#","response_format":{"type":"xml"}"#)),
            &[],
        ),
        400,
        Some("response_format.type"),
    );
    check(
        http(
            "POST",
            &url,
            Some(&chat_body("hi", "").replace(TEST_MODEL_REF, "ai/absent")),
            &[],
        ),
        404,
        None,
    );
    check(
        http(
            "POST",
            &url,
            Some(&chat_body("hi", "").replace(TEST_MODEL_REF, "Bad Name")),
            &[],
        ),
        400,
        Some("model"),
    );
    let huge = chat_body(&"x".repeat(2 << 20), "");
    check(http("POST", &url, Some(&huge), &[]), 413, None);
    check(http("GET", &node.url("/v1/nope"), None, &[]), 404, None);
    // A prompt longer than the context is a 400, not a crash; the node still serves.
    check(
        http(
            "POST",
            &url,
            Some(&chat_body(&"word ".repeat(3000), "")),
            &[],
        ),
        400,
        Some("messages"),
    );
    assert_eq!(
        http(
            "POST",
            &url,
            Some(&chat_body("Say yes.", r#","max_tokens":3"#)),
            &[]
        )
        .status,
        200
    );
}

#[test]
fn bearer_token_auth() {
    let node = NodeServer::start(&["--api-token", "t0ken"]);
    let url = node.url("/v1/chat/completions");
    let body = chat_body("Say yes.", r#","max_tokens":3"#);
    let r = http("POST", &url, Some(&body), &[]);
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    assert_eq!(
        http("POST", &url, Some(&body), &["Authorization: Bearer wrong"]).status,
        401
    );
    assert_eq!(
        http("POST", &url, Some(&body), &["Authorization: Bearer t0ken"]).status,
        200
    );
    assert_eq!(http("GET", &node.url("/healthz"), None, &[]).status, 200);
}

/// Review H5: the image's API listened on every address without a token, so whoever
/// reached a provider pulled, deleted and ran models. Beyond loopback the node now refuses
/// to start without a token; a token file is made once, private, and then required.
#[test]
fn an_api_beyond_loopback_requires_a_token() {
    let cli = NodeCli::new();
    let listen = format!("0.0.0.0:{}", free_port());
    let out = cli
        .command()
        .args(["serve", "--no-network", "--listen", &listen])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("without a token"), "{err}");

    let token_file = cli.data.path().join("api-token");
    let serve = |port: u16| {
        let child = cli
            .command()
            .args(["serve", "--no-network", "--listen"])
            .arg(format!("0.0.0.0:{port}"))
            .arg("--api-token-file")
            .arg(&token_file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let guard = ChildGuard(child);
        wait_for_http(
            ([127, 0, 0, 1], port).into(),
            "/healthz",
            Duration::from_secs(30),
        );
        guard
    };
    let port = free_port();
    let node = serve(port);
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(token.len(), 64, "{token:?}");
    let bearer = format!("Authorization: Bearer {token}");
    let url = format!("http://127.0.0.1:{port}/v1/models");
    assert_eq!(http("GET", &url, None, &[]).status, 401);
    assert_eq!(http("GET", &url, None, &[&bearer]).status, 200);
    // A restart reads the same token; it is never replaced.
    drop(node);
    let port = free_port();
    let _node = serve(port);
    let url = format!("http://127.0.0.1:{port}/v1/models");
    assert_eq!(http("GET", &url, None, &[&bearer]).status, 200);
}

/// Review M8: `axum::serve` set no time limit on request headers, so a client sending them
/// a byte at a time held its connection (and with enough of them every descriptor) as long
/// as it liked. Headers must now arrive within `--http-header-timeout`.
#[test]
fn a_client_that_trickles_its_headers_is_cut_off() {
    use std::io::{Read, Write};
    let node = NodeServer::start(&["--no-network", "--http-header-timeout", "2"]);
    let mut s = std::net::TcpStream::connect(node.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        .unwrap();
    // A byte every half second, for up to 20 s: the node must close well before.
    let mut closed = false;
    for _ in 0..40 {
        if s.write_all(b"a").is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 512];
        match s.read(&mut buf) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            // End of stream, an error, or a 408 before the close.
            _ => {
                closed = true;
                break;
            }
        }
    }
    assert!(
        closed,
        "the connection was still open after 20 s of trickled headers"
    );
    assert_eq!(http("GET", &node.url("/healthz"), None, &[]).status, 200);
}

/// Review H5: a web page in the provider's browser could POST `/models/create` to the
/// loopback API (CSRF: a form or no-cors fetch needs no preflight), and by DNS rebinding
/// (its own name resolving to 127.0.0.1) read the answers. Cross-origin requests, foreign
/// Host names and non-JSON bodies are refused; the node's own clients are unaffected.
#[test]
fn browsers_cannot_reach_the_loopback_api() {
    let node = NodeServer::start(&["--no-network"]);
    let create = node.url("/models/create");
    let body = r#"{"from":"attacker.example/ai/x:y"}"#;
    let r = http(
        "POST",
        &create,
        Some(body),
        &["Origin: http://attacker.example"],
    );
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("cross-origin"), "{}", r.body);
    let r = http(
        "GET",
        &node.url("/v1/models"),
        None,
        &["Host: rebound.attacker.example:12434"],
    );
    assert_eq!(r.status, 403, "{}", r.body);
    // A text body, as a form or a no-cors fetch sends it.
    let out = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .args([
            "-H",
            "Content-Type: text/plain",
            "--data-binary",
            body,
            &create,
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "415");
    // Its own origin and loopback names pass.
    for headers in [
        &["Origin: http://localhost:12434"][..],
        &["Host: localhost"][..],
        &[][..],
    ] {
        let r = http("GET", &node.url("/v1/models"), None, headers);
        assert_eq!(r.status, 200, "{headers:?}: {}", r.body);
    }
}

#[test]
fn model_management_and_idle_unload() {
    let registry = Registry::start();
    let reference = format!("{}/ai/smollm2:remote", registry.host());
    let publisher = NodeCli::new();
    let model = test_model();
    // Same weights, another config (context size): a different model sharing a layer.
    publisher.ok(&[
        "model",
        "package",
        "--gguf",
        model.to_str().unwrap(),
        "--context-size",
        "4096",
        "--push",
        &reference,
    ]);

    let node = NodeServer::start(&["--keep-alive", "3s"]);
    // Pull through the API, with JSON-lines progress.
    let r = http(
        "POST",
        &node.url("/models/create"),
        Some(&format!(r#"{{"from":"{reference}"}}"#)),
        &[],
    );
    assert_eq!(r.status, 200, "{r:?}");
    let lines: Vec<serde_json::Value> = r
        .body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.iter().any(|l| l["type"] == "start"));
    assert_eq!(lines.last().unwrap()["type"], "success", "{lines:?}");
    let models = http("GET", &node.url("/models"), None, &[]).json();
    assert_eq!(models.as_array().unwrap().len(), 2, "{models}");
    let gguf = sha256_file(&test_model());
    assert_eq!(
        node.cli.blobs().iter().filter(|b| **b == gguf).count(),
        1,
        "same weights stored once"
    );
    let ids: Vec<String> = http("GET", &node.url("/v1/models"), None, &[]).json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert!(
        ids.contains(&TEST_MODEL_REF.to_string()) && ids.contains(&reference),
        "{ids:?}"
    );
    let r = http("GET", &node.url("/models/ai/smollm2:test"), None, &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["config"]["quantization"], "Q4_1");

    // Loaded on first use, listed by ps, unloaded after 3 s idle, reloaded on demand.
    assert_eq!(
        http(
            "POST",
            &node.url("/v1/chat/completions"),
            Some(&chat_body("Say yes.", r#","max_tokens":3"#)),
            &[]
        )
        .status,
        200
    );
    let ps = http("GET", &node.url("/engines/ps"), None, &[]).json();
    assert_eq!(ps.as_array().unwrap().len(), 1, "{ps}");
    std::thread::sleep(Duration::from_millis(5000));
    let ps = http("GET", &node.url("/engines/ps"), None, &[]).json();
    assert_eq!(
        ps.as_array().unwrap().len(),
        0,
        "idle model should be unloaded: {ps}"
    );
    assert_eq!(
        http(
            "POST",
            &node.url("/v1/chat/completions"),
            Some(&chat_body("Say yes.", r#","max_tokens":3"#)),
            &[]
        )
        .status,
        200
    );
    let r = http(
        "POST",
        &node.url("/engines/unload"),
        Some(r#"{"all":true}"#),
        &[],
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        http("GET", &node.url("/engines/ps"), None, &[])
            .json()
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let df = http("GET", &node.url("/engines/df"), None, &[]).json();
    assert!(df["models_disk_usage"].as_u64().unwrap() > 90_000_000);
    let metrics = http("GET", &node.url("/metrics"), None, &[]).body;
    assert!(
        metrics.contains("beacon_requests_total{endpoint=\"chat\"} 2"),
        "{metrics}"
    );

    // Delete through the API.
    let r = http("DELETE", &node.url("/models/ai/smollm2:test"), None, &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        http("GET", &node.url("/models/ai/smollm2:test"), None, &[]).status,
        404
    );
}

#[test]
fn full_queue_answers_503_with_retry_after() {
    let node = NodeServer::start(&["--parallel", "1", "--max-queue", "1"]);
    let url = node.url("/v1/chat/completions");
    // Load the model first so every request below meets a loaded engine.
    assert_eq!(
        http(
            "POST",
            &url,
            Some(&chat_body("Say yes.", r#","max_tokens":2"#)),
            &[]
        )
        .status,
        200
    );
    // Long enough that the queue is seen, short enough for a loaded CI machine (where
    // 150 tokens each for the running and the queued request once took over 120 s).
    let handles: Vec<_> = (0..6)
        .map(|_| {
            let (url, body) = (
                url.clone(),
                chat_body("Write a long story about a dragon.", r#","max_tokens":64"#),
            );
            std::thread::spawn(move || http_within("POST", &url, Some(&body), &[], 600))
        })
        .collect();
    // While one request runs, another waits: the queue-depth gauge shows it.
    let metrics = node.url("/metrics");
    let start = std::time::Instant::now();
    let mut saw_queue = false;
    while !saw_queue && start.elapsed() < Duration::from_secs(20) {
        saw_queue = http("GET", &metrics, None, &[])
            .body
            .lines()
            .any(|l| l == "beacon_queue_depth 1");
        std::thread::sleep(Duration::from_millis(50));
    }
    let replies: Vec<HttpReply> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(
        saw_queue,
        "beacon_queue_depth never showed the waiting request"
    );
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let busy: Vec<&HttpReply> = replies.iter().filter(|r| r.status == 503).collect();
    assert_eq!(ok + busy.len(), 6, "only 200 or 503: {replies:?}");
    assert!(
        ok >= 2,
        "one running and one queued request must be served: {ok}"
    );
    assert!(!busy.is_empty(), "a full queue must refuse");
    for r in busy {
        assert!(
            r.headers.to_lowercase().contains("retry-after:"),
            "{}",
            r.headers
        );
        assert_eq!(r.json()["error"]["type"], "overloaded");
    }
}

#[test]
fn official_openai_python_client() {
    let node = NodeServer::start(&[]);
    let script = format!(
        r#"
import json, openai
client = openai.OpenAI(base_url="http://{}/engines/v1", api_key="unused")
r = client.chat.completions.create(model="{TEST_MODEL_REF}", messages=[{{"role": "user", "content": "What is the capital of France?"}}], temperature=0, max_tokens=16)
assert "Paris" in r.choices[0].message.content, r
assert r.usage.completion_tokens > 0
parts = []
for chunk in client.chat.completions.create(model="{TEST_MODEL_REF}", messages=[{{"role": "user", "content": "Say hello."}}], max_tokens=8, stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
assert "".join(parts).strip(), parts
e = client.embeddings.create(model="{TEST_MODEL_REF}", input=["hello world", "goodbye"])
assert len(e.data) == 2 and len(e.data[0].embedding) == 576, e
models = [m.id for m in client.models.list()]
assert "{TEST_MODEL_REF}" in models, models
try:
    client.chat.completions.create(model="ai/absent", messages=[{{"role": "user", "content": "x"}}])
    raise SystemExit("expected NotFoundError")
except openai.NotFoundError:
    pass
print("openai client ok")
"#,
        node.addr
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("openai client ok"));
}
