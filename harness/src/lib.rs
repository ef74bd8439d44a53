//! The one process harness of Beacon's tests and benchmarks: the built binaries, the real
//! test model, a real OCI registry (Debian `docker-registry`) and token service, provider
//! nodes and routers (on loopback, or in a region's network namespace for the bench), a
//! TCP relay that slows or cuts connections, a scripted remote API, raw data-plane
//! clients, documents with known answers, and the load generator. Every process started
//! here is killed when its guard drops, and when the thread that started it dies.

pub mod bins;
pub mod corpus;
pub mod data_plane;
pub mod http;
pub mod load;
pub mod models;
pub mod node;
pub mod proc;
pub mod registry;
pub mod relay;
pub mod remote;
pub mod router;

use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

pub use beacon_net::now_ms;
pub use bins::{Binaries, bin};
pub use data_plane::{advert_of, infer_request};
pub use http::{HttpReply, http, http_within, wait_for_http};
pub use models::{SUPERVISOR_MODEL_REF, TEST_MODEL_REF, supervisor_model, test_model};
pub use node::{NodeCli, NodeServer, Serve, test_model_pin};
pub use proc::ChildGuard;
pub use registry::{Registry, TokenServer, push_raw};
pub use relay::{Relay, RelayOptions};
pub use remote::ScriptedRemote;
pub use router::{RouterServer, RouterSpec};

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Polls `check` every 250 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    check()
}

/// sha256 of a file, hex.
pub fn sha256_file(p: &Path) -> String {
    let bytes = std::fs::read(p).expect("a readable file");
    beacon_proto::Digest::of(&bytes).hex()
}
