//! The TCP (layer 4) proxy: pick a backend from the same table as HTTP, connect (failing
//! over to another backend on connect failure), optionally send a PROXY header, then copy
//! both ways with correct half-close until both sides are done or the connection idles out.
//!
//! The copy ([`tunnel`], also used for upgraded HTTP connections) uses two fixed buffers
//! allocated once per connection (`copy_bidirectional_with_sizes`; 64 KiB each for TCP):
//! nothing is allocated per chunk.

use super::l7::Connection;
use crate::access_log::AccessRecord;
use crate::config::ProxyProtocolVersion;
use crate::io::{Observed, Observer};
use crate::metrics::Rejection;
use crate::proxy_protocol;
use crate::upstream::backend::now_nanos;
use crate::upstream::table::ListenerTable;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Copy buffer per direction of a TCP connection.
const BUFFER: usize = 64 * 1024;

/// Proxies one client connection to a backend of the listener's pool.
pub async fn serve<I>(mut client: I, connection: &Connection, listener: &ListenerTable)
where
    I: AsyncRead + AsyncWrite + Unpin + Send,
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
    let outcome = tunnel(&mut client, stream, pool.config.timeouts.idle, BUFFER).await;
    if listener.access_log.enabled() {
        let (bytes_in, bytes_out) = outcome.unwrap_or((0, 0));
        listener.access_log.log(AccessRecord {
            time: Some(SystemTime::now() - started.elapsed()),
            bytes_in,
            bytes_out,
            duration: started.elapsed(),
            backend: backend.name.clone(),
            route: target.route.clone(),
            ..connection.access_record("tcp")
        });
    }
}

/// Copies both ways between `client` and `upstream` through a `buffer`-byte buffer each way,
/// with correct half-close, until both sides are done or no byte moved either way for
/// `idle`; the bytes moved each way (client to upstream, upstream to client), `None` when it
/// failed or idled out. Carries TCP connections and upgraded HTTP ones (WebSocket) alike:
/// neither holds its backend connection for ever once both ends fall silent.
pub async fn tunnel<C, U>(
    client: &mut C,
    upstream: U,
    idle: Duration,
    buffer: usize,
) -> Option<(u64, u64)>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Arc::new(AtomicU64::new(now_nanos()));
    let mut upstream = Observed::new(upstream, Activity(activity.clone()));
    let copy = tokio::io::copy_bidirectional_with_sizes(client, &mut upstream, buffer, buffer);
    tokio::pin!(copy);
    loop {
        tokio::select! {
            result = &mut copy => return result.ok(),
            () = tokio::time::sleep(idle.max(Duration::from_millis(100)) / 4) => {
                let quiet = now_nanos().saturating_sub(activity.load(Ordering::Relaxed));
                if Duration::from_nanos(quiet) >= idle {
                    tracing::debug!("tunnel idle for timeouts.idle: closing");
                    return None;
                }
            }
        }
    }
}

/// Records the time of the last byte moved, for the idle timeout.
struct Activity(Arc<AtomicU64>);

impl Activity {
    fn touch(&self) {
        self.0.store(now_nanos(), Ordering::Relaxed);
    }
}

impl Observer for Activity {
    fn read(&mut self, _bytes: &[u8]) {
        self.touch();
    }

    fn wrote(&mut self, _count: usize) {
        self.touch();
    }
}
