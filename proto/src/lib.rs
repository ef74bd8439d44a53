//! `beacon-proto`: the types every Beacon component shares.
//!
//! Wire messages, their bincode codec with a size limit on every decode, ed25519 identities
//! that double as libp2p `PeerId`s, signed envelopes with per-kind domain separation, content
//! digests, `docker model`-style model references, and the MinionS plan a supervisor model
//! writes (parsed as data against a schema, never executed). Nothing here performs I/O or
//! needs an async runtime, so the crate can be fuzzed and property-tested in isolation.

pub mod codec;
pub mod digest;
mod error;
pub mod gguf;
pub mod identity;
pub mod ip;
pub mod messages;
pub mod openai;
pub mod plan;
pub mod reference;
pub mod sampling;
pub mod secret;
pub mod signed;

pub use codec::Wire;
pub use digest::Digest;
pub use error::ProtoError;
pub use identity::{Keypair, PeerId, PublicKey};
pub use messages::*;
pub use reference::ModelRef;
pub use secret::Secret;
pub use signed::{Domain, Signed};

/// The Beacon protocol version carried in adverts and used in protocol ids.
pub const PROTOCOL_VERSION: &str = "1";
