//! Signed envelopes: `Signed<T>` carries the canonical bytes of a `T`, the signer's public
//! key and an ed25519 signature over `"beacon-signed\0" || DOMAIN || "\0" || bytes`.
//!
//! Each message kind has its own domain tag (`beacon/advert/v1`, `beacon/result/v1`, …), so
//! a signature made for one kind never verifies as another. Verification is strict
//! (`verify_strict`) and decodes the payload only after the signature checks out.

use std::fmt;
use std::marker::PhantomData;

use serde::{Deserialize, Serialize};

use crate::codec::{self, Wire};
use crate::{Digest, Keypair, PeerId, ProtoError, PublicKey};

/// Bytes an envelope adds around its payload: key, signature, length prefixes.
const ENVELOPE_OVERHEAD: usize = 128;

/// A message kind that is signed, with its domain-separation tag.
pub trait Domain: Wire {
    const DOMAIN: &'static str;
}

/// A signed `T`. Cheap to clone; the payload is decoded only by [`Signed::verify`].
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Signed<T> {
    payload: Vec<u8>,
    signer: PublicKey,
    signature: Vec<u8>,
    #[serde(skip)]
    _kind: PhantomData<fn() -> T>,
}

fn signing_input(domain: &str, payload: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(16 + domain.len() + payload.len());
    msg.extend_from_slice(b"beacon-signed\0");
    msg.extend_from_slice(domain.as_bytes());
    msg.push(0);
    msg.extend_from_slice(payload);
    msg
}

impl<T: Domain> Signed<T> {
    /// Encodes `value` canonically and signs it with `key` under `T::DOMAIN`.
    pub fn sign(key: &Keypair, value: &T) -> Result<Self, ProtoError> {
        let payload = value.encode()?;
        let signature = key.sign_raw(&signing_input(T::DOMAIN, &payload)).to_vec();
        Ok(Signed {
            payload,
            signer: key.public(),
            signature,
            _kind: PhantomData,
        })
    }

    /// Checks the signature strictly and decodes the payload.
    pub fn verify(&self) -> Result<T, ProtoError> {
        if !self
            .signer
            .verify_strict(&signing_input(T::DOMAIN, &self.payload), &self.signature)
        {
            return Err(ProtoError::BadSignature { kind: T::KIND });
        }
        T::decode(&self.payload)
    }

    /// [`Signed::verify`], and the signer must be `expected`.
    pub fn verify_from(&self, expected: &PeerId) -> Result<T, ProtoError> {
        let actual = self.signer_peer_id();
        if &actual != expected {
            return Err(ProtoError::WrongSigner {
                kind: T::KIND,
                expected: expected.to_string(),
                actual: actual.to_string(),
            });
        }
        self.verify()
    }

    /// The claimed signer; only meaningful after a successful verify.
    pub fn signer(&self) -> PublicKey {
        self.signer
    }

    pub fn signer_peer_id(&self) -> PeerId {
        self.signer.to_peer_id()
    }

    /// The signature bytes.
    pub fn signature(&self) -> &[u8] {
        &self.signature
    }

    /// The signed bytes of the payload.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// Digest of the payload: identifies the signed message (e.g. a receipt).
    pub fn payload_digest(&self) -> Digest {
        Digest::of(&self.payload)
    }

    /// Builds an envelope from parts without checking it; for tests and fuzzing of the
    /// verifier. Nothing built this way verifies unless the parts are genuine.
    pub fn from_parts(payload: Vec<u8>, signer: PublicKey, signature: Vec<u8>) -> Self {
        Signed {
            payload,
            signer,
            signature,
            _kind: PhantomData,
        }
    }

    /// Reinterprets the envelope as another kind, keeping bytes and signature. Verification
    /// of the result fails unless both kinds share a domain tag, which none do.
    pub fn cast<U: Domain>(self) -> Signed<U> {
        Signed::from_parts(self.payload, self.signer, self.signature)
    }
}

impl<T: Domain> Wire for Signed<T> {
    const KIND: &'static str = T::KIND;
    const MAX_BYTES: usize = T::MAX_BYTES + ENVELOPE_OVERHEAD;

    fn decode(bytes: &[u8]) -> Result<Self, ProtoError> {
        codec::decode(bytes, T::KIND, Self::MAX_BYTES)
    }
}

impl<T> Clone for Signed<T> {
    fn clone(&self) -> Self {
        Signed {
            payload: self.payload.clone(),
            signer: self.signer,
            signature: self.signature.clone(),
            _kind: PhantomData,
        }
    }
}

impl<T> PartialEq for Signed<T> {
    fn eq(&self, other: &Self) -> bool {
        self.payload == other.payload
            && self.signer == other.signer
            && self.signature == other.signature
    }
}

impl<T> fmt::Debug for Signed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signed")
            .field("signer", &self.signer)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}
