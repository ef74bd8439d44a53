//! Content digests: `sha256:<64 hex>`, the identity of blobs, manifests and requests.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::ProtoError;

/// A SHA-256 digest. Displays and parses as `sha256:<64 lowercase hex>`, the OCI form; in
/// human-readable formats (JSON) it serialises as that string, on the wire as 32 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            <[u8; 32]>::deserialize(d).map(Digest)
        }
    }
}

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Digest(Sha256::digest(bytes).into())
    }

    /// The 64 hex characters without the `sha256:` prefix.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Whether a secret someone presented (an API key, a bearer token) is `expected`,
    /// in time that depends on neither: both are hashed first (so their lengths and the
    /// position of the first difference stay hidden) and the digests compared in constant
    /// time.
    pub fn secret_eq(given: &[u8], expected: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        bool::from(Digest::of(given).0.ct_eq(&Digest::of(expected).0))
    }

    /// Whether `given` is any of `keys`, checking every one (no early exit on a match).
    pub fn secret_in<'a>(given: &[u8], keys: impl IntoIterator<Item = &'a [u8]>) -> bool {
        keys.into_iter()
            .fold(false, |found, k| found | Self::secret_eq(given, k))
    }

    /// First 12 hex characters: the short id `docker model ls` shows.
    pub fn short(&self) -> String {
        self.hex()[..12].to_string()
    }

    /// Parses the bare 64-hex form (as used in blob file names).
    pub fn from_hex(hex_str: &str) -> Result<Self, ProtoError> {
        let bad = |reason: &str| ProtoError::InvalidDigest {
            digest: hex_str.chars().take(80).collect(),
            reason: reason.to_string(),
        };
        if hex_str.len() != 64 {
            return Err(bad("expected 64 hex characters"));
        }
        if !hex_str
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(bad("expected lowercase hex characters"));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_str, &mut out).map_err(|e| bad(&e.to_string()))?;
        Ok(Digest(out))
    }
}

/// Incremental SHA-256, for digesting blobs while they stream.
#[derive(Clone, Default)]
pub struct Hasher(Sha256);

impl Hasher {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    pub fn finish(self) -> Digest {
        Digest(self.0.finalize().into())
    }
}

impl FromStr for Digest {
    type Err = ProtoError;
    fn from_str(s: &str) -> Result<Self, ProtoError> {
        match s.strip_prefix("sha256:") {
            Some(hex_part) => Digest::from_hex(hex_part).map_err(|e| match e {
                ProtoError::InvalidDigest { reason, .. } => ProtoError::InvalidDigest {
                    digest: s.chars().take(80).collect(),
                    reason,
                },
                other => other,
            }),
            None => Err(ProtoError::InvalidDigest {
                digest: s.chars().take(80).collect(),
                reason: "only sha256 digests are supported (expected \"sha256:<hex>\")".into(),
            }),
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", &self.hex()[..12])
    }
}

#[cfg(test)]
mod tests {

    /// Review L9: API keys and tokens are compared by digest in constant time; different
    /// lengths and prefixes of a key are simply unequal, and every key is checked.
    #[test]
    fn secrets_compare_by_value_only() {
        assert!(Digest::secret_eq(b"sk-beacon-1", b"sk-beacon-1"));
        assert!(!Digest::secret_eq(b"sk-beacon-", b"sk-beacon-1"));
        assert!(!Digest::secret_eq(b"sk-beacon-12", b"sk-beacon-1"));
        assert!(!Digest::secret_eq(b"", b"sk-beacon-1"));
        let keys: [&[u8]; 3] = [b"a-key", b"b-key", b"c-key"];
        assert!(Digest::secret_in(b"b-key", keys));
        assert!(Digest::secret_in(b"c-key", keys));
        assert!(!Digest::secret_in(b"d-key", keys));
        assert!(!Digest::secret_in(b"b-key", []));
    }

    use super::*;

    #[test]
    fn display_parse_round_trip() {
        let d = Digest::of(b"hello");
        assert_eq!(
            d.to_string(),
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        assert_eq!(d.short(), "2cf24dba5fb0");
    }

    #[test]
    fn streaming_matches_one_shot() {
        let mut h = Hasher::new();
        h.update(b"hel");
        h.update(b"lo");
        assert_eq!(h.finish(), Digest::of(b"hello"));
    }

    #[test]
    fn rejects_bad_digests() {
        for bad in [
            "sha512:00",
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
            "sha256:2CF24DBA5FB0A30E26E83B2AC5B9E29E1B161E5C1FA7425E73043362938B9824",
            "sha256:2cf2",
            "sha256:zz24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad} accepted");
        }
    }
}
