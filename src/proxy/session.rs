//! A hyper session on a client connection: HTTP/2, and the HTTP/1 requests gatehouse's own
//! loop hands over (bodies still arriving, upgrades, malformed heads). It holds the
//! connection from the first request it must serve until the connection parks or ends, and
//! owns what hyper is told (HTTP/2 limits against floods), the checks that end an idle or
//! stalled session, and the counting of what hyper refused on its own.

use super::error::ProxyError;
use super::framing;
use super::h2_resets;
use super::l7::{answer_late_request, Connection, Negotiated, Served, MIN_BUF_SIZE};
use super::park;
use super::request::{handle, ReadBy};
use super::stall;
use crate::access_log::AccessRecord;
use crate::config::Limits;
use crate::io::{Observed, Reclaimable, ResetOnClose};
use crate::metrics::Rejection;
use crate::upstream::body::StreamedBody;
use crate::upstream::table::ListenerTable;
use http::{Request, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

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

/// Serves `stream` with a hyper session until it ends or parks; its first head is due by
/// `head_deadline` if given.
pub(super) async fn serve_hyper<I>(
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

/// A late head after a hyper session: answered when hyper gave the stream back, counted
/// either way.
async fn answer_late_head<S: AsyncWrite + Unpin>(stream: Option<S>, listener: &ListenerTable) {
    match stream {
        Some(stream) => Box::pin(answer_late_request(stream, listener)).await,
        None => listener.metrics.reject(Rejection::HeaderTimeout),
    }
}

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
