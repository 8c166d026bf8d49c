//! The TCP (layer 4) proxy: pick a backend from the same table as HTTP, connect (failing
//! over to another backend on connect failure), optionally send a PROXY header, then copy
//! both ways with correct half-close until both sides are done or the connection idles out.
//!
//! The copy ([`tunnel`], also used for upgraded HTTP connections) is a [`relay`]: a
//! direction holds a buffer (64 KiB for TCP) only while bytes are on their way, so an idle
//! tunnel holds none.
//!
//! [`relay`]: super::relay

use super::l7::Connection;
use crate::access_log::AccessRecord;
use crate::config::ProxyProtocolVersion;
use crate::io::{Observed, Observer, ResetOnClose, Written};
use crate::metrics::Rejection;
use crate::proxy_protocol;
use crate::upstream::backend::now_nanos;
use crate::upstream::table::ListenerTable;
use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Copy buffer per direction of a TCP connection.
const BUFFER: usize = 64 * 1024;

/// Proxies one client connection to a backend of the listener's pool.
pub async fn serve<I>(mut client: I, connection: &Connection, listener: &ListenerTable)
where
    I: AsyncRead + AsyncWrite + ResetOnClose + Unpin + Send,
{
    let started = Instant::now();
    let Some(target) = listener.pool_target() else {
        return;
    };
    let pool = &target.pool;
    let context = pool.pick_context(connection.client.ip(), None);
    let attempts = pool.config.retry_attempts.clamp(1, 10) as usize;
    let mut tried = [usize::MAX; 10];
    pool.retry_budget.deposit();
    let mut connected = None;
    // The last backend that failed, and how: for the access log.
    let mut failure: Option<(usize, String)> = None;
    for attempt in 0..attempts {
        let Some(index) = pool.select(&context, &tried[..attempt]) else {
            break;
        };
        if attempt > 0 {
            if !pool.retry_budget.withdraw() {
                break;
            }
            pool.retries.inc();
        }
        tried[attempt] = index;
        let backend = &pool.backends[index];
        let connect = tokio::time::timeout(
            pool.config.timeouts.connect,
            TcpStream::connect(backend.address),
        );
        match connect.await {
            Ok(Ok(stream)) => {
                pool.record_outcome(index, true);
                connected = Some((index, stream));
                break;
            }
            Ok(Err(error)) => {
                tracing::debug!(backend = %backend.name, %error, "L4 connect failed");
                pool.record_outcome(index, false);
                failure = Some((index, format!("connect: {error}")));
            }
            Err(_elapsed) => {
                tracing::debug!(backend = %backend.name, "L4 connect timed out");
                pool.record_outcome(index, false);
                failure = Some((index, "connect timed out".to_string()));
            }
        }
    }
    let Some((index, mut stream)) = connected else {
        if tried[0] == usize::MAX {
            listener.metrics.reject(Rejection::NoBackend);
        }
        if listener.access_log.enabled() {
            let (backend, error) = match failure {
                Some((index, error)) => (pool.backends[index].name.clone(), error),
                None => (String::new(), "no backend available".to_string()),
            };
            listener.access_log.log(AccessRecord {
                time: Some(SystemTime::now() - started.elapsed()),
                duration: started.elapsed(),
                backend,
                route: target.route.clone(),
                error: Some(error.into()),
                ..connection.access_record("tcp")
            });
        }
        return;
    };
    let backend = &pool.backends[index];
    let _ = stream.set_nodelay(true);
    if let Some(version) = pool.config.send_proxy_protocol {
        let header = match version {
            ProxyProtocolVersion::V1 => {
                proxy_protocol::encode_v1(connection.client, connection.local())
            }
            ProxyProtocolVersion::V2 => {
                proxy_protocol::encode_v2(connection.client, connection.local())
            }
        };
        if stream.write_all(&header).await.is_err() {
            return;
        }
    }
    let _in_flight = backend.stats.start();
    let tunneled = tunnel(&mut client, &mut stream, pool.config.timeouts.idle, BUFFER).await;
    if let TunnelEnd::IdledOut {
        client_stalled: true,
        ..
    } = tunneled.end
    {
        client.reset_on_close();
    }
    if listener.access_log.enabled() {
        listener.access_log.log(AccessRecord {
            time: Some(SystemTime::now() - started.elapsed()),
            bytes_in: tunneled.bytes_in,
            bytes_out: tunneled.bytes_out,
            duration: started.elapsed(),
            backend: backend.name.clone(),
            route: target.route.clone(),
            error: tunneled.error(),
            ..connection.access_record("tcp")
        });
    }
}

/// How a tunnel ended, and what it moved.
#[derive(Debug)]
pub struct Tunneled {
    /// Bytes written to the upstream (from the client).
    pub bytes_in: u64,
    /// Bytes written to the client (from the upstream).
    pub bytes_out: u64,
    /// Why it ended.
    pub end: TunnelEnd,
}

/// Why a tunnel ended.
#[derive(Debug)]
pub enum TunnelEnd {
    /// Both sides closed.
    Closed,
    /// A read or write on either side failed.
    Failed(std::io::Error),
    /// No byte moved either way for the idle timeout. `client_stalled`: bytes for the client
    /// were still waiting for it to take them — the caller resets it (see [`ResetOnClose`])
    /// so the kernel does not keep them; a stalled upstream is reset by [`tunnel`] itself.
    IdledOut {
        client_stalled: bool,
        upstream_stalled: bool,
    },
}

impl Tunneled {
    /// Why the tunnel ended early, for its access-log line; `None` when both sides closed.
    pub fn error(&self) -> Option<Cow<'static, str>> {
        Some(match &self.end {
            TunnelEnd::Closed => return None,
            TunnelEnd::Failed(error) => Cow::Owned(format!("tunnel: {error}")),
            TunnelEnd::IdledOut {
                client_stalled: true,
                ..
            } => Cow::Borrowed("client took nothing for timeouts.idle"),
            TunnelEnd::IdledOut {
                upstream_stalled: true,
                ..
            } => Cow::Borrowed("backend took nothing for timeouts.idle"),
            TunnelEnd::IdledOut { .. } => Cow::Borrowed("no byte either way for timeouts.idle"),
        })
    }
}

/// Copies both ways between `client` and `upstream` through a `buffer`-byte buffer each way,
/// with correct half-close, until both sides are done or no byte moved either way for
/// `idle`. Carries TCP connections and upgraded HTTP ones (WebSocket) alike: neither holds
/// its backend connection for ever once both ends fall silent, and a side that stopped taking
/// what it is sent does not leave it queued in the kernel after the close.
pub async fn tunnel<C, U>(
    client: &mut C,
    upstream: &mut U,
    idle: Duration,
    buffer: usize,
) -> Tunneled
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + ResetOnClose + Unpin,
{
    let moved_at = AtomicU64::new(now_nanos());
    let mut client = Observed::new(client, Side::default());
    let mut upstream = Observed::new(upstream, Side::touching(&moved_at));
    // `None`: idled out (the sides say how once the copy lets go of them).
    let ended = {
        let copy = super::relay::relay(&mut client, &mut upstream, buffer);
        tokio::pin!(copy);
        loop {
            tokio::select! {
                result = &mut copy => break Some(match result {
                    Ok(()) => TunnelEnd::Closed,
                    Err(error) => TunnelEnd::Failed(error),
                }),
                () = tokio::time::sleep(idle.max(Duration::from_millis(100)) / 4) => {
                    let quiet = now_nanos().saturating_sub(moved_at.load(Ordering::Relaxed));
                    if Duration::from_nanos(quiet) >= idle {
                        tracing::debug!("tunnel idle for timeouts.idle: closing");
                        break None;
                    }
                }
            }
        }
    };
    let end = ended.unwrap_or(TunnelEnd::IdledOut {
        client_stalled: client.observer().waiting,
        upstream_stalled: upstream.observer().waiting,
    });
    if let TunnelEnd::IdledOut {
        upstream_stalled: true,
        ..
    } = end
    {
        upstream.get_ref().reset_on_close();
    }
    Tunneled {
        bytes_in: upstream.observer().written,
        bytes_out: client.observer().written,
        end,
    }
}

/// What one side of a tunnel took, and whether a write to it waits.
#[derive(Default)]
struct Side<'a> {
    written: u64,
    waiting: bool,
    /// Where the upstream side records the time of the last byte moved, for the idle
    /// timeout (every byte the client moves crosses the upstream side too).
    moved_at: Option<&'a AtomicU64>,
}

impl<'a> Side<'a> {
    fn touching(moved_at: &'a AtomicU64) -> Self {
        Side {
            moved_at: Some(moved_at),
            ..Side::default()
        }
    }

    fn touch(&self) {
        if let Some(moved_at) = self.moved_at {
            moved_at.store(now_nanos(), Ordering::Relaxed);
        }
    }
}

impl Observer for Side<'_> {
    fn read(&mut self, _bytes: &[u8]) {
        self.touch();
    }

    fn wrote(&mut self, written: &Written<'_>) {
        self.touch();
        self.written += written.count() as u64;
        self.waiting = false;
    }

    fn write_waits(&mut self) {
        self.waiting = true;
    }
}
