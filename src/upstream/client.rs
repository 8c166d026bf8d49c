//! The pooled upstream HTTP/1.1 client of a pool.

use crate::config::Timeouts;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// A keep-alive HTTP/1.1 client; cheap to clone (its pool is shared).
pub type UpstreamClient = Client<HttpConnector, Incoming>;

/// Idle upstream connections kept per backend.
const MAX_IDLE_PER_BACKEND: usize = 256;

/// Builds the client for a pool's timeouts. Connections idle longer than `idle` are closed.
pub fn build(timeouts: &Timeouts) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(timeouts.connect));
    connector.set_keepalive(Some(std::time::Duration::from_secs(60)));
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(timeouts.idle)
        .pool_max_idle_per_host(MAX_IDLE_PER_BACKEND)
        .build(connector)
}
