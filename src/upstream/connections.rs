//! Keep-alive HTTP/1.1 connections to one backend.
//!
//! Idle connections wait in a bounded lock-free queue (no mutex, no hashing: each backend
//! of the table holds its own queue). A request takes one, and the response body hands it
//! back through its [`Lease`] once it was read to the end; a connection whose response was
//! cut short is closed instead. A request that a stale idle connection could not send comes
//! back untouched and goes out on the next connection, so a backend closing an idle
//! connection at the wrong moment never fails a request.

use super::body::{BodyTooLarge, UpstreamBody};
use super::connector::{ConnectError, Connector};
use crossbeam_queue::ArrayQueue;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Idle connections kept per backend; more are closed when their response ends.
const MAX_IDLE_PER_BACKEND: usize = 256;

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("HTTP handshake with backend: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("backend request: {0}")]
    Request(#[source] hyper::Error),
}

impl SendError {
    /// A connect or request timeout rather than a refusal or reset.
    pub fn is_timeout(&self) -> bool {
        match self {
            SendError::Connect(error) => matches!(error, ConnectError::TimedOut),
            SendError::Handshake(error) | SendError::Request(error) => error.is_timeout(),
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
        matches!(self, SendError::Request(error) if error.is_user()) && !self.is_body_too_large()
    }
}

/// A failed send: what went wrong, and the request itself when none of it was sent (so it
/// can go to another backend as it is, body included).
#[derive(Debug)]
pub struct Failed {
    pub error: SendError,
    pub unsent: Option<Request<UpstreamBody>>,
}

/// An idle connection and since when it has been idle.
struct Idle {
    sender: SendRequest<UpstreamBody>,
    since: Instant,
}

/// The keep-alive connections to one backend. Shared by every table that has the backend
/// at the same address with the same pool settings, so a reload keeps them warm.
pub struct BackendConnections {
    address: SocketAddr,
    connector: Arc<Connector>,
    idle: ArrayQueue<Idle>,
    idle_timeout: Duration,
}

impl std::fmt::Debug for BackendConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendConnections")
            .field("address", &self.address)
            .field("idle", &self.idle.len())
            .finish()
    }
}

/// The right to hand a connection back once its response body has been read to the end.
pub struct Lease {
    sender: SendRequest<UpstreamBody>,
    home: Arc<BackendConnections>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("address", &self.home.address)
            .finish()
    }
}

impl Lease {
    /// The response was read to its end: the connection may carry the next request.
    pub fn release(self) {
        if !self.sender.is_closed() {
            // A full queue drops (closes) the connection.
            let _ = self.home.idle.push(Idle {
                sender: self.sender,
                since: Instant::now(),
            });
        }
    }
}

impl BackendConnections {
    /// Connections to `address`, opened by `connector`, closed after `idle_timeout` unused.
    pub fn new(address: SocketAddr, connector: Arc<Connector>, idle_timeout: Duration) -> Self {
        BackendConnections {
            address,
            connector,
            idle: ArrayQueue::new(MAX_IDLE_PER_BACKEND),
            idle_timeout,
        }
    }

    /// Whether these connections serve `address` through `connector` (a reload may keep them).
    pub fn serves(&self, address: SocketAddr, connector: &Arc<Connector>) -> bool {
        self.address == address && Arc::ptr_eq(&self.connector, connector)
    }

    /// Sends `request` (origin-form URI, Host set) on an idle connection, or a new one when
    /// none is ready. With `proxy_header`, a new connection starting with that header carries
    /// this request alone (the header names one client) and is never reused.
    ///
    /// The lease comes back with the response unless the connection may not be reused.
    pub async fn send(
        self: &Arc<Self>,
        mut request: Request<UpstreamBody>,
        proxy_header: Option<&[u8]>,
    ) -> Result<(Response<Incoming>, Option<Lease>), Failed> {
        if proxy_header.is_none() {
            // Each idle connection is looked at once; a busy one goes back for later.
            for _ in 0..self.idle.len() {
                let Some(idle) = self.idle.pop() else { break };
                if idle.sender.is_closed() || idle.since.elapsed() >= self.idle_timeout {
                    continue;
                }
                if !idle.sender.is_ready() {
                    let _ = self.idle.push(idle);
                    continue;
                }
                let mut sender = idle.sender;
                match sender.try_send_request(request).await {
                    Ok(response) => {
                        let lease = Lease {
                            sender,
                            home: self.clone(),
                        };
                        return Ok((response, Some(lease)));
                    }
                    Err(mut error) => match error.take_message() {
                        Some(returned) => request = returned,
                        None => {
                            return Err(Failed {
                                error: SendError::Request(error.into_error()),
                                unsent: None,
                            })
                        }
                    },
                }
            }
        }
        // Opening a connection is the rare path: boxed, its large future (TCP, TLS, HTTP
        // handshake) does not weigh on every request's future.
        let mut sender = match Box::pin(self.open(proxy_header)).await {
            Ok(sender) => sender,
            Err(error) => {
                return Err(Failed {
                    error,
                    unsent: Some(request),
                })
            }
        };
        match sender.try_send_request(request).await {
            Ok(response) => {
                let lease = proxy_header.is_none().then(|| Lease {
                    sender,
                    home: self.clone(),
                });
                Ok((response, lease))
            }
            Err(mut error) => Err(Failed {
                unsent: error.take_message(),
                error: SendError::Request(error.into_error()),
            }),
        }
    }

    /// Opens a new connection (starting with `proxy_header`, if any) and its HTTP/1.1
    /// handshake; the connection's own task runs until it closes or is upgraded.
    async fn open(
        &self,
        proxy_header: Option<&[u8]>,
    ) -> Result<SendRequest<UpstreamBody>, SendError> {
        let stream = self.connector.connect(self.address, proxy_header).await?;
        let (sender, connection) = http1::Builder::new()
            .handshake(stream)
            .await
            .map_err(SendError::Handshake)?;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%error, "backend connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Closes connections idle for longer than the idle timeout, or already closed by the
    /// backend; the others stay (their order may change).
    pub fn close_expired(&self) {
        for _ in 0..self.idle.len() {
            let Some(idle) = self.idle.pop() else { break };
            if !idle.sender.is_closed() && idle.since.elapsed() < self.idle_timeout {
                let _ = self.idle.push(idle);
            }
        }
    }
}
