//! Idle keep-alive HTTP/1 connections park — hyper's per-connection state is released while
//! the socket stays open — and serve what the client sends next exactly as before: a whole
//! request, a head split across the pause, pipelined requests, a body. A parked connection
//! still gets 408 when its next head is late, and neither a slow backend nor a slow response
//! makes a connection park before its answer is complete. TLS connections park the same way.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use gatehouse::server::Gatehouse;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `gatehouse_connections_idle{listener="web"}`.
async fn idle(gatehouse: &Gatehouse) -> f64 {
    let text = metrics_text(gatehouse).await;
    metric(&text, "gatehouse_connections_idle", &[("listener", "web")]).unwrap_or(-1.0)
}

/// `gatehouse_rejected_total{listener="web",reason="header_timeout"}`.
async fn late_heads(gatehouse: &Gatehouse) -> Option<f64> {
    let text = metrics_text(gatehouse).await;
    metric(
        &text,
        "gatehouse_rejected_total",
        &[("listener", "web"), ("reason", "header_timeout")],
    )
}

async fn connect(web: SocketAddr) -> TcpStream {
    TcpStream::connect(web).await.unwrap()
}

/// A connection to `web` that sent one request, read its answer and has parked since.
async fn parked_connection(gatehouse: &Gatehouse, web: SocketAddr) -> TcpStream {
    let mut client = connect(web).await;
    let mut received = Vec::new();
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut client, &mut received, |text| {
        text.contains("backend=b")
    })
    .await;
    eventually("the idle connection parks", async || {
        idle(gatehouse).await == 1.0
    })
    .await;
    client
}

#[tokio::test]
async fn an_idle_keep_alive_connection_parks_and_serves_what_follows() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let (gatehouse, web) = single_pool_gatehouse(&dir, &[("b", backend.address)], "", "").await;
    let mut client = connect(web).await;
    let mut received = Vec::new();
    let answers = |n: usize| move |text: &str| text.matches("backend=b").count() == n;

    client
        .write_all(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut client, &mut received, answers(1)).await;
    eventually("the idle connection parks", async || {
        idle(&gatehouse).await == 1.0
    })
    .await;

    // A head split across the pause: its first bytes wake the connection, the rest follows
    // with a pipelined request behind it.
    client.write_all(b"GET /two HTTP/1.1\r\nHo").await.unwrap();
    eventually("the connection wakes", async || {
        idle(&gatehouse).await == 0.0
    })
    .await;
    client
        .write_all(b"st: x\r\n\r\nGET /three HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut client, &mut received, answers(3)).await;
    eventually("it parks again", async || idle(&gatehouse).await == 1.0).await;

    client
        .write_all(b"POST /four HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        .await
        .unwrap();
    read_until(&mut client, &mut received, answers(4)).await;

    let text = String::from_utf8_lossy(&received);
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 4, "{text}");
    assert!(!text.to_ascii_lowercase().contains("connection: close"));
    let seen = backend.requests();
    let paths: Vec<&str> = seen.iter().map(|request| request.uri.as_str()).collect();
    assert_eq!(paths, ["/one", "/two", "/three", "/four"]);
    assert_eq!(seen[3].body_len, 5);
    let metrics = metrics_text(&gatehouse).await;
    assert_eq!(
        metric(
            &metrics,
            "gatehouse_connections_total",
            &[("listener", "web")]
        ),
        Some(1.0),
        "every request came over the one connection"
    );
}

#[tokio::test]
async fn a_parked_connection_still_answers_408_when_its_next_head_is_late() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let (gatehouse, web) = single_pool_gatehouse(
        &dir,
        &[("b", backend.address)],
        ", limits: { header_timeout: 1500ms }",
        "",
    )
    .await;
    let mut client = parked_connection(&gatehouse, web).await;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut rest))
        .await
        .expect("the connection closes")
        .unwrap();
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.starts_with("HTTP/1.1 408"), "{rest:?}");
    assert_eq!(late_heads(&gatehouse).await, Some(1.0));
    assert_eq!(idle(&gatehouse).await, 0.0);
}

#[tokio::test]
async fn a_slow_response_never_parks_half_way() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let (gatehouse, web) = single_pool_gatehouse(&dir, &[("b", backend.address)], "", "").await;
    let mut client = connect(web).await;
    let mut received = Vec::new();
    // Three chunks 600 ms apart: the connection is silent for more than two idle checks
    // while the response is still open.
    client
        .write_all(b"GET /stream?chunks=3&ms=600 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let reading = async {
        let mut buffer = [0u8; 4096];
        while !String::from_utf8_lossy(&received).contains("\r\n0\r\n\r\n") {
            tokio::select! {
                n = client.read(&mut buffer) => {
                    let n = n.unwrap();
                    assert!(n > 0, "closed early");
                    received.extend_from_slice(&buffer[..n]);
                }
                () = tokio::time::sleep(Duration::from_millis(100)) => {
                    assert_eq!(idle(&gatehouse).await, 0.0, "parked with a response open");
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), reading)
        .await
        .expect("the whole stream arrives");
    let text = String::from_utf8_lossy(&received);
    assert!(
        text.contains("chunk 0") && text.contains("chunk 1") && text.contains("chunk 2"),
        "{text}"
    );
    eventually("the connection parks once the response ended", async || {
        idle(&gatehouse).await == 1.0
    })
    .await;
    client
        .write_all(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut client, &mut received, |text| {
        text.contains("backend=b")
    })
    .await;
}

#[tokio::test]
async fn a_tls_connection_parks_and_serves_its_next_request() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let ca = TestCa::new();
    ca.leaf(&dir, "portal", &["portal.example.gov"]);
    let yaml = format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}
listeners:
  web:
    listen: \"127.0.0.1:0\"
    protocol: https
    tls: {{ certificates: [ {{ cert: portal.crt, key: portal.key }} ] }}
    pool: p
pools:
{}",
        pool_yaml("p", &[("b", backend.address)], "")
    );
    let gatehouse = start_gatehouse(&dir, &yaml).await;
    let web = gatehouse.listener_address("web").unwrap();
    let name = rustls::pki_types::ServerName::try_from("portal.example.gov").unwrap();
    let mut client = tokio_rustls::TlsConnector::from(ca.client_config(&[b"http/1.1"]))
        .connect(name, connect(web).await)
        .await
        .unwrap();
    let mut received = Vec::new();
    let request = b"GET / HTTP/1.1\r\nHost: portal.example.gov\r\n\r\n";
    client.write_all(request).await.unwrap();
    read_until(&mut client, &mut received, |text| {
        text.matches("backend=b").count() == 1
    })
    .await;
    eventually("the idle TLS connection parks", async || {
        idle(&gatehouse).await == 1.0
    })
    .await;
    client.write_all(request).await.unwrap();
    read_until(&mut client, &mut received, |text| {
        text.matches("backend=b").count() == 2
    })
    .await;
    assert_eq!(backend.requests().len(), 2);
    eventually("it parks again", async || idle(&gatehouse).await == 1.0).await;
}

#[tokio::test]
async fn a_parked_connection_can_upgrade_to_a_websocket_tunnel() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let (gatehouse, web) = single_pool_gatehouse(&dir, &[("b", backend.address)], "", "").await;
    let mut client = parked_connection(&gatehouse, web).await;
    let mut received = Vec::new();
    client.write_all(WEBSOCKET_REQUEST).await.unwrap();
    read_until(&mut client, &mut received, |text| {
        text.contains("HTTP/1.1 101") && text.ends_with("\r\n\r\n")
    })
    .await;
    client.write_all(b"hello tunnel").await.unwrap();
    read_until(&mut client, &mut received, |text| {
        text.ends_with("hello tunnel")
    })
    .await;
    // Absence needs a window: over several idle checks, the quiet tunnel never parks.
    let window = std::time::Instant::now();
    while window.elapsed() < Duration::from_millis(300) {
        assert_eq!(idle(&gatehouse).await, 0.0, "a tunnel never parks");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.write_all(b"still open").await.unwrap();
    read_until(&mut client, &mut received, |text| {
        text.ends_with("still open")
    })
    .await;
}

#[tokio::test]
async fn a_head_begun_while_parked_must_still_arrive_by_the_parked_deadline() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let (gatehouse, web) = single_pool_gatehouse(
        &dir,
        &[("b", backend.address)],
        ", limits: { header_timeout: 2s }",
        "",
    )
    .await;
    let mut client = connect(web).await;
    let mut received = Vec::new();
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut client, &mut received, |text| {
        text.contains("backend=b")
    })
    .await;
    let answered = std::time::Instant::now();
    eventually("the idle connection parks", async || {
        idle(&gatehouse).await == 1.0
    })
    .await;
    // Half a head one second into the two the idle connection has: the rest never comes.
    // The time is the behaviour under test, so this waits for it.
    tokio::time::sleep_until((answered + Duration::from_secs(1)).into()).await;
    client.write_all(b"GET /late HTTP/1.1\r\nHo").await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut rest))
        .await
        .expect("the connection closes")
        .unwrap();
    let waited = answered.elapsed();
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.starts_with("HTTP/1.1 408"), "{rest:?}");
    // Held to the deadline counted from the pause (≈ 2 s), not a fresh 2 s from the first
    // byte of the head (≈ 3 s).
    assert!(
        waited < Duration::from_millis(2600),
        "408 after {waited:?}, the parked deadline was ≈ 2 s"
    );
    assert_eq!(
        backend.requests().len(),
        1,
        "the late head never reached the backend"
    );
    assert_eq!(late_heads(&gatehouse).await, Some(1.0));
}

#[tokio::test]
async fn a_connection_waiting_for_a_slow_backend_does_not_park() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let (gatehouse, web) = single_pool_gatehouse(&dir, &[("b", backend.address)], "", "").await;
    let mut client = connect(web).await;
    let mut received = Vec::new();
    // The backend answers after 700 ms: the client connection is silent for several idle
    // checks before the response head exists. Ending the session then would make hyper
    // close the connection after this response (and say so in its head). The request has a
    // body, so hyper serves it (gatehouse's own loop never parks with a request in flight).
    client
        .write_all(b"POST /slow?ms=700 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        .await
        .unwrap();
    read_until(&mut client, &mut received, |text| {
        text.contains("backend=b")
    })
    .await;
    let text = String::from_utf8_lossy(&received).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(!text.contains("connection: close"), "{text}");
    eventually("the connection parks once answered", async || {
        idle(&gatehouse).await == 1.0
    })
    .await;
    client
        .write_all(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut client, &mut received, |text| {
        text.matches("backend=b").count() == 2
    })
    .await;
}

/// `gatehouse_connections_active{listener="web"}`.
async fn active(gatehouse: &Gatehouse) -> f64 {
    let text = metrics_text(gatehouse).await;
    metric(
        &text,
        "gatehouse_connections_active",
        &[("listener", "web")],
    )
    .unwrap_or(-1.0)
}

#[tokio::test]
async fn connections_that_end_while_waiting_leave_the_open_and_idle_counts() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let (gatehouse, web) = single_pool_gatehouse(&dir, &[("b", backend.address)], "", "").await;
    // Silent since accept: they wait in the listener's waiting room, without a task.
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(connect(web).await);
    }
    eventually("three open connections", async || {
        active(&gatehouse).await == 3.0
    })
    .await;
    let parked = parked_connection(&gatehouse, web).await;
    assert_eq!(active(&gatehouse).await, 4.0);
    drop(silent);
    drop(parked);
    eventually("no open and no idle connection left", async || {
        active(&gatehouse).await == 0.0 && idle(&gatehouse).await == 0.0
    })
    .await;
    assert_eq!(late_heads(&gatehouse).await.unwrap_or(0.0), 0.0);
}
