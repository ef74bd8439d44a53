//! `beacon-router`: the hybrid router. It joins the provider network as a peer, keeps a
//! live directory of providers, places subtasks on them, verifies signed results and answers
//! applications over HTTP (see `DESIGN.md`).
//!
//! Built so far: [`placement`], the pure placement function. The directory, dispatch,
//! verification, HTTP API and MinionS are later work.

pub mod placement;

/// Version of this router build.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
