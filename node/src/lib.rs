//! `beacon-node`: the provider daemon and its `docker model`-style CLI.

/// Version of this node build.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
