//! `beacon-node serve` as a library: the store, the scheduler, the local HTTP API and, unless
//! disabled, the provider's network side (libp2p control plane, QUIC data plane, advertiser,
//! ledger). One owner for shutdown: stop accepting on the API and the data plane, then close
//! the swarm, then flush the ledger.

use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use beacon_net::directory::{self, Directory};
use beacon_net::{Network, NetworkConfig};
use libp2p::Multiaddr;
use tracing::info;

use crate::api::{ApiConfig, AppState, NetState};
use crate::ledger::Ledger;
use crate::provider::advert::Advertiser;
use crate::provider::{Provider, Throughput};
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::store::Store;
use crate::store::registry::Registry;

/// The provider's network settings.
#[derive(Clone, Debug)]
pub struct ProviderConfig {
    pub region: String,
    pub p2p_listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    /// libp2p addresses to advertise ahead of the listeners (NAT, port forwarding).
    pub p2p_advertise: Vec<Multiaddr>,
    /// Where the QUIC data plane listens.
    pub data_plane: SocketAddr,
    /// What to advertise as the data-plane address (default: derived from `data_plane`).
    pub data_plane_advertise: Option<String>,
    /// `None`: any peer may submit work; otherwise only these.
    pub data_plane_allow: Option<Vec<beacon_proto::PeerId>>,
    pub advert_interval: Duration,
    /// Deliberate misbehaviour (tests and benchmarks only).
    pub fault: Option<crate::provider::Fault>,
    /// Gossip tags whose registry is on a private network too.
    pub advertise_private_tags: bool,
}

/// Everything `serve` needs.
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub scheduler: SchedulerConfig,
    pub api: ApiConfig,
    pub registry: Registry,
    /// `None`: local API only, no network.
    pub provider: Option<ProviderConfig>,
}

/// Runs the node until `shutdown` resolves. `on_ready` receives the API address.
pub async fn run(
    config: NodeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let store = Store::open(config.data_dir.join("models"))
        .with_context(|| format!("opening the store in {}", config.data_dir.display()))?;
    let key = Arc::new(beacon_net::identity::load_or_create(
        &config.data_dir.join("identity.key"),
    )?);
    let parallel = config.scheduler.engine.parallel;
    let scheduler = Scheduler::start(store.clone(), config.scheduler);
    let mut state = AppState::new(
        store.clone(),
        scheduler.clone(),
        config.registry,
        config.api.token.clone(),
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let mut network = None;
    let mut data_plane = None;
    if let Some(p) = config.provider {
        let ledger = Ledger::open(&config.data_dir.join("ledger")).context("opening the ledger")?;
        let stop = stopped();
        let (dp, net) = start_provider(
            p, &key, &store, &scheduler, &mut state, &ledger, parallel, stop,
        )
        .await?;
        data_plane = Some(dp);
        network = Some((net, ledger));
    }

    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let api_stop = stopped();
    let server = tokio::spawn(crate::api::serve(state, config.api, bound_tx, api_stop));
    if let Ok(addr) = bound_rx.await {
        info!(%addr, "API listening");
        eprintln!("beacon-node API on http://{addr}");
    }
    shutdown.await;
    info!("shutting down");
    let _ = stop_tx.send(true);
    let api_result = server.await;
    if let Some(dp) = data_plane {
        let _ = dp.await;
    }
    if let Some((net, ledger)) = network {
        net.shutdown().await;
        let _ = ledger.flush();
    }
    api_result??;
    Ok(())
}

/// The provider's side: the data plane (serving until `stop`), the network, its adverts and
/// what the API shows of them.
#[allow(clippy::too_many_arguments)]
async fn start_provider(
    p: ProviderConfig,
    key: &Arc<beacon_proto::Keypair>,
    store: &Store,
    scheduler: &Scheduler,
    state: &mut AppState,
    ledger: &Ledger,
    parallel: u32,
    stop: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(tokio::task::JoinHandle<()>, Network)> {
    let endpoint = beacon_net::quic::server_endpoint(key, p.data_plane)
        .with_context(|| format!("data plane on {}", p.data_plane))?;
    let bound = endpoint.local_addr()?;
    let advertised = p
        .data_plane_advertise
        .clone()
        .unwrap_or_else(|| advertise_addr(bound));
    let throughput = Arc::new(Throughput::default());
    let provider = Provider {
        scheduler: scheduler.clone(),
        key: key.clone(),
        ledger: ledger.clone(),
        throughput: throughput.clone(),
        metrics: state.metrics.clone(),
        fault: p.fault,
        audits: Default::default(),
    };
    if let Some(f) = p.fault {
        tracing::warn!(fault = ?f, "FAULT INJECTION: this provider misbehaves on purpose");
    }
    let policy = match &p.data_plane_allow {
        Some(peers) => {
            info!(
                peers = peers.len(),
                "the data plane serves only its allow-list"
            );
            beacon_net::quic::ServePolicy::allow_only(peers.iter().copied())
        }
        None => beacon_net::quic::ServePolicy::default(),
    };
    let data_plane = tokio::spawn(beacon_net::quic::serve(endpoint, provider, policy, stop));
    info!(%bound, %advertised, "data plane listening");
    eprintln!("beacon-node data plane on {bound} (advertised as {advertised})");

    let mut net_config = NetworkConfig::new((**key).clone());
    net_config.listen = p.p2p_listen.clone();
    net_config.external = p.p2p_advertise.clone();
    net_config.bootstrap = p.bootstrap.clone();
    let mut p2p_metrics = prometheus_client::registry::Registry::default();
    net_config.metrics = Some(beacon_net::P2pMetrics::new(&mut p2p_metrics));
    state.metrics.set_p2p(Arc::new(p2p_metrics));
    let net = Network::start(net_config).await?;
    let directory = Arc::new(RwLock::new(Directory::new(
        p.advert_interval * 4,
        Duration::from_secs(10),
    )));
    directory::follow(&net, directory.clone());
    let last_advert = crate::provider::advert::LastAdvert::default();
    tokio::spawn(
        Advertiser {
            network: net.clone(),
            store: store.clone(),
            scheduler: scheduler.clone(),
            throughput,
            region: p.region.clone(),
            data_plane: advertised.clone(),
            parallel,
            interval: p.advert_interval,
            last: last_advert.clone(),
            overstate: p.fault == Some(crate::provider::Fault::Capacity),
            private_tags: p.advertise_private_tags,
        }
        .run(),
    );
    eprintln!("beacon-node peer {} in region {}", key.peer_id(), p.region);
    state.net = Some(Arc::new(NetState {
        network: net.clone(),
        directory,
        ledger: ledger.clone(),
        region: p.region,
        data_plane: advertised,
        advert: last_advert,
    }));
    Ok((data_plane, net))
}

/// A data-plane address others can dial: the bound one, or for a wildcard bind, this host's
/// name resolved (a container's own address), else loopback.
fn advertise_addr(bound: SocketAddr) -> String {
    if !bound.ip().is_unspecified() {
        return bound.to_string();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let resolved = (host.as_str(), bound.port())
        .to_socket_addrs()
        .ok()
        .and_then(|mut it| it.find(|a| a.is_ipv4() && !a.ip().is_loopback()));
    resolved
        .map(|a| a.to_string())
        .unwrap_or_else(|| format!("127.0.0.1:{}", bound.port()))
}
