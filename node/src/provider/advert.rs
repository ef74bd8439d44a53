//! Keeps this node's advert current: every interval it gathers hardware, cached models,
//! slot use and measured throughput, hands the advert to the network (which signs and
//! gossips it) and makes the node a kademlia provider of each cached model's digest.

use std::sync::Arc;
use std::time::Duration;

use beacon_net::Network;
use beacon_proto::{CachedModel, Digest, ProviderAdvert, Slots};
use tracing::warn;

use super::Throughput;
use crate::scheduler::Scheduler;
use crate::store::Store;

/// What the advertiser needs.
pub struct Advertiser {
    pub network: Network,
    pub store: Store,
    pub scheduler: Scheduler,
    pub throughput: Arc<Throughput>,
    pub region: String,
    /// QUIC data-plane address others should dial (`host:port`).
    pub data_plane: String,
    /// Sequences per model (the engine's `parallel`).
    pub parallel: u32,
    pub interval: Duration,
    /// The last advert handed to the network, for `/beacon/node`.
    pub last: LastAdvert,
    /// Attack (h), for tests: claim 4096 slots and a million tokens/s per model.
    pub overstate: bool,
    /// Advertise tags whose registry is on a private network too (review L4).
    pub private_tags: bool,
}

/// Whether a local tag may be gossiped: not one whose registry is on a private network
/// (its name or address tells the world about the provider's network), unless the
/// operator says so; unparsable tags never.
fn advertisable(tag: &str, private_tags: bool) -> bool {
    beacon_proto::ModelRef::parse(tag).is_ok_and(|r| private_tags || !r.is_private_registry())
}

/// The advert this node published last (none before the first).
pub type LastAdvert = Arc<std::sync::RwLock<Option<ProviderAdvert>>>;

impl Advertiser {
    /// The advert as of now (the network fills in peer id, addresses, sequence and time).
    pub async fn build(&self) -> ProviderAdvert {
        let hardware = tokio::task::spawn_blocking(crate::hardware::detect)
            .await
            .unwrap_or_else(|_| crate::hardware::detect());
        let models: Vec<CachedModel> = match self.store.list() {
            Ok(list) => list
                .into_iter()
                .take(64)
                .map(|m| CachedModel {
                    references: m
                        .tags
                        .into_iter()
                        .filter(|t| advertisable(t, self.private_tags))
                        .take(8)
                        .collect(),
                    digest: m.record.manifest_digest,
                    size: m.record.size,
                    quantization: m.record.facts.quantization.clone(),
                    parameters: m.record.facts.parameters.clone(),
                    architecture: m.record.facts.architecture.clone(),
                    context_size: m
                        .record
                        .facts
                        .context_size
                        .map(|c| c.min(u32::MAX as u64) as u32),
                })
                .collect(),
            Err(e) => {
                warn!(error = %e, "cannot list models for the advert");
                Vec::new()
            }
        };
        let running = self.scheduler.ps().await;
        let slots = Slots {
            total: self.parallel,
            busy: running
                .iter()
                .map(|r| r.in_flight.min(r.parallel) as u32)
                .sum::<u32>()
                .min(self.parallel),
            queued: running.iter().map(|r| r.queued as u32).sum(),
        };
        let (slots, speed) = if self.overstate {
            (
                Slots {
                    total: 4096,
                    busy: 0,
                    queued: 0,
                },
                Some(1e6),
            )
        } else {
            (slots, None)
        };
        ProviderAdvert {
            peer_id: self.network.peer_id(),
            region: self.region.clone(),
            listen_addrs: Vec::new(),
            data_plane: Some(self.data_plane.clone()),
            version: crate::VERSION.to_string(),
            accelerators: hardware.accelerators,
            host: hardware.host,
            engines: vec![hardware.backend.to_string()],
            throughput: match speed {
                Some(tokens_per_second) => models
                    .iter()
                    .map(|m| beacon_proto::Throughput {
                        model: m.digest,
                        tokens_per_second,
                    })
                    .collect(),
                None => self
                    .throughput
                    .all()
                    .into_iter()
                    .filter(|(d, _)| models.iter().any(|m| m.digest == *d))
                    .map(|(model, tokens_per_second)| beacon_proto::Throughput {
                        model,
                        tokens_per_second,
                    })
                    .collect(),
            },
            models,
            slots,
            price: None,
            seq: 0,
            timestamp_ms: 0,
        }
    }

    /// Publishes now and then every interval until the network stops.
    pub async fn run(self) {
        let mut tick = tokio::time::interval(self.interval);
        loop {
            tick.tick().await;
            let advert = self.build().await;
            let digests: Vec<Digest> = advert.models.iter().map(|m| m.digest).collect();
            if self.network.provide(digests).await.is_err() {
                return;
            }
            match self.network.set_advert(advert.clone()).await {
                Ok(()) => {
                    *self.last.write().unwrap_or_else(|p| p.into_inner()) = Some(advert);
                }
                Err(beacon_net::NetError::Stopped) => return,
                Err(e) => warn!(error = %e, "advert not published"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tags_on_private_registries_stay_home() {
        assert!(super::advertisable("ai/smollm2:135M", false));
        assert!(super::advertisable("127.0.0.1:5000/ai/smollm2:t", false));
        assert!(!super::advertisable("10.0.0.7:5000/team/model:v2", false));
        assert!(!super::advertisable(
            "registry.corp.internal/team/model:v2",
            false
        ));
        assert!(super::advertisable(
            "registry.corp.internal/team/model:v2",
            true
        ));
        assert!(!super::advertisable("not a reference", true));
    }
}
