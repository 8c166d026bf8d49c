//! Balancing algorithms: how a pool chooses among its candidate backends.
//!
//! A [`Balancer`] is built when the table is built, from the pool's current candidates
//! (backends that are active and healthy), so every precomputation happens off the request
//! path and a pick is O(1), lock-free and allocation-free. A new table brings a new balancer.

mod round_robin;

pub use round_robin::RoundRobin;

use crate::config::Algorithm;
use std::fmt;
use std::net::IpAddr;

/// What a pick may look at about the request.
#[derive(Debug, Clone, Copy)]
pub struct PickContext {
    /// The client's address (after PROXY protocol), for source-IP hashing.
    pub client_ip: IpAddr,
}

/// Chooses one of the candidates it was built for.
pub trait Balancer: Send + Sync + fmt::Debug {
    /// An index into the candidate list the balancer was built from; `candidates > 0`.
    fn pick(&self, context: &PickContext) -> usize;
}

/// Builds the balancer for `algorithm` over `weights` (one per candidate, in order).
///
/// Every algorithm currently shares round robin; TODO(#3) fills in the others.
pub fn build(algorithm: Algorithm, weights: &[u32]) -> Box<dyn Balancer> {
    match algorithm {
        Algorithm::RoundRobin
        | Algorithm::WeightedRoundRobin
        | Algorithm::LeastConnections
        | Algorithm::PowerOfTwo
        | Algorithm::LeastLatency
        | Algorithm::ConsistentHash
        | Algorithm::Random => Box::new(RoundRobin::new(weights.len())),
    }
}
