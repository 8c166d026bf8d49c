//! Round robin: one atomic increment per pick.

use super::{Balancer, PickContext};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Cycles through the candidates in order, ignoring weights.
#[derive(Debug)]
pub struct RoundRobin {
    next: AtomicUsize,
    len: usize,
}

impl RoundRobin {
    /// A balancer over `len` candidates, starting at a random one so that many gatehouse
    /// processes (or freshly swapped tables) do not all hit the first backend together.
    pub fn new(len: usize) -> Self {
        RoundRobin {
            next: AtomicUsize::new(fastrand::usize(..len.max(1))),
            len: len.max(1),
        }
    }
}

impl Balancer for RoundRobin {
    fn pick(&self, _context: &PickContext) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.len
    }
}
