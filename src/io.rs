//! Streams that let an observer see the bytes they move, without changing them.
//!
//! One wrapper, several observers: [`ByteCounters`] feeds the listener's byte metrics (headers,
//! bodies, TLS records and L4 tunnels alike, one relaxed atomic add per read or write), the
//! HTTP/1 framing tracker follows request boundaries, and the L4 proxy notes activity for its
//! idle timeout.

use prometheus::IntCounter;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// A connection that can be closed with a TCP reset instead of a FIN.
///
/// A connection cut off because its peer takes nothing (a client past `limits.send_timeout`,
/// either side of a tunnel past `timeouts.idle`) still has what gatehouse wrote to it queued
/// in the kernel — up to the socket's send buffer, megabytes. Closed normally, the kernel
/// keeps that queue, and keeps offering it to a peer that reads nothing, for minutes after
/// gatehouse let the socket go; many such peers hold the memory every other connection sends
/// from. Reset, the queue is dropped at once (nginx's `reset_timedout_connection`, HAProxy's
/// `nolinger`).
pub trait ResetOnClose {
    /// Makes the coming close of the connection a reset.
    fn reset_on_close(&self);
}

impl ResetOnClose for TcpStream {
    fn reset_on_close(&self) {
        // A linger of zero makes close() send RST and drop the send queue. Failing, the
        // close stays a normal one.
        let _ = socket2::SockRef::from(self).set_linger(Some(Duration::ZERO));
    }
}

impl<T: ResetOnClose + ?Sized> ResetOnClose for Box<T> {
    fn reset_on_close(&self) {
        (**self).reset_on_close();
    }
}

impl<T: ResetOnClose> ResetOnClose for tokio_rustls::server::TlsStream<T> {
    fn reset_on_close(&self) {
        self.get_ref().0.reset_on_close();
    }
}

impl<T: ResetOnClose, O> ResetOnClose for Observed<T, O> {
    fn reset_on_close(&self) {
        self.inner.reset_on_close();
    }
}

/// Sees what a stream reads and writes.
pub trait Observer {
    /// `bytes` were just read (never empty).
    fn read(&mut self, bytes: &[u8]);
    /// A write just took `written`'s bytes.
    fn wrote(&mut self, written: &Written<'_>);
    /// A write waits: the peer takes no more for now.
    fn write_waits(&mut self) {}
}

/// An observer that may be absent, so a stream observed on some connections and not on
/// others keeps one type (one copy of the code that serves it).
impl<O: Observer> Observer for Option<O> {
    fn read(&mut self, bytes: &[u8]) {
        if let Some(observer) = self {
            observer.read(bytes);
        }
    }

    fn wrote(&mut self, written: &Written<'_>) {
        if let Some(observer) = self {
            observer.wrote(written);
        }
    }

    fn write_waits(&mut self) {
        if let Some(observer) = self {
            observer.write_waits();
        }
    }
}

/// Two observers of one stream, each shown everything (a hyper session's: the HTTP/1 framing
/// tracker reads, the HTTP/2 reset watch writes).
impl<A: Observer, B: Observer> Observer for (A, B) {
    fn read(&mut self, bytes: &[u8]) {
        self.0.read(bytes);
        self.1.read(bytes);
    }

    fn wrote(&mut self, written: &Written<'_>) {
        self.0.wrote(written);
        self.1.wrote(written);
    }

    fn write_waits(&mut self) {
        self.0.write_waits();
        self.1.write_waits();
    }
}

/// What one write took: the first `count` bytes of `slices`.
pub struct Written<'a> {
    slices: &'a [io::IoSlice<'a>],
    count: usize,
}

impl<'a> Written<'a> {
    /// The first `count` bytes of `slices`, taken by a write.
    pub fn new(slices: &'a [io::IoSlice<'a>], count: usize) -> Self {
        Written { slices, count }
    }

    /// How many bytes the write took.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The bytes the write took, in order, as the slices they were written from.
    pub fn chunks(&self) -> impl Iterator<Item = &[u8]> {
        let mut left = self.count;
        self.slices.iter().map_while(move |slice| {
            if left == 0 {
                return None;
            }
            let taken = slice.len().min(left);
            left -= taken;
            slice.get(..taken)
        })
    }
}

/// `inner`, with every read and write shown to `observer`.
#[derive(Debug)]
pub struct Observed<T, O> {
    inner: T,
    observer: O,
}

impl<T, O> Observed<T, O> {
    /// Wraps `inner`.
    pub fn new(inner: T, observer: O) -> Self {
        Observed { inner, observer }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// What the observer saw.
    pub fn observer(&self) -> &O {
        &self.observer
    }

    /// The wrapped stream, unwrapped (to seat it in the waiting room).
    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: AsyncRead + Unpin, O: Observer + Unpin> AsyncRead for Observed<T, O> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let fresh = &buf.filled()[before..];
            if !fresh.is_empty() {
                this.observer.read(fresh);
            }
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin, O: Observer + Unpin> AsyncWrite for Observed<T, O> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        match polled {
            Poll::Ready(Ok(count)) => this
                .observer
                .wrote(&Written::new(&[io::IoSlice::new(buf)], count)),
            Poll::Pending => this.observer.write_waits(),
            Poll::Ready(Err(_)) => {}
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        match polled {
            Poll::Ready(Ok(count)) => this.observer.wrote(&Written::new(bufs, count)),
            Poll::Pending => this.observer.write_waits(),
            Poll::Ready(Err(_)) => {}
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Adds bytes read to `received` and bytes written to `sent`.
#[derive(Debug)]
pub struct ByteCounters {
    pub received: IntCounter,
    pub sent: IntCounter,
}

impl Observer for ByteCounters {
    fn read(&mut self, bytes: &[u8]) {
        self.received.inc_by(bytes.len() as u64);
    }

    fn wrote(&mut self, written: &Written<'_>) {
        self.sent.inc_by(written.count() as u64);
    }
}

/// A stream that is handed back through a oneshot channel when its owner drops it.
///
/// hyper owns a connection's stream while it serves it and drops it when it gives up (for
/// instance on a late request head). Wrapped in this, the stream comes back afterwards, so
/// gatehouse can still say why it closes the connection (408), on plain TCP and TLS alike.
#[derive(Debug)]
pub struct Reclaimable<T> {
    inner: Option<T>,
    give_back: Option<oneshot::Sender<T>>,
}

impl<T> Reclaimable<T> {
    /// Wraps `inner`; the receiver gets it back once the wrapper is dropped.
    pub fn new(inner: T) -> (Self, oneshot::Receiver<T>) {
        let (give_back, reclaim) = oneshot::channel();
        (
            Reclaimable {
                inner: Some(inner),
                give_back: Some(give_back),
            },
            reclaim,
        )
    }

    fn stream(&mut self) -> io::Result<&mut T> {
        self.inner
            .as_mut()
            .ok_or_else(|| io::Error::other("stream already handed back"))
    }
}

impl<T> Drop for Reclaimable<T> {
    fn drop(&mut self) {
        if let (Some(give_back), Some(inner)) = (self.give_back.take(), self.inner.take()) {
            let _ = give_back.send(inner);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Reclaimable<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.stream() {
            Ok(stream) => Pin::new(stream).poll_read(cx, buf),
            Err(error) => Poll::Ready(Err(error)),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Reclaimable<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.stream() {
            Ok(stream) => Pin::new(stream).poll_write(cx, buf),
            Err(error) => Poll::Ready(Err(error)),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.stream() {
            Ok(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Err(error) => Poll::Ready(Err(error)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner
            .as_ref()
            .is_some_and(|stream| stream.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.stream() {
            Ok(stream) => Pin::new(stream).poll_flush(cx),
            Err(error) => Poll::Ready(Err(error)),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.stream() {
            Ok(stream) => Pin::new(stream).poll_shutdown(cx),
            Err(error) => Poll::Ready(Err(error)),
        }
    }
}
