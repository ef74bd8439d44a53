//! The live provider table: the newest valid advert of every provider, dropped when its
//! adverts stop (expiry) or when it has been unreachable for a grace period. Pure state;
//! [`follow`] feeds it from a [`Network`].

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use beacon_proto::{PeerId, ProviderAdvert, Signed};

use crate::p2p::{NetEvent, Network};

/// One provider as last advertised.
#[derive(Clone, Debug)]
pub struct Entry {
    pub advert: ProviderAdvert,
    pub signed: Signed<ProviderAdvert>,
    pub received: Instant,
    /// Since when no connection to it is open (it may still be reachable through others).
    pub disconnected_since: Option<Instant>,
    pub rtt: Option<Duration>,
}

/// Providers kept at most (review H3: identities are free; honest networks are far
/// smaller). When full, adverts of new providers are dropped until some expire; known
/// providers keep updating, so a flood cannot push them out.
pub const MAX_PROVIDERS: usize = 10_000;

/// Providers by peer id.
#[derive(Debug)]
pub struct Directory {
    entries: HashMap<PeerId, Entry>,
    /// Providers kept at most ([`MAX_PROVIDERS`] unless set).
    pub max_entries: usize,
    /// Without a new advert for this long, a provider is gone.
    pub expire_after: Duration,
    /// Disconnected for this long, a provider is gone.
    pub disconnect_grace: Duration,
}

impl Directory {
    pub fn new(expire_after: Duration, disconnect_grace: Duration) -> Self {
        Directory {
            entries: HashMap::new(),
            max_entries: MAX_PROVIDERS,
            expire_after,
            disconnect_grace,
        }
    }

    /// Records a validated advert (the caller validated it); false when the table is full
    /// and the provider is not in it.
    pub fn insert(
        &mut self,
        advert: ProviderAdvert,
        signed: Signed<ProviderAdvert>,
        now: Instant,
    ) -> bool {
        if !self.entries.contains_key(&advert.peer_id) && self.entries.len() >= self.max_entries {
            return false;
        }
        let rtt = self.entries.get(&advert.peer_id).and_then(|e| e.rtt);
        self.entries.insert(
            advert.peer_id,
            Entry {
                advert,
                signed,
                received: now,
                disconnected_since: None,
                rtt,
            },
        );
        true
    }

    /// Applies a network event.
    pub fn apply(&mut self, event: &NetEvent, now: Instant) {
        match event {
            NetEvent::Advert { advert, signed, .. } => {
                if !self.insert((**advert).clone(), (**signed).clone(), now) {
                    tracing::debug!(peer = %advert.peer_id, "directory full: advert dropped");
                }
            }
            NetEvent::Disconnected(peer) => {
                if let Some(e) = self.entries.get_mut(peer) {
                    e.disconnected_since.get_or_insert(now);
                }
            }
            NetEvent::Connected(peer) => {
                if let Some(e) = self.entries.get_mut(peer) {
                    e.disconnected_since = None;
                }
            }
            NetEvent::Rtt { peer, rtt } => {
                if let Some(e) = self.entries.get_mut(peer) {
                    e.rtt = Some(*rtt);
                }
            }
            NetEvent::Rejected { .. } => {}
        }
    }

    /// Drops silent and unreachable providers; returns who was dropped.
    pub fn expire(&mut self, now: Instant) -> Vec<PeerId> {
        let (expire, grace) = (self.expire_after, self.disconnect_grace);
        let gone: Vec<PeerId> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                now.duration_since(e.received) > expire
                    || e.disconnected_since
                        .is_some_and(|t| now.duration_since(t) > grace)
            })
            .map(|(p, _)| *p)
            .collect();
        for p in &gone {
            self.entries.remove(p);
        }
        gone
    }

    pub fn get(&self, peer: &PeerId) -> Option<&Entry> {
        self.entries.get(peer)
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A directory shared between the task that feeds it and its readers.
pub type SharedDirectory = Arc<RwLock<Directory>>;

/// Feeds `directory` from `network` and expires entries every second, until the network
/// stops.
pub fn follow(network: &Network, directory: SharedDirectory) -> tokio::task::JoinHandle<()> {
    let mut events = network.subscribe();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                e = events.recv() => match e {
                    Ok(event) => write(&directory).apply(&event, Instant::now()),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "directory fell behind the network events");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                _ = tick.tick() => {
                    for peer in write(&directory).expire(Instant::now()) {
                        tracing::info!(%peer, "provider left the directory");
                    }
                }
            }
        }
    })
}

fn write(d: &SharedDirectory) -> std::sync::RwLockWriteGuard<'_, Directory> {
    d.write().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use beacon_proto::{HostInfo, Keypair, Slots};

    fn advert(kp: &Keypair) -> (ProviderAdvert, Signed<ProviderAdvert>) {
        let a = ProviderAdvert {
            peer_id: kp.peer_id(),
            region: "eu-west".into(),
            listen_addrs: vec![],
            data_plane: None,
            version: "0".into(),
            accelerators: vec![],
            host: HostInfo::default(),
            engines: vec![],
            models: vec![],
            slots: Slots::default(),
            throughput: vec![],
            price: None,
            seq: 1,
            timestamp_ms: 1,
        };
        let s = Signed::sign(kp, &a).unwrap();
        (a, s)
    }

    #[test]
    fn silent_and_unreachable_providers_expire() {
        let mut d = Directory::new(Duration::from_secs(30), Duration::from_secs(5));
        let t0 = Instant::now();
        let (a, b) = (Keypair::generate(), Keypair::generate());
        let (ad, s) = advert(&a);
        d.insert(ad, s, t0);
        let (ad, s) = advert(&b);
        d.insert(ad, s, t0);
        d.apply(
            &NetEvent::Disconnected(b.peer_id()),
            t0 + Duration::from_secs(1),
        );
        assert!(d.expire(t0 + Duration::from_secs(3)).is_empty());
        assert_eq!(d.expire(t0 + Duration::from_secs(7)), vec![b.peer_id()]);
        assert_eq!(d.len(), 1);
        // Reconnecting before the grace ends keeps a provider.
        let (ad, s) = advert(&b);
        d.insert(ad, s, t0 + Duration::from_secs(8));
        d.apply(
            &NetEvent::Disconnected(b.peer_id()),
            t0 + Duration::from_secs(9),
        );
        d.apply(
            &NetEvent::Connected(b.peer_id()),
            t0 + Duration::from_secs(10),
        );
        assert!(d.expire(t0 + Duration::from_secs(20)).is_empty());
        assert_eq!(d.expire(t0 + Duration::from_secs(31)), vec![a.peer_id()]);
        assert!(d.get(&b.peer_id()).is_some());
    }

    /// Review H3: the table grew with every identity a flooder made up. Full, it drops
    /// newcomers and keeps updating the providers it has; expiry makes room again.
    #[test]
    fn a_full_directory_keeps_its_providers_and_drops_newcomers() {
        let mut d = Directory::new(Duration::from_secs(60), Duration::from_secs(10));
        d.max_entries = 3;
        let t0 = Instant::now();
        let known: Vec<Keypair> = (0..3).map(|_| Keypair::generate()).collect();
        for k in &known {
            let (a, s) = advert(k);
            assert!(d.insert(a, s, t0));
        }
        let flooder = Keypair::generate();
        let (a, s) = advert(&flooder);
        assert!(!d.insert(a.clone(), s.clone(), t0));
        assert!(d.get(&flooder.peer_id()).is_none());
        let (mut a2, _) = advert(&known[0]);
        a2.seq = 2;
        let s2 = Signed::sign(&known[0], &a2).unwrap();
        assert!(d.insert(a2, s2, t0 + Duration::from_secs(50)));
        assert_eq!(d.get(&known[0].peer_id()).unwrap().advert.seq, 2);
        // The two that went quiet expire; the newcomer then fits.
        assert_eq!(d.expire(t0 + Duration::from_secs(61)).len(), 2);
        assert!(d.insert(a, s, t0 + Duration::from_secs(61)));
        assert_eq!(d.len(), 2);
    }
}
