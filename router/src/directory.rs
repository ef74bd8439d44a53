//! The router's view of the providers: the live advert table from `beacon-net` (entries
//! expire when adverts stop) joined with what the router measured itself — EWMA latency
//! and throughput, failures, and audit reputation. Reputation and quarantine survive
//! restarts in sled; the rest is rebuilt from traffic.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use beacon_net::SharedDirectory;
use beacon_proto::{Digest, ModelRef, PeerId, ProviderAdvert};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::placement::ProviderView;

/// Reputation every provider starts with.
pub const START_REPUTATION: f64 = 0.8;

/// Reputation below this quarantines a provider.
pub const QUARANTINE_BELOW: f64 = 0.3;

/// A provider is on probation until this many of its results passed audits: a new key
/// buys no trust. On probation it is audited at [`PROBATION_AUDIT_RATE`] at least, gets
/// at most one request at a time while established providers of its model exist, and
/// audits others only when no reputable provider can.
pub const PROBATION_AUDITS: u64 = 3;

/// The lowest audit rate of a provider on probation (unless audits are off).
pub const PROBATION_AUDIT_RATE: f64 = 0.5;

/// The share of a model's requests that goes to an idle provider on probation while
/// established providers of the model exist: enough for a newcomer to be measured and
/// pass its probation audits under any load, little enough that a bad one costs a
/// client at most a retry now and then.
pub const EXPLORE_SHARE: f64 = 0.125;

/// Reputation an auditor needs to be drawn before others.
pub const REPUTABLE_FROM: f64 = 0.6;

/// What the router remembers about one provider.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stats {
    /// 0..=1; starts at 0.8, rises slowly with passed audits, falls with failed ones.
    pub reputation: f64,
    pub audits_passed: u64,
    pub audits_failed: u64,
    /// Consecutive failed audits (quarantine needs several, never one).
    pub failed_in_a_row: u32,
    /// The last audits, newest in the lowest bit: 1 for a failure.
    #[serde(default)]
    pub recent_audits: u32,
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
    /// Audits this provider ran that the other auditors outvoted.
    #[serde(default)]
    pub outvoted: u64,
    /// Decided audits it voted in on the side of the decision.
    #[serde(default)]
    pub votes_agreed: u64,
    /// Of those, audits decided as passed.
    #[serde(default)]
    pub passes_agreed: u64,
    /// Outvoted when it failed a result the others passed.
    #[serde(default)]
    pub false_alarms: u64,
    /// Audits of this provider whose auditors split with no majority (no penalty).
    #[serde(default)]
    pub audits_inconclusive: u64,
    /// Most requests of this router it has answered at once, halved by each refusal or
    /// timeout (see `success`, `failure`): its advertised slots count only up to one more
    /// than this (slow start), so a provider that claims more capacity than it has gets no
    /// more work than it has shown it can take.
    #[serde(default)]
    pub max_concurrent_ok: u32,
    /// Times its adverts named a pinned model with another digest (penalised at most
    /// once per period; the last time in `name_conflict_ms`).
    #[serde(default)]
    pub name_conflicts: u64,
    #[serde(default)]
    pub name_conflict_ms: u64,
    /// Reference checks it was given as an auditor: results whose verdict the router
    /// already knows (good ones two auditors passed, clear cheats two failed), sent like
    /// any audit (see `Dispatcher::check_an_auditor`).
    #[serde(default)]
    pub reference_checks: u64,
    /// Of those, the ones it judged wrongly: a good result failed (a false alarm) or a
    /// clear cheat passed.
    #[serde(default)]
    pub reference_wrong: u64,
    /// Clear cheats it passed as an auditor.
    #[serde(default)]
    pub cheats_passed: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            reputation: START_REPUTATION,
            audits_passed: 0,
            audits_failed: 0,
            failed_in_a_row: 0,
            recent_audits: 0,
            quarantined_until_ms: 0,
            successes: 0,
            failures: 0,
            invalid: 0,
            ewma_latency_ms: None,
            ewma_tps: None,
            failing_in_a_row: 0,
            open_until_ms: 0,
            outvoted: 0,
            votes_agreed: 0,
            passes_agreed: 0,
            false_alarms: 0,
            audits_inconclusive: 0,
            name_conflicts: 0,
            name_conflict_ms: 0,
            max_concurrent_ok: 0,
            reference_checks: 0,
            reference_wrong: 0,
            cheats_passed: 0,
        }
    }
}

/// Tokens/s assumed of a provider the router has not measured yet.
pub const PRIOR_TPS: f64 = 30.0;

/// The slots the router lets a provider have: one more than the most it has answered at
/// once (halved by refusals and timeouts), at least 2 (a new provider starts there and grows as it
/// proves itself), at most 256.
pub fn measured_slots(s: &Stats) -> u32 {
    s.max_concurrent_ok.saturating_add(1).clamp(2, 256)
}

/// A failed audit: reputation falls, and two in a row quarantine a provider whose
/// reputation is no longer high.
fn penalise(s: &mut Stats) {
    s.failed_in_a_row += 1;
    s.reputation = (s.reputation - 0.15).max(0.0);
    if s.failed_in_a_row >= 2 && s.reputation < QUARANTINE_BELOW + 0.3 {
        s.quarantined_until_ms = now_ms() + 3_600_000;
    }
}

pub use beacon_net::now_ms;

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
    /// Its advert names a pinned model with another digest: ignored for placement.
    pub pin_conflict: bool,
    /// The slots placement and admission count: advertised, capped by measurement.
    pub slots_counted: u32,
    /// On probation (see [`PROBATION_AUDITS`]), and whether the operator vouches for it.
    pub probation: bool,
    pub trusted: bool,
    /// This router's requests running there now (filled in by the API from the
    /// dispatcher).
    pub in_flight: u32,
}

/// Model names the operator trusts: reference → manifest digest. When any are set, a name
/// resolves only through them, and an advert that lists a pinned name with another digest
/// is ignored (its sender loses reputation).
#[derive(Clone, Debug, Default)]
pub struct Pins(BTreeMap<ModelRef, (String, Digest)>);

impl Pins {
    /// Parses `REFERENCE=sha256:HEX` entries.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Pins, String> {
        let mut pins = BTreeMap::new();
        for e in entries {
            let e = e.as_ref().trim();
            if e.is_empty() {
                continue;
            }
            let (r, d) = e
                .rsplit_once('=')
                .ok_or_else(|| format!("model pin {e:?} is not REFERENCE=sha256:DIGEST"))?;
            let reference = ModelRef::parse(r).map_err(|err| format!("model pin {e:?}: {err}"))?;
            let digest: Digest = d
                .parse()
                .map_err(|err| format!("model pin {e:?}: digest: {err}"))?;
            pins.insert(reference, (r.trim().to_string(), digest));
        }
        Ok(Pins(pins))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, reference: &ModelRef) -> Option<Digest> {
        self.0.get(reference).map(|(_, d)| *d)
    }

    /// Whether `advert` names a pinned model with another digest (a name hijack, or a
    /// provider holding what the tag no longer means).
    pub fn conflicts(&self, advert: &ProviderAdvert) -> bool {
        advert.models.iter().any(|m| {
            m.references.iter().any(|r| {
                ModelRef::parse(r)
                    .ok()
                    .and_then(|r| self.get(&r))
                    .is_some_and(|d| d != m.digest)
            })
        })
    }

    /// The pinned names as the operator wrote them, with their digests.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Digest)> {
        self.0.values().map(|(name, d)| (name.as_str(), d))
    }
}

/// How often a provider whose adverts conflict with a pin is penalised (once per this
/// period, so a stale tag costs reputation without an instant quarantine).
const CONFLICT_PENALTY_EVERY_MS: u64 = 600_000;

/// The directory plus the router's own measurements.
#[derive(Clone)]
pub struct RouterDirectory {
    pub live: SharedDirectory,
    stats: Arc<Mutex<HashMap<PeerId, Stats>>>,
    db: Option<sled::Tree>,
    pins: Arc<Pins>,
    /// Providers the operator vouches for (its own nodes): never on probation, reputable
    /// from the start, so audits have honest auditors before anyone has a record.
    trusted: Arc<HashSet<PeerId>>,
    /// Circuit breaker: consecutive failures that open it, and for how long.
    pub breaker_failures: u32,
    pub breaker_open: Duration,
    /// Place work on providers whose data plane is at a private or loopback address.
    pub dial_private: bool,
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
            pins: Arc::default(),
            trusted: Arc::default(),
            breaker_failures: 3,
            breaker_open: Duration::from_secs(10),
            dial_private: true,
        }
    }

    /// Sets the operator's model pins.
    pub fn with_pins(mut self, pins: Pins) -> Self {
        self.pins = Arc::new(pins);
        self
    }

    /// Sets the providers the operator vouches for (`--trusted-provider`).
    pub fn with_trusted(mut self, trusted: impl IntoIterator<Item = PeerId>) -> Self {
        self.trusted = Arc::new(trusted.into_iter().collect());
        self
    }

    /// Whether `peer` is still on probation: fewer than [`PROBATION_AUDITS`] passed audits,
    /// unless the operator vouches for it.
    fn probation(&self, peer: &PeerId, s: &Stats) -> bool {
        s.audits_passed < PROBATION_AUDITS && !self.trusted.contains(peer)
    }

    pub fn pins(&self) -> &Pins {
        &self.pins
    }

    /// Penalises the providers whose adverts name a pinned model with another digest
    /// (their adverts are already ignored by placement); at most once per
    /// [`CONFLICT_PENALTY_EVERY_MS`] each. Returns the offenders seen.
    pub fn police_pins(&self) -> Vec<PeerId> {
        if self.pins.is_empty() {
            return Vec::new();
        }
        let offenders: Vec<PeerId> = {
            let live = self.live.read().unwrap_or_else(|p| p.into_inner());
            live.entries()
                .filter(|e| self.pins.conflicts(&e.advert))
                .map(|e| e.advert.peer_id)
                .collect()
        };
        let now = now_ms();
        for peer in &offenders {
            self.with(peer, true, |s| {
                if s.name_conflict_ms + CONFLICT_PENALTY_EVERY_MS <= now {
                    s.name_conflict_ms = now;
                    s.name_conflicts += 1;
                    s.reputation = (s.reputation - 0.2).max(0.0);
                    if s.reputation < QUARANTINE_BELOW {
                        s.quarantined_until_ms = now + 3_600_000;
                    }
                }
            });
        }
        offenders
    }

    /// Updates a provider's stats; `persist` writes them to sled, which only reputation
    /// changes need (successes and failures are rebuilt from traffic, and writing on every
    /// request would put the disk on the request path).
    fn with<R>(&self, peer: &PeerId, persist: bool, f: impl FnOnce(&mut Stats) -> R) -> R {
        let mut all = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let s = all.entry(*peer).or_default();
        let quarantined_until = s.quarantined_until_ms;
        let r = f(s);
        if persist
            && let Some(tree) = &self.db
            && let Ok(bytes) = serde_json::to_vec(s)
        {
            let _ = tree.insert(peer.to_bytes(), bytes);
            // A quarantine is on disk before it is acted on: sled writes back every
            // 500 ms, and a router killed sooner would forget it (rare, so the sync is
            // cheap where it matters).
            if s.quarantined_until_ms != quarantined_until
                && let Err(e) = tree.flush()
            {
                warn!(peer = %peer, error = %e, "could not write a quarantine to disk");
            }
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

    /// A verified result, measured by the router's own clock: `latency_ms` from sending
    /// the request to the verified result, with `concurrent` requests of this router in
    /// flight to the provider at the time (this one included). Nothing the provider
    /// reports about its own speed is used.
    pub fn success(&self, peer: &PeerId, latency_ms: f64, completion_tokens: u32, concurrent: u32) {
        self.with(peer, false, |s| {
            s.successes += 1;
            s.failing_in_a_row = 0;
            s.ewma_latency_ms = ewma(s.ewma_latency_ms, latency_ms);
            // A level of concurrency counts as capacity only when the answer came about as
            // fast per token as the provider's best: a provider that queues what it claims
            // to run in parallel gets slower, and earns no more slots.
            // Slow start: every answer at a level of concurrency earns it (one more slot
            // than that is then allowed); a refusal or timeout halves it (see `failure`).
            // Speed is not asked of it: a CPU provider batching 8 sequences answers each
            // about 5x slower per token than one alone and still serves 1.6x the tokens,
            // and a provider that queues instead shows it in the latency placement
            // weighs. (Asking each answer to be as fast per token as the best kept a CPU
            // node at 3 slots: 0.68x of its direct throughput at 8 clients.)
            s.max_concurrent_ok = s.max_concurrent_ok.max(concurrent);
            if completion_tokens >= 4 && latency_ms > 0.0 {
                s.ewma_tps = ewma(s.ewma_tps, completion_tokens as f64 * 1000.0 / latency_ms);
            }
        });
    }

    /// A transport failure or refusal: halves the concurrency it is trusted with, and
    /// opens the circuit after several in a row.
    pub fn failure(&self, peer: &PeerId) {
        let (n, open) = (self.breaker_failures, self.breaker_open);
        self.with(peer, false, |s| {
            s.failures += 1;
            s.failing_in_a_row += 1;
            s.max_concurrent_ok /= 2;
            if s.failing_in_a_row >= n {
                s.open_until_ms = now_ms() + open.as_millis() as u64;
            }
        });
    }

    /// A result that failed verification: a reputation hit, and it counts as a failure.
    /// On probation it quarantines at once: a newcomer's first answers are its audition.
    pub fn invalid(&self, peer: &PeerId) {
        let on_probation = self.on_probation(peer);
        self.with(peer, true, |s| {
            s.invalid += 1;
            s.reputation = (s.reputation - 0.2).max(0.0);
            if s.reputation < QUARANTINE_BELOW || on_probation {
                s.quarantined_until_ms = now_ms() + 3_600_000;
            }
        });
        self.failure(peer);
    }

    /// An audit outcome (already agreed by two auditors when it is a failure). For an
    /// established provider one failure on argmax agreement never quarantines (hardware
    /// noise); repeated failures do. A failure that no noise explains (`hard`: text that
    /// is not its tokens, a token the grammar forbids) or any agreed failure while on
    /// probation quarantines at once.
    pub fn audited(&self, peer: &PeerId, passed: bool, hard: bool) {
        let on_probation = self.on_probation(peer);
        self.with(peer, true, |s| {
            s.recent_audits = (s.recent_audits << 1) | u32::from(!passed);
            if passed {
                s.audits_passed += 1;
                s.failed_in_a_row = 0;
                s.reputation = (s.reputation + 0.02).min(1.0);
            } else {
                s.audits_failed += 1;
                penalise(s);
                // Honest on greedy work and cheating on sampled work interleaves passes
                // with failures: two failures among the last 16 audits count like two in
                // a row.
                let recent_failures = (s.recent_audits & 0xffff).count_ones();
                if hard
                    || on_probation
                    || (recent_failures >= 2 && s.reputation < QUARANTINE_BELOW + 0.3)
                {
                    s.quarantined_until_ms = now_ms() + 3_600_000;
                }
            }
        });
    }

    /// An auditor whose verdict the other auditors overruled (the audit was decided
    /// `passed`): the same reputation hit as a failed audit, and quarantine once it has
    /// been outvoted twice and in more than a fifth of the decided audits it voted in, or
    /// has failed twice what others passed in more than a fifth of the passes it voted on
    /// (an auditor that fails everything is right whenever it audits a cheater; an honest
    /// one fails a good result only by rare noise). Its own work passing audits does not
    /// excuse lying as an auditor.
    pub fn outvoted(&self, auditor: &PeerId, passed: bool) {
        self.with(auditor, true, |s| {
            s.outvoted += 1;
            s.false_alarms += u64::from(passed);
            s.reputation = (s.reputation - 0.15).max(0.0);
            if (s.outvoted >= 2 && s.outvoted * 4 > s.votes_agreed)
                || (s.false_alarms >= 2 && s.false_alarms * 4 > s.passes_agreed)
            {
                s.quarantined_until_ms = now_ms() + 3_600_000;
            }
        });
    }

    /// An auditor whose vote the decision (`passed`) followed.
    pub fn vote_agreed(&self, auditor: &PeerId, passed: bool) {
        self.with(auditor, false, |s| {
            s.votes_agreed += 1;
            s.passes_agreed += u64::from(passed);
        });
    }

    /// An auditor's verdict (`passed`) on a reference result whose verdict the router
    /// knows (`good`). Right, it counts as a vote with the decision. Failing a good
    /// result is a false alarm (see [`RouterDirectory::outvoted`]); passing a clear cheat
    /// (text that is not its tokens, or most positions wrong, as two auditors found) is
    /// what a colluding auditor does and no honest one does by noise: twice quarantines.
    pub fn reference_checked(&self, auditor: &PeerId, passed: bool, good: bool) {
        let right = passed == good;
        if right {
            self.vote_agreed(auditor, good);
        } else {
            self.outvoted(auditor, good);
        }
        self.with(auditor, true, |s| {
            s.reference_checks += 1;
            s.reference_wrong += u64::from(!right);
            s.cheats_passed += u64::from(passed && !good);
            if s.cheats_passed >= 2 {
                s.quarantined_until_ms = now_ms() + 3_600_000;
            }
        });
    }

    /// An audit whose auditors split with no majority: recorded, nobody penalised.
    pub fn inconclusive(&self, peer: &PeerId) {
        self.with(peer, true, |s| s.audits_inconclusive += 1);
    }

    /// Whether a provider is still on probation (see [`PROBATION_AUDITS`]).
    /// Whether the operator vouches for `peer` (`--trusted-provider`).
    pub fn trusted(&self, peer: &PeerId) -> bool {
        self.trusted.contains(peer)
    }

    pub fn on_probation(&self, peer: &PeerId) -> bool {
        self.probation(peer, &self.stats(peer))
    }

    /// Whether a provider may be drawn as an auditor before others: past probation, in
    /// good standing.
    pub fn reputable(&self, peer: &PeerId) -> bool {
        let s = self.stats(peer);
        !self.probation(peer, &s) && s.reputation >= REPUTABLE_FROM
    }

    pub fn quarantined(&self, peer: &PeerId) -> bool {
        self.stats(peer).quarantined_until_ms > now_ms()
    }

    /// Audit probability for a provider: `base` at full reputation, higher as it falls
    /// (1.8x at the starting [`START_REPUTATION`]), and at least
    /// [`PROBATION_AUDIT_RATE`] on probation. A provider the operator vouches for
    /// (`--trusted-provider`) is audited at `base` from the start, more only once its
    /// reputation falls below where it started. A base of 0 turns audits off.
    pub fn audit_rate(&self, peer: &PeerId, base: f64) -> f64 {
        if base <= 0.0 {
            return 0.0;
        }
        let s = self.stats(peer);
        // Below full reputation, more than the base: 1.8x at the start (0.8), so a cheat
        // close to the real model (a Q3_K_M requantisation passes some greedy audits) that
        // got past probation keeps being audited more until its record is long. (Auditing
        // at the base rate from 0.8 up let one serve 56 answers uncaught in attacks.rs.)
        let vouched = if self.trusted.contains(peer) {
            1.0 - START_REPUTATION
        } else {
            0.0
        };
        let deficit = (1.0 - s.reputation - vouched).max(0.0);
        let rate = base * (1.0 + 4.0 * deficit);
        let floor = if self.probation(peer, &s) {
            PROBATION_AUDIT_RATE
        } else {
            0.0
        };
        rate.max(floor).clamp(0.0, 1.0)
    }

    /// Placement's view of every live provider.
    pub fn views(&self) -> Vec<(ProviderView, std::net::SocketAddr)> {
        let live = self.live.read().unwrap_or_else(|p| p.into_inner());
        let now = now_ms();
        live.entries()
            // An advert that contradicts a pin is ignored as a whole.
            .filter(|e| !self.pins.conflicts(&e.advert))
            .filter_map(|e| {
                let addr: std::net::SocketAddr = e.advert.data_plane.as_deref()?.parse().ok()?;
                if !self.dial_private && !beacon_net::addr::is_public(addr.ip()) {
                    return None;
                }
                let s = self.stats(&e.advert.peer_id);
                // Speed is what the router measured, end to end, once it has measured any;
                // before that the advert counts, up to a modest prior. Claims never buy
                // more than measurement shows.
                let tps_cap = s.ewma_tps.unwrap_or(PRIOR_TPS);
                let decode_tps: HashMap<Digest, f64> = e
                    .advert
                    .throughput
                    .iter()
                    .map(|t| {
                        let advertised = f64::from(t.tokens_per_second);
                        (t.model, s.ewma_tps.unwrap_or(advertised.min(tps_cap)))
                    })
                    .filter(|(_, t)| t.is_finite() && *t > 0.0)
                    .collect();
                Some((
                    ProviderView {
                        peer: e.advert.peer_id,
                        region: e.advert.region.clone(),
                        models: e.advert.models.iter().map(|m| m.digest).collect(),
                        free_memory: e.advert.host.ram_free,
                        slots: e.advert.slots.total.min(measured_slots(&s)),
                        busy: e.advert.slots.busy.saturating_add(e.advert.slots.queued),
                        rtt_ms: e
                            .rtt
                            .map(|r| r.as_secs_f64() * 1000.0)
                            .or(s.ewma_latency_ms.map(|l| l.min(1000.0) / 10.0))
                            .unwrap_or(50.0),
                        decode_tps,
                        default_tps: s.ewma_tps.unwrap_or(PRIOR_TPS).min(tps_cap),
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

    /// The model digest a request's `model` names. A digest names itself. With pins, a
    /// name resolves only through them. Without pins (a network the operator has not
    /// pinned), a name resolves to the digest that the most providers past probation
    /// advertise under it (any providers when none is past probation): never simply the
    /// first advert, so one new identity cannot take a name over.
    pub fn resolve_model(&self, reference: &str) -> Option<Digest> {
        if let Ok(d) = reference.parse::<Digest>() {
            return Some(d);
        }
        let wanted = ModelRef::parse(reference).ok()?;
        if !self.pins.is_empty() {
            return self.pins.get(&wanted);
        }
        let live = self.live.read().unwrap_or_else(|p| p.into_inner());
        // (established holders, all holders) per digest.
        let mut votes: BTreeMap<Digest, (usize, usize)> = BTreeMap::new();
        for e in live.entries() {
            let established = !self.on_probation(&e.advert.peer_id);
            let digests: std::collections::BTreeSet<Digest> = e
                .advert
                .models
                .iter()
                .filter(|m| {
                    m.references
                        .iter()
                        .any(|r| ModelRef::parse(r).is_ok_and(|r| r == wanted))
                })
                .map(|m| m.digest)
                .collect();
            for d in digests {
                let v = votes.entry(d).or_default();
                v.0 += usize::from(established);
                v.1 += 1;
            }
        }
        votes
            .into_iter()
            .max_by_key(|(_, v)| *v)
            .map(|(digest, _)| digest)
    }

    /// Model references on the network, with how many providers hold each: the pinned
    /// names (and who holds their digests) when pins are set.
    pub fn models(&self) -> BTreeMap<String, (Digest, usize)> {
        let live = self.live.read().unwrap_or_else(|p| p.into_inner());
        let mut out: BTreeMap<String, (Digest, usize)> = BTreeMap::new();
        if !self.pins.is_empty() {
            for (r, d) in self.pins.iter() {
                let n = live
                    .entries()
                    .filter(|e| !self.pins.conflicts(&e.advert))
                    .filter(|e| e.advert.models.iter().any(|m| m.digest == *d))
                    .count();
                out.insert(r.to_string(), (*d, n));
            }
            return out;
        }
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
                    pin_conflict: self.pins.conflicts(&e.advert),
                    slots_counted: e.advert.slots.total.min(measured_slots(&s)),
                    probation: self.probation(&e.advert.peer_id, &s),
                    trusted: self.trusted.contains(&e.advert.peer_id),
                    in_flight: 0,
                    stats: s,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use beacon_proto::{CachedModel, Keypair, Slots};

    fn advert(models: &[(&str, Digest)]) -> ProviderAdvert {
        ProviderAdvert {
            peer_id: Keypair::generate().peer_id(),
            region: "eu-west".into(),
            listen_addrs: vec![],
            data_plane: None,
            version: "1".into(),
            accelerators: vec![],
            host: Default::default(),
            engines: vec![],
            models: models
                .iter()
                .map(|(r, d)| CachedModel {
                    references: vec![r.to_string()],
                    digest: *d,
                    size: 1,
                    quantization: "Q4_1".into(),
                    parameters: "135M".into(),
                    architecture: "llama".into(),
                    context_size: None,
                })
                .collect(),
            slots: Slots::default(),
            throughput: vec![],
            price: None,
            seq: 1,
            timestamp_ms: 1,
        }
    }

    /// Attack (f) at the level of the decision: a pinned name means its digest, however
    /// it is spelled, and an advert claiming the name for another digest conflicts.
    #[test]
    fn pins_resolve_names_and_spot_hijacks() {
        let (good, evil) = (Digest::of(b"good"), Digest::of(b"evil"));
        let pins = Pins::parse(&[format!("ai/smollm2:test={good}")]).unwrap();
        let full = ModelRef::parse("index.docker.io/ai/smollm2:test").unwrap();
        assert_eq!(pins.get(&full), Some(good));
        assert_eq!(pins.iter().next(), Some(("ai/smollm2:test", &good)));
        assert!(!pins.conflicts(&advert(&[("ai/smollm2:test", good)])));
        assert!(pins.conflicts(&advert(&[("smollm2:test", evil)])));
        assert!(!pins.conflicts(&advert(&[("ai/other:1", evil)])));
        assert!(Pins::parse(&["ai/smollm2:test"]).is_err());
        assert!(Pins::parse(&["ai/smollm2:test=sha256:zz"]).is_err());
    }

    /// A provider the operator vouches for is reputable from the start, so two newcomers
    /// can't be the only auditors; anyone else earns it with passed audits.
    #[test]
    fn trusted_providers_skip_probation_and_newcomers_earn_it() {
        let (anchor, stranger) = (Keypair::generate().peer_id(), Keypair::generate().peer_id());
        let live = Arc::new(std::sync::RwLock::new(
            beacon_net::directory::Directory::new(Duration::from_secs(60), Duration::from_secs(10)),
        ));
        let d = RouterDirectory::new(live, None).with_trusted([anchor]);
        assert!(!d.on_probation(&anchor) && d.reputable(&anchor));
        assert!(d.on_probation(&stranger) && !d.reputable(&stranger));
        assert!(d.audit_rate(&anchor, 0.05) < PROBATION_AUDIT_RATE);
        // Vouched for: the base rate from the start; a stranger past probation, more.
        assert!((d.audit_rate(&anchor, 0.05) - 0.05).abs() < 1e-9);
        assert_eq!(d.audit_rate(&stranger, 0.05), PROBATION_AUDIT_RATE);
        for _ in 0..PROBATION_AUDITS {
            d.audited(&stranger, true, false);
        }
        assert!(!d.on_probation(&stranger) && d.reputable(&stranger));
        assert!(d.audit_rate(&stranger, 0.05) > 0.06);
        // A newcomer's result that fails verification quarantines it at once.
        let other = Keypair::generate().peer_id();
        d.invalid(&other);
        assert!(d.quarantined(&other));
    }

    /// Attack (g) at the level of the decision: an auditor that fails the good results it
    /// is checked with is quarantined after two, whatever its votes on cheaters agreed
    /// with; one that passes the clear cheats it is checked with, after two; one that
    /// judges them right and fails a good result once by noise is not.
    #[test]
    fn auditors_judging_reference_results_wrongly_are_quarantined() {
        let live = Arc::new(std::sync::RwLock::new(
            beacon_net::directory::Directory::new(Duration::from_secs(60), Duration::from_secs(10)),
        ));
        let d = RouterDirectory::new(live, None);
        let [liar, colluder, honest] = [(); 3].map(|_| Keypair::generate().peer_id());
        for p in [&liar, &colluder, &honest] {
            for _ in 0..PROBATION_AUDITS {
                d.audited(p, true, false);
            }
            // All voted with the majority on cheaters and on good results.
            for _ in 0..4 {
                d.vote_agreed(p, false);
                d.vote_agreed(p, true);
            }
        }
        d.reference_checked(&liar, false, true);
        assert!(!d.quarantined(&liar), "one false alarm can be noise");
        d.reference_checked(&liar, false, false);
        d.reference_checked(&liar, false, true);
        assert!(d.quarantined(&liar));
        assert_eq!(d.stats(&liar).reference_wrong, 2);
        d.reference_checked(&colluder, true, true);
        d.reference_checked(&colluder, true, false);
        assert!(!d.quarantined(&colluder));
        d.reference_checked(&colluder, true, false);
        assert!(d.quarantined(&colluder));
        assert_eq!(d.stats(&colluder).cheats_passed, 2);
        d.reference_checked(&honest, true, true);
        d.reference_checked(&honest, false, true);
        for _ in 0..8 {
            d.reference_checked(&honest, true, true);
            d.reference_checked(&honest, false, false);
        }
        assert!(!d.quarantined(&honest));
        assert_eq!(d.stats(&honest).reference_checks, 18);
    }

    /// Attack (h) at the level of the decision: slots grow one at a time with answers
    /// given at once, whatever is advertised, and each refusal or timeout halves them.
    #[test]
    fn slots_grow_with_answers_and_halve_with_failures() {
        let live = Arc::new(std::sync::RwLock::new(
            beacon_net::directory::Directory::new(Duration::from_secs(60), Duration::from_secs(10)),
        ));
        let d = RouterDirectory::new(live, None);
        let p = Keypair::generate().peer_id();
        assert_eq!(measured_slots(&d.stats(&p)), 2);
        // A CPU node batching: each answer slower per token as concurrency rises.
        for c in 1..=8u32 {
            d.success(&p, 200.0 * f64::from(c), 16, c);
        }
        assert_eq!(measured_slots(&d.stats(&p)), 9);
        d.failure(&p);
        assert_eq!(measured_slots(&d.stats(&p)), 5);
        d.failure(&p);
        d.failure(&p);
        assert_eq!(measured_slots(&d.stats(&p)), 2);
    }

    #[test]
    fn measured_slots_start_small_and_grow_with_proof() {
        let mut s = Stats::default();
        assert_eq!(measured_slots(&s), 2);
        s.max_concurrent_ok = 3;
        assert_eq!(measured_slots(&s), 4);
        s.max_concurrent_ok = u32::MAX;
        assert_eq!(measured_slots(&s), 256);
    }
}
