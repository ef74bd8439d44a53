//! `beacon-router`: the hybrid router. It joins the provider network as a peer, keeps a
//! live directory of providers ([`directory`]), places subtasks on them ([`placement`], a
//! pure function), runs them over the QUIC data plane with retries, hedging and audits
//! ([`dispatch`]), and answers applications over HTTP ([`http`]).
//! MinionS and Minion jobs ([`minions`]) run their local work on the network through the
//! same placement, dispatch and verification, at `POST /v1/minions`.

pub mod cli;
pub mod directory;
pub mod discovery;
pub mod dispatch;
pub mod http;
pub mod metrics;
pub mod minions;
pub mod placement;
pub mod remote;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use beacon_net::directory::Directory;
use beacon_net::{DataClient, Network, NetworkConfig};

/// Version of this router build.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Everything `serve` needs.
pub struct RouterConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub p2p_listen: Vec<libp2p::Multiaddr>,
    pub bootstrap: Vec<libp2p::Multiaddr>,
    pub api_keys: Vec<beacon_proto::Secret>,
    pub rate_per_minute: u32,
    pub remote: Option<remote::Remote>,
    /// What may be forwarded to the remote when no provider serves a chat request.
    pub fallback: remote::FallbackPolicy,
    pub dispatch: dispatch::DispatchConfig,
    pub policy: placement::Policy,
    pub max_body: usize,
    /// Chat requests that may wait for a provider slot beyond the slots the model's
    /// providers advertise; more are refused with 503 and `Retry-After`.
    pub max_queue: u64,
    /// Directory entries expire after this long without an advert.
    pub advert_expiry: Duration,
    /// PEM certificate chain and key: serve HTTPS instead of HTTP.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub minions: minions::MinionsConfig,
    /// MinionS jobs that may run at once; more are refused with 503 and `Retry-After`.
    pub max_minion_jobs: usize,
    /// Supervisor tokens each client (API key, or address on an open router) may spend
    /// on MinionS per hour; 0 for no budget.
    pub minions_token_budget: u64,
    /// Model names the operator trusts (reference → digest); see [`directory::Pins`].
    pub pins: directory::Pins,
    /// Providers the operator vouches for: never on probation, reputable from the start.
    pub trusted: Vec<beacon_proto::PeerId>,
    /// How long a client may take to send a request's headers, and how many connections
    /// it may hold.
    pub http: beacon_net::http::HttpLimits,
    /// Dial providers whose adverts name private, loopback or link-local addresses (a
    /// router on a private network); otherwise peers cannot point the router at its own
    /// network (review M9).
    pub dial_private: bool,
}

/// Runs the router until `shutdown` resolves.
pub async fn run(
    config: RouterConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    let key = beacon_net::identity::load_or_create(&config.data_dir.join("identity.key"))?;
    let db = sled::open(config.data_dir.join("router.db")).context("opening router.db")?;
    let reputation = db.open_tree("reputation")?;

    let mut net_config = NetworkConfig::new(key.clone());
    net_config.listen = config.p2p_listen.clone();
    net_config.bootstrap = config.bootstrap.clone();
    // The swarm itself dials no private address unless allowed: addresses that adverts,
    // kademlia or identify name are all refused at the transport (review M9).
    net_config.dial_private = config.dial_private;
    // A router maps no model: past 80% of the machine's memory, a flood of connections is
    // the likelier cause, and new ones wait.
    net_config.max_memory_fraction = Some(0.8);
    let mut p2p_metrics = prometheus_client::registry::Registry::default();
    net_config.metrics = Some(beacon_net::P2pMetrics::new(&mut p2p_metrics));
    let network = Network::start(net_config).await?;
    let live = Arc::new(RwLock::new(Directory::new(
        config.advert_expiry,
        Duration::from_secs(10),
    )));
    beacon_net::directory::follow(&network, live.clone());
    if config.pins.is_empty() {
        tracing::warn!(
            "no --model-pin: model names resolve from adverts (the digest most established \
             providers hold); pin the names you serve so no peer can claim them"
        );
    }
    let mut directory = directory::RouterDirectory::new(live, Some(reputation))
        .with_pins(config.pins)
        .with_trusted(config.trusted);
    directory.dial_private = config.dial_private;
    if !config.dial_private {
        tracing::info!("providers at private or loopback addresses are not dialled");
    }
    directory.breaker_failures = config.dispatch.breaker_failures.max(1);
    directory.breaker_open = config.dispatch.breaker_open;
    tokio::spawn(discovery::run(
        network.clone(),
        directory.clone(),
        Duration::from_secs(5),
    ));
    let client = DataClient::new(&key, "0.0.0.0:0".parse().expect("valid address"))?;
    let dispatcher = dispatch::Dispatcher::new(client.clone(), directory, config.dispatch);
    let mut state = http::ApiState::new(
        dispatcher,
        config.remote,
        config.api_keys,
        config.rate_per_minute,
        config.policy,
        config.max_minion_jobs,
        Some(Arc::new(p2p_metrics)),
    );
    state.fallback = config.fallback;
    state.minion_budgets =
        minions::budget::Budgets::new(config.minions_token_budget, Duration::from_secs(3600));
    state.minions = Arc::new(config.minions);
    state.max_queue = config.max_queue;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let app = http::router(state, config.max_body);
    let http_limits = config.http;
    tracing::info!(%addr, peer = %key.peer_id(), "router listening");
    match &config.tls {
        Some((cert, key_path)) => {
            let acceptor = tls::acceptor(cert, key_path)?;
            eprintln!(
                "beacon-router API on https://{addr}, peer {}",
                key.peer_id()
            );
            beacon_net::http::serve(
                tls::TlsListener::new(listener, acceptor)?,
                app,
                http_limits,
                shutdown,
            )
            .await;
        }
        None => {
            eprintln!("beacon-router API on http://{addr}, peer {}", key.peer_id());
            let listener = beacon_net::http::no_delay(listener);
            beacon_net::http::serve(listener, app, http_limits, shutdown).await;
        }
    }
    client.close();
    network.shutdown().await;
    db.flush()?;
    Ok(())
}
