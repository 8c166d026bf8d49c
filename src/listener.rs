//! Listening sockets and the accept loop: bind with the right socket options, refuse what is
//! over the connection limit, terminate TLS, and hand each connection to the proxy.
//!
//! A listener reads its settings (limits, TLS acceptor, routes) from the published table at
//! every accept, so a reload changes them for new connections without rebinding the socket.

use crate::config::Protocol;
use crate::io::{ByteCounters, Observed};
use crate::metrics::Rejection;
use crate::proxy::l4;
use crate::proxy::l7::{self, Negotiated};
use crate::proxy::park;
use crate::proxy_protocol::{self, Prefixed};
use crate::tls::ALPN_H2;
use crate::upstream::publisher::SharedTable;
use crate::upstream::table::ListenerTable;
use crate::waiting_room::{Guest, WaitingRoom};
use crate::workers::{self, Workers};
use bytes::Bytes;
use socket2::{Domain, Protocol as SocketProtocol, SockRef, Socket, TcpKeepalive, Type};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Pending connections the kernel may queue for us.
const BACKLOG: i32 = 4096;
/// TCP keepalive probe delay on client connections (detects vanished clients).
const KEEPALIVE: Duration = Duration::from_secs(60);
/// Pause after an accept error such as EMFILE, so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// At most one log line per this long about accept errors that go on (they come twenty
/// times a second while the process is out of file descriptors).
const ACCEPT_ERROR_LOG_PERIOD: Duration = Duration::from_secs(10);

/// Binds `address` with SO_REUSEADDR (and SO_REUSEPORT when asked), non-blocking, ready to
/// be registered with each worker's runtime.
pub fn bind(address: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
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
    Ok(socket.into())
}

/// A bound listener and what its accept loops need.
pub struct Listener {
    pub name: Arc<str>,
    pub socket: std::net::TcpListener,
    pub table: SharedTable,
    /// Cancelled to stop accepting and ask open connections to finish.
    pub shutdown: CancellationToken,
    /// Tracks every connection and tunnel, so shutdown can wait for them.
    pub tasks: TaskTracker,
}

impl Listener {
    /// Starts an accept loop on every worker, each on its own handle of the one socket (the
    /// kernel gives a new connection to whichever worker accepts first, so an idle worker
    /// takes it), until `shutdown` is cancelled. The connection limits count across all of
    /// them.
    pub fn start(self, workers: &Workers) {
        let context = Arc::new(l7::ListenerContext {
            name: self.name.clone(),
            table: self.table.clone(),
            tunnels: self.tasks.clone(),
        });
        let counts = Arc::new(Counts {
            open: AtomicUsize::new(0),
            per_client: PerClient::new(),
        });
        for handle in workers.handles() {
            let socket = match self.socket.try_clone() {
                Ok(socket) => socket,
                Err(error) => {
                    tracing::error!(listener = %self.name, %error, "cannot share the listening socket with a worker; it accepts on fewer workers");
                    continue;
                }
            };
            let accept = AcceptLoop {
                context: context.clone(),
                counts: counts.clone(),
                shutdown: self.shutdown.clone(),
            };
            self.tasks.spawn_on(accept.run(socket), handle);
        }
    }
}

/// One worker's accept loop of a listener: its name, table and task tracker are the
/// context's.
struct AcceptLoop {
    context: Arc<l7::ListenerContext>,
    counts: Arc<Counts>,
    shutdown: CancellationToken,
}

impl AcceptLoop {
    /// Accepts on `socket` (registered with this worker's runtime) until shutdown; the
    /// connections accepted here wait in this worker's room and are served by its tasks.
    async fn run(self, socket: std::net::TcpListener) {
        let socket = match TcpListener::from_std(socket) {
            Ok(socket) => socket,
            Err(error) => {
                tracing::error!(listener = %self.context.name, %error, "cannot accept on a worker");
                return;
            }
        };
        let room = match WaitingRoom::open(self.shutdown.clone(), &self.context.tunnels) {
            Ok(room) => Some(room),
            Err(error) => {
                tracing::error!(listener = %self.context.name, %error, "no waiting room: every connection waits in a task of its own");
                None
            }
        };
        let gate = Arc::new(Gate {
            counts: self.counts,
            shutdown: self.shutdown,
            room,
        });
        let mut accept_errors = AcceptErrors::default();
        loop {
            let accepted = tokio::select! {
                accepted = socket.accept() => accepted,
                () = gate.shutdown.cancelled() => break,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    if let Some(failures) = accept_errors.failed(std::time::Instant::now()) {
                        tracing::warn!(listener = %self.context.name, %error, failures, "accept failed");
                    }
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            };
            let table = self.context.table.load_full();
            let Some(listener) = table.listener(&self.context.name).cloned() else {
                continue;
            };
            listener.metrics.connections_total.inc();
            // Counted before the check, so workers accepting at once cannot both take the
            // last place; `Client` gives it back when the connection ends.
            let open = gate.counts.open.fetch_add(1, Ordering::Relaxed);
            if open >= listener.config.limits.max_connections {
                gate.counts.open.fetch_sub(1, Ordering::Relaxed);
                listener.metrics.reject(Rejection::MaxConnections);
                drop(stream);
                continue;
            }
            let local = stream.local_addr().unwrap_or(peer);
            let speaks_http = listener.config.protocol.is_http();
            let connection = l7::Connection::new(self.context.clone(), peer, local, speaks_http);
            let mut client = Client::new(connection, listener, gate.clone());
            let proxy_protocol = client.listener.config.proxy_protocol;
            // The client's own address is known now, unless a PROXY header will give it.
            if !proxy_protocol && !client.admit() {
                continue;
            }
            // HTTP clients (and PROXY protocol senders) speak first: until they do, the
            // connection waits in the room, costing its seat and not a task.
            match &gate.room {
                Some(room) if (speaks_http || proxy_protocol) && !has_spoken(&stream) => {
                    let deadline = client.head_deadline;
                    room.seat(stream, deadline, client);
                }
                _ => {
                    let stream = client_stream(stream, &client.listener);
                    self.context.tunnels.spawn(serve_connection(stream, client));
                }
            }
        }
        tracing::info!(listener = %self.context.name, worker = workers::current(), "stopped accepting");
    }
}

/// Paces the log lines about failed accepts: the first at once, then at most one per
/// [`ACCEPT_ERROR_LOG_PERIOD`], saying how many failed since the last.
#[derive(Default)]
struct AcceptErrors {
    unlogged: u64,
    logged_at: Option<std::time::Instant>,
}

impl AcceptErrors {
    /// An accept failed `now`: the number of failures to log, if a line is due.
    #[cold]
    fn failed(&mut self, now: std::time::Instant) -> Option<u64> {
        self.unlogged += 1;
        let due = self
            .logged_at
            .is_none_or(|at| now.duration_since(at) >= ACCEPT_ERROR_LOG_PERIOD);
        if !due {
            return None;
        }
        self.logged_at = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// What the connections one worker accepted on a listener share.
struct Gate {
    counts: Arc<Counts>,
    /// Cancelled to stop accepting and ask open connections to finish.
    shutdown: CancellationToken,
    /// Where this worker's connections wait for their client to speak (none if it could not
    /// be opened).
    room: Option<WaitingRoom>,
}

/// A listener's open connections, counted across its workers for the connection limits.
struct Counts {
    /// Connections open now, for `max_connections`.
    open: AtomicUsize,
    per_client: PerClient,
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

    /// Counts a connection from `client` in its slot, which [`PerClient::release`] gives
    /// back; `Err` when it already has `cap` open. With no cap (0) nothing is counted.
    fn admit(&self, client: std::net::IpAddr, cap: u32) -> Result<Option<u16>, ()> {
        if cap == 0 {
            return Ok(None);
        }
        let hash = crate::balancer::ip_hash(client) as usize;
        let index = u16::try_from(hash & (Self::SLOTS - 1)).map_err(|_| ())?;
        let slot = &self.slots[usize::from(index)];
        if slot.fetch_add(1, Ordering::Relaxed) >= cap {
            slot.fetch_sub(1, Ordering::Relaxed);
            return Err(());
        }
        Ok(Some(index))
    }

    /// Uncounts a connection counted in slot `index`.
    fn release(&self, index: u16) {
        if let Some(slot) = self.slots.get(usize::from(index)) {
            slot.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A client connection's own state for its whole life, boxed once when it is accepted: the
/// task serving it holds this box, and so does the waiting room while it waits. It keeps
/// the listener's counts and gauges right however the connection ends.
struct Client {
    connection: Arc<l7::Connection>,
    /// The listener as it was configured when the connection was accepted.
    listener: Arc<ListenerTable>,
    gate: Arc<Gate>,
    /// Its slot in the per-client counts, when the listener caps them.
    client_slot: Option<u16>,
    /// When the head of the client's next request is due: the first one's counted from
    /// accept (waiting for the first byte included), a later one's from when the connection
    /// went quiet.
    head_deadline: tokio::time::Instant,
    /// Waiting in the room between two requests: counted as idle.
    parked: bool,
}

impl Client {
    /// A new connection, already counted in `gate`'s open connections (which it uncounts when
    /// dropped); its first request head is due `header_timeout` from now.
    fn new(connection: l7::Connection, listener: Arc<ListenerTable>, gate: Arc<Gate>) -> Box<Self> {
        listener.metrics.connections_active.inc();
        let head_deadline = tokio::time::Instant::now() + listener.config.limits.header_timeout;
        Box::new(Client {
            connection: Arc::new(connection),
            listener,
            gate,
            client_slot: None,
            head_deadline,
            parked: false,
        })
    }

    /// The connection's facts, to fill in before its first request. Nothing shares them
    /// yet; if something did, the connection closes (`None`).
    fn facts(&mut self) -> Option<&mut l7::Connection> {
        Arc::get_mut(&mut self.connection)
    }

    /// Marks the connection parked until `head_deadline` (counted idle).
    fn park(&mut self, head_deadline: tokio::time::Instant) {
        self.head_deadline = head_deadline;
        if !self.parked {
            self.parked = true;
            self.listener.metrics.connections_idle.inc();
        }
    }

    /// Ends a parked spell; whether the connection was parked.
    fn unpark(&mut self) -> bool {
        let parked = std::mem::take(&mut self.parked);
        if parked {
            self.listener.metrics.connections_idle.dec();
        }
        parked
    }

    /// Applies the per-client cap, the rate limit of TCP listeners and the address ACL (which
    /// HTTP listeners answer with 403); false, counted, when the connection is refused.
    fn admit(&mut self) -> bool {
        let listener = self.listener.clone();
        let config = &listener.config;
        let metrics = &listener.metrics;
        let address = self.connection.client.ip();
        let client = config.limits.client_key(address);
        let cap = config.limits.max_connections_per_client;
        let Ok(slot) = self.gate.counts.per_client.admit(client, cap) else {
            metrics.reject(Rejection::MaxConnections);
            return false;
        };
        self.client_slot = slot;
        let limited = !config.protocol.is_http()
            && listener
                .rate_limiter
                .as_ref()
                .is_some_and(|limiter| limiter.check(client).is_err());
        if limited {
            metrics.reject(Rejection::RateLimit);
            return false;
        }
        if !listener.admits(address) {
            if !config.protocol.is_http() {
                metrics.reject(Rejection::Acl);
                return false;
            }
            let Some(facts) = self.facts() else {
                return false;
            };
            facts.denied = true;
        }
        true
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.unpark();
        if let Some(slot) = self.client_slot {
            self.gate.counts.per_client.release(slot);
        }
        self.gate.counts.open.fetch_sub(1, Ordering::Relaxed);
        self.listener.metrics.connections_active.dec();
    }
}

impl Guest for Client {
    fn spoke(mut self: Box<Self>, stream: TcpStream) {
        let stream = client_stream(stream, &self.listener);
        let tasks = self.connection.listener.tunnels.clone();
        if !self.unpark() {
            tasks.spawn(serve_connection(stream, self));
            return;
        }
        tasks.spawn(serve_plain_http(stream, self, Negotiated::Http1));
    }

    fn late(mut self: Box<Self>, stream: TcpStream) {
        // Off the idle gauge before it is answered.
        let fresh = !self.unpark();
        let listener = &self.listener;
        let metrics = &listener.metrics;
        if fresh && listener.config.proxy_protocol {
            metrics.reject(Rejection::ProxyProtocol);
        } else if fresh && listener.tls.is_some() {
            metrics.tls_handshake_errors.inc();
            metrics.reject(Rejection::Tls);
        } else {
            let stream = client_stream(stream, listener);
            let tasks = self.connection.listener.tunnels.clone();
            tasks.spawn(async move { l7::answer_late_request(stream, &self.listener).await });
        }
    }
}

/// Whether the client of a just-accepted connection has sent bytes already: a TLS client's
/// hello or an HTTP request usually arrives with, or just after, the handshake's last ACK,
/// and such a connection is served at once instead of being seated in the waiting room only
/// to leave it on the room's next turn (four `epoll_ctl` calls and two waits fewer). A
/// connection closed or reset without a byte (a TCP health check, a port scan) still goes to
/// the room, which closes it without a task and counts no failed handshake. One
/// `recv(MSG_PEEK)` per connection.
fn has_spoken(stream: &TcpStream) -> bool {
    let mut first = [std::mem::MaybeUninit::<u8>::uninit()];
    matches!(SockRef::from(stream).peek(&mut first), Ok(read) if read > 0)
}

/// The stream of a client connection as the listener reads it.
type ClientStream = Prefixed<Observed<TcpStream, ByteCounters>>;

/// `stream`, its bytes counted on the listener's metrics.
fn client_stream(stream: TcpStream, listener: &ListenerTable) -> ClientStream {
    let counters = ByteCounters {
        received: listener.metrics.bytes_received.clone(),
        sent: listener.metrics.bytes_sent.clone(),
    };
    Prefixed::new(Bytes::new(), Observed::new(stream, counters))
}

/// Serves a connection once its client has spoken (or at once, for TCP pass-through).
async fn serve_connection(mut stream: ClientStream, mut client: Box<Client>) {
    let socket = stream.get_ref().get_ref();
    let _ = socket.set_nodelay(true);
    let _ = SockRef::from(socket).set_tcp_keepalive(&TcpKeepalive::new().with_time(KEEPALIVE));
    if client.listener.config.proxy_protocol {
        let timeout = client.listener.config.limits.header_timeout;
        // Boxed: the state of every other connection does not make room for it.
        match Box::pin(proxy_protocol::read_header(&mut stream, timeout)).await {
            Ok((header, rest)) => {
                if let Some((source, destination)) = header.addresses {
                    let Some(facts) = client.facts() else {
                        return;
                    };
                    facts.set_addresses(source, destination);
                }
                stream.set_prefix(rest);
            }
            Err(error) => {
                tracing::debug!(peer = %client.connection.client, %error, "refused: bad PROXY protocol header");
                client.listener.metrics.reject(Rejection::ProxyProtocol);
                return;
            }
        }
        if !client.admit() {
            return;
        }
    }
    serve_protocol(stream, client).await;
}

/// The future that serves a connection once its client has spoken (or at once for TCP):
/// TLS, plain HTTP or TCP pass-through. Chosen here and boxed alone, so a connection holds
/// the room of the branch it takes (≈ 1 KB for plain HTTP), not of the largest (TLS).
fn serve_protocol(
    stream: ClientStream,
    client: Box<Client>,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    match (&client.listener.tls, client.listener.config.protocol) {
        (Some(_), _) => Box::pin(serve_tls(stream, client)),
        (None, Protocol::Tcp) => {
            Box::pin(async move { l4::serve(stream, &client.connection, &client.listener).await })
        }
        (None, _) => Box::pin(serve_plain_http(stream, client, Negotiated::Detect)),
    }
}

/// Plain HTTP on a connection whose client has spoken (first, or again after waiting in the
/// room).
fn serve_plain_http(
    stream: ClientStream,
    client: Box<Client>,
    negotiated: Negotiated,
) -> impl Future<Output = ()> + Send {
    let head_deadline = client.head_deadline;
    serve_http(
        park::Watched::new(stream),
        client,
        negotiated,
        Some(head_deadline),
    )
}

/// Plain HTTP on a connection until it parks, when it is seated in the waiting room (and
/// served again by a new task when its client speaks), or ends.
async fn serve_http(
    mut stream: park::Watched<ClientStream>,
    mut client: Box<Client>,
    mut negotiated: Negotiated,
    mut head_deadline: Option<tokio::time::Instant>,
) {
    loop {
        let served = l7::serve(
            stream,
            client.connection.clone(),
            &client.listener,
            negotiated,
            &client.gate.shutdown,
            head_deadline,
        )
        .await;
        let l7::Served::Parked {
            stream: mut parked,
            head_deadline: due,
            quiet_since,
        } = served
        else {
            return;
        };
        let to_room = quiet_since + park::CHECK_PERIOD;
        if client.gate.room.is_some() && to_room < due {
            // Quiet for a moment: the client may well come back before it is worth moving
            // the connection to the room.
            let waited = l7::wait_idle(
                &mut parked,
                to_room,
                &client.listener,
                &client.gate.shutdown,
            );
            match waited.await {
                park::Wait::Spoke => {
                    stream = parked;
                    negotiated = Negotiated::Http1;
                    head_deadline = Some(due);
                    continue;
                }
                park::Wait::Ended => return,
                park::Wait::Late => {}
            }
        }
        if let Some(room) = client.gate.room.clone() {
            match parked.into_idle() {
                // Nothing read is waiting to be replayed: only the socket needs to wait.
                Ok(idle) if idle.prefix_len() == 0 => {
                    let socket = idle.into_parts().1.into_inner();
                    client.park(due);
                    room.seat(socket, due, client);
                    return;
                }
                Ok(idle) => parked = park::Watched::new(idle),
                Err(watched) => parked = watched,
            }
        }
        if !l7::wait_parked(&mut parked, due, &client.listener, &client.gate.shutdown).await {
            return;
        }
        stream = parked;
        negotiated = Negotiated::Http1;
        head_deadline = Some(due);
    }
}

/// A TLS connection once its client has spoken: handshake, then HTTP (by ALPN) or TCP
/// pass-through. A function of its own, so its state (the handshake, the TLS stream's box)
/// is no part of a plain connection's. Its parked connections wait in this task (their TLS
/// state with them).
async fn serve_tls(stream: ClientStream, mut client: Box<Client>) {
    let listener = client.listener.clone();
    let Some(acceptor) = listener.tls.as_ref() else {
        return;
    };
    let metrics = &listener.metrics;
    let limits = listener.config.limits;
    let handshake = Box::pin(acceptor.accept(stream));
    // Boxed once: moved on into the serve loop, the TLS stream (≈ 2 KB) would otherwise
    // take a slot in this task's state and several in the loop's, for the connection's life.
    let tls = match tokio::time::timeout(limits.header_timeout, handshake).await {
        Ok(Ok(tls)) => Box::new(tls),
        Ok(Err(error)) => {
            tracing::debug!(client = %client.connection.client, %error, "TLS handshake failed");
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
    let Some(facts) = client.facts() else {
        return;
    };
    facts.tls = Some(Box::new(l7::TlsFacts {
        version: session.protocol_version().map(|version| match version {
            rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
            rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
            _ => "TLS",
        }),
        sni: session.server_name().map(Arc::from),
        client_cert: session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(crate::tls::certificate_subject)
            .map(Arc::from),
    }));
    if negotiated == Negotiated::Http2 {
        // HTTP/2 frames its requests itself: no HTTP/1 framing check.
        facts.checks_framing = false;
    }
    let connection = client.connection.clone();
    let shutdown = client.gate.shutdown.clone();
    if listener.config.protocol == Protocol::Tls {
        Box::pin(l4::serve(tls, &connection, &listener)).await;
    } else {
        let served = l7::serve_all(tls, connection, &listener, negotiated, shutdown);
        Box::pin(served).await;
    }
    drop(client);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Out of file descriptors, accepts fail twenty times a second: one line, then one per
    /// period with the count.
    #[test]
    fn failed_accepts_are_logged_once_per_period_with_their_count() {
        let mut errors = AcceptErrors::default();
        let start = std::time::Instant::now();
        assert_eq!(errors.failed(start), Some(1));
        for tick in 1..200 {
            assert_eq!(errors.failed(start + ACCEPT_ERROR_PAUSE * tick), None);
        }
        assert_eq!(errors.failed(start + ACCEPT_ERROR_LOG_PERIOD), Some(200));
        assert_eq!(errors.failed(start + ACCEPT_ERROR_LOG_PERIOD), None);
    }

    /// Waits, within a deadline, for `has_spoken` to say yes.
    async fn spoken_soon(stream: &TcpStream) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if has_spoken(stream) {
                return true;
            }
            tokio::task::yield_now().await;
        }
        false
    }

    /// A connection is served at once when its client has sent bytes, and waits in the room
    /// while it is silent or closed without a byte; peeking takes nothing from what the
    /// server then reads.
    #[tokio::test]
    async fn a_connection_has_spoken_once_bytes_arrived_not_when_it_closed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();

        let mut talker = TcpStream::connect(address).await.unwrap();
        let (mut served, _) = listener.accept().await.unwrap();
        assert!(!has_spoken(&served), "silent so far");
        talker.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert!(spoken_soon(&served).await);
        let mut head = [0u8; 16];
        served.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"GET / HTTP/1.1\r\n");

        let closer = TcpStream::connect(address).await.unwrap();
        let (served, _) = listener.accept().await.unwrap();
        drop(closer);
        let mut byte = [0u8; 1];
        let peeked = tokio::time::timeout(Duration::from_secs(5), served.peek(&mut byte)).await;
        assert_eq!(peeked.unwrap().unwrap(), 0, "the close arrived");
        assert!(!has_spoken(&served), "closed without a byte");
    }
}
