//! The body of a request to a backend: the client's body (or none), counted and held to the
//! route's `max_body_bytes` while it streams.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

/// A request's body as the server that read its head holds it.
#[derive(Debug, Default)]
pub enum ClientBody {
    #[default]
    Empty,
    /// Streamed by a hyper session as the client sends it.
    Streaming(Incoming),
    /// Read with its head by gatehouse's own HTTP/1 loop: a body that had arrived whole.
    Whole(Bytes),
}

impl ClientBody {
    /// True when there is nothing (left) to send.
    pub fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Empty => true,
            ClientBody::Streaming(body) => body.is_end_stream(),
            ClientBody::Whole(bytes) => bytes.is_empty(),
        }
    }
}

/// A request body on its way to a backend. Unpolled, it travels back with an unsent request
/// (see [`super::connections::Failed`]), so a request can be retried on another backend
/// without buffering its body.
#[derive(Debug, Default)]
pub struct UpstreamBody {
    body: ClientBody,
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

    /// Sends the client's `body`, adding the bytes sent to `sent`, and fails the stream once
    /// more than `limit` bytes went through (None: unlimited); `client_wait`, when given,
    /// tells when it waits for the client.
    pub fn new(
        body: ClientBody,
        sent: Option<Arc<AtomicU64>>,
        limit: Option<u64>,
        client_wait: Option<ClientWait>,
    ) -> Self {
        UpstreamBody {
            body,
            sent,
            allowance: limit,
            client_wait,
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
            ClientBody::Streaming(body) => Pin::new(body).poll_frame(cx),
            ClientBody::Whole(bytes) => {
                let bytes = std::mem::take(bytes);
                this.body = ClientBody::Empty;
                Poll::Ready(Some(Ok(Frame::data(bytes))))
            }
            ClientBody::Empty => Poll::Ready(None),
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
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            ClientBody::Empty => SizeHint::with_exact(0),
            ClientBody::Streaming(body) => body.size_hint(),
            ClientBody::Whole(bytes) => SizeHint::with_exact(bytes.len() as u64),
        }
    }
}
