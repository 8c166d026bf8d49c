//! Least latency: power of two choices on peak-EWMA response time × (in flight + 1), the
//! Finagle/linkerd "peak EWMA" load. A response slower than the average replaces it at once
//! (peak); faster ones pull it down exponentially with time constant `decay`, and the cost
//! also decays while a backend gets no traffic, so a VM that was slow gets probed again.

use super::p2c::two_distinct;
use super::{Balancer, PickContext};
use crate::upstream::backend::BackendStats;
use std::sync::Arc;
use std::time::Duration;

/// p2c on peak-EWMA cost.
#[derive(Debug)]
pub struct LeastLatency {
    stats: Vec<Arc<BackendStats>>,
    decay_nanos: f64,
}

impl LeastLatency {
    /// Over the candidates' live counters (same order).
    pub fn new(stats: Vec<Arc<BackendStats>>, decay: Duration) -> Self {
        LeastLatency {
            stats,
            decay_nanos: decay.as_nanos().max(1) as f64,
        }
    }
}

impl Balancer for LeastLatency {
    fn pick(&self, _context: &PickContext) -> usize {
        let (a, b) = two_distinct(self.stats.len());
        let (ewma_a, updated_a) = self.stats[a].latency_snapshot();
        let (ewma_b, updated_b) = self.stats[b].latency_snapshot();
        let load_a = ewma_a * (self.stats[a].in_flight() as f64 + 1.0);
        let load_b = ewma_b * (self.stats[b].in_flight() as f64 + 1.0);
        // Both costs decay by exp(-(now - updated) / decay); comparing them needs only the
        // ratio exp((updated_a - updated_b) / decay), so the pick never reads the clock.
        let exponent = (updated_a as f64 - updated_b as f64) / self.decay_nanos;
        if load_b < load_a * exponent.clamp(-700.0, 700.0).exp() {
            b
        } else {
            a
        }
    }
}
