//! `beacon-bench`: the harness behind the benchmark suite and the reliability tests.
//!
//! Built so far: [`wan`], regions emulated on one machine (a network namespace per region,
//! WAN round trips added in user space). The workloads and reports that run on it are
//! issue 9's remaining work.

pub mod wan;
