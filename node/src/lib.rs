//! `beacon-node`: the provider daemon and its `docker model`-style CLI.
//!
//! Built so far: the content-addressed model store with `docker model`-compatible OCI pull,
//! push and package ([`store`]), the node identity ([`identity`]) and the CLI ([`cli`]).
//! The llama.cpp engine, the HTTP API and the p2p layers are later work (see DESIGN.md).

pub mod api;
pub mod cli;
pub mod engine;
pub mod identity;
pub mod scheduler;
pub mod store;
pub mod tls;

/// Version of this node build.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
