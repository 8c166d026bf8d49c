//! The HTTP proxy's client connections: what every request on a connection shares
//! ([`Connection`]), and its life — requests served by gatehouse's own HTTP/1 loop ([`h1`])
//! or a hyper session ([`session`]), parked between them, answered 408 when a head is late.
//! Each request is routed and forwarded by [`super::request`].
//!
//! Per request: one `ArcSwap` load of the table, a route match, an O(1) pick, header
//! rewriting in place, then the request streams to the backend and the response streams
//! back. No lock is taken and the configuration is never cloned.

use super::framing::{Verdict, VerdictHolder};
use super::h1;
use super::headers;
use super::park;
use super::session;
use crate::access_log::AccessRecord;
use crate::io::ResetOnClose;
use crate::metrics::Rejection;
use crate::upstream::publisher::SharedTable;
use crate::upstream::table::ListenerTable;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// hyper refuses a read buffer below this.
pub const MIN_BUF_SIZE: usize = 8192;

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
    /// is reset when the upgrade hands it back (see `session::serve_hyper`).
    pub(super) reset_client: AtomicBool,
    /// What that check found (kept here, not in an allocation of its own).
    verdict: Verdict,
    /// Requests handled so far on this connection (HTTP/1 handles them in order).
    pub requests: AtomicU64,
    /// Responses sent to their end (or abandoned) so far.
    pub answered: AtomicU64,
    /// `client` as `X-Forwarded-For` carries it, rendered once for all the requests.
    pub(super) forwarded_for: http::HeaderValue,
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
    Box::pin(session::serve_hyper(
        stream,
        connection,
        listener,
        negotiated,
        shutdown,
        head_deadline,
    ))
    .await
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

/// The answer to a request head that did not arrive within `limits.header_timeout`.
const REQUEST_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 39\r\nconnection: close\r\n\r\n408 Request Timeout: request head late\n";

/// A plain HTTP connection on a listener `web` (one pool, no health checks), and the
/// listener's limits: for tests that look at the request path's state.
#[cfg(test)]
pub fn test_connection() -> (Arc<Connection>, crate::config::Limits) {
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
}
