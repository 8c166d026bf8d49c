//! Property tests for every balancing algorithm: picks stay among available backends, shares
//! converge to the weights, Maglev remaps little when one backend leaves or joins, and
//! load-aware algorithms prefer the less loaded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use gatehouse::balancer::{self, Balancer, Candidate, Maglev, PickContext, SmoothWeighted, Tuning};
use gatehouse::config::{self, AdminState, Algorithm};
use gatehouse::metrics::Metrics;
use gatehouse::upstream::backend::BackendStats;
use gatehouse::upstream::table::{StaticFacts, Table};
use proptest::prelude::*;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| Metrics::new().unwrap())
}

fn stats() -> Arc<BackendStats> {
    Arc::new(BackendStats::new(metrics(), "props", "x"))
}

fn candidates(weights: &[u32]) -> Vec<Candidate> {
    weights
        .iter()
        .enumerate()
        .map(|(index, &weight)| Candidate {
            name: format!("vm-{index}"),
            weight,
            stats: stats(),
        })
        .collect()
}

const TUNING: Tuning = Tuning {
    latency_decay: Duration::from_secs(10),
};

fn context(hash: u64) -> PickContext {
    PickContext {
        client_ip: [198, 51, 100, 7].into(),
        hash,
    }
}

fn algorithm_strategy() -> impl Strategy<Value = (&'static str, Algorithm)> {
    prop::sample::select(Algorithm::ALL.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn never_picks_an_unavailable_backend(
        (name, _) in algorithm_strategy(),
        backends in prop::collection::vec((0u8..3, any::<bool>(), 1u32..50), 1..24),
        hashes in prop::collection::vec(any::<u64>(), 50),
    ) {
        let mut yaml = format!(
            "admin: {{ listen: \"127.0.0.1:0\" }}\nlisteners:\n  web: {{ listen: \"127.0.0.1:0\", pool: p }}\npools:\n  p:\n    algorithm: {name}\n    backends:\n"
        );
        let mut facts = StaticFacts::new(metrics().clone());
        for (index, (state, healthy, weight)) in backends.iter().enumerate() {
            let state = ["active", "draining", "disabled"][usize::from(*state)];
            yaml.push_str(&format!(
                "      - {{ name: vm-{index}, address: \"127.0.0.1:{}\", weight: {weight}, state: {state} }}\n",
                10000 + index
            ));
            if !healthy {
                facts.unhealthy.insert(format!("vm-{index}"));
            }
        }
        let config = Arc::new(config::parse(&yaml, std::path::Path::new("p.yaml")).unwrap());
        let table = Table::build(config, SystemTime::now(), 1, &mut facts, metrics()).unwrap();
        let pool = table.pool("p").unwrap();
        let available: Vec<usize> = pool
            .backends
            .iter()
            .enumerate()
            .filter(|(_, b)| b.admin_state == AdminState::Active && b.healthy)
            .map(|(i, _)| i)
            .collect();
        for hash in hashes {
            let picked = pool.select(&context(hash), &[]);
            match picked {
                Some(index) => prop_assert!(available.contains(&index), "picked {index}, available {available:?}"),
                None => prop_assert!(available.is_empty()),
            }
            if let Some(first) = picked {
                if let Some(retry) = pool.select(&context(hash), &[first]) {
                    prop_assert!(retry != first && available.contains(&retry));
                } else {
                    prop_assert_eq!(available.len(), 1);
                }
            }
        }
    }

    #[test]
    fn every_pick_is_in_range(
        (_, algorithm) in algorithm_strategy(),
        weights in prop::collection::vec(1u32..1000, 1..64),
        hashes in prop::collection::vec(any::<u64>(), 100),
    ) {
        let balancer = balancer::build(algorithm, &candidates(&weights), TUNING);
        for hash in hashes {
            prop_assert!(balancer.pick(&context(hash)) < weights.len());
        }
    }

    #[test]
    fn weighted_round_robin_is_exact_over_a_cycle(weights in prop::collection::vec(1u32..20, 1..12)) {
        let balancer = SmoothWeighted::new(&weights);
        let cycle_len: u32 = weights.iter().sum::<u32>() / weights.iter().fold(0, |g, &w| gcd(g, w));
        let mut counts = vec![0u32; weights.len()];
        for _ in 0..cycle_len * 3 {
            counts[balancer.pick(&context(0))] += 1;
        }
        let divisor = weights.iter().fold(0, |g, &w| gcd(g, w));
        for (index, &weight) in weights.iter().enumerate() {
            prop_assert_eq!(counts[index], 3 * weight / divisor);
        }
    }

    #[test]
    fn random_shares_converge_to_weights(weights in prop::collection::vec(1u32..10, 2..6)) {
        let balancer = balancer::build(Algorithm::Random, &candidates(&weights), TUNING);
        let picks = 40_000;
        let mut counts = vec![0u32; weights.len()];
        for _ in 0..picks {
            counts[balancer.pick(&context(0))] += 1;
        }
        let total: u32 = weights.iter().sum();
        for (index, &weight) in weights.iter().enumerate() {
            let expected = f64::from(weight) / f64::from(total);
            let share = f64::from(counts[index]) / f64::from(picks);
            prop_assert!((share - expected).abs() < 0.02, "share {share} vs {expected}");
        }
    }

    #[test]
    fn maglev_honours_weights(weights in prop::collection::vec(1u32..8, 2..10)) {
        let names: Vec<String> = (0..weights.len()).map(|i| format!("vm-{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let maglev = Maglev::new(&names, &weights);
        let mut counts = vec![0usize; weights.len()];
        for &slot in maglev.slots() {
            counts[usize::from(slot)] += 1;
        }
        let total: u32 = weights.iter().sum();
        for (index, &weight) in weights.iter().enumerate() {
            let expected = f64::from(weight) / f64::from(total);
            let share = counts[index] as f64 / maglev.slots().len() as f64;
            prop_assert!((share - expected).abs() / expected < 0.05, "share {share} vs {expected}");
        }
    }

    #[test]
    fn maglev_remaps_about_one_nth_on_removal_and_addition(count in 3usize..40, removed in any::<prop::sample::Index>()) {
        let names: Vec<String> = (0..count).map(|i| format!("vm-{i}")).collect();
        let all: Vec<&str> = names.iter().map(String::as_str).collect();
        let gone = removed.index(count);
        let fewer: Vec<&str> = all.iter().enumerate().filter(|(i, _)| *i != gone).map(|(_, n)| *n).collect();
        let before = Maglev::new(&all, &vec![1; count]);
        let after = Maglev::new(&fewer, &vec![1; count - 1]);
        let name_at = |table: &Maglev, names: &[&str], slot: usize| names[usize::from(table.slots()[slot])].to_string();
        let size = before.slots().len();
        let moved = (0..size)
            .filter(|&slot| {
                let was = name_at(&before, &all, slot);
                was != all[gone] && was != name_at(&after, &fewer, slot)
            })
            .count();
        let moved_share = moved as f64 / size as f64;
        prop_assert!(moved_share < 0.5 / count as f64 + 0.02, "removal moved {moved_share} of keys (n = {count})");

        let more_names: Vec<&str> = all.iter().copied().chain(std::iter::once("vm-new")).collect();
        let grown = Maglev::new(&more_names, &vec![1; count + 1]);
        let changed = (0..size)
            .filter(|&slot| name_at(&before, &all, slot) != name_at(&grown, &more_names, slot))
            .count();
        let changed_share = changed as f64 / size as f64;
        prop_assert!(changed_share < 1.5 / (count + 1) as f64 + 0.02, "addition moved {changed_share} of keys (n = {count})");
    }

    #[test]
    fn least_connections_picks_the_least_loaded(loads in prop::collection::vec(0usize..20, 2..16)) {
        let weights = vec![1u32; loads.len()];
        let candidates = candidates(&weights);
        let _guards: Vec<_> = candidates
            .iter()
            .zip(&loads)
            .flat_map(|(candidate, &load)| (0..load).map(|_| candidate.stats.start()).collect::<Vec<_>>())
            .collect();
        let balancer = balancer::build(Algorithm::LeastConnections, &candidates, TUNING);
        let minimum = *loads.iter().min().unwrap();
        for _ in 0..loads.len() * 2 {
            prop_assert_eq!(loads[balancer.pick(&context(0))], minimum);
        }
    }

    #[test]
    fn power_of_two_never_picks_the_single_busiest(loads in prop::collection::vec(0usize..5, 3..10)) {
        let mut loads = loads;
        loads[0] = 100;
        let candidates = candidates(&vec![1; loads.len()]);
        let _guards: Vec<_> = candidates
            .iter()
            .zip(&loads)
            .flat_map(|(candidate, &load)| (0..load).map(|_| candidate.stats.start()).collect::<Vec<_>>())
            .collect();
        let balancer = balancer::build(Algorithm::PowerOfTwo, &candidates, TUNING);
        for _ in 0..200 {
            prop_assert_ne!(balancer.pick(&context(0)), 0, "two distinct candidates: the busiest always loses");
        }
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[test]
fn least_latency_avoids_a_slow_backend() {
    let candidates = candidates(&[1, 1, 1]);
    for _ in 0..20 {
        candidates[0]
            .stats
            .observe_latency(Duration::from_millis(500), TUNING.latency_decay);
        candidates[1]
            .stats
            .observe_latency(Duration::from_millis(5), TUNING.latency_decay);
        candidates[2]
            .stats
            .observe_latency(Duration::from_millis(6), TUNING.latency_decay);
    }
    let balancer = balancer::build(Algorithm::LeastLatency, &candidates, TUNING);
    let slow_picks = (0..1000)
        .filter(|_| balancer.pick(&context(0)) == 0)
        .count();
    assert_eq!(
        slow_picks, 0,
        "with p2c over distinct candidates the slow one always loses"
    );
}

#[test]
fn maglev_is_deterministic_across_builds() {
    let names = ["vm-a", "vm-b", "vm-c", "vm-d"];
    let one = Maglev::new(&names, &[1, 2, 1, 1]);
    let two = Maglev::new(&names, &[1, 2, 1, 1]);
    assert_eq!(one.slots(), two.slots());
    assert_eq!(one.slots().len(), 65_537);
}
