//! gatehouse's own HTTP/1.1 server loop for the common request: a complete HTTP/1.1 head
//! without a body, or with a Content-Length body that arrived whole with it (a form: browsers
//! and curl send a small body in the same write as its head).
//!
//! hyper's HTTP/1 server was the largest share of a proxied request's user-space
//! instructions, and its per-session buffers (8 KiB to read, 8 KiB to write, the slot of the
//! request future) are what a burst of keep-alive connections leaves behind
//! (docs/benchmarks.md). This loop reads heads into one small buffer, parses each once with
//! httparse into a request whose URI and header values share the buffer's bytes, hands it to
//! the same handler hyper's sessions use, and writes the response head together with the
//! body's first bytes.
//!
//! Everything else goes to hyper: a head that is not simple (a chunked body, a body still on
//! its way, `Expect`, `Upgrade`, HEAD, CONNECT, HTTP/1.0, an HTTP/2 preface, a Content-Length
//! that is repeated or not plain digits), a malformed or over-long head. The bytes read
//! so far are replayed to a hyper session, which answers exactly as it always did (400, 431,
//! 414, h2c, uploads, upgrades); so the hostile-input boundary stays where it was, and this
//! loop only ever serves heads that parse cleanly.

use super::body::ProxyBody;
use super::headers;
use super::l7::{self, ClientBody, Connection};
use super::park::{self, Watched};
use super::request;
use crate::config::Limits;
use crate::io::ResetOnClose;
use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice, Write as _};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Headers per request head (hyper's default).
const MAX_HEADERS: usize = 100;
/// A session's first read buffer: room for the usual head (nginx: 1 KiB).
const READ_BUFFER: usize = 2048;
/// Body frames this large are written from their own buffer instead of being copied.
const COPY_LIMIT: usize = 8 * 1024;
/// Body bytes read ahead from the backend while the client has not taken them yet.
const QUEUE_LIMIT: usize = 128 * 1024;
/// Buffers handed to one vectored write.
const MAX_SLICES: usize = 16;
/// A write buffer grown past this by one response is not kept for the next.
const KEEP_WRITE_BUFFER: usize = 16 * 1024;
/// Time allowed to say goodbye (TLS close_notify) when closing.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// How a session of this loop ended.
#[derive(Debug)]
pub enum End {
    /// The client closed or left, a read or write failed, or the connection closes after a
    /// response (`Connection: close`, a malformed body, shutdown).
    Closed,
    /// Quiet since `quiet_since` (for [`park::LINGER`]) between requests: the connection
    /// parks until `head_deadline`.
    Idle {
        head_deadline: Instant,
        quiet_since: Instant,
    },
    /// A head this loop does not serve: its bytes are replayed on the stream, for a hyper
    /// session to serve by `head_deadline`.
    HandOff { head_deadline: Instant },
    /// The next head did not arrive whole by its deadline.
    Late,
}

/// Serves simple requests on `stream` until one is not simple, the connection idles, or it
/// ends. The first head is due by `head_deadline`; each next one `limits.header_timeout`
/// after the previous response ended.
pub async fn serve<T>(
    stream: &mut Watched<T>,
    connection: &Arc<Connection>,
    limits: Limits,
    shutdown: &CancellationToken,
    mut head_deadline: Instant,
) -> End
where
    T: AsyncRead + AsyncWrite + ResetOnClose + Unpin,
{
    let max_head = limits.max_header_bytes.max(l7::MIN_BUF_SIZE);
    let mut read = BytesMut::with_capacity(READ_BUFFER);
    let mut write = Vec::new();
    let mut stall = SendStall {
        limit: limits.send_timeout,
        timer: None,
        blocked: false,
        cut_off: false,
    };
    // One timer for the session, moved only when it fires: per request the deadlines are
    // two stored instants.
    let mut timer = std::pin::pin!(tokio::time::sleep_until(head_deadline));
    let mut cancelled = std::pin::pin!(shutdown.cancelled());
    // When the previous response ended with nothing of the next request read.
    let mut idle_since = None;
    // The park check runs no earlier: a connection found busy is checked again a check
    // period later, not at every LINGER, so a busy session's timer fires rarely.
    let mut check_after = Instant::now();
    loop {
        let head = loop {
            if !read.is_empty() {
                match parse(&mut read) {
                    Parsed::Simple(head) => break head,
                    Parsed::Partial if read.len() <= max_head => {}
                    Parsed::Partial | Parsed::Other => {
                        stream.replay(read.freeze());
                        return End::HandOff { head_deadline };
                    }
                }
            }
            if read.capacity() - read.len() < READ_BUFFER / 4 {
                read.reserve(read.capacity().max(READ_BUFFER));
            }
            let event = std::future::poll_fn(|cx| {
                match tokio_util::io::poll_read_buf(Pin::new(&mut *stream), cx, &mut read) {
                    Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Event::Ended),
                    Poll::Ready(Ok(_)) => return Poll::Ready(Event::Read),
                    Poll::Pending => {}
                }
                if read.is_empty() && cancelled.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Ended);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Timer);
                }
                Poll::Pending
            })
            .await;
            match event {
                Event::Read => idle_since = None,
                Event::Ended => return End::Closed,
                Event::Timer => {
                    let now = Instant::now();
                    let quiet_since = idle_since.filter(|_| read.is_empty());
                    let mut park_at = quiet_since.map(|since| since + park::LINGER);
                    if let Some(quiet_since) = quiet_since.filter(|_| park_at <= Some(now)) {
                        return End::Idle {
                            head_deadline,
                            quiet_since,
                        };
                    }
                    if now >= head_deadline {
                        return End::Late;
                    }
                    if let Some(at) = park_at.as_mut() {
                        check_after = now + park::CHECK_PERIOD;
                        *at = check_after;
                    }
                    let next = park_at.map_or(head_deadline, |at| at.min(head_deadline));
                    timer.as_mut().reset(next);
                }
            }
        };
        // In a block of its own, so the session's state does not hold the request's future
        // and the response's writing side by side.
        let mut sending_done = false;
        let handled = {
            let read_by = request::ReadBy::OwnLoop { size: head.size };
            let mut handling = std::pin::pin!(request::handle(head.request, read_by, connection));
            // A client whose connection resets while its request is in flight is gone: the
            // request is dropped (its backend exchange with it). One that closes only its
            // sending side (half-close) may still read: it is answered, then the connection
            // closes. Bytes of a next request that arrive meanwhile are kept.
            std::future::poll_fn(|cx| {
                if let Poll::Ready(response) = handling.as_mut().poll(cx) {
                    return Poll::Ready(Some(response));
                }
                if !sending_done && read.is_empty() && read.capacity() > 0 {
                    match tokio_util::io::poll_read_buf(Pin::new(&mut *stream), cx, &mut read) {
                        Poll::Ready(Ok(0)) => sending_done = true,
                        Poll::Ready(Err(_)) => return Poll::Ready(None),
                        Poll::Ready(Ok(_)) | Poll::Pending => {}
                    }
                }
                Poll::Pending
            })
            .await
        };
        let Some(request::Handled {
            mut response,
            request_id,
        }) = handled
        else {
            return End::Closed;
        };
        response.body_mut().answers(connection.clone());
        let closing = head.close || sending_done || shutdown.is_cancelled();
        let written = write_response(
            stream,
            &mut write,
            response,
            request_id.as_ref(),
            closing,
            &mut stall,
        );
        match written.await {
            Ok(Ending::KeepAlive) => {}
            Ok(Ending::Close) => {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, stream.shutdown()).await;
                return End::Closed;
            }
            Err(_) => {
                if stall.cut_off {
                    stream.reset_on_close();
                }
                return End::Closed;
            }
        }
        if write.capacity() > KEEP_WRITE_BUFFER {
            write = Vec::new();
        }
        let now = Instant::now();
        head_deadline = now + limits.header_timeout;
        if read.is_empty() {
            idle_since = Some(now);
            // The timer is left early, never late: on a busy connection it is already due
            // before this park check and is not touched.
            let park_at = (now + park::LINGER).max(check_after);
            if timer.deadline() > park_at {
                timer.as_mut().reset(park_at);
            }
        }
    }
}

/// What woke a session waiting for the bytes of a head.
enum Event {
    Read,
    Ended,
    Timer,
}

/// A request head read by this loop.
struct Head {
    request: Request<ClientBody>,
    /// The request line and header lines as they arrived (the empty line that ends them not
    /// counted), for `limits.max_header_bytes`.
    size: usize,
    /// The client asked to close the connection after this request.
    close: bool,
}

/// What the start of the read buffer holds.
// Returned once per head and taken apart at once: boxing the head would cost an allocation.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    /// A whole simple head, removed from the buffer.
    Simple(Head),
    /// The start of a head.
    Partial,
    /// Something hyper serves: another kind of request, or bytes that are not a valid head.
    Other,
}

/// Parses the head at the start of `read`. A simple head is removed from the buffer, its URI
/// and header values sharing the buffer's bytes; anything else leaves the buffer as it was.
// Not inlined: inlined into the session's async fn, its header arrays (≈ 5 KB) would become
// part of every session's state instead of a stack frame.
#[inline(never)]
fn parse(read: &mut BytesMut) -> Parsed {
    let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let length = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut parsed,
        read,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    if parsed.version != Some(1) {
        return Parsed::Other;
    }
    let method = match parsed.method.map(str::as_bytes).map(Method::from_bytes) {
        Some(Ok(method)) if method != Method::CONNECT && method != Method::HEAD => method,
        _ => return Parsed::Other,
    };
    let Some(path) = parsed.path else {
        return Parsed::Other;
    };
    let base = read.as_ptr() as usize;
    let path = span(base, path.as_bytes());
    // Where each header's name and value sit in the head, so values can share its bytes.
    let mut spans = [[0u32; 4]; MAX_HEADERS];
    let mut close = false;
    let mut content_length = None;
    for (header_span, header) in spans.iter_mut().zip(parsed.headers.iter()) {
        let name = header.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            match (content_length, body_length(header.value)) {
                (None, Some(length)) => content_length = Some(length),
                // Repeated, signed, listed or too long: hyper and the framing check refuse
                // or resolve it as they always did.
                _ => return Parsed::Other,
            }
        } else if ["transfer-encoding", "expect", "upgrade"]
            .iter()
            .any(|other| name.eq_ignore_ascii_case(other.as_bytes()))
        {
            return Parsed::Other;
        }
        if name.eq_ignore_ascii_case(b"connection") {
            close |= says_close(header.value);
        }
        let [name_start, name_length] = span(base, name);
        let [value_start, value_length] = span(base, header.value);
        *header_span = [name_start, name_length, value_start, value_length];
    }
    let count = parsed.headers.len();
    let body_length = content_length.unwrap_or(0);
    if (read.len() - length) < body_length {
        // The body is still on its way: hyper streams it as it comes.
        return Parsed::Other;
    }
    let head = read.split_to(length).freeze();
    // The empty line that ends the head: CRLF, or a bare LF.
    let ending = if head.ends_with(b"\r\n") { 2 } else { 1 };
    // Made in place and filled in: a request built apart and moved into the head was copied
    // twice more (272 bytes each time), and its empty header map dropped when replaced.
    let mut parsed = Parsed::Simple(Head {
        request: Request::new(ClientBody::Empty),
        size: length.saturating_sub(ending),
        close,
    });
    if let Parsed::Simple(Head { request, .. }) = &mut parsed {
        if build(request, &head, method, path, &spans[..count]).is_none() {
            // Not valid after all (hyper says why): put the head back as it was.
            let mut whole = BytesMut::with_capacity(head.len() + read.len());
            whole.extend_from_slice(&head);
            whole.extend_from_slice(read);
            *read = whole;
            return Parsed::Other;
        }
        if body_length > 0 {
            *request.body_mut() = ClientBody::Whole(read.split_to(body_length).freeze());
        }
    }
    parsed
}

/// A Content-Length this loop serves: plain digits (httparse has trimmed the whitespace
/// around them), few enough to fit any body that arrived with its head.
fn body_length(value: &[u8]) -> Option<usize> {
    if value.is_empty() || value.len() > 9 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    value.iter().try_fold(0usize, |length, digit| {
        length
            .checked_mul(10)?
            .checked_add(usize::from(digit - b'0'))
    })
}

/// Where `part` starts in the buffer at `base`, and its length (heads are far below 4 GiB).
fn span(base: usize, part: &[u8]) -> [u32; 2] {
    [(part.as_ptr() as usize - base) as u32, part.len() as u32]
}

/// Fills `request` with a parsed head's target and headers; `None` when one is not valid for
/// `http` (the request is then dropped).
fn build(
    request: &mut Request<ClientBody>,
    head: &Bytes,
    method: Method,
    [path_start, path_length]: [u32; 2],
    spans: &[[u32; 4]],
) -> Option<()> {
    let part = |start: u32, length: u32| start as usize..(start + length) as usize;
    *request.uri_mut() = Uri::from_maybe_shared(head.slice(part(path_start, path_length))).ok()?;
    let headers = request.headers_mut();
    headers.reserve(spans.len());
    for &[name_start, name_length, value_start, value_length] in spans {
        let name = HeaderName::from_bytes(&head[part(name_start, name_length)]).ok()?;
        let value =
            HeaderValue::from_maybe_shared(head.slice(part(value_start, value_length))).ok()?;
        headers.append(name, value);
    }
    *request.method_mut() = method;
    *request.version_mut() = Version::HTTP_11;
    Some(())
}

/// Whether a `Connection` header value says close.
fn says_close(value: &[u8]) -> bool {
    value
        .split(|&byte| byte == b',')
        .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"))
}

/// What becomes of the connection after a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    KeepAlive,
    Close,
}

/// How a response's body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body (1xx, 204, 304).
    None,
    /// As many bytes as its Content-Length says.
    Length,
    Chunked,
}

/// Writes `response` to the client: the head with the body's first bytes in one write, then
/// the rest as it comes; an error when the body failed (after what came before it). While
/// the client reads slowly, up to [`QUEUE_LIMIT`] bytes of the body are read ahead from the
/// backend and written together (vectored). The connection closes after it when `closing` or
/// when the response says `Connection: close`, and fails when the client accepts no byte of
/// it for `limits.send_timeout` (see [`SendStall`]).
async fn write_response<T: AsyncWrite + Unpin>(
    stream: &mut T,
    out: &mut Vec<u8>,
    response: Response<ProxyBody>,
    request_id: Option<&HeaderValue>,
    closing: bool,
    stall: &mut SendStall,
) -> io::Result<Ending> {
    let (parts, mut body) = response.into_parts();
    out.clear();
    let (framing, ending) = encode_head(&parts, &body, request_id, closing, out);
    let chunked = framing == Framing::Chunked;
    let mut queue = Outgoing {
        out,
        sent: 0,
        frames: VecDeque::new(),
        queued: 0,
    };
    let mut body_done = framing == Framing::None || body.is_end_stream();
    if body_done && chunked {
        queue.out.extend_from_slice(b"0\r\n\r\n");
    }
    let mut flushed = true;
    // A body that failed (the backend closed or went silent inside it): what came before the
    // failure is still written, then the connection closes without ending the body, so the
    // client sees the response cut off — not an empty reply with the status lost.
    let mut failed = None;
    let mut stalled = false;
    let written = std::future::poll_fn(|cx| loop {
        let mut progressed = false;
        while !body_done && queue.len() < QUEUE_LIMIT {
            match Pin::new(&mut body).poll_frame(cx) {
                Poll::Pending => break,
                Poll::Ready(Some(Err(error))) => {
                    failed = Some(error);
                    body_done = true;
                }
                Poll::Ready(Some(Ok(frame))) => {
                    progressed = true;
                    if let Ok(data) = frame.into_data() {
                        queue.push(data, chunked);
                    }
                }
                Poll::Ready(None) => {
                    progressed = true;
                    body_done = true;
                    if chunked {
                        queue.push_last_chunk();
                    }
                }
            }
        }
        if !queue.is_empty() {
            match queue.poll_write(stream, cx) {
                Poll::Ready(Ok(())) => {
                    progressed = true;
                    flushed = false;
                    stall.took();
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => {
                    if stall.timed_out(cx) {
                        stalled = true;
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "client accepted nothing for limits.send_timeout",
                        )));
                    }
                }
            }
        }
        if body_done && queue.is_empty() {
            return Poll::Ready(match failed.take() {
                Some(error) => Err(io::Error::other(error)),
                None => Ok(()),
            });
        }
        if !progressed {
            // Waiting for the backend with everything written: what a TLS layer still
            // holds goes out now.
            if queue.is_empty() && !flushed {
                if let Poll::Ready(result) = Pin::new(&mut *stream).poll_flush(cx) {
                    result?;
                    flushed = true;
                }
            }
            return Poll::Pending;
        }
    })
    .await;
    if let Err(error) = written {
        if stalled {
            body.client_stalled();
        }
        return Err(error);
    }
    drop(body);
    // A TLS layer may still hold the end of the response: bounded as the writes were.
    let flushed = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *stream).poll_flush(cx)));
    match flushed.await {
        Poll::Ready(result) => result?,
        // Boxed: its timer would otherwise take room in every response's state.
        Poll::Pending => Box::pin(tokio::time::timeout(stall.limit, stream.flush()))
            .await
            .map_err(|_| {
                stall.cut_off = true;
                io::Error::from(io::ErrorKind::TimedOut)
            })??,
    }
    Ok(ending)
}

/// Bounds how long a client may accept nothing of a response (`limits.send_timeout`): a
/// client that stops reading would otherwise hold the response's backend connection for ever.
/// One per connection; its timer is made on the first write a client does not take (most
/// connections never need it) and set again on each one after a write it took. A connection
/// cut off is reset (see [`ResetOnClose`]).
struct SendStall {
    limit: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The last write was not taken (the timer runs).
    blocked: bool,
    /// The client took nothing for the whole limit: the connection is cut off.
    cut_off: bool,
}

impl SendStall {
    /// The client took a write: a next blocked one starts the wait again.
    fn took(&mut self) {
        self.blocked = false;
    }

    /// A write the client did not take: whether it has taken nothing for the whole limit
    /// (else the task is woken when it will have).
    #[cold]
    fn timed_out(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        let timer = match &mut self.timer {
            Some(timer) => {
                if !self.blocked {
                    timer.as_mut().reset(Instant::now() + self.limit);
                }
                timer
            }
            None => self.timer.insert(Box::pin(tokio::time::sleep(self.limit))),
        };
        self.blocked = true;
        self.cut_off = timer.as_mut().poll(cx).is_ready();
        self.cut_off
    }
}

/// Bytes of a response not yet written: the head and small frames gathered in `out` (copied:
/// one write for the usual small response), then larger frames as they came.
struct Outgoing<'a> {
    out: &'a mut Vec<u8>,
    /// Bytes of `out` already written.
    sent: usize,
    frames: VecDeque<Bytes>,
    /// Bytes in `frames`.
    queued: usize,
}

impl Outgoing<'_> {
    fn len(&self) -> usize {
        self.out.len() - self.sent + self.queued
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Queues a body frame, with its chunk framing when `chunked`.
    fn push(&mut self, data: Bytes, chunked: bool) {
        if data.is_empty() {
            return;
        }
        if self.frames.is_empty() {
            if chunked {
                // Writing to a Vec cannot fail.
                let _ = write!(self.out, "{:x}\r\n", data.len());
            }
            if data.len() < COPY_LIMIT {
                self.out.extend_from_slice(&data);
                if chunked {
                    self.out.extend_from_slice(b"\r\n");
                }
                return;
            }
        } else if chunked {
            self.push_frame(Bytes::from(format!("{:x}\r\n", data.len())));
        }
        self.push_frame(data);
        if chunked {
            self.push_frame(Bytes::from_static(b"\r\n"));
        }
    }

    fn push_last_chunk(&mut self) {
        if self.frames.is_empty() {
            self.out.extend_from_slice(b"0\r\n\r\n");
        } else {
            self.push_frame(Bytes::from_static(b"0\r\n\r\n"));
        }
    }

    fn push_frame(&mut self, frame: Bytes) {
        self.queued += frame.len();
        self.frames.push_back(frame);
    }

    /// Writes what it can in one vectored write; ready once some bytes went out.
    fn poll_write<T: AsyncWrite + Unpin>(
        &mut self,
        stream: &mut T,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<io::Result<()>> {
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let mut count = 0;
        if self.sent < self.out.len() {
            slices[0] = IoSlice::new(&self.out[self.sent..]);
            count = 1;
        }
        for frame in &self.frames {
            if count == MAX_SLICES {
                break;
            }
            slices[count] = IoSlice::new(frame);
            count += 1;
        }
        let mut written = match Pin::new(stream).poll_write_vectored(cx, &slices[..count]) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(written)) => written,
            Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
            Poll::Pending => return Poll::Pending,
        };
        let from_out = (self.out.len() - self.sent).min(written);
        self.sent += from_out;
        written -= from_out;
        if self.sent == self.out.len() {
            self.out.clear();
            self.sent = 0;
        }
        while written > 0 {
            let Some(front) = self.frames.front_mut() else {
                break;
            };
            let taken = front.len().min(written);
            front.advance(taken);
            self.queued -= taken;
            written -= taken;
            if front.is_empty() {
                self.frames.pop_front();
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Writes the status line and headers into `out`, adding `Date`, the body's framing,
/// `request_id` as `X-Request-Id` (in place of any the response has) and `Connection: close`
/// when `closing`; returns the framing and whether the connection ends.
fn encode_head(
    parts: &http::response::Parts,
    body: &ProxyBody,
    request_id: Option<&HeaderValue>,
    mut closing: bool,
    out: &mut Vec<u8>,
) -> (Framing, Ending) {
    let status = parts.status;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut has_date = false;
    let mut has_length = false;
    let mut has_connection = false;
    for (name, value) in &parts.headers {
        if name == header::TRANSFER_ENCODING
            || (request_id.is_some() && name == headers::X_REQUEST_ID)
        {
            // The body is framed here; the request's id is gatehouse's.
            continue;
        }
        has_date |= name == header::DATE;
        has_length |= name == header::CONTENT_LENGTH;
        if name == header::CONNECTION {
            has_connection = true;
            closing |= says_close(value.as_bytes());
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(id) = request_id {
        out.extend_from_slice(b"x-request-id: ");
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !has_date {
        out.extend_from_slice(b"date: ");
        http_date(out);
        out.extend_from_slice(b"\r\n");
    }
    let framing = if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::None
    } else if has_length {
        Framing::Length
    } else if let Some(length) = body.size_hint().exact() {
        let _ = write!(out, "content-length: {length}\r\n");
        Framing::Length
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Framing::Chunked
    };
    if closing && !has_connection {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let ending = if closing {
        Ending::Close
    } else {
        Ending::KeepAlive
    };
    (framing, ending)
}

/// Appends the current time as an HTTP date, rendered once per second per thread.
fn http_date(out: &mut Vec<u8>) {
    thread_local! {
        static RENDERED: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    RENDERED.with_borrow_mut(|(rendered_at, date)| {
        if *rendered_at != second {
            *date = httpdate::fmt_http_date(now);
            *rendered_at = second;
        }
        out.extend_from_slice(date.as_bytes());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &[u8]) -> (Parsed, BytesMut) {
        let mut read = BytesMut::from(text);
        (parse(&mut read), read)
    }

    #[test]
    fn serves_simple_heads_and_leaves_the_rest_for_the_next() {
        let (head, rest) = parsed(
            b"GET /a?b=c HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Close\r\nX-A: 1\r\nX-A: 2\r\n\r\nGET /next",
        );
        let Parsed::Simple(head) = head else {
            panic!("a simple head");
        };
        assert!(head.close);
        let request = head.request;
        assert_eq!(request.method(), Method::GET);
        assert_eq!(request.uri(), "/a?b=c");
        assert_eq!(request.version(), Version::HTTP_11);
        assert_eq!(request.headers()["host"], "x");
        assert_eq!(request.headers().get_all("x-a").iter().count(), 2);
        assert!(matches!(request.body(), ClientBody::Empty));
        assert_eq!(&rest[..], b"GET /next");
        let (head, _) = parsed(b"DELETE http://x/y HTTP/1.1\r\n\r\n");
        assert!(matches!(head, Parsed::Simple(head) if !head.close));
    }

    #[test]
    fn serves_a_body_that_came_whole_with_its_head() {
        let (head, rest) =
            parsed(b"POST /form HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n\r\na=1&b=2GET /next");
        let Parsed::Simple(head) = head else {
            panic!("a simple head");
        };
        assert!(matches!(head.request.body(), ClientBody::Whole(body) if &body[..] == b"a=1&b=2"));
        assert_eq!(head.request.headers()["content-length"], "7");
        assert_eq!(&rest[..], b"GET /next", "exactly the body was taken");
        let (head, rest) = parsed(b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\nGET /next");
        assert!(
            matches!(head, Parsed::Simple(head) if matches!(head.request.body(), ClientBody::Empty))
        );
        assert_eq!(&rest[..], b"GET /next");
    }

    /// `limits.max_header_bytes` counts the request line and header lines as they arrived.
    #[test]
    fn a_simple_head_knows_its_size() {
        for (text, size) in [
            (&b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /next"[..], 25),
            (b"GET / HTTP/1.1\nHost: x\n\n", 23),
        ] {
            let (head, _) = parsed(text);
            let Parsed::Simple(head) = head else {
                panic!("a simple head: {:?}", String::from_utf8_lossy(text));
            };
            assert_eq!(head.size, size, "{:?}", String::from_utf8_lossy(text));
        }
    }

    #[test]
    fn hands_everything_else_to_hyper_untouched() {
        let others: [&[u8]; 16] = [
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nab",
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
            b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\nabc",
            b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\nabc",
            b"POST / HTTP/1.1\r\nContent-Length: 0000000003\r\n\r\nabc",
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"PUT / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"HEAD / HTTP/1.1\r\n\r\n",
            b"CONNECT x:443 HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
            b"\x16\x03\x01\x00\x05hello",
        ];
        for text in others {
            let (head, rest) = parsed(text);
            assert!(
                matches!(head, Parsed::Other),
                "{:?}",
                String::from_utf8_lossy(text)
            );
            assert_eq!(&rest[..], text, "the bytes stay for hyper to read");
        }
        // httparse takes it, `http` refuses it (hyper answers 414): the head is put back.
        let long = format!("GET /{} HTTP/1.1\r\n\r\nGET /next", "a".repeat(70_000));
        let (head, rest) = parsed(long.as_bytes());
        assert!(matches!(head, Parsed::Other));
        assert_eq!(&rest[..], long.as_bytes());
        let (head, rest) = parsed(b"GET / HTTP/1.1\r\nHost: x");
        assert!(matches!(head, Parsed::Partial));
        assert_eq!(&rest[..], b"GET / HTTP/1.1\r\nHost: x");
    }

    fn head_of(response: Response<ProxyBody>, closing: bool) -> (String, Framing, Ending) {
        let (parts, body) = response.into_parts();
        let mut out = Vec::new();
        let (framing, ending) = encode_head(&parts, &body, None, closing, &mut out);
        (String::from_utf8(out).unwrap(), framing, ending)
    }

    #[test]
    fn frames_each_response_once() {
        let mut response = Response::new(ProxyBody::local("hello"));
        response
            .headers_mut()
            .insert(header::TRANSFER_ENCODING, HeaderValue::from_static("gzip"));
        let (head, framing, ending) = head_of(response, false);
        assert_eq!((framing, ending), (Framing::Length, Ending::KeepAlive));
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("\r\ncontent-length: 5\r\n"), "{head}");
        assert!(head.contains("\r\ndate: "), "{head}");
        assert!(!head.contains("transfer-encoding"), "{head}");
        assert!(!head.contains("connection"), "{head}");
        assert!(head.ends_with("\r\n\r\n"));

        let mut response = Response::new(ProxyBody::empty());
        *response.status_mut() = StatusCode::NO_CONTENT;
        response
            .headers_mut()
            .insert(header::DATE, HeaderValue::from_static("then"));
        let (head, framing, ending) = head_of(response, true);
        assert_eq!((framing, ending), (Framing::None, Ending::Close));
        assert_eq!(
            head,
            "HTTP/1.1 204 No Content\r\ndate: then\r\nconnection: close\r\n\r\n"
        );

        let mut response = Response::new(ProxyBody::empty());
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("x, Close"));
        let (head, _, ending) = head_of(response, false);
        assert_eq!(head.matches("connection").count(), 1, "{head}");
        assert_eq!(ending, Ending::Close, "the response says close");
    }

    #[tokio::test]
    async fn queued_frames_go_out_in_order_through_partial_writes() {
        use tokio::io::AsyncReadExt;
        // A pipe of 7 bytes: every write is partial.
        let (mut writer, mut reader) = tokio::io::duplex(7);
        let reading = tokio::spawn(async move {
            let mut all = Vec::new();
            reader.read_to_end(&mut all).await.unwrap();
            all
        });
        let mut out = b"HEAD".to_vec();
        let mut queue = Outgoing {
            out: &mut out,
            sent: 0,
            frames: VecDeque::new(),
            queued: 0,
        };
        let large = "x".repeat(COPY_LIMIT);
        queue.push(Bytes::from_static(b"ab"), true);
        queue.push(Bytes::from(large.clone()), true);
        queue.push(Bytes::from_static(b"cd"), true);
        queue.push(Bytes::new(), true);
        queue.push_last_chunk();
        while !queue.is_empty() {
            std::future::poll_fn(|cx| queue.poll_write(&mut writer, cx))
                .await
                .unwrap();
        }
        drop(writer);
        let expected = format!("HEAD2\r\nab\r\n{COPY_LIMIT:x}\r\n{large}\r\n2\r\ncd\r\n0\r\n\r\n");
        assert_eq!(String::from_utf8(reading.await.unwrap()).unwrap(), expected);
    }

    /// An in-memory stream has no reset to send.
    impl ResetOnClose for tokio::io::DuplexStream {
        fn reset_on_close(&self) {}
    }

    /// A session's state is what every busy connection holds, and keeps for `park::LINGER`
    /// after a response (≈ 4 KB since its head parser is not inlined and the request's
    /// future and the response's writing do not sit side by side): a change that makes it
    /// grow by a fifth fails here.
    #[tokio::test]
    async fn a_session_state_stays_small() {
        let (connection, limits) = l7::test_connection();
        let mut stream = Watched::new(tokio::io::duplex(64).0);
        let shutdown = CancellationToken::new();
        let session = serve(&mut stream, &connection, limits, &shutdown, Instant::now());
        let size = std::mem::size_of_val(&session);
        // 4,080 bytes in a release build, 4,120 in a debug one (3,568 / 3,600 in session 9;
        // the stall bounds, the body-end record and forms served by the loop added the rest).
        assert!(size <= 4800, "the session's state is {size} bytes");
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_are_a_head_or_stay_put(input in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let mut read = BytesMut::from(&input[..]);
            match parse(&mut read) {
                // The head and its body were taken from the front, nothing else.
                Parsed::Simple(head) => {
                    let body = match head.request.body() {
                        ClientBody::Whole(body) => &body[..],
                        _ => &[],
                    };
                    let end = input.len() - read.len();
                    proptest::prop_assert_eq!(&input[end..], &read[..]);
                    proptest::prop_assert_eq!(&input[end - body.len()..end], body);
                }
                Parsed::Partial | Parsed::Other => proptest::prop_assert_eq!(&read[..], &input[..]),
            }
        }
    }
}
