//! Micro-benchmarks of the request-path pick and of config validation at scale.
//!
//! Run: `cargo bench --bench balancer` (or `-- --quick` for a fast pass).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use gatehouse::balancer::{self, PickContext};
use gatehouse::config::Algorithm;
use std::hint::black_box;

fn picks(c: &mut Criterion) {
    let context = PickContext {
        client_ip: [192, 0, 2, 1].into(),
    };
    let mut group = c.benchmark_group("pick");
    for backends in [3usize, 100, 1000] {
        let weights = vec![1u32; backends];
        for (name, algorithm) in Algorithm::ALL {
            let balancer = balancer::build(algorithm, &weights);
            group.bench_with_input(BenchmarkId::new(name, backends), &backends, |b, _| {
                b.iter(|| black_box(balancer.pick(black_box(&context))))
            });
        }
    }
    group.finish();
}

fn config_with_backends(count: usize) -> String {
    let mut yaml = String::from(
        "admin: { listen: \"127.0.0.1:0\" }\nlisteners:\n  web: { listen: \"127.0.0.1:0\", pool: big }\npools:\n  big:\n    backends:\n",
    );
    for index in 0..count {
        yaml.push_str(&format!(
            "      - {{ name: vm-{index}, address: \"10.{}.{}.{}:8080\" }}\n",
            index / 65536,
            (index / 256) % 256,
            index % 256
        ));
    }
    yaml
}

fn parse_and_validate(c: &mut Criterion) {
    let yaml = config_with_backends(1000);
    let path = std::path::Path::new("bench.yaml");
    c.bench_function("config parse+validate 1000 backends", |b| {
        b.iter(|| gatehouse::config::parse(black_box(&yaml), path).map(|config| config.pools.len()))
    });
}

criterion_group!(benches, picks, parse_and_validate);
criterion_main!(benches);
