//! The node's Prometheus metrics, kept and rendered by `prometheus-client`: requests,
//! errors and tokens, and per model the histograms of engine latency, time to first token,
//! decode speed and queue wait, for the HTTP API and the data plane alike. The scheduler's
//! gauges are read at each scrape; libp2p's metrics are appended when the node is on a
//! network.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::engine::Completion;
use crate::scheduler::RunningModel;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Endpoint {
    endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Model {
    model: String,
}

type Histograms = Family<Model, Histogram, fn() -> Histogram>;

fn seconds() -> Histogram {
    // 1 ms to about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

fn rates() -> Histogram {
    // 1 to 4,096 tokens per second.
    Histogram::new(exponential_buckets(1.0, 2.0, 13))
}

/// The node's metrics; shared by the API and the data plane.
pub struct Metrics {
    registry: Registry,
    p2p: std::sync::OnceLock<Arc<Registry>>,
    requests: Family<Endpoint, Counter>,
    errors: Counter,
    tokens: Family<Kind, Counter>,
    decode_seconds: Counter<f64, AtomicU64>,
    latency: Histograms,
    first_token: Histograms,
    tokens_per_second: Histograms,
    queue_wait: Histograms,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("beacon");
        let requests = Family::<Endpoint, Counter>::default();
        registry.register(
            "requests",
            "Requests to the API, by endpoint.",
            requests.clone(),
        );
        let errors = Counter::default();
        registry.register(
            "request_errors",
            "API requests that failed.",
            errors.clone(),
        );
        let tokens = Family::<Kind, Counter>::default();
        registry.register("tokens", "Tokens processed, by kind.", tokens.clone());
        // Every known series from zero, so a scrape before the first request shows them.
        for endpoint in ["chat", "completions", "embeddings"] {
            let _ = requests.get_or_create(&Endpoint {
                endpoint: endpoint.into(),
            });
        }
        for kind in ["prompt", "prompt_cached", "completion"] {
            let _ = tokens.get_or_create(&Kind { kind: kind.into() });
        }
        let decode_seconds = Counter::<f64, AtomicU64>::default();
        registry.register(
            "decode_seconds",
            "Time spent decoding.",
            decode_seconds.clone(),
        );
        let mut histograms = |name: &str, help: &str, f: fn() -> Histogram| {
            let h = Histograms::new_with_constructor(f);
            registry.register(name, help, h.clone());
            h
        };
        let latency = histograms(
            "request_latency_seconds",
            "Engine time of a generation: queue, prefill and decode.",
            seconds,
        );
        let first_token = histograms(
            "time_to_first_token_seconds",
            "Queue and prefill: the time before the first generated token.",
            seconds,
        );
        let tokens_per_second =
            histograms("tokens_per_second", "Decode speed of a generation.", rates);
        let queue_wait = histograms(
            "queue_wait_seconds",
            "Time a generation waited for a free sequence.",
            seconds,
        );
        Metrics {
            registry,
            p2p: std::sync::OnceLock::new(),
            requests,
            errors,
            tokens,
            decode_seconds,
            latency,
            first_token,
            tokens_per_second,
            queue_wait,
        }
    }
}

impl Metrics {
    /// Appends libp2p's metrics (a registry the network records into) to every scrape;
    /// the first registry given stays.
    pub fn set_p2p(&self, p2p: Arc<Registry>) {
        let _ = self.p2p.set(p2p);
    }

    /// A request to the API (`chat`, `completions`, `embeddings`).
    pub fn request(&self, endpoint: &str) {
        self.requests
            .get_or_create(&Endpoint {
                endpoint: endpoint.into(),
            })
            .inc();
    }

    pub fn error(&self) {
        self.errors.inc();
    }

    /// A finished generation of `model`, from the API or the data plane.
    pub fn completed(&self, model: &str, c: &Completion) {
        for (kind, n) in [
            ("prompt", c.usage.prompt_tokens),
            ("prompt_cached", c.usage.cached_prompt_tokens),
            ("completion", c.usage.completion_tokens),
        ] {
            self.tokens
                .get_or_create(&Kind { kind: kind.into() })
                .inc_by(n.into());
        }
        let t = &c.timings;
        let s = |ms: u32| f64::from(ms) / 1000.0;
        self.decode_seconds.inc_by(s(t.decode_ms));
        let model = Model {
            model: model.to_string(),
        };
        self.latency
            .get_or_create(&model)
            .observe(s(t.queue_ms) + s(t.prefill_ms) + s(t.decode_ms));
        self.first_token
            .get_or_create(&model)
            .observe(s(t.queue_ms) + s(t.prefill_ms));
        self.queue_wait.get_or_create(&model).observe(s(t.queue_ms));
        if t.decode_ms > 0 && c.usage.completion_tokens > 0 {
            self.tokens_per_second
                .get_or_create(&model)
                .observe(f64::from(c.usage.completion_tokens) / s(t.decode_ms));
        }
    }

    /// The exposition text (OpenMetrics), with the scheduler's state `ps` as gauges.
    pub fn render(&self, ps: &[RunningModel]) -> String {
        let mut engines = Registry::with_prefix("beacon");
        let gauge = |registry: &mut Registry, name: &str, help: &str, v: i64| {
            let g = Gauge::<i64>::default();
            g.set(v);
            registry.register(name, help, g);
        };
        gauge(
            &mut engines,
            "models_loaded",
            "Models loaded in memory.",
            ps.len() as i64,
        );
        gauge(
            &mut engines,
            "queue_depth",
            "Requests waiting for a free sequence, all models.",
            ps.iter().map(|p| p.queued as i64).sum(),
        );
        let queued = Family::<Model, Gauge>::default();
        let in_flight = Family::<Model, Gauge>::default();
        let load = Family::<Model, Gauge<f64, AtomicU64>>::default();
        for p in ps {
            let m = Model {
                model: p.model.clone(),
            };
            queued.get_or_create(&m).set(p.queued as i64);
            in_flight.get_or_create(&m).set(p.in_flight as i64);
            load.get_or_create(&m).set(p.load_ms as f64 / 1000.0);
        }
        engines.register("queued", "Requests waiting, per model.", queued);
        engines.register("in_flight", "Requests generating, per model.", in_flight);
        engines.register("model_load_seconds", "How long a model took to load.", load);
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &self.registry);
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &engines);
        if let Some(p2p) = self.p2p.get() {
            let _ = prometheus_client::encoding::text::encode_registry(&mut out, p2p);
        }
        let _ = prometheus_client::encoding::text::encode_eof(&mut out);
        out
    }
}
