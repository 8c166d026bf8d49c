//! One HTTP request: checked, routed, forwarded to a backend of its pool (retried where
//! that is safe), and answered — every failure becomes a response — with its metrics and
//! access-log line.

use super::body::ProxyBody;
use super::error::ProxyError;
use super::headers;
use super::l7::{ClientBody, Connection};
use crate::access_log::AccessRecord;
use crate::config::ProxyProtocolVersion;
use crate::proxy_protocol;
use crate::upstream::body::{ClientWait, UpstreamBody};
use crate::upstream::table::{ListenerTable, Target};
use http::{header, request, Method, Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use std::borrow::Cow;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Copy buffer per direction of an upgraded connection (WebSocket) while bytes move (an
/// idle one holds none, see `relay`): small, as WebSocket messages are, so many busy ones
/// stay cheap.
const UPGRADED_BUFFER: usize = 8 * 1024;

/// Which server read a request's head, and so what [`handle`] still has to check of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadBy {
    /// A hyper session: the head's size and framing are checked here.
    Hyper,
    /// gatehouse's own HTTP/1 loop ([`super::h1`]): `size` bytes as they arrived, no
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
                    // The client's socket is inside hyper's upgrade: `session::serve_hyper` resets it
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::l7::test_connection;

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
