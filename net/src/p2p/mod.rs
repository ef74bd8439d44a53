//! The control plane: one task owns the libp2p swarm (QUIC, with TCP + noise + yamux as
//! fallback; identify, ping, kademlia under Beacon's protocol name, gossipsub for adverts);
//! the rest of the process talks to it through the cloneable [`Network`] handle and hears
//! from it through [`NetEvent`]s.
//!
//! Every gossiped advert is validated before gossipsub may forward it: the gossipsub
//! signature (strict mode), then [`beacon_proto::validate_advert`] (Beacon signature, signer
//! = publishing peer = described peer, freshness, size, increasing sequence). Invalid ones are
//! rejected, which costs their sender peer score; stale or replayed ones are ignored.

mod behaviour;
mod seqs;
mod transport;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::now_ms;

use beacon_proto::{
    ADVERT_TOPIC, AdvertPolicy, Digest, Keypair, PeerId, ProviderAdvert, Signed, Wire,
    validate_advert,
};
use futures::StreamExt;
use libp2p::gossipsub::{self, MessageAcceptance, PublishError};
use libp2p::kad::{self, GetProvidersOk, QueryId, QueryResult};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, Swarm, identify, ping};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::NetError;
use behaviour::{Behaviour, BehaviourEvent};

/// How a network peer starts.
#[derive(Clone, Debug)]
pub struct NetworkConfig {
    pub keypair: Keypair,
    /// Addresses to listen on, e.g. `/ip4/0.0.0.0/udp/0/quic-v1` and `/ip4/0.0.0.0/tcp/0`.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start (`.../p2p/<peer id>`, or without a peer id; `/dns4/…` names
    /// are resolved); redialled while none is connected.
    pub bootstrap: Vec<Multiaddr>,
    /// Addresses others reach us at when they differ from the listeners (behind NAT or
    /// port forwarding); advertised first.
    pub external: Vec<Multiaddr>,
    /// Freshness rules for received adverts.
    pub advert_policy: AdvertPolicy,
    /// How long a kademlia provider record lives; republished at half of it.
    pub provider_ttl: Duration,
    /// Connections others may open to us at once (established; half as many may be in
    /// their handshake), so a flood of dials cannot exhaust the process (review M8).
    pub max_incoming: u32,
    /// Connections one peer may hold with us at once (QUIC and TCP, a redial).
    pub max_per_peer: u32,
    /// Dial private, loopback and link-local addresses. A router on the internet turns it
    /// off, so peers cannot make it reach into its own network (review M9); connections
    /// others open are not affected.
    pub dial_private: bool,
    /// Refuse new connections, in and out, while this process holds more than this share
    /// of the machine's memory (review M8). `None` for providers, whose resident memory
    /// includes the model weights they map.
    pub max_memory_fraction: Option<f64>,
    /// libp2p's own metrics (connections, identify, kademlia, ping, gossipsub), recorded
    /// into the registry they were made with; the owner renders it.
    pub metrics: Option<P2pMetrics>,
}

impl NetworkConfig {
    /// Listens on QUIC and TCP on all interfaces, ephemeral ports.
    pub fn new(keypair: Keypair) -> Self {
        NetworkConfig {
            keypair,
            listen: vec![
                "/ip4/0.0.0.0/udp/0/quic-v1"
                    .parse()
                    .expect("valid multiaddr"),
                "/ip4/0.0.0.0/tcp/0".parse().expect("valid multiaddr"),
            ],
            bootstrap: Vec::new(),
            external: Vec::new(),
            advert_policy: AdvertPolicy::default(),
            provider_ttl: Duration::from_secs(300),
            max_incoming: 1024,
            max_per_peer: 4,
            dial_private: true,
            max_memory_fraction: None,
            metrics: None,
        }
    }
}

/// libp2p's own metrics, recorded by the swarm task into the registry they were made with.
#[derive(Clone)]
pub struct P2pMetrics(Arc<libp2p::metrics::Metrics>);

impl P2pMetrics {
    /// Registers libp2p's metrics (prefixed `libp2p_`) in `registry`.
    pub fn new(registry: &mut prometheus_client::registry::Registry) -> Self {
        P2pMetrics(Arc::new(libp2p::metrics::Metrics::new(registry)))
    }
}

impl std::fmt::Debug for P2pMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("P2pMetrics")
    }
}

/// What the network tells the rest of the process.
#[derive(Clone, Debug)]
pub enum NetEvent {
    /// A valid advert arrived (the advert, its signed form, and the peer that forwarded it).
    Advert {
        advert: Box<ProviderAdvert>,
        signed: Box<Signed<ProviderAdvert>>,
        via: PeerId,
    },
    /// An advert failed validation and was not forwarded.
    Rejected {
        source: Option<PeerId>,
        via: PeerId,
        reason: String,
    },
    Connected(PeerId),
    /// The last connection to this peer closed.
    Disconnected(PeerId),
    /// A ping round trip.
    Rtt {
        peer: PeerId,
        rtt: Duration,
    },
}

/// A connected peer.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PeerInfo {
    pub peer_id: String,
    pub addrs: Vec<String>,
    pub rtt_ms: Option<f64>,
    pub agent: Option<String>,
}

enum Command {
    SetAdvert(Box<ProviderAdvert>, oneshot::Sender<Result<(), NetError>>),
    PublishRaw(Vec<u8>, oneshot::Sender<Result<(), NetError>>),
    Provide(Vec<Digest>),
    FindProviders(Digest, oneshot::Sender<Vec<PeerId>>),
    Dial(Multiaddr, oneshot::Sender<Result<(), NetError>>),
    DialPeer(PeerId, oneshot::Sender<Result<(), NetError>>),
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Peers(oneshot::Sender<Vec<PeerInfo>>),
    Shutdown(oneshot::Sender<()>),
}

/// Cloneable handle to the swarm task.
#[derive(Clone)]
pub struct Network {
    tx: mpsc::Sender<Command>,
    events: broadcast::Sender<NetEvent>,
    peer_id: PeerId,
}

impl Network {
    /// Builds the swarm, starts listening and dialling, and spawns its task.
    pub async fn start(config: NetworkConfig) -> Result<Network, NetError> {
        let peer_id = config.keypair.peer_id();
        let mut swarm = behaviour::build_swarm(&config)?;
        for addr in &config.listen {
            swarm
                .listen_on(addr.clone())
                .map_err(|e| NetError::Listen(format!("{addr}: {e}")))?;
        }
        for addr in &config.external {
            swarm.add_external_address(addr.clone());
        }
        let (tx, rx) = mpsc::channel(256);
        let (events, _) = broadcast::channel(1024);
        let mut actor = Actor {
            swarm,
            keypair: config.keypair.clone(),
            events: events.clone(),
            policy: config.advert_policy,
            bootstrap: config.bootstrap.clone(),
            seqs: seqs::SeqTable::new(config.advert_policy, seqs::MAX_SOURCES),
            advert: None,
            seq: 0,
            publish_pending: false,
            provided: HashSet::new(),
            queries: HashMap::new(),
            rtt: HashMap::new(),
            agents: HashMap::new(),
            connected: HashSet::new(),
            unheard_since: None,
            metrics: config.metrics.clone(),
        };
        actor.dial_bootstrap();
        tokio::spawn(actor.run(rx));
        Ok(Network {
            tx,
            events,
            peer_id,
        })
    }

    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<NetEvent> {
        self.events.subscribe()
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NetError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    /// Publishes `advert` now and keeps it as this peer's advert: it is signed here with a
    /// fresh timestamp and a sequence number above any earlier one, and republished when a
    /// peer subscribes. Call again to refresh.
    pub async fn set_advert(&self, advert: ProviderAdvert) -> Result<(), NetError> {
        self.ask(|r| Command::SetAdvert(Box::new(advert), r))
            .await?
    }

    /// Publishes arbitrary bytes on the advert topic (tests and fault injection).
    pub async fn publish_raw(&self, bytes: Vec<u8>) -> Result<(), NetError> {
        self.ask(|r| Command::PublishRaw(bytes, r)).await?
    }

    /// Makes this peer a kademlia provider of exactly these model digests.
    pub async fn provide(&self, digests: Vec<Digest>) -> Result<(), NetError> {
        self.tx
            .send(Command::Provide(digests))
            .await
            .map_err(|_| NetError::Stopped)
    }

    /// Peers that provide `digest`, from the DHT.
    pub async fn find_providers(&self, digest: Digest) -> Result<Vec<PeerId>, NetError> {
        self.ask(|r| Command::FindProviders(digest, r)).await
    }

    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NetError> {
        self.ask(|r| Command::Dial(addr, r)).await?
    }

    /// Dials a peer by id, at the addresses the swarm knows for it (kademlia's).
    pub async fn dial_peer(&self, peer: PeerId) -> Result<(), NetError> {
        self.ask(|r| Command::DialPeer(peer, r)).await?
    }

    /// Where this peer listens (with `/p2p/<id>` appended, ready to use as a bootstrap).
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NetError> {
        self.ask(Command::ListenAddrs).await
    }

    pub async fn peers(&self) -> Result<Vec<PeerInfo>, NetError> {
        self.ask(Command::Peers).await
    }

    /// Closes the swarm; idempotent.
    pub async fn shutdown(&self) {
        let _ = self.ask(Command::Shutdown).await;
    }
}

/// How long a node with peers but no subscriber to its adverts waits before it reconnects.
const UNHEARD_LIMIT: Duration = Duration::from_secs(10);

struct Actor {
    swarm: Swarm<Behaviour>,
    keypair: Keypair,
    events: broadcast::Sender<NetEvent>,
    policy: AdvertPolicy,
    bootstrap: Vec<Multiaddr>,
    seqs: seqs::SeqTable,
    advert: Option<Box<ProviderAdvert>>,
    seq: u64,
    publish_pending: bool,
    provided: HashSet<Digest>,
    queries: HashMap<QueryId, (oneshot::Sender<Vec<PeerId>>, HashSet<PeerId>)>,
    rtt: HashMap<PeerId, Duration>,
    agents: HashMap<PeerId, String>,
    connected: HashSet<PeerId>,
    /// Since when this node, with an advert to publish and peers connected, has known no
    /// peer subscribed to adverts.
    unheard_since: Option<Instant>,
    metrics: Option<P2pMetrics>,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last_bootstrap = Instant::now();
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(Command::Shutdown(reply)) => {
                        let peers: Vec<_> = self.swarm.connected_peers().copied().collect();
                        for p in peers {
                            let _ = self.swarm.disconnect_peer_id(p);
                        }
                        let _ = reply.send(());
                        break;
                    }
                    Some(cmd) => self.command(cmd),
                    None => break,
                },
                event = self.swarm.select_next_some() => self.swarm_event(event),
                _ = tick.tick() => {
                    if self.publish_pending {
                        let _ = self.publish_advert();
                    }
                    if self.unheard_for_too_long() {
                        // Start over: once the old connections are gone, the peers meet
                        // this node again and tell it their subscriptions.
                        let peers: Vec<_> = self.swarm.connected_peers().copied().collect();
                        warn!(peers = peers.len(), "no peer takes this node's adverts: reconnecting");
                        for p in peers {
                            let _ = self.swarm.disconnect_peer_id(p);
                        }
                    }
                    if self.connected.is_empty() && !self.bootstrap.is_empty()
                        && last_bootstrap.elapsed() > Duration::from_secs(5) {
                        self.dial_bootstrap();
                        last_bootstrap = Instant::now();
                    } else if last_bootstrap.elapsed() > Duration::from_secs(60) {
                        let _ = self.swarm.behaviour_mut().kad.bootstrap();
                        last_bootstrap = Instant::now();
                    }
                }
            }
        }
        debug!("swarm task stopped");
    }

    /// True once, after [`UNHEARD_LIMIT`] of having an advert to publish and peers
    /// connected but no peer known to subscribe to adverts. That happens to a node that
    /// restarts while its peers still hold their connections to its old instance: gossipsub
    /// sends its subscriptions only on a peer's first connection, so they never reach the
    /// new instance, and its adverts reach nobody.
    fn unheard_for_too_long(&mut self) -> bool {
        if self.advert.is_none() || self.connected.is_empty() {
            self.unheard_since = None;
            return false;
        }
        let topic = gossipsub::IdentTopic::new(ADVERT_TOPIC).hash();
        let heard = self
            .swarm
            .behaviour()
            .gossipsub
            .all_peers()
            .any(|(_, topics)| topics.contains(&&topic));
        if heard {
            self.unheard_since = None;
            return false;
        }
        let since = *self.unheard_since.get_or_insert_with(Instant::now);
        if since.elapsed() < UNHEARD_LIMIT {
            return false;
        }
        self.unheard_since = None;
        true
    }

    fn dial_bootstrap(&mut self) {
        for addr in self.bootstrap.clone() {
            if let Err(e) = self.swarm.dial(addr.clone()) {
                debug!(%addr, error = %e, "bootstrap dial failed");
            }
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::SetAdvert(advert, reply) => {
                self.advert = Some(advert);
                let _ = reply.send(self.publish_advert());
            }
            Command::PublishRaw(bytes, reply) => {
                let topic = gossipsub::IdentTopic::new(ADVERT_TOPIC);
                let r = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(topic, bytes)
                    .map(|_| ())
                    .map_err(|e| NetError::Publish(e.to_string()));
                let _ = reply.send(r);
            }
            Command::Provide(digests) => {
                let want: HashSet<Digest> = digests.into_iter().collect();
                let kad = &mut self.swarm.behaviour_mut().kad;
                for gone in self.provided.difference(&want) {
                    kad.stop_providing(&kad::RecordKey::new(&gone.0));
                }
                for new in want.difference(&self.provided) {
                    if let Err(e) = kad.start_providing(kad::RecordKey::new(&new.0)) {
                        warn!(digest = %new.short(), error = %e, "cannot provide model");
                    }
                }
                self.provided = want;
            }
            Command::FindProviders(digest, reply) => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_providers(kad::RecordKey::new(&digest.0));
                self.queries.insert(id, (reply, HashSet::new()));
            }
            Command::Dial(addr, reply) => {
                let r = self
                    .swarm
                    .dial(addr.clone())
                    .map_err(|e| NetError::Dial(format!("{addr}: {e}")));
                let _ = reply.send(r);
            }
            Command::DialPeer(peer, reply) => {
                let r = if self.connected.contains(&peer) {
                    Ok(())
                } else {
                    self.swarm
                        .dial(peer)
                        .map_err(|e| NetError::Dial(format!("{peer}: {e}")))
                };
                let _ = reply.send(r);
            }
            Command::ListenAddrs(reply) => {
                let me = *self.swarm.local_peer_id();
                let addrs = self
                    .swarm
                    .listeners()
                    .map(|a| a.clone().with(libp2p::multiaddr::Protocol::P2p(me)))
                    .collect();
                let _ = reply.send(addrs);
            }
            Command::Peers(reply) => {
                let peers = self
                    .connected
                    .iter()
                    .map(|p| PeerInfo {
                        peer_id: p.to_string(),
                        addrs: Vec::new(),
                        rtt_ms: self.rtt.get(p).map(|d| d.as_secs_f64() * 1000.0),
                        agent: self.agents.get(p).cloned(),
                    })
                    .collect();
                let _ = reply.send(peers);
            }
            Command::Shutdown(_) => unreachable!("handled by the loop"),
        }
    }

    /// Signs the current advert with the next sequence number and publishes it; with no
    /// subscribed peer yet, tries again on the next tick.
    fn publish_advert(&mut self) -> Result<(), NetError> {
        let Some(template) = &self.advert else {
            return Ok(());
        };
        let now = now_ms();
        // Sequence numbers start at the clock so a restarted node is newer than before.
        self.seq = (self.seq + 1).max(now);
        let mut advert = (**template).clone();
        advert.peer_id = self.keypair.peer_id();
        advert.timestamp_ms = now;
        advert.seq = self.seq;
        // Confirmed external addresses first (others reach us there), then the listeners.
        let mut addrs: Vec<String> = Vec::new();
        for a in self
            .swarm
            .external_addresses()
            .chain(self.swarm.listeners())
        {
            let a = a.to_string();
            if !addrs.contains(&a) {
                addrs.push(a);
            }
        }
        addrs.truncate(8);
        advert.listen_addrs = addrs;
        let bytes = Signed::sign(&self.keypair, &advert)?.encode()?;
        let topic = gossipsub::IdentTopic::new(ADVERT_TOPIC);
        match self.swarm.behaviour_mut().gossipsub.publish(topic, bytes) {
            Ok(_) => {
                self.publish_pending = false;
                Ok(())
            }
            Err(PublishError::NoPeersSubscribedToTopic) | Err(PublishError::AllQueuesFull(_)) => {
                self.publish_pending = true;
                Ok(())
            }
            Err(e) => {
                self.publish_pending = true;
                Err(NetError::Publish(e.to_string()))
            }
        }
    }

    fn swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        if let Some(m) = &self.metrics {
            record(m, &event);
        }
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "p2p listening");
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                num_established,
                ..
            } if num_established.get() == 1 => {
                self.connected.insert(peer_id);
                let _ = self.events.send(NetEvent::Connected(peer_id));
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.connected.remove(&peer_id);
                self.rtt.remove(&peer_id);
                let _ = self.events.send(NetEvent::Disconnected(peer_id));
            }
            SwarmEvent::Behaviour(event) => self.behaviour_event(event),
            _ => {}
        }
    }

    fn behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                let speaks_beacon = info
                    .protocols
                    .iter()
                    .any(|p| p.as_ref() == beacon_proto::KAD_PROTOCOL);
                self.agents.insert(peer_id, info.agent_version.clone());
                if speaks_beacon {
                    for addr in info.listen_addrs.into_iter().take(16) {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                }
            }
            BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            }) => {
                self.rtt.insert(peer, rtt);
                let _ = self.events.send(NetEvent::Rtt { peer, rtt });
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                let (acceptance, event) = self.judge(propagation_source, &message);
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, acceptance);
                let _ = self.events.send(event);
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { peer_id, .. }) => {
                debug!(peer = %peer_id, "peer subscribed to adverts");
                if self.advert.is_some() {
                    // A newcomer should learn about us now, not at the next refresh.
                    self.publish_pending = true;
                }
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: QueryResult::GetProviders(r),
                step,
                ..
            }) => {
                let done = match r {
                    Ok(GetProvidersOk::FoundProviders { providers, .. }) => {
                        if let Some((_, found)) = self.queries.get_mut(&id) {
                            found.extend(providers);
                        }
                        step.last
                    }
                    Ok(GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) => true,
                    Err(e) => {
                        debug!(error = %e, "provider lookup ended");
                        true
                    }
                };
                if done && let Some((reply, found)) = self.queries.remove(&id) {
                    let _ = reply.send(found.into_iter().collect());
                }
            }
            _ => {}
        }
    }

    /// Decides what happens to a gossiped advert.
    fn judge(
        &mut self,
        via: PeerId,
        message: &gossipsub::Message,
    ) -> (MessageAcceptance, NetEvent) {
        let reject = |source: Option<PeerId>, reason: String, acceptance| {
            (
                acceptance,
                NetEvent::Rejected {
                    source,
                    via,
                    reason,
                },
            )
        };
        let Some(source) = message.source else {
            return reject(None, "unsigned message".into(), MessageAcceptance::Reject);
        };
        let now = now_ms();
        let too_soon = || {
            reject(
                Some(source),
                format!(
                    "adverts from one source at most every {} ms",
                    seqs::MIN_INTERVAL_MS
                ),
                MessageAcceptance::Ignore,
            )
        };
        // A source that advertises too often is turned away before any decoding or
        // signature check (review H3).
        if self.seqs.too_soon(&source, now) {
            return too_soon();
        }
        let signed = match Signed::<ProviderAdvert>::decode(&message.data) {
            Ok(s) => s,
            Err(e) => return reject(Some(source), e.to_string(), MessageAcceptance::Reject),
        };
        let last = self.seqs.last(&source, now);
        match validate_advert(&signed, &source, now, last, self.policy) {
            Ok(advert) => {
                match self.seqs.record(source, advert.seq, now) {
                    Ok(()) => {}
                    Err(seqs::Refused::Full) => {
                        return reject(
                            Some(source),
                            "too many advertisers: new sources wait until some go quiet".into(),
                            MessageAcceptance::Ignore,
                        );
                    }
                    Err(seqs::Refused::TooSoon) => return too_soon(),
                }
                (
                    MessageAcceptance::Accept,
                    NetEvent::Advert {
                        advert: Box::new(advert),
                        signed: Box::new(signed),
                        via,
                    },
                )
            }
            Err(e) => {
                // Old news may be an honest delay: ignore it. Anything forged is punished.
                let text = e.to_string();
                let acceptance = match e {
                    beacon_proto::ProtoError::Outdated { .. } => MessageAcceptance::Ignore,
                    _ => MessageAcceptance::Reject,
                };
                debug!(%source, %via, reason = %text, "advert refused");
                reject(Some(source), text, acceptance)
            }
        }
    }
}

/// Records a swarm event, and the behaviour event inside it, in libp2p's metrics.
fn record(m: &P2pMetrics, event: &SwarmEvent<BehaviourEvent>) {
    use libp2p::metrics::Recorder;
    let m = &m.0;
    m.record(event);
    if let SwarmEvent::Behaviour(e) = event {
        match e {
            BehaviourEvent::Identify(e) => m.record(e),
            BehaviourEvent::Ping(e) => m.record(e),
            BehaviourEvent::Kad(e) => m.record(e),
            BehaviourEvent::Gossipsub(e) => m.record(e),
            _ => {}
        }
    }
}
