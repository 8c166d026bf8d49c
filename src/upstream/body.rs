//! The body of a request to a backend: the client's body (or none), counted and held to the
//! route's `max_body_bytes` while it streams, and read to its end when answered unread.

use bytes::Bytes;
use http::{header, Request};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;

/// A request's body as the server that read its head holds it.
#[derive(Debug, Default)]
pub enum ClientBody {
    #[default]
    Empty,
    /// Streamed by a hyper session as the client sends it.
    Streaming(StreamedBody),
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

/// How long an unread request body is read and thrown away after its answer, at
/// most (nginx's `lingering_time`).
const DRAIN_TIME: Duration = Duration::from_secs(30);

/// How long the client may send nothing while its unread body is thrown away (nginx's
/// `lingering_timeout`).
const DRAIN_STALL: Duration = Duration::from_secs(5);

/// A request body a hyper session streams in as the client sends it.
///
/// Most scripts and SDKs send a whole request before they read its answer. When gatehouse
/// or a backend answers before the body is read (401, 413, 502…), closing the connection
/// on the unread rest makes the kernel reset it, and the reset destroys the answer: the
/// client sees "connection reset" instead of its 401. So a body dropped before its end is
/// read to its end and thrown away in the background, for at most [`DRAIN_TIME`] and at
/// most [`DRAIN_STALL`] without a byte, as nginx does; the connection then takes the
/// client's next request, or closes. HTTP/2 streams too: resetting the stream instead
/// (RST_STREAM with NO_ERROR, as RFC 9113 allows) makes curl 7.x — Debian 12's — report
/// error 92 instead of the answer it was sent.
#[derive(Debug)]
pub struct StreamedBody {
    /// Taken when dropped, to be drained.
    body: Option<Incoming>,
    drain: Drain,
}

/// Whether a [`StreamedBody`] is drained when dropped before its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drain {
    /// A request without a body: nothing to drain.
    Never,
    /// `Expect: 100-continue`: only once read from, which sends the client its 100
    /// Continue (until then the client holds its body back, so there is nothing to drain,
    /// and draining it would ask for it).
    OnceRead,
    Always,
}

impl StreamedBody {
    /// What wraps the body of `request` as hyper streams it in:
    /// `request.map(StreamedBody::wrap_for(&request))` (the request is not moved more than
    /// its `map` moves it).
    pub fn wrap_for(request: &Request<Incoming>) -> impl FnOnce(Incoming) -> ClientBody {
        // A body of length zero is known without a lock (an HTTP/2 stream's end is not).
        let drain = if request.body().size_hint().exact() == Some(0) {
            Drain::Never
        } else if request
            .headers()
            .get(header::EXPECT)
            .is_some_and(|expect| expect.as_bytes().eq_ignore_ascii_case(b"100-continue"))
        {
            Drain::OnceRead
        } else {
            Drain::Always
        };
        move |body| {
            ClientBody::Streaming(StreamedBody {
                body: Some(body),
                drain,
            })
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }

    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if self.drain == Drain::OnceRead {
            self.drain = Drain::Always;
        }
        match &mut self.body {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }
}

impl Drop for StreamedBody {
    fn drop(&mut self) {
        if self.drain != Drain::Always {
            return;
        }
        let Some(body) = self.body.take().filter(|body| !body.is_end_stream()) else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(drain(body));
        }
    }
}

/// Reads `body` to its end and throws it away, within [`DRAIN_TIME`] and [`DRAIN_STALL`].
async fn drain(mut body: Incoming) {
    let deadline = Instant::now() + DRAIN_TIME;
    loop {
        let due = deadline.min(Instant::now() + DRAIN_STALL);
        match tokio::time::timeout_at(due, body.frame()).await {
            Ok(Some(Ok(_))) => {}
            Ok(None) | Ok(Some(Err(_))) | Err(_) => return,
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
            ClientBody::Streaming(body) => body.poll_frame(cx),
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
