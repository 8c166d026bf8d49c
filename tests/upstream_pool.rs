//! The upstream keep-alive pool, seen from a backend that counts its connections: requests
//! share one connection, a connection the backend closed while idle is never used, a
//! response cut short never leaves its connection in the pool, and idle connections close
//! after the pool's idle timeout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use gatehouse::server::Gatehouse;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bytes `/big` answers with: more than any socket buffer holds, so a client that stops
/// reading leaves most of it unsent.
const BIG: usize = 8 << 20;

/// A raw HTTP/1.1 backend that counts connections opened and closed. `/big` answers with
/// BIG bytes; anything else with `ok`. With `idle_close`, a connection that receives no
/// request for that long is closed by the backend.
struct CountingBackend {
    address: SocketAddr,
    opened: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

impl CountingBackend {
    async fn start(idle_close: Option<Duration>) -> CountingBackend {
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend = CountingBackend {
            address: socket.local_addr().unwrap(),
            opened: Arc::default(),
            closed: Arc::default(),
            requests: Arc::default(),
        };
        let (opened, closed, requests) = (
            backend.opened.clone(),
            backend.closed.clone(),
            backend.requests.clone(),
        );
        tokio::spawn(async move {
            while let Ok((stream, _)) = socket.accept().await {
                opened.fetch_add(1, Ordering::SeqCst);
                let (closed, requests) = (closed.clone(), requests.clone());
                tokio::spawn(async move {
                    serve(stream, idle_close, &requests).await;
                    closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        backend
    }

    fn opened(&self) -> usize {
        self.opened.load(Ordering::SeqCst)
    }

    fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }
}

/// Answers requests without bodies until the peer leaves, a write fails, or the connection
/// stays idle for `idle_close`.
async fn serve(mut stream: TcpStream, idle_close: Option<Duration>, requests: &AtomicUsize) {
    let mut head = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
            let read = match idle_close {
                Some(limit) => match tokio::time::timeout(limit, stream.read(&mut buffer)).await {
                    Ok(read) => read,
                    Err(_) => return,
                },
                None => stream.read(&mut buffer).await,
            };
            match read {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buffer[..n]),
            }
            continue;
        };
        let line = String::from_utf8_lossy(&head[..end]).into_owned();
        head.drain(..end + 4);
        requests.fetch_add(1, Ordering::SeqCst);
        let written = if line.starts_with("GET /big ") {
            let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {BIG}\r\n\r\n");
            match stream.write_all(answer.as_bytes()).await {
                Ok(()) => stream.write_all(&vec![b'x'; BIG]).await,
                Err(error) => Err(error),
            }
        } else if line.starts_with("HEAD ") {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
                .await
        } else {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
        };
        if written.is_err() {
            return;
        }
    }
}

/// gatehouse in front of `backend` alone; keep the returned guard alive.
async fn gatehouse_for(
    backend: &CountingBackend,
    pool_extra: &str,
) -> ((TestDir, Arc<Gatehouse>), SocketAddr) {
    let dir = TestDir::new();
    let (gatehouse, web) =
        single_pool_gatehouse(&dir, &[("a", backend.address)], "", pool_extra).await;
    ((dir, gatehouse), web)
}

fn request(method: Method, web: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(format!("http://{web}{path}"))
        .header("host", "app")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test]
async fn sequential_requests_share_one_backend_connection() {
    let backend = CountingBackend::start(None).await;
    let (_running, web) = gatehouse_for(&backend, "").await;
    let methods = [Method::GET, Method::HEAD, Method::POST, Method::DELETE];
    for method in methods.iter().cycle().take(20) {
        let answer = send(request(method.clone(), web, "/")).await;
        assert_eq!(answer.status, StatusCode::OK, "{method}");
    }
    assert_eq!(backend.requests.load(Ordering::SeqCst), 20);
    // Idle connections are kept per worker: one each at most.
    let workers = gatehouse::workers::count(0);
    assert!(
        (1..=workers).contains(&backend.opened()),
        "every request reused its worker's first connection: {} opened for {workers} workers",
        backend.opened()
    );
}

#[tokio::test]
async fn a_connection_the_backend_closed_while_idle_is_not_used() {
    let backend = CountingBackend::start(Some(Duration::from_millis(100))).await;
    let (_running, web) = gatehouse_for(&backend, "").await;
    for round in 1..=3 {
        // POST is not retried once sent: it succeeds only if no dead connection is tried.
        let answer = send(request(Method::POST, web, "/")).await;
        assert_eq!(answer.status, StatusCode::OK, "round {round}");
        eventually("the backend closes the idle connection", async || {
            backend.closed() == round
        })
        .await;
    }
    assert_eq!(backend.opened(), 3);
}

#[tokio::test]
async fn a_response_cut_short_does_not_return_its_connection_to_the_pool() {
    let backend = CountingBackend::start(None).await;
    let (_running, web) = gatehouse_for(&backend, "").await;
    let response = tokio::time::timeout(
        DEADLINE,
        http_client().request(request(Method::GET, web, "/big")),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.data_ref().is_some_and(|data| !data.is_empty()));
    drop(body);
    eventually("the cut-short connection closes", async || {
        backend.closed() == 1
    })
    .await;
    let answer = send(request(Method::GET, web, "/")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), "ok", "no bytes of the cut-short body leak");
    assert_eq!(backend.opened(), 2);
}

#[tokio::test]
async fn idle_connections_close_after_the_pools_idle_timeout() {
    let backend = CountingBackend::start(None).await;
    let (_running, web) = gatehouse_for(&backend, "    timeouts: { idle: 1s }\n").await;
    let answer = send(request(Method::GET, web, "/")).await;
    assert_eq!(answer.status, StatusCode::OK);
    eventually("gatehouse closes the idle connection", async || {
        backend.closed() == 1
    })
    .await;
    let answer = send(request(Method::GET, web, "/")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(backend.opened(), 2);
}
