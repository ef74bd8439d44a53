//! The swarm's behaviours and their configuration, tuned for networks of a few to a few
//! thousand providers (gossipsub mesh parameters that still work with two peers).

use std::time::Duration;

use beacon_proto::{ADVERT_TOPIC, KAD_PROTOCOL, ProviderAdvert, Wire};
use libp2p::gossipsub::{
    self, IdentityTransform, MessageAuthenticity, PeerScoreParams, PeerScoreThresholds,
    TopicScoreParams, ValidationMode, WhitelistSubscriptionFilter,
};
use libp2p::kad::{self, store::MemoryStore};
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{StreamProtocol, Swarm, connection_limits, identify, memory_connection_limits, ping};

use super::NetworkConfig;
use crate::NetError;

type Gossip = gossipsub::Behaviour<IdentityTransform, WhitelistSubscriptionFilter>;

#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    /// First: it denies connections over the limits before the others see them.
    pub limits: connection_limits::Behaviour,
    /// Then no new connection while the process holds more memory than allowed.
    pub memory: Toggle<memory_connection_limits::Behaviour>,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub kad: kad::Behaviour<MemoryStore>,
    pub gossipsub: Gossip,
}

fn gossip(keypair: &libp2p::identity::Keypair) -> Result<Gossip, NetError> {
    let topic = gossipsub::IdentTopic::new(ADVERT_TOPIC);
    let config = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(Duration::from_millis(700))
        // Small networks: a mesh of one is still a mesh.
        .mesh_n(4)
        .mesh_n_low(1)
        .mesh_n_high(8)
        .mesh_outbound_min(0)
        .gossip_lazy(4)
        .validation_mode(ValidationMode::Strict)
        .validate_messages()
        .max_transmit_size(ProviderAdvert::MAX_BYTES + 1024)
        .message_id_fn(|m: &gossipsub::Message| {
            gossipsub::MessageId::from(beacon_proto::Digest::of(&m.data).0.to_vec())
        })
        .duplicate_cache_time(Duration::from_secs(120))
        .build()
        .map_err(|e| NetError::Config(format!("gossipsub: {e}")))?;
    let filter = WhitelistSubscriptionFilter([topic.hash()].into_iter().collect());
    let mut behaviour = Gossip::new_with_subscription_filter(
        MessageAuthenticity::Signed(keypair.clone()),
        config,
        filter,
    )
    .map_err(|e| NetError::Config(format!("gossipsub: {e}")))?;

    // Peer scoring: an invalid advert costs its sender; a few push it under the graylist.
    // Delivery-rate penalties are off: adverts are rare and small networks are quiet.
    // Delivering adverts first earns little (at most +1), so a flood of valid adverts buys
    // no credit against penalties (review H3).
    let mut params = PeerScoreParams::default();
    let mut topic_params = TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.0,
        first_message_deliveries_weight: 0.1,
        first_message_deliveries_cap: 10.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -20.0,
        invalid_message_deliveries_decay: 0.9,
        ..TopicScoreParams::default()
    };
    topic_params.first_message_deliveries_decay = 0.9;
    params.topics.insert(topic.hash(), topic_params);
    // Sybils on one address: past 10 peers from one IP, each loses (n - 10)^2 x 5, so 14
    // are graylisted (review H3). Loopback is exempt (peers on one machine: tests, a
    // router next to its provider).
    params.ip_colocation_factor_weight = -5.0;
    params.ip_colocation_factor_threshold = 10.0;
    params.ip_colocation_factor_whitelist = [
        std::net::IpAddr::from([127, 0, 0, 1]),
        std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
    ]
    .into_iter()
    .collect();
    let thresholds = PeerScoreThresholds {
        gossip_threshold: -10.0,
        publish_threshold: -50.0,
        graylist_threshold: -80.0,
        accept_px_threshold: 10.0,
        opportunistic_graft_threshold: 3.0,
    };
    behaviour
        .with_peer_score(params, thresholds)
        .map_err(|e| NetError::Config(format!("peer scoring: {e}")))?;
    behaviour
        .subscribe(&topic)
        .map_err(|e| NetError::Config(format!("subscribe: {e}")))?;
    Ok(behaviour)
}

pub(super) fn build_swarm(config: &NetworkConfig) -> Result<Swarm<Behaviour>, NetError> {
    let keypair = config.keypair.to_libp2p();
    let provider_ttl = config.provider_ttl;
    let max_memory = config.max_memory_fraction;
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established_incoming(Some(config.max_incoming))
        .with_max_pending_incoming(Some(config.max_incoming.div_ceil(2)))
        .with_max_established_per_peer(Some(config.max_per_peer));
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_other_transport(|key| {
            let chosen = config
                .bootstrap
                .iter()
                .filter_map(crate::addr::multiaddr_ip)
                .collect();
            super::transport::build(key, config.dial_private, chosen)
        })
        .map_err(|e| NetError::Config(format!("transport: {e}")))?
        // `/dns4/…` bootstrap peers (Compose service names, Kubernetes Services).
        .with_dns()
        .map_err(|e| NetError::Config(format!("system DNS configuration: {e}")))?
        .with_behaviour(|key| {
            let peer_id = key.public().to_peer_id();
            let identify = identify::Behaviour::new(
                identify::Config::new("/beacon/1".into(), key.public())
                    .with_agent_version(format!("beacon/{}", env!("CARGO_PKG_VERSION")))
                    .with_push_listen_addr_updates(true),
            );
            let ping = ping::Behaviour::new(
                ping::Config::new()
                    .with_interval(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(10)),
            );
            let mut kad_config = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
            kad_config
                .set_query_timeout(Duration::from_secs(20))
                .set_provider_record_ttl(Some(provider_ttl))
                .set_provider_publication_interval(Some(provider_ttl / 2))
                .set_periodic_bootstrap_interval(Some(Duration::from_secs(60)));
            let mut kad =
                kad::Behaviour::with_config(peer_id, MemoryStore::new(peer_id), kad_config);
            // Providers answer DHT queries even without a confirmed external address.
            kad.set_mode(Some(kad::Mode::Server));
            let gossipsub = gossip(key).map_err(Box::new)?;
            Ok(Behaviour {
                limits: connection_limits::Behaviour::new(limits),
                memory: Toggle::from(
                    max_memory.map(memory_connection_limits::Behaviour::with_max_percentage),
                ),
                identify,
                ping,
                kad,
                gossipsub,
            })
        })
        .map_err(|e| NetError::Config(format!("behaviour: {e}")))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    Ok(swarm)
}
