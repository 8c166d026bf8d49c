//! Health checks, passive ejection, the VM lifecycle, retries and the admin API, over real
//! sockets against in-process backends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn pool_block(name: &str, settings: &str, backends: &[(&str, SocketAddr, &str)]) -> String {
    let mut yaml = format!("  {name}:\n{settings}    backends:\n");
    for (backend, address, extra) in backends {
        yaml.push_str(&format!(
            "      - {{ name: {backend}, address: \"{address}\"{extra} }}\n"
        ));
    }
    yaml
}

fn config(pools: &str, admin_extra: &str) -> String {
    format!(
        "admin: {{ listen: \"127.0.0.1:0\"{admin_extra} }}
listeners:
  web: {{ listen: \"127.0.0.1:0\", pool: p }}
pools:
{pools}"
    )
}

async fn spread(web: SocketAddr, requests: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..requests {
        let answer = get(web, "x", "/").await;
        let key = answer
            .backend()
            .unwrap_or_else(|| answer.status.to_string());
        *counts.entry(key).or_insert(0) += 1;
    }
    counts
}

const FAST_HTTP_CHECK: &str = "    health_check: { type: http, path: /healthz, interval: 200ms, timeout: 150ms, healthy_threshold: 2, unhealthy_threshold: 2 }\n";

#[tokio::test]
async fn failing_health_check_stops_traffic_and_recovery_restores_it() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let dir = TestDir::new();
    let pools = pool_block(
        "p",
        FAST_HTTP_CHECK,
        &[("a", a.address, ""), ("b", b.address, "")],
    );
    let gatehouse = start_gatehouse(&dir, &config(&pools, "")).await;
    let web = gatehouse.listener_address("web").unwrap();
    assert_eq!(spread(web, 10).await.len(), 2);

    b.healthy.store(false, Ordering::SeqCst);
    let flipped = Instant::now();
    eventually("b marked down", async || {
        let text = metrics_text(&gatehouse).await;
        metric(&text, "gatehouse_backend_up", &[("backend", "b")]) == Some(0.0)
    })
    .await;
    // unhealthy_threshold × interval + one interval, with room for jitter and a busy machine.
    assert!(
        flipped.elapsed() < Duration::from_millis(2 * 200 + 200 + 1000),
        "{:?}",
        flipped.elapsed()
    );
    let counts = spread(web, 20).await;
    assert_eq!(counts.get("a"), Some(&20), "{counts:?}");

    b.healthy.store(true, Ordering::SeqCst);
    eventually("b back up", async || spread(web, 4).await.contains_key("b")).await;
    let text = metrics_text(&gatehouse).await;
    assert!(
        metric(
            &text,
            "gatehouse_health_checks_total",
            &[("backend", "b"), ("result", "failure")]
        )
        .unwrap()
            >= 2.0
    );
}

#[tokio::test]
async fn a_killed_backend_is_caught_by_http_and_tcp_checks() {
    for check in [
        FAST_HTTP_CHECK,
        "    health_check: { type: tcp, interval: 200ms, timeout: 150ms, unhealthy_threshold: 2 }\n",
    ] {
        let a = TestBackend::start("a").await;
        let b = TestBackend::start("b").await;
        let dir = TestDir::new();
        let pools = pool_block("p", check, &[("a", a.address, ""), ("b", b.address, "")]);
        let gatehouse = start_gatehouse(&dir, &config(&pools, "")).await;
        let web = gatehouse.listener_address("web").unwrap();
        b.stop();
        eventually("b marked down", async || {
            let text = metrics_text(&gatehouse).await;
            metric(&text, "gatehouse_backend_up", &[("backend", "b")]) == Some(0.0)
        })
        .await;
        let counts = spread(web, 10).await;
        assert_eq!(counts.get("a"), Some(&10), "{check}: {counts:?}");
    }
}

#[tokio::test]
async fn a_backend_down_at_start_gets_no_traffic() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    b.healthy.store(false, Ordering::SeqCst);
    let dir = TestDir::new();
    let pools = pool_block(
        "p",
        FAST_HTTP_CHECK,
        &[("a", a.address, ""), ("b", b.address, "")],
    );
    let gatehouse = start_gatehouse(&dir, &config(&pools, "")).await;
    let web = gatehouse.listener_address("web").unwrap();
    let counts = spread(web, 10).await;
    assert_eq!(counts.get("a"), Some(&10), "{counts:?}");
    assert!(b.requests().is_empty());
}

#[tokio::test]
async fn passive_ejection_and_return() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let dir = TestDir::new();
    let settings = "    health_check: { type: none }\n    passive: { consecutive_failures: 3, ejection: 1s }\n    retries: { attempts: 1 }\n";
    let pools = pool_block("p", settings, &[("a", a.address, ""), ("b", b.address, "")]);
    let gatehouse = start_gatehouse(&dir, &config(&pools, "")).await;
    let web = gatehouse.listener_address("web").unwrap();

    b.failing.store(true, Ordering::SeqCst);
    let counts = spread(web, 6).await;
    assert_eq!(
        counts.get("500"),
        None,
        "500 comes from the backend, labelled: {counts:?}"
    );
    eventually("b ejected", async || {
        let text = metrics_text(&gatehouse).await;
        metric(&text, "gatehouse_backend_up", &[("backend", "b")]) == Some(0.0)
    })
    .await;
    b.failing.store(false, Ordering::SeqCst);
    let during = spread(web, 10).await;
    assert_eq!(
        during.get("a"),
        Some(&10),
        "ejected b gets nothing: {during:?}"
    );
    eventually("b readmitted", async || {
        spread(web, 4).await.contains_key("b")
    })
    .await;
}

#[tokio::test]
async fn draining_finishes_in_flight_requests_and_takes_no_new_ones() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let dir = TestDir::new();
    let pools = pool_block(
        "p",
        "    health_check: { type: none }\n",
        &[("a", a.address, ""), ("b", b.address, ", state: disabled")],
    );
    let gatehouse = start_gatehouse(&dir, &config(&pools, "")).await;
    let web = gatehouse.listener_address("web").unwrap();
    let admin = gatehouse.admin_address();

    let slow = tokio::spawn(async move { get(web, "x", "/slow?ms=1000").await });
    eventually("slow request in flight on a", async || {
        !a.requests().is_empty()
    })
    .await;
    for (backend, state) in [("b", "active"), ("a", "draining")] {
        let answer = put_state(admin, backend, state, None).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }
    let counts = spread(web, 10).await;
    assert_eq!(
        counts.get("b"),
        Some(&10),
        "draining a takes nothing new: {counts:?}"
    );
    let slow = slow.await.unwrap();
    assert_eq!(slow.status, StatusCode::OK);
    assert_eq!(
        slow.backend().as_deref(),
        Some("a"),
        "the in-flight request finished on a"
    );

    let status = status_json(admin).await;
    let backends = &status["pools"][0]["backends"];
    assert_eq!(backends[0]["state"], "draining");
    assert_eq!(backends[1]["state"], "active");
}

#[tokio::test]
async fn disabled_takes_nothing_and_state_survives_a_reload() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let c = TestBackend::start("c").await;
    let dir = TestDir::new();
    let pools = pool_block(
        "p",
        "    health_check: { type: none }\n",
        &[("a", a.address, ""), ("b", b.address, "")],
    );
    let gatehouse = start_gatehouse(&dir, &config(&pools, "")).await;
    let web = gatehouse.listener_address("web").unwrap();
    let admin = gatehouse.admin_address();
    assert_eq!(
        put_state(admin, "b", "disabled", None).await.status,
        StatusCode::OK
    );
    let counts = spread(web, 8).await;
    assert_eq!(counts.get("a"), Some(&8), "{counts:?}");

    let pools = pool_block(
        "p",
        "    health_check: { type: none }\n",
        &[
            ("a", a.address, ""),
            ("b", b.address, ""),
            ("c", c.address, ""),
        ],
    );
    dir.write("gatehouse.yaml", &config(&pools, ""));
    let reload = send(
        Request::post(format!("http://{admin}/api/v1/reload"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(reload.status, StatusCode::OK, "{}", reload.text());
    let changes: serde_json::Value = serde_json::from_slice(&reload.body).unwrap();
    assert_eq!(changes["result"], "success");
    assert!(
        changes["changes"].to_string().contains("backend c added"),
        "{changes}"
    );

    let counts = spread(web, 12).await;
    assert_eq!(
        counts.get("b"),
        None,
        "b stays disabled after the reload: {counts:?}"
    );
    assert_eq!(counts.len(), 2);
    let status = status_json(admin).await;
    assert_eq!(status["pools"][0]["backends"][1]["state"], "disabled");
}

#[tokio::test]
async fn mutating_admin_calls_need_the_token() {
    let a = TestBackend::start("a").await;
    let dir = TestDir::new();
    dir.write("token", "  s3cret-token\n");
    let pools = pool_block(
        "p",
        "    health_check: { type: none }\n",
        &[("a", a.address, "")],
    );
    let gatehouse = start_gatehouse(&dir, &config(&pools, ", token_file: token")).await;
    let admin = gatehouse.admin_address();

    let missing = put_state(admin, "a", "draining", None).await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    assert!(
        serde_json::from_slice::<serde_json::Value>(&missing.body).unwrap()["error"].is_string()
    );
    let wrong = put_state(admin, "a", "draining", Some("s3cret-tokeN")).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let reload = send(
        Request::post(format!("http://{admin}/api/v1/reload"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(reload.status, StatusCode::UNAUTHORIZED);
    let right = put_state(admin, "a", "draining", Some("s3cret-token")).await;
    assert_eq!(right.status, StatusCode::OK);
    assert_eq!(
        get(admin, "admin", "/api/v1/status").await.status,
        StatusCode::OK,
        "GETs need no token"
    );
}

#[tokio::test]
async fn admin_errors_are_json() {
    let a = TestBackend::start("a").await;
    let dir = TestDir::new();
    let pools = pool_block(
        "p",
        "    health_check: { type: none }\n",
        &[("a", a.address, "")],
    );
    let gatehouse = start_gatehouse(&dir, &config(&pools, "")).await;
    let admin = gatehouse.admin_address();
    let cases = [
        (
            put_state(admin, "ghost", "draining", None).await,
            StatusCode::NOT_FOUND,
        ),
        (
            put_state(admin, "a", "sleeping", None).await,
            StatusCode::BAD_REQUEST,
        ),
        (
            get(admin, "admin", "/api/v1/nothing").await,
            StatusCode::NOT_FOUND,
        ),
        (
            send(
                Request::delete(format!("http://{admin}/api/v1/status"))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await,
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            send(
                Request::put(format!("http://{admin}/api/v1/pools/p/backends/a/state"))
                    .body(Full::new(Bytes::from(vec![b' '; 100_000])))
                    .unwrap(),
            )
            .await,
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ];
    for (answer, status) in cases {
        assert_eq!(answer.status, status, "{}", answer.text());
        let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{body}"
        );
    }
    assert_eq!(get(admin, "admin", "/healthz").await.status, StatusCode::OK);
    assert_eq!(get(admin, "admin", "/readyz").await.status, StatusCode::OK);
}

#[tokio::test]
async fn with_checks_off_a_closed_port_costs_no_request() {
    let live = TestBackend::start("live").await;
    let dir = TestDir::new();
    let pools = pool_block(
        "p",
        "    health_check: { type: none }\n",
        &[("dead", closed_port(), ""), ("live", live.address, "")],
    );
    let gatehouse = start_gatehouse(&dir, &config(&pools, "")).await;
    let web = gatehouse.listener_address("web").unwrap();
    for index in 0..20 {
        assert_eq!(
            get(web, "x", "/").await.status,
            StatusCode::OK,
            "GET {index}"
        );
        let post = send(
            Request::post(format!("http://{web}/submit"))
                .header("host", "x")
                .body(Full::new(Bytes::from(format!("form {index}"))))
                .unwrap(),
        )
        .await;
        assert_eq!(post.status, StatusCode::OK, "POST {index}: {}", post.text());
    }
    let posts: Vec<_> = live
        .requests()
        .into_iter()
        .filter(|s| s.method == "POST")
        .collect();
    assert_eq!(posts.len(), 20);
    assert!(
        posts.iter().all(|s| s.body_len > 0),
        "bodies arrived intact after a connect retry"
    );
    let text = metrics_text(&gatehouse).await;
    assert!(metric(&text, "gatehouse_upstream_retries_total", &[("pool", "p")]).unwrap() >= 1.0);
    assert_eq!(
        metric(&text, "gatehouse_backend_up", &[("backend", "dead")]),
        Some(0.0),
        "passive health ejected the dead backend"
    );
}

#[tokio::test]
async fn a_resetting_backend_retries_gets_but_never_replays_posts() {
    let good = TestBackend::start("good").await;
    let (resetter, reset_lines) = resetting_backend().await;
    let dir = TestDir::new();
    let pools = pool_block(
        "p",
        "    health_check: { type: none }\n    passive: { consecutive_failures: 0 }\n",
        &[("resetter", resetter, ""), ("good", good.address, "")],
    );
    let gatehouse = start_gatehouse(&dir, &config(&pools, "")).await;
    let web = gatehouse.listener_address("web").unwrap();
    for _ in 0..10 {
        assert_eq!(get(web, "x", "/page").await.status, StatusCode::OK);
    }
    let mut ok = 0;
    let mut failed = 0;
    for index in 0..10 {
        let post = send(
            Request::post(format!("http://{web}/pay"))
                .header("host", "x")
                .body(Full::new(Bytes::from(format!("payment {index}"))))
                .unwrap(),
        )
        .await;
        match post.status {
            StatusCode::OK => ok += 1,
            StatusCode::BAD_GATEWAY => failed += 1,
            other => panic!("unexpected {other}"),
        }
    }
    let reset_posts = reset_lines
        .lock()
        .unwrap()
        .iter()
        .filter(|line| line.starts_with("POST"))
        .count();
    assert!(failed > 0, "some POSTs went to the resetting backend");
    assert_eq!(
        reset_posts, failed,
        "each failed POST reached the resetter once"
    );
    assert_eq!(
        good.count("POST"),
        ok,
        "no POST was replayed on the good backend"
    );
}

#[tokio::test]
async fn fail_open_sends_to_unhealthy_backends_instead_of_503() {
    for (fail_open, expected) in [
        (false, StatusCode::SERVICE_UNAVAILABLE),
        (true, StatusCode::OK),
    ] {
        let a = TestBackend::start("a").await;
        a.healthy.store(false, Ordering::SeqCst);
        let dir = TestDir::new();
        let settings = format!("{FAST_HTTP_CHECK}    fail_open: {fail_open}\n");
        let pools = pool_block("p", &settings, &[("a", a.address, "")]);
        let gatehouse = start_gatehouse(&dir, &config(&pools, "")).await;
        let web = gatehouse.listener_address("web").unwrap();
        assert_eq!(
            get(web, "x", "/").await.status,
            expected,
            "fail_open: {fail_open}"
        );
    }
}

async fn put_state(admin: SocketAddr, backend: &str, state: &str, token: Option<&str>) -> Answer {
    let mut request = Request::put(format!(
        "http://{admin}/api/v1/pools/p/backends/{backend}/state"
    ))
    .header("content-type", "application/json");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    send(
        request
            .body(Full::new(Bytes::from(format!("{{\"state\":\"{state}\"}}"))))
            .unwrap(),
    )
    .await
}

async fn status_json(admin: SocketAddr) -> serde_json::Value {
    serde_json::from_slice(&get(admin, "admin", "/api/v1/status").await.body).unwrap()
}

#[tokio::test]
async fn a_full_backend_is_skipped_like_a_down_one() {
    let a = TestBackend::start_delayed("a", Duration::from_millis(800)).await;
    let b = TestBackend::start_delayed("b", Duration::from_millis(800)).await;
    let dir = TestDir::new();
    let pools = pool_block(
        "p",
        "    health_check: { type: none }\n    max_connections_per_backend: 1\n    retries: { attempts: 1 }\n",
        &[("a", a.address, ""), ("b", b.address, "")],
    );
    let gatehouse = start_gatehouse(&dir, &config(&pools, "")).await;
    let web = gatehouse.listener_address("web").unwrap();
    let admin = gatehouse.admin_address();
    let in_flight = async move || {
        let status = status_json(admin).await;
        let backends = status["pools"][0]["backends"].as_array().unwrap().clone();
        backends
            .iter()
            .map(|b| b["active_requests"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    let first = tokio::spawn(async move { get(web, "x", "/").await });
    eventually("one request in flight", async || {
        in_flight().await.iter().sum::<u64>() == 1
    })
    .await;
    let second = tokio::spawn(async move { get(web, "x", "/").await });
    eventually("two requests in flight", async || {
        in_flight().await.iter().sum::<u64>() == 2
    })
    .await;
    assert_eq!(in_flight().await, vec![1, 1], "each backend holds one");
    let third = get(web, "x", "/").await;
    assert_eq!(
        third.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "both full: 503"
    );
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(second.status, StatusCode::OK);
    assert_ne!(first.backend(), second.backend());
}
