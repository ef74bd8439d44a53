//! The served-request ledger: one signed [`Receipt`] per answered data-plane request, in a
//! sled database of its own (`<data>/ledger`), keyed by finish time so recent receipts and
//! totals are cheap to read. Accounting between providers and routers starts here.

use std::path::Path;

use beacon_proto::{Id, Keypair, Receipt, Signed, Wire};
use serde::Serialize;

/// Ledger failures.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger database: {0}")]
    Db(#[from] sled::Error),
    #[error(transparent)]
    Proto(#[from] beacon_proto::ProtoError),
}

/// Cloneable handle to the ledger.
#[derive(Clone)]
pub struct Ledger {
    tree: sled::Tree,
}

/// Sums over the whole ledger.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Ledger {
    pub fn open(dir: &Path) -> Result<Ledger, LedgerError> {
        let db = sled::open(dir)?;
        Ok(Ledger {
            tree: db.open_tree("receipts")?,
        })
    }

    /// Signs and stores a receipt.
    pub fn record(&self, key: &Keypair, receipt: &Receipt) -> Result<Signed<Receipt>, LedgerError> {
        let signed = Signed::sign(key, receipt)?;
        self.tree.insert(
            Self::key(receipt.finished_ms, receipt.request_id),
            signed.encode()?,
        )?;
        Ok(signed)
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

    pub fn totals(&self) -> Result<Totals, LedgerError> {
        let mut t = Totals::default();
        for item in self.tree.iter() {
            let (_, v) = item?;
            let r = Signed::<Receipt>::decode(&v)?.verify()?;
            t.requests += 1;
            t.prompt_tokens += r.usage.prompt_tokens as u64;
            t.completion_tokens += r.usage.completion_tokens as u64;
        }
        Ok(t)
    }

    pub fn flush(&self) -> Result<(), LedgerError> {
        self.tree.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use beacon_proto::{Digest, Timings, Usage};

    #[test]
    fn receipts_are_signed_ordered_and_summed() {
        let dir = tempfile::tempdir().unwrap();
        let key = Keypair::generate();
        let ledger = Ledger::open(dir.path()).unwrap();
        for i in 0..3u64 {
            let r = Receipt {
                request_id: Id(i as u128),
                job_id: None,
                requester: Keypair::generate().peer_id(),
                request_digest: Digest::of(b"req"),
                result_digest: Digest::of(b"res"),
                model_digest: Digest::of(b"model"),
                usage: Usage {
                    prompt_tokens: 10,
                    completion_tokens: i as u32,
                    cached_prompt_tokens: 0,
                },
                timings: Timings::default(),
                finished_ms: 1000 + i,
            };
            ledger.record(&key, &r).unwrap();
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
                completion_tokens: 3
            }
        );
    }
}
