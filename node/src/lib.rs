//! `beacon-node`: the provider daemon and its `docker model`-style CLI.
//!
//! - [`store`]: the content-addressed model store with `docker model`-compatible OCI pull,
//!   push and package;
//! - [`engine`] and [`scheduler`]: llama.cpp with continuous batching, models loaded on
//!   demand within a memory budget;
//! - [`api`]: the OpenAI / Docker Model Runner HTTP API;
//! - [`provider`], [`ledger`], [`hardware`]: the provider's network side (data-plane
//!   handler, advertiser, signed receipts, GPU/CPU detection), on top of `beacon-net`;
//! - [`daemon`]: `serve` as a library; [`cli`]: the command line.

pub mod api;
pub mod cli;
pub mod daemon;
pub mod engine;
pub mod hardware;
pub mod ledger;
pub mod metrics;
pub mod provider;
pub mod scheduler;
pub mod store;
pub mod tls;

/// Version of this node build.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
