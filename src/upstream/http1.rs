//! gatehouse's own HTTP/1.1 client for backend connections.
//!
//! hyper's client runs each connection as a task of its own and hands it every request over
//! a channel: per request a channel send, a task wake-up and a dispatcher pass — about a third
//! of a proxied request's instructions (docs/benchmarks.md). Here the request's own future
//! writes the head, streams the body and reads the response head; the response body owns the
//! connection while it streams and gives it back to its pool once read to its end.
//!
//! Response framing follows RFC 9112 §6.3: no body for HEAD, 1xx, 204 and 304; chunked when
//! Transfer-Encoding says so; otherwise Content-Length (repeated values must agree); or until
//! the backend closes. A body in any transfer coding but one `chunked` (`gzip, chunked`) is
//! refused (502, as nginx does): the coding could not be passed on — an HTTP/2 client has no
//! Transfer-Encoding — and decoding only the chunks would hand the client compressed bytes
//! as if they were not. Anything unusual (Transfer-Encoding with Content-Length, bytes past
//! the end, `Connection: close`, HTTP/1.0 without keep-alive) closes the connection after the
//! response instead of reusing it.

use super::body::UpstreamBody;
use super::connections::BackendConnections;
use super::connector::UpstreamStream;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{request, Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Longest response head accepted (hyper's default limit).
const MAX_HEAD: usize = 8192 + 4096 * 100;
/// Headers per response head (hyper's default).
const MAX_HEADERS: usize = 100;
/// Room in a response's header map: a usual response's headers and those gatehouse adds to
/// it (`X-Request-Id`, HSTS) fit without the map growing (rehash, reallocate). hyper also
/// reuses the map of a response it sent for the next request on that connection.
const HEADER_SLOTS: usize = 12;
/// Read size for heads and small bodies.
const READ_SMALL: usize = 8 * 1024;
/// Spare bytes at the end of the read buffer that are worth a read of their own.
const MIN_SPARE: usize = 2048;
/// Read size while a large body streams: a quarter of the syscalls of 64 KiB reads, and 28 %
/// less CPU per MiB on the peer benchmark's large-1m (docs/benchmarks.md). An idle pooled
/// connection does not keep a buffer this large.
const READ_LARGE: usize = 256 * 1024;
/// Read size while a large body streams to an HTTP/2 client. What a read takes waits in
/// memory until the client's flow-control window lets it go, and one client has up to 100
/// streams: a client that keeps its windows almost shut would otherwise hold up to
/// [`READ_LARGE`] of gatehouse's memory per stream (measured: 12.3 MiB per connection of 100
/// such streams; 4.5 MiB with this). Two HTTP/2 frames of the default size (16 KiB reads cost
/// large HTTP/2 downloads a third more CPU); HAProxy holds 16 KiB per stream.
const READ_MULTIPLEXED: usize = 32 * 1024;
/// Longest chunk-size line (extensions included).
const MAX_CHUNK_LINE: usize = 4096;
/// A header span's name length marking a header consumed here (no header name is empty).
const CONSUMED: u32 = 0;
/// Longest trailer section (trailers are read and dropped).
const MAX_TRAILERS: usize = 64 * 1024;

/// Why an exchange with a backend failed.
#[derive(Debug, thiserror::Error)]
pub enum Http1Error {
    #[error("writing to backend: {0}")]
    Write(#[source] io::Error),
    #[error("reading from backend: {0}")]
    Read(#[source] io::Error),
    #[error("backend closed the connection before responding")]
    ClosedBeforeResponse,
    #[error("backend closed the connection inside the response")]
    Truncated,
    #[error("backend sent nothing for {0:?} inside the response (timeouts.request)")]
    Stalled(Duration),
    #[error("malformed response from backend: {0}")]
    Malformed(&'static str),
    #[error("client request body: {0}")]
    ClientBody(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl Http1Error {
    /// An I/O timeout (not the request timeout, which is applied around the exchange).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Http1Error::Write(e) | Http1Error::Read(e) if e.kind() == io::ErrorKind::TimedOut)
    }

    /// The backend closed or reset the connection instead of answering: on a connection
    /// that idled, what a backend's keep-alive timer firing as the request arrived looks like.
    pub fn is_closed_before_response(&self) -> bool {
        match self {
            Http1Error::ClosedBeforeResponse => true,
            Http1Error::Read(error) => matches!(
                error.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
            ),
            _ => false,
        }
    }
}

/// An open HTTP/1.1 connection to a backend.
pub struct Connection {
    stream: UpstreamStream,
    /// Bytes read and not yet consumed (none while the connection idles).
    read: BytesMut,
}

thread_local! {
    /// The buffer request heads are encoded in, its capacity kept for the next head. Per
    /// thread rather than per connection: a connection moves with every response body, and
    /// a body of more than 128 bytes is moved by `memcpy` calls instead of inline copies
    /// (≈ 300 instructions a request).
    static HEAD_BUFFER: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// A head buffer grown past this by one large head is not kept.
const KEEP_HEAD_BUFFER: usize = 16 * 1024;

/// Gives `buffer` back for the next head (when two requests' writes overlapped on this
/// thread, the buffer given back last is kept).
fn keep_head_buffer(buffer: Vec<u8>) {
    if buffer.capacity() <= KEEP_HEAD_BUFFER {
        HEAD_BUFFER.set(buffer);
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("buffered", &self.read.len())
            .finish()
    }
}

/// A failed exchange, with the request's body when none of the request was sent.
pub type SendFailure = (Http1Error, Option<UpstreamBody>);

/// Headers set on a request on its way to a backend, each in place of any the request
/// carries by that name. They are written straight into the head, first after the request
/// line: inserted into the request's header map instead, each would be hashed and probed for
/// (≈ 230 instructions a header, ≈ 5 % of a proxied HTTP/1 request).
pub trait SetHeaders: Sync {
    /// Whether the request's own header `name` gives way to these (it is not sent).
    fn replaces(&self, name: &HeaderName) -> bool;
    /// Appends these headers to a head being written, each with [`write_header`].
    fn write(&self, head: &mut Vec<u8>);
}

/// Appends the header line `name: value` to a head being written; `value` is a valid header
/// value (a `HeaderValue`'s bytes, or a URI authority's).
pub fn write_header(head: &mut Vec<u8>, name: &str, value: &[u8]) {
    head.extend_from_slice(name.as_bytes());
    head.extend_from_slice(b": ");
    head.extend_from_slice(value);
    head.extend_from_slice(b"\r\n");
}

impl Connection {
    /// A connection over a freshly opened stream.
    pub fn new(stream: UpstreamStream) -> Self {
        Connection {
            stream,
            read: BytesMut::new(),
        }
    }

    /// Whether an idle connection can carry a request: the backend has not closed it (nor,
    /// on plain TCP, sent anything unasked). No syscall unless the reactor saw the socket
    /// become readable.
    pub fn is_usable(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut byte = [0u8; 1];
        let mut peeked = tokio::io::ReadBuf::new(&mut byte);
        match self.stream.tcp().poll_peek(&mut cx, &mut peeked) {
            Poll::Pending => true,
            Poll::Ready(Ok(0) | Err(_)) => false,
            // TLS may deliver a session ticket late; a close alert shows on first use.
            Poll::Ready(Ok(_)) => self.stream.is_tls(),
        }
    }

    /// Sends the request `head` (origin-form URI) with the headers `set` on it and `body`,
    /// and reads the response head. The head is only borrowed: the caller keeps it to send
    /// the request again elsewhere. The response body streams from the returned response and gives the
    /// connection to `home` when it ends cleanly (`None`: closed after this response); it
    /// fails when the backend sends nothing of it for `stall_limit`.
    ///
    /// An empty body whose head could not be written comes back with the error, so the
    /// request can go out on another connection; a body with bytes is consumed (the head
    /// waits for its first bytes, which are then gone).
    pub async fn send(
        mut self,
        head: &request::Parts,
        set: &dyn SetHeaders,
        body: UpstreamBody,
        home: Option<Arc<BackendConnections>>,
        stall_limit: Duration,
    ) -> Result<Response<ResponseBody>, SendFailure> {
        let mut buffer = HEAD_BUFFER.take();
        let chunked = encode_head(head, set, &body, &mut buffer);
        let mut upload = None;
        if body.is_end_stream() {
            let written = match self.stream.write_all(&buffer).await {
                Ok(()) => self.stream.flush().await,
                Err(error) => Err(error),
            };
            keep_head_buffer(buffer);
            if let Err(error) = written {
                // A head cut short is not a request the backend could act on.
                return Err((Http1Error::Write(error), Some(body)));
            }
        } else {
            // The head goes with the body's first bytes: a body that fails at once (a
            // malformed first chunk) sends nothing at all.
            let head = Bytes::copy_from_slice(&buffer);
            keep_head_buffer(buffer);
            upload = Some(Upload::new(head, body, chunked));
        }
        let head_request = head.method == Method::HEAD;
        // The body goes up while the response head is awaited: a backend may answer (or
        // start echoing) before it has read the whole request.
        let head = std::future::poll_fn(|cx| {
            if let Some(upload) = upload.as_mut() {
                if let Poll::Ready(Err(UploadError::Client(error))) =
                    upload.poll(&mut self.stream, cx)
                {
                    return Poll::Ready(Err(Http1Error::ClientBody(error)));
                }
            }
            self.poll_head(cx, head_request)
        })
        .await;
        let head = match head {
            Ok(head) => head,
            Err(error) => return Err((error, None)),
        };
        if let (Some(seconds), Some(home)) = (head.announced_idle, &home) {
            home.announce_idle(seconds);
        }
        let mut response = Response::new(ResponseBody {
            connection: None,
            home: None,
            framing: Framing::Done,
            upload: None,
            stall: Stall::new(stall_limit),
            large_read: READ_LARGE,
        });
        *response.status_mut() = head.status;
        *response.version_mut() = head.version;
        *response.headers_mut() = head.headers;
        let body = response.body_mut();
        body.framing = head.framing;
        body.home = home.filter(|_| head.keep_alive);
        body.upload = upload.filter(|upload| !upload.is_finished()).map(Box::new);
        body.connection = Some(self);
        body.settle();
        Ok(response)
    }

    /// Reads until a final response head (1xx other than 101 are skipped).
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        head_request: bool,
    ) -> Poll<Result<Head, Http1Error>> {
        loop {
            if !self.read.is_empty() {
                let buffered = self.read.len();
                if let Some(head) = parse_head(&mut self.read, head_request)? {
                    // A read can complete a head past the limit in one go: held to it all the same.
                    if buffered - self.read.len() > MAX_HEAD {
                        return Poll::Ready(Err(Http1Error::Malformed("response head too large")));
                    }
                    if head.status.is_informational()
                        && head.status != StatusCode::SWITCHING_PROTOCOLS
                    {
                        continue;
                    }
                    return Poll::Ready(Ok(head));
                }
                if self.read.len() > MAX_HEAD {
                    return Poll::Ready(Err(Http1Error::Malformed("response head too large")));
                }
            }
            make_room(&mut self.read, READ_SMALL);
            match tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(Http1Error::Read(error))),
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(if self.read.is_empty() {
                        Http1Error::ClosedBeforeResponse
                    } else {
                        Http1Error::Truncated
                    }))
                }
                Poll::Ready(Ok(_)) => {}
            }
        }
    }
}

/// Room for the next read. The spare end of the current buffer is used while it holds a
/// small read: responses whose heads and bodies are still referenced elsewhere (frozen parts
/// of the same allocation) then do not force a new allocation for every response.
fn make_room(buffer: &mut BytesMut, wanted: usize) {
    if buffer.capacity() - buffer.len() < wanted.min(MIN_SPARE) {
        buffer.reserve(wanted);
    }
}

/// Writes the request head, with the headers `set` on it, into `buffer` (cleared first);
/// true when the body goes chunked. Public for the trust boundary's property tests, which
/// look at what a backend receives.
pub fn encode_head(
    request: &request::Parts,
    set: &dyn SetHeaders,
    body: &UpstreamBody,
    buffer: &mut Vec<u8>,
) -> bool {
    buffer.clear();
    buffer.extend_from_slice(request.method.as_str().as_bytes());
    buffer.push(b' ');
    let target = request
        .uri
        .path_and_query()
        .map_or("/", |path| path.as_str());
    buffer.extend_from_slice(target.as_bytes());
    buffer.extend_from_slice(b" HTTP/1.1\r\n");
    set.write(buffer);
    // Noticed on the way (a lookup in the map would hash the name again).
    let mut has_length = false;
    for (name, value) in &request.headers {
        if !set.replaces(name) {
            has_length |= *name == header::CONTENT_LENGTH;
            write_header(buffer, name.as_str(), value.as_bytes());
        }
    }
    let empty = body.is_end_stream();
    let chunked = !empty && !has_length;
    if chunked {
        buffer.extend_from_slice(b"transfer-encoding: chunked\r\n");
    } else if empty
        && !has_length
        && matches!(request.method, Method::POST | Method::PUT | Method::PATCH)
    {
        buffer.extend_from_slice(b"content-length: 0\r\n");
    }
    buffer.extend_from_slice(b"\r\n");
    chunked
}

/// Why a request body did not go out whole.
enum UploadError {
    /// The client's body failed (malformed, too large, client gone).
    Client(Box<dyn std::error::Error + Send + Sync>),
    /// The backend stopped taking it (it may have answered already).
    Backend,
}

/// A request on its way up, written as the client sends its body and the backend takes it,
/// interleaved with reading the response: the head waits for the body's first bytes, the
/// body goes chunked when the request has no Content-Length; trailers are not sent.
struct Upload {
    body: UpstreamBody,
    chunked: bool,
    /// What is left to write: the head (until written), chunk-size line, data, CRLF.
    pieces: [Bytes; 4],
    state: UploadState,
}

#[derive(Debug, PartialEq, Eq)]
enum UploadState {
    /// Waiting for the body's first frame; nothing written yet.
    Starting,
    Streaming,
    /// The last bytes are written or queued in `pieces`.
    Ending,
    Finished,
    /// Stopped: the connection cannot carry another request.
    Abandoned,
}

impl Upload {
    fn new(head: Bytes, body: UpstreamBody, chunked: bool) -> Self {
        Upload {
            body,
            chunked,
            pieces: [head, Bytes::new(), Bytes::new(), Bytes::new()],
            state: UploadState::Starting,
        }
    }

    /// The whole request went up.
    fn is_finished(&self) -> bool {
        self.state == UploadState::Finished
    }

    /// Moves the request up as far as the client and the backend allow. `Ready(Ok)` once
    /// all of it is written; after a backend error the upload is abandoned and stays
    /// `Pending`.
    fn poll(
        &mut self,
        stream: &mut UpstreamStream,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), UploadError>> {
        loop {
            match self.state {
                UploadState::Finished => return Poll::Ready(Ok(())),
                UploadState::Abandoned => return Poll::Pending,
                UploadState::Starting | UploadState::Streaming | UploadState::Ending => {}
            }
            let queued = self.pieces.iter().any(|piece| !piece.is_empty());
            if queued && self.state != UploadState::Starting {
                let slices = [
                    io::IoSlice::new(&self.pieces[0]),
                    io::IoSlice::new(&self.pieces[1]),
                    io::IoSlice::new(&self.pieces[2]),
                    io::IoSlice::new(&self.pieces[3]),
                ];
                match Pin::new(&mut *stream).poll_write_vectored(cx, &slices) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        self.state = UploadState::Abandoned;
                        return Poll::Ready(Err(UploadError::Backend));
                    }
                    Poll::Ready(Ok(mut written)) => {
                        for piece in &mut self.pieces {
                            let step = written.min(piece.len());
                            piece.advance(step);
                            written -= step;
                        }
                    }
                }
                continue;
            }
            if self.state == UploadState::Ending {
                return match Pin::new(&mut *stream).poll_flush(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Ok(())) => {
                        self.state = UploadState::Finished;
                        Poll::Ready(Ok(()))
                    }
                    Poll::Ready(Err(_)) => {
                        self.state = UploadState::Abandoned;
                        Poll::Ready(Err(UploadError::Backend))
                    }
                };
            }
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    self.state = UploadState::Ending;
                    if self.chunked {
                        self.pieces[1] = Bytes::from_static(b"0\r\n\r\n");
                    }
                }
                Poll::Ready(Some(Err(error))) => {
                    self.state = UploadState::Abandoned;
                    return Poll::Ready(Err(UploadError::Client(error)));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    self.state = UploadState::Streaming;
                    if self.chunked {
                        self.pieces[1] = Bytes::from(format!("{:x}\r\n", data.len()));
                        self.pieces[3] = Bytes::from_static(b"\r\n");
                    }
                    self.pieces[2] = data;
                }
            }
        }
    }
}

/// A parsed response head.
struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    framing: Framing,
    /// The connection may carry another request after this response.
    keep_alive: bool,
    /// `Keep-Alive: timeout=N`: how many seconds the backend keeps the connection idle.
    announced_idle: Option<u32>,
}

/// Parses a response head at the start of `buffer` and removes it; `None` until complete.
/// Header values share the head's bytes (no copy per value). Transfer-Encoding, Keep-Alive
/// and a Connection that only says close or keep-alive describe this connection and are
/// consumed here, so the usual response needs no hop-by-hop stripping afterwards.
fn parse_head(buffer: &mut BytesMut, head_request: bool) -> Result<Option<Head>, Http1Error> {
    let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buffer,
        &mut slots,
    );
    let length = match parsed {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Http1Error::Malformed("too many headers"))
        }
        Err(_) => return Err(Http1Error::Malformed("invalid response head")),
    };
    let status = response
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or(Http1Error::Malformed("invalid status code"))?;
    let version = match response.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    // Where each header sits in the head, so its value can share the head's bytes.
    let base = buffer.as_ptr() as usize;
    let mut spans = [[0u32; 4]; MAX_HEADERS];
    let count = response.headers.len();
    let mut framing = Framing::Length(0);
    let mut content_length: Option<u64> = None;
    // Transfer codings named, and how many of them are `chunked`.
    let mut codings = 0;
    let mut chunked = 0;
    let mut close = false;
    let mut keep_alive_asked = false;
    let mut announced_idle = None;
    for (span, header) in spans.iter_mut().zip(response.headers.iter()) {
        let name_start = header.name.as_ptr() as usize - base;
        let value_start = header.value.as_ptr() as usize - base;
        *span = [
            name_start as u32,
            header.name.len() as u32,
            value_start as u32,
            header.value.len() as u32,
        ];
        if header.name.eq_ignore_ascii_case("content-length") {
            let length = parse_content_length(header.value)
                .ok_or(Http1Error::Malformed("invalid Content-Length"))?;
            if content_length.is_some_and(|previous| previous != length) {
                return Err(Http1Error::Malformed("conflicting Content-Length"));
            }
            content_length = Some(length);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            let before = codings;
            for coding in header.value.split(|&byte| byte == b',') {
                let coding = coding.trim_ascii();
                if !coding.is_empty() {
                    codings += 1;
                    chunked += usize::from(coding.eq_ignore_ascii_case(b"chunked"));
                }
            }
            // An empty Transfer-Encoding names no coding gatehouse knows.
            codings += usize::from(codings == before);
            // Decoded here and framed anew for the client: not passed on.
            span[1] = CONSUMED;
        } else if header.name.eq_ignore_ascii_case("keep-alive") {
            announced_idle = keep_alive_timeout(header.value);
            span[1] = CONSUMED;
        } else if header.name.eq_ignore_ascii_case("connection") {
            let mut names_others = false;
            for token in header.value.split(|&byte| byte == b',') {
                let token = token.trim_ascii();
                let is_close = token.eq_ignore_ascii_case(b"close");
                let is_keep_alive = token.eq_ignore_ascii_case(b"keep-alive");
                close |= is_close;
                keep_alive_asked |= is_keep_alive;
                names_others |= !(is_close || is_keep_alive || token.is_empty());
            }
            // Only about this connection: consumed here. Naming other headers (or an
            // upgrade), it stays for the hop-by-hop stripping to act on.
            if !names_others {
                span[1] = CONSUMED;
            }
        }
    }
    // HTTP/1.0 keeps a connection only when it says so; `close` always wins.
    close |= version == Version::HTTP_10 && !keep_alive_asked;
    let bodiless = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    if !bodiless {
        framing = if codings > 0 {
            if codings > 1 || chunked != 1 {
                return Err(Http1Error::Malformed(
                    "a transfer coding other than one chunked",
                ));
            }
            // Transfer-Encoding wins over Content-Length; the oddity ends the connection.
            close |= content_length.is_some();
            Framing::Chunked(Chunk::Size)
        } else {
            match content_length {
                Some(length) => Framing::Length(length),
                None => {
                    close = true;
                    Framing::UntilClose
                }
            }
        };
    }
    if status == StatusCode::SWITCHING_PROTOCOLS {
        framing = Framing::Upgrade;
        close = true;
    }
    let head = buffer.split_to(length).freeze();
    let mut headers = HeaderMap::with_capacity(count.max(HEADER_SLOTS));
    for [name_start, name_length, value_start, value_length] in &spans[..count] {
        if *name_length == CONSUMED {
            continue;
        }
        let name_start = *name_start as usize;
        let value_start = *value_start as usize;
        let name = HeaderName::from_bytes(&head[name_start..name_start + *name_length as usize])
            .map_err(|_| Http1Error::Malformed("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(
            head.slice(value_start..value_start + *value_length as usize),
        )
        .map_err(|_| Http1Error::Malformed("invalid header value"))?;
        headers.append(name, value);
    }
    if codings > 0 || status == StatusCode::NO_CONTENT || status.is_informational() {
        // The body is decoded here and framed anew for the client: a Content-Length sent
        // beside Transfer-Encoding would frame it wrongly. 1xx and 204 have none to frame
        // (RFC 9110 §8.6: a server must not send one), and a client that believed it would
        // wait for a body that never comes.
        headers.remove(header::CONTENT_LENGTH);
    }
    Ok(Some(Head {
        status,
        version,
        headers,
        framing,
        keep_alive: !close,
        announced_idle,
    }))
}

/// The `timeout` parameter of a `Keep-Alive` header (`timeout=5, max=100`), in seconds.
fn keep_alive_timeout(value: &[u8]) -> Option<u32> {
    value.split(|&byte| byte == b',').find_map(|parameter| {
        let (name, seconds) = parameter.trim_ascii().split_at_checked(b"timeout=".len())?;
        if !name.eq_ignore_ascii_case(b"timeout=") {
            return None;
        }
        std::str::from_utf8(seconds.trim_ascii()).ok()?.parse().ok()
    })
}

/// A Content-Length value: digits only (a list of equal values, as some servers send, is
/// one value).
fn parse_content_length(value: &[u8]) -> Option<u64> {
    let mut length = None;
    for part in value.split(|&byte| byte == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let parsed: u64 = std::str::from_utf8(part).ok()?.parse().ok()?;
        if length.is_some_and(|previous| previous != parsed) {
            return None;
        }
        length = Some(parsed);
    }
    length
}

/// How the rest of a response body is framed.
#[derive(Debug)]
enum Framing {
    /// This many bytes left.
    Length(u64),
    Chunked(Chunk),
    /// Until the backend closes the connection.
    UntilClose,
    /// 101: the connection now belongs to a tunnel.
    Upgrade,
    Done,
}

/// Where a chunked body's decoder is.
#[derive(Debug)]
enum Chunk {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer lines (dropped) until the empty line; `seen` bytes so far.
    Trailers {
        seen: usize,
    },
}

/// A backend's response body, read straight from its connection.
pub struct ResponseBody {
    connection: Option<Connection>,
    /// Where the connection goes when the body ends cleanly (`None`: it is closed).
    home: Option<Arc<BackendConnections>>,
    framing: Framing,
    /// The rest of the request body, when the response came before all of it went up
    /// (boxed: rare, and large).
    upload: Option<Box<Upload>>,
    stall: Stall,
    /// Read size while a large body streams: [`READ_LARGE`], or [`READ_MULTIPLEXED`] for a
    /// response to an HTTP/2 client.
    large_read: usize,
}

/// Bounds how long a backend may go silent inside a response body. Without it a backend
/// that hangs after its head holds the client (and the backend connection) until one of
/// them gives up. The timer is made the first time a read has to wait — never for the
/// usual response, whose body arrives with its head — and from then on the silence counts
/// from the last bytes read. A client that reads slowly is never the backend's fault: while
/// the body is not polled, what the backend sends waits in the socket, where the next read
/// finds it.
struct Stall {
    /// The limit in milliseconds (four bytes: every response body carries it).
    limit_ms: u32,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Stall {
    fn new(limit: Duration) -> Self {
        Stall {
            limit_ms: u32::try_from(limit.as_millis()).unwrap_or(u32::MAX),
            timer: None,
        }
    }

    fn limit(&self) -> Duration {
        Duration::from_millis(u64::from(self.limit_ms))
    }

    /// Bytes arrived: the silence starts again.
    fn fed(&mut self) {
        let limit = self.limit();
        if let Some(timer) = self.timer.as_mut() {
            timer.as_mut().reset(tokio::time::Instant::now() + limit);
        }
    }

    /// A read found nothing: ready once the backend has been silent for the limit.
    fn poll_silence(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let limit = self.limit();
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        std::future::Future::poll(timer.as_mut(), cx)
    }
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("framing", &self.framing)
            .finish()
    }
}

/// The stream of an upgraded (101) backend connection, starting with any bytes the backend
/// sent after its response head.
pub type Upgraded = crate::proxy_protocol::Prefixed<UpstreamStream>;

impl ResponseBody {
    /// A 101 response's connection, for the tunnel (once).
    pub fn take_upgraded(&mut self) -> Option<Upgraded> {
        if !matches!(self.framing, Framing::Upgrade) {
            return None;
        }
        self.framing = Framing::Done;
        let connection = self.connection.take()?;
        Some(crate::proxy_protocol::Prefixed::new(
            connection.read.freeze(),
            connection.stream,
        ))
    }

    /// The body goes to an HTTP/2 client: it is read in pieces of [`READ_MULTIPLEXED`].
    pub fn read_multiplexed(&mut self) {
        self.large_read = READ_MULTIPLEXED;
    }

    /// A body already at its end hands the connection back at once.
    fn settle(&mut self) {
        if matches!(self.framing, Framing::Length(0)) {
            self.framing = Framing::Done;
            self.release();
        }
    }

    /// The body was read to its end: the connection goes home if it is clean (and the
    /// request went up whole).
    fn release(&mut self) {
        let Some(connection) = self.connection.take() else {
            return;
        };
        let uploaded = self.upload.take().is_none_or(|upload| upload.is_finished());
        if let Some(home) = self.home.take() {
            if uploaded && connection.read.is_empty() {
                let mut connection = connection;
                if connection.read.capacity() > READ_LARGE / 2 {
                    // A large body's read buffer is not kept by an idle connection.
                    connection.read = BytesMut::new();
                }
                home.give_back(connection);
            }
        }
    }

    /// Fails the body; the connection is closed.
    fn fail(&mut self, error: Http1Error) -> Poll<Option<Result<Frame<Bytes>, Http1Error>>> {
        self.connection = None;
        self.framing = Framing::Done;
        Poll::Ready(Some(Err(error)))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Http1Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Http1Error>>> {
        let this = self.get_mut();
        loop {
            let Some(connection) = this.connection.as_mut() else {
                return Poll::Ready(None);
            };
            if let Some(upload) = this.upload.as_mut() {
                match upload.poll(&mut connection.stream, cx) {
                    Poll::Ready(Err(UploadError::Client(error))) => {
                        return this.fail(Http1Error::ClientBody(error))
                    }
                    Poll::Ready(Ok(())) => this.upload = None,
                    Poll::Ready(Err(UploadError::Backend)) | Poll::Pending => {}
                }
            }
            let wanted = match &mut this.framing {
                Framing::Done | Framing::Upgrade => return Poll::Ready(None),
                Framing::Length(0) => {
                    this.framing = Framing::Done;
                    this.release();
                    return Poll::Ready(None);
                }
                Framing::Length(left) => {
                    if !connection.read.is_empty() {
                        let take = (*left).min(connection.read.len() as u64);
                        *left -= take;
                        let data = connection.read.split_to(take as usize).freeze();
                        if *left == 0 {
                            this.framing = Framing::Done;
                            this.release();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    if *left > READ_SMALL as u64 {
                        this.large_read
                    } else {
                        READ_SMALL
                    }
                }
                Framing::UntilClose => {
                    if !connection.read.is_empty() {
                        let data = connection.read.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    this.large_read
                }
                Framing::Chunked(chunk) => match decode_chunked(chunk, &mut connection.read) {
                    Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Decoded::End) => {
                        this.framing = Framing::Done;
                        this.release();
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::NeedMore) => READ_SMALL,
                    Err(error) => return this.fail(error),
                },
            };
            make_room(&mut connection.read, wanted);
            // At most a large read, however much room the buffer has: what is read waits in
            // memory until the client takes it.
            let polled = tokio_util::io::poll_read_buf(
                Pin::new(&mut connection.stream),
                cx,
                &mut (&mut connection.read).limit(this.large_read),
            );
            match polled {
                // While the request body still goes up, the backend may rightly wait for it.
                Poll::Pending if this.upload.is_some() => return Poll::Pending,
                Poll::Pending => {
                    return match this.stall.poll_silence(cx) {
                        Poll::Ready(()) => this.fail(Http1Error::Stalled(this.stall.limit())),
                        Poll::Pending => Poll::Pending,
                    };
                }
                Poll::Ready(Err(error)) => return this.fail(Http1Error::Read(error)),
                Poll::Ready(Ok(0)) => {
                    if matches!(this.framing, Framing::UntilClose) {
                        this.framing = Framing::Done;
                        this.connection = None;
                        return Poll::Ready(None);
                    }
                    return this.fail(Http1Error::Truncated);
                }
                Poll::Ready(Ok(_)) => this.stall.fed(),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(
            self.framing,
            Framing::Done | Framing::Upgrade | Framing::Length(0)
        )
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(left) => SizeHint::with_exact(left),
            Framing::Done | Framing::Upgrade => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// What the chunked decoder found in the buffered bytes.
enum Decoded {
    Data(Bytes),
    End,
    NeedMore,
}

/// Advances a chunked body over `buffer`: strict CRLF line endings, hex sizes without
/// overflow, extensions ignored, trailers read and dropped.
fn decode_chunked(chunk: &mut Chunk, buffer: &mut BytesMut) -> Result<Decoded, Http1Error> {
    loop {
        match chunk {
            Chunk::Size => {
                let Some(end) = buffer.iter().position(|&byte| byte == b'\n') else {
                    if buffer.len() > MAX_CHUNK_LINE {
                        return Err(Http1Error::Malformed("chunk size line too long"));
                    }
                    return Ok(Decoded::NeedMore);
                };
                let size = parse_chunk_size(&buffer[..end])?;
                buffer.advance(end + 1);
                *chunk = if size == 0 {
                    Chunk::Trailers { seen: 0 }
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(left) => {
                if buffer.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let take = (*left).min(buffer.len() as u64);
                *left -= take;
                let data = buffer.split_to(take as usize).freeze();
                if *left == 0 {
                    *chunk = Chunk::DataEnd;
                }
                return Ok(Decoded::Data(data));
            }
            Chunk::DataEnd => {
                if buffer.len() < 2 {
                    return Ok(Decoded::NeedMore);
                }
                if &buffer[..2] != b"\r\n" {
                    return Err(Http1Error::Malformed("chunk data not followed by CRLF"));
                }
                buffer.advance(2);
                *chunk = Chunk::Size;
            }
            Chunk::Trailers { seen } => {
                let Some(end) = buffer.iter().position(|&byte| byte == b'\n') else {
                    if *seen + buffer.len() > MAX_TRAILERS {
                        return Err(Http1Error::Malformed("trailers too long"));
                    }
                    return Ok(Decoded::NeedMore);
                };
                if end == 0 || buffer[end - 1] != b'\r' {
                    return Err(Http1Error::Malformed("trailer line without CRLF"));
                }
                let empty = end == 1;
                *seen += end + 1;
                buffer.advance(end + 1);
                if empty {
                    return Ok(Decoded::End);
                }
                if *seen > MAX_TRAILERS {
                    return Err(Http1Error::Malformed("trailers too long"));
                }
            }
        }
    }
}

/// A chunk-size line without its LF: hex digits, optional whitespace and `;extensions`, CR.
fn parse_chunk_size(line: &[u8]) -> Result<u64, Http1Error> {
    let invalid = Http1Error::Malformed("invalid chunk size");
    let Some(line) = line.strip_suffix(b"\r") else {
        return Err(invalid);
    };
    let digits_end = line
        .iter()
        .position(|byte| !byte.is_ascii_hexdigit())
        .unwrap_or(line.len());
    if digits_end == 0 || digits_end > 16 {
        return Err(invalid);
    }
    let rest = line[digits_end..].trim_ascii_start();
    if !rest.is_empty() && rest[0] != b';' {
        return Err(invalid);
    }
    let digits = std::str::from_utf8(&line[..digits_end])
        .map_err(|_| Http1Error::Malformed("invalid chunk size"))?;
    u64::from_str_radix(digits, 16).map_err(|_| invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_of(text: &[u8], head_request: bool) -> Head {
        let mut buffer = BytesMut::from(text);
        parse_head(&mut buffer, head_request)
            .expect("valid")
            .expect("complete")
    }

    #[test]
    fn the_keep_alive_timeout_a_backend_announces_is_read() {
        let head = head_of(
            b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5, max=100\r\nContent-Length: 0\r\n\r\n",
            false,
        );
        assert_eq!(head.announced_idle, Some(5));
        assert!(!head.headers.contains_key("keep-alive"), "consumed");
        assert_eq!(keep_alive_timeout(b"max=100 , Timeout=15"), Some(15));
        assert_eq!(keep_alive_timeout(b"max=100"), None);
        assert_eq!(keep_alive_timeout(b"timeout=soon"), None);
    }

    #[test]
    fn frames_responses_as_rfc_9112_says() {
        let head = head_of(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", false);
        assert!(matches!(head.framing, Framing::Length(5)) && head.keep_alive);
        let head = head_of(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true);
        assert!(matches!(head.framing, Framing::Length(0)) && head.keep_alive);
        let head = head_of(b"HTTP/1.1 204 No Content\r\n\r\n", false);
        assert!(matches!(head.framing, Framing::Length(0)) && head.keep_alive);
        let head = head_of(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n",
            false,
        );
        assert!(matches!(head.framing, Framing::Chunked(_)) && head.keep_alive);
        let head = head_of(
            b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
            false,
        );
        assert!(matches!(head.framing, Framing::Length(0)) && head.keep_alive);
        assert!(!head.headers.contains_key(header::CONTENT_LENGTH));
        let head = head_of(
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
            false,
        );
        assert!(
            head.headers.contains_key(header::CONTENT_LENGTH),
            "a 304's length is the representation's"
        );
        let head = head_of(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n",
            false,
        );
        assert!(matches!(head.framing, Framing::Chunked(_)) && !head.keep_alive);
        assert!(!head.headers.contains_key(header::CONTENT_LENGTH));
        let head = head_of(b"HTTP/1.1 200 OK\r\n\r\n", false);
        assert!(matches!(head.framing, Framing::UntilClose) && !head.keep_alive);
        let head = head_of(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            false,
        );
        assert!(!head.keep_alive);
        let head = head_of(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false);
        assert!(!head.keep_alive);
        let head = head_of(
            b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n",
            false,
        );
        assert!(head.keep_alive);
        let head = head_of(
            b"HTTP/1.0 200 OK\r\nConnection: close, keep-alive\r\nContent-Length: 0\r\n\r\n",
            false,
        );
        assert!(!head.keep_alive);
        let head = head_of(b"HTTP/1.1 200 OK\r\nContent-Length: 7, 7\r\n\r\n", false);
        assert!(matches!(head.framing, Framing::Length(7)));
    }

    #[test]
    fn refuses_ambiguous_or_broken_heads() {
        for text in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: \r\nContent-Length: 2\r\n\r\n",
        ] {
            let mut buffer = BytesMut::from(text);
            assert!(
                parse_head(&mut buffer, false).is_err(),
                "{}",
                String::from_utf8_lossy(text)
            );
        }
        let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Le"[..]);
        assert!(parse_head(&mut partial, false)
            .expect("valid so far")
            .is_none());
    }

    #[test]
    fn headers_about_this_connection_are_consumed() {
        let head = head_of(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n",
            false,
        );
        assert_eq!(head.headers.len(), 1, "{:?}", head.headers);
        let head = head_of(
            b"HTTP/1.1 200 OK\r\nConnection: close, x-a\r\nX-A: 1\r\nContent-Length: 0\r\n\r\n",
            false,
        );
        assert!(
            head.headers.contains_key(header::CONNECTION),
            "left for the stripping"
        );
        let head = head_of(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            false,
        );
        assert!(head.headers.contains_key(header::CONNECTION));
        assert!(head.headers.contains_key(header::UPGRADE));
    }

    #[test]
    fn header_values_share_the_head_and_the_body_stays_buffered() {
        let mut buffer = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nX-A: one\r\nx-a: two\r\nServer: s\r\n\r\nbody"[..],
        );
        let head = parse_head(&mut buffer, false)
            .expect("valid")
            .expect("complete");
        let values: Vec<_> = head.headers.get_all("x-a").iter().collect();
        assert_eq!(values, ["one", "two"]);
        assert_eq!(head.headers["server"], "s");
        assert_eq!(&buffer[..], b"body");
    }

    fn decode_all(input: &[u8], split: usize) -> Result<(Vec<u8>, bool), Http1Error> {
        let mut chunk = Chunk::Size;
        let mut buffer = BytesMut::new();
        let mut out = Vec::new();
        for part in [&input[..split], &input[split..]] {
            buffer.extend_from_slice(part);
            loop {
                match decode_chunked(&mut chunk, &mut buffer)? {
                    Decoded::Data(data) => out.extend_from_slice(&data),
                    Decoded::End => return Ok((out, buffer.is_empty())),
                    Decoded::NeedMore => break,
                }
            }
        }
        Ok((out, false))
    }

    #[test]
    fn decodes_chunked_bodies_across_any_split() {
        let input = b"5;ext=1\r\nhello\r\n1A \r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-T: 1\r\n\r\n";
        for split in 0..=input.len() {
            let (out, clean) = decode_all(input, split).expect("valid");
            assert_eq!(out, b"helloabcdefghijklmnopqrstuvwxyz", "split at {split}");
            assert!(clean);
        }
    }

    #[test]
    fn refuses_malformed_chunks() {
        for input in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloXX0\r\n\r\n",
            b"g\r\n",
            b"\r\n",
            b"11111111111111111\r\n",
            b"5 x\r\nhello\r\n",
            b"0\r\nX-T: 1\n\r\n",
        ] {
            assert!(
                decode_all(input, input.len()).is_err(),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Whatever a backend sends, parsing its head and decoding a chunked body end in a
        /// value or an error, never a panic.
        #[test]
        fn arbitrary_backend_bytes_never_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            split in 0usize..400,
        ) {
            let mut buffer = BytesMut::from(&bytes[..]);
            let _ = parse_head(&mut buffer, false);
            let mut framed = b"HTTP/1.1 200 OK\r\n".to_vec();
            framed.extend_from_slice(&bytes);
            let _ = parse_head(&mut BytesMut::from(&framed[..]), true);
            let _ = decode_all(&bytes, split.min(bytes.len()));
        }

        /// Any body, chunked in any sizes and delivered in any two reads, decodes to itself.
        #[test]
        fn chunked_bodies_round_trip(
            chunks in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 1..64), 0..8),
            split in 0usize..2000,
        ) {
            let mut encoded = Vec::new();
            for chunk in &chunks {
                encoded.extend_from_slice(format!("{:X}\r\n", chunk.len()).as_bytes());
                encoded.extend_from_slice(chunk);
                encoded.extend_from_slice(b"\r\n");
            }
            encoded.extend_from_slice(b"0\r\n\r\n");
            let (decoded, clean) = decode_all(&encoded, split.min(encoded.len())).expect("valid");
            proptest::prop_assert_eq!(decoded, chunks.concat());
            proptest::prop_assert!(clean);
        }
    }

    /// Sets `host` in place of the request's own.
    struct SetHost(HeaderValue);

    impl SetHeaders for SetHost {
        fn replaces(&self, name: &HeaderName) -> bool {
            name == header::HOST
        }

        fn write(&self, head: &mut Vec<u8>) {
            write_header(head, "host", self.0.as_bytes());
        }
    }

    /// One response of `body` bytes from a backend whose whole answer is already waiting in
    /// the socket when the body is read, read as for an HTTP/2 client or not: the sizes of
    /// the pieces it came in.
    async fn pieces_of_a_waiting_body(body: usize, multiplexed: bool) -> Vec<usize> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let backend = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut head = [0u8; 1024];
            let _ = stream.read(&mut head).await;
            let mut answer =
                format!("HTTP/1.1 200 OK\r\ncontent-length: {body}\r\n\r\n").into_bytes();
            answer.resize(answer.len() + body, b'x');
            stream.write_all(&answer).await.expect("answer");
            stream
        });
        // Room for the whole answer, so it is all waiting before the first piece is read.
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .set_recv_buffer_size(4 * body as u32)
            .expect("buffer");
        let stream = socket.connect(address).await.expect("connect");
        let request = http::Request::get("/")
            .body(())
            .expect("request")
            .into_parts()
            .0;
        let set = SetHost(HeaderValue::from_static("backend"));
        let sent = Connection::new(UpstreamStream::Plain(stream)).send(
            &request,
            &set,
            UpstreamBody::empty(),
            None,
            Duration::from_secs(10),
        );
        let mut response = sent.await.expect("response");
        let _backend = backend.await.expect("backend");
        if multiplexed {
            response.body_mut().read_multiplexed();
        }
        let mut body = response.into_body();
        let mut pieces = Vec::new();
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            pieces.push(frame.expect("frame").into_data().expect("data").len());
        }
        pieces
    }

    /// What a body read takes waits in gatehouse until its client takes it; an HTTP/2 client
    /// keeping its windows shut holds up to 100 streams' worth: their pieces are small.
    #[tokio::test]
    async fn a_body_for_an_http2_client_is_read_in_small_pieces() {
        let body = 512 * 1024;
        let deadline = Duration::from_secs(10);
        let pieces = tokio::time::timeout(deadline, pieces_of_a_waiting_body(body, true))
            .await
            .expect("deadline");
        assert_eq!(pieces.iter().sum::<usize>(), body);
        assert!(
            pieces.iter().all(|&piece| piece <= READ_MULTIPLEXED),
            "{pieces:?}"
        );
        let pieces = tokio::time::timeout(deadline, pieces_of_a_waiting_body(body, false))
            .await
            .expect("deadline");
        assert_eq!(pieces.iter().sum::<usize>(), body);
        assert!(
            pieces.iter().any(|&piece| piece > READ_MULTIPLEXED),
            "{pieces:?}"
        );
    }

    #[test]
    fn encodes_heads_with_the_right_framing() {
        let set = SetHost(HeaderValue::from_static("backend"));
        // Method, target, the request's headers, the head a backend receives.
        type Case<'a> = (Method, &'a str, &'a [(&'a str, &'a str)], &'a [u8]);
        let cases: [Case; 5] = [
            // HTTP/2 and absolute-form targets go out in origin form.
            (
                Method::GET,
                "https://portal.example.gov/a?b=1",
                &[],
                b"GET /a?b=1 HTTP/1.1\r\nhost: backend\r\n\r\n",
            ),
            (Method::GET, "http://portal.example.gov", &[], b"GET / HTTP/1.1\r\nhost: backend\r\n\r\n"),
            (
                Method::POST,
                "/a?b=1",
                &[("host", "h"), ("accept", "*/*")],
                b"POST /a?b=1 HTTP/1.1\r\nhost: backend\r\naccept: */*\r\ncontent-length: 0\r\n\r\n",
            ),
            (Method::GET, "/", &[], b"GET / HTTP/1.1\r\nhost: backend\r\n\r\n"),
            // A length the request states is not stated twice.
            (
                Method::PUT,
                "/",
                &[("content-length", "0")],
                b"PUT / HTTP/1.1\r\nhost: backend\r\ncontent-length: 0\r\n\r\n",
            ),
        ];
        let mut buffer = Vec::new();
        for (method, uri, headers, expected) in cases {
            let mut request = http::Request::builder().method(method).uri(uri);
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            let request = request.body(()).expect("request").into_parts().0;
            let chunked = encode_head(&request, &set, &UpstreamBody::empty(), &mut buffer);
            assert!(!chunked);
            assert_eq!(
                String::from_utf8_lossy(&buffer),
                String::from_utf8_lossy(expected)
            );
        }
    }
}
