//! Weighted random: a binary search over precomputed cumulative weights.

use super::{Balancer, PickContext};

/// Picks candidate `i` with probability `weight[i] / sum(weights)`.
#[derive(Debug)]
pub struct WeightedRandom {
    cumulative: Vec<u64>,
}

impl WeightedRandom {
    /// Over `weights` (non-empty).
    pub fn new(weights: &[u32]) -> Self {
        let mut total = 0u64;
        let cumulative = weights
            .iter()
            .map(|&weight| {
                total += u64::from(weight.max(1));
                total
            })
            .collect();
        WeightedRandom { cumulative }
    }
}

impl Balancer for WeightedRandom {
    fn pick(&self, _context: &PickContext) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(1);
        let point = fastrand::u64(..total);
        self.cumulative.partition_point(|&end| end <= point)
    }
}
