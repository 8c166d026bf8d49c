//! Consistent hashing with a Maglev lookup table (Eisenbud et al., NSDI 2016).
//!
//! Each candidate walks its own permutation of the table's slots (derived from a hash of its
//! *name*, so two gatehouse processes with the same config build the same table) and claims
//! free slots in turn, heavier candidates more often. A pick is one hash and one array read.
//! Removing or adding one of N candidates remaps only about 1/N of the slots.

use super::{Balancer, PickContext};
use std::net::IpAddr;

/// Table sizes: primes, the smallest one ≥ 100 × candidates is used (≤ 1 % imbalance).
const SIZES: [usize; 6] = [65_537, 131_071, 262_139, 524_287, 1_048_573, 2_097_143];

/// A Maglev lookup table over the candidates.
#[derive(Debug)]
pub struct Maglev {
    table: Vec<u16>,
}

/// FNV-1a then a 64-bit finaliser: fast, stable across processes and versions, and well
/// mixed. Not for secrets — a hash key is not one.
pub fn key_hash(bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    for byte in bytes {
        hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

/// The hash of a client address (the `source_ip` key and the fallback of the others).
pub fn ip_hash(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => key_hash(&v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => key_hash(&v4.octets()),
            None => key_hash(&v6.octets()),
        },
    }
}

impl Maglev {
    /// Builds the table for candidates `names` with `weights` (same order). Without names
    /// every slot points at index 0 (the caller has nothing to pick from anyway).
    pub fn new(names: &[&str], weights: &[u32]) -> Self {
        if names.is_empty() {
            return Maglev { table: vec![0] };
        }
        let count = names.len().min(usize::from(u16::MAX));
        let size = SIZES
            .iter()
            .copied()
            .find(|&size| size >= count * 100)
            .unwrap_or(SIZES[SIZES.len() - 1]);
        // Each candidate's walk through its permutation: the slot it looks at next, and its
        // stride. Advancing by addition and one conditional subtraction avoids a modulo.
        let mut walks: Vec<(usize, usize)> = names
            .iter()
            .take(count)
            .map(|name| {
                let offset = key_hash(name.as_bytes()) as usize % size;
                let mut skip_key = name.as_bytes().to_vec();
                skip_key.extend_from_slice(b"#skip");
                let skip = (key_hash(&skip_key) as usize % (size - 1)) + 1;
                (offset, skip)
            })
            .collect();
        let max_weight = u64::from(weights.iter().copied().max().unwrap_or(1).max(1));
        let mut credit = vec![0u64; count];
        let mut table = vec![u16::MAX; size];
        let mut filled = 0;
        'fill: loop {
            for (index, walk) in walks.iter_mut().enumerate() {
                credit[index] += u64::from(weights.get(index).copied().unwrap_or(1).max(1));
                while credit[index] >= max_weight {
                    credit[index] -= max_weight;
                    let (slot, skip) = walk;
                    while table[*slot] != u16::MAX {
                        *slot += *skip;
                        if *slot >= size {
                            *slot -= size;
                        }
                    }
                    table[*slot] = index as u16;
                    filled += 1;
                    if filled == size {
                        break 'fill;
                    }
                }
            }
        }
        Maglev { table }
    }

    /// The candidate index for a key hash.
    pub fn lookup(&self, hash: u64) -> usize {
        usize::from(self.table[(hash % self.table.len() as u64) as usize])
    }

    /// The whole table, for tests.
    pub fn slots(&self) -> &[u16] {
        &self.table
    }
}

impl Balancer for Maglev {
    fn pick(&self, context: &PickContext) -> usize {
        self.lookup(context.hash)
    }
}
