//! Per-client-address token buckets (`rate_limit:`), without a lock or a map.
//!
//! Each listener with a rate limit owns a fixed array of 65,536 atomic buckets; a client's
//! address hashes to one bucket. A bucket packs milli-tokens and the time of its last refill
//! into one `u64`, updated with compare-and-swap, so a check is a few atomic operations and
//! never allocates. Addresses that collide share a bucket (rare with 65,536 of them; the
//! effect is a stricter limit for both, never a looser one).

use crate::balancer::ip_hash;
use crate::config::RateLimit;
use crate::upstream::backend::now_nanos;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

const SLOTS: usize = 1 << 16;
const MILLI: u64 = 1000;

/// The buckets of one listener.
#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    slots: Box<[AtomicU64]>,
}

impl RateLimiter {
    /// Empty (full) buckets for `limit`.
    pub fn new(limit: RateLimit) -> Self {
        RateLimiter {
            limit,
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The limit this limiter enforces.
    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Takes one token for `client`; `Err(seconds)` says when to retry when none is left.
    pub fn check(&self, client: IpAddr) -> Result<(), u64> {
        self.check_at(client, now_nanos() / 1_000_000)
    }

    fn check_at(&self, client: IpAddr, now_ms: u64) -> Result<(), u64> {
        let slot = &self.slots[(ip_hash(client) as usize) & (SLOTS - 1)];
        let capacity = u64::from(self.limit.burst) * MILLI;
        // Milli-tokens gained per millisecond.
        let rate = self.limit.requests_per_second;
        let now = (now_ms as u32).wrapping_add(1);
        let mut current = slot.load(Ordering::Relaxed);
        loop {
            let (tokens, stamp) = (current >> 32, current as u32);
            let available = if current == 0 {
                capacity
            } else {
                let elapsed = u64::from(now.wrapping_sub(stamp));
                (tokens + (elapsed as f64 * rate) as u64).min(capacity)
            };
            if available < MILLI {
                let missing = (MILLI - available) as f64;
                let seconds = (missing / (rate * 1000.0)).ceil().max(1.0) as u64;
                return Err(seconds);
            }
            let next = ((available - MILLI) << 32) | u64::from(now.max(1));
            match slot.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(actual) => current = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill_at_the_rate() {
        let limiter = RateLimiter::new(RateLimit {
            requests_per_second: 10.0,
            burst: 5,
        });
        let client: IpAddr = [192, 0, 2, 1].into();
        for _ in 0..5 {
            assert!(limiter.check_at(client, 1000).is_ok());
        }
        assert_eq!(limiter.check_at(client, 1000), Err(1));
        assert!(
            limiter.check_at(client, 1100).is_ok(),
            "one token per 100 ms"
        );
        assert!(limiter.check_at(client, 1100).is_err());
        let other: IpAddr = [192, 0, 2, 2].into();
        assert!(
            limiter.check_at(other, 1100).is_ok(),
            "another client has its own bucket"
        );
        assert!(
            limiter.check_at(client, 60_000).is_ok(),
            "refills up to the burst"
        );
    }
}
