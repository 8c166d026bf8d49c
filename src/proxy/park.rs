//! Idle keep-alive HTTP/1 connections give their session's state back ("parking").
//!
//! hyper's HTTP/1 server keeps a read buffer (8 KiB at least), a write buffer and the slot of
//! the request future for a connection's whole life: ≈ 30 KiB per idle keep-alive connection,
//! where nginx keeps ≈ 0.6 KiB (gatehouse's own loop for bodiless requests, [`super::h1`],
//! keeps less, and parks sooner: after [`LINGER`]). So a connection that has been quiet
//! between two requests ends its session without closing the socket: the stream waits for
//! the client's next byte in a small state, and a fresh session serves what follows. A plain
//! HTTP connection still quiet a [`CHECK_PERIOD`] after its last response moves on to its
//! listener's waiting room (`crate::waiting_room`), where it keeps no task at all; a TLS one
//! waits in its task, with its TLS state. A busy connection never parks (it is never quiet
//! for long enough), so the request path pays only a counter per read and write.
//!
//! Ending a hyper session is safe only while hyper is idle: nothing of the next request read,
//! every request answered to its last byte, nothing left to write. hyper does not say when it
//! is idle; [`IdleWatch`] knows it from three independent facts — the framing tracker stands
//! between two requests (every byte read belongs to requests read whole), the handler
//! answered as many requests as the tracker read (the response bodies count their end), and
//! the last write or flush completed. hyper's `graceful_shutdown` then closes its idle state
//! at once, and [`Watched`] turns the socket shutdown that follows into a flush.

use super::framing::Verdict;
use super::l7::Connection;
use crate::io::ResetOnClose;
use crate::proxy_protocol::Prefixed;
use bytes::Bytes;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often a connection's hyper session is checked for idleness: a connection parks after
/// one to two periods without a byte read or written. Also how long a connection quiet
/// between requests waits in its task before it moves to the waiting room: a client that
/// comes back sooner does not pay the move.
pub const CHECK_PERIOD: Duration = Duration::from_millis(50);

/// How long gatehouse's own HTTP/1 loop keeps its state (≈ 4.5 KB and a 2 KiB read buffer)
/// after a response with nothing of the next request read. Back-to-back clients come back
/// well within it; a connection quiet for longer gives its state back and waits holding only
/// its stream, so a burst of requests on many connections does not leave each of them
/// holding its buffers for a whole check period. (A connection the check finds busy is
/// checked again a check period later: a busy session's timer fires once per period.)
pub const LINGER: Duration = Duration::from_millis(10);

/// What the stream under a hyper session did, shared with the session's idle check.
#[derive(Debug, Default)]
pub struct Activity {
    /// Reads and writes that moved bytes (or saw the end of the stream).
    operations: AtomicU64,
    /// The last write or flush could not complete: hyper still holds bytes to send.
    write_pending: AtomicBool,
    /// The session is being ended to park: a shutdown of the stream only flushes it.
    parking: AtomicBool,
}

impl Activity {
    fn moved(&self) {
        // One writer (the stream, polled by its own task): no read-modify-write needed.
        let count = self.operations.load(Ordering::Relaxed);
        self.operations
            .store(count.wrapping_add(1), Ordering::Relaxed);
    }

    fn write_done<T>(&self, polled: &Poll<io::Result<T>>) {
        self.write_pending
            .store(polled.is_pending(), Ordering::Relaxed);
    }
}

/// A client stream whose reads and writes are noted in an [`Activity`], and whose shutdown
/// becomes a flush while its session parks.
#[derive(Debug)]
pub struct Watched<T> {
    inner: Prefixed<T>,
    activity: Arc<Activity>,
}

impl<T> Watched<T> {
    /// Wraps `inner` (nothing to replay yet).
    pub fn new(inner: T) -> Self {
        Watched {
            inner: Prefixed::new(Bytes::new(), inner),
            activity: Arc::default(),
        }
    }

    /// What the stream did, for a session's idle check.
    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    /// The wrapped stream, when nothing read is left to replay.
    pub fn into_idle(self) -> Result<T, Self> {
        if self.inner.prefix_len() > 0 {
            return Err(self);
        }
        Ok(self.inner.into_parts().1)
    }

    /// Has `bytes`, read already, read again first (by the session taking over).
    pub fn replay(&mut self, bytes: Bytes) {
        self.inner.set_prefix(bytes);
    }
}

impl<T: ResetOnClose> ResetOnClose for Watched<T> {
    fn reset_on_close(&self) {
        self.inner.reset_on_close();
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if polled.is_ready() {
            self.activity.moved();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.activity.write_done(&polled);
        if polled.is_ready() {
            self.activity.moved();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.activity.write_done(&polled);
        if polled.is_ready() {
            self.activity.moved();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.activity.write_done(&polled);
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.activity.parking.load(Ordering::Relaxed) {
            return Pin::new(&mut self.inner).poll_flush(cx);
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Decides, once per [`CHECK_PERIOD`], whether a hyper session may end so its connection
/// parks.
#[derive(Debug)]
pub struct IdleWatch {
    activity: Arc<Activity>,
    seen: u64,
    quiet_since: Instant,
    /// Requests handled before this session began: a session parks only after answering one.
    handled_before: u64,
}

impl IdleWatch {
    /// Watches the session that starts now on `connection`.
    pub fn new(activity: Arc<Activity>, connection: &Connection) -> Self {
        activity.parking.store(false, Ordering::Relaxed);
        IdleWatch {
            seen: activity.operations.load(Ordering::Relaxed),
            activity,
            quiet_since: Instant::now(),
            handled_before: connection.requests.load(Ordering::Relaxed),
        }
    }

    /// Whether the session is idle and was quiet since the previous check; if so, its stream
    /// is marked parking (the session's shutdown will only flush it).
    pub fn park(&mut self, connection: &Connection, verdict: &Verdict) -> bool {
        let operations = self.activity.operations.load(Ordering::Relaxed);
        if operations != self.seen {
            self.seen = operations;
            self.quiet_since = Instant::now();
            return false;
        }
        let Some(settled) = verdict.settled_requests() else {
            return false;
        };
        let idle = settled > self.handled_before
            && connection.requests.load(Ordering::Relaxed) == settled
            && connection.answered.load(Ordering::Relaxed) == settled
            && !self.activity.write_pending.load(Ordering::Relaxed);
        if idle {
            self.activity.parking.store(true, Ordering::Relaxed);
        }
        idle
    }

    /// Whether this session has handed a request to the handler yet (its head arrived whole).
    pub fn handled_any(&self, connection: &Connection) -> bool {
        connection.requests.load(Ordering::Relaxed) > self.handled_before
    }

    /// When the stream was last seen moving bytes (to within a check period).
    pub fn quiet_since(&self) -> Instant {
        self.quiet_since
    }
}

/// How a parked connection's wait ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Wait {
    /// The client sent its next request's first byte: serve it with a fresh session.
    Spoke,
    /// The client closed, the read failed, or the listener shuts down.
    Ended,
    /// No byte before the deadline: the request head is late.
    Late,
}

/// Waits, holding only the stream, for the first byte of the client's next request; that
/// byte is kept for the next session to read first.
pub async fn wait_for_request<T: AsyncRead + Unpin>(
    stream: &mut Watched<T>,
    deadline: Instant,
    shutdown: &CancellationToken,
) -> Wait {
    // The session that parked is gone: a shutdown of the stream closes it again.
    stream.activity.parking.store(false, Ordering::Relaxed);
    let mut first = [0u8; 1];
    let read = std::future::poll_fn(|cx| {
        let mut buf = ReadBuf::new(&mut first);
        Pin::new(&mut *stream)
            .poll_read(cx, &mut buf)
            .map_ok(|()| buf.filled().len())
    });
    let waited = tokio::select! {
        read = tokio::time::timeout_at(deadline, read) => read,
        () = shutdown.cancelled() => return Wait::Ended,
    };
    match waited {
        Ok(Ok(1..)) => {
            stream.replay(Bytes::copy_from_slice(&first));
            Wait::Spoke
        }
        Ok(Ok(0) | Err(_)) => Wait::Ended,
        Err(_late) => Wait::Late,
    }
}
