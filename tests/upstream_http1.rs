//! gatehouse's own HTTP/1.1 client (src/upstream/http1.rs) against a raw backend that
//! answers each path with scripted bytes: chunked bodies, bodies delimited by close,
//! interim responses, conflicting or over-long framing, and chunked uploads. The client must
//! hand the client exactly the body, and reuse a backend connection only after a clean
//! response.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A backend that answers each request by its path with raw scripted bytes, and counts the
/// connections it accepted. It records every request head and body it read.
struct ScriptedBackend {
    address: SocketAddr,
    opened: Arc<AtomicUsize>,
    received: Arc<Mutex<Vec<u8>>>,
}

impl ScriptedBackend {
    async fn start() -> ScriptedBackend {
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend = ScriptedBackend {
            address: socket.local_addr().unwrap(),
            opened: Arc::default(),
            received: Arc::default(),
        };
        let (opened, received) = (backend.opened.clone(), backend.received.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = socket.accept().await {
                opened.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, received.clone()));
            }
        });
        backend
    }

    fn opened(&self) -> usize {
        self.opened.load(Ordering::SeqCst)
    }

    fn received(&self) -> String {
        String::from_utf8_lossy(&self.received.lock().unwrap()).into_owned()
    }
}

/// A response head of ≈ 500 KB (one long header): past the client's 417,792-byte limit, within
/// the 512 KiB its read buffer grows to.
static HUGE_HEAD: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
    let mut head = b"HTTP/1.1 200 OK\r\nx-long: ".to_vec();
    head.resize(head.len() + 500_000, b'a');
    head.extend_from_slice(b"\r\ncontent-length: 2\r\n\r\nok");
    head
});

/// An 8 MiB response: more than the sockets between gatehouse and a client hold.
static BIG: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
    let mut answer = b"HTTP/1.1 200 OK\r\ncontent-length: 8388608\r\n\r\n".to_vec();
    answer.resize(answer.len() + 8 * 1024 * 1024, b'x');
    answer
});

/// The raw answer to `path`, and whether the backend closes the connection after it.
fn script(path: &str) -> (&'static [u8], bool) {
    match path {
        "/huge-head" => (HUGE_HEAD.as_slice(), false),
        "/big" => (BIG.as_slice(), false),
        "/own-id" => (
            b"HTTP/1.1 200 OK\r\nx-request-id: made-by-the-backend\r\ncontent-length: 2\r\n\r\nok",
            false,
        ),
        "/chunked" => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n",
            false,
        ),
        "/until-close" => (b"HTTP/1.1 200 OK\r\n\r\nuntil close", true),
        "/continue" => (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            false,
        ),
        "/conflict" => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
            false,
        ),
        "/extra" => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nleaked",
            false,
        ),
        "/coded" => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            false,
        ),
        "/no-content" => (
            b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello",
            false,
        ),
        "/cut-short" => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
            true,
        ),
        "/bad-chunk" => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokzz\r\n",
            false,
        ),
        "/switch" => (
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n",
            true,
        ),
        "/keep-alive-off" => (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
            false,
        ),
        _ => (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false),
    }
}

/// Reads requests (heads, Content-Length and chunked bodies) and answers each by script.
async fn serve(mut stream: TcpStream, received: Arc<Mutex<Vec<u8>>>) {
    let mut pending = Vec::new();
    let mut buffer = [0u8; 16384];
    loop {
        let end = loop {
            if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => pending.extend_from_slice(&buffer[..n]),
            }
        };
        let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
        let body_end = if head.contains("transfer-encoding: chunked") {
            loop {
                if let Some(at) = pending[end..].windows(5).position(|w| w == b"0\r\n\r\n") {
                    break end + at + 5;
                }
                match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => pending.extend_from_slice(&buffer[..n]),
                }
            }
        } else {
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length: "))
                .and_then(|value| value.trim().parse().ok())
                .unwrap_or(0);
            while pending.len() < end + length {
                match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => pending.extend_from_slice(&buffer[..n]),
                }
            }
            end + length
        };
        received
            .lock()
            .unwrap()
            .extend_from_slice(&pending[..body_end]);
        pending.drain(..body_end);
        if path == "/stall" {
            // Three bytes of ten, then silence with the connection open.
            let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc";
            if stream.write_all(answer).await.is_ok() {
                tokio::time::sleep(DEADLINE).await;
            }
            return;
        }
        let (answer, close) = script(&path);
        if stream.write_all(answer).await.is_err() || close {
            return;
        }
    }
}

async fn gatehouse_for(
    backend: &ScriptedBackend,
) -> ((TestDir, Arc<gatehouse::server::Gatehouse>), SocketAddr) {
    let dir = TestDir::new();
    let (gatehouse, web) = single_pool_gatehouse(
        &dir,
        &[("a", backend.address)],
        "",
        "    retries: { attempts: 1 }\n",
    )
    .await;
    ((dir, gatehouse), web)
}

#[tokio::test]
async fn chunked_and_interim_responses_arrive_whole_on_one_connection() {
    let backend = ScriptedBackend::start().await;
    let (_running, web) = gatehouse_for(&backend).await;
    for _ in 0..3 {
        let answer = get(web, "app", "/chunked").await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.text(), "hello, world");
        let answer = get(web, "app", "/continue").await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.text(), "ok", "1xx answers are skipped");
    }
    // Idle connections are kept per worker: one each at most.
    let workers = gatehouse::workers::count(0);
    assert!(
        (1..=workers).contains(&backend.opened()),
        "clean responses leave the connection reusable: {} opened for {workers} workers",
        backend.opened()
    );
}

#[tokio::test]
async fn a_body_delimited_by_close_arrives_whole_and_its_connection_is_not_reused() {
    let backend = ScriptedBackend::start().await;
    let (_running, web) = gatehouse_for(&backend).await;
    let answer = get(web, "app", "/until-close").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), "until close");
    let answer = get(web, "app", "/keep-alive-off").await;
    assert_eq!(answer.text(), "ok");
    let answer = get(web, "app", "/").await;
    assert_eq!(answer.text(), "ok");
    assert_eq!(
        backend.opened(),
        3,
        "neither a close-delimited body nor `Connection: close` leaves its connection"
    );
}

#[tokio::test]
async fn conflicting_or_overlong_framing_never_reaches_the_next_request() {
    let backend = ScriptedBackend::start().await;
    let (_running, web) = gatehouse_for(&backend).await;
    let answer = get(web, "app", "/conflict").await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    let answer = get(web, "app", "/switch").await;
    assert_eq!(
        answer.status,
        StatusCode::BAD_GATEWAY,
        "101 to a request that asked no upgrade"
    );
    let answer = get(web, "app", "/coded").await;
    assert_eq!(
        answer.status,
        StatusCode::BAD_GATEWAY,
        "a gzip transfer coding cannot be passed on, nor its bytes passed off as plain"
    );
    let answer = get(web, "app", "/no-content").await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT);
    assert_eq!(
        answer.headers.get("content-length"),
        None,
        "a 204 has no body to frame"
    );
    let answer = get(web, "app", "/extra").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), "ok");
    let answer = get(web, "app", "/").await;
    assert_eq!(
        answer.text(),
        "ok",
        "bytes past a response never answer the next request"
    );
    assert_eq!(backend.opened(), 6);
}

#[tokio::test]
async fn the_response_carries_the_request_id_once_whoever_writes_its_head() {
    let backend = ScriptedBackend::start().await;
    let (_running, web) = gatehouse_for(&backend).await;
    // A GET and a POST whose body came with its head are answered by gatehouse's own HTTP/1
    // loop, a chunked POST through hyper.
    for request in [
        "GET /own-id HTTP/1.1\r\nHost: app\r\nX-Request-Id: chosen-by-the-client\r\nConnection: close\r\n\r\n",
        "POST /own-id HTTP/1.1\r\nHost: app\r\nX-Request-Id: chosen-by-the-client\r\nContent-Length: 6\r\nConnection: close\r\n\r\na body",
        "POST /own-id HTTP/1.1\r\nHost: app\r\nX-Request-Id: chosen-by-the-client\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n6\r\na body\r\n0\r\n\r\n",
    ] {
        let answer = raw_exchange(web, request.as_bytes())
            .await
            .to_ascii_lowercase();
        assert!(answer.ends_with("\r\n\r\nok"), "{answer}");
        assert_eq!(answer.matches("x-request-id:").count(), 1, "{answer}");
        assert!(
            answer.contains("\r\nx-request-id: chosen-by-the-client\r\n"),
            "{answer}"
        );
    }
}

#[tokio::test]
async fn an_overlong_response_head_is_refused_however_it_arrives() {
    let backend = ScriptedBackend::start().await;
    let (_running, web) = gatehouse_for(&backend).await;
    // Written at once, the head may complete within one large read: refused all the same.
    for _ in 0..10 {
        let answer = get(web, "app", "/huge-head").await;
        assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    }
    assert_eq!(get(web, "app", "/").await.text(), "ok");
}

#[tokio::test]
async fn a_malformed_chunked_body_is_cut_off_and_its_connection_dropped() {
    let backend = ScriptedBackend::start().await;
    let (_running, web) = gatehouse_for(&backend).await;
    let request = Request::get(format!("http://{web}/bad-chunk"))
        .header("host", "app")
        .body(Full::new(Bytes::new()))
        .unwrap();
    // hyper may not have flushed the head when the body fails: either way, the client
    // must see a failure, never a clean end.
    let response = tokio::time::timeout(DEADLINE, http_client().request(request))
        .await
        .unwrap();
    if let Ok(response) = response {
        let body = tokio::time::timeout(DEADLINE, response.into_body().collect())
            .await
            .unwrap();
        assert!(
            body.is_err(),
            "the client sees the body fail, not a clean end"
        );
    }
    let answer = get(web, "app", "/").await;
    assert_eq!(answer.text(), "ok");
    assert_eq!(backend.opened(), 2);
}

#[tokio::test]
async fn a_body_cut_off_by_its_backend_or_its_client_is_counted_and_logged_so() {
    let backend = ScriptedBackend::start().await;
    let dir = TestDir::new();
    let yaml = format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}\naccess_log: {{ target: access.log }}\nlisteners:\n  web: {{ listen: \"127.0.0.1:0\", pool: p }}\npools:\n{}",
        pool_yaml(
            "p",
            &[("a", backend.address)],
            "    timeouts: { request: 1s }\n    retries: { attempts: 1 }\n"
        )
    );
    let gatehouse = start_gatehouse(&dir, &yaml).await;
    let web = gatehouse.listener_address("web").unwrap();
    for (round, path) in ["/cut-short", "/stall"].into_iter().enumerate() {
        let started = std::time::Instant::now();
        let request = format!("GET {path} HTTP/1.1\r\nHost: app\r\n\r\n");
        let answer = raw_exchange(web, request.as_bytes()).await;
        assert!(
            answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.ends_with("\r\n\r\nabc"),
            "{path}: the head and the three bytes, then the connection closes: {answer:?}"
        );
        assert!(
            started.elapsed() < DEADLINE,
            "{path}: closed by gatehouse, not by the client giving up"
        );
        let counted = metric(
            &metrics_text(&gatehouse).await,
            "gatehouse_backend_responses_aborted_total",
            &[("pool", "p"), ("backend", "a")],
        );
        assert_eq!(counted, Some(round as f64 + 1.0), "{path}");
    }
    assert_eq!(get(web, "app", "/").await.text(), "ok");
    // A client that leaves inside a large body.
    let mut client = tokio::net::TcpStream::connect(web).await.unwrap();
    client
        .write_all(b"GET /big HTTP/1.1\r\nHost: app\r\n\r\n")
        .await
        .unwrap();
    let mut received = Vec::new();
    read_until(&mut client, &mut received, |text| text.contains("xxxx")).await;
    drop(client);
    let mut log = String::new();
    eventually("four access log lines", async || {
        log = std::fs::read_to_string(dir.path("access.log")).unwrap_or_default();
        log.lines().count() == 4
    })
    .await;
    let ended: Vec<String> = log
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["ended"].to_string())
        .collect();
    assert_eq!(
        ended,
        [
            "\"backend_aborted\"",
            "\"backend_aborted\"",
            "\"complete\"",
            "\"client_aborted\""
        ],
        "the status (200) alone would not tell them apart"
    );
}

#[tokio::test]
async fn a_backend_waiting_for_a_slow_upload_is_not_cut_off_as_stalled() {
    // The backend answers at once with the start of its body, then waits for the whole
    // upload before it ends the body: silent for longer than `timeouts.request`, but
    // rightly, since the client is still sending.
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = backend.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = backend.accept().await.unwrap();
        let mut received = Vec::new();
        read_until(&mut stream, &mut received, |text| text.contains("\r\n\r\n")).await;
        stream
            .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nstart,\r\n")
            .await
            .unwrap();
        read_until(&mut stream, &mut received, |text| {
            text.ends_with("0\r\n\r\n")
        })
        .await;
        stream.write_all(b"4\r\nend.\r\n0\r\n\r\n").await.unwrap();
        let _ = stream.read(&mut [0u8; 1]).await;
    });
    let dir = TestDir::new();
    let (_gatehouse, web) = single_pool_gatehouse(
        &dir,
        &[("a", address)],
        "",
        "    timeouts: { request: 1s }\n    retries: { attempts: 1 }\n",
    )
    .await;
    let mut client = TcpStream::connect(web).await.unwrap();
    client
        .write_all(b"POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    // Six chunks 300 ms apart: the upload lasts longer than `timeouts.request`.
    for _ in 0..6 {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        client.write_all(b"5\r\nchunk\r\n").await.unwrap();
    }
    client.write_all(b"0\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    read_until(&mut client, &mut answer, |text| text.ends_with("0\r\n\r\n")).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.contains("end."),
        "the whole body arrived: {answer:?}"
    );
}

#[tokio::test]
async fn an_h2c_upgrade_is_not_passed_on_so_no_tunnel_bypasses_routing() {
    let backend = ScriptedBackend::start().await;
    let (_running, web) = gatehouse_for(&backend).await;
    // The scripted backend switches protocols on /switch whatever it was asked: given the
    // upgrade, it would now speak HTTP/2 with the client through a blind tunnel.
    let answer = raw_exchange(
        web,
        b"GET /switch HTTP/1.1\r\nHost: app\r\nConnection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 502 "),
        "no tunnel is opened: {answer:?}"
    );
    let received = backend.received().to_ascii_lowercase();
    assert!(
        !received.contains("upgrade") && !received.contains("http2-settings"),
        "the backend was not asked to upgrade: {received:?}"
    );
}

#[tokio::test]
async fn an_upload_without_length_goes_up_chunked_and_the_connection_stays() {
    let backend = ScriptedBackend::start().await;
    let (_running, web) = gatehouse_for(&backend).await;
    // One client connection, so one worker: its backend connection serves both rounds.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    for round in 0..2 {
        let frames = ["first,", "second,", "third"].map(|part| Bytes::from_static(part.as_bytes()));
        let request = Request::post(format!("http://{web}/upload"))
            .header("host", "app")
            .body(Frames(frames.into()))
            .unwrap();
        let response = tokio::time::timeout(DEADLINE, client.request(request))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "round {round}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
    }
    let seen = backend.received();
    assert_eq!(
        seen.matches("transfer-encoding: chunked\r\n").count(),
        2,
        "{seen}"
    );
    let decoded: String = seen
        .split("\r\n")
        .filter(|line| line.contains("first") || line.contains("second") || line.contains("third"))
        .collect();
    assert_eq!(decoded, "first,second,thirdfirst,second,third");
    assert_eq!(backend.opened(), 1);
}

/// A request body of several frames and no declared length (so it goes chunked).
struct Frames(std::collections::VecDeque<Bytes>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(
            self.0
                .pop_front()
                .map(|data| Ok(http_body::Frame::data(data))),
        )
    }
}
