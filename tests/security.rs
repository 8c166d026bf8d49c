//! Hostile clients: the corpus of malformed and ambiguous requests in tests/corpus/http1 is
//! refused (and never forwarded), no smuggled request reaches a backend that records every
//! raw byte, a late or missing request head gets 408 (and a body the client holds back, without
//! blaming the backend), and a Connection header cannot strip what
//! gatehouse sets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Decodes the corpus escapes: `\r`, `\n`, `\t`, `\\`, `\xNN`.
fn unescape(text: &str) -> Vec<u8> {
    let mut bytes = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut buffer = [0u8; 4];
            bytes.extend_from_slice(c.encode_utf8(&mut buffer).as_bytes());
            continue;
        }
        match chars.next() {
            Some('r') => bytes.push(b'\r'),
            Some('n') => bytes.push(b'\n'),
            Some('t') => bytes.push(b'\t'),
            Some('\\') => bytes.push(b'\\'),
            Some('x') => {
                let hex: String = chars.by_ref().take(2).collect();
                bytes.push(u8::from_str_radix(&hex, 16).unwrap());
            }
            other => panic!("bad escape \\{other:?}"),
        }
    }
    bytes
}

/// Where `needle` first occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// A backend that records every raw byte it receives and answers each request with a small
/// 200 (keeping the connection open).
async fn raw_recording_backend() -> (std::net::SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = socket.local_addr().unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let record = received.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = socket.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 65536];
                let mut pending = Vec::new();
                loop {
                    let n = match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    record.lock().unwrap().extend_from_slice(&buffer[..n]);
                    pending.extend_from_slice(&buffer[..n]);
                    while let Some(end) = find(&pending, b"\r\n\r\n") {
                        // The body is skipped (never read as a head): a chunked one through
                        // its last chunk, else its Content-Length.
                        let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
                        let body = &pending[end + 4..];
                        let body_length = if head.contains("transfer-encoding: chunked") {
                            match find(body, b"0\r\n\r\n") {
                                Some(at) => at + 5,
                                None => break,
                            }
                        } else {
                            head.lines()
                                .find_map(|line| line.strip_prefix("content-length: "))
                                .and_then(|value| value.trim().parse().ok())
                                .unwrap_or(0)
                        };
                        if body.len() < body_length {
                            break;
                        }
                        pending.drain(..end + 4 + body_length);
                        if stream
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    (address, received)
}

#[tokio::test]
async fn the_hostile_request_corpus_is_refused_and_nothing_is_smuggled() {
    let (backend, received) = raw_recording_backend().await;
    let dir = TestDir::new();
    let yaml = format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}\nlisteners:\n  web: {{ listen: \"127.0.0.1:0\", pool: p }}\npools:\n{}",
        pool_yaml("p", &[("recorder", backend)], "    retries: { attempts: 1 }\n")
    );
    let gatehouse = start_gatehouse(&dir, &yaml).await;
    let web = gatehouse.listener_address("web").unwrap();
    let mut cases: Vec<_> = std::fs::read_dir(repo_file("tests/corpus/http1"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "case"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 20, "the corpus is there");
    let mut forwarded_posts = 0;
    for case in &cases {
        let text = std::fs::read_to_string(case).unwrap();
        let (first, request) = text.split_once('\n').unwrap();
        let expected = first.strip_prefix("# expect: ").unwrap().trim();
        let (head_forwarded, request) = match request.strip_prefix("# head forwarded\n") {
            Some(request) => (true, request),
            None => (false, request),
        };
        let request = unescape(request.trim_end_matches('\n'));
        if (expected == "200" || head_forwarded) && request.starts_with(b"POST / ") {
            forwarded_posts += 1;
        }
        let answer = raw_exchange(web, &request).await;
        let statuses: Vec<&str> = answer
            .match_indices("HTTP/1.1 ")
            .filter_map(|(at, _)| answer.get(at + 9..at + 12))
            .collect();
        assert_eq!(
            statuses.join(" "),
            expected,
            "{}: every response, in order: {answer:?}",
            case.display()
        );
    }
    let seen = String::from_utf8_lossy(&received.lock().unwrap()).into_owned();
    assert!(
        !seen.contains("/smuggled"),
        "a smuggled request reached the backend:\n{seen}"
    );
    assert_eq!(
        seen.matches("POST / HTTP/1.1").count(),
        forwarded_posts,
        "only the corpus's valid POSTs and the heads of streamed bodies found broken later arrived:\n{seen}"
    );
}

#[tokio::test]
async fn a_late_or_missing_request_head_gets_408_and_is_counted() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let (gatehouse, web) = single_pool_gatehouse(
        &dir,
        &[("b", backend.address)],
        ", limits: { header_timeout: 300ms }",
        "",
    )
    .await;
    // Half a head, then silence; and a client that never sends a byte.
    let late: [&[u8]; 2] = [b"GET / HTTP/1.1\r\nHost: x\r\n", b""];
    for bytes in late {
        let answer = raw_exchange(web, bytes).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    }
    assert!(backend.requests().is_empty());
    let text = metrics_text(&gatehouse).await;
    assert_eq!(
        metric(
            &text,
            "gatehouse_rejected_total",
            &[("listener", "web"), ("reason", "header_timeout")]
        ),
        Some(2.0)
    );
}

#[tokio::test]
async fn a_client_holding_back_its_body_gets_408_and_the_backend_is_not_blamed() {
    let (b1, b2) = (
        TestBackend::start("b1").await,
        TestBackend::start("b2").await,
    );
    let dir = TestDir::new();
    // One failure ejects a backend (while another is available): stalled uploads must not.
    let (gatehouse, web) = single_pool_gatehouse(
        &dir,
        &[("b1", b1.address), ("b2", b2.address)],
        "",
        "    timeouts: { request: 500ms }\n    passive: { consecutive_failures: 1, ejection: 60s }\n",
    )
    .await;
    // Round robin sends one to each backend; each waits out the request timeout.
    for _ in 0..2 {
        let stalled = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789";
        let answer = raw_exchange(web, stalled).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    }
    let mut answered = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let answer = get(web, "x", "/").await;
        assert_eq!(answer.status, http::StatusCode::OK);
        answered.insert(answer.backend().unwrap());
    }
    assert_eq!(answered.len(), 2, "both backends still take traffic");
    // A backend that is the slow one still times out as the backend's fault.
    let slow = get(web, "x", "/slow?ms=2000").await;
    assert_eq!(slow.status, http::StatusCode::GATEWAY_TIMEOUT);
    let text = metrics_text(&gatehouse).await;
    let requests = |backend: &str, code: &str| {
        metric(
            &text,
            "gatehouse_requests_total",
            &[("backend", backend), ("code", code)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(requests("", "408"), 2.0);
    assert_eq!(requests("b1", "504") + requests("b2", "504"), 1.0);
}

#[tokio::test]
async fn the_first_request_head_is_due_header_timeout_after_accept() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let (_gatehouse, web) = single_pool_gatehouse(
        &dir,
        &[("b", backend.address)],
        ", limits: { header_timeout: 1s }",
        "",
    )
    .await;
    let opened = std::time::Instant::now();
    let mut client = tokio::net::TcpStream::connect(web).await.unwrap();
    // A slow client: its first byte late in the allowance does not buy a second one.
    tokio::time::sleep(Duration::from_millis(700)).await;
    client.write_all(b"G").await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut answer));
    read.await.unwrap().unwrap();
    let waited = opened.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(
        waited < Duration::from_millis(1500),
        "408 after {waited:?}: the head was due 1 s after accept"
    );
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let (gatehouse, web) = single_pool_gatehouse(
        &dir,
        &[("b", backend.address)],
        ", rate_limit: { requests_per_second: 0.5, burst: 3 }",
        "",
    )
    .await;
    for _ in 0..3 {
        assert_eq!(get(web, "x", "/").await.status, http::StatusCode::OK);
    }
    let limited = get(web, "x", "/").await;
    assert_eq!(limited.status, http::StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    assert_eq!(backend.requests().len(), 3);
    let text = metrics_text(&gatehouse).await;
    assert_eq!(
        metric(
            &text,
            "gatehouse_rejected_total",
            &[("reason", "rate_limit")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "gatehouse_requests_total", &[("code", "429")]),
        Some(1.0)
    );
}

/// The status code of a request on a new connection whose PROXY header names `client` (as a
/// fronting L4 balancer would), on a listener with `proxy_protocol: true`; "" when gatehouse
/// closed the connection without an answer.
async fn status_from(listener: std::net::SocketAddr, client: &str) -> String {
    let request = format!(
        "PROXY TCP6 {client} 2001:db8:ffff::1 40000 80\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let answer = raw_exchange(listener, request.as_bytes()).await;
    answer.split(' ').nth(1).unwrap_or_default().to_string()
}

/// An IPv6 client counts by its /64 (`limits.client_ipv6_prefix`): another address of the
/// same /64 shares its rate limit and its connection cap; an address of another /64 does not.
#[tokio::test]
async fn ipv6_clients_are_limited_per_64_prefix() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let (_gatehouse, web) = single_pool_gatehouse(
        &dir,
        &[("b", backend.address)],
        ", proxy_protocol: true, rate_limit: { requests_per_second: 0.01, burst: 1 }",
        "",
    )
    .await;
    assert_eq!(status_from(web, "2001:db8:1:2::1").await, "200");
    assert_eq!(
        status_from(web, "2001:db8:1:2:ffff::9").await,
        "429",
        "the same /64: its budget is spent"
    );
    assert_eq!(
        status_from(web, "2001:db8:1:3::1").await,
        "200",
        "another /64"
    );

    let capped_dir = TestDir::new();
    let (_capped, capped) = single_pool_gatehouse(
        &capped_dir,
        &[("b", backend.address)],
        ", proxy_protocol: true, limits: { max_connections_per_client: 1 }",
        "",
    )
    .await;
    let mut held = tokio::net::TcpStream::connect(capped).await.unwrap();
    held.write_all(
        b"PROXY TCP6 2001:db8:1:2::1 2001:db8:ffff::1 40000 80\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await
    .unwrap();
    let mut status = [0u8; 12];
    tokio::time::timeout(DEADLINE, held.read_exact(&mut status))
        .await
        .expect("an answer on the held connection")
        .unwrap();
    assert_eq!(&status, b"HTTP/1.1 200");
    assert_eq!(
        status_from(capped, "2001:db8:1:2:ffff::9").await,
        "",
        "the same /64 holds its one connection"
    );
    assert_eq!(
        status_from(capped, "2001:db8:1:3::1").await,
        "200",
        "another /64"
    );
    drop(held);
}

async fn h2_gatehouse() -> (Arc<gatehouse::server::Gatehouse>, TestBackend, TestDir) {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let yaml = format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}\nlisteners:\n  web: {{ listen: \"127.0.0.1:0\", pool: p }}\npools:\n{}",
        pool_yaml("p", &[("b", backend.address)], "")
    );
    let gatehouse = start_gatehouse(&dir, &yaml).await;
    (gatehouse, backend, dir)
}

#[tokio::test]
async fn http2_advertises_at_most_100_concurrent_streams() {
    let (gatehouse, _backend, _dir) = h2_gatehouse().await;
    let tcp = tokio::net::TcpStream::connect(gatehouse.listener_address("web").unwrap())
        .await
        .unwrap();
    let (client, mut connection) = h2::client::handshake(tcp).await.unwrap();
    // Drive the connection until the server's SETTINGS arrived.
    let _ = tokio::time::timeout(std::time::Duration::from_millis(300), &mut connection).await;
    assert_eq!(connection.max_concurrent_send_streams(), 100);
    drop(client);
}

#[tokio::test]
async fn http2_rapid_reset_is_cut_off() {
    let (gatehouse, backend, _dir) = h2_gatehouse().await;
    let tcp = tokio::net::TcpStream::connect(gatehouse.listener_address("web").unwrap())
        .await
        .unwrap();
    let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(connection);
    let mut opened = 0;
    for _ in 0..5000 {
        let request = http::Request::get("http://x/slow?ms=2000")
            .body(())
            .unwrap();
        let Ok(ready) = client.ready().await else {
            break;
        };
        client = ready;
        let Ok((_response, mut stream)) = client.send_request(request, true) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        opened += 1;
    }
    let ended = tokio::time::timeout(DEADLINE, driver).await;
    assert!(ended.is_ok(), "the server closed the abusive connection");
    let closed_with_error = matches!(ended, Ok(Ok(Err(_))));
    assert!(
        closed_with_error || opened < 5000,
        "opened {opened} streams without being stopped"
    );
    assert!(
        backend.requests().len() < 200,
        "{} requests reached the backend",
        backend.requests().len()
    );
    assert_bad_request_counted(&gatehouse).await;
}

/// One `bad_request` rejection counted for a connection refused as a whole (once the server
/// side has ended it, which the client may see first).
async fn assert_bad_request_counted(gatehouse: &gatehouse::server::Gatehouse) {
    eventually(
        "the refused connection counted as a bad request",
        async || {
            let text = metrics_text(gatehouse).await;
            let labels = [("listener", "web"), ("reason", "bad_request")];
            metric(&text, "gatehouse_rejected_total", &labels) == Some(1.0)
        },
    )
    .await;
}

#[tokio::test]
async fn route_body_limits_answer_413() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let yaml = format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}\nlisteners:\n  web:\n    listen: \"127.0.0.1:0\"\n    routes:\n      - {{ path_prefix: \"/upload\", pool: p, max_body_bytes: 1000 }}\n    pool: p\npools:\n{}",
        pool_yaml("p", &[("b", backend.address)], "")
    );
    let gatehouse = start_gatehouse(&dir, &yaml).await;
    let web = gatehouse.listener_address("web").unwrap();
    let post = |path: &'static str, size: usize| async move {
        send(
            http::Request::post(format!("http://{web}{path}"))
                .header("host", "x")
                .body(http_body_util::Full::new(bytes::Bytes::from(vec![
                    b'a';
                    size
                ])))
                .unwrap(),
        )
        .await
        .status
    };
    assert_eq!(post("/upload", 1000).await, http::StatusCode::OK);
    assert_eq!(
        post("/upload", 1001).await,
        http::StatusCode::PAYLOAD_TOO_LARGE
    );
    assert_eq!(
        post("/elsewhere", 5000).await,
        http::StatusCode::OK,
        "other routes unlimited"
    );
    let chunked = raw_exchange(
        web,
        format!(
            "POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n7d0\r\n{}\r\n0\r\n\r\n",
            "a".repeat(2000)
        )
        .as_bytes(),
    )
    .await;
    assert!(
        chunked.starts_with("HTTP/1.1 413"),
        "a streamed body over the limit: {chunked:?}"
    );
}

/// Four workers accepting on each listener (the caps count across them): `per-client` holds
/// two connections per client address, `small` three in all.
async fn capped_gatehouse() -> (Arc<gatehouse::server::Gatehouse>, TestBackend, TestDir) {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let yaml = format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}\nruntime: {{ worker_threads: 4 }}\nlisteners:\n  per-client: {{ listen: \"127.0.0.1:0\", pool: p, limits: {{ max_connections_per_client: 2 }} }}\n  small: {{ listen: \"127.0.0.1:0\", pool: p, limits: {{ max_connections: 3 }} }}\npools:\n{}",
        pool_yaml("p", &[("b", backend.address)], "")
    );
    let gatehouse = start_gatehouse(&dir, &yaml).await;
    (gatehouse, backend, dir)
}

/// With `held` taking every place of `listener` at `address`, a next connection is closed
/// unanswered; once they close, a place is usable again.
async fn over_the_cap_refused_until_released<T>(
    listener: &str,
    address: std::net::SocketAddr,
    held: Vec<T>,
) {
    let refused = raw_exchange(address, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        refused.is_empty(),
        "{listener}: over the cap is closed: {refused:?}"
    );
    drop(held);
    eventually("a freed place is usable again", async || {
        raw_exchange(
            address,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .starts_with("HTTP/1.1 200")
    })
    .await;
}

#[tokio::test]
async fn connection_caps_per_client_and_per_listener_refuse_cleanly() {
    let (gatehouse, _backend, _dir) = capped_gatehouse().await;
    for (listener, cap) in [("per-client", 2), ("small", 3)] {
        let address = gatehouse.listener_address(listener).unwrap();
        let mut held = Vec::new();
        for _ in 0..cap {
            let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
            stream
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut buffer = [0u8; 12];
            stream.read_exact(&mut buffer).await.unwrap();
            assert_eq!(&buffer, b"HTTP/1.1 200");
            held.push(stream);
        }
        over_the_cap_refused_until_released(listener, address, held).await;
        let text = metrics_text(&gatehouse).await;
        assert!(
            metric(
                &text,
                "gatehouse_rejected_total",
                &[("listener", listener), ("reason", "max_connections")]
            )
            .unwrap()
                >= 1.0
        );
    }
}

#[tokio::test]
async fn websockets_hold_their_connection_places_while_they_last() {
    // A tunnel is its client's connection: it counts against both caps and in the gauge for
    // as long as it is open, so WebSockets cannot open connections past the caps.
    let (gatehouse, _backend, _dir) = capped_gatehouse().await;
    for (listener, cap) in [("per-client", 2), ("small", 3)] {
        let address = gatehouse.listener_address(listener).unwrap();
        let mut tunnels = Vec::new();
        for _ in 0..cap {
            let (mut stream, head) = websocket(address).await;
            assert!(head.starts_with("http/1.1 101"), "{listener}: {head}");
            echo(&mut stream, b"open").await;
            tunnels.push(stream);
        }
        let active = metric(
            &metrics_text(&gatehouse).await,
            "gatehouse_connections_active",
            &[("listener", listener)],
        );
        assert_eq!(
            active,
            Some(f64::from(cap)),
            "{listener}: tunnels are active connections"
        );
        for tunnel in &mut tunnels {
            echo(tunnel, b"open").await;
        }
        over_the_cap_refused_until_released(listener, address, tunnels).await;
    }
}

#[tokio::test]
async fn max_connections_holds_when_clients_arrive_at_once() {
    // Four workers accept the burst side by side: the cap is one count across them.
    let (gatehouse, _backend, _dir) = capped_gatehouse().await;
    let address = gatehouse.listener_address("small").unwrap();
    let burst = (0..40).map(|_| {
        tokio::spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
            let _ = stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
            let mut status = [0u8; 12];
            let read = tokio::time::timeout(DEADLINE, stream.read_exact(&mut status)).await;
            let served = matches!(read, Ok(Ok(_))) && &status == b"HTTP/1.1 200";
            // Held open, served or not, until every client has its answer.
            (served, stream)
        })
    });
    let mut served = 0;
    let mut held = Vec::new();
    for client in burst.collect::<Vec<_>>() {
        let (was_served, stream) = client.await.unwrap();
        served += usize::from(was_served);
        held.push(stream);
    }
    assert!(
        (1..=3).contains(&served),
        "{served} of 40 clients arriving at once were served under max_connections: 3"
    );
}

/// Sends two malformed HTTP/2 requests and a well-formed one on `stream` (a connection to
/// `listener` that speaks HTTP/2) and checks what gatehouse does: each malformed one reset
/// with PROTOCOL_ERROR, never forwarded, and counted as a bad request; the well-formed one
/// served on the same connection.
async fn assert_malformed_h2_requests_refused<S>(
    stream: &mut S,
    gatehouse: &gatehouse::server::Gatehouse,
    backend: &TestBackend,
    listener: &str,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    stream.write_all(&h2_frame(0x4, 0, 0, &[])).await.unwrap();
    // END_STREAM | END_HEADERS. Stream 1 carries a connection-specific header, stream 3 has
    // no :path (both malformed, RFC 9113 §8.2.2 and §8.3.1); stream 5 is well formed.
    let connection_close = [&[0x00, 0x0a][..], b"connection", &[0x05], b"close"].concat();
    for (id, block) in [
        (1, h2_request_block("x", true, &connection_close)),
        (3, h2_request_block("x", false, &[])),
        (5, h2_request_block("x", true, &[])),
    ] {
        stream
            .write_all(&h2_frame(0x1, 0x5, id, &block))
            .await
            .unwrap();
    }
    stream.flush().await.unwrap();
    let frames = h2_frames_until(stream, |frames| {
        let resets = frames.iter().filter(|frame| frame.0 == 0x3).count();
        let answered = frames
            .iter()
            .any(|frame| frame.2 == 5 && frame.1 & 0x1 != 0);
        resets >= 2 && answered
    })
    .await;
    let protocol_error = 1u32.to_be_bytes().to_vec();
    for id in [1, 3] {
        assert!(
            frames
                .iter()
                .any(|frame| frame.0 == 0x3 && frame.2 == id && frame.3 == protocol_error),
            "stream {id} is reset with PROTOCOL_ERROR: {frames:?}"
        );
    }
    assert!(
        frames.iter().any(|frame| frame.0 == 0x1 && frame.2 == 5),
        "the well-formed request on the same connection is answered: {frames:?}"
    );
    assert_eq!(
        backend.requests().len(),
        1,
        "only the well-formed request was forwarded"
    );
    eventually(
        "both malformed requests counted as bad requests",
        async || {
            let text = metrics_text(gatehouse).await;
            let labels = [("listener", listener), ("reason", "bad_request")];
            metric(&text, "gatehouse_rejected_total", &labels) == Some(2.0)
        },
    )
    .await;
}

#[tokio::test]
async fn http2_malformed_requests_are_reset_and_counted() {
    let (gatehouse, backend, _dir) = h2_gatehouse().await;
    let web = gatehouse.listener_address("web").unwrap();
    let mut stream = tokio::net::TcpStream::connect(web).await.unwrap();
    assert_malformed_h2_requests_refused(&mut stream, &gatehouse, &backend, "web").await;
}

#[tokio::test]
async fn http2_malformed_requests_over_tls_are_reset_and_counted() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let ca = TestCa::new();
    ca.leaf(&dir, "site", &["localhost"]);
    let yaml = format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}\nlisteners:\n  secure:\n    listen: \"127.0.0.1:0\"\n    protocol: https\n    tls: {{ certificates: [ {{ cert: site.crt, key: site.key }} ] }}\n    pool: p\npools:\n{}",
        pool_yaml("p", &[("b", backend.address)], "")
    );
    let gatehouse = start_gatehouse(&dir, &yaml).await;
    let tcp = tokio::net::TcpStream::connect(gatehouse.listener_address("secure").unwrap())
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(ca.client_config(&[b"h2"]))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_malformed_h2_requests_refused(&mut stream, &gatehouse, &backend, "secure").await;
}

#[tokio::test]
async fn http2_continuation_flood_is_cut_off() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let (gatehouse, web) = single_pool_gatehouse(&dir, &[("b", backend.address)], "", "").await;
    let mut stream = tokio::net::TcpStream::connect(web).await.unwrap();
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    stream.write_all(&h2_frame(0x4, 0, 0, &[])).await.unwrap();
    // A literal header field without indexing, repeated: ~1 KiB per field.
    let mut field = vec![0x00, 0x05];
    field.extend_from_slice(b"x-big");
    // Value length 1000 as an HPACK integer with a 7-bit prefix: 127, then 873 = 0x69 | 6 << 7.
    field.extend_from_slice(&[0x7f, 0xe9, 0x06]);
    field.extend(std::iter::repeat_n(b'a', 1000));
    let block: Vec<u8> = field
        .iter()
        .copied()
        .cycle()
        .take(field.len() * 16)
        .collect();
    stream
        .write_all(&h2_frame(0x1, 0, 1, &block))
        .await
        .unwrap();
    let mut sent = 16 * 1024;
    let mut refused = false;
    for _ in 0..2000 {
        if stream
            .write_all(&h2_frame(0x9, 0, 1, &block))
            .await
            .is_err()
        {
            refused = true;
            break;
        }
        sent += block.len();
    }
    if !refused {
        let mut buffer = vec![0u8; 65536];
        let read = tokio::time::timeout(DEADLINE, async {
            loop {
                match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => return true,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        refused = read.unwrap_or(false);
    }
    assert!(
        refused,
        "the server must close a connection flooding CONTINUATION ({sent} bytes sent)"
    );
    assert!(
        backend.requests().is_empty(),
        "no request was formed from the flood"
    );
    assert_bad_request_counted(&gatehouse).await;
}

/// Resident memory of this (test) process, in KiB.
fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn http2_ping_and_settings_floods_stay_bounded() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let (gatehouse, web) = single_pool_gatehouse(&dir, &[("b", backend.address)], "", "").await;
    let before = resident_kib();
    let mut flood = tokio::net::TcpStream::connect(web).await.unwrap();
    flood
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut burst = Vec::new();
    for index in 0u64..2000 {
        burst.extend(h2_frame(0x6, 0, 0, &index.to_be_bytes()));
        burst.extend(h2_frame(0x4, 0, 0, &[0x00, 0x03, 0x00, 0x00, 0x00, 0x64]));
    }
    // Write the flood without ever reading the PING and SETTINGS acknowledgements.
    let flooding = tokio::spawn(async move {
        for _ in 0..100 {
            if flood.write_all(&burst).await.is_err() {
                return;
            }
        }
    });
    let answer = get(web, "x", "/").await;
    assert_eq!(
        answer.status,
        http::StatusCode::OK,
        "other clients are served during the flood"
    );
    let _ = tokio::time::timeout(DEADLINE, flooding).await;
    let grown = resident_kib().saturating_sub(before);
    assert!(
        grown < 64 * 1024,
        "memory grew by {grown} KiB under a PING/SETTINGS flood"
    );
    assert_eq!(get(web, "x", "/").await.status, http::StatusCode::OK);
    drop(gatehouse);
}

/// gatehouse with an access log and `limits.send_timeout: 1s` in front of one test backend.
async fn send_timeout_gatehouse() -> (Arc<gatehouse::server::Gatehouse>, TestBackend, TestDir) {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let yaml = format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}\naccess_log: {{ target: access.log }}\nlisteners:\n  web: {{ listen: \"127.0.0.1:0\", pool: p, limits: {{ send_timeout: 1s }} }}\npools:\n{}",
        pool_yaml("p", &[("b", backend.address)], "")
    );
    let gatehouse = start_gatehouse(&dir, &yaml).await;
    (gatehouse, backend, dir)
}

/// An h2c client's preface and a SETTINGS frame that starts every stream's window shut
/// (SETTINGS_INITIAL_WINDOW_SIZE 0).
fn h2_shut_windows() -> Vec<u8> {
    let mut opening = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    opening.extend(h2_frame(0x4, 0, 0, &[0, 4, 0, 0, 0, 0]));
    opening
}

/// A HEADERS frame asking for `GET path` on `stream` (host `x`), ending the stream.
fn h2_get(stream: u32, path: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x44, path.len() as u8];
    block.extend_from_slice(path.as_bytes());
    block.extend_from_slice(&[0x41, 1, b'x']);
    h2_frame(0x1, 0x5, stream, &block)
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_after_send_timeout() {
    let (gatehouse, _backend, dir) = send_timeout_gatehouse().await;
    let web = gatehouse.listener_address("web").unwrap();
    // More than the sockets and gatehouse buffer, even with a large `tcp_wmem`.
    let size = 32 << 20;
    // gatehouse's own HTTP/1 loop; hyper's (a chunked upload goes to it); HTTP/2 (h2c) with
    // the stream's window shut.
    let own = format!("GET /bytes?n={size} HTTP/1.1\r\nhost: x\r\n\r\n");
    let hyper = format!(
        "POST /bytes?n={size} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    );
    let mut h2 = h2_shut_windows();
    h2.extend(h2_get(1, &format!("/bytes?n={size}")));
    let mut clients = Vec::new();
    for request in [own.into_bytes(), hyper.into_bytes(), h2] {
        let mut client = small_window_client(web).await;
        client.write_all(&request).await.unwrap();
        clients.push(client);
    }
    // Nothing is read: each connection stalls with its response half sent.
    let mut lines: Vec<serde_json::Value> = Vec::new();
    eventually("three access-log lines", async || {
        lines = access_log_lines(&dir);
        lines.len() == 3
    })
    .await;
    for (mut client, by) in clients.into_iter().zip(["own loop", "hyper", "h2"]) {
        let address = client.local_addr().unwrap().to_string();
        let line = lines
            .iter()
            .find(|line| line["client"] == address.as_str())
            .unwrap_or_else(|| panic!("{by}: no line for {address} in {lines:?}"));
        assert_eq!(line["status"], 200, "{by}: {line}");
        assert_eq!(line["ended"], "client_aborted", "{by}: {line}");
        assert_eq!(
            line["error"], "client accepted nothing for limits.send_timeout",
            "{by}: {line}"
        );
        // Reset, not closed: the kernel dropped what gatehouse had queued for this client
        // (closed normally, it would still be offering it). What reached the client's own
        // buffer is read, then the reset.
        let received = bytes_before_reset(&mut client, by).await;
        assert!(received < size, "{by}: {received} bytes");
    }
}

#[tokio::test]
async fn a_tls_client_that_stops_reading_is_cut_off_and_reset_too() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let ca = TestCa::new();
    ca.leaf(&dir, "portal", &["portal.example.gov"]);
    let yaml = format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}\naccess_log: {{ target: access.log }}\nlisteners:\n  secure: {{ listen: \"127.0.0.1:0\", protocol: https, tls: {{ certificates: [ {{ cert: portal.crt, key: portal.key }} ] }}, pool: p, limits: {{ send_timeout: 1s }} }}\npools:\n{}",
        pool_yaml("p", &[("b", backend.address)], "")
    );
    let gatehouse = start_gatehouse(&dir, &yaml).await;
    let secure = gatehouse.listener_address("secure").unwrap();
    let size = 32 << 20;
    // HTTP/1.1 (gatehouse's own loop, over TLS) and HTTP/2 (hyper's session, over TLS).
    let http1 = format!("GET /bytes?n={size} HTTP/1.1\r\nhost: x\r\n\r\n").into_bytes();
    let mut h2 = h2_shut_windows();
    h2.extend(h2_get(1, &format!("/bytes?n={size}")));
    let mut clients = Vec::new();
    for (alpn, request) in [(&b"http/1.1"[..], http1), (&b"h2"[..], h2)] {
        let connector = tokio_rustls::TlsConnector::from(ca.client_config(&[alpn]));
        let name = rustls::pki_types::ServerName::try_from("portal.example.gov").unwrap();
        let tcp = small_window_client(secure).await;
        let mut client = tokio::time::timeout(DEADLINE, connector.connect(name, tcp))
            .await
            .expect("handshake deadline")
            .unwrap();
        client.write_all(&request).await.unwrap();
        client.flush().await.unwrap();
        clients.push(client);
    }
    let mut lines: Vec<serde_json::Value> = Vec::new();
    eventually("two access-log lines", async || {
        lines = access_log_lines(&dir);
        lines.len() == 2
    })
    .await;
    for (mut client, by) in clients.into_iter().zip(["http/1.1", "h2"]) {
        let address = client.get_ref().0.local_addr().unwrap().to_string();
        let line = lines
            .iter()
            .find(|line| line["client"] == address.as_str())
            .unwrap_or_else(|| panic!("{by}: no line for {address} in {lines:?}"));
        assert_eq!(line["ended"], "client_aborted", "{by}: {line}");
        bytes_before_reset(&mut client, by).await;
    }
}

#[tokio::test]
async fn a_websocket_client_that_stops_reading_is_reset_at_the_idle_timeout() {
    // A backend that accepts the upgrade and then pushes more than any buffer holds.
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = backend.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = backend.accept().await.unwrap();
        read_request_head(&mut stream).await.unwrap();
        stream
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            .await
            .unwrap();
        let _ = stream.write_all(&vec![b'x'; 32 << 20]).await;
    });
    let dir = TestDir::new();
    let pool = "    timeouts: { idle: 1s }\n";
    let (gatehouse, web) = single_pool_gatehouse(&dir, &[("b", address)], "", pool).await;
    let (mut stream, head) = upgrade_to_websocket(small_window_client(web).await).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    // The client reads nothing more (and sends nothing): once the buffers on the way are
    // full, nothing moves, and the tunnel idles out.
    eventually("the tunnel ended", async || {
        let text = metrics_text(&gatehouse).await;
        metric(
            &text,
            "gatehouse_connections_active",
            &[("listener", "web")],
        ) == Some(0.0)
    })
    .await;
    bytes_before_reset(&mut stream, "stalled WebSocket client").await;
}

#[tokio::test]
async fn a_client_reading_slowly_but_steadily_gets_its_whole_response() {
    let (gatehouse, _backend, dir) = send_timeout_gatehouse().await;
    let web = gatehouse.listener_address("web").unwrap();
    let size = 8 << 20;
    let mut client = tokio::net::TcpStream::connect(web).await.unwrap();
    client
        .write_all(
            format!("GET /bytes?n={size} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    // Pauses of a third of send_timeout between reads: gatehouse's writes wait on the client
    // in between (the test fails if the timer is not set again after a write it took), never
    // for a whole send_timeout.
    let mut received = Vec::new();
    let mut buffer = vec![0u8; 1 << 20];
    let started = std::time::Instant::now();
    let mut reads = 0;
    loop {
        assert!(started.elapsed() < DEADLINE, "still reading");
        match client.read(&mut buffer).await.unwrap() {
            0 => break,
            n => received.extend_from_slice(&buffer[..n]),
        }
        reads += 1;
        tokio::time::sleep(Duration::from_millis(333)).await;
    }
    assert!(
        reads > 3,
        "read in {reads} reads: no longer than send_timeout"
    );
    let text = String::from_utf8_lossy(&received);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert_eq!(body.len(), size, "the whole body arrived");
    drop(dir);
}

#[tokio::test]
async fn an_http2_stream_kept_shut_is_cut_off_while_others_move() {
    let (gatehouse, _backend, dir) = send_timeout_gatehouse().await;
    let web = gatehouse.listener_address("web").unwrap();
    let (mut reader, mut writer) = tokio::net::TcpStream::connect(web)
        .await
        .unwrap()
        .into_split();
    // Every stream's window starts shut; stream 1 (32 MiB) never gets any.
    let mut opening = h2_shut_windows();
    opening.extend(h2_get(1, &format!("/bytes?n={}", 32 << 20)));
    writer.write_all(&opening).await.unwrap();
    let drained = tokio::spawn(async move {
        let mut buffer = vec![0u8; 65536];
        while let Ok(1..) = reader.read(&mut buffer).await {}
    });
    // A small request every 100 ms on a new stream whose window is opened: the connection
    // keeps moving while stream 1 waits.
    let started = std::time::Instant::now();
    let mut stream = 3;
    while !drained.is_finished() && started.elapsed() < DEADLINE {
        let mut next = h2_get(stream, "/bytes?n=10");
        next.extend(h2_frame(0x8, 0, stream, &1000u32.to_be_bytes()));
        if writer.write_all(&next).await.is_err() {
            break;
        }
        stream += 2;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let moving_for = started.elapsed();
    assert!(
        moving_for < DEADLINE / 2,
        "not closed while the other streams moved ({moving_for:?})"
    );
    assert!(
        moving_for >= Duration::from_secs(1),
        "not before send_timeout"
    );
    tokio::time::timeout(DEADLINE, drained)
        .await
        .expect("the connection was closed")
        .unwrap();
    let mut lines: Vec<serde_json::Value> = Vec::new();
    eventually("the cut-off stream's line", async || {
        lines = access_log_lines(&dir);
        lines.iter().any(|line| line["error"].is_string())
    })
    .await;
    let cut: Vec<_> = lines
        .iter()
        .filter(|line| line["error"].is_string())
        .collect();
    assert_eq!(cut.len(), 1, "{cut:?}");
    assert_eq!(
        cut[0]["error"],
        "client accepted nothing for limits.send_timeout"
    );
    assert!(
        lines
            .iter()
            .filter(|line| line["ended"] == "complete")
            .count()
            >= 5,
        "the small requests were answered: {lines:?}"
    );
}
