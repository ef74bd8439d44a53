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
/// The soonest a source's next advert is accepted after its last one (honest providers
/// advertise every second at most): a source that signs a new sequence number for every
/// message cannot make the network carry more than this many a second (review H3).
pub(crate) const MIN_INTERVAL_MS: u64 = 500;

/// Why an advert that validated is not taken.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The table is full of fresh sources and this one is new.
    Full,
    /// The source's last advert came less than [`MIN_INTERVAL_MS`] ago.
    TooSoon,
}

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

    /// Whether `source` advertised less than [`MIN_INTERVAL_MS`] ago: checked before an
    /// advert is decoded or its signature verified, so a source that floods costs a
    /// lookup per message, not a verification.
    pub(crate) fn too_soon(&self, source: &PeerId, now_ms: u64) -> bool {
        self.seen
            .get(source)
            .is_some_and(|(_, at)| now_ms.saturating_sub(*at) < MIN_INTERVAL_MS && now_ms >= *at)
    }

    /// Records an accepted advert, unless the table is full of fresh sources and `source`
    /// is not one of them, or `source` advertised less than [`MIN_INTERVAL_MS`] ago.
    pub(crate) fn record(&mut self, source: PeerId, seq: u64, now_ms: u64) -> Result<(), Refused> {
        if self.too_soon(&source, now_ms) {
            return Err(Refused::TooSoon);
        }
        if !self.seen.contains_key(&source) && self.seen.len() >= self.max {
            if now_ms.saturating_sub(self.swept_ms) >= 1_000 {
                self.swept_ms = now_ms;
                let keep = self.keep_ms;
                self.seen
                    .retain(|_, (_, at)| now_ms.saturating_sub(*at) <= keep);
            }
            if self.seen.len() >= self.max {
                return Err(Refused::Full);
            }
        }
        self.seen.insert(source, (seq, now_ms));
        Ok(())
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
        assert!(t.record(p, u64::MAX / 2, 1_000).is_ok());
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
        assert!(t.record(honest, 1, 0).is_ok());
        let flood: Vec<PeerId> = (0..200).map(|_| Keypair::generate().peer_id()).collect();
        let accepted = flood
            .iter()
            .filter(|p| t.record(**p, 1, 1_000).is_ok())
            .count();
        assert_eq!(accepted, 99);
        assert_eq!(t.len(), 100);
        assert!(t.record(honest, 2, 2_000).is_ok());
        assert_eq!(t.last(&honest, 2_000), Some(2));
        // The flood goes quiet: past the keep time its entries make room.
        assert!(t.record(flood[150], 1, 1_000 + 150_001).is_ok());
        assert_eq!(t.len(), 2);
        assert_eq!(t.record(flood[151], 1, 1_000), Ok(()), "room again");
    }

    /// Review H3: a source could sign a new sequence number for every message and have
    /// the network carry all of them. Its next advert waits `MIN_INTERVAL_MS`.
    #[test]
    fn a_source_advertises_at_most_twice_a_second() {
        let mut t = SeqTable::new(policy(), 10);
        let spammer = Keypair::generate().peer_id();
        let accepted = (0..1_000u64)
            .filter(|i| t.record(spammer, i + 1, 10_000 + i).is_ok())
            .count();
        assert_eq!(accepted, 2, "1,000 adverts in a second");
        assert_eq!(t.record(spammer, 2_000, 10_999), Err(Refused::TooSoon));
        // An honest provider's adverts, seconds apart, all pass.
        let honest = Keypair::generate().peer_id();
        for i in 0..10u64 {
            assert_eq!(t.record(honest, i + 1, 20_000 + i * 2_000), Ok(()));
        }
    }
}
