//! The router's Prometheus metrics, kept and rendered by `prometheus-client`: request and
//! token counters, and histograms of latency, time to first token, tokens per second and
//! queue wait labelled by model, provider and region. Values the router keeps elsewhere
//! (providers, quarantines, audits, MinionS jobs) are read at each scrape by a collector,
//! and libp2p's own metrics are appended when the network records them.

use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::dispatch::{Dispatcher, Outcome};

/// Where a request went: the model the client named, the provider that answered, and its
/// region.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Route {
    pub model: String,
    pub provider: String,
    pub region: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: String,
}

type Histograms = Family<Route, Histogram, fn() -> Histogram>;

fn seconds() -> Histogram {
    // 5 ms to about 80 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

fn rates() -> Histogram {
    // 1 to 4,096 tokens per second.
    Histogram::new(exponential_buckets(1.0, 2.0, 13))
}

fn waits() -> Histogram {
    // 1 ms to about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// The router's metrics; shared by the HTTP handlers.
pub struct Metrics {
    registry: Registry,
    /// libp2p's metrics, recorded by the network's swarm task, when it has them.
    p2p: Option<Arc<Registry>>,
    pub requests: Counter,
    pub routed: Counter,
    pub fallback: Counter,
    pub errors: Counter,
    pub rate_limited: Counter,
    pub shed: Counter,
    pub retries: Counter,
    pub hedged: Counter,
    tokens: Family<Kind, Counter>,
    latency: Histograms,
    first_token: Histograms,
    tokens_per_second: Histograms,
    queue_wait: Histograms,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Registers the router's metrics; `live` reads what the dispatcher and the MinionS
    /// limiter hold at each scrape.
    pub fn new(live: Live) -> Self {
        let mut registry = Registry::with_prefix("beacon_router");
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let requests = counter(&mut registry, "requests", "Chat requests received.");
        let routed = counter(&mut registry, "routed", "Requests answered by a provider.");
        let fallback = counter(
            &mut registry,
            "fallback",
            "Requests sent to the remote API.",
        );
        let errors = counter(&mut registry, "errors", "Requests that ended in an error.");
        let rate_limited = counter(&mut registry, "rate_limited", "Requests over a rate limit.");
        let shed = counter(
            &mut registry,
            "shed",
            "Requests refused while the network was full.",
        );
        let retries = counter(
            &mut registry,
            "retries",
            "Attempts after a request's first.",
        );
        let hedged = counter(
            &mut registry,
            "hedged",
            "Requests sent to a second provider.",
        );
        let tokens = Family::<Kind, Counter>::default();
        registry.register("tokens", "Tokens providers processed.", tokens.clone());
        // Both series from zero, so a scrape before the first request shows them.
        for kind in ["prompt", "completion"] {
            let _ = tokens.get_or_create(&Kind { kind: kind.into() });
        }
        let histograms = |registry: &mut Registry, name: &str, help: &str, f: fn() -> Histogram| {
            let h = Histograms::new_with_constructor(f);
            registry.register(name, help, h.clone());
            h
        };
        let latency = histograms(
            &mut registry,
            "request_latency_seconds",
            "Time from dispatch to a verified answer, retries and hedges included.",
            seconds,
        );
        let first_token = histograms(
            &mut registry,
            "time_to_first_token_seconds",
            "Streamed requests: time from dispatch to the first text sent to the client.",
            seconds,
        );
        let tokens_per_second = histograms(
            &mut registry,
            "tokens_per_second",
            "Completion tokens per second of a request's latency.",
            rates,
        );
        let queue_wait = histograms(
            &mut registry,
            "queue_wait_seconds",
            "Time a request waited for a sequence at its provider (as the signed result reports).",
            waits,
        );
        registry.register_collector(Box::new(live));
        Metrics {
            registry,
            p2p: None,
            requests,
            routed,
            fallback,
            errors,
            rate_limited,
            shed,
            retries,
            hedged,
            tokens,
            latency,
            first_token,
            tokens_per_second,
            queue_wait,
        }
    }

    /// Appends libp2p's metrics (a registry the network records into) to every scrape.
    pub fn with_p2p(mut self, p2p: Arc<Registry>) -> Self {
        self.p2p = Some(p2p);
        self
    }

    /// A request a provider answered: `first_token` is when its first text reached the
    /// client, for a stream.
    pub fn answered(&self, model: &str, o: &Outcome, first_token: Option<std::time::Duration>) {
        self.routed.inc();
        self.retries.inc_by(o.attempts.saturating_sub(1) as u64);
        if o.hedged {
            self.hedged.inc();
        }
        let usage = &o.result.usage;
        for (kind, n) in [
            ("prompt", usage.prompt_tokens),
            ("completion", usage.completion_tokens),
        ] {
            self.tokens
                .get_or_create(&Kind { kind: kind.into() })
                .inc_by(n.into());
        }
        let route = Route {
            model: model.to_string(),
            provider: o.provider.to_string(),
            region: o.region.clone(),
        };
        let latency_s = o.latency_ms / 1000.0;
        self.latency.get_or_create(&route).observe(latency_s);
        if let Some(t) = first_token {
            self.first_token
                .get_or_create(&route)
                .observe(t.as_secs_f64());
        }
        if latency_s > 0.0 && usage.completion_tokens > 0 {
            self.tokens_per_second
                .get_or_create(&route)
                .observe(f64::from(usage.completion_tokens) / latency_s);
        }
        self.queue_wait
            .get_or_create(&route)
            .observe(f64::from(o.result.timings.queue_ms) / 1000.0);
    }

    /// The exposition text (OpenMetrics).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &self.registry);
        if let Some(p2p) = &self.p2p {
            let _ = prometheus_client::encoding::text::encode_registry(&mut out, p2p);
        }
        let _ = prometheus_client::encoding::text::encode_eof(&mut out);
        out
    }
}

/// What the router keeps elsewhere, read at each scrape.
pub struct Live {
    pub dispatcher: Dispatcher,
    pub minion_jobs: Arc<tokio::sync::Semaphore>,
    pub max_minion_jobs: usize,
}

impl fmt::Debug for Live {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Live").finish_non_exhaustive()
    }
}

impl Collector for Live {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let providers = self.dispatcher.providers();
        let quarantined = providers.iter().filter(|p| p.quarantined).count();
        let (passed, failed) = self.dispatcher.audit_counts();
        let jobs = self
            .max_minion_jobs
            .saturating_sub(self.minion_jobs.available_permits());
        for (name, help, value) in [
            ("providers", "Providers in the directory.", providers.len()),
            ("quarantined", "Providers quarantined.", quarantined),
            ("minions_jobs", "MinionS jobs running.", jobs),
        ] {
            let g = ConstGauge::new(value as i64);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let audits = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(
            "audits",
            "Audits run, by result.",
            None,
            audits.metric_type(),
        )?;
        for (result, n) in [("pass", passed), ("fail", failed)] {
            ConstCounter::new(n).encode(family.encode_family(&[("result", result)])?)?;
        }
        let tokens = ConstCounter::new(self.dispatcher.audit_tokens());
        tokens.encode(encoder.encode_descriptor(
            "audit_tokens",
            "Tokens auditors scored.",
            None,
            tokens.metric_type(),
        )?)?;
        Ok(())
    }
}
