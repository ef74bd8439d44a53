//! The swarm's transports: QUIC, and TCP with noise and yamux, under DNS, with a dial
//! policy. A peer that may not dial private addresses (an internet router: review M9)
//! refuses them here, after DNS has resolved a name, whatever asked for the dial: an
//! advert, a kademlia lookup, identify or gossipsub. Connections others open to us are
//! not affected.

use std::collections::HashSet;
use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{
    Boxed, DialOpts, ListenerId, OrTransport, Transport, TransportError, TransportEvent,
};
use libp2p::core::upgrade::Version;
use libp2p::{Multiaddr, PeerId};

/// A transport that refuses to dial private, loopback and link-local addresses unless
/// `allow_private`, except the `chosen` ones (the operator's bootstrap peers).
pub(super) struct DialPolicy<T> {
    pub inner: T,
    pub allow_private: bool,
    pub chosen: HashSet<IpAddr>,
}

impl<T: Transport + Unpin> Transport for DialPolicy<T> {
    type Output = T::Output;
    type Error = T::Error;
    type ListenerUpgrade = T::ListenerUpgrade;
    type Dial = T::Dial;

    fn listen_on(
        &mut self,
        id: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<Self::Error>> {
        self.inner.listen_on(id, addr)
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        self.inner.remove_listener(id)
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        opts: DialOpts,
    ) -> Result<Self::Dial, TransportError<Self::Error>> {
        if !self.allow_private
            && crate::addr::multiaddr_ip(&addr)
                .is_some_and(|ip| !crate::addr::is_public(ip) && !self.chosen.contains(&ip))
        {
            tracing::debug!(%addr, "not dialling a private address");
            return Err(TransportError::MultiaddrNotSupported(addr));
        }
        self.inner.dial(addr, opts)
    }

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        Pin::new(&mut self.get_mut().inner).poll(cx)
    }
}

/// QUIC or TCP (noise, yamux), dialling by `allow_private` and `chosen`: what the swarm
/// builder's `with_tcp().with_quic()` makes, with the policy in front (DNS goes around it,
/// so a name that resolves to a private address is refused too).
pub(super) fn build(
    key: &libp2p::identity::Keypair,
    allow_private: bool,
    chosen: HashSet<IpAddr>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, Box<dyn std::error::Error + Send + Sync>> {
    let tcp = libp2p::tcp::tokio::Transport::new(libp2p::tcp::Config::default().nodelay(true))
        .upgrade(Version::V1Lazy)
        .authenticate(libp2p::noise::Config::new(key)?)
        .multiplex(libp2p::yamux::Config::default())
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)));
    let quic = libp2p::quic::tokio::Transport::new(libp2p::quic::Config::new(key))
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)));
    let inner = OrTransport::new(quic, tcp).map(|either, _| either.into_inner());
    Ok(DialPolicy {
        inner,
        allow_private,
        chosen,
    }
    .boxed())
}
