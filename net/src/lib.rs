//! `beacon-net`: the networking that provider nodes and routers share.
//!
//! - [`p2p`]: the libp2p control plane (discovery, kademlia provider records, gossiped
//!   signed adverts), one swarm task behind the [`p2p::Network`] handle;
//! - [`directory`]: the live table of providers built from adverts, expiring silent ones;
//! - [`quic`]: the QUIC data plane with identity-key TLS: a provider's server loop and a
//!   pooling client;
//! - [`http`] and [`api`]: how both HTTP APIs are served, and the OpenAI-shaped error they
//!   answer with.
//!
//! It lives in its own crate because both `beacon-node` (serving) and `beacon-router`
//! (calling) need it, and they must not depend on each other; `beacon-proto` stays free of
//! I/O.

pub mod addr;
pub mod api;
pub mod directory;
pub mod http;
pub mod identity;
pub mod limits;
pub mod p2p;
pub mod quic;

pub use directory::{Directory, SharedDirectory};
pub use p2p::{NetEvent, Network, NetworkConfig, P2pMetrics};
pub use quic::{CallError, DataClient};

/// Milliseconds since the Unix epoch (0 for a clock set before it), the one wall clock
/// adverts, receipts, deadlines and the router's statistics are stamped with.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Resolves on Ctrl-C or SIGTERM: what a node or router waits for to shut down.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Errors of the networking layer.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Proto(#[from] beacon_proto::ProtoError),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("network configuration: {0}")]
    Config(String),
    #[error("cannot listen on {0}")]
    Listen(String),
    #[error("cannot dial {0}")]
    Dial(String),
    #[error("cannot publish: {0}")]
    Publish(String),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Write(#[from] quinn::WriteError),
    #[error("the network task has stopped")]
    Stopped,
    #[error("the peer took nothing we sent for {0:?}")]
    Stalled(std::time::Duration),
    #[error("identity: {0}")]
    Identity(String),
}
