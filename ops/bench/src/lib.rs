//! `beacon-bench`: the harness behind the benchmark suite and the reliability tests.
//!
//! - [`wan`]: regions emulated on one machine (a network namespace per region, WAN round
//!   trips added in user space);
//! - [`cluster`]: real provider nodes and routers started in those regions;
//! - [`load`] and [`http`]: closed-loop chat load through `curl`, shared with the benches;
//! - [`engine`]: beacon-node's engine against llama.cpp's own server;
//! - [`suite`] and [`minions`]: the workloads, each against a baseline measured in the same
//!   run;
//! - [`report`]: the JSON, Markdown and SVG output.

pub mod cluster;
pub mod engine;
pub mod http;
pub mod load;
pub mod minions;
pub mod report;
pub mod suite;
pub mod wan;
