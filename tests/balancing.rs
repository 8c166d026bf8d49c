//! Every balancing algorithm through the real proxy: requests spread as configured, hashing
//! is sticky, and load-aware algorithms move traffic away from a slowed backend.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

async fn proxy_over(
    dir: &TestDir,
    backends: &[&TestBackend],
    pool_settings: &str,
    weights: &[&str],
) -> (Arc<gatehouse::server::Gatehouse>, SocketAddr) {
    let mut yaml = format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}
listeners:
  web: {{ listen: \"127.0.0.1:0\", pool: p }}
pools:
  p:
    health_check: {{ type: none }}
{pool_settings}    backends:
"
    );
    for (index, backend) in backends.iter().enumerate() {
        let extra = weights.get(index).copied().unwrap_or("");
        yaml.push_str(&format!(
            "      - {{ name: {}, address: \"{}\"{extra} }}\n",
            backend.name, backend.address
        ));
    }
    let gatehouse = start_gatehouse(dir, &yaml).await;
    let web = gatehouse.listener_address("web").unwrap();
    (gatehouse, web)
}

async fn tally(web: SocketAddr, requests: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..requests {
        let answer = get(web, "x", "/").await;
        *counts.entry(answer.backend().unwrap()).or_insert(0) += 1;
    }
    counts
}

async fn three() -> (TestBackend, TestBackend, TestBackend) {
    (
        TestBackend::start("a").await,
        TestBackend::start("b").await,
        TestBackend::start("c").await,
    )
}

#[tokio::test]
async fn round_robin_takes_turns() {
    let (a, b, c) = three().await;
    let dir = TestDir::new();
    let (_g, web) = proxy_over(&dir, &[&a, &b, &c], "    algorithm: round_robin\n", &[]).await;
    let counts = tally(web, 30).await;
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        vec![10, 10, 10]
    );
}

#[tokio::test]
async fn weighted_round_robin_follows_weights_and_capacity() {
    let (a, b, c) = three().await;
    let dir = TestDir::new();
    let weights = [
        ", weight: 3",
        ", capacity: { cpu: 4, memory_gib: 16 }",
        ", capacity: { cpu: 4, memory_gib: 4 }",
    ];
    let (_g, web) = proxy_over(
        &dir,
        &[&a, &b, &c],
        "    algorithm: weighted_round_robin\n",
        &weights,
    )
    .await;
    // weights 3, 40 (4 cores) and 20 (4 cores but only 4 GiB): a cycle of 63 requests.
    let counts = tally(web, 63).await;
    assert_eq!(counts["a"], 3);
    assert_eq!(counts["b"], 40);
    assert_eq!(counts["c"], 20);
}

#[tokio::test]
async fn random_spreads_by_weight() {
    let (a, b, c) = three().await;
    let dir = TestDir::new();
    let weights = [", weight: 2", ", weight: 1", ", weight: 1"];
    let (_g, web) = proxy_over(&dir, &[&a, &b, &c], "    algorithm: random\n", &weights).await;
    let counts = tally(web, 400).await;
    assert!((140..=260).contains(&counts["a"]), "{counts:?}");
    assert!((60..=140).contains(&counts["b"]), "{counts:?}");
    assert!((60..=140).contains(&counts["c"]), "{counts:?}");
}

#[tokio::test]
async fn load_aware_algorithms_use_every_idle_backend() {
    for algorithm in ["least_connections", "power_of_two", "least_latency"] {
        let (a, b, c) = three().await;
        let dir = TestDir::new();
        let settings = format!("    algorithm: {algorithm}\n");
        let (_g, web) = proxy_over(&dir, &[&a, &b, &c], &settings, &[]).await;
        let counts = tally(web, 60).await;
        assert_eq!(counts.len(), 3, "{algorithm}: {counts:?}");
    }
}

#[tokio::test]
async fn consistent_hash_is_sticky_per_key() {
    let (a, b, c) = three().await;
    let dir = TestDir::new();
    let settings = "    algorithm: consistent_hash\n    hash_key: header:x-citizen-id\n";
    let (_g, web) = proxy_over(&dir, &[&a, &b, &c], settings, &[]).await;
    let mut owners = BTreeMap::new();
    for citizen in 0..60 {
        for _ in 0..3 {
            let answer = send(
                Request::get(format!("http://{web}/"))
                    .header("host", "x")
                    .header("x-citizen-id", format!("citizen-{citizen}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await;
            let backend = answer.backend().unwrap();
            let owner = owners.entry(citizen).or_insert_with(|| backend.clone());
            assert_eq!(*owner, backend, "citizen-{citizen} moved");
        }
    }
    let used: std::collections::BTreeSet<_> = owners.values().collect();
    assert_eq!(used.len(), 3, "keys spread over every backend");

    // Without the header, the source address (always 127.0.0.1 here) is the key.
    let counts = tally(web, 10).await;
    assert_eq!(counts.len(), 1, "{counts:?}");
}

#[tokio::test]
async fn consistent_hash_on_a_cookie() {
    let (a, b, c) = three().await;
    let dir = TestDir::new();
    let settings = "    algorithm: consistent_hash\n    hash_key: cookie:session\n";
    let (_g, web) = proxy_over(&dir, &[&a, &b, &c], settings, &[]).await;
    let mut seen = std::collections::BTreeSet::new();
    for session in 0..30 {
        let mut first = None;
        for _ in 0..3 {
            let answer = send(
                Request::get(format!("http://{web}/"))
                    .header("host", "x")
                    .header("cookie", format!("theme=dark; session=s{session}; lang=fr"))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await;
            let backend = answer.backend().unwrap();
            assert_eq!(first.get_or_insert(backend.clone()), &backend);
        }
        seen.insert(first.unwrap());
    }
    assert!(seen.len() >= 2, "sessions spread: {seen:?}");
}

/// Sends `workers × per_worker` requests concurrently and counts answers per backend.
async fn concurrent_tally(
    web: SocketAddr,
    workers: usize,
    per_worker: usize,
) -> BTreeMap<String, usize> {
    let mut tasks = Vec::new();
    for _ in 0..workers {
        tasks.push(tokio::spawn(async move {
            let mut names = Vec::new();
            for _ in 0..per_worker {
                names.push(get(web, "x", "/").await.backend().unwrap());
            }
            names
        }));
    }
    let mut counts = BTreeMap::new();
    for task in tasks {
        for name in task.await.unwrap() {
            *counts.entry(name).or_insert(0) += 1;
        }
    }
    counts
}

#[tokio::test]
async fn least_connections_and_least_latency_avoid_a_slow_backend() {
    for algorithm in ["least_connections", "least_latency"] {
        let slow = TestBackend::start_delayed("slow", Duration::from_millis(200)).await;
        let fast1 = TestBackend::start("fast1").await;
        let fast2 = TestBackend::start("fast2").await;
        let dir = TestDir::new();
        let settings = format!("    algorithm: {algorithm}\n");
        let (_g, web) = proxy_over(&dir, &[&slow, &fast1, &fast2], &settings, &[]).await;
        let counts = concurrent_tally(web, 6, 20).await;
        let slow_share = counts.get("slow").copied().unwrap_or(0) as f64 / 120.0;
        assert!(
            slow_share < 0.15,
            "{algorithm}: the slow backend got {slow_share:.2} of the traffic: {counts:?}"
        );
    }
}

#[tokio::test]
async fn round_robin_does_not_avoid_a_slow_backend() {
    let slow = TestBackend::start_delayed("slow", Duration::from_millis(50)).await;
    let fast = TestBackend::start("fast").await;
    let dir = TestDir::new();
    let (_g, web) = proxy_over(&dir, &[&slow, &fast], "", &[]).await;
    let counts = concurrent_tally(web, 2, 10).await;
    assert_eq!(
        counts["slow"], 10,
        "the contrast case: blind turns, {counts:?}"
    );
}
