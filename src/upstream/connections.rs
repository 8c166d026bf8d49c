//! Keep-alive HTTP/1.1 connections to one backend.
//!
//! Idle connections wait in bounded lock-free queues (no mutex, no hashing: each backend
//! of the table holds its own), one per worker thread: a connection is registered with the
//! runtime of the worker that opened it and serves that worker's requests only. A request
//! takes one, and the response body ([`ResponseBody`]) hands it back once it was read to
//! its end; a connection whose response was cut short is closed instead. An idle connection
//! the backend closed is noticed from its socket's readiness before use, and a request that
//! a stale connection could not send comes back untouched and goes out on the next
//! connection. A connection is not used once it idled almost as long as its backend said it
//! keeps connections (`Keep-Alive: timeout=N`), and an idempotent request without a body
//! that the backend closed on as it arrived goes out again on the next connection.

use super::body::{BodyTooLarge, UpstreamBody};
use super::connector::{ConnectError, Connector};
use super::http1::{Connection, Http1Error, ResponseBody, SetHeaders};
use crate::config::Timeouts;
use crate::workers;
use crossbeam_queue::ArrayQueue;
use http::{request, Response};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Idle connections kept per backend, shared out among the workers; more are closed when
/// their response ends.
const MAX_IDLE_PER_BACKEND: usize = 256;
/// The least a worker keeps per backend, however many workers there are.
const MIN_IDLE_PER_WORKER: usize = 32;

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("backend request: {0}")]
    Request(#[source] Http1Error),
}

impl SendError {
    /// A connect or I/O timeout rather than a refusal or reset.
    pub fn is_timeout(&self) -> bool {
        match self {
            SendError::Connect(error) => matches!(error, ConnectError::TimedOut),
            SendError::Request(error) => error.is_timeout(),
        }
    }

    /// The client's body outgrew the route's `max_body_bytes` while streaming.
    pub fn is_body_too_large(&self) -> bool {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(error) = source {
            if error.is::<BodyTooLarge>() {
                return true;
            }
            source = error.source();
        }
        false
    }

    /// The client's own body stream failed (a malformed chunk, a client gone mid-upload)
    /// after the request head went to the backend.
    pub fn is_client_body_error(&self) -> bool {
        matches!(self, SendError::Request(Http1Error::ClientBody(_))) && !self.is_body_too_large()
    }
}

/// A failed send: what went wrong, and the request's body when none of the request was
/// sent (so the request can go to another backend as it is, body included).
#[derive(Debug)]
pub struct Failed {
    pub error: SendError,
    pub unsent: Option<UpstreamBody>,
}

/// An idle connection and since when it has been idle.
struct Idle {
    connection: Connection,
    since: Instant,
}

/// The keep-alive connections to one backend. Shared by every table that has the backend
/// at the same address with the same pool settings, so a reload keeps them warm.
pub struct BackendConnections {
    address: SocketAddr,
    connector: Arc<Connector>,
    /// One queue per worker, indexed by [`workers::current`].
    idle: Box<[ArrayQueue<Idle>]>,
    idle_timeout: Duration,
    /// How long a connection may idle and still be used, in milliseconds, when the backend
    /// announces how long it keeps idle connections (`Keep-Alive: timeout=N`; else
    /// `u64::MAX`). One value per backend: the timeout is the server's setting.
    reuse_within_ms: AtomicU64,
    /// The longest a backend may go silent inside a response body (the pool's
    /// `timeouts.request`; a change of timeouts makes a new connector, and so new
    /// connections).
    stall_limit: Duration,
}

impl std::fmt::Debug for BackendConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendConnections")
            .field("address", &self.address)
            .field(
                "idle",
                &self.idle.iter().map(ArrayQueue::len).sum::<usize>(),
            )
            .finish()
    }
}

impl BackendConnections {
    /// Connections to `address` for `workers` workers, opened by `connector`, closed after
    /// `timeouts.idle` unused; a response body fails after `timeouts.request` without a byte.
    pub fn new(
        address: SocketAddr,
        connector: Arc<Connector>,
        timeouts: Timeouts,
        workers: usize,
    ) -> Self {
        let workers = workers.max(1);
        let per_worker = (MAX_IDLE_PER_BACKEND / workers).max(MIN_IDLE_PER_WORKER);
        BackendConnections {
            address,
            connector,
            idle: (0..workers).map(|_| ArrayQueue::new(per_worker)).collect(),
            idle_timeout: timeouts.idle,
            reuse_within_ms: AtomicU64::new(u64::MAX),
            stall_limit: timeouts.request,
        }
    }

    /// `existing` while it still serves `address` through `connector` (a table rebuild or a
    /// reload keeps the connections warm), else new connections.
    pub fn kept_or_new(
        existing: Option<&Arc<Self>>,
        address: SocketAddr,
        connector: Arc<Connector>,
        timeouts: Timeouts,
        workers: usize,
    ) -> Arc<Self> {
        match existing {
            Some(existing)
                if existing.address == address && Arc::ptr_eq(&existing.connector, &connector) =>
            {
                existing.clone()
            }
            _ => Arc::new(BackendConnections::new(
                address, connector, timeouts, workers,
            )),
        }
    }

    /// Whether `idle` has idled too long to be used: the pool's idle timeout, or a little
    /// less than the backend announced ([`Self::announce_idle`]) when shorter.
    fn expired(&self, idle: &Idle) -> bool {
        let limit = match self.reuse_within_ms.load(Ordering::Relaxed) {
            u64::MAX => self.idle_timeout,
            announced => Duration::from_millis(announced).min(self.idle_timeout),
        };
        idle.since.elapsed() >= limit
    }

    /// The backend keeps idle connections open for `seconds` (`Keep-Alive: timeout=N` on a
    /// response): its connections are used only while a little younger — a second less, or
    /// half for the shortest — so a request is not sent just as the backend's own timer
    /// closes the connection, when the backend would never answer it.
    pub fn announce_idle(&self, seconds: u32) {
        let within = short_of(Duration::from_secs(u64::from(seconds)));
        let within_ms = u64::try_from(within.as_millis()).unwrap_or(u64::MAX - 1);
        // Written only when it changes: every response of such a backend says it again.
        if self.reuse_within_ms.load(Ordering::Relaxed) != within_ms {
            self.reuse_within_ms.store(within_ms, Ordering::Relaxed);
        }
    }

    /// The idle connections of the worker this runs on.
    fn idle_here(&self) -> &ArrayQueue<Idle> {
        &self.idle[workers::current() % self.idle.len()]
    }

    /// A connection whose response was read to its end, ready for the next request on this
    /// worker (a full queue closes it).
    pub fn give_back(&self, connection: Connection) {
        let _ = self.idle_here().push(Idle {
            connection,
            since: Instant::now(),
        });
    }

    /// Sends the request `head` (origin-form URI; borrowed, so the caller can send it again)
    /// with the headers `set` on it and `body`, on an idle connection or a new one when none
    /// is usable. With `proxy_header`, a new connection starting with that header carries
    /// this request alone (the header names one client) and is never reused.
    ///
    /// A `replayable` request (idempotent, without a body) that an idle connection's backend
    /// closed instead of answering goes out again on the next connection: the backend's
    /// keep-alive timer fired as it arrived, and the backend itself is fine. Any other request
    /// fails then, since its backend may have acted on it (as nginx and Go's client do).
    ///
    /// The response body gives its connection back when read to its end, if it may be reused.
    pub async fn send(
        self: &Arc<Self>,
        head: &request::Parts,
        set: &dyn SetHeaders,
        mut body: UpstreamBody,
        proxy_header: Option<&[u8]>,
        replayable: bool,
    ) -> Result<Response<ResponseBody>, Failed> {
        if proxy_header.is_none() {
            // Each idle connection is looked at once; a stale one is closed.
            let idle_here = self.idle_here();
            for _ in 0..idle_here.len() {
                let Some(idle) = idle_here.pop() else { break };
                if self.expired(&idle) || !idle.connection.is_usable() {
                    continue;
                }
                match idle
                    .connection
                    .send(head, set, body, Some(self.clone()), self.stall_limit)
                    .await
                {
                    Ok(response) => return Ok(response),
                    Err((_, Some(returned))) => body = returned,
                    Err((error, None)) if replayable && error.is_closed_before_response() => {
                        tracing::debug!(backend = %self.address, %error, "an idle connection closed as it was used; sending again");
                        body = UpstreamBody::empty();
                    }
                    Err((error, None)) => {
                        return Err(Failed {
                            error: SendError::Request(error),
                            unsent: None,
                        })
                    }
                }
            }
        }
        // Opening a connection is the rare path: boxed, its large future (TCP, TLS) does not
        // weigh on every request's future.
        let stream = match Box::pin(self.connector.connect(self.address, proxy_header)).await {
            Ok(stream) => stream,
            Err(error) => {
                return Err(Failed {
                    error: error.into(),
                    unsent: Some(body),
                })
            }
        };
        let home = proxy_header.is_none().then(|| self.clone());
        Connection::new(stream)
            .send(head, set, body, home, self.stall_limit)
            .await
            .map_err(|(error, unsent)| Failed {
                error: SendError::Request(error),
                unsent,
            })
    }

    /// Closes connections idle for longer than the idle timeout (or than their backend
    /// announced), or already closed by the backend; the others stay (their order may change).
    pub fn close_expired(&self) {
        for queue in &self.idle {
            for _ in 0..queue.len() {
                let Some(idle) = queue.pop() else { break };
                if !self.expired(&idle) && idle.connection.is_usable() {
                    let _ = queue.push(idle);
                }
            }
        }
    }
}

/// A second less than `announced`, or half of it when that is less than two seconds.
fn short_of(announced: Duration) -> Duration {
    announced - (announced / 2).min(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_used_until_a_little_before_the_backend_closes_them() {
        let seconds = |n| Duration::from_secs(n);
        assert_eq!(short_of(seconds(5)), seconds(4));
        assert_eq!(short_of(seconds(2)), seconds(1));
        assert_eq!(short_of(seconds(1)), Duration::from_millis(500));
        assert_eq!(short_of(seconds(0)), Duration::ZERO);
    }
}
