//! The response body handed to hyper: a backend's streamed body or a short local answer,
//! carrying the request's access-log record until the last byte is sent (or the client
//! leaves), so the logged byte count and duration are exact, and telling the client
//! connection when its answer is complete (the idle check of `park` needs it).

use super::l7::Connection;
use super::stall::{BodyWatch, ClientProgress};
use crate::access_log::{AccessLog, AccessRecord, Ended};
use crate::upstream::backend::InFlight;
use crate::upstream::http1::{Http1Error, ResponseBody};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

/// The access log's `error` for a response cut off because its client stopped reading.
const CLIENT_STALLED: &str = "client accepted nothing for limits.send_timeout";

/// Where the bytes come from.
#[derive(Debug)]
enum Source {
    /// A backend's body, streamed frame by frame; the in-flight guard keeps the backend's
    /// count raised until the body ends or the client goes away. The body gives its
    /// connection back to the pool itself, only if it was read to its end.
    Upstream {
        body: ResponseBody,
        in_flight: Option<InFlight>,
    },
    /// An answer gatehouse wrote itself (errors, admin).
    Local(Option<Bytes>),
}

/// An access-log record waiting for the body to finish.
#[derive(Debug)]
struct Pending {
    record: AccessRecord,
    started: Instant,
    log: Arc<AccessLog>,
}

/// A response body.
#[derive(Debug)]
pub struct ProxyBody {
    source: Source,
    access: Option<Box<Pending>>,
    /// The client connection whose `answered` count this body raises when it is done.
    answers: Option<Arc<Connection>>,
}

impl ProxyBody {
    /// A backend's body; `in_flight` is released when it ends.
    pub fn upstream(body: ResponseBody, in_flight: InFlight) -> Self {
        ProxyBody {
            source: Source::Upstream {
                body,
                in_flight: Some(in_flight),
            },
            access: None,
            answers: None,
        }
    }

    /// A body with exactly these bytes.
    pub fn local(bytes: impl Into<Bytes>) -> Self {
        ProxyBody {
            source: Source::Local(Some(bytes.into())),
            access: None,
            answers: None,
        }
    }

    /// A body with no bytes.
    pub fn empty() -> Self {
        ProxyBody {
            source: Source::Local(None),
            access: None,
            answers: None,
        }
    }

    /// Logs `record` to `log` once the body is done (counting the bytes sent).
    pub fn log_when_done(&mut self, record: AccessRecord, started: Instant, log: Arc<AccessLog>) {
        self.access = Some(Box::new(Pending {
            record,
            started,
            log,
        }));
    }

    /// Counts this response as answered on `connection` once the body is done. In place:
    /// `Response::map` would move the whole response (≈ 260 bytes) twice.
    pub fn answers(&mut self, connection: Arc<Connection>) {
        self.answers = Some(connection);
    }

    /// Reports to `progress` when this body waits on the client (see [`super::stall`]).
    pub fn watch_client(self, progress: Arc<ClientProgress>) -> WatchedBody {
        WatchedBody {
            body: self,
            watch: BodyWatch::new(progress),
        }
    }

    /// Ends the body because its client accepted nothing for `limits.send_timeout`.
    pub fn client_stalled(&mut self) {
        self.finish(Ended::ClientAborted, Some(CLIENT_STALLED));
    }

    /// Logs the record with how the body `ended` (and why, for an end gatehouse chose), lets
    /// the backend go and counts the answer.
    fn finish(&mut self, ended: Ended, error: Option<&'static str>) {
        if let Some(pending) = self.access.take() {
            let Pending {
                mut record,
                started,
                log,
            } = *pending;
            record.duration = started.elapsed();
            record.ended = Some(ended);
            if let Some(error) = error {
                record.error = Some(error.into());
            }
            log.log(record);
        }
        if let Source::Upstream { in_flight, .. } = &mut self.source {
            in_flight.take();
        }
        if let Some(connection) = self.answers.take() {
            connection.answered.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = Http1Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = match &mut this.source {
            Source::Upstream { body, .. } => Pin::new(body).poll_frame(cx),
            Source::Local(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(pending), Some(data)) = (this.access.as_mut(), frame.data_ref()) {
                    pending.record.bytes_out += data.len() as u64;
                }
            }
            Poll::Ready(None) => this.finish(Ended::Complete, None),
            // A client whose upload failed ended the exchange itself.
            Poll::Ready(Some(Err(Http1Error::ClientBody(_)))) => {
                this.finish(Ended::ClientAborted, None);
            }
            Poll::Ready(Some(Err(error))) => {
                if let Source::Upstream {
                    in_flight: Some(in_flight),
                    ..
                } = &this.source
                {
                    in_flight.record_abort(error);
                }
                this.finish(Ended::BackendAborted, None);
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Upstream { body, .. } => body.is_end_stream(),
            Source::Local(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Upstream { body, .. } => body.size_hint(),
            Source::Local(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

impl Drop for ProxyBody {
    /// A body dropped at its end was sent whole (a writer may stop polling once it is);
    /// dropped earlier, its client went away.
    fn drop(&mut self) {
        let ended = if self.is_end_stream() {
            Ended::Complete
        } else {
            Ended::ClientAborted
        };
        self.finish(ended, None);
    }
}

/// A response body under a hyper session, telling its connection's [`ClientProgress`] when
/// it waits on the client (see [`super::stall`]). A wrapper, not a field of [`ProxyBody`]:
/// gatehouse's own HTTP/1 loop times its writes itself, and moves its responses several
/// times per request, where 16 bytes more cost ≈ 100 instructions of copying.
#[derive(Debug)]
pub struct WatchedBody {
    body: ProxyBody,
    watch: BodyWatch,
}

impl Body for WatchedBody {
    type Data = Bytes;
    type Error = Http1Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        this.watch.taken_up();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            this.watch.gave();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for WatchedBody {
    /// Cut off because its client stalled: its access-log line says so.
    fn drop(&mut self) {
        if self.watch.client_stalled() && !self.body.is_end_stream() {
            self.body.client_stalled();
        }
    }
}
