//! Load generation shared by the benchmarks: closed-loop chat clients against an
//! OpenAI-compatible base URL, with throughput and latency percentiles.

use std::time::Instant;

use crate::http;

/// A server under load.
pub struct Target {
    pub name: &'static str,
    /// Base URL; requests go to `{base}/v1/chat/completions`.
    pub base: String,
    pub pid: u32,
}

/// What one load run measured.
#[derive(Default, serde::Serialize)]
pub struct Load {
    pub concurrency: usize,
    pub requests: usize,
    pub errors: usize,
    pub completion_tokens: u64,
    pub seconds: f64,
    pub tokens_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// The `p` quantile of sorted values (0 for none).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// One chat request: (succeeded, completion tokens, milliseconds).
pub fn chat(base: &str, messages: serde_json::Value, max_tokens: u32) -> (bool, u64, f64) {
    let body = serde_json::json!({
        "model": "ai/smollm2:test",
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
    })
    .to_string();
    let start = Instant::now();
    let r = http(
        "POST",
        &format!("{base}/v1/chat/completions"),
        Some(&body),
        &[],
    );
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    if r.status != 200 {
        return (false, 0, ms);
    }
    let tokens = r.json()["usage"]["completion_tokens"].as_u64().unwrap_or(0);
    (true, tokens, ms)
}

/// `requests` requests from `concurrency` closed-loop clients; `make(i)` gives request i's
/// messages.
pub fn run_load(
    target: &Target,
    concurrency: usize,
    requests: usize,
    make: impl Fn(usize) -> serde_json::Value + Sync,
    max_tokens: u32,
) -> Load {
    let start = Instant::now();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..concurrency {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if i >= requests {
                        return;
                    }
                    let r = chat(&target.base, make(i), max_tokens);
                    results.lock().unwrap().push(r);
                }
            });
        }
    });
    let seconds = start.elapsed().as_secs_f64();
    let results = results.into_inner().unwrap();
    let mut lat: Vec<f64> = results.iter().filter(|r| r.0).map(|r| r.2).collect();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let completion_tokens: u64 = results.iter().map(|r| r.1).sum();
    Load {
        concurrency,
        requests,
        errors: results.iter().filter(|r| !r.0).count(),
        completion_tokens,
        seconds,
        tokens_per_second: completion_tokens as f64 / seconds,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
    }
}
