//! A backend as the request path sees it, and its live counters.

use crate::config::AdminState;
use prometheus::IntGauge;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// Live counters of one backend. Shared by every table that contains the backend (keyed by
/// pool and backend name), so in-flight counts survive a reload or a health flip.
#[derive(Debug)]
pub struct BackendStats {
    in_flight: AtomicUsize,
    responses: AtomicU64,
    server_errors: AtomicU64,
    active_gauge: IntGauge,
}

impl BackendStats {
    /// Counters reporting into `active_gauge` (`gatehouse_backend_active_connections`).
    pub fn new(active_gauge: IntGauge) -> Self {
        BackendStats {
            in_flight: AtomicUsize::new(0),
            responses: AtomicU64::new(0),
            server_errors: AtomicU64::new(0),
            active_gauge,
        }
    }

    /// Counts a response from (or on behalf of) this backend, for the status API's rates.
    pub fn record_response(&self, status: u16) {
        self.responses.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.server_errors.fetch_add(1, Ordering::Relaxed);
        }
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
    /// `address` pre-rendered for request URIs.
    pub authority: http::uri::Authority,
    pub weight: u32,
    pub admin_state: AdminState,
    /// Passes its health checks and is not ejected.
    pub healthy: bool,
    pub stats: Arc<BackendStats>,
}

impl Backend {
    /// True when the backend may receive new requests or connections.
    pub fn is_candidate(&self) -> bool {
        self.admin_state == AdminState::Active && self.healthy
    }
}
