//! Seeded sampling that a second machine can replay: the rule every provider samples by
//! when a request has a temperature, and the rule an auditor checks a sampled answer with.
//!
//! The distribution is the model's next-token logits after the output grammar, filtered
//! like llama.cpp's chain (top-k, then top-p and min-p on the untempered probabilities).
//! Among what is left, the token at generated position `k` is the one with the highest
//! `logit + T · g`, where `g = gumbel(seed, k, token)` is Gumbel noise fixed by the request's
//! seed (which the router chooses). That is a sample from the tempered distribution (the
//! Gumbel-max trick), and greedy decoding is its `T = 0` limit.
//!
//! An auditor recomputes every `logit + T · g` from its own logits and measures how far the
//! claimed token falls short of the best, in logits ([`Choice::shortfall`]): 0 for an
//! honest token, a little more where another machine's logits differ (as for greedy
//! near-ties), and typically about `T` or more for a token drawn with another seed or
//! temperature, at every position the model is unsure. This is Token-DiFR's idea
//! (arXiv 2511.20621): with shared randomness, sampled tokens are as checkable as greedy.

use crate::Sampling;

/// Largest Gumbel noise [`gumbel`] returns (from the largest uniform below 1).
pub const GUMBEL_MAX: f64 = 36.7;

/// Gumbel noise for `token` at generated position `position` of a request sampled with
/// `seed`: `-ln(-ln u)` with `u` in (0, 1) from splitmix64 of the three (fixed, portable,
/// no state).
pub fn gumbel(seed: u64, position: u32, token: u32) -> f64 {
    let mut z = seed
        ^ (u64::from(position).wrapping_add(1)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ (u64::from(token).wrapping_add(1)).wrapping_mul(0xd1b5_4a32_d192_ed03);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    // (0, 1): never 0, never 1.
    let u = ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -(-u.ln()).ln()
}

/// The seeded choice at one position: every allowed token's key `logit + T · g`.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    /// Allowed tokens and their keys, in token-id order.
    keyed: Vec<(u32, f64)>,
    best: (u32, f64),
}

impl Choice {
    /// The choice among `(token, logit)` candidates (tokens the grammar forbids carry a
    /// non-finite logit and are left out) at generated position `position`, with `seed`
    /// (the request's) and the filters and temperature of `s`. `None` when no candidate is
    /// allowed.
    pub fn new(candidates: &[(u32, f32)], s: &Sampling, seed: u64, position: u32) -> Option<Self> {
        let mut kept: Vec<(u32, f64)> = candidates
            .iter()
            .filter(|(_, l)| l.is_finite())
            .map(|&(id, l)| (id, f64::from(l)))
            .collect();
        if kept.is_empty() {
            return None;
        }
        let max = kept
            .iter()
            .map(|(_, l)| *l)
            .fold(f64::NEG_INFINITY, f64::max);
        let (top_p, min_p) = (f64::from(s.top_p), f64::from(s.min_p));
        let use_top_p = top_p.is_finite() && top_p < 1.0;
        let use_min_p = min_p.is_finite() && min_p > 0.0;
        if s.top_k > 0 || use_top_p || use_min_p {
            // Highest logit first (ties: lower id first), for the filters.
            kept.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            if s.top_k > 0 {
                kept.truncate((s.top_k as usize).max(1));
            }
            let weights: Vec<f64> = kept.iter().map(|(_, l)| (l - max).exp()).collect();
            if use_top_p {
                let total: f64 = weights.iter().sum();
                let mut acc = 0.0;
                let mut n = kept.len();
                for (i, w) in weights.iter().enumerate() {
                    acc += w / total;
                    if acc >= top_p {
                        n = i + 1;
                        break;
                    }
                }
                kept.truncate(n.max(1));
            }
            if use_min_p {
                // Relative to the most likely token, whose weight is 1.
                let n = weights
                    .iter()
                    .take(kept.len())
                    .take_while(|w| **w >= min_p)
                    .count();
                kept.truncate(n.max(1));
            }
            kept.sort_by_key(|(id, _)| *id);
        }
        let t = f64::from(s.temperature);
        let t = if t.is_finite() && t > 0.0 { t } else { 1.0 };
        let mut best = (kept[0].0, f64::NEG_INFINITY);
        for (id, l) in kept.iter_mut() {
            *l += t * gumbel(seed, position, *id);
            if *l > best.1 {
                best = (*id, *l);
            }
        }
        Some(Choice { keyed: kept, best })
    }

    /// The chosen token.
    pub fn token(&self) -> u32 {
        self.best.0
    }

    /// How far `token`'s key falls short of the chosen one's, in logits (0 for the choice
    /// itself); `None` when the filters leave `token` out.
    pub fn shortfall(&self, token: u32) -> Option<f64> {
        let i = self
            .keyed
            .binary_search_by_key(&token, |(id, _)| *id)
            .ok()?;
        Some(self.best.1 - self.keyed[i].1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sampling(t: f32, seed: u64) -> Sampling {
        Sampling {
            temperature: t,
            seed: Some(seed),
            ..Sampling::default()
        }
    }

    #[test]
    fn another_seed_is_seen_and_the_distribution_is_followed() {
        // Two tokens at logits 0 and ln 3: a sample picks the second 3 times in 4.
        let cands = vec![(0, 0.0f32), (1, 3f32.ln())];
        let picks = |seed: u64| -> Vec<u32> {
            (0..4000)
                .map(|k| {
                    Choice::new(&cands, &sampling(1.0, seed), seed, k)
                        .unwrap()
                        .token()
                })
                .collect()
        };
        let ours = picks(42);
        let ones = ours.iter().filter(|t| **t == 1).count();
        assert!((2850..3150).contains(&ones), "{ones}");
        // Claims drawn with another seed fall short of the replayed choice about as often
        // as they differ from it.
        let theirs = picks(43);
        let short = (0..4000u32)
            .filter(|k| {
                let c = Choice::new(&cands, &sampling(1.0, 42), 42, *k).unwrap();
                c.shortfall(theirs[*k as usize]).unwrap() > 0.0
            })
            .count();
        assert!(short > 1000, "{short}");
    }

    #[test]
    fn filters_follow_llama_cpp_order() {
        let cands = vec![(0, 0.0), (1, 5.0), (2, 4.0), (3, f32::NEG_INFINITY)];
        let top1 = Sampling {
            top_k: 1,
            ..sampling(1.0, 1)
        };
        let c = Choice::new(&cands, &top1, 1, 0).unwrap();
        assert_eq!(c.token(), 1);
        assert!(c.shortfall(2).is_none() && c.shortfall(3).is_none());
        let p = Sampling {
            top_p: 0.5,
            ..sampling(1.0, 1)
        };
        assert!(
            Choice::new(&cands, &p, 1, 0)
                .unwrap()
                .shortfall(2)
                .is_none()
        );
        let m = Sampling {
            min_p: 0.3,
            ..sampling(1.0, 1)
        };
        let c = Choice::new(&cands, &m, 1, 0).unwrap();
        assert!(c.shortfall(2).is_some() && c.shortfall(0).is_none());
        assert!(Choice::new(&[(0, f32::NEG_INFINITY)], &sampling(1.0, 1), 1, 0).is_none());
    }

    proptest! {
        #[test]
        fn the_choice_is_the_best_key(logits in proptest::collection::vec(-20.0f32..20.0, 1..64), t in 0.05f32..2.0, seed in any::<u64>(), k in any::<u32>()) {
            let cands: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, l)| (i as u32 * 3, *l)).collect();
            let c = Choice::new(&cands, &sampling(t, seed), seed, k).unwrap();
            prop_assert_eq!(c.shortfall(c.token()), Some(0.0));
            for (id, _) in &cands {
                prop_assert!(c.shortfall(*id).unwrap() >= 0.0);
            }
            let g = gumbel(seed, k, 7);
            prop_assert!(g.is_finite() && g < GUMBEL_MAX);
        }
    }
}
