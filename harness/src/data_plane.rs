//! Helpers for tests that talk to a provider's data plane and the peer-to-peer network
//! directly: a provider's identity and address, simple requests, raw QUIC connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use beacon_net::quic::{DataClient, TlsIdentity, quinn, tls};
use beacon_net::{NetEvent, Network, NetworkConfig};
use beacon_proto::{ChatMessage, Digest, InferRequest, Keypair, PeerId, Role, Sampling};

use crate::NodeServer;
use crate::models::TEST_MODEL_REF;

/// A node's identity, data-plane address and test-model digest.
pub fn provider_of(node: &NodeServer) -> (PeerId, SocketAddr, Digest) {
    let peer: PeerId = node.peer_id().parse().unwrap();
    let digest: Digest = node.model_digest().parse().unwrap();
    (peer, node.data_plane(), digest)
}

/// A 12-token request that asks the model to say `word`.
pub fn request(digest: Digest, word: &str) -> InferRequest {
    infer_request(
        digest,
        vec![ChatMessage {
            role: Role::User,
            content: format!("Say the word \"{word}\" and nothing else."),
        }],
        Sampling {
            max_tokens: 12,
            ..Sampling::default()
        },
    )
}

/// A data-plane client with a fresh identity.
pub fn new_client() -> (Keypair, DataClient) {
    let key = Keypair::generate();
    let c = DataClient::new(&key, "127.0.0.1:0".parse().unwrap()).unwrap();
    (key, c)
}

/// A QUIC connection to a provider made by hand from `endpoint`, with the transport
/// settings a hostile client chooses (`DataClient` keeps them sane).
pub async fn raw_connect(
    endpoint: &quinn::Endpoint,
    key: &Keypair,
    peer: PeerId,
    addr: SocketAddr,
    transport: quinn::TransportConfig,
) -> Result<quinn::Connection, String> {
    let id = TlsIdentity::new(key).unwrap();
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls::client_config(&id, peer).unwrap())
            .unwrap();
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    endpoint
        .connect_with(config, addr, "beacon")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())
}

/// QUIC settings that keep a connection open.
pub fn keep_alive_transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    t
}

/// A peer on loopback joined to `node`'s network, and its events.
pub async fn joined(
    node: &NodeServer,
    key: Keypair,
) -> (Network, tokio::sync::broadcast::Receiver<NetEvent>) {
    let net = joined_at(&node.bootstrap_addr(), key).await;
    let events = net.subscribe();
    (net, events)
}

/// A network peer with identity `key` that bootstraps from the multiaddress `bootstrap`.
pub async fn joined_at(bootstrap: &str, key: Keypair) -> Network {
    let mut config = NetworkConfig::new(key);
    config.listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()];
    config.bootstrap = vec![bootstrap.parse().unwrap()];
    Network::start(config).await.unwrap()
}

/// Lowers the calling thread's scheduling priority to the least (nice 19), so that
/// attackers staged on the same core as an honest client take only the time the client
/// leaves: as if they ran on machines of their own. False when it cannot.
pub fn deprioritise_this_thread() -> bool {
    let Ok(me) = std::fs::read_link("/proc/thread-self") else {
        return false;
    };
    let Some(tid) = me.file_name().and_then(|t| t.to_str()).map(str::to_string) else {
        return false;
    };
    std::process::Command::new("renice")
        .args(["-n", "19", "-p", &tid])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Streams a hostile client opened and never reads: one connection whose receive window
/// takes 8 bytes, `n` requests for up to `max_tokens` tokens of a long story.
pub struct Stalled {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    pub streams: Vec<(quinn::SendStream, quinn::RecvStream)>,
}

impl Stalled {
    pub fn close(self) {
        self.conn.close(0u32.into(), b"done");
    }
}

/// Opens [`Stalled`] streams on `peer` at `addr`.
pub async fn stalled_streams(
    peer: PeerId,
    addr: SocketAddr,
    digest: Digest,
    n: usize,
    max_tokens: u32,
) -> Stalled {
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut tiny = keep_alive_transport();
    tiny.stream_receive_window(8u32.into());
    tiny.receive_window(64u32.into());
    let conn = raw_connect(&endpoint, &Keypair::generate(), peer, addr, tiny)
        .await
        .unwrap();
    let mut streams = Vec::new();
    for _ in 0..n {
        let mut long = request(digest, "river");
        long.messages[0].content = "Write a long story about a river.".into();
        long.sampling.max_tokens = max_tokens;
        let (mut send, recv) = conn.open_bi().await.unwrap();
        beacon_net::quic::write_frame(&mut send, &beacon_proto::DataRequest::Infer(long))
            .await
            .unwrap();
        send.finish().unwrap();
        streams.push((send, recv));
    }
    Stalled {
        _endpoint: endpoint,
        conn,
        streams,
    }
}

/// A data-plane request for the test model (`digest`), asking for token ids back.
pub fn infer_request(
    digest: beacon_proto::Digest,
    messages: Vec<beacon_proto::ChatMessage>,
    sampling: beacon_proto::Sampling,
) -> beacon_proto::InferRequest {
    beacon_proto::InferRequest {
        prompt: None,
        request_id: beacon_proto::Id::random(),
        job_id: None,
        model: beacon_proto::ModelSpec {
            reference: TEST_MODEL_REF.into(),
            digest,
        },
        messages,
        sampling,
        json_schema: None,
        deadline_ms: None,
        return_tokens: true,
    }
}

/// An advert of `peer` that serves nothing (for tests that publish their own, honest or
/// forged).
pub fn advert_of(
    peer: beacon_proto::PeerId,
    timestamp_ms: u64,
    seq: u64,
) -> beacon_proto::ProviderAdvert {
    beacon_proto::ProviderAdvert {
        peer_id: peer,
        region: "test-region".into(),
        listen_addrs: vec![],
        data_plane: Some("127.0.0.1:1".into()),
        version: "test".into(),
        accelerators: vec![],
        host: beacon_proto::HostInfo::default(),
        engines: vec![],
        models: vec![],
        slots: beacon_proto::Slots {
            total: 1,
            busy: 0,
            queued: 0,
        },
        throughput: vec![],
        price: None,
        seq,
        timestamp_ms,
    }
}
