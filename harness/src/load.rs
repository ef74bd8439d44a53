//! Closed-loop chat load against an OpenAI-compatible base URL: every request's outcome,
//! throughput, latency and (streamed) time-to-first-token percentiles. Requests go from an
//! in-process HTTP client (one connection pool, kept-alive connections, no process per
//! request), so what is measured is the server's time; `run_load_streamed` streams them
//! and sees the first token when it arrives. The benchmarks and the suite's workloads
//! share it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::models::TEST_MODEL_REF;

/// A server under load.
pub struct Target {
    pub name: &'static str,
    /// Base URL; requests go to `{base}/v1/chat/completions`.
    pub base: String,
    pub pid: u32,
}

/// One request's outcome.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Sample {
    /// Seconds from the start of the load to the start of this request.
    pub at_s: f64,
    /// Until the answer ended (the stream's last event).
    pub ms: f64,
    /// Until the first generated text arrived.
    pub ttft_ms: Option<f64>,
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
    /// Answered whole (a stream that ended in an error event is not).
    pub fn ok(&self) -> bool {
        self.status == 200 && self.error.is_none()
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
    /// Time to first token, median and 99th percentile.
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
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

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// The client every load uses: one pool of kept-alive connections.
fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .pool_max_idle_per_host(256)
        .build()
        .unwrap_or_default()
}

/// One chat request to `{base}/v1/chat/completions`: streamed (the time to the first
/// token is measured) or answered whole (a router retries it on another provider whenever
/// one fails, which it cannot do for a stream that has sent text).
pub async fn chat(
    client: &reqwest::Client,
    base: &str,
    messages: Value,
    max_tokens: u32,
    stream: bool,
) -> Sample {
    let mut body = serde_json::json!({
        "model": TEST_MODEL_REF,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    });
    if stream {
        body["stream_options"] = serde_json::json!({"include_usage": true});
    }
    let start = Instant::now();
    let mut sample = Sample {
        attempts: 1,
        ..Sample::default()
    };
    let sent = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await;
    let mut r = match sent {
        Ok(r) => r,
        Err(e) => {
            sample.error = Some(e.to_string());
            sample.ms = start.elapsed().as_secs_f64() * 1000.0;
            return sample;
        }
    };
    sample.status = r.status().as_u16();
    sample.retry_after = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    if sample.status != 200 {
        let text = r.text().await.unwrap_or_default();
        let json: Value = serde_json::from_str(&text).unwrap_or_default();
        sample.error = Some(
            json["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| text.chars().take(300).collect()),
        );
        sample.ms = start.elapsed().as_secs_f64() * 1000.0;
        return sample;
    }
    if !stream {
        match r.json::<Value>().await {
            Ok(v) => {
                sample.completion_tokens = v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
                event(&mut sample, &v.to_string(), start);
                sample.ttft_ms = None;
            }
            Err(e) => sample.error = Some(e.to_string()),
        }
        sample.ms = start.elapsed().as_secs_f64() * 1000.0;
        return sample;
    }
    let mut pending = Vec::new();
    // Text events seen: the token count when a server reports no usage in its stream.
    let mut deltas = 0;
    loop {
        match r.chunk().await {
            Ok(Some(bytes)) => {
                pending.extend_from_slice(&bytes);
                while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    if let Some(data) = String::from_utf8_lossy(&line).trim().strip_prefix("data: ")
                    {
                        deltas += u64::from(event(&mut sample, data, start));
                    }
                }
            }
            Ok(None) => break,
            Err(e) => {
                sample.error = Some(e.to_string());
                break;
            }
        }
    }
    sample.ms = start.elapsed().as_secs_f64() * 1000.0;
    if sample.completion_tokens == 0 {
        sample.completion_tokens = deltas;
    }
    sample
}

/// Reads one `data:` event of a chat stream into `sample`; whether it carried text.
fn event(sample: &mut Sample, data: &str, start: Instant) -> bool {
    let Ok(v) = serde_json::from_str::<Value>(data) else {
        return false; // `[DONE]`
    };
    if let Some(e) = v.get("error") {
        sample.error = Some(e["message"].as_str().unwrap_or("error event").to_string());
    }
    let text = v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
    if !text.is_empty() && sample.ttft_ms.is_none() {
        sample.ttft_ms = Some(start.elapsed().as_secs_f64() * 1000.0);
    }
    if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
        sample.completion_tokens = n;
    }
    let b = &v["beacon"];
    if b.is_object() {
        let text = |v: &Value| v.as_str().map(str::to_string);
        sample.provider = text(&b["provider"]);
        sample.region = text(&b["region"]);
        sample.attempts = b["attempts"].as_u64().unwrap_or(1);
        sample.hedged = b["hedged"].as_bool().unwrap_or(false);
    }
    !text.is_empty()
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

/// [`run_load`] with every request streamed: the time to the first token is measured too.
pub fn run_load_streamed(
    target: &Target,
    concurrency: usize,
    requests: usize,
    make: impl Fn(usize) -> serde_json::Value + Sync,
    max_tokens: u32,
) -> Load {
    drive(
        target,
        (concurrency, requests),
        make,
        (max_tokens, true),
        |_, _| {},
    )
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
    drive(
        target,
        (concurrency, requests),
        make,
        (max_tokens, false),
        seen,
    )
}

/// `requests` requests from `concurrency` closed-loop clients on one in-process client.
fn drive(
    target: &Target,
    (concurrency, requests): (usize, usize),
    make: impl Fn(usize) -> serde_json::Value + Sync,
    (max_tokens, stream): (u32, bool),
    seen: impl Fn(usize, &Sample) + Sync,
) -> Load {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => panic!("the load generator's runtime: {e}"),
    };
    let client = client();
    let start = Instant::now();
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let results = Mutex::new(Vec::new());
    let worker = || async {
        loop {
            let i = next.fetch_add(1, Ordering::SeqCst);
            if i >= requests {
                return;
            }
            let at_s = start.elapsed().as_secs_f64();
            let mut r = chat(&client, &target.base, make(i), max_tokens, stream).await;
            r.at_s = at_s;
            let n = done.fetch_add(1, Ordering::SeqCst) + 1;
            seen(n, &r);
            results.lock().unwrap_or_else(|p| p.into_inner()).push(r);
        }
    };
    runtime.block_on(futures::future::join_all(
        (0..concurrency.max(1)).map(|_| worker()),
    ));
    let seconds = start.elapsed().as_secs_f64();
    let mut samples = results.into_inner().unwrap_or_else(|p| p.into_inner());
    samples.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    summarize(concurrency, seconds, samples)
}

/// Throughput and percentiles of finished samples.
pub fn summarize(concurrency: usize, seconds: f64, samples: Vec<Sample>) -> Load {
    let mut lat: Vec<f64> = samples.iter().filter(|r| r.ok()).map(|r| r.ms).collect();
    lat.sort_by(f64::total_cmp);
    let mut ttft: Vec<f64> = samples
        .iter()
        .filter(|r| r.ok())
        .filter_map(|r| r.ttft_ms)
        .collect();
    ttft.sort_by(f64::total_cmp);
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
        ttft_p50_ms: percentile(&ttft, 0.5),
        ttft_p99_ms: percentile(&ttft, 0.99),
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
