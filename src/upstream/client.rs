//! The pooled upstream HTTP/1.1 client of a pool, and the request body it sends.

use crate::config::{Timeouts, UpstreamTls};
use bytes::Bytes;
use http::Uri;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::Histogram;
use rustls::pki_types::ServerName;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tower_service::Service;

/// A keep-alive HTTP/1.1 client; cheap to clone (its pool is shared).
pub type UpstreamClient = Client<TimedConnector, UpstreamBody>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// TLS towards a pool's backends: the client configuration and the name to verify.
#[derive(Clone)]
struct UpstreamTlsConnector {
    connector: tokio_rustls::TlsConnector,
    /// `tls.sni`; without it the backend's IP address is verified.
    server_name: Option<ServerName<'static>>,
}

/// hyper-util's TCP connector, timing each new connection into
/// `gatehouse_upstream_connect_duration_seconds` and wrapping it in TLS for pools with `tls`.
/// Pooled connections skip it entirely.
#[derive(Clone)]
pub struct TimedConnector {
    inner: HttpConnector,
    connect_duration: Histogram,
    tls: Option<UpstreamTlsConnector>,
}

/// A connection to a backend: plain TCP or TLS over TCP.
pub enum UpstreamStream {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>),
}

impl hyper::rt::Read for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(io) => Pin::new(io).poll_read(cx, buf),
            UpstreamStream::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(io) => Pin::new(io).poll_write(cx, buf),
            UpstreamStream::Tls(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            UpstreamStream::Tls(io) => Pin::new(io.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Plain(io) => io.is_write_vectored(),
            UpstreamStream::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(io) => Pin::new(io).poll_flush(cx),
            UpstreamStream::Tls(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(io) => Pin::new(io).poll_shutdown(cx),
            UpstreamStream::Tls(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        match self {
            UpstreamStream::Plain(io) => io.connected(),
            UpstreamStream::Tls(_) => Connected::new(),
        }
    }
}

type ConnectFuture = Pin<Box<dyn Future<Output = Result<UpstreamStream, BoxError>> + Send>>;

impl Service<Uri> for TimedConnector {
    type Response = UpstreamStream;
    type Error = BoxError;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, destination: Uri) -> Self::Future {
        let started = Instant::now();
        let host = destination.host().map(str::to_string);
        let connecting = self.inner.call(destination);
        let histogram = self.connect_duration.clone();
        let tls = self.tls.clone();
        Box::pin(async move {
            let connected = connecting.await?;
            histogram.observe(started.elapsed().as_secs_f64());
            let Some(tls) = tls else {
                return Ok(UpstreamStream::Plain(connected));
            };
            let server_name = match tls.server_name {
                Some(name) => name,
                None => {
                    let host = host.unwrap_or_default();
                    let ip: std::net::IpAddr = host
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse()
                        .map_err(|_| format!("no TLS server name for {host}"))?;
                    ServerName::IpAddress(ip.into())
                }
            };
            let stream = tls
                .connector
                .connect(server_name, connected.into_inner())
                .await?;
            Ok(UpstreamStream::Tls(Box::new(TokioIo::new(stream))))
        })
    }
}

/// The CA bundle used when a pool's `tls` names no `ca` (Debian's system bundle).
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

fn tls_connector(tls: &UpstreamTls) -> Result<UpstreamTlsConnector, String> {
    let ca = tls
        .ca
        .clone()
        .unwrap_or_else(|| std::path::PathBuf::from(SYSTEM_CA_BUNDLE));
    let roots = crate::tls::load_roots(&ca)?;
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![crate::tls::ALPN_HTTP1.to_vec()];
    let server_name = match &tls.sni {
        Some(sni) => Some(
            ServerName::try_from(sni.clone()).map_err(|_| format!("invalid tls.sni \"{sni}\""))?,
        ),
        None => None,
    };
    Ok(UpstreamTlsConnector {
        connector: tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)),
        server_name,
    })
}

/// Idle upstream connections kept per backend.
const MAX_IDLE_PER_BACKEND: usize = 256;

/// Builds the client for a pool's timeouts (and TLS towards its backends, when set).
/// Connections idle longer than `idle` are closed; new connections are timed into
/// `connect_duration`.
pub fn build(
    timeouts: &Timeouts,
    tls: Option<&UpstreamTls>,
    connect_duration: Histogram,
) -> Result<UpstreamClient, String> {
    let tls = tls.map(tls_connector).transpose()?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(timeouts.connect));
    connector.set_keepalive(Some(std::time::Duration::from_secs(60)));
    connector.enforce_http(false);
    Ok(Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(timeouts.idle)
        .pool_max_idle_per_host(MAX_IDLE_PER_BACKEND)
        .build(TimedConnector {
            inner: connector,
            connect_duration,
            tls,
        }))
}

/// Sends one request on a fresh connection that starts with a PROXY `header` (a pool with
/// `send_proxy_protocol`: the header names one client, so such connections are never shared
/// or pooled). Errors say whether nothing was sent (so a retry is safe), whether it was a
/// timeout, and what happened.
pub async fn send_with_proxy_header(
    address: std::net::SocketAddr,
    header: &[u8],
    connect_timeout: std::time::Duration,
    mut request: http::Request<UpstreamBody>,
) -> Result<http::Response<Incoming>, (bool, bool, String)> {
    use tokio::io::AsyncWriteExt;
    // A bare connection writes the URI as given: send origin-form, as the pooled client does.
    let origin_form = request
        .uri()
        .path_and_query()
        .map_or_else(|| Uri::from_static("/"), |path| Uri::from(path.clone()));
    *request.uri_mut() = origin_form;
    let mut stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(address)).await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return Err((true, false, format!("connect: {error}"))),
        Err(_) => return Err((true, true, "connect timed out".to_string())),
    };
    let _ = stream.set_nodelay(true);
    stream
        .write_all(header)
        .await
        .map_err(|error| (true, false, format!("PROXY header: {error}")))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| (true, false, format!("handshake: {error}")))?;
    tokio::spawn(connection.with_upgrades());
    sender
        .send_request(request)
        .await
        .map_err(|error| (false, false, format!("request: {error}")))
}

/// The body of a request to a backend: the client's streamed body (or none).
///
/// If the request is dropped before its body was ever polled — the connect to the backend
/// failed, so nothing was sent — the untouched client body is handed back through a oneshot
/// channel, so the request can be retried on another backend without buffering it.
#[derive(Debug)]
pub struct UpstreamBody {
    body: Option<Incoming>,
    give_back: Option<oneshot::Sender<Incoming>>,
    /// Bytes sent so far, when the access log wants them.
    sent: Option<Arc<AtomicU64>>,
    /// Bytes still allowed by the route's `max_body_bytes`.
    allowance: Option<u64>,
}

/// The client's body grew past the route's `max_body_bytes` while streaming.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than the route's max_body_bytes")]
pub struct BodyTooLarge;

impl UpstreamBody {
    /// No body.
    pub fn empty() -> Self {
        UpstreamBody {
            body: None,
            give_back: None,
            sent: None,
            allowance: None,
        }
    }

    /// Fails the stream once more than `limit` bytes went through (None: unlimited).
    pub fn limited(mut self, limit: Option<u64>) -> Self {
        self.allowance = limit;
        self
    }

    /// Streams `body` (adding the bytes sent to `sent`); the receiver gets it back if it is
    /// dropped unpolled.
    pub fn reclaimable(
        body: Incoming,
        sent: Option<Arc<AtomicU64>>,
    ) -> (Self, oneshot::Receiver<Incoming>) {
        let (give_back, reclaim) = oneshot::channel();
        (
            UpstreamBody {
                body: Some(body),
                give_back: Some(give_back),
                sent,
                allowance: None,
            },
            reclaim,
        )
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        this.give_back = None;
        let polled = match &mut this.body {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        };
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                let length = data.len() as u64;
                if let Some(sent) = &this.sent {
                    sent.fetch_add(length, Ordering::Relaxed);
                }
                if let Some(allowance) = &mut this.allowance {
                    match allowance.checked_sub(length) {
                        Some(left) => *allowance = left,
                        None => return Poll::Ready(Some(Err(Box::new(BodyTooLarge)))),
                    }
                }
            }
        }
        polled.map(|frame| frame.map(|result| result.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if let (Some(give_back), Some(body)) = (self.give_back.take(), self.body.take()) {
            let _ = give_back.send(body);
        }
    }
}
