//! Power of two choices: two distinct random candidates, the less loaded (in flight per
//! weight) wins. O(1) at any size, and it avoids the herd behaviour of exact least
//! connections when many balancers share backends (tower's `p2c`).

use super::{lighter, Balancer, PickContext};
use crate::upstream::backend::BackendStats;
use std::sync::Arc;

/// Two random choices, the lighter wins.
#[derive(Debug)]
pub struct PowerOfTwo {
    stats: Vec<Arc<BackendStats>>,
    weights: Vec<u32>,
}

impl PowerOfTwo {
    /// Over the candidates' live counters and weights (same order).
    pub fn new(stats: Vec<Arc<BackendStats>>, weights: Vec<u32>) -> Self {
        PowerOfTwo { stats, weights }
    }
}

/// Two distinct indices below `len` (the same one twice only when `len == 1`).
pub(super) fn two_distinct(len: usize) -> (usize, usize) {
    if len < 2 {
        return (0, 0);
    }
    let first = fastrand::usize(..len);
    let second = (first + 1 + fastrand::usize(..len - 1)) % len;
    (first, second)
}

impl Balancer for PowerOfTwo {
    fn pick(&self, _context: &PickContext) -> usize {
        let (a, b) = two_distinct(self.stats.len());
        let load_a = self.stats[a].in_flight() as u64 + 1;
        let load_b = self.stats[b].in_flight() as u64 + 1;
        if lighter(load_b, self.weights[b], load_a, self.weights[a]) {
            b
        } else {
            a
        }
    }
}

#[cfg(test)]
mod tests {
    use super::two_distinct;

    #[test]
    fn candidates_are_distinct() {
        for len in 2..20 {
            for _ in 0..1000 {
                let (a, b) = two_distinct(len);
                assert!(a != b && a < len && b < len);
            }
        }
        assert_eq!(two_distinct(1), (0, 0));
    }
}
