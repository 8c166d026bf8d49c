//! A backend as the request path sees it, and its live counters.

use crate::config::AdminState;
use crate::metrics::Metrics;
use prometheus::{IntCounter, IntGauge};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// A process-wide origin for the lock-free timestamps kept in atomics.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since a process-wide origin: the clock of the lock-free latency estimates.
pub fn now_nanos() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Live counters of one backend. Shared by every table that contains the backend (keyed by
/// pool and backend name), so in-flight counts survive a reload or a health flip.
#[derive(Debug)]
pub struct BackendStats {
    in_flight: AtomicUsize,
    responses: AtomicU64,
    server_errors: AtomicU64,
    /// Peak-EWMA of response times in nanoseconds (f64 bits), and when it was last updated.
    latency_ewma: AtomicU64,
    latency_updated: AtomicU64,
    /// Consecutive failures seen on real traffic (passive health).
    consecutive_failures: AtomicU32,
    /// Back from a passive ejection: one failure ejects again.
    probation: AtomicBool,
    active_gauge: IntGauge,
    aborted: IntCounter,
    /// The pool and backend names, for the log line of an aborted response.
    pool: Box<str>,
    backend: Box<str>,
}

impl BackendStats {
    /// Counters of backend `backend` in `pool`, reporting into its series of
    /// `gatehouse_backend_active_connections` and `gatehouse_backend_responses_aborted_total`.
    pub fn new(metrics: &Metrics, pool: &str, backend: &str) -> Self {
        let labels = [pool, backend];
        BackendStats {
            in_flight: AtomicUsize::new(0),
            responses: AtomicU64::new(0),
            server_errors: AtomicU64::new(0),
            latency_ewma: AtomicU64::new(0f64.to_bits()),
            latency_updated: AtomicU64::new(now_nanos()),
            consecutive_failures: AtomicU32::new(0),
            probation: AtomicBool::new(false),
            active_gauge: metrics
                .backend_active_connections
                .with_label_values(&labels),
            aborted: metrics.backend_responses_aborted.with_label_values(&labels),
            pool: pool.into(),
            backend: backend.into(),
        }
    }

    /// Counts a response from (or on behalf of) this backend, for the status API's rates.
    pub fn record_response(&self, status: u16) {
        self.responses.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.server_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Folds one response time into the peak EWMA: a slower response replaces the average at
    /// once, faster ones pull it down with time constant `decay`. Concurrent updates may
    /// overwrite each other; the estimate tolerates that, and no lock is taken.
    pub fn observe_latency(&self, latency: Duration, decay: Duration) {
        let now = now_nanos();
        let sample = latency.as_nanos() as f64;
        let current = self.latency_ewma_at(now, decay);
        let next = if sample > current {
            sample
        } else {
            let elapsed = now.saturating_sub(self.latency_updated.load(Ordering::Relaxed));
            let weight = (-(elapsed as f64) / decay.as_nanos().max(1) as f64).exp();
            current * weight + sample * (1.0 - weight)
        };
        self.latency_ewma.store(next.to_bits(), Ordering::Relaxed);
        self.latency_updated.store(now, Ordering::Relaxed);
    }

    /// The peak-EWMA response time in nanoseconds at `now`, decayed for the time since the
    /// last observation (so a backend that stopped getting traffic is tried again). `now` (from [`now_nanos`]), so a pick reads the clock once.
    pub fn latency_ewma_at(&self, now: u64, decay: Duration) -> f64 {
        let value = f64::from_bits(self.latency_ewma.load(Ordering::Relaxed));
        let elapsed = now.saturating_sub(self.latency_updated.load(Ordering::Relaxed));
        value * (-(elapsed as f64) / decay.as_nanos().max(1) as f64).exp()
    }

    /// The undecayed peak-EWMA (nanoseconds) and when it was last updated ([`now_nanos`]):
    /// enough to compare two backends' decayed costs without reading the clock.
    pub fn latency_snapshot(&self) -> (f64, u64) {
        (
            f64::from_bits(self.latency_ewma.load(Ordering::Relaxed)),
            self.latency_updated.load(Ordering::Relaxed),
        )
    }

    /// Records a request that succeeded: ends the failure streak and any probation.
    pub fn record_success(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        if self.probation.load(Ordering::Relaxed) {
            self.probation.store(false, Ordering::Relaxed);
        }
    }

    /// Records a failed request (connect failure, reset, timeout or 5xx); true exactly when
    /// this failure reaches `threshold` (or is the first on probation) and should eject.
    pub fn record_failure(&self, threshold: u32) -> bool {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if self.probation.swap(false, Ordering::Relaxed) {
            return true;
        }
        threshold > 0 && failures == threshold
    }

    /// Forgets the failure streak (an ejection was refused or has started).
    pub fn reset_failures(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// Marks the backend as back from an ejection.
    pub fn start_probation(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.probation.store(true, Ordering::Relaxed);
    }

    /// Responses counted so far, and how many of them were 5xx.
    pub fn responses(&self) -> (u64, u64) {
        (
            self.responses.load(Ordering::Relaxed),
            self.server_errors.load(Ordering::Relaxed),
        )
    }

    /// Requests (L7) or tunnels (L4) currently in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Marks one request or tunnel as started; it ends when the guard is dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.active_gauge.inc();
        InFlight {
            stats: Arc::clone(self),
        }
    }
}

/// Held for as long as a request or tunnel to a backend lasts (until its body ends).
#[derive(Debug)]
pub struct InFlight {
    stats: Arc<BackendStats>,
}

impl InFlight {
    /// Counts a response the backend began and did not finish, and says why in the debug log
    /// (as each backend failure is): to the client it looks like a dropped connection, and
    /// its status was already counted.
    pub fn record_abort(&self, error: &dyn std::error::Error) {
        self.stats.aborted.inc();
        tracing::debug!(
            pool = %self.stats.pool,
            backend = %self.stats.backend,
            %error,
            "backend response cut off: the client's response is aborted"
        );
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.stats.active_gauge.dec();
    }
}

/// One backend inside a published table.
#[derive(Debug)]
pub struct Backend {
    pub name: String,
    pub address: SocketAddr,
    /// `address` pre-rendered as the `Host` of requests that came without one.
    pub host: http::HeaderValue,
    pub weight: u32,
    /// `weight` as balanced right now (lower while a slow start ramps).
    pub effective_weight: u32,
    pub admin_state: AdminState,
    /// Passes its health checks and is not ejected.
    pub healthy: bool,
    pub stats: Arc<BackendStats>,
    /// Its keep-alive connections (they outlive the table, like `stats`).
    pub connections: Arc<super::connections::BackendConnections>,
}

impl Backend {
    /// True when the backend may receive new requests or connections.
    pub fn is_candidate(&self) -> bool {
        self.admin_state == AdminState::Active && self.healthy
    }
}
