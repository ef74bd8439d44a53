//! The newest advert sequence number accepted from each source, bounded. An entry is
//! forgotten once its advert would be stale anyway (no replay of anything older can pass
//! the freshness check then), so a node whose clock once ran ahead is heard again after
//! that (review L3), and a flood of fresh identities cannot grow the table without bound
//! (review H3): when it holds `max` sources with fresh adverts, new sources are turned away
//! until some go quiet; known ones keep updating.

use std::collections::HashMap;

use beacon_proto::{AdvertPolicy, PeerId};

pub(crate) struct SeqTable {
    /// Source → (newest sequence accepted, when, in ms since the epoch).
    seen: HashMap<PeerId, (u64, u64)>,
    /// How long a sequence number is remembered: an advert's maximum age plus clock skew.
    keep_ms: u64,
    max: usize,
    /// When the table was last swept for quiet sources: at most once a second, so a
    /// flood against a full table costs a lookup per advert, not a sweep.
    swept_ms: u64,
}

/// Sources remembered at most (a network's honest providers are far fewer).
pub(crate) const MAX_SOURCES: usize = 50_000;

impl SeqTable {
    pub(crate) fn new(policy: AdvertPolicy, max: usize) -> SeqTable {
        SeqTable {
            seen: HashMap::new(),
            keep_ms: policy.max_age_ms.saturating_add(policy.max_skew_ms),
            max,
            swept_ms: 0,
        }
    }

    /// The sequence an advert from `source` must be newer than, if one is remembered.
    pub(crate) fn last(&self, source: &PeerId, now_ms: u64) -> Option<u64> {
        self.seen
            .get(source)
            .filter(|(_, at)| now_ms.saturating_sub(*at) <= self.keep_ms)
            .map(|(seq, _)| *seq)
    }

    /// Records an accepted advert; false when the table is full of fresh sources and
    /// `source` is not one of them.
    pub(crate) fn record(&mut self, source: PeerId, seq: u64, now_ms: u64) -> bool {
        if !self.seen.contains_key(&source) && self.seen.len() >= self.max {
            if now_ms.saturating_sub(self.swept_ms) >= 1_000 {
                self.swept_ms = now_ms;
                let keep = self.keep_ms;
                self.seen
                    .retain(|_, (_, at)| now_ms.saturating_sub(*at) <= keep);
            }
            if self.seen.len() >= self.max {
                return false;
            }
        }
        self.seen.insert(source, (seq, now_ms));
        true
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.seen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use beacon_proto::Keypair;

    fn policy() -> AdvertPolicy {
        AdvertPolicy {
            max_age_ms: 120_000,
            max_skew_ms: 30_000,
        }
    }

    /// Review L3: a sequence from a clock that ran ahead was remembered for ever, so the
    /// node's later (correct) adverts were "not newer" until every peer restarted.
    #[test]
    fn a_sequence_is_forgotten_once_its_advert_would_be_stale() {
        let mut t = SeqTable::new(policy(), 10);
        let p = Keypair::generate().peer_id();
        assert!(t.record(p, u64::MAX / 2, 1_000));
        assert_eq!(t.last(&p, 1_000 + 150_000), Some(u64::MAX / 2));
        assert_eq!(t.last(&p, 1_000 + 150_001), None);
    }

    /// Review H3: a flood of fresh identities filled the table without bound. Full of
    /// fresh sources it turns new ones away while known ones keep updating; quiet ones
    /// make room again.
    #[test]
    fn a_flood_of_identities_is_bounded_and_known_sources_keep_updating() {
        let mut t = SeqTable::new(policy(), 100);
        let honest = Keypair::generate().peer_id();
        assert!(t.record(honest, 1, 0));
        let flood: Vec<PeerId> = (0..200).map(|_| Keypair::generate().peer_id()).collect();
        let accepted = flood.iter().filter(|p| t.record(**p, 1, 1_000)).count();
        assert_eq!(accepted, 99);
        assert_eq!(t.len(), 100);
        assert!(t.record(honest, 2, 2_000));
        assert_eq!(t.last(&honest, 2_000), Some(2));
        // The flood goes quiet: past the keep time its entries make room.
        assert!(t.record(flood[150], 1, 1_000 + 150_001));
        assert_eq!(t.len(), 2);
    }
}
