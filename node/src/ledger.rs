//! The served-request ledger: one signed [`Receipt`] per answered data-plane request, in a
//! sled database of its own (`<data>/ledger`), keyed by finish time so recent receipts and
//! totals are cheap to read. Beside each receipt the provider keeps the requester's signed
//! countersignature when it sends one, so both sides hold proof of the work for settlement.

use std::path::Path;

use beacon_proto::{Countersignature, Id, Keypair, PeerId, Receipt, Signed, Wire};
use serde::Serialize;

/// Ledger failures.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger database: {0}")]
    Db(#[from] sled::Error),
    #[error(transparent)]
    Proto(#[from] beacon_proto::ProtoError),
    #[error("countersignature refused: {0}")]
    Countersignature(String),
}

/// Cloneable handle to the ledger.
#[derive(Clone)]
pub struct Ledger {
    tree: sled::Tree,
    /// request id → key of its receipt in `tree`.
    by_request: sled::Tree,
    /// request id → the requester's signed [`Countersignature`].
    countersigned: sled::Tree,
    /// The running [`Totals`] (review M6: they were summed, and every receipt verified,
    /// on each read).
    meta: sled::Tree,
    /// Receipts kept at most; the oldest go first.
    max_receipts: u64,
}

/// Sums over every receipt this ledger recorded (pruned ones too).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Totals {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Receipts the requester countersigned.
    pub countersigned: u64,
    /// Receipts kept now (the oldest are pruned past the ledger's limit).
    pub kept: u64,
}

/// Receipts a ledger keeps unless told otherwise (a few hundred MB at most): any peer can
/// add one per request, so the ledger may not grow without bound (review M6).
pub const MAX_RECEIPTS: u64 = 1_000_000;

const TOTALS: &[u8] = b"totals";

impl Ledger {
    pub fn open(dir: &Path) -> Result<Ledger, LedgerError> {
        Self::open_keeping(dir, MAX_RECEIPTS)
    }

    /// A ledger that keeps at most `max_receipts` receipts.
    pub fn open_keeping(dir: &Path, max_receipts: u64) -> Result<Ledger, LedgerError> {
        let db = sled::open(dir)?;
        let ledger = Ledger {
            tree: db.open_tree("receipts")?,
            by_request: db.open_tree("receipts_by_request")?,
            countersigned: db.open_tree("countersigned")?,
            meta: db.open_tree("meta")?,
            max_receipts: max_receipts.max(1),
        };
        // A ledger written before running totals: sum it once.
        if ledger.meta.get(TOTALS)?.is_none() {
            let t = ledger.sum()?;
            ledger.meta.insert(TOTALS, encode_totals(&t))?;
        }
        Ok(ledger)
    }

    /// Signs and stores a receipt; past the limit, the oldest receipts go.
    pub fn record(&self, key: &Keypair, receipt: &Receipt) -> Result<Signed<Receipt>, LedgerError> {
        let signed = Signed::sign(key, receipt)?;
        let k = Self::key(receipt.finished_ms, receipt.request_id);
        let replaced = self.tree.insert(k.as_slice(), signed.encode()?)?.is_some();
        self.by_request
            .insert(receipt.request_id.0.to_be_bytes(), k)?;
        let t = self.update(|t| {
            t.requests += 1;
            t.prompt_tokens += u64::from(receipt.usage.prompt_tokens);
            t.completion_tokens += u64::from(receipt.usage.completion_tokens);
            t.kept += u64::from(!replaced);
        })?;
        if t.kept > self.max_receipts {
            self.prune(t.kept - self.max_receipts)?;
        }
        Ok(signed)
    }

    /// Removes the `n` oldest receipts and what refers to them.
    fn prune(&self, n: u64) -> Result<(), LedgerError> {
        let mut removed = 0;
        for item in self.tree.iter().take(n as usize) {
            let (k, _) = item?;
            if self.tree.remove(&k)?.is_some() {
                removed += 1;
            }
            if let Some(id) = k.get(8..24) {
                self.by_request.remove(id)?;
                self.countersigned.remove(id)?;
            }
        }
        self.update(|t| t.kept = t.kept.saturating_sub(removed))?;
        Ok(())
    }

    /// Applies `f` to the running totals atomically; returns the new totals.
    fn update(&self, f: impl Fn(&mut Totals)) -> Result<Totals, LedgerError> {
        let new = self.meta.update_and_fetch(TOTALS, |old| {
            let mut t = old.and_then(decode_totals).unwrap_or_default();
            f(&mut t);
            Some(encode_totals(&t))
        })?;
        Ok(new.as_deref().and_then(decode_totals).unwrap_or_default())
    }

    /// Keeps the requester's countersignature of a receipt, after checking that `from`
    /// signed it, that it names this provider (`me`), and that it matches the receipt of
    /// the same request: same requester, result, model and usage.
    pub fn countersign(
        &self,
        from: &PeerId,
        me: &PeerId,
        signed: &Signed<Countersignature>,
    ) -> Result<(), LedgerError> {
        let refuse = |why: &str| LedgerError::Countersignature(why.to_string());
        let c = signed.verify_from(from)?;
        if c.provider != *me {
            return Err(refuse("it names another provider"));
        }
        let id = c.request_id.0.to_be_bytes();
        let key = self
            .by_request
            .get(id)?
            .ok_or_else(|| refuse("no receipt for that request"))?;
        let bytes = self
            .tree
            .get(key)?
            .ok_or_else(|| refuse("no receipt for that request"))?;
        let r = Signed::<Receipt>::decode(&bytes)?.verify()?;
        if r.requester != *from
            || r.result_digest != c.result_digest
            || r.model_digest != c.model_digest
            || r.usage != c.usage
        {
            return Err(refuse("it does not match the receipt"));
        }
        if self.countersigned.insert(id, signed.encode()?)?.is_none() {
            self.update(|t| t.countersigned += 1)?;
        }
        Ok(())
    }

    /// The requester's countersignature of a request's receipt, if it sent one.
    pub fn countersignature(&self, request: Id) -> Option<Signed<Countersignature>> {
        let bytes = self.countersigned.get(request.0.to_be_bytes()).ok()??;
        Signed::<Countersignature>::decode(&bytes).ok()
    }

    fn key(ms: u64, id: Id) -> Vec<u8> {
        let mut k = ms.to_be_bytes().to_vec();
        k.extend_from_slice(&id.0.to_be_bytes());
        k
    }

    /// The newest `limit` receipts, newest first, each checked against its signature.
    pub fn recent(&self, limit: usize) -> Result<Vec<Signed<Receipt>>, LedgerError> {
        let mut out = Vec::new();
        for item in self.tree.iter().rev().take(limit) {
            let (_, v) = item?;
            let signed = Signed::<Receipt>::decode(&v)?;
            signed.verify()?;
            out.push(signed);
        }
        Ok(out)
    }

    /// The running totals: a read, not a sum.
    pub fn totals(&self) -> Result<Totals, LedgerError> {
        Ok(self
            .meta
            .get(TOTALS)?
            .as_deref()
            .and_then(decode_totals)
            .unwrap_or_default())
    }

    /// Sums the receipts kept (once, for a ledger written before running totals).
    fn sum(&self) -> Result<Totals, LedgerError> {
        let mut t = Totals::default();
        for item in self.tree.iter() {
            let (_, v) = item?;
            let r = Signed::<Receipt>::decode(&v)?.verify()?;
            t.requests += 1;
            t.kept += 1;
            t.prompt_tokens += u64::from(r.usage.prompt_tokens);
            t.completion_tokens += u64::from(r.usage.completion_tokens);
        }
        t.countersigned = self.countersigned.len() as u64;
        Ok(t)
    }

    pub fn flush(&self) -> Result<(), LedgerError> {
        self.tree.flush()?;
        Ok(())
    }
}

fn encode_totals(t: &Totals) -> Vec<u8> {
    serde_json::to_vec(t).unwrap_or_default()
}

fn decode_totals(bytes: &[u8]) -> Option<Totals> {
    serde_json::from_slice(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use beacon_proto::{Digest, Timings, Usage};

    /// Receipt `i`, for a fresh requester, finished at `1000 + i` ms.
    fn receipt(i: u64, prompt_tokens: u32, completion_tokens: u32) -> Receipt {
        Receipt {
            request_id: Id(i as u128),
            job_id: None,
            requester: Keypair::generate().peer_id(),
            request_digest: Digest::of(b"req"),
            result_digest: Digest::of(b"res"),
            model_digest: Digest::of(b"model"),
            usage: Usage {
                prompt_tokens,
                completion_tokens,
                cached_prompt_tokens: 0,
            },
            timings: Timings::default(),
            finished_ms: 1000 + i,
        }
    }

    #[test]
    fn receipts_are_signed_ordered_and_summed() {
        let dir = tempfile::tempdir().unwrap();
        let key = Keypair::generate();
        let ledger = Ledger::open(dir.path()).unwrap();
        for i in 0..3u64 {
            ledger.record(&key, &receipt(i, 10, i as u32)).unwrap();
        }
        let recent = ledger.recent(2).unwrap();
        assert_eq!(recent.len(), 2);
        assert_eq!(recent[0].verify().unwrap().request_id, Id(2));
        assert_eq!(recent[0].signer_peer_id(), key.peer_id());
        drop(ledger);
        let ledger = Ledger::open(dir.path()).unwrap();
        assert_eq!(
            ledger.totals().unwrap(),
            Totals {
                requests: 3,
                prompt_tokens: 30,
                completion_tokens: 3,
                countersigned: 0,
                kept: 3,
            }
        );
    }

    /// Review M6: any peer grows the ledger by a receipt per request (max_tokens = 1), and
    /// every read of the totals verified every receipt. Totals are kept as they change and
    /// the oldest receipts go past the limit; the totals still count them.
    #[test]
    fn the_ledger_keeps_running_totals_and_a_bounded_number_of_receipts() {
        let dir = tempfile::tempdir().unwrap();
        let key = Keypair::generate();
        let ledger = Ledger::open_keeping(dir.path(), 10).unwrap();
        for i in 0..25u64 {
            ledger.record(&key, &receipt(i, 2, 1)).unwrap();
        }
        let t = ledger.totals().unwrap();
        assert_eq!((t.requests, t.prompt_tokens, t.kept), (25, 50, 10));
        assert_eq!(ledger.tree.len(), 10);
        assert_eq!(ledger.by_request.len(), 10);
        // The newest are the ones kept.
        assert_eq!(
            ledger.recent(1).unwrap()[0].verify().unwrap().request_id,
            Id(24)
        );
        assert!(
            ledger
                .by_request
                .get(0u128.to_be_bytes())
                .unwrap()
                .is_none()
        );
        drop(ledger);
        assert_eq!(
            Ledger::open_keeping(dir.path(), 10)
                .unwrap()
                .totals()
                .unwrap(),
            t
        );
    }

    /// Only the requester of a receipt can countersign it, only for this provider, and
    /// only for exactly what the receipt records.
    #[test]
    fn countersignatures_must_match_their_receipt() {
        let dir = tempfile::tempdir().unwrap();
        let (me, router, other) = (
            Keypair::generate(),
            Keypair::generate(),
            Keypair::generate(),
        );
        let ledger = Ledger::open(dir.path()).unwrap();
        let r = Receipt {
            request_id: Id(7),
            job_id: None,
            requester: router.peer_id(),
            request_digest: Digest::of(b"req"),
            result_digest: Digest::of(b"res"),
            model_digest: Digest::of(b"model"),
            usage: Usage {
                prompt_tokens: 10,
                completion_tokens: 4,
                cached_prompt_tokens: 0,
            },
            timings: Timings::default(),
            finished_ms: 1000,
        };
        ledger.record(&me, &r).unwrap();
        let c = Countersignature {
            request_id: Id(7),
            provider: me.peer_id(),
            result_digest: r.result_digest,
            model_digest: r.model_digest,
            usage: r.usage,
            verified_ms: 1001,
        };
        let by = |k: &Keypair, c: &Countersignature| Signed::sign(k, c).unwrap();
        // Another peer's, or one claiming more tokens, or for another provider: refused.
        assert!(
            ledger
                .countersign(&other.peer_id(), &me.peer_id(), &by(&other, &c))
                .is_err()
        );
        let mut more = c.clone();
        more.usage.completion_tokens = 400;
        assert!(
            ledger
                .countersign(&router.peer_id(), &me.peer_id(), &by(&router, &more))
                .is_err()
        );
        assert!(
            ledger
                .countersign(&router.peer_id(), &other.peer_id(), &by(&router, &c))
                .is_err()
        );
        assert!(ledger.countersignature(Id(7)).is_none());
        ledger
            .countersign(&router.peer_id(), &me.peer_id(), &by(&router, &c))
            .unwrap();
        let kept = ledger.countersignature(Id(7)).unwrap();
        assert_eq!(kept.verify_from(&router.peer_id()).unwrap(), c);
        assert_eq!(ledger.totals().unwrap().countersigned, 1);
    }
}
