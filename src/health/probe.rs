//! One active probe: a connection opened as the pool's traffic opens one (its PROXY header,
//! its TLS), then nothing more (`tcp`) or an HTTP GET whose status must fall in a range.

use crate::config::{HealthCheckKind, PoolConfig};
use crate::metrics::Metrics;
use crate::proxy_protocol;
use crate::upstream::connector::Connector;
use bytes::Bytes;
use http::{header, Request};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How a pool's backends are reached, as its traffic reaches them: the pool's connector
/// (connect timeout, TLS with its CA and SNI) and the PROXY header a check's connection opens
/// with. Probed otherwise, a backend that speaks only TLS, or wants the header first, fails
/// every check while traffic would pass.
#[derive(Clone)]
pub struct Reach {
    connector: Arc<Connector>,
    proxy_header: Option<&'static [u8]>,
    /// The Host an HTTP check sends when the pool names none: the TLS server name when
    /// the pool has one (a name-based HTTPS backend), else the backend's address.
    tls_name: Option<String>,
}

impl Reach {
    /// How `pool`'s backends are reached; fails when its TLS settings cannot be loaded.
    pub fn for_pool(pool: &PoolConfig, metrics: &Metrics) -> Result<Self, String> {
        Ok(Reach {
            connector: Arc::new(Connector::for_pool(pool, metrics)?),
            proxy_header: pool.send_proxy_protocol.map(proxy_protocol::encode_local),
            tls_name: pool.tls.as_ref().and_then(|tls| tls.sni.clone()),
        })
    }
}

/// Probes `address` once by `reach` (a pool whose TLS settings could not be loaded fails
/// every probe, saying why); `Err` says why it failed (for logs).
pub async fn probe(
    kind: &HealthCheckKind,
    reach: &Result<Reach, String>,
    address: SocketAddr,
    timeout: Duration,
) -> Result<(), String> {
    let reach = reach.as_ref().map_err(Clone::clone)?;
    match tokio::time::timeout(timeout, run(kind, reach, address)).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

async fn run(kind: &HealthCheckKind, reach: &Reach, address: SocketAddr) -> Result<(), String> {
    if *kind == HealthCheckKind::None {
        return Ok(());
    }
    let stream = reach
        .connector
        .connect(address, reach.proxy_header)
        .await
        .map_err(|error| error.to_string())?;
    let HealthCheckKind::Http {
        path,
        host,
        expect_status,
    } = kind
    else {
        return Ok(());
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| format!("handshake: {error}"))?;
    tokio::spawn(connection);
    let host = host
        .clone()
        .or_else(|| reach.tls_name.clone())
        .unwrap_or_else(|| address.to_string());
    let request = Request::get(path.as_str())
        .header(header::HOST, host)
        .header(header::USER_AGENT, "gatehouse-health-check")
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|error| format!("request: {error}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|error| format!("request: {error}"))?;
    let status = response.status().as_u16();
    if expect_status.contains(status) {
        Ok(())
    } else {
        Err(format!("status {status}, expected {expect_status}"))
    }
}
