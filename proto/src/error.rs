use thiserror::Error;

/// Every failure `beacon-proto` reports. Each variant says what was wrong in words a user can
/// act on; none carries secret material.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtoError {
    /// A model reference that `docker model` would not accept either.
    #[error("invalid model reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    /// A digest string that is not `sha256:<64 lowercase hex>`.
    #[error("invalid digest {digest:?}: {reason}")]
    InvalidDigest { digest: String, reason: String },
    /// Input larger than the limit for this message kind.
    #[error("{kind} is {len} bytes, over the {limit}-byte limit")]
    TooLarge {
        kind: &'static str,
        len: usize,
        limit: usize,
    },
    /// Bytes that do not decode as the expected message.
    #[error("malformed {kind}: {reason}")]
    Malformed { kind: &'static str, reason: String },
    /// Encoding failed (only possible for values over the size limit).
    #[error("cannot encode {kind}: {reason}")]
    Encode { kind: &'static str, reason: String },
    /// A key that is not a valid ed25519 key.
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// A signature that does not verify for this signer, payload and message kind.
    #[error("bad signature on {kind}")]
    BadSignature { kind: &'static str },
    /// The signer is a valid key but not the peer the message had to come from.
    #[error("{kind} signed by {actual}, expected {expected}")]
    WrongSigner {
        kind: &'static str,
        expected: String,
        actual: String,
    },
    /// A well-formed, correctly signed message that does not answer what was asked
    /// (request digest, model digest, request id) or breaks a protocol rule (stale advert).
    #[error("{kind} rejected: {reason}")]
    Rejected { kind: &'static str, reason: String },
    /// A genuine message that is old news (stale, or not newer than one already seen): a
    /// relay may pass it on in good faith, so it is dropped without blame.
    #[error("{kind} outdated: {reason}")]
    Outdated { kind: &'static str, reason: String },
}
