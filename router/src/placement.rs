//! Placement: a pure, deterministic function from subtasks, providers and a policy to
//! assignments. No I/O, no clock, no global randomness: the same inputs and seed give the
//! same answer, which makes it property-testable and benchmarkable.
//!
//! Constraints (never violated): the provider has the model digest cached (or the policy
//! allows a pull and the model fits its free memory), its region is allowed, it is not
//! quarantined, and it is not excluded for this subtask (earlier failed attempts).
//!
//! Objective: earliest expected completion. Each provider is modelled as `slots` parallel
//! lanes whose start time is its RTT plus its current queue; a subtask's expected time on a
//! lane is its prefill at the provider's prompt throughput plus its output at the provider's
//! decode throughput. Subtasks are placed longest first (LPT), each on the lane that
//! finishes it earliest, plus an optional cost term; ties are broken by a seeded hash, so
//! equal providers share the load.
//!
//! Shared prefixes: a subtask may name a prompt prefix it shares with others (a MinionS
//! chunk read by several tasks). On a provider that already holds that prefix (told by the
//! caller, or chosen for an earlier subtask of the same placement) its prefill is only the
//! rest of the prompt, so work that reads the same text gathers where its KV cache is,
//! exactly when that finishes earlier than spreading it.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};

use beacon_proto::{Digest, PeerId};

/// One unit of work to place.
#[derive(Clone, Debug, PartialEq)]
pub struct Subtask {
    pub model: Digest,
    pub prompt_tokens: u32,
    pub max_tokens: u32,
    /// Providers this subtask must not go to (they failed it already).
    pub exclude: Vec<PeerId>,
    /// The prompt prefix this subtask shares with other work, if any.
    pub prefix: Option<Prefix>,
}

/// A prompt prefix several subtasks share.
#[derive(Clone, Debug, PartialEq)]
pub struct Prefix {
    /// Identifies the prefix (a hash of its text): equal keys, equal prefixes.
    pub key: u64,
    /// Its length in prompt tokens (at most the subtask's `prompt_tokens`).
    pub tokens: u32,
    /// Providers believed to hold it in their KV cache already.
    pub held_by: Vec<PeerId>,
}

/// What placement knows about one provider.
#[derive(Clone, Debug, PartialEq)]
pub struct ProviderView {
    pub peer: PeerId,
    pub region: String,
    pub models: Vec<Digest>,
    /// Free memory for a model pulled on demand, bytes.
    pub free_memory: u64,
    pub slots: u32,
    /// Requests already running or waiting there.
    pub busy: u32,
    pub rtt_ms: f64,
    /// Decode tokens/s per sequence, per model digest (missing: `default_tps`).
    pub decode_tps: HashMap<Digest, f64>,
    pub default_tps: f64,
    /// Prompt tokens/s.
    pub prefill_tps: f64,
    /// Price per million tokens (any currency, consistent across providers).
    pub price_per_mtok: f64,
    pub quarantined: bool,
}

/// Rules of a placement.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Policy {
    /// Only these regions, when given (data residency).
    pub allowed_regions: Option<BTreeSet<String>>,
    /// Allow providers that would have to pull the model, with each model's size.
    pub pull_sizes: Option<HashMap<Digest, u64>>,
    /// Milliseconds of expected completion one unit of price is worth (0: ignore cost).
    pub cost_weight: f64,
    pub seed: u64,
}

/// Where a subtask goes and when it is expected to finish (ms from now).
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    pub subtask: usize,
    pub provider: PeerId,
    pub expected_ms: f64,
}

/// Why a subtask could not be placed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("no provider can run subtask {subtask}: {reason}")]
    NoEligibleProvider { subtask: usize, reason: String },
}

/// Whether `p` may run `t` under `policy`.
pub fn eligible(t: &Subtask, p: &ProviderView, policy: &Policy) -> bool {
    if p.quarantined || p.slots == 0 || t.exclude.contains(&p.peer) {
        return false;
    }
    if let Some(regions) = &policy.allowed_regions
        && !regions.contains(&p.region)
    {
        return false;
    }
    if p.models.contains(&t.model) {
        return true;
    }
    match &policy.pull_sizes {
        Some(sizes) => sizes.get(&t.model).is_some_and(|s| *s <= p.free_memory),
        None => false,
    }
}

/// Expected milliseconds of `t` on `p` once it starts.
pub fn service_ms(t: &Subtask, p: &ProviderView) -> f64 {
    let r = Rates::of(p, &t.model);
    r.service_ms(t.prompt_tokens, t.max_tokens)
}

/// A provider's speed for one model, as milliseconds per token: what scoring multiplies.
#[derive(Clone, Copy, Debug)]
struct Rates {
    rtt_ms: f64,
    prefill_ms: f64,
    decode_ms: f64,
}

impl Rates {
    fn of(p: &ProviderView, model: &Digest) -> Rates {
        let decode = p
            .decode_tps
            .get(model)
            .copied()
            .unwrap_or(p.default_tps)
            .max(0.1);
        Rates {
            rtt_ms: p.rtt_ms,
            prefill_ms: 1000.0 / p.prefill_tps.max(1.0),
            decode_ms: 1000.0 / decode,
        }
    }

    /// Expected milliseconds of a subtask once it starts, with `prefill` of its prompt
    /// tokens not in the provider's cache. Every scoring path computes it this way, in this
    /// order, so that they agree to the bit.
    fn service_ms(&self, prefill: u32, max_tokens: u32) -> f64 {
        self.rtt_ms + prefill as f64 * self.prefill_ms + max_tokens as f64 * self.decode_ms
    }
}

fn mix(seed: u64, a: u64, b: &[u8]) -> u64 {
    // FNV-1a over (seed, a, b): cheap, stable across platforms and releases.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for byte in a.to_le_bytes().iter().chain(b) {
        h ^= *byte as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The prompt tokens of `t` a provider must prefill when it holds `t`'s prefix or not.
fn prefill_tokens(t: &Subtask, holds: bool) -> u32 {
    match &t.prefix {
        Some(x) if holds => t
            .prompt_tokens
            .saturating_sub(x.tokens.min(t.prompt_tokens)),
        _ => t.prompt_tokens,
    }
}

/// Each provider's lanes: when each of its `slots` is next free (ms). Only the earliest
/// matters to scoring (`free`); a provider's heap of lanes is made when it first gets work,
/// so that placing one request among thousands of providers allocates almost nothing.
struct Lanes {
    start: Vec<u64>,
    free: Vec<u64>,
    heaps: HashMap<usize, BinaryHeap<Reverse<u64>>>,
}

impl Lanes {
    fn new(providers: &[ProviderView]) -> Lanes {
        // A busy provider's lanes start later, by the work already there spread over its
        // slots.
        let start: Vec<u64> = providers
            .iter()
            .map(|p| {
                let typical = 1000.0 * 256.0 / p.default_tps.max(0.1);
                let queued_ms = p.busy as f64 * typical / p.slots.max(1) as f64;
                (p.rtt_ms + queued_ms).max(0.0) as u64
            })
            .collect();
        Lanes {
            free: start.clone(),
            start,
            heaps: HashMap::new(),
        }
    }

    /// Provider `j` takes work that finishes at `finish`; returns its new earliest free time.
    fn take(&mut self, j: usize, slots: u32, finish: f64) -> u64 {
        let start = self.start[j];
        let heap = self
            .heaps
            .entry(j)
            .or_insert_with(|| (0..slots.min(4096)).map(|_| Reverse(start)).collect());
        heap.pop();
        heap.push(Reverse(finish.ceil() as u64));
        self.free[j] = heap.peek().map_or(0, |r| r.0);
        self.free[j]
    }
}

/// The providers eligible for one model, as columns: what scoring reads for every subtask
/// of that model. `free` mirrors [`Lanes::free`] for these providers, kept current when
/// one of them takes work, so that the scoring loop reads memory in order.
struct Group {
    members: Vec<usize>,
    free: Vec<f64>,
    rtt: Vec<f64>,
    prefill_ms: Vec<f64>,
    decode_ms: Vec<f64>,
    /// `cost_weight × price`: the cost term is this × the subtask's tokens / 1e6.
    weighted_price: Vec<f64>,
    /// Position of provider `j` in `members`, or `u32::MAX`.
    position: Vec<u32>,
}

impl Group {
    fn new(model: &Digest, providers: &[ProviderView], policy: &Policy, lanes: &Lanes) -> Group {
        let probe = Subtask {
            model: *model,
            prompt_tokens: 0,
            max_tokens: 0,
            exclude: Vec::new(),
            prefix: None,
        };
        let members: Vec<usize> = (0..providers.len())
            .filter(|&j| eligible(&probe, &providers[j], policy))
            .collect();
        let mut g = Group {
            free: members.iter().map(|&j| lanes.free[j] as f64).collect(),
            rtt: Vec::with_capacity(members.len()),
            prefill_ms: Vec::with_capacity(members.len()),
            decode_ms: Vec::with_capacity(members.len()),
            weighted_price: Vec::with_capacity(members.len()),
            position: vec![u32::MAX; providers.len()],
            members,
        };
        for (k, &j) in g.members.iter().enumerate() {
            let r = Rates::of(&providers[j], model);
            g.rtt.push(r.rtt_ms);
            g.prefill_ms.push(r.prefill_ms);
            g.decode_ms.push(r.decode_ms);
            g.weighted_price
                .push(policy.cost_weight * providers[j].price_per_mtok);
            g.position[j] = k as u32;
        }
        g
    }

    fn rates(&self, k: usize) -> Rates {
        Rates {
            rtt_ms: self.rtt[k],
            prefill_ms: self.prefill_ms[k],
            decode_ms: self.decode_ms[k],
        }
    }
}

/// Places every subtask; the result has one entry per subtask, in subtask order.
///
/// Subtasks are taken longest first; each goes where it is expected to finish earliest
/// (plus the cost term), ties to the lowest seeded hash of (subtask, provider). Scoring is
/// a pass over the model's eligible providers held as columns (no hashing, no allocation
/// per pair); exclusions and cached prefixes, which concern a few providers, are applied
/// to the scores afterwards. The result is exactly what scoring every pair one by one
/// gives (a property test compares them).
pub fn place(
    subtasks: &[Subtask],
    providers: &[ProviderView],
    policy: &Policy,
) -> Vec<Result<Assignment, PlacementError>> {
    let mut lanes = Lanes::new(providers);
    let mut groups: HashMap<Digest, Group> = HashMap::new();
    // For each provider, the groups it is in (to keep their `free` current).
    let mut member_of: HashMap<usize, Vec<Digest>> = HashMap::new();
    let mut order: Vec<usize> = (0..subtasks.len()).collect();
    order.sort_by_key(|&i| {
        let t = &subtasks[i];
        (Reverse(t.prompt_tokens as u64 + 8 * t.max_tokens as u64), i)
    });
    // Peer ids to indices, made only when a subtask names providers (exclusions, holders).
    let mut index: Option<HashMap<PeerId, usize>> = None;
    // Providers chosen so far for each prefix key in this placement.
    let mut warm: HashMap<u64, Vec<usize>> = HashMap::new();
    let mut scores: Vec<f64> = Vec::new();
    let mut out: Vec<Option<Result<Assignment, PlacementError>>> = vec![None; subtasks.len()];
    for i in order {
        let t = &subtasks[i];
        if let std::collections::hash_map::Entry::Vacant(e) = groups.entry(t.model) {
            let g = Group::new(&t.model, providers, policy, &lanes);
            for &j in &g.members {
                member_of.entry(j).or_default().push(t.model);
            }
            e.insert(g);
        }
        let g = &groups[&t.model];
        // Every eligible provider's score, as if it held no prefix.
        let (a, b) = (t.prompt_tokens, t.max_tokens);
        let sum = a as f64 + b as f64;
        let (af, bf) = (a as f64, b as f64);
        scores.clear();
        scores.extend(
            g.free
                .iter()
                .zip(&g.rtt)
                .zip(&g.prefill_ms)
                .zip(&g.decode_ms)
                .zip(&g.weighted_price)
                .map(|((((f, r), p), d), w)| f + (r + af * p + bf * d) + w * sum / 1e6),
        );
        // Providers that hold the prefix score with the rest of the prompt only.
        let holders = holders(t, &warm, &mut index, providers);
        let finish_of =
            |k: usize, holds: bool| g.free[k] + g.rates(k).service_ms(prefill_tokens(t, holds), b);
        for &j in &holders {
            let k = g.position[j];
            if k != u32::MAX {
                let k = k as usize;
                scores[k] = finish_of(k, true) + g.weighted_price[k] * sum / 1e6;
            }
        }
        // Excluded providers do not score.
        if !t.exclude.is_empty() {
            let index = index.get_or_insert_with(|| peer_index(providers));
            for p in &t.exclude {
                if let Some(&j) = index.get(p)
                    && g.position[j] != u32::MAX
                {
                    scores[g.position[j] as usize] = f64::NAN;
                }
            }
        }
        let chosen = if let Some(k) = lowest(&scores, |k| {
            mix(
                policy.seed,
                i as u64,
                &providers[g.members[k]].peer.to_bytes(),
            )
        }) {
            let j = g.members[k];
            let finish = finish_of(k, holders.contains(&j));
            let free = lanes.take(j, providers[j].slots, finish) as f64;
            for m in &member_of[&j] {
                let g = groups.get_mut(m).expect("a provider's groups exist");
                let k = g.position[j] as usize;
                g.free[k] = free;
            }
            if let Some(x) = &t.prefix {
                let w = warm.entry(x.key).or_default();
                if !w.contains(&j) {
                    w.push(j);
                }
            }
            Some((j, finish))
        } else {
            None
        };
        out[i] = Some(outcome(i, t, providers, policy, chosen));
    }
    out.into_iter()
        .map(|o| o.expect("every subtask placed or refused"))
        .collect()
}

/// The position of the lowest score (NaN never is); among equals, the one whose `tie`
/// hash is lowest.
fn lowest(scores: &[f64], tie: impl Fn(usize) -> u64) -> Option<usize> {
    let best = scores
        .iter()
        .copied()
        .filter(|s| !s.is_nan())
        .fold(f64::INFINITY, f64::min);
    let mut pick: Option<(u64, usize)> = None;
    for (k, &s) in scores.iter().enumerate() {
        if s == best {
            let h = tie(k);
            if pick.is_none_or(|(p, _)| h < p) {
                pick = Some((h, k));
            }
        }
    }
    pick.map(|(_, k)| k)
}

/// The providers (by index) that hold subtask `t`'s prompt prefix: those its prefix was
/// placed on earlier in this placement, and those the dispatcher knows hold it.
fn holders(
    t: &Subtask,
    warm: &HashMap<u64, Vec<usize>>,
    index: &mut Option<HashMap<PeerId, usize>>,
    providers: &[ProviderView],
) -> Vec<usize> {
    let Some(x) = &t.prefix else {
        return Vec::new();
    };
    let mut h = warm.get(&x.key).cloned().unwrap_or_default();
    if !x.held_by.is_empty() {
        let index = index.get_or_insert_with(|| peer_index(providers));
        h.extend(x.held_by.iter().filter_map(|p| index.get(p)));
    }
    h
}

/// Subtask `i`'s entry of the result: the provider chosen and its expected finish, or why
/// none could be.
fn outcome(
    i: usize,
    t: &Subtask,
    providers: &[ProviderView],
    policy: &Policy,
    chosen: Option<(usize, f64)>,
) -> Result<Assignment, PlacementError> {
    match chosen {
        Some((j, finish)) => Ok(Assignment {
            subtask: i,
            provider: providers[j].peer,
            expected_ms: finish,
        }),
        None => Err(PlacementError::NoEligibleProvider {
            subtask: i,
            reason: explain(t, providers, policy),
        }),
    }
}

fn peer_index(providers: &[ProviderView]) -> HashMap<PeerId, usize> {
    let mut index = HashMap::with_capacity(providers.len());
    for (j, p) in providers.iter().enumerate().rev() {
        index.insert(p.peer, j);
    }
    index
}

fn explain(t: &Subtask, providers: &[ProviderView], policy: &Policy) -> String {
    let with_model = providers
        .iter()
        .filter(|p| p.models.contains(&t.model))
        .count();
    if providers.is_empty() {
        return "no providers are known".into();
    }
    if with_model == 0 && policy.pull_sizes.is_none() {
        return format!("no provider has model {} cached", t.model.short());
    }
    let in_region = providers
        .iter()
        .filter(|p| {
            policy
                .allowed_regions
                .as_ref()
                .is_none_or(|r| r.contains(&p.region))
        })
        .count();
    if in_region == 0 {
        return "no provider in the allowed regions".into();
    }
    "every provider with the model is quarantined, excluded, or out of the allowed regions".into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use beacon_proto::Keypair;
    use proptest::prelude::*;

    fn provider(i: usize, region: &str, models: Vec<Digest>) -> ProviderView {
        ProviderView {
            peer: Keypair::from_secret_bytes(&[i as u8 + 1; 32])
                .unwrap()
                .peer_id(),
            region: region.into(),
            models,
            free_memory: 8 << 30,
            slots: 4,
            busy: 0,
            rtt_ms: 10.0,
            decode_tps: HashMap::new(),
            default_tps: 50.0,
            prefill_tps: 1000.0,
            price_per_mtok: 1.0,
            quarantined: false,
        }
    }

    fn model(i: u8) -> Digest {
        Digest::of(&[i])
    }

    fn task(m: Digest, tokens: u32) -> Subtask {
        Subtask {
            model: m,
            prompt_tokens: tokens,
            max_tokens: 64,
            exclude: vec![],
            prefix: None,
        }
    }

    /// The cost term of a subtask's score on a provider of `price_per_mtok`.
    fn cost_of(policy: &Policy, price_per_mtok: f64, t: &Subtask) -> f64 {
        policy.cost_weight * price_per_mtok * (t.prompt_tokens as f64 + t.max_tokens as f64) / 1e6
    }

    /// Placement as first written: every (subtask, provider) pair scored one by one. The
    /// column-wise [`place`] must agree with it exactly.
    fn place_pairwise(
        subtasks: &[Subtask],
        providers: &[ProviderView],
        policy: &Policy,
    ) -> Vec<Result<Assignment, PlacementError>> {
        let lanes = Lanes::new(providers);
        let mut lanes: Vec<BinaryHeap<Reverse<u64>>> = providers
            .iter()
            .zip(&lanes.start)
            .map(|(p, &start)| (0..p.slots.min(4096)).map(|_| Reverse(start)).collect())
            .collect();
        let mut order: Vec<usize> = (0..subtasks.len()).collect();
        order.sort_by_key(|&i| {
            let t = &subtasks[i];
            (Reverse(t.prompt_tokens as u64 + 8 * t.max_tokens as u64), i)
        });
        let mut out = vec![None; subtasks.len()];
        let mut warm: std::collections::HashSet<(u64, usize)> = Default::default();
        for i in order {
            let t = &subtasks[i];
            let mut best: Option<(f64, u64, usize, f64)> = None;
            for (j, p) in providers.iter().enumerate() {
                if !eligible(t, p, policy) {
                    continue;
                }
                let free = lanes[j].peek().map(|r| r.0).unwrap_or(0) as f64;
                let holds = t
                    .prefix
                    .as_ref()
                    .is_some_and(|x| warm.contains(&(x.key, j)) || x.held_by.contains(&p.peer));
                let finish = free
                    + Rates::of(p, &t.model).service_ms(prefill_tokens(t, holds), t.max_tokens);
                let score = finish + cost_of(policy, p.price_per_mtok, t);
                let tie = mix(policy.seed, i as u64, &p.peer.to_bytes());
                if best.is_none_or(|(s, h, _, _)| score < s || (score == s && tie < h)) {
                    best = Some((score, tie, j, finish));
                }
            }
            let chosen = best.map(|(_, _, j, finish)| {
                lanes[j].pop();
                lanes[j].push(Reverse(finish.ceil() as u64));
                if let Some(x) = &t.prefix {
                    warm.insert((x.key, j));
                }
                (j, finish)
            });
            out[i] = Some(outcome(i, t, providers, policy, chosen));
        }
        out.into_iter().map(Option::unwrap).collect()
    }

    const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];

    fn arb_world() -> impl Strategy<Value = (Vec<Subtask>, Vec<ProviderView>, Policy)> {
        let providers = prop::collection::vec(
            (
                0usize..3,
                prop::collection::vec(0u8..3, 0..3),
                any::<bool>(),
                0u32..4,
                1u32..8,
                // Few distinct speeds, so that equal scores (ties) are common, as among
                // providers on the same hardware.
                prop::sample::select(vec![1.0f64, 20.0, 150.0]),
                prop::sample::select(vec![5.0f64, 50.0, 300.0]),
            ),
            0..12,
        );
        let tasks = prop::collection::vec(
            (
                0u8..3,
                1u32..2000,
                1u32..300,
                prop::option::of(0usize..12),
                prop::option::of((0u64..4, 0u32..2000, prop::option::of(0usize..12))),
            ),
            0..60,
        );
        let policy = (
            prop::option::of(prop::collection::btree_set(0usize..3, 0..3)),
            any::<bool>(),
            0.0f64..10.0,
            any::<u64>(),
        );
        (providers, tasks, policy).prop_map(|(ps, ts, (regions, pull, cost, seed))| {
            let providers: Vec<ProviderView> = ps
                .into_iter()
                .enumerate()
                .map(|(i, (r, ms, q, busy, slots, rtt, tps))| ProviderView {
                    quarantined: q && i % 2 == 0,
                    busy,
                    slots,
                    rtt_ms: rtt,
                    default_tps: tps,
                    free_memory: (i as u64 % 3) << 30,
                    ..provider(i, REGIONS[r], ms.into_iter().map(model).collect())
                })
                .collect();
            let subtasks = ts
                .into_iter()
                .map(|(m, p, o, ex, prefix)| Subtask {
                    model: model(m),
                    prompt_tokens: p,
                    max_tokens: o,
                    exclude: ex
                        .and_then(|e| providers.get(e))
                        .map(|p| vec![p.peer])
                        .unwrap_or_default(),
                    prefix: prefix.map(|(key, tokens, held)| Prefix {
                        key,
                        tokens,
                        held_by: held
                            .and_then(|h| providers.get(h))
                            .map(|p| vec![p.peer])
                            .unwrap_or_default(),
                    }),
                })
                .collect();
            let policy = Policy {
                allowed_regions: regions
                    .map(|s| s.into_iter().map(|r| REGIONS[r].to_string()).collect()),
                pull_sizes: pull.then(|| (0..3).map(|m| (model(m), 1u64 << 30)).collect()),
                cost_weight: cost,
                seed,
            };
            (subtasks, providers, policy)
        })
    }

    proptest! {
        #[test]
        fn never_violates_a_constraint((subtasks, providers, policy) in arb_world()) {
            let result = place(&subtasks, &providers, &policy);
            prop_assert_eq!(result.len(), subtasks.len());
            for (i, r) in result.iter().enumerate() {
                let any_eligible = providers.iter().any(|p| eligible(&subtasks[i], p, &policy));
                match r {
                    Ok(a) => {
                        prop_assert_eq!(a.subtask, i);
                        let p = providers.iter().find(|p| p.peer == a.provider).unwrap();
                        prop_assert!(eligible(&subtasks[i], p, &policy));
                        prop_assert!(!p.quarantined);
                        prop_assert!(!subtasks[i].exclude.contains(&p.peer));
                        if let Some(regions) = &policy.allowed_regions {
                            prop_assert!(regions.contains(&p.region));
                        }
                    }
                    Err(_) => prop_assert!(!any_eligible, "refused though a provider was eligible"),
                }
            }
        }

        #[test]
        fn agrees_with_scoring_every_pair((subtasks, providers, policy) in arb_world()) {
            prop_assert_eq!(place(&subtasks, &providers, &policy), place_pairwise(&subtasks, &providers, &policy));
        }

        #[test]
        fn deterministic_for_a_seed((subtasks, providers, policy) in arb_world()) {
            prop_assert_eq!(place(&subtasks, &providers, &policy), place(&subtasks, &providers, &policy));
        }

        #[test]
        fn uses_every_eligible_provider_under_load(n in 2usize..10, per_slot in 1usize..4, seed in any::<u64>()) {
            // n identical providers, enough work to fill every slot: each gets some.
            let m = model(0);
            let providers: Vec<_> = (0..n).map(|i| provider(i, "eu-west", vec![m])).collect();
            let slots: usize = providers.iter().map(|p| p.slots as usize).sum();
            let subtasks: Vec<_> = (0..slots * per_slot).map(|_| task(m, 500)).collect();
            let policy = Policy { seed, ..Policy::default() };
            let result = place(&subtasks, &providers, &policy);
            for p in &providers {
                let count = result.iter().filter(|r| r.as_ref().unwrap().provider == p.peer).count();
                prop_assert_eq!(count, 4 * per_slot, "equal providers get equal shares");
            }
        }
    }

    #[test]
    fn prefers_the_faster_nearer_provider_and_spills_over() {
        let m = model(0);
        let mut fast = provider(0, "eu-west", vec![m]);
        fast.default_tps = 200.0;
        fast.slots = 1;
        let slow = ProviderView {
            rtt_ms: 150.0,
            default_tps: 20.0,
            slots: 1,
            ..provider(1, "us-east", vec![m])
        };
        let r = place(
            &[task(m, 100)],
            &[slow.clone(), fast.clone()],
            &Policy::default(),
        );
        assert_eq!(r[0].as_ref().unwrap().provider, fast.peer);
        // With many subtasks the slow provider takes some once the fast one is loaded.
        let many: Vec<_> = (0..20).map(|_| task(m, 100)).collect();
        let r = place(&many, &[slow.clone(), fast.clone()], &Policy::default());
        let on_slow = r
            .iter()
            .filter(|a| a.as_ref().unwrap().provider == slow.peer)
            .count();
        assert!(on_slow > 0 && on_slow < 10, "{on_slow}");
    }

    /// A model and two idle, equal providers of it.
    fn two_equal() -> (Digest, ProviderView, ProviderView) {
        let m = model(0);
        (
            m,
            provider(0, "eu-west", vec![m]),
            provider(1, "eu-west", vec![m]),
        )
    }

    fn sharing(m: Digest, key: u64, held_by: Vec<PeerId>) -> Subtask {
        Subtask {
            prefix: Some(Prefix {
                key,
                tokens: 1900,
                held_by,
            }),
            ..task(m, 2000)
        }
    }

    #[test]
    fn work_goes_where_its_prefix_is_cached_unless_that_is_slower() {
        let (m, a, b) = two_equal();
        // Idle and equal: without a prefix, seeds spread single subtasks over both...
        let on_b = (0..64)
            .filter(|&seed| {
                let policy = Policy {
                    seed,
                    ..Policy::default()
                };
                let r = place(&[task(m, 2000)], &[a.clone(), b.clone()], &policy);
                r[0].as_ref().unwrap().provider == b.peer
            })
            .count();
        assert!(on_b > 0 && on_b < 64, "{on_b}");
        // ...with one that b holds, every seed sends it to b;
        for seed in 0..64 {
            let policy = Policy {
                seed,
                ..Policy::default()
            };
            let t = sharing(m, 7, vec![b.peer]);
            let r = place(&[t], &[a.clone(), b.clone()], &policy);
            assert_eq!(r[0].as_ref().unwrap().provider, b.peer, "seed {seed}");
        }
        // but not when b is so busy that a prefills the whole prompt sooner.
        let busy = ProviderView {
            busy: 40,
            ..b.clone()
        };
        let r = place(
            &[sharing(m, 7, vec![b.peer])],
            &[a.clone(), busy],
            &Policy::default(),
        );
        assert_eq!(r[0].as_ref().unwrap().provider, a.peer);
    }

    #[test]
    fn subtasks_on_one_text_gather_on_one_provider() {
        let (m, a, b) = two_equal();
        // Two texts, four subtasks each (as many as a provider's slots), no provider holding
        // either yet: each text's subtasks end up together, and the texts on different
        // providers, for every seed. Without prefixes they scatter.
        let groups = |prefixed: bool, seed: u64| {
            let subtasks: Vec<Subtask> = (0..8u64)
                .map(|i| {
                    let mut t = sharing(m, i / 4, vec![]);
                    if !prefixed {
                        t.prefix = None;
                    }
                    t
                })
                .collect();
            let policy = Policy {
                seed,
                ..Policy::default()
            };
            let r = place(&subtasks, &[a.clone(), b.clone()], &policy);
            let to = |i: usize| r[i].as_ref().unwrap().provider;
            [0, 4].map(|g| (g..g + 4).map(to).collect::<BTreeSet<_>>())
        };
        let mut scattered = 0;
        for seed in 0..32 {
            let [g0, g1] = groups(true, seed);
            assert_eq!((g0.len(), g1.len()), (1, 1), "seed {seed}");
            assert_ne!(g0, g1, "seed {seed}");
            let [g0, g1] = groups(false, seed);
            scattered += usize::from(g0.len() > 1 || g1.len() > 1);
        }
        assert!(scattered > 0, "without prefixes the test shows nothing");
    }

    #[test]
    fn residency_pins_and_explains() {
        let m = model(0);
        let eu = provider(0, "eu-west", vec![m]);
        let us = provider(1, "us-east", vec![m]);
        let policy = Policy {
            allowed_regions: Some(["eu-west".to_string()].into()),
            ..Policy::default()
        };
        let r = place(
            &[task(m, 10), task(m, 10)],
            &[us.clone(), eu.clone()],
            &policy,
        );
        assert!(r.iter().all(|a| a.as_ref().unwrap().provider == eu.peer));
        let policy = Policy {
            allowed_regions: Some(["ap-south".to_string()].into()),
            ..Policy::default()
        };
        let r = place(&[task(m, 10)], &[us, eu], &policy);
        assert!(
            matches!(&r[0], Err(PlacementError::NoEligibleProvider { reason, .. }) if reason.contains("allowed regions"))
        );
        let r = place(&[task(model(2), 10)], &[], &Policy::default());
        assert!(r[0].is_err());
    }
}
