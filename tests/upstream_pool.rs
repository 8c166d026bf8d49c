//! The upstream keep-alive pool, seen from a backend that counts its connections: requests
//! share one connection, a connection the backend closed while idle is never used, a
//! response cut short never leaves its connection in the pool, idle connections close
//! after the pool's idle timeout or a little before the backend's announced one, and a GET
//! a closing (or resetting) idle connection did not answer goes out again.
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

/// How a [`CountingBackend`] treats its connections.
#[derive(Clone, Copy, Default)]
struct Behaviour {
    /// A connection that receives no request for that long is closed by the backend.
    idle_close: Option<Duration>,
    /// Answers this many requests per connection, then reads the next one and closes
    /// without answering: its keep-alive timer firing just as a request arrived.
    answers_per_connection: Option<usize>,
    /// Closes those connections with a reset (RST) rather than a FIN, as a backend whose
    /// socket had unread bytes or set a zero linger does.
    resets: bool,
    /// Sent as `Keep-Alive: timeout=N` with every response.
    announced_idle_seconds: Option<u32>,
}

/// A raw HTTP/1.1 backend that counts connections opened and closed. `/big` answers with
/// BIG bytes; anything else with `ok`.
struct CountingBackend {
    address: SocketAddr,
    opened: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

impl CountingBackend {
    async fn start(idle_close: Option<Duration>) -> CountingBackend {
        CountingBackend::behaving(Behaviour {
            idle_close,
            ..Behaviour::default()
        })
        .await
    }

    async fn behaving(behaviour: Behaviour) -> CountingBackend {
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
                    serve(stream, behaviour, &requests).await;
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

/// Answers requests without bodies until the peer leaves, a write fails, or `behaviour`
/// has it close.
async fn serve(mut stream: TcpStream, behaviour: Behaviour, requests: &AtomicUsize) {
    let mut head = Vec::new();
    let mut buffer = [0u8; 4096];
    let mut answered = 0;
    let keep_alive = behaviour
        .announced_idle_seconds
        .map(|seconds| format!("keep-alive: timeout={seconds}, max=100\r\n"))
        .unwrap_or_default();
    loop {
        let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
            let read = match behaviour.idle_close {
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
        if behaviour.answers_per_connection == Some(answered) {
            if behaviour.resets {
                stream.set_zero_linger().unwrap();
            }
            return;
        }
        answered += 1;
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
            let answer = format!("HTTP/1.1 200 OK\r\n{keep_alive}content-length: 2\r\n\r\nok");
            stream.write_all(answer.as_bytes()).await
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

/// Sends `request` on the client connection `stream` and reads its response (a head and a
/// Content-Length body); returns the status line. Requests on one client connection are
/// served by one gatehouse worker, so they share that worker's idle backend connections.
async fn exchange(stream: &mut TcpStream, request: &str) -> String {
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&received[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length: "))
                .map_or(0, |length| length.trim().parse().unwrap());
            if received.len() >= end + 4 + length {
                return head.lines().next().unwrap_or_default().to_string();
            }
        }
        let read = tokio::time::timeout(DEADLINE, stream.read(&mut buffer))
            .await
            .expect("response deadline")
            .unwrap();
        assert!(read > 0, "gatehouse closed the connection");
        received.extend_from_slice(&buffer[..read]);
    }
}

/// A backend's keep-alive timer can fire just as a request reaches an idle connection: the
/// backend closes it without answering. An idempotent request without a body goes out
/// again on a new connection (the backend is fine: no failure, no retry elsewhere); a POST
/// is not sent twice, since its backend may have acted on it.
#[tokio::test]
async fn an_idempotent_request_a_closing_idle_connection_did_not_answer_goes_out_again() {
    for resets in [false, true] {
        let backend = CountingBackend::behaving(Behaviour {
            answers_per_connection: Some(1),
            resets,
            ..Behaviour::default()
        })
        .await;
        let (running, web) = gatehouse_for(&backend, "").await;
        let mut client = TcpStream::connect(web).await.unwrap();
        let get = "GET / HTTP/1.1\r\nhost: app\r\n\r\n";
        assert_eq!(exchange(&mut client, get).await, "http/1.1 200 ok");
        assert_eq!(
            exchange(&mut client, get).await,
            "http/1.1 200 ok",
            "resets: {resets}"
        );
        // The second GET reached the first connection, which closed; then a new one answered.
        assert_eq!(backend.requests.load(Ordering::SeqCst), 3);
        assert_eq!(backend.opened(), 2);

        let post = "POST / HTTP/1.1\r\nhost: app\r\ncontent-length: 3\r\n\r\na=1";
        assert_eq!(
            exchange(&mut client, post).await,
            "http/1.1 502 bad gateway",
            "resets: {resets}"
        );
        assert_eq!(backend.requests.load(Ordering::SeqCst), 4, "sent once");
        let text = metrics_text(&running.1).await;
        assert_eq!(
            metric(&text, "gatehouse_upstream_retries_total", &[("pool", "p")]),
            Some(0.0)
        );
    }
}

/// A backend that says how long it keeps an idle connection (`Keep-Alive: timeout=1`, as
/// Apache and Node.js do) never gets a request on a connection near that age: gatehouse
/// stops using it half a second early (a second early for longer timeouts).
#[tokio::test]
async fn a_connection_is_not_used_once_almost_as_old_as_its_backend_keeps_it() {
    let backend = CountingBackend::behaving(Behaviour {
        announced_idle_seconds: Some(1),
        ..Behaviour::default()
    })
    .await;
    let (_running, web) = gatehouse_for(&backend, "").await;
    let mut client = TcpStream::connect(web).await.unwrap();
    let get = "GET / HTTP/1.1\r\nhost: app\r\n\r\n";
    assert_eq!(exchange(&mut client, get).await, "http/1.1 200 ok");
    assert_eq!(exchange(&mut client, get).await, "http/1.1 200 ok");
    assert_eq!(backend.opened(), 1, "a young connection is used");
    // Idle for longer than the half second gatehouse allows under a one-second timeout.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(exchange(&mut client, get).await, "http/1.1 200 ok");
    assert_eq!(backend.opened(), 2, "the old connection was not used");
    eventually(
        "gatehouse closes the connection it no longer uses",
        async || backend.closed() == 1,
    )
    .await;
}
