//! Least connections: the candidate with the fewest in-flight requests (L7) or open
//! connections (L4) per unit of weight.
//!
//! Exact for pools of up to [`SCAN_LIMIT`] candidates; larger pools compare a window of
//! `SCAN_LIMIT` consecutive candidates from a random start, which keeps the pick cost bounded
//! (and lock-free) at any pool size. The scan starts at a rotating offset so ties spread.

use super::{lighter, Balancer, PickContext};
use crate::upstream::backend::BackendStats;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Candidates compared per pick.
pub const SCAN_LIMIT: usize = 16;

/// Fewest in flight per weight.
#[derive(Debug)]
pub struct LeastConnections {
    stats: Vec<Arc<BackendStats>>,
    weights: Vec<u32>,
    rotation: AtomicUsize,
}

impl LeastConnections {
    /// Over the candidates' live counters and weights (same order).
    pub fn new(stats: Vec<Arc<BackendStats>>, weights: Vec<u32>) -> Self {
        LeastConnections {
            stats,
            weights,
            rotation: AtomicUsize::new(0),
        }
    }
}

impl Balancer for LeastConnections {
    fn pick(&self, _context: &PickContext) -> usize {
        let len = self.stats.len();
        let start = if len <= SCAN_LIMIT {
            self.rotation.fetch_add(1, Ordering::Relaxed)
        } else {
            fastrand::usize(..len)
        };
        let mut best = start % len;
        let mut best_load = self.stats[best].in_flight() as u64 + 1;
        let mut index = best;
        for _ in 1..len.min(SCAN_LIMIT) {
            index += 1;
            if index == len {
                index = 0;
            }
            let load = self.stats[index].in_flight() as u64 + 1;
            if lighter(load, self.weights[index], best_load, self.weights[best]) {
                best = index;
                best_load = load;
            }
        }
        best
    }
}
