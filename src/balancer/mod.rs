//! Balancing algorithms: how a pool chooses among its candidate backends.
//!
//! A [`Balancer`] is built when the table is built, from the pool's current candidates
//! (backends that are active and healthy), so every precomputation (smooth weighted
//! sequences, cumulative weights, the Maglev lookup table) happens off the request path and a
//! pick is O(1) or O(log n), lock-free and allocation-free. Load-aware algorithms read the
//! candidates' live [`BackendStats`], which outlive tables.
//!
//! Which to choose:
//! - `round_robin` — equal VMs, short uniform requests. Cheapest.
//! - `weighted_round_robin` — VMs of different sizes (weights, or `capacity`); smooth, exact
//!   proportions over a cycle.
//! - `least_connections` — long or uneven requests, WebSockets and L4 tunnels: sends new work
//!   where the least is in flight (per weight).
//! - `power_of_two` — like least connections but O(1) at any pool size and robust against
//!   herding when many gatehouse instances share the backends.
//! - `least_latency` — VMs whose speed varies (noisy neighbours, GC pauses): peak-EWMA
//!   response time × (in flight + 1) sheds load from a slow VM within seconds.
//! - `consistent_hash` — stickiness (sessions, caches): the same client/header/cookie goes to
//!   the same VM, and removing one of N VMs remaps only ~1/N of the keys; deterministic across
//!   gatehouse processes with the same config.
//! - `random` — weighted random; stateless, good with many instances.

mod consistent_hash;
mod least_conn;
mod least_latency;
mod p2c;
mod random;
mod round_robin;
mod weighted;

pub use consistent_hash::{ip_hash, key_hash, Maglev};
pub use least_conn::LeastConnections;
pub use least_latency::LeastLatency;
pub use p2c::PowerOfTwo;
pub use random::WeightedRandom;
pub use round_robin::RoundRobin;
pub use weighted::SmoothWeighted;

use crate::config::Algorithm;
use crate::upstream::backend::BackendStats;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// What a pick may look at about the request.
#[derive(Debug, Clone, Copy)]
pub struct PickContext {
    /// The client's address (after PROXY protocol).
    pub client_ip: IpAddr,
    /// The request's consistent-hash key (only computed for `consistent_hash` pools).
    pub hash: u64,
}

/// One candidate as a balancer sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The backend's name: Maglev hashes it, so every process agrees on the table.
    pub name: String,
    pub weight: u32,
    pub stats: Arc<BackendStats>,
}

/// Chooses one of the candidates it was built for.
pub trait Balancer: Send + Sync + fmt::Debug {
    /// An index into the candidate list the balancer was built from (never out of range;
    /// the caller guarantees at least one candidate).
    fn pick(&self, context: &PickContext) -> usize;
}

/// Settings some algorithms need beyond the candidates.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// How fast `least_latency` forgets: the EWMA's time constant.
    pub latency_decay: Duration,
}

/// Builds the balancer for `algorithm` over `candidates`. With no candidate the pool never
/// asks for a pick, but a balancer still exists (round robin over nothing).
pub fn build(algorithm: Algorithm, candidates: &[Candidate], tuning: Tuning) -> Box<dyn Balancer> {
    if candidates.is_empty() {
        return Box::new(RoundRobin::new(0));
    }
    let weights: Vec<u32> = candidates.iter().map(|c| c.weight.max(1)).collect();
    let stats = || {
        candidates
            .iter()
            .map(|c| c.stats.clone())
            .collect::<Vec<_>>()
    };
    match algorithm {
        Algorithm::RoundRobin => Box::new(RoundRobin::new(candidates.len())),
        Algorithm::WeightedRoundRobin => Box::new(SmoothWeighted::new(&weights)),
        Algorithm::LeastConnections => Box::new(LeastConnections::new(stats(), weights)),
        Algorithm::PowerOfTwo => Box::new(PowerOfTwo::new(stats(), weights)),
        Algorithm::LeastLatency => Box::new(LeastLatency::new(stats(), tuning.latency_decay)),
        Algorithm::ConsistentHash => {
            let names: Vec<&str> = candidates.iter().map(|c| c.name.as_str()).collect();
            Box::new(Maglev::new(&names, &weights))
        }
        Algorithm::Random => Box::new(WeightedRandom::new(&weights)),
    }
}

/// `a_load / a_weight < b_load / b_weight`, without division (loads stay far below 2^32 and
/// weights at most 1000, so the products fit in 64 bits).
fn lighter(a_load: u64, a_weight: u32, b_load: u64, b_weight: u32) -> bool {
    a_load.saturating_mul(u64::from(b_weight)) < b_load.saturating_mul(u64::from(a_weight))
}
