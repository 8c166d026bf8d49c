//! Smooth weighted round robin, precomputed: the whole cycle is laid out when the table is
//! built (earliest-deadline-first over the weights, like nginx's smooth WRR), so a pick is
//! one atomic increment and one array read, and the heavy backend never gets bursts.

use super::{Balancer, PickContext};
use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Longest precomputed cycle; larger weight sums are scaled down proportionally.
const MAX_CYCLE: u64 = 1 << 20;

/// Smooth weighted round robin over a precomputed cycle.
#[derive(Debug)]
pub struct SmoothWeighted {
    sequence: Vec<u16>,
    next: AtomicUsize,
}

/// A backend's next slot in the cycle: `(2 * served + 1) / (2 * weight)`.
#[derive(Eq, PartialEq)]
struct Deadline {
    served: u64,
    weight: u64,
    index: usize,
}

impl Ord for Deadline {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        let mine = u128::from(2 * self.served + 1) * u128::from(other.weight);
        let theirs = u128::from(2 * other.served + 1) * u128::from(self.weight);
        theirs.cmp(&mine).then_with(|| other.index.cmp(&self.index))
    }
}

impl PartialOrd for Deadline {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Weights divided by their gcd and, if the cycle would still be too long, scaled down.
fn reduced(weights: &[u32]) -> Vec<u64> {
    let divisor = weights.iter().fold(0, |g, &w| gcd(g, u64::from(w))).max(1);
    let mut reduced: Vec<u64> = weights.iter().map(|&w| u64::from(w) / divisor).collect();
    let total: u64 = reduced.iter().sum();
    if total > MAX_CYCLE {
        reduced = reduced
            .iter()
            .map(|&w| (w * MAX_CYCLE / total).max(1))
            .collect();
    }
    reduced
}

impl SmoothWeighted {
    /// Lays out one full cycle over `weights` (at most 65,536 candidates).
    pub fn new(weights: &[u32]) -> Self {
        let weights = reduced(weights);
        let total: u64 = weights.iter().sum();
        let mut heap: BinaryHeap<Deadline> = weights
            .iter()
            .enumerate()
            .map(|(index, &weight)| Deadline {
                served: 0,
                weight,
                index,
            })
            .collect();
        let mut sequence = Vec::with_capacity(total as usize);
        while (sequence.len() as u64) < total {
            let Some(mut next) = heap.pop() else { break };
            sequence.push(u16::try_from(next.index).unwrap_or(u16::MAX));
            next.served += 1;
            if next.served < next.weight {
                heap.push(next);
            }
        }
        if sequence.is_empty() {
            sequence.push(0);
        }
        let start = fastrand::usize(..sequence.len());
        SmoothWeighted {
            sequence,
            next: AtomicUsize::new(start),
        }
    }

    /// The cycle, for tests.
    pub fn cycle(&self) -> &[u16] {
        &self.sequence
    }
}

impl Balancer for SmoothWeighted {
    fn pick(&self, _context: &PickContext) -> usize {
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % self.sequence.len();
        usize::from(self.sequence[slot])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_and_exact() {
        let balancer = SmoothWeighted::new(&[5, 1, 1]);
        let cycle = balancer.cycle();
        assert_eq!(cycle.len(), 7);
        assert_eq!(cycle.iter().filter(|&&i| i == 0).count(), 5);
        let longest_run = cycle
            .windows(3)
            .filter(|w| w.iter().all(|&i| i == 0))
            .count();
        assert!(
            longest_run <= 2,
            "no long bursts to the heavy backend: {cycle:?}"
        );
    }

    #[test]
    fn gcd_reduces_the_cycle() {
        assert_eq!(SmoothWeighted::new(&[100, 200, 300]).cycle().len(), 6);
    }

    #[test]
    fn huge_weight_sums_are_capped() {
        let weights = vec![1000u32; 2000];
        let mut uneven = weights.clone();
        uneven[0] = 999;
        let balancer = SmoothWeighted::new(&uneven);
        assert!(balancer.cycle().len() as u64 <= MAX_CYCLE + 2000);
    }
}
