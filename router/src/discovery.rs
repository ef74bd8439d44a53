//! Keeps the router connected to every provider it knows of, which gives each one a
//! measured ping RTT for placement and makes its adverts arrive directly: providers from
//! adverts are dialled at their advertised addresses, and kademlia is asked, for every model
//! on the network, who else provides it; those are dialled by peer id so their adverts
//! reach the directory too.

use std::collections::HashSet;
use std::time::Duration;

use beacon_net::Network;
use beacon_proto::PeerId;
use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use tracing::debug;

use crate::directory::RouterDirectory;

/// Runs until the network stops.
pub async fn run(network: Network, directory: RouterDirectory, every: Duration) {
    let dial_private = directory.dial_private;
    let me = network.peer_id();
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        for peer in directory.police_pins() {
            debug!(%peer, "advert names a pinned model with another digest: ignored");
        }
        let Ok(peers) = network.peers().await else {
            return;
        };
        let connected: HashSet<String> = peers.into_iter().map(|p| p.peer_id).collect();
        // Providers from adverts we have no connection to: dial their advertised addresses.
        let known: Vec<(PeerId, Vec<String>)> = {
            let live = directory.live.read().unwrap_or_else(|p| p.into_inner());
            live.entries()
                .map(|e| (e.advert.peer_id, e.advert.listen_addrs.clone()))
                .collect()
        };
        for (peer, addrs) in &known {
            if *peer == me || connected.contains(&peer.to_string()) {
                continue;
            }
            if let Some(addr) = dialable(addrs, *peer, dial_private) {
                debug!(%peer, %addr, "dialling a provider known from its advert");
                let _ = network.dial(addr).await;
            }
        }
        // Providers kademlia knows for each model that adverts have not told us about.
        let known: HashSet<PeerId> = known.into_iter().map(|(p, _)| p).collect();
        let digests: HashSet<_> = directory.models().into_values().map(|(d, _)| d).collect();
        for digest in digests {
            let Ok(found) = network.find_providers(digest).await else {
                return;
            };
            for peer in found {
                if peer != me && !known.contains(&peer) && !connected.contains(&peer.to_string()) {
                    debug!(%peer, digest = %digest.short(), "dialling a provider found in the DHT");
                    let _ = network.dial_peer(peer).await;
                }
            }
        }
    }
}

/// The first advertised address that names a concrete host (a public one unless
/// `private` allows others: review M9), with `/p2p/<peer>` appended.
fn dialable(addrs: &[String], peer: PeerId, private: bool) -> Option<Multiaddr> {
    addrs.iter().find_map(|a| {
        let addr: Multiaddr = a.parse().ok()?;
        if !private
            && beacon_net::addr::multiaddr_ip(&addr)
                .is_some_and(|ip| !beacon_net::addr::is_public(ip))
        {
            return None;
        }
        let unspecified = addr.iter().any(|p| match p {
            Protocol::Ip4(ip) => ip.is_unspecified(),
            Protocol::Ip6(ip) => ip.is_unspecified(),
            _ => false,
        });
        if unspecified {
            return None;
        }
        let addr = if addr.iter().any(|p| matches!(p, Protocol::P2p(_))) {
            addr
        } else {
            addr.with(Protocol::P2p(peer))
        };
        Some(addr)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_a_concrete_address() {
        let peer = beacon_proto::Keypair::generate().peer_id();
        let addrs = vec![
            "/ip4/0.0.0.0/udp/4001/quic-v1".to_string(),
            "not an address".to_string(),
            "/ip4/10.1.2.3/udp/4001/quic-v1".to_string(),
        ];
        let a = dialable(&addrs, peer, true).unwrap();
        assert_eq!(
            a.to_string(),
            format!("/ip4/10.1.2.3/udp/4001/quic-v1/p2p/{peer}")
        );
        assert!(dialable(&addrs[..2], peer, true).is_none());
        // Review M9: a router on the internet dials no private address a peer names.
        assert!(dialable(&addrs, peer, false).is_none());
        let public = vec![
            "/ip4/127.0.0.1/udp/4001/quic-v1".to_string(),
            "/ip4/203.0.114.9/udp/4001/quic-v1".to_string(),
        ];
        let a = dialable(&public, peer, false).unwrap();
        assert!(a.to_string().starts_with("/ip4/203.0.114.9/"), "{a}");
    }
}
