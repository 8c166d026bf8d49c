//! The body of a request to a backend: the client's streamed body (or none), counted and
//! held to the route's `max_body_bytes` while it streams.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

/// A request body on its way to a backend. Unpolled, it travels back with an unsent request
/// (see [`super::connections::Failed`]), so a request can be retried on another backend
/// without buffering its body.
#[derive(Debug, Default)]
pub struct UpstreamBody {
    body: Option<Incoming>,
    /// Bytes sent so far, when the access log wants them.
    sent: Option<Arc<AtomicU64>>,
    /// Bytes still allowed by the route's `max_body_bytes`.
    allowance: Option<u64>,
    /// Set while the stream waits for the client's next bytes.
    client_wait: Option<ClientWait>,
}

/// Whether a request body's stream is held up by the client: its last poll found no bytes
/// from the client yet. Shared with the request's attempt, so a request timeout that fires
/// while the client holds the body back is the client's (408), not the backend's (504), and
/// does not count against the backend's passive health.
#[derive(Debug, Default, Clone)]
pub struct ClientWait(Arc<AtomicBool>);

impl ClientWait {
    /// True while the body waits for the client.
    pub fn is_waiting(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The client's body grew past the route's `max_body_bytes` while streaming.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than the route's max_body_bytes")]
pub struct BodyTooLarge;

impl UpstreamBody {
    /// No body.
    pub fn empty() -> Self {
        UpstreamBody::default()
    }

    /// Streams the client's `body`, adding the bytes sent to `sent`, and fails the stream
    /// once more than `limit` bytes went through (None: unlimited); `client_wait` tells
    /// when it waits for the client.
    pub fn streaming(
        body: Incoming,
        sent: Option<Arc<AtomicU64>>,
        limit: Option<u64>,
        client_wait: ClientWait,
    ) -> Self {
        UpstreamBody {
            body: Some(body),
            sent,
            allowance: limit,
            client_wait: Some(client_wait),
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = match &mut this.body {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        };
        if let Some(wait) = &this.client_wait {
            wait.0.store(polled.is_pending(), Ordering::Relaxed);
        }
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                let length = data.len() as u64;
                if let Some(sent) = &this.sent {
                    sent.fetch_add(length, Ordering::Relaxed);
                }
                if let Some(allowance) = &mut this.allowance {
                    match allowance.checked_sub(length) {
                        Some(left) => *allowance = left,
                        None => return Poll::Ready(Some(Err(Box::new(BodyTooLarge)))),
                    }
                }
            }
        }
        polled.map(|frame| frame.map(|result| result.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}
