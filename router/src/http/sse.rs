//! The one server-sent-event pump: a producer task writes events into a bounded channel,
//! and the response streams them over axum's `Sse`, with keep-alive comments while the
//! producer is quiet. The producer runs in the request's span and learns that the client
//! left when a send fails (dropping what it runs cancels the work).

use std::convert::Infallible;
use std::future::Future;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::Instrument;

/// Events a stream may hold unsent before its producer waits for the client.
const BUFFER: usize = 64;

/// Where a producer writes its events.
pub struct Sink(mpsc::Sender<Event>);

impl Sink {
    /// Sends `data: <json>`; false when the client has left.
    pub async fn data(&self, v: &Value) -> bool {
        self.0
            .send(Event::default().data(v.to_string()))
            .await
            .is_ok()
    }

    /// Sends `event: <name>` with `data: <json text>`; false when the client has left.
    pub async fn event(&self, name: &str, json: String) -> bool {
        self.0
            .send(Event::default().event(name).data(json))
            .await
            .is_ok()
    }

    /// Sends the OpenAI end marker, `data: [DONE]`.
    pub async fn done(&self) {
        let _ = self.0.send(Event::default().data("[DONE]")).await;
    }

    /// Runs `work` while sending what it reports on `progress` through `each`, then what
    /// is left of it; `None` when the client left first (`work` is dropped, cancelling it).
    pub async fn forward<T, O>(
        &self,
        work: impl Future<Output = O>,
        progress: &mut mpsc::UnboundedReceiver<T>,
        mut each: impl FnMut(T) -> Event,
    ) -> Option<O> {
        tokio::pin!(work);
        let out = loop {
            tokio::select! {
                Some(p) = progress.recv() => {
                    if self.0.send(each(p)).await.is_err() {
                        return None;
                    }
                }
                o = &mut work => break o,
            }
        };
        while let Ok(p) = progress.try_recv() {
            if self.0.send(each(p)).await.is_err() {
                return None;
            }
        }
        Some(out)
    }
}

/// The response for a stream whose events `produce` writes, in its own task.
pub fn pump<F, Fut>(produce: F) -> Response
where
    F: FnOnce(Sink) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(BUFFER);
    tokio::spawn(produce(Sink(tx)).instrument(tracing::Span::current()));
    let events = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}
