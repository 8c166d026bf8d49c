//! Micro-benchmarks of the request path's pick (every algorithm at 3, 100 and 1,000
//! candidates, alone and with a second thread contending) and of rebuilding the table and
//! validating a config at 1,000 backends.
//!
//! Run: `cargo bench --bench balancer` (CI runs it with `-- --quick` to prove it still works).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use gatehouse::balancer::{self, Candidate, PickContext, Tuning};
use gatehouse::config::{self, Algorithm};
use gatehouse::metrics::Metrics;
use gatehouse::upstream::backend::BackendStats;
use gatehouse::upstream::table::{StaticFacts, Table};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

fn candidates(count: usize, metrics: &Metrics) -> Vec<Candidate> {
    (0..count)
        .map(|index| Candidate {
            name: format!("vm-{index}"),
            weight: 1 + (index % 4) as u32,
            stats: Arc::new(BackendStats::new(metrics, "bench", &index.to_string())),
        })
        .collect()
}

fn picks(c: &mut Criterion) {
    let metrics = Metrics::new().unwrap_or_else(|error| panic!("{error}"));
    let context = PickContext {
        client_ip: [192, 0, 2, 1].into(),
        hash: 0x9e37_79b9_7f4a_7c15,
    };
    let tuning = Tuning {
        latency_decay: Duration::from_secs(10),
    };
    for contended in [false, true] {
        let group_name = if contended { "pick-contended" } else { "pick" };
        let mut group = c.benchmark_group(group_name);
        for count in [3usize, 100, 1000] {
            let candidates = candidates(count, &metrics);
            for (name, algorithm) in Algorithm::ALL {
                let balancer: Arc<dyn balancer::Balancer> =
                    Arc::from(balancer::build(algorithm, &candidates, tuning));
                let stop = Arc::new(AtomicBool::new(false));
                let rival = contended.then(|| {
                    let (balancer, stop) = (balancer.clone(), stop.clone());
                    std::thread::spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            black_box(balancer.pick(&context));
                        }
                    })
                });
                group.bench_with_input(BenchmarkId::new(name, count), &count, |b, _| {
                    b.iter(|| black_box(balancer.pick(black_box(&context))))
                });
                stop.store(true, Ordering::Relaxed);
                if let Some(rival) = rival {
                    let _ = rival.join();
                }
            }
        }
        group.finish();
    }
}

fn config_with_backends(count: usize, algorithm: &str) -> String {
    let mut yaml = format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}\nlisteners:\n  web: {{ listen: \"127.0.0.1:0\", pool: big }}\npools:\n  big:\n    algorithm: {algorithm}\n    backends:\n"
    );
    for index in 0..count {
        yaml.push_str(&format!(
            "      - {{ name: vm-{index}, address: \"10.{}.{}.{}:8080\", weight: {} }}\n",
            index / 65536,
            (index / 256) % 256,
            index % 256,
            1 + index % 4
        ));
    }
    yaml
}

fn rebuild(c: &mut Criterion) {
    let path = std::path::Path::new("bench.yaml");
    for algorithm in ["round_robin", "weighted_round_robin", "consistent_hash"] {
        let yaml = config_with_backends(1000, algorithm);
        let config = Arc::new(config::parse(&yaml, path).unwrap_or_else(|error| panic!("{error}")));
        let metrics = Metrics::new().unwrap_or_else(|error| panic!("{error}"));
        let mut facts = StaticFacts::new(metrics.clone());
        c.bench_function(&format!("table rebuild 1000 backends {algorithm}"), |b| {
            b.iter(|| {
                Table::build(config.clone(), SystemTime::now(), 1, &mut facts, &metrics)
                    .map(|table| table.generation)
            })
        });
    }
    let yaml = config_with_backends(1000, "round_robin");
    c.bench_function("config parse+validate 1000 backends", |b| {
        b.iter(|| config::parse(black_box(&yaml), path).map(|config| config.pools.len()))
    });

    let metrics = Metrics::new().unwrap_or_else(|error| panic!("{error}"));
    let mut facts = StaticFacts::new(metrics.clone());
    let initial = Arc::new(config::parse(&yaml, path).unwrap_or_else(|error| panic!("{error}")));
    let shared = arc_swap::ArcSwap::from_pointee(
        Table::build(initial, SystemTime::now(), 1, &mut facts, &metrics)
            .unwrap_or_else(|error| panic!("{error}")),
    );
    c.bench_function("reload 1000 backends (parse, validate, build, swap)", |b| {
        b.iter(|| {
            let config = Arc::new(
                config::parse(black_box(&yaml), path).unwrap_or_else(|error| panic!("{error}")),
            );
            let table = Table::build(config, SystemTime::now(), 2, &mut facts, &metrics)
                .unwrap_or_else(|error| panic!("{error}"));
            shared.store(Arc::new(table));
        })
    });
}

criterion_group!(benches, picks, rebuild);
criterion_main!(benches);
