//! The wire codec: bincode 2 (serde mode, standard config) with a size limit on every decode.
//!
//! Every message kind implements [`Wire`] with its own limit. Decoding checks the input
//! length against the limit before parsing, bounds every length prefix by the same limit
//! (so a short input cannot make the decoder allocate more than the limit), and refuses
//! trailing bytes, so one value has exactly one encoding.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::ProtoError;

/// A message that crosses the network.
pub trait Wire: Serialize + DeserializeOwned {
    /// Human-readable kind, used in errors.
    const KIND: &'static str;
    /// Largest encoded size accepted by [`Wire::decode`] and produced by [`Wire::encode`].
    const MAX_BYTES: usize;

    /// Canonical bytes of this value.
    fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        encode(self, Self::KIND, Self::MAX_BYTES)
    }

    /// Decodes one value that must span all of `bytes`.
    fn decode(bytes: &[u8]) -> Result<Self, ProtoError> {
        decode(bytes, Self::KIND, Self::MAX_BYTES)
    }
}

/// Encodes with the standard config and checks the result against `limit`.
pub fn encode<T: Serialize + ?Sized>(
    value: &T,
    kind: &'static str,
    limit: usize,
) -> Result<Vec<u8>, ProtoError> {
    let bytes = bincode::serde::encode_to_vec(value, bincode::config::standard()).map_err(|e| {
        ProtoError::Encode {
            kind,
            reason: e.to_string(),
        }
    })?;
    if bytes.len() > limit {
        return Err(ProtoError::TooLarge {
            kind,
            len: bytes.len(),
            limit,
        });
    }
    Ok(bytes)
}

/// Decodes a whole value of at most `limit` bytes. Length prefixes inside the value are
/// bounded by the smallest allocation tier at or above `limit` (64 KiB, 1 MiB, 16 MiB,
/// 64 MiB), so a short input can never make the decoder allocate more than that.
pub fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    kind: &'static str,
    limit: usize,
) -> Result<T, ProtoError> {
    if bytes.len() > limit {
        return Err(ProtoError::TooLarge {
            kind,
            len: bytes.len(),
            limit,
        });
    }
    const KIB64: usize = 64 << 10;
    const MIB1: usize = 1 << 20;
    const MIB16: usize = 16 << 20;
    const MIB64: usize = 64 << 20;
    if limit <= KIB64 {
        decode_limited::<T, KIB64>(bytes, kind)
    } else if limit <= MIB1 {
        decode_limited::<T, MIB1>(bytes, kind)
    } else if limit <= MIB16 {
        decode_limited::<T, MIB16>(bytes, kind)
    } else {
        decode_limited::<T, MIB64>(bytes, kind)
    }
}

fn decode_limited<T: DeserializeOwned, const LIMIT: usize>(
    bytes: &[u8],
    kind: &'static str,
) -> Result<T, ProtoError> {
    let config = bincode::config::standard().with_limit::<LIMIT>();
    let (value, used) = bincode::serde::decode_from_slice::<T, _>(bytes, config).map_err(|e| {
        ProtoError::Malformed {
            kind,
            reason: e.to_string(),
        }
    })?;
    if used != bytes.len() {
        return Err(ProtoError::Malformed {
            kind,
            reason: format!("{} trailing bytes", bytes.len() - used),
        });
    }
    Ok(value)
}
