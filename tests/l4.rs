//! Layer 4 over real sockets: TCP and TLS-terminated TCP listeners, failover, half-close,
//! least connections with long-lived tunnels, the PROXY protocol in both directions, and
//! access control at accept time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use gatehouse::proxy_protocol;
use http::StatusCode;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP echo server counting the connections it accepted.
async fn echo_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = socket.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = socket.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut reader, mut writer) = stream.split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            });
        }
    });
    (address, accepted)
}

/// A server that reads everything until the client half-closes, then answers with the byte
/// count and closes.
async fn counting_server() -> SocketAddr {
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = socket.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = socket.accept().await {
            tokio::spawn(async move {
                let mut received = Vec::new();
                let _ = stream.read_to_end(&mut received).await;
                let _ = stream
                    .write_all(format!("got {} bytes", received.len()).as_bytes())
                    .await;
            });
        }
    });
    address
}

/// A server recording the first bytes of each connection, answering a minimal HTTP response.
async fn recording_server() -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = socket.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = socket.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 4096];
                let mut received = Vec::new();
                let head_complete = |received: &[u8]| {
                    let start = match proxy_protocol::parse(received) {
                        Ok(Some((_, used))) => used,
                        _ => return false,
                    };
                    received[start..].windows(4).any(|w| w == b"\r\n\r\n")
                };
                while !head_complete(&received) {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => received.extend_from_slice(&buffer[..n]),
                    }
                }
                record.lock().unwrap().push(received);
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    (address, seen)
}

fn tcp_config(
    pool_settings: &str,
    backends: &[(&str, SocketAddr)],
    listener_extra: &str,
) -> String {
    let mut yaml = format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}
access_log: {{ target: access.log }}
listeners:
  db: {{ listen: \"127.0.0.1:0\", protocol: tcp, pool: p{listener_extra} }}
pools:
  p:
    health_check: {{ type: none }}
{pool_settings}    backends:
"
    );
    for (name, address) in backends {
        yaml.push_str(&format!(
            "      - {{ name: {name}, address: \"{address}\" }}\n"
        ));
    }
    yaml
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

#[tokio::test]
async fn ten_mib_of_random_bytes_both_ways_intact() {
    let (echo, _) = echo_server().await;
    let dir = TestDir::new();
    let gatehouse = start_gatehouse(&dir, &tcp_config("", &[("echo", echo)], "")).await;
    let db = gatehouse.listener_address("db").unwrap();
    let payload = random_bytes(10 * 1024 * 1024);
    let stream = TcpStream::connect(db).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let sent = payload.clone();
    let writing = tokio::spawn(async move {
        writer.write_all(&sent).await.unwrap();
        writer.shutdown().await.unwrap();
    });
    let mut received = Vec::with_capacity(payload.len());
    tokio::time::timeout(DEADLINE, reader.read_to_end(&mut received))
        .await
        .unwrap()
        .unwrap();
    writing.await.unwrap();
    assert_eq!(received.len(), payload.len());
    assert!(received == payload, "the echoed bytes differ");
    let text = metrics_text(&gatehouse).await;
    assert!(
        metric(
            &text,
            "gatehouse_bytes_received_total",
            &[("listener", "db")]
        )
        .unwrap()
            >= payload.len() as f64
    );
    assert!(
        metric(&text, "gatehouse_bytes_sent_total", &[("listener", "db")]).unwrap()
            >= payload.len() as f64
    );
}

/// A server that hands each connection it accepts to the test, which plays the backend.
async fn held_server() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<TcpStream>) {
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = socket.local_addr().unwrap();
    let (accepted, held) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = socket.accept().await {
            let _ = accepted.send(stream);
        }
    });
    (address, held)
}

#[tokio::test]
async fn a_tunnel_idle_for_timeouts_idle_is_closed_and_a_side_that_stopped_reading_reset() {
    let (backend, mut held) = held_server().await;
    let dir = TestDir::new();
    let pool = "    timeouts: { idle: 1s }\n";
    let gatehouse = start_gatehouse(&dir, &tcp_config(pool, &[("b", backend)], "")).await;
    let db = gatehouse.listener_address("db").unwrap();
    let flood = vec![b'x'; 32 << 20];

    // Silent both ways after an exchange: closed (not reset), the bytes logged.
    let mut quiet = TcpStream::connect(db).await.unwrap();
    quiet.write_all(b"ping").await.unwrap();
    let mut quiet_backend = held.recv().await.unwrap();
    let mut ping = [0u8; 4];
    quiet_backend.read_exact(&mut ping).await.unwrap();
    quiet_backend.write_all(b"pong!").await.unwrap();
    let mut pong = [0u8; 5];
    quiet.read_exact(&mut pong).await.unwrap();
    // The client stops reading while the backend floods it.
    let mut stalled = small_window_client(db).await;
    stalled.write_all(b"go").await.unwrap();
    let mut flooding = held.recv().await.unwrap();
    let sent = flood.clone();
    tokio::spawn(async move { flooding.write_all(&sent).await });
    // The backend stops reading while the client floods it.
    let flooding_client = TcpStream::connect(db).await.unwrap();
    let mut deaf_backend = held.recv().await.unwrap();
    let (_client_reader, mut client_writer) = flooding_client.into_split();
    tokio::spawn(async move { client_writer.write_all(&flood).await });

    let mut lines: Vec<serde_json::Value> = Vec::new();
    eventually("three access-log lines", async || {
        lines = access_log_lines(&dir);
        lines.len() == 3
    })
    .await;
    let line_of = |stream: &TcpStream| {
        let address = stream.local_addr().unwrap().to_string();
        lines
            .iter()
            .find(|line| line["client"] == address.as_str())
            .unwrap_or_else(|| panic!("no line for {address} in {lines:?}"))
            .clone()
    };
    let quiet_line = line_of(&quiet);
    assert_eq!(quiet_line["error"], "no byte either way for timeouts.idle");
    assert_eq!(
        (
            quiet_line["bytes_in"].as_u64(),
            quiet_line["bytes_out"].as_u64()
        ),
        (Some(4), Some(5))
    );
    let mut rest = Vec::new();
    let read = tokio::time::timeout(DEADLINE, quiet.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0))), "closed normally: {read:?}");

    let stalled_line = line_of(&stalled);
    assert_eq!(
        stalled_line["error"],
        "client took nothing for timeouts.idle"
    );
    assert!(
        stalled_line["bytes_out"].as_u64().unwrap() > 0,
        "{stalled_line}"
    );
    // Reset, so the kernel dropped its queue.
    bytes_before_reset(&mut stalled, "stalled client").await;

    let deaf_line = lines
        .iter()
        .find(|line| line["error"] == "backend took nothing for timeouts.idle")
        .unwrap_or_else(|| panic!("no stalled backend in {lines:?}"));
    assert!(deaf_line["bytes_in"].as_u64().unwrap() > 0, "{deaf_line}");
    bytes_before_reset(&mut deaf_backend, "deaf backend").await;
}

/// A backend that resets the connection mid-exchange ends the tunnel as failed: the client's
/// connection closes, and the access log says how (`tunnel: ` and the backend's error).
#[tokio::test]
async fn a_backend_reset_is_logged_as_the_tunnel_failing() {
    let (resetting, seen) = resetting_backend().await;
    let dir = TestDir::new();
    let gatehouse = start_gatehouse(&dir, &tcp_config("", &[("r", resetting)], "")).await;
    let db = gatehouse.listener_address("db").unwrap();
    let mut client = TcpStream::connect(db).await.unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(DEADLINE, client.read_to_end(&mut rest)).await;
    assert!(
        ended.is_ok(),
        "the client's connection ends with the tunnel"
    );
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(seen.lock().unwrap().as_slice(), ["GET / HTTP/1.1"]);
    let mut lines = Vec::new();
    eventually("the tunnel's access-log line", async || {
        lines = access_log_lines(&dir);
        !lines.is_empty()
    })
    .await;
    let error = lines[0]["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("tunnel: ") && error.to_lowercase().contains("reset"),
        "{}",
        lines[0]
    );
    assert_eq!(lines[0]["backend"], "r");
    assert_eq!(lines[0]["bytes_in"].as_u64(), Some(27));
}

#[tokio::test]
async fn half_close_keeps_the_other_direction_open() {
    let counting = counting_server().await;
    let dir = TestDir::new();
    let gatehouse = start_gatehouse(&dir, &tcp_config("", &[("c", counting)], "")).await;
    let db = gatehouse.listener_address("db").unwrap();
    let mut stream = TcpStream::connect(db).await.unwrap();
    stream.write_all(&[7u8; 100_000]).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(DEADLINE, stream.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, "got 100000 bytes");
    let log_path = dir.path("access.log");
    eventually("the L4 access-log line", async || {
        std::fs::read_to_string(&log_path).is_ok_and(|text| text.contains("\"kind\":\"tcp\""))
    })
    .await;
    let line: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&log_path)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(line["bytes_in"], 100_000);
    assert_eq!(line["bytes_out"], 16);
    assert_eq!(line["backend"], "c");
}

#[tokio::test]
async fn connect_failures_fail_over_to_another_backend() {
    let (echo, accepted) = echo_server().await;
    let dir = TestDir::new();
    let gatehouse = start_gatehouse(
        &dir,
        &tcp_config("", &[("dead", closed_port()), ("echo", echo)], ""),
    )
    .await;
    let db = gatehouse.listener_address("db").unwrap();
    for index in 0..10u8 {
        let mut stream = TcpStream::connect(db).await.unwrap();
        stream.write_all(&[index; 3]).await.unwrap();
        let mut echoed = [0u8; 3];
        tokio::time::timeout(DEADLINE, stream.read_exact(&mut echoed))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(echoed, [index; 3]);
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 10);
}

#[tokio::test]
async fn least_connections_balances_long_lived_tunnels() {
    let (a, accepted_a) = echo_server().await;
    let (b, accepted_b) = echo_server().await;
    let dir = TestDir::new();
    let gatehouse = start_gatehouse(
        &dir,
        &tcp_config(
            "    algorithm: least_connections\n",
            &[("a", a), ("b", b)],
            "",
        ),
    )
    .await;
    let db = gatehouse.listener_address("db").unwrap();
    let mut open = Vec::new();
    for index in 0..6u8 {
        let mut stream = TcpStream::connect(db).await.unwrap();
        stream.write_all(&[index]).await.unwrap();
        let mut echoed = [0u8; 1];
        stream.read_exact(&mut echoed).await.unwrap();
        open.push(stream);
    }
    assert_eq!(accepted_a.load(Ordering::SeqCst), 3);
    assert_eq!(accepted_b.load(Ordering::SeqCst), 3);
    let status = get(gatehouse.admin_address(), "admin", "/api/v1/status").await;
    let status: serde_json::Value = serde_json::from_slice(&status.body).unwrap();
    assert_eq!(status["pools"][0]["backends"][0]["active_requests"], 3);
    drop(open);
}

#[tokio::test]
async fn tls_terminated_tcp() {
    let (echo, _) = echo_server().await;
    let dir = TestDir::new();
    let ca = TestCa::new();
    ca.leaf(&dir, "db", &["db.example.gov"]);
    let yaml = tcp_config("", &[("echo", echo)], "").replace(
        "protocol: tcp, pool: p",
        "protocol: tls, tls: { certificates: [ { cert: db.crt, key: db.key } ] }, pool: p",
    );
    let gatehouse = start_gatehouse(&dir, &yaml).await;
    let db = gatehouse.listener_address("db").unwrap();
    let connector = tokio_rustls::TlsConnector::from(ca.client_config(&[]));
    let tcp = TcpStream::connect(db).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("db.example.gov").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(b"over tls").await.unwrap();
    let mut echoed = [0u8; 8];
    tokio::time::timeout(DEADLINE, tls.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echoed, b"over tls");
}

fn proxied_http_config(backend: SocketAddr, listener_extra: &str) -> String {
    format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}
access_log: {{ target: access.log }}
listeners:
  web: {{ listen: \"127.0.0.1:0\", pool: p, proxy_protocol: true, limits: {{ header_timeout: 500ms }}{listener_extra} }}
pools:
{}",
        pool_yaml("p", &[("b", backend)], "")
    )
}

#[tokio::test]
async fn proxy_protocol_v1_and_v2_give_the_real_client_address() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let gatehouse = start_gatehouse(&dir, &proxied_http_config(backend.address, "")).await;
    let web = gatehouse.listener_address("web").unwrap();
    let request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

    let mut v1 = b"PROXY TCP4 203.0.113.5 198.51.100.1 40000 443\r\n".to_vec();
    v1.extend_from_slice(request);
    assert!(raw_exchange(web, &v1).await.starts_with("HTTP/1.1 200"));
    let mut v2 = proxy_protocol::encode_v2(
        "[2001:db8::7]:5555".parse().unwrap(),
        "[2001:db8::1]:443".parse().unwrap(),
    );
    v2.extend_from_slice(request);
    assert!(raw_exchange(web, &v2).await.starts_with("HTTP/1.1 200"));

    let seen = backend.requests();
    assert_eq!(
        seen[0].header("x-forwarded-for").as_deref(),
        Some("203.0.113.5")
    );
    assert_eq!(
        seen[1].header("x-forwarded-for").as_deref(),
        Some("2001:db8::7")
    );
    let log_path = dir.path("access.log");
    eventually("both access-log lines", async || {
        std::fs::read_to_string(&log_path).is_ok_and(|text| text.lines().count() == 2)
    })
    .await;
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("\"client\":\"203.0.113.5:40000\""), "{log}");
    assert!(log.contains("\"client\":\"[2001:db8::7]:5555\""), "{log}");
}

#[tokio::test]
async fn malformed_or_missing_proxy_headers_are_refused() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let gatehouse = start_gatehouse(&dir, &proxied_http_config(backend.address, "")).await;
    let web = gatehouse.listener_address("web").unwrap();
    for bad in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PROXY TCP9 nonsense\r\n",
    ] {
        let answer = raw_exchange(web, bad).await;
        assert!(
            answer.is_empty(),
            "closed without an answer, got {answer:?}"
        );
    }
    let started = std::time::Instant::now();
    let silent = raw_exchange(web, b"").await;
    assert!(silent.is_empty());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "a silent client times out"
    );
    assert!(backend.requests().is_empty());
    let text = metrics_text(&gatehouse).await;
    assert_eq!(
        metric(
            &text,
            "gatehouse_rejected_total",
            &[("listener", "web"), ("reason", "proxy_protocol")]
        ),
        Some(4.0)
    );
}

#[tokio::test]
async fn send_proxy_protocol_reaches_l4_and_l7_backends() {
    let (recorder, seen) = recording_server().await;
    let dir = TestDir::new();
    let yaml = format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}
listeners:
  db: {{ listen: \"127.0.0.1:0\", protocol: tcp, pool: l4 }}
  web: {{ listen: \"127.0.0.1:0\", pool: l7 }}
pools:
  l4:
    health_check: {{ type: none }}
    send_proxy_protocol: v1
    backends: [ {{ name: r, address: \"{recorder}\" }} ]
  l7:
    health_check: {{ type: none }}
    send_proxy_protocol: v2
    backends: [ {{ name: r, address: \"{recorder}\" }} ]
"
    );
    let gatehouse = start_gatehouse(&dir, &yaml).await;
    let db = gatehouse.listener_address("db").unwrap();
    let web = gatehouse.listener_address("web").unwrap();

    let answer = raw_exchange(db, b"GET /l4 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(answer.ends_with("ok"), "{answer}");
    assert_eq!(get(web, "x", "/l7").await.status, StatusCode::OK);

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    for (bytes, path) in seen.iter().zip(["/l4", "/l7"]) {
        let (header, used) = proxy_protocol::parse(bytes).unwrap().unwrap();
        let (source, destination) = header.addresses.unwrap();
        assert_eq!(source.ip().to_string(), "127.0.0.1");
        assert!(destination == db || destination == web, "{destination}");
        let rest = String::from_utf8_lossy(&bytes[used..]);
        assert!(rest.starts_with(&format!("GET {path} HTTP/1.1")), "{rest}");
    }
    assert!(
        seen[0].starts_with(b"PROXY TCP4 127.0.0.1 127.0.0.1 "),
        "v1 for the L4 pool: {:?}",
        String::from_utf8_lossy(&seen[0])
    );
    assert!(
        seen[1].starts_with(&proxy_protocol::V2_SIGNATURE),
        "v2 for the L7 pool"
    );
}

/// Health checks open their connections as traffic does: a pool that sends the PROXY
/// header sends one on each check too (v1 `UNKNOWN`, v2 `LOCAL`: no client), so a backend
/// that requires the header passes its checks (without it, every check failed and the pool
/// answered 503).
#[tokio::test]
async fn health_checks_send_the_proxy_header_their_pool_sends() {
    for version in ["v1", "v2"] {
        let (recorder, seen) = recording_server().await;
        let dir = TestDir::new();
        let yaml = format!(
            "admin: {{ listen: \"127.0.0.1:0\" }}
listeners:
  web: {{ listen: \"127.0.0.1:0\", pool: p }}
pools:
  p:
    health_check: {{ type: http, path: /healthz }}
    send_proxy_protocol: {version}
    backends: [ {{ name: r, address: \"{recorder}\" }} ]
"
        );
        let gatehouse = start_gatehouse(&dir, &yaml).await;
        let web = gatehouse.listener_address("web").unwrap();
        assert_eq!(
            get(web, "x", "/").await.status,
            StatusCode::OK,
            "{version}: the backend passed its checks"
        );
        let seen = seen.lock().unwrap().clone();
        let check = seen
            .iter()
            .find(|bytes| String::from_utf8_lossy(bytes).contains("GET /healthz "))
            .expect("a health check reached the backend");
        let (header, _) = proxy_protocol::parse(check).unwrap().unwrap();
        assert_eq!(
            header.addresses, None,
            "{version}: a check relays no client"
        );
    }
}

#[tokio::test]
async fn access_control_applies_at_accept_for_l4_and_l7() {
    let (echo, accepted) = echo_server().await;
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let yaml = format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}
listeners:
  db: {{ listen: \"127.0.0.1:0\", protocol: tcp, pool: l4, deny: [\"127.0.0.0/8\"] }}
  web: {{ listen: \"127.0.0.1:0\", pool: l7, allow: [\"10.0.0.0/8\"] }}
  proxied: {{ listen: \"127.0.0.1:0\", pool: l7, proxy_protocol: true, deny: [\"203.0.113.0/24\"] }}
pools:
{}{}",
        pool_yaml("l4", &[("echo", echo)], ""),
        pool_yaml("l7", &[("b", backend.address)], "")
    );
    let gatehouse = start_gatehouse(&dir, &yaml).await;

    let mut denied = TcpStream::connect(gatehouse.listener_address("db").unwrap())
        .await
        .unwrap();
    let _ = denied.write_all(b"hello").await;
    let mut buffer = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, denied.read_to_end(&mut buffer)).await;
    assert!(buffer.is_empty());
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "a denied L4 client never reaches a backend"
    );

    let web = gatehouse.listener_address("web").unwrap();
    let answer = get(web, "x", "/").await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN, "not in allow");

    let proxied = gatehouse.listener_address("proxied").unwrap();
    let denied_by_proxy = raw_exchange(
        proxied,
        b"PROXY TCP4 203.0.113.9 10.0.0.1 1000 80\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(
        denied_by_proxy.starts_with("HTTP/1.1 403"),
        "{denied_by_proxy}"
    );
    let allowed_by_proxy = raw_exchange(
        proxied,
        b"PROXY TCP4 198.51.100.9 10.0.0.1 1000 80\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        allowed_by_proxy.starts_with("HTTP/1.1 200"),
        "{allowed_by_proxy}"
    );
    assert_eq!(backend.requests().len(), 1);

    let text = metrics_text(&gatehouse).await;
    assert_eq!(
        metric(
            &text,
            "gatehouse_rejected_total",
            &[("listener", "db"), ("reason", "acl")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "gatehouse_rejected_total",
            &[("listener", "web"), ("reason", "acl")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "gatehouse_requests_total",
            &[("listener", "web"), ("code", "403"), ("backend", "")]
        ),
        Some(1.0)
    );
}
