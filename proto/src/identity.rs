//! Node and router identities: one ed25519 keypair each, the same key libp2p uses, so the
//! `PeerId` a connection comes from names the key its signatures must verify under.

use std::fmt;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::ProtoError;

pub use libp2p_identity::PeerId;

/// An ed25519 secret key with its public half. `Debug` never shows the secret.
#[derive(Clone)]
pub struct Keypair(SigningKey);

impl Keypair {
    /// A fresh keypair from the operating system's random source.
    pub fn generate() -> Self {
        Keypair(SigningKey::generate(&mut rand_core::OsRng))
    }

    /// Rebuilds a keypair from its 32 secret bytes.
    pub fn from_secret_bytes(secret: &[u8]) -> Result<Self, ProtoError> {
        let bytes: [u8; 32] = secret.try_into().map_err(|_| {
            ProtoError::InvalidKey(format!("secret key is {} bytes, expected 32", secret.len()))
        })?;
        Ok(Keypair(SigningKey::from_bytes(&bytes)))
    }

    /// The 32 secret bytes, wiped from memory when dropped. Only for persisting the key.
    pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    pub fn peer_id(&self) -> PeerId {
        self.public().to_peer_id()
    }

    /// The same key as a libp2p keypair, for the swarm and for TLS certificates.
    pub fn to_libp2p(&self) -> libp2p_identity::Keypair {
        let mut secret = self.0.to_bytes();
        let secret = libp2p_identity::ed25519::SecretKey::try_from_bytes(&mut secret)
            .expect("32 bytes are always a valid ed25519 secret key");
        libp2p_identity::Keypair::from(libp2p_identity::ed25519::Keypair::from(secret))
    }

    /// Signs raw bytes. Callers sign messages through [`crate::Signed`], which adds the
    /// domain tag; this is public for transports that sign handshake material.
    pub fn sign_raw(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Keypair {{ public: {}, secret: <redacted> }}",
            self.peer_id()
        )
    }
}

/// An ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "[u8; 32]", into = "[u8; 32]")]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, ProtoError> {
        VerifyingKey::from_bytes(bytes)
            .map(PublicKey)
            .map_err(|e| ProtoError::InvalidKey(format!("not an ed25519 public key: {e}")))
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    pub fn to_peer_id(&self) -> PeerId {
        let key = libp2p_identity::ed25519::PublicKey::try_from_bytes(&self.0.to_bytes())
            .expect("a VerifyingKey is always a valid libp2p ed25519 key");
        libp2p_identity::PublicKey::from(key).to_peer_id()
    }

    /// Recovers the public key an ed25519 `PeerId` embeds (identity multihash). Peer ids of
    /// other key types or hashed keys give `None`.
    pub fn from_peer_id(peer: &PeerId) -> Option<Self> {
        let multihash = peer.as_ref();
        if multihash.code() != 0 {
            return None;
        }
        let key = libp2p_identity::PublicKey::try_decode_protobuf(multihash.digest()).ok()?;
        let ed = key.try_into_ed25519().ok()?;
        PublicKey::from_bytes(&ed.to_bytes()).ok()
    }

    /// Strict ed25519 verification (rejects small-order keys and malleable signatures).
    pub fn verify_strict(&self, message: &[u8], signature: &[u8]) -> bool {
        let Ok(sig) = ed25519_dalek::Signature::from_slice(signature) else {
            return false;
        };
        self.0.verify_strict(message, &sig).is_ok()
    }
}

impl TryFrom<[u8; 32]> for PublicKey {
    type Error = ProtoError;
    fn try_from(bytes: [u8; 32]) -> Result<Self, ProtoError> {
        PublicKey::from_bytes(&bytes)
    }
}

impl From<PublicKey> for [u8; 32] {
    fn from(key: PublicKey) -> [u8; 32] {
        key.to_bytes()
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_peer_id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_id_matches_libp2p() {
        let kp = Keypair::generate();
        assert_eq!(kp.peer_id(), kp.to_libp2p().public().to_peer_id());
        assert_eq!(PublicKey::from_peer_id(&kp.peer_id()), Some(kp.public()));
    }

    #[test]
    fn secret_round_trip() {
        let kp = Keypair::generate();
        let again = Keypair::from_secret_bytes(&kp.secret_bytes()[..]).unwrap();
        assert_eq!(again.public(), kp.public());
        assert!(Keypair::from_secret_bytes(&[1, 2, 3]).is_err());
    }

    #[test]
    fn debug_redacts_secret() {
        let kp = Keypair::generate();
        let shown = format!("{kp:?}");
        assert!(shown.contains("redacted"));
        assert!(!shown.contains(&hex::encode(&kp.secret_bytes()[..])));
        let bytes_dbg = format!("{:?}", &kp.secret_bytes()[..]);
        assert!(!shown.contains(&bytes_dbg));
    }

    #[test]
    fn verify_strict_rejects_wrong_message_and_key() {
        let kp = Keypair::generate();
        let sig = kp.sign_raw(b"msg");
        assert!(kp.public().verify_strict(b"msg", &sig));
        assert!(!kp.public().verify_strict(b"msh", &sig));
        assert!(!Keypair::generate().public().verify_strict(b"msg", &sig));
        assert!(!kp.public().verify_strict(b"msg", &sig[..63]));
    }
}
