//! Opening a connection to a backend: TCP (no Nagle, keep-alive probes), an optional PROXY
//! protocol header, and TLS for pools with `tls`, all within the pool's connect timeout.

use crate::config::{PoolConfig, UpstreamTls};
use crate::metrics::Metrics;
use prometheus::Histogram;
use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// The CA bundle used when a pool's `tls` names no `ca` (Debian's system bundle).
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// How long the kernel waits on an idle upstream connection before it probes the peer.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// Why a connection could not be opened (nothing was sent to the backend).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out")]
    TimedOut,
    #[error("connect: {0}")]
    Io(#[source] std::io::Error),
    #[error("PROXY header: {0}")]
    ProxyHeader(#[source] std::io::Error),
    #[error("TLS to backend: {0}")]
    Tls(#[source] std::io::Error),
    #[error("no TLS server name: set the pool's tls.sni")]
    NoServerName,
}

/// TLS towards a pool's backends: the client configuration and the name to verify.
struct UpstreamTlsConnector {
    connector: tokio_rustls::TlsConnector,
    /// `tls.sni`; without it the backend's IP address is verified.
    server_name: Option<ServerName<'static>>,
}

/// Opens connections for one pool's settings (its connect timeout and TLS), timing each
/// into `gatehouse_upstream_connect_duration_seconds`.
pub struct Connector {
    connect_timeout: Duration,
    connect_duration: Histogram,
    tls: Option<UpstreamTlsConnector>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("connect_timeout", &self.connect_timeout)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Connector {
    /// The connector for `pool`'s `timeouts` and `tls`, timed into the pool's series of
    /// `gatehouse_upstream_connect_duration_seconds`; fails when the CA bundle or SNI is bad.
    pub fn for_pool(pool: &PoolConfig, metrics: &Metrics) -> Result<Self, String> {
        Ok(Connector {
            connect_timeout: pool.timeouts.connect,
            connect_duration: metrics
                .upstream_connect_duration
                .with_label_values(&[pool.name.as_str()]),
            tls: pool.tls.as_ref().map(tls_connector).transpose()?,
        })
    }

    /// Connects to `address`, writes `proxy_header` first when given, then speaks TLS if the
    /// pool asks for it.
    pub async fn connect(
        &self,
        address: SocketAddr,
        proxy_header: Option<&[u8]>,
    ) -> Result<UpstreamStream, ConnectError> {
        let started = Instant::now();
        let connecting = async {
            let stream = TcpStream::connect(address)
                .await
                .map_err(ConnectError::Io)?;
            let _ = stream.set_nodelay(true);
            let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
            let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
            let mut stream = stream;
            if let Some(header) = proxy_header {
                stream
                    .write_all(header)
                    .await
                    .map_err(ConnectError::ProxyHeader)?;
            }
            let Some(tls) = &self.tls else {
                return Ok(UpstreamStream::Plain(stream));
            };
            let server_name = match &tls.server_name {
                Some(name) => name.clone(),
                None => ServerName::IpAddress(address.ip().into()),
            };
            let stream = tls
                .connector
                .connect(server_name, stream)
                .await
                .map_err(ConnectError::Tls)?;
            Ok(UpstreamStream::Tls(Box::new(stream)))
        };
        let stream = tokio::time::timeout(self.connect_timeout, connecting)
            .await
            .map_err(|_| ConnectError::TimedOut)??;
        self.connect_duration
            .observe(started.elapsed().as_secs_f64());
        Ok(stream)
    }
}

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
        connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        server_name,
    })
}

/// A connection to a backend: plain TCP or TLS over TCP.
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl UpstreamStream {
    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            UpstreamStream::Plain(stream) => stream,
            UpstreamStream::Tls(stream) => stream.get_ref().0,
        }
    }

    /// Whether TLS runs over the socket.
    pub fn is_tls(&self) -> bool {
        matches!(self, UpstreamStream::Tls(_))
    }
}

impl crate::io::ResetOnClose for UpstreamStream {
    fn reset_on_close(&self) {
        self.tcp().reset_on_close();
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(io) => Pin::new(io).poll_read(cx, buf),
            UpstreamStream::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
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
