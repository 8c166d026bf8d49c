//! Hostile clients: the corpus of malformed and ambiguous requests in tests/corpus/http1 is
//! refused (and never forwarded), no smuggled request reaches a backend that records every
//! raw byte, a late request head gets 408, and a Connection header cannot strip what
//! gatehouse sets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::sync::{Arc, Mutex};
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

/// A backend that records every raw byte it receives and answers each request head with a
/// small 200 (keeping the connection open).
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
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        pending.drain(..end + 4);
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
    for case in &cases {
        let text = std::fs::read_to_string(case).unwrap();
        let (first, request) = text.split_once('\n').unwrap();
        let expected = first.strip_prefix("# expect: ").unwrap().trim();
        let request = unescape(request.trim_end_matches('\n'));
        let answer = raw_exchange(web, &request).await;
        let status = answer.split(' ').nth(1).unwrap_or("(closed)");
        assert_eq!(status, expected, "{}: {answer:?}", case.display());
        if expected.starts_with('4') {
            assert!(
                !answer.contains("HTTP/1.1 200"),
                "{}: a refused request got no second answer: {answer:?}",
                case.display()
            );
        }
    }
    let seen = String::from_utf8_lossy(&received.lock().unwrap()).into_owned();
    assert!(
        !seen.contains("/smuggled"),
        "a smuggled request reached the backend:\n{seen}"
    );
    assert_eq!(
        seen.matches("POST / HTTP/1.1").count(),
        2,
        "only the two valid POSTs arrived:\n{seen}"
    );
}

#[tokio::test]
async fn a_late_request_head_gets_408_and_is_counted() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let yaml = format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}\nlisteners:\n  web: {{ listen: \"127.0.0.1:0\", pool: p, limits: {{ header_timeout: 300ms }} }}\npools:\n{}",
        pool_yaml("p", &[("b", backend.address)], "")
    );
    let gatehouse = start_gatehouse(&dir, &yaml).await;
    let web = gatehouse.listener_address("web").unwrap();
    let answer = raw_exchange(web, b"GET / HTTP/1.1\r\nHost: x\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(backend.requests().is_empty());
    let text = metrics_text(&gatehouse).await;
    assert_eq!(
        metric(
            &text,
            "gatehouse_rejected_total",
            &[("listener", "web"), ("reason", "header_timeout")]
        ),
        Some(1.0)
    );
}
