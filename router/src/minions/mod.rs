//! MinionS and Minion over the network: the supervisor's plan as data validated against a
//! schema ([`plan`]), document chunking ([`chunk`]), the supervisor client with exact token
//! accounting ([`remote`]), chunks ranked per task ([`retrieval`]), grounded evidence
//! ([`evidence`]), the job request and answer ([`job`]) and the protocols themselves
//! ([`protocol`]), served at `POST /v1/minions`.

pub mod budget;
pub mod chunk;
pub mod client;
pub mod evidence;
pub mod http;
pub mod job;
pub use beacon_proto::plan;
pub mod protocol;
pub mod remote;
pub mod retries;
pub mod retrieval;
