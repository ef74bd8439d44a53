//! The data plane: direct QUIC between a client (a router) and a provider, mutually
//! authenticated by identity keys. One bidirectional stream per subtask: the client writes
//! one [`DataRequest`] and finishes its side; the provider answers with [`DataFrame`]s
//! (deltas, then one result or error). Clients pool one connection per provider.

pub mod frame;
pub mod tls;

use std::collections::HashMap;
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
pub use tls::TlsIdentity;

use crate::NetError;

/// Streams a provider serves at once on one connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;
/// Connections a provider accepts at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long a client may take to send its request after opening a stream.
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// Sends one frame; fails when the client has gone (stop generating then).
    pub async fn send(&mut self, frame: &DataFrame) -> Result<(), NetError> {
        write_frame(&mut self.send, frame).await
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
/// never the server.
pub async fn serve<H: DataHandler>(
    endpoint: quinn::Endpoint,
    handler: H,
    shutdown: impl Future<Output = ()>,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let incoming = tokio::select! {
            _ = &mut shutdown => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            incoming.refuse();
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match incoming.await {
                Ok(conn) => serve_connection(conn, handler).await,
                Err(e) => debug!(error = %e, "data-plane handshake failed"),
            }
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

async fn serve_connection<H: DataHandler>(conn: quinn::Connection, handler: H) {
    let Some(peer) = remote_peer(&conn) else {
        conn.close(1u32.into(), b"no peer identity");
        return;
    };
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
        let conn = self.connect(peer, addr).await?;
        let transport = |source: NetError| CallError::Transport {
            peer,
            source: Box::new(source),
        };
        let (mut send, recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(_) => {
                // The pooled connection died between the check and now: dial once more.
                self.pool().remove(&(peer, addr));
                let conn = self.connect(peer, addr).await?;
                conn.open_bi()
                    .await
                    .map_err(|e| transport(NetError::from(e)))?
            }
        };
        write_frame(&mut send, request).await.map_err(transport)?;
        let _ = send.finish();
        Ok(Call { peer, recv })
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
    recv: quinn::RecvStream,
}

impl Call {
    /// The next frame; a stream that ends before a final frame is an error.
    pub async fn next(&mut self) -> Result<DataFrame, CallError> {
        match read_frame::<DataFrame, _>(&mut self.recv).await {
            Ok(Some(frame)) => Ok(frame),
            Ok(None) => Err(CallError::Transport {
                peer: self.peer,
                source: Box::new(NetError::Protocol("stream ended without an answer".into())),
            }),
            Err(source) => Err(CallError::Transport {
                peer: self.peer,
                source: Box::new(source),
            }),
        }
    }
}
