//! Listening sockets and the accept loop: bind with the right socket options, refuse what is
//! over the connection limit, terminate TLS, and hand each connection to the proxy.
//!
//! A listener reads its settings (limits, TLS acceptor, routes) from the published table at
//! every accept, so a reload changes them for new connections without rebinding the socket.

use crate::config::Protocol;
use crate::io::{ByteCounters, Observed};
use crate::metrics::Rejection;
use crate::proxy::framing;
use crate::proxy::l4;
use crate::proxy::l7::{self, Negotiated};
use crate::proxy_protocol::{self, Prefixed};
use crate::tls::ALPN_H2;
use crate::upstream::publisher::SharedTable;
use crate::upstream::table::ListenerTable;
use bytes::Bytes;
use socket2::{Domain, Protocol as SocketProtocol, SockRef, Socket, TcpKeepalive, Type};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Pending connections the kernel may queue for us.
const BACKLOG: i32 = 4096;
/// TCP keepalive probe delay on client connections (detects vanished clients).
const KEEPALIVE: Duration = Duration::from_secs(60);
/// Pause after an accept error such as EMFILE, so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Binds `address` with SO_REUSEADDR (and SO_REUSEPORT when asked).
pub fn bind(address: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(SocketProtocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// A bound listener's accept loop and what it needs.
pub struct Listener {
    pub name: Arc<str>,
    pub socket: TcpListener,
    pub table: SharedTable,
    /// Cancelled to stop accepting and ask open connections to finish.
    pub shutdown: CancellationToken,
    /// Tracks every connection and tunnel, so shutdown can wait for them.
    pub tasks: TaskTracker,
}

impl Listener {
    /// Accepts until `shutdown` is cancelled.
    pub async fn run(self) {
        let open = Arc::new(AtomicUsize::new(0));
        let per_client = Arc::new(PerClient::new());
        loop {
            let accepted = tokio::select! {
                accepted = self.socket.accept() => accepted,
                () = self.shutdown.cancelled() => break,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(listener = %self.name, %error, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            };
            let table = self.table.load_full();
            let Some(listener) = table.listener(&self.name).cloned() else {
                continue;
            };
            listener.metrics.connections_total.inc();
            if open.load(Ordering::Relaxed) >= listener.config.limits.max_connections {
                listener.metrics.reject(Rejection::MaxConnections);
                drop(stream);
                continue;
            }
            let guard = OpenConnection::new(open.clone(), &listener);
            let connection = l7::Connection {
                listener: self.name.clone(),
                client: peer,
                local: peer,
                denied: false,
                framing: None,
                requests: std::sync::atomic::AtomicU64::new(0),
                answered: std::sync::atomic::AtomicU64::new(0),
                tls_version: None,
                sni: None,
                client_cert: None,
                table: self.table.clone(),
                tunnels: self.tasks.clone(),
                forwarded_for: Default::default(),
            };
            let counters = ByteCounters {
                received: listener.metrics.bytes_received.clone(),
                sent: listener.metrics.bytes_sent.clone(),
            };
            let stream = Prefixed::new(Bytes::new(), Observed::new(stream, counters));
            let accepted = Box::new(Accepted {
                connection,
                listener,
                shutdown: self.shutdown.clone(),
                per_client: per_client.clone(),
                open: guard,
            });
            self.tasks.spawn(serve_connection(stream, accepted));
        }
        tracing::info!(listener = %self.name, "stopped accepting");
    }
}

/// Open connections per client address, in fixed hashed slots (no map, no lock). Addresses
/// that collide share a slot, which can only make the cap stricter.
struct PerClient {
    slots: Box<[AtomicU32]>,
}

impl PerClient {
    const SLOTS: usize = 1 << 14;

    fn new() -> Self {
        PerClient {
            slots: (0..Self::SLOTS).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    /// Counts a connection from `client`; `Err` when it already has `cap` open. With no cap
    /// (0) nothing is counted.
    fn admit(
        self: &Arc<Self>,
        client: std::net::IpAddr,
        cap: u32,
    ) -> Result<Option<ClientSlot>, ()> {
        if cap == 0 {
            return Ok(None);
        }
        let index = (crate::balancer::ip_hash(client) as usize) & (Self::SLOTS - 1);
        let previous = self.slots[index].fetch_add(1, Ordering::Relaxed);
        let slot = ClientSlot {
            table: self.clone(),
            index,
        };
        if previous >= cap {
            return Err(());
        }
        Ok(Some(slot))
    }
}

/// One counted connection of a client; released on drop.
struct ClientSlot {
    table: Arc<PerClient>,
    index: usize,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        if let Some(slot) = self.table.slots.get(self.index) {
            slot.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Keeps the listener's open-connection count and gauge right, however the task ends.
struct OpenConnection {
    open: Arc<AtomicUsize>,
    gauge: prometheus::IntGauge,
}

impl OpenConnection {
    fn new(open: Arc<AtomicUsize>, listener: &ListenerTable) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        listener.metrics.connections_active.inc();
        OpenConnection {
            open,
            gauge: listener.metrics.connections_active.clone(),
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        self.gauge.dec();
    }
}

/// What a connection carries from accept until its client speaks, boxed: thousands of silent
/// connections may wait at once, and the waiting task holds only this box and its stream.
struct Accepted {
    connection: l7::Connection,
    listener: Arc<ListenerTable>,
    shutdown: CancellationToken,
    per_client: Arc<PerClient>,
    /// Counts the connection as open until it ends.
    open: OpenConnection,
}

impl Accepted {
    /// Takes the facts out of their box and frees it: a box only moved out of would stay
    /// allocated until the connection ends.
    fn unbox(accepted: Box<Accepted>) -> Accepted {
        *accepted
    }
}

async fn serve_connection(mut stream: ClientStream, mut accepted: Box<Accepted>) {
    let socket = stream.get_ref().get_ref();
    let _ = socket.set_nodelay(true);
    let _ = SockRef::from(socket).set_tcp_keepalive(&TcpKeepalive::new().with_time(KEEPALIVE));
    if let Ok(local) = socket.local_addr() {
        accepted.connection.local = local;
    }
    let listener = accepted.listener.clone();
    let limits = listener.config.limits;
    let metrics = &listener.metrics;
    if listener.config.proxy_protocol {
        // Boxed: the waiting state of every other connection does not make room for it.
        match Box::pin(proxy_protocol::read_header(
            &mut stream,
            limits.header_timeout,
        ))
        .await
        {
            Ok((header, rest)) => {
                if let Some((source, destination)) = header.addresses {
                    accepted.connection.client = source;
                    accepted.connection.local = destination;
                }
                stream.set_prefix(rest);
            }
            Err(error) => {
                tracing::debug!(peer = %accepted.connection.client, %error, "refused: bad PROXY protocol header");
                metrics.reject(Rejection::ProxyProtocol);
                return;
            }
        }
    }
    let client = accepted.connection.client.ip();
    let Ok(_client_slot) = accepted
        .per_client
        .admit(client, limits.max_connections_per_client)
    else {
        metrics.reject(Rejection::MaxConnections);
        return;
    };
    let limited = !listener.config.protocol.is_http()
        && listener
            .rate_limiter
            .as_ref()
            .is_some_and(|limiter| limiter.check(client).is_err());
    if limited {
        metrics.reject(Rejection::RateLimit);
        return;
    }
    if !listener.admits(client) {
        if !listener.config.protocol.is_http() {
            metrics.reject(Rejection::Acl);
            return;
        }
        accepted.connection.denied = true;
    }
    if listener.config.protocol.is_http() && stream.prefix_len() == 0 {
        // HTTP clients speak first: until they do, a connection costs its socket and this
        // task, not the HTTP (or TLS) machinery and its buffers.
        let mut first = [0u8; 1];
        let socket = stream.get_ref().get_ref();
        // poll_peek waits in the socket's own waker slot: a smaller future than `peek`.
        let peek = std::future::poll_fn(|cx| {
            let mut first = tokio::io::ReadBuf::new(&mut first);
            socket.poll_peek(cx, &mut first)
        });
        let spoke = tokio::select! {
            spoke = tokio::time::timeout(limits.header_timeout, peek) => spoke,
            () = accepted.shutdown.cancelled() => return,
        };
        match spoke {
            Ok(Ok(1..)) => {}
            Ok(Ok(0) | Err(_)) => return,
            Err(_silent) => {
                if listener.tls.is_some() {
                    metrics.tls_handshake_errors.inc();
                    metrics.reject(Rejection::Tls);
                } else {
                    Box::pin(l7::answer_late_request(stream, &listener)).await;
                }
                return;
            }
        }
    }
    let Accepted {
        connection,
        shutdown,
        open,
        ..
    } = Accepted::unbox(accepted);
    serve_protocol(stream, connection, &listener, shutdown).await;
    drop(open);
}

/// The stream of a client connection as the listener reads it.
type ClientStream = Prefixed<Observed<TcpStream, ByteCounters>>;

/// The future that serves a connection once its client has spoken (or at once for TCP):
/// TLS, plain HTTP or TCP pass-through. Chosen here and boxed alone, so a connection holds
/// the room of the branch it takes (≈ 1 KB for plain HTTP), not of the largest (TLS).
fn serve_protocol<'l>(
    stream: ClientStream,
    mut connection: l7::Connection,
    listener: &'l ListenerTable,
    shutdown: CancellationToken,
) -> Pin<Box<dyn Future<Output = ()> + Send + 'l>> {
    match (&listener.tls, listener.config.protocol) {
        (Some(acceptor), _) => {
            Box::pin(serve_tls(stream, connection, acceptor, listener, shutdown))
        }
        (None, Protocol::Tcp) => {
            Box::pin(async move { l4::serve(stream, &connection, listener).await })
        }
        (None, _) => {
            let (stream, verdict) = framing::guard(stream);
            connection.framing = Some(verdict);
            let connection = Arc::new(connection);
            Box::pin(l7::serve(
                stream,
                connection,
                listener,
                Negotiated::Detect,
                shutdown,
            ))
        }
    }
}

/// A TLS connection once its client has spoken: handshake, then HTTP (by ALPN) or TCP
/// pass-through. A function of its own, so the room for the TLS stream (≈ 2 KB) is no part of
/// a plain connection's state.
async fn serve_tls(
    stream: ClientStream,
    mut connection: l7::Connection,
    acceptor: &TlsAcceptor,
    listener: &ListenerTable,
    shutdown: CancellationToken,
) {
    let metrics = &listener.metrics;
    let limits = listener.config.limits;
    let handshake = Box::pin(acceptor.accept(stream));
    let tls = match tokio::time::timeout(limits.header_timeout, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            tracing::debug!(client = %connection.client, %error, "TLS handshake failed");
            metrics.tls_handshake_errors.inc();
            metrics.reject(Rejection::Tls);
            return;
        }
        Err(_elapsed) => {
            metrics.tls_handshake_errors.inc();
            metrics.reject(Rejection::Tls);
            return;
        }
    };
    let session = tls.get_ref().1;
    let negotiated = match session.alpn_protocol() {
        Some(ALPN_H2) => Negotiated::Http2,
        _ => Negotiated::Http1,
    };
    connection.tls_version = session.protocol_version().map(|version| match version {
        rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
        rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
        _ => "TLS",
    });
    connection.sni = session.server_name().map(Arc::from);
    connection.client_cert = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(crate::tls::certificate_subject)
        .map(Arc::from);
    match listener.config.protocol {
        Protocol::Tls => Box::pin(l4::serve(tls, &connection, listener)).await,
        _ if negotiated == Negotiated::Http1 => {
            let (tls, verdict) = framing::guard(tls);
            connection.framing = Some(verdict);
            let connection = Arc::new(connection);
            Box::pin(l7::serve(tls, connection, listener, negotiated, shutdown)).await;
        }
        _ => {
            let connection = Arc::new(connection);
            Box::pin(l7::serve(tls, connection, listener, negotiated, shutdown)).await;
        }
    }
}
