//! `beacon-bench`: the benchmark suite. Its processes, HTTP client and load generator are
//! `beacon-harness`'s, shared with the tests.
//!
//! - [`wan`]: regions emulated on one machine (a network namespace per region, WAN round
//!   trips added in user space);
//! - [`cluster`]: the harness's provider nodes and routers started in those regions;
//! - [`workloads`]: one module per workload (the engine against llama.cpp's own server,
//!   routed chat, MinionS, placement, failures, dishonest providers, audit cost), each
//!   with `run`, `checks` and `render`, measured against a baseline in the same run;
//! - [`report`]: the JSON and the Markdown with its figures; [`chart`]: what the figures
//!   share.

pub mod chart;
pub mod cluster;
pub mod report;
pub mod wan;
pub mod workloads;
