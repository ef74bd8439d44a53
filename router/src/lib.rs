//! `beacon-router`: the hybrid router. It will join the provider network as a peer, keep a
//! live directory of providers, place MinionS subtasks on them, verify signed results and
//! answer applications over HTTP (see `DESIGN.md`). Only the command-line surface exists so
//! far; every command that is not built yet says so and exits with an error.

/// Version of this router build.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
