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
    service_ms_cached(t, p, 0)
}

/// Expected milliseconds of `t` on `p` once it starts, when `cached` of its prompt tokens
/// are already in `p`'s KV cache.
fn service_ms_cached(t: &Subtask, p: &ProviderView, cached: u32) -> f64 {
    let decode = p
        .decode_tps
        .get(&t.model)
        .copied()
        .unwrap_or(p.default_tps)
        .max(0.1);
    let prefill = p.prefill_tps.max(1.0);
    let prefill_tokens = t.prompt_tokens.saturating_sub(cached.min(t.prompt_tokens));
    p.rtt_ms + prefill_tokens as f64 / prefill * 1000.0 + t.max_tokens as f64 / decode * 1000.0
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

/// Places every subtask; the result has one entry per subtask, in subtask order.
pub fn place(
    subtasks: &[Subtask],
    providers: &[ProviderView],
    policy: &Policy,
) -> Vec<Result<Assignment, PlacementError>> {
    // Lanes per provider: a min-heap of times (ms) at which each lane is free. A busy
    // provider's lanes start later, by the work already there spread over its slots.
    let mut lanes: Vec<BinaryHeap<Reverse<u64>>> = providers
        .iter()
        .map(|p| {
            let typical = 1000.0 * 256.0 / p.default_tps.max(0.1);
            let queued_ms = p.busy as f64 * typical / p.slots.max(1) as f64;
            let start = (p.rtt_ms + queued_ms).max(0.0) as u64;
            (0..p.slots.min(4096)).map(|_| Reverse(start)).collect()
        })
        .collect();
    let peer_bytes: Vec<Vec<u8>> = providers.iter().map(|p| p.peer.to_bytes()).collect();

    // Eligible providers per distinct (model, exclusions) are mostly shared: cache by model
    // and only filter exclusions per subtask.
    let mut by_model: HashMap<Digest, Vec<usize>> = HashMap::new();
    let mut order: Vec<usize> = (0..subtasks.len()).collect();
    order.sort_by_key(|&i| {
        let t = &subtasks[i];
        (Reverse(t.prompt_tokens as u64 + 8 * t.max_tokens as u64), i)
    });
    let mut out: Vec<Option<Result<Assignment, PlacementError>>> = vec![None; subtasks.len()];
    // (prefix key, provider index) pairs chosen so far in this placement.
    let mut warm: std::collections::HashSet<(u64, usize)> = Default::default();
    for i in order {
        let t = &subtasks[i];
        let candidates = by_model.entry(t.model).or_insert_with(|| {
            let probe = Subtask {
                exclude: Vec::new(),
                ..t.clone()
            };
            (0..providers.len())
                .filter(|&j| eligible(&probe, &providers[j], policy))
                .collect()
        });
        let mut best: Option<(f64, u64, usize, f64)> = None;
        for &j in candidates.iter() {
            let p = &providers[j];
            if t.exclude.contains(&p.peer) {
                continue;
            }
            let free = lanes[j].peek().map(|r| r.0).unwrap_or(0) as f64;
            let cached = match &t.prefix {
                Some(x) if warm.contains(&(x.key, j)) || x.held_by.contains(&p.peer) => x.tokens,
                _ => 0,
            };
            let finish = free + service_ms_cached(t, p, cached);
            let cost = policy.cost_weight
                * p.price_per_mtok
                * (t.prompt_tokens as f64 + t.max_tokens as f64)
                / 1e6;
            let score = finish + cost;
            let tie = mix(policy.seed, i as u64, &peer_bytes[j]);
            let better = match best {
                None => true,
                Some((s, h, _, _)) => score < s || (score == s && tie < h),
            };
            if better {
                best = Some((score, tie, j, finish));
            }
        }
        out[i] = Some(match best {
            Some((_, _, j, finish)) => {
                lanes[j].pop();
                lanes[j].push(Reverse(finish.ceil() as u64));
                if let Some(x) = &t.prefix {
                    warm.insert((x.key, j));
                }
                Ok(Assignment {
                    subtask: i,
                    provider: providers[j].peer,
                    expected_ms: finish,
                })
            }
            None => Err(PlacementError::NoEligibleProvider {
                subtask: i,
                reason: explain(t, providers, policy),
            }),
        });
    }
    out.into_iter()
        .map(|o| o.expect("every subtask placed or refused"))
        .collect()
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

    const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];

    fn arb_world() -> impl Strategy<Value = (Vec<Subtask>, Vec<ProviderView>, Policy)> {
        let providers = prop::collection::vec(
            (
                0usize..3,
                prop::collection::vec(0u8..3, 0..3),
                any::<bool>(),
                0u32..4,
                1u32..8,
                1.0f64..200.0,
                5.0f64..300.0,
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
