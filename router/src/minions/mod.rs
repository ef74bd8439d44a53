//! MinionS over the network. Built so far: the pure parts — the supervisor's plan as data
//! validated against a schema ([`plan`]) and document chunking ([`chunk`]). The rounds
//! (decompose, execute on providers, filter, aggregate), usage accounting and
//! `/v1/minions` are later work.

pub mod chunk;
pub mod plan;
