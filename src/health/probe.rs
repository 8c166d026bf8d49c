//! One active probe: a TCP connect, or an HTTP GET whose status must fall in a range.

use crate::config::HealthCheckKind;
use bytes::Bytes;
use http::{header, Request};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;

/// Probes `address` once; `Err` says why it failed (for debug logs).
pub async fn probe(
    kind: &HealthCheckKind,
    address: SocketAddr,
    timeout: Duration,
) -> Result<(), String> {
    match tokio::time::timeout(timeout, run(kind, address)).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

async fn run(kind: &HealthCheckKind, address: SocketAddr) -> Result<(), String> {
    match kind {
        HealthCheckKind::None => Ok(()),
        HealthCheckKind::Tcp => TcpStream::connect(address)
            .await
            .map(drop)
            .map_err(|error| format!("connect: {error}")),
        HealthCheckKind::Http {
            path,
            host,
            expect_status,
        } => {
            let stream = TcpStream::connect(address)
                .await
                .map_err(|error| format!("connect: {error}"))?;
            let _ = stream.set_nodelay(true);
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|error| format!("handshake: {error}"))?;
            tokio::spawn(connection);
            let host = host.clone().unwrap_or_else(|| address.to_string());
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
    }
}
