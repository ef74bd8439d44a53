//! The router's view of the providers: the live advert table from `beacon-net` (entries
//! expire when adverts stop) joined with what the router measured itself — EWMA latency
//! and throughput, failures, and audit reputation. Reputation and quarantine survive
//! restarts in sled; the rest is rebuilt from traffic.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use beacon_net::SharedDirectory;
use beacon_proto::{Digest, PeerId};
use serde::{Deserialize, Serialize};

use crate::placement::ProviderView;

/// Reputation below this quarantines a provider.
pub const QUARANTINE_BELOW: f64 = 0.3;

/// What the router remembers about one provider.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stats {
    /// 0..=1; starts at 0.8, rises slowly with passed audits, falls with failed ones.
    pub reputation: f64,
    pub audits_passed: u64,
    pub audits_failed: u64,
    /// Consecutive failed audits (quarantine needs several, never one).
    pub failed_in_a_row: u32,
    pub quarantined_until_ms: u64,
    pub successes: u64,
    pub failures: u64,
    /// Rejected results (bad signature, wrong digest).
    pub invalid: u64,
    #[serde(default)]
    pub ewma_latency_ms: Option<f64>,
    #[serde(default)]
    pub ewma_tps: Option<f64>,
    /// Consecutive transport failures, for the circuit breaker.
    #[serde(default)]
    pub failing_in_a_row: u32,
    #[serde(default)]
    pub open_until_ms: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            reputation: 0.8,
            audits_passed: 0,
            audits_failed: 0,
            failed_in_a_row: 0,
            quarantined_until_ms: 0,
            successes: 0,
            failures: 0,
            invalid: 0,
            ewma_latency_ms: None,
            ewma_tps: None,
            failing_in_a_row: 0,
            open_until_ms: 0,
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn ewma(old: Option<f64>, new: f64) -> Option<f64> {
    Some(old.map_or(new, |o| 0.8 * o + 0.2 * new))
}

/// A provider as the router sees it.
#[derive(Clone, Debug, Serialize)]
pub struct ProviderInfo {
    pub peer_id: String,
    pub region: String,
    pub data_plane: Option<String>,
    pub models: Vec<String>,
    pub slots: u32,
    pub busy: u32,
    pub rtt_ms: Option<f64>,
    pub stats: Stats,
    pub quarantined: bool,
    pub circuit_open: bool,
}

/// The directory plus the router's own measurements.
#[derive(Clone)]
pub struct RouterDirectory {
    pub live: SharedDirectory,
    stats: Arc<Mutex<HashMap<PeerId, Stats>>>,
    db: Option<sled::Tree>,
    /// Circuit breaker: consecutive failures that open it, and for how long.
    pub breaker_failures: u32,
    pub breaker_open: Duration,
}

impl RouterDirectory {
    /// `db`: where reputations persist (None: in memory only).
    pub fn new(live: SharedDirectory, db: Option<sled::Tree>) -> Self {
        let mut stats = HashMap::new();
        if let Some(tree) = &db {
            for (k, v) in tree.iter().flatten() {
                if let (Ok(peer), Ok(s)) =
                    (PeerId::from_bytes(&k), serde_json::from_slice::<Stats>(&v))
                {
                    stats.insert(peer, s);
                }
            }
        }
        RouterDirectory {
            live,
            stats: Arc::new(Mutex::new(stats)),
            db,
            breaker_failures: 3,
            breaker_open: Duration::from_secs(10),
        }
    }

    /// Updates a provider's stats; `persist` writes them to sled, which only reputation
    /// changes need (successes and failures are rebuilt from traffic, and writing on every
    /// request would put the disk on the request path).
    fn with<R>(&self, peer: &PeerId, persist: bool, f: impl FnOnce(&mut Stats) -> R) -> R {
        let mut all = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let s = all.entry(*peer).or_default();
        let r = f(s);
        if persist
            && let Some(tree) = &self.db
            && let Ok(bytes) = serde_json::to_vec(s)
        {
            let _ = tree.insert(peer.to_bytes(), bytes);
        }
        r
    }

    pub fn stats(&self, peer: &PeerId) -> Stats {
        self.stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer)
            .cloned()
            .unwrap_or_default()
    }

    pub fn success(&self, peer: &PeerId, latency_ms: f64, completion_tokens: u32, decode_ms: u32) {
        self.with(peer, false, |s| {
            s.successes += 1;
            s.failing_in_a_row = 0;
            s.ewma_latency_ms = ewma(s.ewma_latency_ms, latency_ms);
            if completion_tokens >= 4 && decode_ms > 0 {
                s.ewma_tps = ewma(
                    s.ewma_tps,
                    completion_tokens as f64 * 1000.0 / decode_ms as f64,
                );
            }
        });
    }

    /// A transport failure or refusal; opens the circuit after several in a row.
    pub fn failure(&self, peer: &PeerId) {
        let (n, open) = (self.breaker_failures, self.breaker_open);
        self.with(peer, false, |s| {
            s.failures += 1;
            s.failing_in_a_row += 1;
            if s.failing_in_a_row >= n {
                s.open_until_ms = now_ms() + open.as_millis() as u64;
            }
        });
    }

    /// A result that failed verification: a reputation hit, and it counts as a failure.
    pub fn invalid(&self, peer: &PeerId) {
        self.with(peer, true, |s| {
            s.invalid += 1;
            s.reputation = (s.reputation - 0.2).max(0.0);
            if s.reputation < QUARANTINE_BELOW {
                s.quarantined_until_ms = now_ms() + 3_600_000;
            }
        });
        self.failure(peer);
    }

    /// An audit outcome. One failure never quarantines; repeated failures do.
    pub fn audited(&self, peer: &PeerId, passed: bool) {
        self.with(peer, true, |s| {
            if passed {
                s.audits_passed += 1;
                s.failed_in_a_row = 0;
                s.reputation = (s.reputation + 0.02).min(1.0);
            } else {
                s.audits_failed += 1;
                s.failed_in_a_row += 1;
                s.reputation = (s.reputation - 0.15).max(0.0);
                if s.failed_in_a_row >= 2 && s.reputation < QUARANTINE_BELOW + 0.3 {
                    s.quarantined_until_ms = now_ms() + 3_600_000;
                }
            }
        });
    }

    pub fn quarantined(&self, peer: &PeerId) -> bool {
        self.stats(peer).quarantined_until_ms > now_ms()
    }

    /// Audit probability for a provider: `base`, higher as reputation falls.
    pub fn audit_rate(&self, peer: &PeerId, base: f64) -> f64 {
        let r = self.stats(peer).reputation;
        (base * (1.0 + 4.0 * (1.0 - r))).clamp(0.0, 1.0)
    }

    /// Placement's view of every live provider.
    pub fn views(&self) -> Vec<(ProviderView, std::net::SocketAddr)> {
        let live = self.live.read().unwrap_or_else(|p| p.into_inner());
        let now = now_ms();
        live.entries()
            .filter_map(|e| {
                let addr = e.advert.data_plane.as_deref()?.parse().ok()?;
                let s = self.stats(&e.advert.peer_id);
                let decode_tps: HashMap<Digest, f64> = e
                    .advert
                    .throughput
                    .iter()
                    .map(|t| (t.model, t.tokens_per_second as f64))
                    .collect();
                Some((
                    ProviderView {
                        peer: e.advert.peer_id,
                        region: e.advert.region.clone(),
                        models: e.advert.models.iter().map(|m| m.digest).collect(),
                        free_memory: e.advert.host.ram_free,
                        slots: e.advert.slots.total,
                        busy: e.advert.slots.busy + e.advert.slots.queued,
                        rtt_ms: e
                            .rtt
                            .map(|r| r.as_secs_f64() * 1000.0)
                            .or(s.ewma_latency_ms.map(|l| l.min(1000.0) / 10.0))
                            .unwrap_or(50.0),
                        decode_tps,
                        default_tps: s.ewma_tps.unwrap_or(30.0),
                        prefill_tps: 500.0,
                        price_per_mtok: e
                            .advert
                            .price
                            .as_ref()
                            .map(|p| p.micros_per_mtok_completion as f64 / 1e6)
                            .unwrap_or(0.0),
                        quarantined: s.quarantined_until_ms > now || s.open_until_ms > now,
                    },
                    addr,
                ))
            })
            .collect()
    }

    /// How long until the first circuit breaker closes among live providers of `model`
    /// that are only circuit-open (not quarantined); `None` when no breaker is holding
    /// such a provider back.
    pub fn breaker_wait(&self, model: &Digest) -> Option<Duration> {
        let live = self.live.read().unwrap_or_else(|p| p.into_inner());
        let now = now_ms();
        live.entries()
            .filter(|e| e.advert.models.iter().any(|m| m.digest == *model))
            .filter_map(|e| {
                let s = self.stats(&e.advert.peer_id);
                (s.open_until_ms > now && s.quarantined_until_ms <= now)
                    .then(|| Duration::from_millis(s.open_until_ms - now))
            })
            .min()
    }

    /// The model digest a reference names on the network (the newest advert wins ties).
    pub fn resolve_model(&self, reference: &str) -> Option<Digest> {
        if let Ok(d) = reference.parse::<Digest>() {
            return Some(d);
        }
        let wanted = beacon_proto::ModelRef::parse(reference).ok()?;
        let live = self.live.read().unwrap_or_else(|p| p.into_inner());
        live.entries()
            .flat_map(|e| e.advert.models.iter())
            .find(|m| {
                m.references
                    .iter()
                    .any(|r| beacon_proto::ModelRef::parse(r).is_ok_and(|r| r == wanted))
            })
            .map(|m| m.digest)
    }

    /// Model references on the network, with how many providers hold each.
    pub fn models(&self) -> BTreeMap<String, (Digest, usize)> {
        let live = self.live.read().unwrap_or_else(|p| p.into_inner());
        let mut out: BTreeMap<String, (Digest, usize)> = BTreeMap::new();
        for e in live.entries() {
            for m in &e.advert.models {
                for r in &m.references {
                    out.entry(r.clone()).or_insert((m.digest, 0)).1 += 1;
                }
            }
        }
        out
    }

    pub fn providers(&self) -> Vec<ProviderInfo> {
        let live = self.live.read().unwrap_or_else(|p| p.into_inner());
        let now = now_ms();
        live.entries()
            .map(|e| {
                let s = self.stats(&e.advert.peer_id);
                ProviderInfo {
                    peer_id: e.advert.peer_id.to_string(),
                    region: e.advert.region.clone(),
                    data_plane: e.advert.data_plane.clone(),
                    models: e
                        .advert
                        .models
                        .iter()
                        .flat_map(|m| m.references.clone())
                        .collect(),
                    slots: e.advert.slots.total,
                    busy: e.advert.slots.busy,
                    rtt_ms: e.rtt.map(|r| r.as_secs_f64() * 1000.0),
                    quarantined: s.quarantined_until_ms > now,
                    circuit_open: s.open_until_ms > now,
                    stats: s,
                }
            })
            .collect()
    }
}
