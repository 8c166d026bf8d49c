//! The HTTP proxy: serve a client connection with hyper (HTTP/1.1 and HTTP/2) and forward
//! each request to a backend over the pool's keep-alive HTTP/1.1 client.
//!
//! Per request: one `ArcSwap` load of the table, a route match, an O(1) pick, header
//! rewriting in place, then the request streams to the backend and the response streams
//! back. No lock is taken and the configuration is never cloned.

use super::body::ProxyBody;
use super::error::ProxyError;
use super::framing::{self, Verdict, VerdictHolder};
use super::h1;
use super::h2_resets;
use super::headers;
use super::park;
use super::stall;
use crate::access_log::AccessRecord;
use crate::config::{Limits, ProxyProtocolVersion};
use crate::io::{Observed, Reclaimable, ResetOnClose};
use crate::metrics::Rejection;
use crate::proxy_protocol;
use crate::upstream::body::{ClientWait, StreamedBody, UpstreamBody};
use crate::upstream::publisher::SharedTable;
use crate::upstream::table::{ListenerTable, Target};
use http::{header, request, Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// hyper refuses a read buffer below this.
pub const MIN_BUF_SIZE: usize = 8192;
/// Copy buffer per direction of an upgraded connection (WebSocket) while bytes move (an
/// idle one holds none, see `relay`): small, as WebSocket messages are, so many busy ones
/// stay cheap.
const UPGRADED_BUFFER: usize = 8 * 1024;
/// Concurrent HTTP/2 streams per client connection.
const MAX_CONCURRENT_STREAMS: u32 = 100;
/// Streams a client may open and reset before they are accepted (rapid reset,
/// CVE-2023-44487): beyond it the connection is closed with GOAWAY.
const MAX_PENDING_RESETS: usize = 20;
/// Streams gatehouse may reset because of client protocol errors before it closes the
/// connection.
const MAX_LOCAL_RESETS: usize = 256;
/// Response bytes an HTTP/2 stream may have waiting to be written (hyper's default: 400
/// KiB). A client that opens its flow-control windows wide and then stops reading makes each
/// of its 100 streams fill that much: measured 50 MiB per connection with the default, 19
/// with this (11.7 with 64 KiB, 8.3 with 32 KiB — but large HTTP/2 downloads then cost 70 %
/// and 90 % more CPU per MiB; with this, about a third more: docs/benchmarks.md).
const H2_SEND_BUFFER: usize = 128 * 1024;

/// What every connection of one listener shares: one pointer in each connection's facts
/// instead of three fields.
#[derive(Debug)]
pub struct ListenerContext {
    /// The listener's name, which finds its entry in the table.
    pub name: Arc<str>,
    /// The published table every request reads.
    pub table: SharedTable,
    /// Tracks upgraded tunnels (and the listener's connections) so shutdown can wait for them.
    pub tunnels: TaskTracker,
}

/// What every request on one client connection shares. Idle connections keep it by the
/// thousand, so it is kept small: with `Arc`'s counts it fills jemalloc's 160-byte size class.
#[derive(Debug)]
pub struct Connection {
    pub listener: Arc<ListenerContext>,
    /// The client's address (after PROXY protocol, when enabled).
    pub client: SocketAddr,
    /// The address the client connected to (the PROXY header's destination, if any) — as an
    /// address and a port, not a `SocketAddr`: an IPv6 socket address's flow and scope fields,
    /// which nothing here reads, would take the facts out of their size class.
    local_ip: IpAddr,
    local_port: u16,
    /// What the TLS handshake said, on TLS listeners (boxed: plain connections, which may
    /// idle by the thousand, do not keep room for it).
    pub tls: Option<Box<TlsFacts>>,
    /// Refused by the listener's `allow`/`deny`: every request gets 403.
    pub denied: bool,
    /// Whether the independent HTTP/1 framing check follows this connection (not HTTP/2).
    pub checks_framing: bool,
    /// Its WebSocket tunnel idled out with bytes waiting for the client: the client's socket
    /// is reset when the upgrade hands it back (see `serve_hyper`).
    reset_client: AtomicBool,
    /// What that check found (kept here, not in an allocation of its own).
    verdict: Verdict,
    /// Requests handled so far on this connection (HTTP/1 handles them in order).
    pub requests: AtomicU64,
    /// Responses sent to their end (or abandoned) so far.
    pub answered: AtomicU64,
    /// `client` as `X-Forwarded-For` carries it, rendered once for all the requests.
    forwarded_for: http::HeaderValue,
}

/// What a client's TLS handshake said, for access logs and the client-certificate header.
#[derive(Debug, Default)]
pub struct TlsFacts {
    /// The negotiated TLS version.
    pub version: Option<&'static str>,
    /// The server name the client asked for.
    pub sni: Option<Arc<str>>,
    /// The subject of the client's verified certificate (mTLS).
    pub client_cert: Option<Arc<str>>,
}

impl Connection {
    /// A connection accepted from `client` on `listener`. It gets its `X-Forwarded-For` value
    /// now, once, and an HTTP one its framing check; its requests share them.
    pub fn new(
        listener: Arc<ListenerContext>,
        client: SocketAddr,
        local: SocketAddr,
        http: bool,
    ) -> Self {
        Connection {
            listener,
            client,
            local_ip: local.ip(),
            local_port: local.port(),
            tls: None,
            denied: false,
            checks_framing: http,
            reset_client: AtomicBool::new(false),
            verdict: Verdict::default(),
            requests: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            forwarded_for: headers::client_address_value(client.ip()),
        }
    }

    /// The address the client connected to (the PROXY header's destination, if any).
    pub fn local(&self) -> SocketAddr {
        SocketAddr::new(self.local_ip, self.local_port)
    }

    /// The HTTP/1 framing check's findings, when it follows this connection.
    pub fn framing(&self) -> Option<&Verdict> {
        self.checks_framing.then_some(&self.verdict)
    }

    /// Takes the addresses a PROXY protocol header gave.
    pub fn set_addresses(&mut self, client: SocketAddr, local: SocketAddr) {
        self.client = client;
        self.local_ip = local.ip();
        self.local_port = local.port();
        self.forwarded_for = headers::client_address_value(client.ip());
    }

    /// An access record of `kind` with what this connection says of every request on it:
    /// listener, client, TLS facts.
    pub fn access_record(&self, kind: &'static str) -> AccessRecord {
        let tls = self.tls.as_deref();
        AccessRecord {
            kind,
            listener: self.listener.name.clone(),
            client: Some(self.client),
            tls_version: tls.and_then(|tls| tls.version),
            sni: tls.and_then(|tls| tls.sni.clone()),
            client_cert: tls.and_then(|tls| tls.client_cert.clone()),
            ..AccessRecord::default()
        }
    }
}

impl VerdictHolder for Connection {
    fn verdict(&self) -> &Verdict {
        &self.verdict
    }
}

pub use crate::upstream::body::ClientBody;

/// Which HTTP version a TLS client chose by ALPN (`None`: detect from the preface).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negotiated {
    Http1,
    Http2,
    Detect,
}

/// How [`serve`] left a connection.
pub enum Served<I> {
    /// The connection is closed, or closes when `serve`'s stream is dropped.
    Ended,
    /// Idle between requests since `quiet_since`: the stream waits for the client's next
    /// request, whose head is due by `head_deadline` (see [`park`]).
    Parked {
        stream: park::Watched<I>,
        head_deadline: tokio::time::Instant,
        quiet_since: tokio::time::Instant,
    },
}

/// Serves HTTP on `stream` until the client leaves, the connection idles between requests
/// (it parks: the caller holds it until the client speaks again, then calls `serve` again
/// with `Negotiated::Http1` and the head deadline it was given), or `shutdown` asks it to
/// finish its in-flight requests and close.
///
/// HTTP/1 requests without a body are served by gatehouse's own loop ([`h1`]); anything else
/// by a hyper session (HTTP/2, bodies, upgrades, malformed heads), which takes over the
/// connection from the first request it must serve until it parks. `head_deadline` holds the
/// first request head (a resumed connection's) to the deadline it had when it parked.
pub async fn serve<I>(
    mut stream: park::Watched<I>,
    connection: Arc<Connection>,
    listener: &ListenerTable,
    negotiated: Negotiated,
    shutdown: &CancellationToken,
    mut head_deadline: Option<tokio::time::Instant>,
) -> Served<I>
where
    I: AsyncRead + AsyncWrite + ResetOnClose + Unpin + Send + 'static,
{
    let limits = listener.config.limits;
    if negotiated != Negotiated::Http2 {
        let due = head_deadline
            .take()
            .unwrap_or_else(|| tokio::time::Instant::now() + limits.header_timeout);
        // Boxed: the loop's state is no part of a hyper session's.
        let end = Box::pin(h1::serve(&mut stream, &connection, limits, shutdown, due)).await;
        match end {
            h1::End::Closed => return Served::Ended,
            h1::End::Late => {
                Box::pin(answer_late_request(stream, listener)).await;
                return Served::Ended;
            }
            h1::End::Idle {
                head_deadline,
                quiet_since,
            } => {
                return Served::Parked {
                    stream,
                    head_deadline,
                    quiet_since,
                }
            }
            h1::End::HandOff { head_deadline: due } => head_deadline = Some(due),
        }
    }
    // Boxed: a hyper session's state (several KB) is no part of a connection's between
    // requests.
    Box::pin(serve_hyper(
        stream,
        connection,
        listener,
        negotiated,
        shutdown,
        head_deadline,
    ))
    .await
}

/// Serves `stream` with a hyper session until it ends or parks; its first head is due by
/// `head_deadline` if given.
async fn serve_hyper<I>(
    stream: park::Watched<I>,
    connection: Arc<Connection>,
    listener: &ListenerTable,
    negotiated: Negotiated,
    shutdown: &CancellationToken,
    head_deadline: Option<tokio::time::Instant>,
) -> Served<I>
where
    I: AsyncRead + AsyncWrite + ResetOnClose + Unpin + Send + 'static,
{
    let limits = listener.config.limits;
    let activity = stream.activity().clone();
    // HTTP/1's framing check takes over with hyper, at the request boundary where the own
    // loop handed over (see `framing`): it reads the bytes replayed and all that follow.
    let tracker = connection.checks_framing.then(|| {
        let requests = connection.requests.load(Ordering::Relaxed);
        framing::Tracker::new(connection.clone(), requests)
    });
    // Any hyper session may turn out HTTP/2 (h2c prior knowledge on a plain listener); the
    // watch leaves one that answers in HTTP/1 after its first write.
    let resets = (negotiated != Negotiated::Http1)
        .then(|| listener.metrics.rejections(Rejection::BadRequest).cloned())
        .flatten()
        .map(h2_resets::ResetWatch::new);
    let (io, reclaim) = Reclaimable::new(Observed::new(stream, (tracker, resets)));
    let progress = Arc::new(stall::ClientProgress::starting_now());
    let mut checks = SessionChecks {
        idle: park::IdleWatch::new(activity, &connection),
        stall: stall::StallCheck::new(progress.clone()),
    };
    let service_connection = connection.clone();
    let service_progress = progress;
    let service = service_fn(move |request: Request<Incoming>| {
        let connection = service_connection.clone();
        let progress = service_progress.clone();
        // Boxed: hyper moves a stream's future several times (HTTP/2 spawns one per stream),
        // and a pointer moves for less than the handler's state (≈ 2.9 KB). The box is made
        // first and the future written into it, which builds the future in place:
        // `Box::pin(async ..)` built it on the stack and copied all of it in. The copy was
        // only ≈ 300 instructions, but ≈ 1 % of an HTTP/2 request's CPU (perf): it wrote
        // 2.9 KB of memory not in cache.
        Box::into_pin(Box::write(Box::new_uninit(), async move {
            let unanswered = Unanswered(&connection);
            let streamed = StreamedBody::wrap_for(&request);
            let mut response = handle(request.map(streamed), ReadBy::Hyper, &connection)
                .await
                .response;
            std::mem::forget(unanswered);
            response.body_mut().answers(connection);
            Ok::<_, Infallible>(response.map(|body| body.watch_client(progress)))
        }))
    });
    // Pinned where it is made, and dropped at the end of this block: its stream comes back
    // to `reclaim` only then. (Passed by value and pinned inside, the session would take two
    // slots of the future's state, ≈ 1.7 KB each.)
    let end = {
        let session = std::pin::pin!(session_builder(limits, negotiated)
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .into_owned());
        drive_session(
            session,
            |session| session.graceful_shutdown(),
            &connection,
            &mut checks,
            shutdown,
            head_deadline,
            limits,
        )
        .await
    };
    let watch = &checks.idle;
    match end {
        SessionEnd::Parked => match reclaim.await {
            Ok(guarded) => Served::Parked {
                stream: guarded.into_inner(),
                head_deadline: watch.quiet_since() + limits.header_timeout,
                quiet_since: watch.quiet_since(),
            },
            Err(_) => Served::Ended,
        },
        SessionEnd::Ended(Ok(())) => {
            // hyper gives the stream back when it lets go of it: at once, or, for a
            // connection upgraded to a WebSocket, when its tunnel ends. Until then the
            // connection keeps its place under `max_connections` and in the gauges.
            if let Ok(guarded) = reclaim.await {
                if connection.reset_client.load(Ordering::Relaxed) {
                    guarded.reset_on_close();
                }
            }
            Served::Ended
        }
        SessionEnd::Ended(Err(error)) => {
            if record_connection_error(listener, &connection, &*error) {
                // hyper closes a connection whose request head is late without a word; the
                // stream comes back when hyper drops it: say 408, then close.
                let reclaimed = tokio::time::timeout(Duration::from_secs(1), reclaim).await;
                answer_late_head(reclaimed.ok().and_then(Result::ok), listener).await;
            }
            Served::Ended
        }
        SessionEnd::HeadLate => {
            answer_late_head(reclaim.await.ok(), listener).await;
            Served::Ended
        }
        SessionEnd::Stalled => {
            // The session is gone, so its stream is back already.
            if let Ok(guarded) = reclaim.await {
                guarded.reset_on_close();
            }
            Served::Ended
        }
    }
}

/// Serves HTTP on `io` for the connection's whole life, holding it in this task while it is
/// parked (TLS connections, whose state is not seated in the waiting room). An HTTP/1
/// connection waits for its first request's first byte here too, in this small state: the
/// HTTP/1 loop's state and read buffer (≈ 6.5 KB) are taken only once the client speaks.
pub async fn serve_all<I>(
    io: I,
    connection: Arc<Connection>,
    listener: &ListenerTable,
    mut negotiated: Negotiated,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + ResetOnClose + Unpin + Send + 'static,
{
    let mut stream = park::Watched::new(io);
    let mut head_deadline = None;
    if negotiated == Negotiated::Http1 {
        let due = tokio::time::Instant::now() + listener.config.limits.header_timeout;
        let waited = park::wait_for_request(&mut stream, due, &shutdown).await;
        if !spoke_in_time(waited, &mut stream, listener).await {
            return;
        }
        head_deadline = Some(due);
    }
    loop {
        let served = serve(
            stream,
            connection.clone(),
            listener,
            negotiated,
            &shutdown,
            head_deadline,
        )
        .await;
        let Served::Parked {
            stream: mut parked,
            head_deadline: due,
            ..
        } = served
        else {
            return;
        };
        if !wait_parked(&mut parked, due, listener, &shutdown).await {
            return;
        }
        stream = parked;
        negotiated = Negotiated::Http1;
        head_deadline = Some(due);
    }
}

/// Holds a parked connection in its task until its client's next byte (true) or its end; a
/// connection silent past `deadline` is answered 408.
pub async fn wait_parked<T: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut park::Watched<T>,
    deadline: tokio::time::Instant,
    listener: &ListenerTable,
    shutdown: &CancellationToken,
) -> bool {
    let waited = wait_idle(stream, deadline, listener, shutdown).await;
    spoke_in_time(waited, stream, listener).await
}

/// Whether a wait for the client's next byte ended with the byte; a late one is answered 408.
async fn spoke_in_time<T: AsyncWrite + Unpin>(
    waited: park::Wait,
    stream: &mut park::Watched<T>,
    listener: &ListenerTable,
) -> bool {
    match waited {
        park::Wait::Spoke => true,
        park::Wait::Ended => false,
        park::Wait::Late => {
            Box::pin(answer_late_request(stream, listener)).await;
            false
        }
    }
}

/// Holds a parked connection in its task until its client's next byte, its end, or `until`;
/// counted as idle meanwhile.
pub async fn wait_idle<T: AsyncRead + Unpin>(
    stream: &mut park::Watched<T>,
    until: tokio::time::Instant,
    listener: &ListenerTable,
    shutdown: &CancellationToken,
) -> park::Wait {
    listener.metrics.connections_idle.inc();
    let waited = park::wait_for_request(stream, until, shutdown).await;
    listener.metrics.connections_idle.dec();
    waited
}

/// How one hyper session on a client connection ended.
enum SessionEnd<E> {
    /// hyper ended it: the client left or closed, or an error.
    Ended(Result<(), E>),
    /// It ended so the connection parks; the stream is open and idle between requests.
    Parked,
    /// The head begun while parked missed the parked deadline.
    HeadLate,
    /// Cut off: its client took nothing of a response for `limits.send_timeout`.
    Stalled,
}

/// What a hyper session's periodic check looks at: whether the session is idle, and whether
/// its client stopped taking its responses.
struct SessionChecks {
    idle: park::IdleWatch,
    stall: stall::StallCheck,
}

/// Drives one hyper session until it ends: the listener's shutdown ends it gracefully, and
/// every [`park::CHECK_PERIOD`] the idle check may end it so the connection parks. An HTTP/2
/// session (also as h2c) ends gracefully (GOAWAY) once a `header_timeout` passed with no
/// request in flight and none begun or ended, as an idle HTTP/1 keep-alive connection closes
/// after its `header_timeout` (checked every `header_timeout` or half a `send_timeout`,
/// whichever is shorter, or every check period on a plain listener, where the session may
/// turn out to be HTTP/1 and park). A session whose client left a response untaken for
/// `send_timeout` (see [`stall`]) is ended at once. Its first head is held to
/// `head_deadline` (the parked deadline, when the session resumes a parked connection).
async fn drive_session<F, E>(
    mut session: Pin<&mut F>,
    graceful_shutdown: impl Fn(Pin<&mut F>),
    connection: &Connection,
    checks: &mut SessionChecks,
    shutdown: &CancellationToken,
    head_deadline: Option<tokio::time::Instant>,
    limits: Limits,
) -> SessionEnd<E>
where
    F: Future<Output = Result<(), E>>,
{
    let idle_limit = limits.header_timeout;
    let watch = &mut checks.idle;
    let parkable = connection.checks_framing;
    let period = if parkable {
        park::CHECK_PERIOD
    } else {
        idle_limit.min(limits.send_timeout / 2)
    };
    let mut check = std::pin::pin!(tokio::time::sleep(period));
    let mut cancelled = std::pin::pin!(shutdown.cancelled());
    // hyper gives a resumed session's first head a fresh `header_timeout`: the head that
    // began while parked is held to the parked deadline instead.
    let mut late = std::pin::pin!(head_deadline.map(tokio::time::sleep_until));
    let mut check_armed = false;
    let mut ending = None;
    // Requests begun and answered, and since when (to within a check) they have not moved.
    let counts = || {
        (
            connection.requests.load(Ordering::Relaxed),
            connection.answered.load(Ordering::Relaxed),
        )
    };
    let mut counted = counts();
    let mut unmoved_since = tokio::time::Instant::now();
    loop {
        let event = std::future::poll_fn(|cx| {
            if let Poll::Ready(result) = session.as_mut().poll(cx) {
                return Poll::Ready(SessionEvent::Ended(result));
            }
            if cancelled.as_mut().poll(cx).is_ready() {
                return Poll::Ready(SessionEvent::ShuttingDown);
            }
            if let Some(timer) = late.as_mut().as_pin_mut() {
                if !watch.handled_any(connection) && timer.poll(cx).is_ready() {
                    return Poll::Ready(SessionEvent::HeadLate);
                }
            }
            // A polled timer wakes the task when it fires: until then, on the wake-ups of
            // every request, looking at its flag is enough.
            if ending.is_none() && (!check_armed || check.is_elapsed()) {
                check_armed = true;
                if check.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(SessionEvent::IdleCheck);
                }
            }
            Poll::Pending
        })
        .await;
        match event {
            SessionEvent::Ended(Ok(()))
                if ending == Some(Ending::Park) && !shutdown.is_cancelled() =>
            {
                return SessionEnd::Parked
            }
            SessionEvent::Ended(result) => return SessionEnd::Ended(result),
            SessionEvent::HeadLate => return SessionEnd::HeadLate,
            SessionEvent::ShuttingDown => {
                graceful_shutdown(session.as_mut());
                return SessionEnd::Ended(session.as_mut().await);
            }
            SessionEvent::IdleCheck => {
                let now = tokio::time::Instant::now();
                if checks.stall.stalled(now, limits.send_timeout, period) {
                    // Not gracefully: a graceful end would wait for the very responses the
                    // client does not take. Dropped, they let their backends go.
                    tracing::debug!(client = %connection.client, "client accepted nothing for limits.send_timeout: closing");
                    return SessionEnd::Stalled;
                }
                let verdict = connection.framing();
                let parks = verdict.is_some_and(|verdict| watch.park(connection, verdict));
                // HTTP/1 sessions are left to hyper, whose head timeout answers 408.
                let closes_when_idle =
                    verdict.is_none_or(crate::proxy::framing::Verdict::stopped_following);
                let (requests, answered) = counts();
                if (requests, answered) != counted {
                    counted = (requests, answered);
                    unmoved_since = now;
                }
                ending = if parks {
                    Some(Ending::Park)
                } else if closes_when_idle
                    && answered >= requests
                    && now >= unmoved_since + idle_limit
                {
                    Some(Ending::Idle)
                } else {
                    None
                };
                if ending.is_some() {
                    graceful_shutdown(session.as_mut());
                } else {
                    check.as_mut().reset(now + period);
                    check_armed = false;
                }
            }
        }
    }
}

/// Why a hyper session is being ended by its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// To park the connection between two requests (HTTP/1).
    Park,
    /// To close a connection idle for its limit.
    Idle,
}

/// Counts a request as answered when its handler is dropped before making a response (an
/// HTTP/2 client reset the stream), so the connection's count of requests in flight, which
/// its idle check reads, does not keep the dropped one forever.
struct Unanswered<'a>(&'a Connection);

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        self.0.answered.fetch_add(1, Ordering::Relaxed);
    }
}

/// What ended a wait on a client connection's hyper session.
enum SessionEvent<R> {
    Ended(R),
    ShuttingDown,
    IdleCheck,
    /// The head begun while parked missed the parked deadline.
    HeadLate,
}

/// hyper's settings for one session on a client connection.
fn session_builder(limits: Limits, negotiated: Negotiated) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes.max(MIN_BUF_SIZE))
        // A client may close its sending side once its request is out and still read the
        // answer (half-close): the answer is written, then the connection closed.
        .half_close(true)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(Some(MAX_PENDING_RESETS))
        .max_local_error_reset_streams(Some(MAX_LOCAL_RESETS))
        .max_send_buf_size(H2_SEND_BUFFER)
        // No PINGs: an idle connection is closed by `drive_session` (hyper's keep-alive
        // reads the clock on every poll of the connection), a vanished client by TCP
        // keepalive.
        .keep_alive_interval(None);
    match negotiated {
        Negotiated::Http1 => builder.http1_only(),
        Negotiated::Http2 => builder.http2_only(),
        Negotiated::Detect => builder,
    }
}

/// Answers 408 on a connection whose request head did not arrive in time, then closes it;
/// counted as a `header_timeout` rejection.
pub async fn answer_late_request<S: AsyncWrite + Unpin>(mut stream: S, listener: &ListenerTable) {
    listener.metrics.reject(Rejection::HeaderTimeout);
    listener.unrouted_counters.count(408);
    let answer = async {
        stream.write_all(REQUEST_TIMEOUT).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
}

/// A late head after a hyper session: answered when hyper gave the stream back, counted
/// either way.
async fn answer_late_head<S: AsyncWrite + Unpin>(stream: Option<S>, listener: &ListenerTable) {
    match stream {
        Some(stream) => Box::pin(answer_late_request(stream, listener)).await,
        None => listener.metrics.reject(Rejection::HeaderTimeout),
    }
}

/// The answer to a request head that did not arrive within `limits.header_timeout`.
const REQUEST_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 39\r\nconnection: close\r\n\r\n408 Request Timeout: request head late\n";

/// Counts what hyper answered on its own (oversized or timed-out heads, garbage, an HTTP/2
/// client closed for breaking the protocol), and logs the 431s and 400s (a citizen whose
/// cookies outgrew the limit is found in the access log like any other request, without
/// method or path: the head was not read); true when the request head timed out.
fn record_connection_error(
    listener: &ListenerTable,
    connection: &Connection,
    error: &(dyn std::error::Error + 'static),
) -> bool {
    let Some(error) = error.downcast_ref::<hyper::Error>() else {
        tracing::debug!(%error, "client connection ended with an error");
        return false;
    };
    let refused = if error.is_parse_too_large() {
        Some((
            Rejection::HeaderTooLarge,
            ProxyError::HeaderTooLarge.status(),
            Cow::Borrowed(ProxyError::HeaderTooLarge.detail()),
        ))
    } else if error.is_parse() {
        Some((
            Rejection::BadRequest,
            StatusCode::BAD_REQUEST,
            Cow::Owned(format!("malformed request: {error}")),
        ))
    } else {
        None
    };
    if let Some((reason, status, detail)) = refused {
        listener.metrics.reject(reason);
        listener.unrouted_counters.count(status.as_u16());
        if listener.access_log.enabled() {
            listener.access_log.log(AccessRecord {
                time: Some(SystemTime::now()),
                status: status.as_u16(),
                error: Some(detail),
                ..connection.access_record("http")
            });
        }
    } else if error.is_timeout() {
        // Counted with its 408 (`answer_late_head`).
        return true;
    } else if refused_http2(error) {
        // No response to count: the client's connection was refused as a whole.
        listener.metrics.reject(Rejection::BadRequest);
    }
    tracing::debug!(%error, "client connection ended with an error");
    false
}

/// Whether an HTTP/2 connection ended with the GOAWAY the h2 crate sends a client that broke
/// the protocol or abused it: a malformed frame, a flow-control violation, a rapid-reset or
/// CONTINUATION flood (`ENHANCE_YOUR_CALM`).
fn refused_http2(error: &hyper::Error) -> bool {
    use std::error::Error as _;
    error
        .source()
        .and_then(|source| source.downcast_ref::<h2::Error>())
        .is_some_and(|error| {
            error.is_go_away() && error.is_library() && error.reason() != Some(h2::Reason::NO_ERROR)
        })
}

/// Which server read a request's head, and so what [`handle`] still has to check of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadBy {
    /// A hyper session: the head's size and framing are checked here.
    Hyper,
    /// gatehouse's own HTTP/1 loop ([`h1`]): `size` bytes as they arrived, no
    /// Transfer-Encoding and at most one Content-Length, of digits only, whose body came
    /// whole with the head (the loop hands any other head to hyper).
    OwnLoop { size: usize },
}

/// A request's answer, and the `X-Request-Id` for its head when gatehouse's own HTTP/1
/// loop writes it: the loop writes the id as it encodes the head, in place of any the
/// response has, where inserting it into the header map would cost a hash and an insert
/// (≈ 250 instructions) per response. Kept beside the response rather than in its body, which
/// every step of the request path moves.
pub struct Handled {
    /// The response; for hyper's sessions, with its `X-Request-Id` in the header map.
    pub response: Response<ProxyBody>,
    /// For the own loop's head: the request's id, when the response is a proxied one.
    pub request_id: Option<http::HeaderValue>,
}

impl From<Response<ProxyBody>> for Handled {
    fn from(response: Response<ProxyBody>) -> Self {
        Handled {
            response,
            request_id: None,
        }
    }
}

/// Handles one request; never fails (every failure becomes a response).
///
/// A plain function returning an async block, as is `forward`: an `async fn` keeps each
/// argument it takes by value twice in its state (rustc moves it into a local beside the
/// captured one), and the request is 264 bytes.
#[allow(clippy::manual_async_fn)]
pub fn handle(
    request: Request<ClientBody>,
    read_by: ReadBy,
    connection: &Arc<Connection>,
) -> impl Future<Output = Handled> + '_ {
    async move {
        let started = Instant::now();
        let http2 = request.version() == Version::HTTP_2;
        let table = connection.listener.table.load_full();
        let Some(listener) = table.listener(&connection.listener.name) else {
            return ProxyError::NoBackend.response().into();
        };
        // Boxed: held across the backend exchange, it would otherwise take 328 bytes of every
        // request's future, logged or not.
        let mut record = listener
            .access_log
            .enabled()
            .then(|| Box::new(access_record(&request, connection)));
        let bytes_in = record.as_ref().map(|_| Arc::new(AtomicU64::new(0)));
        let limited = listener.rate_limiter.as_ref().and_then(|limiter| {
            let client = listener.config.limits.client_key(connection.client.ip());
            limiter.check(client).err()
        });
        let index = connection.requests.fetch_add(1, Ordering::Relaxed);
        let ambiguous = connection
            .framing()
            .is_some_and(|verdict| verdict.is_ambiguous(index));
        let routed = if ambiguous {
            Err(ProxyError::BadRequest(
                "ambiguous framing: Content-Length with Transfer-Encoding, or repeated",
            ))
        } else if connection.denied {
            Err(ProxyError::Forbidden)
        } else if let Some(retry_after) = limited {
            Err(ProxyError::RateLimited(retry_after))
        } else {
            route(&request, read_by, listener)
        };
        let target = match routed {
            Ok(routed) => routed,
            Err(error) => {
                if let Some(reason) = error.rejection() {
                    listener.metrics.reject(reason);
                }
                listener.unrouted_counters.count(error.status().as_u16());
                listener
                    .unrouted_duration
                    .observe(started.elapsed().as_secs_f64());
                let mut response = error.response();
                if let Some(mut record) = record {
                    record.status = response.status().as_u16();
                    record.error = Some(Cow::Borrowed(error.detail()));
                    response.body_mut().log_when_done(
                        *record,
                        started,
                        listener.access_log.clone(),
                    );
                }
                return response.into();
            }
        };
        target.route_requests.inc();
        let (mut response, outcome) =
            match forward(request, connection, listener, target, bytes_in.clone()).await {
                Ok(forwarded) => forwarded,
                Err(Unforwarded {
                    error,
                    outcome,
                    failure,
                }) => {
                    if let Some(reason) = error.rejection() {
                        listener.metrics.reject(reason);
                    }
                    if let Some(record) = record.as_mut() {
                        record.error = Some(failure.map_or_else(
                            || Cow::Borrowed(error.detail()),
                            |failure| Cow::Owned(format!("{}: {failure}", error.detail())),
                        ));
                    }
                    (error.response(), outcome)
                }
            };
        let code = response.status().as_u16();
        let backend = outcome
            .backend
            .and_then(|index| target.pool.backends.get(index));
        match (outcome.backend, backend) {
            (Some(index), Some(backend)) => {
                if let Some(counters) = target.counters.get(index) {
                    counters.count(code);
                }
                backend.stats.record_response(code);
            }
            _ => target.local_counters.count(code),
        }
        target.duration.observe(started.elapsed().as_secs_f64());
        let mut request_id = None;
        if let Some(id) = &outcome.request_id {
            if let ReadBy::OwnLoop { .. } = read_by {
                request_id = Some(id.clone());
            } else {
                // Unique per request: HTTP/2 sends it as a never-indexed literal, so it does
                // not push the headers that repeat (server, content-type, ...) out of the
                // HPACK table.
                let mut id = id.clone();
                id.set_sensitive(true);
                response.headers_mut().insert(headers::X_REQUEST_ID, id);
            }
        }
        if http2 {
            // Date is new each second. Indexed, each second's value would join the
            // connection's HPACK table, where the h2 crate finds a value by walking every
            // entry of its name: one more per second the connection has lived, up to ≈ 60,
            // ≈ 40 instructions each. As a literal (as HAProxy and nginx send every header)
            // it costs ≈ 250, whatever the connection's age.
            if let Some(date) = response.headers_mut().get_mut(header::DATE) {
                date.set_sensitive(true);
            }
        }
        if let Some(hsts) = &listener.config.hsts {
            response
                .headers_mut()
                .entry(header::STRICT_TRANSPORT_SECURITY)
                .or_insert_with(|| hsts.clone());
        }
        if let Some(record) = record.as_mut() {
            record.status = code;
            record.route.clone_from(&target.route);
            record.backend = backend.map(|b| b.name.clone()).unwrap_or_default();
            record.upstream_duration = outcome.upstream_duration;
            record.bytes_in = bytes_in.map_or(0, |counter| counter.load(Ordering::Relaxed));
            record.request_id = outcome
                .request_id
                .as_ref()
                .and_then(|id| id.to_str().ok())
                .unwrap_or("")
                .to_string();
        }
        if let Some(record) = record {
            response
                .body_mut()
                .log_when_done(*record, started, listener.access_log.clone());
        }
        Handled {
            response,
            request_id,
        }
    }
}

/// The parts of an access-log line known before the request is forwarded.
fn access_record(request: &Request<ClientBody>, connection: &Connection) -> AccessRecord {
    let host = headers::request_host(request)
        .ok()
        .flatten()
        .map(str::to_string)
        .unwrap_or_default();
    AccessRecord {
        time: Some(SystemTime::now()),
        method: request.method().to_string(),
        host,
        path: request.uri().path().to_string(),
        ..connection.access_record("http")
    }
}

/// Checks the request head and finds its target. The request is only looked at: moved in
/// and out, it would take two more slots of the request's future.
fn route<'t>(
    request: &Request<ClientBody>,
    read_by: ReadBy,
    listener: &'t ListenerTable,
) -> Result<&'t Arc<Target>, ProxyError> {
    let head_size = match read_by {
        ReadBy::Hyper => headers::head_size(request),
        ReadBy::OwnLoop { size } => size,
    };
    if head_size > listener.config.limits.max_header_bytes {
        return Err(ProxyError::HeaderTooLarge);
    }
    if read_by == ReadBy::Hyper {
        headers::check_framing(request)?;
    }
    if request.method() == Method::CONNECT {
        return Err(ProxyError::BadRequest("CONNECT is not supported"));
    }
    // `*` (asterisk-form) is OPTIONS's alone (RFC 9112 §3.2.4); any other method needs a path.
    let has_path = request
        .uri()
        .path_and_query()
        .is_some_and(|target| target.path() != "*");
    if !has_path && request.method() != Method::OPTIONS {
        return Err(ProxyError::BadRequest("request target must be a path"));
    }
    let host = headers::request_host(request)?.map(headers::routing_host);
    listener
        .route(host.as_deref(), request.uri().path())
        .ok_or(ProxyError::NoRoute)
}

/// What `forward` learned, for metrics and the access log.
#[derive(Debug, Default)]
struct Outcome {
    /// The backend that answered (or failed last).
    backend: Option<usize>,
    upstream_duration: Option<Duration>,
    request_id: Option<http::HeaderValue>,
}

type Forwarded = (Response<ProxyBody>, Outcome);

/// A request `forward` got no response for: the answer gatehouse makes instead, what was
/// learned, and how the backend failed (for the access log; kept apart from `Outcome`, which
/// every answered request carries).
struct Unforwarded {
    error: ProxyError,
    outcome: Outcome,
    failure: Option<Cow<'static, str>>,
}

/// Methods that may be replayed once a backend has seen them (when they carry no body).
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Sends the request to a backend of `target`, retrying on another backend where that is
/// safe, and returns the response with the backend that produced it.
///
/// A request that was not sent (the connect failed) is retried for any method: it comes
/// back whole, body included. After the request reached a backend — a reset, or a
/// 502/503 before any byte went to the client — only idempotent requests without a body are
/// retried. Timeouts are not retried. Every retry needs a token from the pool's budget.
// Not an `async fn`: see `handle`.
#[allow(clippy::manual_async_fn)]
fn forward<'a>(
    mut request: Request<ClientBody>,
    connection: &'a Arc<Connection>,
    listener: &'a ListenerTable,
    target: &'a Target,
    bytes_in: Option<Arc<AtomicU64>>,
) -> impl Future<Output = Result<Forwarded, Unforwarded>> + 'a {
    async move {
        let pool = &target.pool;
        let context = pool.pick_context(connection.client.ip(), Some(request.headers()));
        let upgrade =
            request.version() == Version::HTTP_11 && headers::wants_upgrade(request.headers());
        let request_headers = request.headers_mut();
        headers::strip_hop_by_hop(request_headers, upgrade);
        let from_trusted_proxy = listener.is_trusted_proxy(connection.client.ip());
        let forwarded_for = headers::forwarded_for(
            request_headers,
            &connection.forwarded_for,
            from_trusted_proxy,
        );
        let request_id = headers::request_id(request_headers);
        let proto = http::HeaderValue::from_static(listener.config.protocol.as_str());
        if let Some(name) = listener
            .config
            .tls
            .as_ref()
            .and_then(|tls| tls.client_cert_header.as_ref())
        {
            request_headers.remove(name);
            let subject = connection
                .tls
                .as_ref()
                .and_then(|tls| tls.client_cert.as_deref())
                .and_then(|subject| http::HeaderValue::from_str(subject).ok());
            if let Some(subject) = subject {
                request_headers.insert(name.clone(), subject);
            }
        }
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
        let multiplexed = request.version() == Version::HTTP_2;
        let (head, body, replayable, client_wait) =
            upstream_request(request, upgrade, bytes_in, target.max_body_bytes).map_err(
                |error| Unforwarded {
                    error,
                    outcome: Outcome::default(),
                    failure: None,
                },
            )?;
        let host = headers::asked_host(&head.uri, &head.headers);
        // The head stays here, lent to each attempt; the body goes with an attempt and comes
        // back only if none of the request was sent. A replay sends the head again, bodiless.
        let mut next = Some(body);
        let proxy_header = pool
            .config
            .send_proxy_protocol
            .map(|version| match version {
                ProxyProtocolVersion::V1 => {
                    proxy_protocol::encode_v1(connection.client, connection.local())
                }
                ProxyProtocolVersion::V2 => {
                    proxy_protocol::encode_v2(connection.client, connection.local())
                }
            });
        let attempts = pool.config.retry_attempts.clamp(1, 10) as usize;
        let mut tried = [usize::MAX; 10];
        pool.retry_budget.deposit();

        let outcome = |backend: Option<usize>, upstream_duration: Option<Duration>| Outcome {
            backend,
            upstream_duration,
            request_id: Some(request_id.clone()),
        };
        let unforwarded = |error, outcome, failure| Unforwarded {
            error,
            outcome,
            failure,
        };
        let mut last_error = unforwarded(ProxyError::NoBackend, outcome(None, None), None);
        for attempt in 0..attempts {
            if next.is_none() {
                break;
            }
            let Some(index) = pool.select(&context, &tried[..attempt]) else {
                break;
            };
            if attempt > 0 {
                if !pool.retry_budget.withdraw() {
                    tracing::debug!(pool = pool.name(), "retry budget spent; not retrying");
                    break;
                }
                pool.retries.inc();
            }
            tried[attempt] = index;
            let backend = &pool.backends[index];
            let last_attempt = attempt + 1 == attempts;
            let Some(body) = next.take() else {
                break;
            };
            let forwarded = headers::Forwarded {
                host: host.unwrap_or(backend.host.as_bytes()),
                forwarded_host: host,
                forwarded_for: &forwarded_for,
                proto: &proto,
                request_id: &request_id,
                from_trusted_proxy,
            };
            // A request without a body may be sent again after the backend saw it.
            let may_replay = replayable && !last_attempt;
            // One clock read for the attempt's start and its deadline (27 ns each here).
            let sent_at = tokio::time::Instant::now();
            let in_flight = backend.stats.start();
            // Awaited where it is made: held in a local first, the 2 KB exchange future was
            // copied into this future's state (136 instructions of `memcpy` per request).
            let result = tokio::time::timeout_at(
                sent_at + pool.config.timeouts.request,
                backend.connections.send(
                    &head,
                    &forwarded,
                    body,
                    proxy_header.as_deref(),
                    replayable,
                ),
            )
            .await;
            let upstream_duration = sent_at.elapsed();
            pool.observe_latency(index, upstream_duration);
            let mut response = match result {
                Err(_elapsed) if client_wait.as_ref().is_some_and(ClientWait::is_waiting) => {
                    // The client held its body back: its timeout, not the backend's.
                    tracing::debug!(backend = %backend.name, "request body late from the client");
                    return Err(unforwarded(
                        ProxyError::ClientTimeout,
                        outcome(None, Some(upstream_duration)),
                        None,
                    ));
                }
                Err(_elapsed) => {
                    pool.record_outcome(index, false);
                    return Err(unforwarded(
                        ProxyError::Timeout,
                        outcome(Some(index), Some(upstream_duration)),
                        None,
                    ));
                }
                Ok(Err(failed)) if failed.error.is_body_too_large() => {
                    tracing::debug!(backend = %backend.name, "request body over the route's limit");
                    return Err(unforwarded(
                        ProxyError::PayloadTooLarge,
                        outcome(Some(index), Some(upstream_duration)),
                        None,
                    ));
                }
                Ok(Err(failed)) if failed.error.is_client_body_error() => {
                    // The client's body turned out malformed after its head went upstream: that
                    // upstream connection is aborted (never reused) and the client gets 400.
                    let error = failed.error.to_string();
                    tracing::debug!(backend = %backend.name, %error, "client body malformed");
                    return Err(unforwarded(
                        ProxyError::BadRequest("malformed request body"),
                        outcome(Some(index), Some(upstream_duration)),
                        Some(Cow::Owned(error)),
                    ));
                }
                Ok(Err(failed)) => {
                    pool.record_outcome(index, false);
                    let error = failed.error.to_string();
                    tracing::debug!(backend = %backend.name, %error, "backend failed");
                    let kind = if failed.error.is_timeout() {
                        ProxyError::Timeout
                    } else {
                        ProxyError::BackendFailed
                    };
                    last_error = unforwarded(
                        kind,
                        outcome(Some(index), Some(upstream_duration)),
                        Some(Cow::Owned(error)),
                    );
                    // Unsent, the request goes on as it is; sent, only a replayable one goes on.
                    next = failed
                        .unsent
                        .or_else(|| may_replay.then(UpstreamBody::empty));
                    if last_attempt {
                        return Err(last_error);
                    }
                    continue;
                }
                Ok(Ok(sent)) => sent,
            };
            let status = response.status();
            pool.record_outcome(index, !status.is_server_error());
            let retry_status = matches!(
                status,
                StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE
            );
            if retry_status && may_replay && pool.select(&context, &tried[..=attempt]).is_some() {
                last_error = unforwarded(
                    ProxyError::BackendFailed,
                    outcome(Some(index), Some(upstream_duration)),
                    Some(Cow::Borrowed(if status == StatusCode::BAD_GATEWAY {
                        "backend answered 502; no retry was possible"
                    } else {
                        "backend answered 503; no retry was possible"
                    })),
                );
                next = Some(UpstreamBody::empty());
                continue;
            }

            if status == StatusCode::SWITCHING_PROTOCOLS && client_upgrade.is_none() {
                tracing::debug!(backend = %backend.name, "101 to a request that asked no upgrade");
                return Err(unforwarded(
                    ProxyError::BackendFailed,
                    outcome(Some(index), Some(upstream_duration)),
                    Some(Cow::Borrowed(
                        "backend answered 101 to a request that asked no upgrade",
                    )),
                ));
            }
            if let (Some(client_upgrade), StatusCode::SWITCHING_PROTOCOLS) =
                (client_upgrade, status)
            {
                let backend = response.body_mut().take_upgraded();
                let idle = pool.config.timeouts.idle;
                let client_connection = Arc::clone(connection);
                connection.listener.tunnels.spawn(async move {
                    let _in_flight = in_flight;
                    let (Ok(client), Some(mut backend)) = (client_upgrade.await, backend) else {
                        return;
                    };
                    let mut client = TokioIo::new(client);
                    let tunneled =
                        super::l4::tunnel(&mut client, &mut backend, idle, UPGRADED_BUFFER).await;
                    // The client's socket is inside hyper's upgrade: `serve_hyper` resets it
                    // once the upgrade, dropped here, hands it back.
                    if let super::l4::TunnelEnd::IdledOut {
                        client_stalled: true,
                        ..
                    } = tunneled.end
                    {
                        client_connection
                            .reset_client
                            .store(true, Ordering::Relaxed);
                    }
                });
                headers::strip_hop_by_hop(response.headers_mut(), true);
                return Ok((
                    response.map(|_| ProxyBody::empty()),
                    outcome(Some(index), Some(upstream_duration)),
                ));
            }

            headers::strip_hop_by_hop(response.headers_mut(), false);
            if multiplexed {
                response.body_mut().read_multiplexed();
            }
            let response = response.map(|body| ProxyBody::upstream(body, in_flight));
            return Ok((response, outcome(Some(index), Some(upstream_duration))));
        }
        Err(last_error)
    }
}

/// The request as it goes to a backend: its head (origin-form, HTTP/1.1), the client's body
/// streamed (counted into `bytes_in`, held to `max_body_bytes`), whether it may be replayed,
/// and, with a body, what tells when that body waits for the client.
fn upstream_request(
    request: Request<ClientBody>,
    upgrade: bool,
    bytes_in: Option<Arc<AtomicU64>>,
    max_body_bytes: Option<u64>,
) -> Result<(request::Parts, UpstreamBody, bool, Option<ClientWait>), ProxyError> {
    let (mut parts, body) = request.into_parts();
    if let Some(limit) = max_body_bytes {
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|length| length > limit) {
            return Err(ProxyError::PayloadTooLarge);
        }
    }
    let empty = body.is_end_stream();
    let replayable = !upgrade && is_idempotent(&parts.method) && empty;
    // Only a body still to come from the client can keep the request waiting for it.
    let client_wait = matches!(body, ClientBody::Streaming(_) if !empty).then(ClientWait::default);
    let body = if empty {
        UpstreamBody::empty()
    } else {
        UpstreamBody::new(body, bytes_in, max_body_bytes, client_wait.clone())
    };
    // The URI keeps its authority (`headers::asked_host` reads it): the upstream head
    // writes the target in origin form. The server's extensions stay behind.
    parts.version = Version::HTTP_11;
    parts.extensions = http::Extensions::new();
    Ok((parts, body, replayable, client_wait))
}

/// A plain HTTP connection on a listener `web` (one pool, no health checks), and the
/// listener's limits: for tests that look at the request path's state.
#[cfg(test)]
pub fn test_connection() -> (Arc<Connection>, Limits) {
    let yaml = "listeners:\n  web: { listen: \"127.0.0.1:0\", protocol: http, pool: app }\npools:\n  app:\n    health_check: { type: none }\n    backends:\n      - { name: a, address: \"127.0.0.1:9\" }\n";
    let config = crate::config::parse(yaml, std::path::Path::new("test.yaml")).unwrap();
    let metrics = crate::metrics::Metrics::new().unwrap();
    let table = crate::upstream::publisher::start(Arc::new(config), metrics, 1)
        .unwrap()
        .table()
        .clone();
    let limits = table.load().listener("web").unwrap().config.limits;
    let address = "127.0.0.1:1".parse().unwrap();
    let listener = Arc::new(ListenerContext {
        name: "web".into(),
        table,
        tunnels: tokio_util::task::TaskTracker::new(),
    });
    let connection = Arc::new(Connection::new(listener, address, address, true));
    (connection, limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every open HTTP connection — idle ones by the thousand — keeps its facts behind an
    /// `Arc` (16 bytes of counts beside them): at 144 bytes they fill jemalloc's 160-byte size
    /// class; one field more and each connection takes 192.
    #[test]
    fn the_connection_facts_fit_the_160_byte_size_class() {
        let size = std::mem::size_of::<Connection>();
        assert!(size <= 144, "the connection facts are {size} bytes");
    }

    /// The own loop's heads are held to their size as they arrived; hyper's are measured.
    #[tokio::test]
    async fn a_head_is_held_to_max_header_bytes_whoever_read_it() {
        let (connection, limits) = test_connection();
        let table = connection.listener.table.load_full();
        let listener = table.listener("web").unwrap();
        let max = limits.max_header_bytes;
        let request = |value: &str| {
            Request::builder()
                .uri("/")
                .header(header::HOST, "x")
                .header("x-big", value)
                .body(ClientBody::Empty)
                .unwrap()
        };
        let small = request("y");
        let too_large = |routed: Result<&Arc<Target>, ProxyError>| {
            matches!(routed, Err(ProxyError::HeaderTooLarge))
        };
        assert!(!too_large(route(
            &small,
            ReadBy::OwnLoop { size: max },
            listener
        )));
        assert!(too_large(route(
            &small,
            ReadBy::OwnLoop { size: max + 1 },
            listener
        )));
        assert!(!too_large(route(&small, ReadBy::Hyper, listener)));
        let big = request(&"y".repeat(max));
        assert!(too_large(route(&big, ReadBy::Hyper, listener)));
    }

    /// Each HTTP/2 stream's request future is boxed with hyper's request beside it (≈ 280
    /// bytes more). Up to 3,072 bytes, a jemalloc slab holds several of them; in the 4,096-byte
    /// class each block is a slab of its own, taken from and given back to the page
    /// allocator as streams come and go (≈ 3 % of an HTTP/2 request). 2,616 bytes in a
    /// release build, 2,640 in a debug one.
    #[tokio::test]
    async fn the_request_future_fits_the_3072_byte_size_class_when_boxed() {
        let (connection, _) = test_connection();
        let handling = handle(Request::new(ClientBody::Empty), ReadBy::Hyper, &connection);
        let size = std::mem::size_of_val(&handling);
        assert!(size <= 2688, "the request future is {size} bytes");
    }
}
