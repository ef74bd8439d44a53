//! Serving the node's and the router's HTTP APIs: an axum router on hyper, with what
//! `axum::serve` leaves out (review M8): a time limit on each request's headers, so a client
//! that trickles them (slowloris) loses its connection, and a bound on connections, in all
//! and per client address (IPv4, or IPv6 /64). Every request carries the client's address
//! as `ConnectInfo<SocketAddr>`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::debug;

use crate::limits::{Counts, ip_source};

/// Limits on an API's connections.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    /// How long a client may take to send a request's headers.
    pub header_timeout: Duration,
    /// Connections served at once; more are closed as they arrive.
    pub max_connections: usize,
    /// Connections one client address may hold at once.
    pub max_per_address: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_timeout: Duration::from_secs(30),
            max_connections: 4096,
            max_per_address: 256,
        }
    }
}

/// `listener` with Nagle's algorithm off on every connection it accepts: a response
/// streamed as small events (SSE) leaves as each event is written, instead of waiting for
/// the client's delayed acknowledgement of the one before (40 ms on Linux, per event).
pub fn no_delay(
    listener: tokio::net::TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            debug!(error = %e, "TCP_NODELAY not set");
        }
    })
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets the connections in
/// progress finish (as `axum::serve` with graceful shutdown does).
pub async fn serve<L>(
    mut listener: L,
    app: axum::Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()>,
) where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    let total = Arc::new(Semaphore::new(limits.max_connections));
    let counts = Counts::default();
    let (close_tx, close_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (io, remote) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        while connections.try_join_next().is_some() {}
        let Ok(permit) = total.clone().try_acquire_owned() else {
            debug!(%remote, "HTTP connection refused: the API holds as many as it may");
            continue;
        };
        let Some(held) = counts.take(ip_source(remote.ip()), limits.max_per_address) else {
            debug!(%remote, "HTTP connection refused: too many from this address");
            continue;
        };
        let service = TowerToHyperService::new(WithAddress {
            app: app.clone(),
            remote,
        });
        let mut close = close_rx.clone();
        connections.spawn(async move {
            let _held = (permit, held);
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            tokio::pin!(connection);
            let closing = tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        debug!(%remote, error = %e, "HTTP connection ended");
                    }
                    false
                }
                _ = close.wait_for(|closing| *closing) => true,
            };
            if closing {
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
            }
        });
    }
    let _ = close_tx.send(true);
    while connections.join_next().await.is_some() {}
}

/// The router, with each request's client address put in its extensions (no router is
/// rebuilt per connection, as `Router::layer` would).
#[derive(Clone)]
struct WithAddress {
    app: axum::Router,
    remote: SocketAddr,
}

impl<B> tower_service::Service<axum::http::Request<B>> for WithAddress
where
    axum::Router: tower_service::Service<axum::http::Request<B>>,
{
    type Response = <axum::Router as tower_service::Service<axum::http::Request<B>>>::Response;
    type Error = <axum::Router as tower_service::Service<axum::http::Request<B>>>::Error;
    type Future = <axum::Router as tower_service::Service<axum::http::Request<B>>>::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.app.poll_ready(cx)
    }

    fn call(&mut self, mut req: axum::http::Request<B>) -> Self::Future {
        req.extensions_mut().insert(ConnectInfo(self.remote));
        self.app.call(req)
    }
}

#[cfg(test)]
mod tests {
    use axum::serve::Listener;

    /// Connections the API accepts have Nagle's algorithm off, so each streamed event
    /// leaves when it is written.
    #[tokio::test]
    async fn accepted_connections_send_without_delay() {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut listener = super::no_delay(tcp);
        let client = tokio::spawn(tokio::net::TcpStream::connect(addr));
        let (io, _) = listener.accept().await;
        assert!(io.nodelay().unwrap());
        drop(client.await.unwrap().unwrap());
    }
}
