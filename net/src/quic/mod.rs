//! The data plane: direct QUIC between a client (a router) and a provider, mutually
//! authenticated by identity keys. One bidirectional stream per subtask: the client writes
//! one [`DataRequest`] and finishes its side; the provider answers with [`DataFrame`]s
//! (deltas, then one result or error). Clients pool one connection per provider.

pub mod frame;
pub mod tls;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use beacon_proto::{
    AuditRequest, AuditResult, Countersignature, DataError, DataErrorCode, DataFrame, DataRequest,
    InferRequest, InferResult, Keypair, PeerId, Signed, Wire,
};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

pub use frame::{read_frame, write_frame};
/// The QUIC implementation, for callers that build their own endpoints (tests of hostile
/// clients, tools).
pub use quinn;
pub use tls::TlsIdentity;

use crate::NetError;
use crate::limits::{Counts, Source, ip_source};

/// Streams a provider serves at once on one connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;
/// Connections a provider accepts at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Connections a provider accepts at once from one IPv4 address or IPv6 /64.
pub const MAX_CONNECTIONS_PER_IP: usize = 32;
/// Connections a provider accepts at once from one identity (a router pools one; a few
/// more cover a reconnect while the old connection times out).
pub const MAX_CONNECTIONS_PER_PEER: usize = 4;
/// How long a client may take to send its request after opening a stream.
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a provider waits for a client to take one frame of its answer. A client that
/// stops reading loses its request after this, and the slot it held goes to others.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Unread bytes a provider buffers per connection (a request is at most 12 MiB).
const SERVER_RECEIVE_WINDOW: u32 = 16 << 20;

/// Application close codes a provider sends when it turns a connection away.
pub mod close_code {
    /// The peer is not on this provider's allow-list.
    pub const NOT_ALLOWED: u32 = 2;
    /// The peer or its address already holds as many connections as it may.
    pub const TOO_MANY: u32 = 3;
    /// (A stream reset) the client took nothing for [`super::WRITE_TIMEOUT`].
    pub const STALLED: u32 = 4;
}

/// Who may submit work on a provider's data plane, and how many connections one source may
/// hold (review H4).
#[derive(Clone, Debug)]
pub struct ServePolicy {
    /// `None`: any authenticated peer, as an open network wants; otherwise only these
    /// identities (the routers this provider works for).
    pub allow: Option<Arc<HashSet<PeerId>>>,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub max_connections_per_peer: usize,
}

impl Default for ServePolicy {
    fn default() -> Self {
        ServePolicy {
            allow: None,
            max_connections: MAX_CONNECTIONS,
            max_connections_per_ip: MAX_CONNECTIONS_PER_IP,
            max_connections_per_peer: MAX_CONNECTIONS_PER_PEER,
        }
    }
}

impl ServePolicy {
    /// Serves only `peers`.
    pub fn allow_only(peers: impl IntoIterator<Item = PeerId>) -> ServePolicy {
        ServePolicy {
            allow: Some(Arc::new(peers.into_iter().collect())),
            ..ServePolicy::default()
        }
    }

    fn admits(&self, peer: &PeerId) -> bool {
        self.allow.as_ref().is_none_or(|a| a.contains(peer))
    }
}

fn transport(server: bool) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // A peer that vanishes (killed, cut off) is noticed within the idle timeout, and its
    // requests placed again; keep-alives keep a connection to a busy peer open.
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(5)).expect("5 s is a valid timeout"),
    ));
    if server {
        t.max_concurrent_bidi_streams(MAX_STREAMS_PER_CONNECTION.into());
        // What a client may send unread is bounded per connection, not only per stream.
        t.receive_window(SERVER_RECEIVE_WINDOW.into());
    } else {
        t.max_concurrent_bidi_streams(0u32.into());
    }
    t.max_concurrent_uni_streams(0u32.into());
    t
}

/// A provider's QUIC endpoint, bound to `addr`.
pub fn server_endpoint(key: &Keypair, addr: SocketAddr) -> Result<quinn::Endpoint, NetError> {
    let id = TlsIdentity::new(key)?;
    let crypto = QuicServerConfig::try_from(tls::server_config(&id)?)
        .map_err(|e| NetError::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport(true)));
    Ok(quinn::Endpoint::server(config, addr)?)
}

/// The side of a stream a provider writes its answer to.
pub struct FrameSink {
    send: quinn::SendStream,
}

impl FrameSink {
    /// Sends one frame; fails when the client has gone, or has not taken the frame within
    /// [`WRITE_TIMEOUT`] (stop generating then: a client that stops reading must not hold
    /// a slot others could use).
    pub async fn send(&mut self, frame: &DataFrame) -> Result<(), NetError> {
        match tokio::time::timeout(WRITE_TIMEOUT, write_frame(&mut self.send, frame)).await {
            Ok(r) => r,
            Err(_) => {
                let _ = self.send.reset(close_code::STALLED.into());
                Err(NetError::Stalled(WRITE_TIMEOUT))
            }
        }
    }

    /// Sends an error frame.
    pub async fn error(
        &mut self,
        code: DataErrorCode,
        message: impl Into<String>,
        retry_after_ms: Option<u64>,
    ) -> Result<(), NetError> {
        self.send(&DataFrame::Error(DataError {
            code,
            message: message.into(),
            retry_after_ms,
        }))
        .await
    }

    /// Resolves when the client stops reading (cancelled the subtask or went away).
    pub async fn stopped(&mut self) {
        let _ = self.send.stopped().await;
    }

    fn finish(mut self) {
        let _ = self.send.finish();
    }
}

/// What a provider does with one decoded request from an authenticated peer.
pub trait DataHandler: Clone + Send + Sync + 'static {
    fn handle(
        &self,
        peer: PeerId,
        request: DataRequest,
        sink: &mut FrameSink,
    ) -> impl Future<Output = ()> + Send;
}

/// Accepts connections on `endpoint` and hands each stream's request to `handler` until
/// `shutdown` resolves. Malformed input and vanished peers end their stream or connection,
/// never the server. `policy` says who may connect and how many connections one address
/// or identity may hold, so no single host can take every slot.
pub async fn serve<H: DataHandler>(
    endpoint: quinn::Endpoint,
    handler: H,
    policy: ServePolicy,
    shutdown: impl Future<Output = ()>,
) {
    let limit = Arc::new(Semaphore::new(policy.max_connections));
    let counts = Counts::default();
    tokio::pin!(shutdown);
    loop {
        let incoming = tokio::select! {
            _ = &mut shutdown => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        // Refused before the handshake: an address at its limit costs no cryptography.
        let remote = incoming.remote_address();
        let Some(by_ip) = counts.take(ip_source(remote.ip()), policy.max_connections_per_ip) else {
            debug!(%remote, "data-plane connection refused: too many from this address");
            incoming.refuse();
            continue;
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            incoming.refuse();
            continue;
        };
        let (handler, policy, counts) = (handler.clone(), policy.clone(), counts.clone());
        tokio::spawn(async move {
            let _held = (permit, by_ip);
            let conn = match incoming.await {
                Ok(conn) => conn,
                Err(e) => {
                    debug!(error = %e, "data-plane handshake failed");
                    return;
                }
            };
            let Some(peer) = remote_peer(&conn) else {
                conn.close(1u32.into(), b"no peer identity");
                return;
            };
            if !policy.admits(&peer) {
                debug!(%peer, %remote, "data-plane peer not on the allow-list");
                conn.close(
                    close_code::NOT_ALLOWED.into(),
                    b"this provider serves only the routers on its allow-list",
                );
                return;
            }
            let Some(_by_peer) = counts.take(Source::Peer(peer), policy.max_connections_per_peer)
            else {
                conn.close(
                    close_code::TOO_MANY.into(),
                    b"too many connections from this peer",
                );
                return;
            };
            serve_connection(conn, peer, handler).await;
        });
    }
    endpoint.close(0u32.into(), b"shutting down");
}

/// The authenticated peer of a connection, from its certificate.
pub fn remote_peer(conn: &quinn::Connection) -> Option<PeerId> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    tls::peer_of(certs.first()?).ok()
}

async fn serve_connection<H: DataHandler>(conn: quinn::Connection, peer: PeerId, handler: H) {
    debug!(%peer, remote = %conn.remote_address(), "data-plane connection");
    loop {
        let (send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                debug!(%peer, reason = %e, "data-plane connection closed");
                return;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let mut sink = FrameSink { send };
            let request = tokio::time::timeout(
                REQUEST_READ_TIMEOUT,
                read_frame::<DataRequest, _>(&mut recv),
            )
            .await;
            match request {
                Ok(Ok(Some(request))) => handler.handle(peer, request, &mut sink).await,
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    warn!(%peer, error = %e, "bad data-plane request");
                    let _ = sink
                        .error(DataErrorCode::BadRequest, e.to_string(), None)
                        .await;
                }
                Err(_) => {
                    let _ = sink
                        .error(DataErrorCode::BadRequest, "request not sent in time", None)
                        .await;
                }
            }
            sink.finish();
        });
    }
}

/// Why a data-plane call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Could not reach or authenticate the provider.
    #[error("connecting to {peer}: {reason}")]
    Connect { peer: PeerId, reason: String },
    /// The provider refused or failed the request.
    #[error("{peer} answered {:?}: {}", .error.code, .error.message)]
    Remote { peer: PeerId, error: Box<DataError> },
    /// The stream broke or carried something unexpected.
    #[error("{peer}: {source}")]
    Transport {
        peer: PeerId,
        #[source]
        source: Box<NetError>,
    },
    /// The answer arrived but does not verify.
    #[error("{peer} sent an invalid answer: {reason}")]
    Invalid { peer: PeerId, reason: String },
}

impl CallError {
    /// The provider the call went to.
    pub fn peer(&self) -> PeerId {
        match self {
            CallError::Connect { peer, .. }
            | CallError::Remote { peer, .. }
            | CallError::Transport { peer, .. }
            | CallError::Invalid { peer, .. } => *peer,
        }
    }

    /// Worth trying again (elsewhere): everything except a request the provider judged bad.
    pub fn retryable(&self) -> bool {
        !matches!(
            self,
            CallError::Remote { error, .. } if error.code == DataErrorCode::BadRequest
        )
    }
}

/// A data-plane client with a pool of one connection per provider.
#[derive(Clone)]
pub struct DataClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    endpoint: quinn::Endpoint,
    id: TlsIdentity,
    /// Signs countersignatures of verified results.
    key: Keypair,
    pool: Mutex<HashMap<(PeerId, SocketAddr), quinn::Connection>>,
}

impl DataClient {
    /// A client with this identity on an ephemeral UDP port of `bind` (e.g. `0.0.0.0:0`).
    pub fn new(key: &Keypair, bind: SocketAddr) -> Result<DataClient, NetError> {
        let endpoint = quinn::Endpoint::client(bind)?;
        Ok(DataClient {
            inner: Arc::new(ClientInner {
                endpoint,
                id: TlsIdentity::new(key)?,
                key: key.clone(),
                pool: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// A live connection to `peer` at `addr`, reused when one exists. The handshake fails
    /// unless the provider proves it holds `peer`'s key.
    pub async fn connect(
        &self,
        peer: PeerId,
        addr: SocketAddr,
    ) -> Result<quinn::Connection, CallError> {
        let key = (peer, addr);
        if let Some(conn) = self.pool().get(&key)
            && conn.close_reason().is_none()
        {
            return Ok(conn.clone());
        }
        let connect_err = |reason: String| CallError::Connect { peer, reason };
        let crypto = tls::client_config(&self.inner.id, peer)
            .map_err(|e| connect_err(e.to_string()))
            .and_then(|c| QuicClientConfig::try_from(c).map_err(|e| connect_err(e.to_string())))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(transport(false)));
        let conn = self
            .inner
            .endpoint
            .connect_with(config, addr, "beacon")
            .map_err(|e| connect_err(e.to_string()))?
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        self.pool().insert(key, conn.clone());
        Ok(conn)
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, HashMap<(PeerId, SocketAddr), quinn::Connection>> {
        self.inner.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a stream to `peer` and sends `request`; read the answer from the returned call.
    /// Dropping the call cancels the work on the provider.
    pub async fn call(
        &self,
        peer: PeerId,
        addr: SocketAddr,
        request: &DataRequest,
    ) -> Result<Call, CallError> {
        let mut conn = self.connect(peer, addr).await?;
        let transport = |conn: &quinn::Connection, source: NetError| CallError::Transport {
            peer,
            source: Box::new(conn.close_reason().map_or(source, NetError::Connection)),
        };
        let (mut send, recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(_) => {
                // The pooled connection died between the check and now: dial once more.
                self.pool().remove(&(peer, addr));
                conn = self.connect(peer, addr).await?;
                conn.open_bi()
                    .await
                    .map_err(|e| transport(&conn, NetError::from(e)))?
            }
        };
        write_frame(&mut send, request)
            .await
            .map_err(|e| transport(&conn, e))?;
        let _ = send.finish();
        Ok(Call { peer, conn, recv })
    }

    /// Runs `request` on `peer`, passing each text delta to `on_delta`, and returns the
    /// result after checking it with [`beacon_proto::verify_result`].
    pub async fn infer(
        &self,
        peer: PeerId,
        addr: SocketAddr,
        request: &InferRequest,
        mut on_delta: impl FnMut(&str),
    ) -> Result<(InferResult, Signed<InferResult>), CallError> {
        let mut call = self
            .call(peer, addr, &DataRequest::Infer(request.clone()))
            .await?;
        let invalid = |reason: String| CallError::Invalid { peer, reason };
        // Every streamed delta is kept (bounded by the largest result) and compared with
        // the signed output: a provider cannot stream one text and sign another.
        let mut streamed = String::new();
        loop {
            match call.next().await? {
                DataFrame::Delta(text) => {
                    if streamed.len() + text.len() > InferResult::MAX_BYTES {
                        return Err(invalid("streamed more text than a result may hold".into()));
                    }
                    streamed.push_str(&text);
                    on_delta(&text);
                }
                DataFrame::Result(signed) => {
                    let result = beacon_proto::verify_result(&signed, &peer, request)
                        .map_err(|e| invalid(e.to_string()))?;
                    if streamed != result.output {
                        return Err(invalid(format!(
                            "the streamed text ({} bytes) differs from the signed output \
                             ({} bytes)",
                            streamed.len(),
                            result.output.len()
                        )));
                    }
                    return Ok((result, signed));
                }
                DataFrame::Error(error) => {
                    return Err(CallError::Remote {
                        peer,
                        error: Box::new(error),
                    });
                }
                DataFrame::Audit(_) | DataFrame::Stored => {
                    return Err(invalid(
                        "a frame that does not answer an inference request".into(),
                    ));
                }
            }
        }
    }

    /// Asks `peer` to re-score a claimed output; checks the signer and the audit id.
    pub async fn audit(
        &self,
        peer: PeerId,
        addr: SocketAddr,
        request: &AuditRequest,
    ) -> Result<AuditResult, CallError> {
        let mut call = self
            .call(peer, addr, &DataRequest::Audit(request.clone()))
            .await?;
        let invalid = |reason: String| CallError::Invalid { peer, reason };
        match call.next().await? {
            DataFrame::Audit(signed) => {
                let result = signed
                    .verify_from(&peer)
                    .map_err(|e| invalid(e.to_string()))?;
                if result.audit_id != request.audit_id {
                    return Err(invalid("answers a different audit".into()));
                }
                if result.model_digest != request.model.digest {
                    return Err(invalid("scored with a different model".into()));
                }
                if result.scores.len() != request.claimed_tokens.len() {
                    return Err(invalid(format!(
                        "{} scores for {} tokens",
                        result.scores.len(),
                        request.claimed_tokens.len()
                    )));
                }
                Ok(result)
            }
            DataFrame::Error(error) => Err(CallError::Remote {
                peer,
                error: Box::new(error),
            }),
            _ => Err(invalid("unexpected frame in answer to an audit".into())),
        }
    }

    /// Countersigns a result this client verified and hands it to the provider, which
    /// keeps it beside its own receipt: both sides then hold proof of the work.
    pub async fn countersign(
        &self,
        peer: PeerId,
        addr: SocketAddr,
        result: &InferResult,
        signed: &Signed<InferResult>,
        verified_ms: u64,
    ) -> Result<(), CallError> {
        let c = Countersignature {
            request_id: result.request_id,
            provider: peer,
            result_digest: signed.payload_digest(),
            model_digest: result.model_digest,
            usage: result.usage,
            verified_ms,
        };
        let invalid = |reason: String| CallError::Invalid { peer, reason };
        let c = Signed::sign(&self.inner.key, &c).map_err(|e| invalid(e.to_string()))?;
        let mut call = self.call(peer, addr, &DataRequest::Countersign(c)).await?;
        match call.next().await? {
            DataFrame::Stored => Ok(()),
            DataFrame::Error(error) => Err(CallError::Remote {
                peer,
                error: Box::new(error),
            }),
            _ => Err(invalid(
                "unexpected frame in answer to a countersignature".into(),
            )),
        }
    }

    /// Closes every pooled connection.
    pub fn close(&self) {
        self.inner.endpoint.close(0u32.into(), b"closing");
        self.pool().clear();
    }
}

/// One request in flight.
pub struct Call {
    peer: PeerId,
    conn: quinn::Connection,
    recv: quinn::RecvStream,
}

impl Call {
    /// The next frame; a stream that ends before a final frame is an error. When the
    /// provider closed the connection (it does not serve this client, or this client holds
    /// too many connections), the error carries its reason.
    pub async fn next(&mut self) -> Result<DataFrame, CallError> {
        let failed = |source: NetError| CallError::Transport {
            peer: self.peer,
            source: Box::new(source),
        };
        match read_frame::<DataFrame, _>(&mut self.recv).await {
            Ok(Some(frame)) => Ok(frame),
            Ok(None) => Err(failed(NetError::Protocol(
                "stream ended without an answer".into(),
            ))),
            Err(source) => Err(failed(match self.conn.close_reason() {
                Some(reason) => NetError::Connection(reason),
                None => source,
            })),
        }
    }
}
