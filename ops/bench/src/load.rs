//! Closed-loop chat load against an OpenAI-compatible base URL: every request's outcome,
//! throughput and latency percentiles. The benchmarks and the suite's workloads share it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use crate::http::http;

/// A server under load.
pub struct Target {
    pub name: &'static str,
    /// Base URL; requests go to `{base}/v1/chat/completions`.
    pub base: String,
    pub pid: u32,
}

/// The model name every request asks for (the test model's reference).
pub const MODEL: &str = "ai/smollm2:test";

/// One request's outcome.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Sample {
    /// Seconds from the start of the load to the start of this request.
    pub at_s: f64,
    pub ms: f64,
    /// HTTP status (0: no answer).
    pub status: u16,
    pub completion_tokens: u64,
    /// Where a router placed it (`beacon.provider` / `beacon.region` in its answer).
    pub provider: Option<String>,
    pub region: Option<String>,
    /// Attempts the router made (1 when the first provider answered).
    pub attempts: u64,
    /// The router sent a duplicate to a second provider (a straggler).
    pub hedged: bool,
    /// `Retry-After` of a refusal, in seconds.
    pub retry_after: Option<u64>,
    /// Why it failed, when it did.
    pub error: Option<String>,
}

impl Sample {
    pub fn ok(&self) -> bool {
        self.status == 200
    }
}

/// What one load run measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Load {
    pub concurrency: usize,
    pub requests: usize,
    pub errors: usize,
    pub completion_tokens: u64,
    pub seconds: f64,
    pub tokens_per_second: f64,
    pub requests_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Requests a router hedged (sent to a second provider too).
    pub hedged: usize,
    /// Every request, in the order they started.
    #[serde(skip)]
    pub samples: Vec<Sample>,
}

/// The `p` quantile of sorted values (0 for none).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// One chat request to `{base}/v1/chat/completions`.
pub fn chat(base: &str, messages: serde_json::Value, max_tokens: u32) -> Sample {
    let body = serde_json::json!({
        "model": MODEL,
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
    let json = r.try_json().unwrap_or_default();
    let text = |v: &serde_json::Value| v.as_str().map(str::to_string);
    let error = (r.status != 200).then(|| {
        json["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| r.body.chars().take(300).collect())
    });
    Sample {
        at_s: 0.0,
        ms,
        status: r.status,
        completion_tokens: json["usage"]["completion_tokens"].as_u64().unwrap_or(0),
        provider: text(&json["beacon"]["provider"]),
        region: text(&json["beacon"]["region"]),
        attempts: json["beacon"]["attempts"].as_u64().unwrap_or(1),
        hedged: json["beacon"]["hedged"].as_bool().unwrap_or(false),
        retry_after: r.header("retry-after").and_then(|v| v.parse().ok()),
        error,
    }
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
    run_load_observed(target, concurrency, requests, make, max_tokens, |_, _| {})
}

/// [`run_load`], calling `seen(done, sample)` after each request (progress, or an event to
/// inject once a share of the load is done).
pub fn run_load_observed(
    target: &Target,
    concurrency: usize,
    requests: usize,
    make: impl Fn(usize) -> serde_json::Value + Sync,
    max_tokens: u32,
    seen: impl Fn(usize, &Sample) + Sync,
) -> Load {
    let start = Instant::now();
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let results = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..concurrency.max(1) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= requests {
                        return;
                    }
                    let at_s = start.elapsed().as_secs_f64();
                    let mut r = chat(&target.base, make(i), max_tokens);
                    r.at_s = at_s;
                    let n = done.fetch_add(1, Ordering::SeqCst) + 1;
                    seen(n, &r);
                    results.lock().unwrap_or_else(|p| p.into_inner()).push(r);
                }
            });
        }
    });
    let seconds = start.elapsed().as_secs_f64();
    let mut samples = results.into_inner().unwrap_or_else(|p| p.into_inner());
    samples.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    summarize(concurrency, seconds, samples)
}

/// Throughput and percentiles of finished samples.
pub fn summarize(concurrency: usize, seconds: f64, samples: Vec<Sample>) -> Load {
    let mut lat: Vec<f64> = samples.iter().filter(|r| r.ok()).map(|r| r.ms).collect();
    lat.sort_by(f64::total_cmp);
    let completion_tokens: u64 = samples.iter().map(|r| r.completion_tokens).sum();
    let ok = samples.iter().filter(|r| r.ok()).count();
    let seconds = seconds.max(1e-9);
    Load {
        concurrency,
        requests: samples.len(),
        errors: samples.len() - ok,
        completion_tokens,
        seconds,
        tokens_per_second: completion_tokens as f64 / seconds,
        requests_per_second: ok as f64 / seconds,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        hedged: samples.iter().filter(|s| s.hedged).count(),
        samples,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_sorted_values() {
        assert_eq!(percentile(&[], 0.5), 0.0);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
    }

    #[test]
    fn summary_counts_failures_apart() {
        let s = |status, ms, tokens| Sample {
            status,
            ms,
            completion_tokens: tokens,
            ..Sample::default()
        };
        let l = summarize(
            2,
            2.0,
            vec![s(200, 10.0, 8), s(503, 1.0, 0), s(200, 30.0, 8)],
        );
        assert_eq!((l.requests, l.errors, l.completion_tokens), (3, 1, 16));
        assert_eq!(l.tokens_per_second, 8.0);
        assert_eq!(l.requests_per_second, 1.0);
        assert_eq!(l.p50_ms, 30.0); // (2-1)*0.5 rounds to index 1 of [10, 30]
    }
}
