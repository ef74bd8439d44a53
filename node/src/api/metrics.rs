//! Prometheus metrics in text format, counted with atomics (no registry crate needed).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;

use super::AppState;
use crate::engine::Completion;

#[derive(Default)]
pub struct Metrics {
    chat: AtomicU64,
    completions: AtomicU64,
    other: AtomicU64,
    errors: AtomicU64,
    prompt_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    decode_ms: AtomicU64,
}

impl Metrics {
    pub fn request(&self, kind: &str) {
        match kind {
            "chat" => &self.chat,
            "completions" => &self.completions,
            _ => &self.other,
        }
        .fetch_add(1, Ordering::Relaxed);
    }
    pub fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }
    pub fn tokens(&self, c: &Completion) {
        self.prompt_tokens
            .fetch_add(c.usage.prompt_tokens.into(), Ordering::Relaxed);
        self.cached_tokens
            .fetch_add(c.usage.cached_prompt_tokens.into(), Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(c.usage.completion_tokens.into(), Ordering::Relaxed);
        self.decode_ms
            .fetch_add(c.timings.decode_ms.into(), Ordering::Relaxed);
    }
}

pub async fn render(State(state): State<AppState>) -> String {
    let m = &state.metrics;
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut out = String::new();
    let _ = writeln!(out, "# TYPE beacon_requests_total counter");
    for (k, v) in [
        ("chat", &m.chat),
        ("completions", &m.completions),
        ("other", &m.other),
    ] {
        let _ = writeln!(out, "beacon_requests_total{{endpoint=\"{k}\"}} {}", g(v));
    }
    let _ = writeln!(
        out,
        "# TYPE beacon_request_errors_total counter\nbeacon_request_errors_total {}",
        g(&m.errors)
    );
    let _ = writeln!(out, "# TYPE beacon_tokens_total counter");
    let _ = writeln!(
        out,
        "beacon_tokens_total{{kind=\"prompt\"}} {}",
        g(&m.prompt_tokens)
    );
    let _ = writeln!(
        out,
        "beacon_tokens_total{{kind=\"prompt_cached\"}} {}",
        g(&m.cached_tokens)
    );
    let _ = writeln!(
        out,
        "beacon_tokens_total{{kind=\"completion\"}} {}",
        g(&m.completion_tokens)
    );
    let _ = writeln!(
        out,
        "# TYPE beacon_decode_seconds_total counter\nbeacon_decode_seconds_total {:.3}",
        g(&m.decode_ms) as f64 / 1000.0
    );
    let ps = state.scheduler.ps().await;
    let _ = writeln!(
        out,
        "# TYPE beacon_models_loaded gauge\nbeacon_models_loaded {}",
        ps.len()
    );
    let _ = writeln!(
        out,
        "# HELP beacon_queue_depth Requests waiting for a free sequence, all models.\n# TYPE beacon_queue_depth gauge\nbeacon_queue_depth {}",
        ps.iter().map(|p| p.queued).sum::<usize>()
    );
    let _ = writeln!(out, "# TYPE beacon_in_flight gauge");
    for p in &ps {
        let _ = writeln!(
            out,
            "beacon_queued{{model=\"{}\"}} {}",
            p.model.replace('"', ""),
            p.queued
        );
        let _ = writeln!(
            out,
            "beacon_in_flight{{model=\"{}\"}} {}",
            p.model.replace('"', ""),
            p.in_flight
        );
        let _ = writeln!(
            out,
            "beacon_model_load_seconds{{model=\"{}\"}} {:.3}",
            p.model.replace('"', ""),
            p.load_ms as f64 / 1000.0
        );
    }
    out
}
