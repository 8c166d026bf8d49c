//! The HTTP proxy over real sockets: routing, header rewriting, streaming, errors, h2c and
//! WebSocket tunnels, against in-process backends that record what they receive.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn routes_by_host_and_path_prefix_first_match_wins() {
    let tax_api = TestBackend::start("tax-api").await;
    let tax = TestBackend::start("tax").await;
    let wildcard = TestBackend::start("wild").await;
    let portal = TestBackend::start("portal").await;
    let dir = TestDir::new();
    let yaml = format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}
listeners:
  web:
    listen: \"127.0.0.1:0\"
    routes:
      - {{ host: \"tax.example.gov\", path_prefix: \"/api/\", pool: tax-api }}
      - {{ host: \"tax.example.gov\", pool: tax }}
      - {{ host: \"*.example.gov\", pool: wild }}
    pool: portal
pools:
{}{}{}{}",
        pool_yaml("tax-api", &[("a", tax_api.address)], ""),
        pool_yaml("tax", &[("t", tax.address)], ""),
        pool_yaml("wild", &[("w", wildcard.address)], ""),
        pool_yaml("portal", &[("p", portal.address)], ""),
    );
    let gatehouse = start_gatehouse(&dir, &yaml).await;
    let web = gatehouse.listener_address("web").unwrap();

    let cases = [
        ("tax.example.gov", "/api/v1/returns", "tax-api"),
        ("TAX.Example.GOV:8080", "/api/x", "tax-api"),
        ("tax.example.gov", "/apiary", "tax"),
        ("tax.example.gov", "/", "tax"),
        ("permits.example.gov", "/api/", "wild"),
        ("a.b.example.gov", "/", "wild"),
        ("example.gov", "/", "portal"),
        ("other.org", "/api/", "portal"),
    ];
    for (host, path, expected) in cases {
        let answer = get(web, host, path).await;
        assert_eq!(answer.status, StatusCode::OK, "{host}{path}");
        assert_eq!(answer.backend().as_deref(), Some(expected), "{host}{path}");
    }
    assert_eq!(tax_api.requests()[0].uri, "/api/v1/returns");
}

#[tokio::test]
async fn rewrites_headers_for_the_backend() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let (_gatehouse, web) = single_pool_gatehouse(&dir, &[("b", backend.address)], "", "").await;

    let answer = send(
        Request::get(format!("http://{web}/h?q=1"))
            .header("host", "portal.example.gov")
            .header("connection", "keep-alive, x-drop-me, x-forwarded-for, host")
            .header("keep-alive", "timeout=5")
            .header("x-drop-me", "secret")
            .header("proxy-authorization", "Basic Zm9vOmJhcg==")
            .header("te", "trailers")
            .header("x-forwarded-for", "6.6.6.6")
            .header("forwarded", "for=6.6.6.6;proto=https")
            .header("x-real-ip", "6.6.6.6")
            .header("x-custom", "kept")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let seen = &backend.requests()[0];
    assert_eq!(seen.uri, "/h?q=1");
    assert_eq!(seen.version, "HTTP/1.1");
    assert_eq!(seen.header("host").as_deref(), Some("portal.example.gov"));
    for removed in [
        "keep-alive",
        "x-drop-me",
        "proxy-authorization",
        "te",
        "forwarded",
        "x-real-ip",
    ] {
        assert_eq!(
            seen.header(removed),
            None,
            "{removed} must not be forwarded"
        );
    }
    assert_eq!(seen.header("x-custom").as_deref(), Some("kept"));
    assert_eq!(
        seen.header_values("x-forwarded-for"),
        vec!["127.0.0.1".to_string()],
        "an untrusted client's X-Forwarded-For is replaced, and Connection cannot remove ours"
    );
    assert_eq!(seen.header("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        seen.header("x-forwarded-host").as_deref(),
        Some("portal.example.gov")
    );
    let generated = seen.header("x-request-id").unwrap();
    assert_eq!(generated.len(), 32);

    get(web, "portal.example.gov", "/again").await;
    let second = &backend.requests()[1];
    assert_ne!(
        second.header("x-request-id").unwrap(),
        generated,
        "ids are unique"
    );

    send(
        Request::get(format!("http://{web}/with-id"))
            .header("host", "x")
            .header("x-request-id", "client-chosen-42")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(
        backend.requests()[2].header("x-request-id").as_deref(),
        Some("client-chosen-42")
    );
}

#[tokio::test]
async fn trusted_proxies_extend_x_forwarded_for() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let (_gatehouse, web) = single_pool_gatehouse(
        &dir,
        &[("b", backend.address)],
        ", trusted_proxies: [\"127.0.0.0/8\"]",
        "",
    )
    .await;
    send(
        Request::get(format!("http://{web}/"))
            .header("host", "x")
            .header("x-forwarded-for", "203.0.113.7")
            .header("forwarded", "for=203.0.113.7")
            .header("x-real-ip", "203.0.113.7")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    let seen = &backend.requests()[0];
    assert_eq!(
        seen.header("x-forwarded-for").as_deref(),
        Some("203.0.113.7, 127.0.0.1")
    );
    // What a trusted proxy says about its client is passed on as it said it.
    assert_eq!(seen.header("forwarded").as_deref(), Some("for=203.0.113.7"));
    assert_eq!(seen.header("x-real-ip").as_deref(), Some("203.0.113.7"));
}

#[tokio::test]
async fn streams_20_mib_up_and_down_intact() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let (_gatehouse, web) = single_pool_gatehouse(&dir, &[("b", backend.address)], "", "").await;

    let mut payload = vec![0u8; 20 * 1024 * 1024];
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    for byte in payload.iter_mut() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *byte = state as u8;
    }
    let answer = send(
        Request::post(format!("http://{web}/echo"))
            .header("host", "x")
            .body(Full::new(Bytes::from(payload.clone())))
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body.len(), payload.len());
    assert!(answer.body == payload, "echoed body differs");

    let download = get(web, "x", "/bytes?n=20971520").await;
    assert_eq!(download.body.len(), 20 * 1024 * 1024);
    assert!(download.body.iter().all(|b| *b == b'z'));
}

#[tokio::test]
async fn answers_502_503_504_and_431_with_short_bodies() {
    let backend = TestBackend::start("b").await;
    let closed = {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap()
    };
    let dir = TestDir::new();
    let yaml = format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}
listeners:
  web:
    listen: \"127.0.0.1:0\"
    routes:
      - {{ path_prefix: \"/dead/\", pool: dead }}
      - {{ path_prefix: \"/empty/\", pool: empty }}
      - {{ path_prefix: \"/slow\", pool: slow }}
    pool: p
pools:
{}{}{}  empty:
    health_check: {{ type: none }}
    backends:
      - {{ name: off, address: \"{}\", state: disabled }}
",
        pool_yaml("p", &[("b", backend.address)], ""),
        pool_yaml(
            "dead",
            &[("gone", closed)],
            "    retries: { attempts: 1 }\n"
        ),
        pool_yaml(
            "slow",
            &[("b", backend.address)],
            "    timeouts: { request: 300ms }\n"
        ),
        backend.address
    );
    let gatehouse = start_gatehouse(&dir, &yaml).await;
    let web = gatehouse.listener_address("web").unwrap();

    let dead = get(web, "x", "/dead/").await;
    assert_eq!(dead.status, StatusCode::BAD_GATEWAY);
    assert!(dead.text().starts_with("502"), "{}", dead.text());

    let empty = get(web, "x", "/empty/").await;
    assert_eq!(empty.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(empty.text().contains("no backend available"));

    let slow = get(web, "x", "/slow?ms=3000").await;
    assert_eq!(slow.status, StatusCode::GATEWAY_TIMEOUT);

    let huge = "a".repeat(70 * 1024);
    let raw = raw_exchange(
        web,
        format!("GET / HTTP/1.1\r\nHost: x\r\nX-Huge: {huge}\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(
        raw.starts_with("HTTP/1.1 431"),
        "{}",
        &raw[..raw.len().min(200)]
    );

    let many = (0..40)
        .map(|i| format!("X-H{i}: {}\r\n", "b".repeat(2000)))
        .collect::<String>();
    let raw = raw_exchange(
        web,
        format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert!(
        raw.starts_with("HTTP/1.1 431"),
        "{}",
        &raw[..raw.len().min(200)]
    );
    assert!(
        backend
            .requests()
            .iter()
            .all(|seen| seen.header("x-huge").is_none() && seen.header("x-h0").is_none()),
        "nothing oversized reached the backend"
    );

    let text = metrics_text(&gatehouse).await;
    for (code, pool) in [("502", "dead"), ("503", "empty"), ("504", "slow")] {
        assert_eq!(
            metric(
                &text,
                "gatehouse_requests_total",
                &[("code", code), ("pool", pool)]
            ),
            Some(1.0),
            "{code} counted"
        );
    }
    assert_eq!(
        metric(
            &text,
            "gatehouse_rejected_total",
            &[("reason", "no_backend")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "gatehouse_rejected_total",
            &[("reason", "header_too_large")]
        ),
        Some(2.0)
    );
}

#[tokio::test]
async fn malformed_requests_get_400_and_never_reach_a_backend() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let (_gatehouse, web) = single_pool_gatehouse(&dir, &[("b", backend.address)], "", "").await;
    let cases: [&[u8]; 4] = [
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    ];
    for case in cases {
        let raw = raw_exchange(web, case).await;
        assert!(
            raw.starts_with("HTTP/1.1 400"),
            "{:?} -> {raw:?}",
            String::from_utf8_lossy(case)
        );
    }
    assert!(backend.requests().is_empty());
}

#[tokio::test]
async fn h2c_with_prior_knowledge_is_proxied_to_http1() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let (_gatehouse, web) = single_pool_gatehouse(&dir, &[("b", backend.address)], "", "").await;
    let tcp = TcpStream::connect(web).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(connection);
    for index in 0..3 {
        let request = Request::get(format!("http://portal.example.gov/h2c/{index}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.version(), http::Version::HTTP_2);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"backend=b");
    }
    let seen = backend.requests();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0].version, "HTTP/1.1");
    assert_eq!(
        seen[0].header("host").as_deref(),
        Some("portal.example.gov")
    );
}

/// The kind of each field of an HPACK block (RFC 7541 §6) with the table index of its name
/// (0 for a literal name). Strings are skipped, not decoded; size updates are left out.
fn hpack_fields(block: &[u8]) -> Vec<(&'static str, usize)> {
    fn integer(block: &[u8], at: &mut usize, prefix: u32) -> usize {
        let most = (1usize << prefix) - 1;
        let mut value = usize::from(block[*at]) & most;
        *at += 1;
        if value == most {
            let mut shift = 0;
            loop {
                let byte = block[*at];
                *at += 1;
                value += usize::from(byte & 0x7f) << shift;
                shift += 7;
                if byte & 0x80 == 0 {
                    break;
                }
            }
        }
        value
    }
    let mut fields = Vec::new();
    let mut at = 0;
    while at < block.len() {
        let (kind, prefix) = match block[at] {
            byte if byte & 0x80 != 0 => ("indexed", 7),
            byte if byte & 0xc0 == 0x40 => ("indexed from now", 6),
            byte if byte & 0xe0 == 0x20 => {
                integer(block, &mut at, 5);
                continue;
            }
            byte if byte & 0xf0 == 0x10 => ("never indexed", 4),
            _ => ("not indexed", 4),
        };
        let name = integer(block, &mut at, prefix);
        if kind != "indexed" {
            let strings = if name == 0 { 2 } else { 1 };
            for _ in 0..strings {
                let length = integer(block, &mut at, 7);
                at += length;
            }
        }
        fields.push((kind, name));
    }
    fields
}

/// Over HTTP/2 a response's Date, new each second, goes as a never-indexed literal. Indexed,
/// each second's value would join the HPACK table, and the encoder finds a value by walking
/// all those of its name: a cost that grows with the connection's age.
#[tokio::test]
async fn http2_sends_date_as_a_never_indexed_literal() {
    /// Date's index in HPACK's static table.
    const DATE: usize = 33;
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let (_gatehouse, web) = single_pool_gatehouse(&dir, &[("b", backend.address)], "", "").await;
    let mut stream = TcpStream::connect(web).await.unwrap();
    let mut opening = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    opening.extend(h2_frame(0x4, 0, 0, &[]));
    for id in [1, 3] {
        let block = h2_request_block("portal.example.gov", true, &[]);
        opening.extend(h2_frame(0x1, 0x5, id, &block));
    }
    stream.write_all(&opening).await.unwrap();
    let heads = |frames: &[(u8, u8, u32, Vec<u8>)]| {
        frames
            .iter()
            .filter(|frame| frame.0 == 0x1)
            .map(|frame| (frame.2, frame.3.clone()))
            .collect::<Vec<_>>()
    };
    let frames = h2_frames_until(&mut stream, |frames| heads(frames).len() == 2).await;
    let heads = heads(&frames);
    assert_eq!(heads.len(), 2, "two responses' heads: {frames:?}");
    for (id, block) in heads {
        let fields = hpack_fields(&block);
        assert!(
            fields.contains(&("never indexed", DATE)),
            "stream {id}: Date not a never-indexed literal in {fields:?}"
        );
    }
    assert_eq!(backend.requests().len(), 2);
}

/// On an HTTP/2 connection to a listener whose `header_timeout` is 1 s and a backend taking
/// 2.5 s per request: requests in flight longer than two idle periods keep the connection, a
/// request the client gives up on does not, and once idle the connection is closed with a
/// GOAWAY, not before a whole idle period.
async fn idle_http2_connection_closes<IO>(io: IO)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    let request = |path: &str| {
        Request::get(format!("https://portal.example.gov{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    for path in ["/first", "/second"] {
        let response = sender.send_request(request(path)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        response.into_body().collect().await.unwrap();
    }
    let abandoned = tokio::time::timeout(
        Duration::from_millis(300),
        sender.send_request(request("/abandoned")),
    )
    .await;
    assert!(abandoned.is_err(), "still waiting for the backend");
    let idle_since = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("gatehouse closes the idle connection")
        .unwrap()
        .expect("with a GOAWAY, not an error");
    let idle_for = idle_since.elapsed();
    assert!(
        idle_for >= Duration::from_millis(900),
        "not before a whole idle period: {idle_for:?}"
    );
    assert!(sender.send_request(request("/late")).await.is_err());
}

#[tokio::test]
async fn an_idle_h2c_connection_is_closed_but_never_one_with_a_request_in_flight() {
    let backend = TestBackend::start_delayed("b", Duration::from_millis(2500)).await;
    let dir = TestDir::new();
    let (_gatehouse, web) = single_pool_gatehouse(
        &dir,
        &[("b", backend.address)],
        ", limits: { header_timeout: 1s }",
        "",
    )
    .await;
    idle_http2_connection_closes(TcpStream::connect(web).await.unwrap()).await;
}

#[tokio::test]
async fn an_idle_http2_connection_over_tls_is_closed_but_never_one_with_a_request_in_flight() {
    let backend = TestBackend::start_delayed("b", Duration::from_millis(2500)).await;
    let dir = TestDir::new();
    let ca = TestCa::new();
    ca.leaf(&dir, "portal", &["portal.example.gov"]);
    let yaml = format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}\nlisteners:\n  secure: {{ listen: \"127.0.0.1:0\", protocol: https, tls: {{ certificates: [ {{ cert: portal.crt, key: portal.key }} ] }}, limits: {{ header_timeout: 1s }}, pool: p }}\npools:\n{}",
        pool_yaml("p", &[("b", backend.address)], "")
    );
    let gatehouse = start_gatehouse(&dir, &yaml).await;
    let secure = gatehouse.listener_address("secure").unwrap();
    let connector = tokio_rustls::TlsConnector::from(ca.client_config(&[b"h2"]));
    let name = rustls::pki_types::ServerName::try_from("portal.example.gov").unwrap();
    let tcp = TcpStream::connect(secure).await.unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    idle_http2_connection_closes(tls).await;
}

#[tokio::test]
async fn websocket_upgrade_is_tunnelled_after_101() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let (_gatehouse, web) = single_pool_gatehouse(&dir, &[("b", backend.address)], "", "").await;

    let (mut stream, head) = websocket(web).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    for message in [&b"hello tunnel"[..], &[0u8, 1, 2, 255][..]] {
        echo(&mut stream, message).await;
    }
    let seen = &backend.requests()[0];
    assert_eq!(seen.header("upgrade").as_deref(), Some("websocket"));
    assert_eq!(
        seen.header("sec-websocket-key").as_deref(),
        Some("dGhlIHNhbXBsZSBub25jZQ==")
    );

    let refused = raw_exchange(
        web,
        b"GET /plain HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n\r\n",
    )
    .await;
    assert!(
        refused.starts_with("HTTP/1.1 200"),
        "no 101 from the backend, no tunnel: {refused}"
    );
}

#[tokio::test]
async fn a_websocket_silent_both_ways_for_the_idle_timeout_is_closed() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let pool = "    timeouts: { idle: 1s }\n";
    let (_gatehouse, web) = single_pool_gatehouse(&dir, &[("b", backend.address)], "", pool).await;
    let (mut stream, head) = websocket(web).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    // A message every 300 ms keeps it open past the idle timeout.
    let talking = std::time::Instant::now();
    while talking.elapsed() < Duration::from_secs(2) {
        echo(&mut stream, b"ping").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let silent = std::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut rest))
        .await
        .expect("the silent tunnel was closed")
        .unwrap();
    assert!(
        silent.elapsed() >= Duration::from_millis(600),
        "closed {:?} into the silence",
        silent.elapsed()
    );
}

/// A backend that answers 401 as soon as it has a request's head, reads nothing more and
/// keeps its connection open: an application refusing an upload before reading it.
async fn refusing_backend() -> std::net::SocketAddr {
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = socket.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = socket.accept().await {
            tokio::spawn(async move {
                if read_request_head(&mut stream).await.is_some() {
                    let answer = b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 6\r\n\r\nlog in";
                    if stream.write_all(answer).await.is_ok() {
                        tokio::time::sleep(DEADLINE).await;
                    }
                }
            });
        }
    });
    address
}

/// Sends a POST to `path` with a 16 MiB body whole — more than the sockets on the way
/// hold — before reading anything, as most scripts and SDKs do; then reads the answer's
/// head. The connection stays open.
async fn post_whole_then_read(web: std::net::SocketAddr, path: &str) -> (TcpStream, String) {
    let size = 16 << 20;
    let mut request =
        format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n").into_bytes();
    request.resize(request.len() + size, b'd');
    let mut stream = TcpStream::connect(web).await.unwrap();
    tokio::time::timeout(DEADLINE, stream.write_all(&request))
        .await
        .expect("the upload goes out")
        .unwrap_or_else(|error| panic!("the upload to {path} was cut off: {error}"));
    let mut received = Vec::new();
    read_until(&mut stream, &mut received, |text| text.contains("\r\n\r\n")).await;
    (stream, String::from_utf8_lossy(&received).into_owned())
}

#[tokio::test]
async fn an_answer_given_before_the_upload_was_read_reaches_a_client_that_sends_first() {
    let refusing = refusing_backend().await;
    let dir = TestDir::new();
    let yaml = format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}\nlisteners:\n  web:\n    listen: \"127.0.0.1:0\"\n    routes:\n      - {{ path_prefix: \"/down\", pool: down }}\n    pool: p\npools:\n{}{}",
        pool_yaml("p", &[("app", refusing)], ""),
        pool_yaml("down", &[("gone", closed_port())], "")
    );
    let gatehouse = start_gatehouse(&dir, &yaml).await;
    let web = gatehouse.listener_address("web").unwrap();

    // The backend's 401, given after the first bytes of the body.
    let (mut stream, head) = post_whole_then_read(web, "/documents").await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    // The rest of the body was read and thrown away: the connection takes the next request.
    stream
        .write_all(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut next = Vec::new();
    read_until(&mut stream, &mut next, |text| text.contains("log in")).await;
    assert!(next.starts_with(b"HTTP/1.1 401"), "{next:?}");

    // gatehouse's own answer, given before it read any of the body.
    let (_stream, head) = post_whole_then_read(web, "/down/form").await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
}

#[tokio::test]
async fn an_unread_upload_is_drained_for_a_bounded_time_and_never_asked_for() {
    let refusing = refusing_backend().await;
    let dir = TestDir::new();
    let listener = ", routes: [ { path_prefix: \"/small\", pool: p, max_body_bytes: 1000 } ]";
    let (_gatehouse, web) = single_pool_gatehouse(&dir, &[("app", refusing)], listener, "").await;

    // A client that stops sending its body after the answer is not waited for long.
    let mut stream = TcpStream::connect(web).await.unwrap();
    let mut request =
        b"POST /documents HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n".to_vec();
    request.resize(request.len() + 65536, b'd');
    stream.write_all(&request).await.unwrap();
    let mut received = Vec::new();
    read_until(&mut stream, &mut received, |text| text.contains("log in")).await;
    let answered = std::time::Instant::now();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut rest))
        .await
        .expect("a silent unread body is given up on");
    assert!(
        answered.elapsed() >= Duration::from_secs(4),
        "given up on after {:?}, before its 5 s",
        answered.elapsed()
    );

    // `Expect: 100-continue` refused at its head: the body is never asked for.
    let refused = raw_exchange(
        web,
        b"POST /small HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\nExpect: 100-continue\r\n\r\n",
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 413"), "{refused}");
    assert!(!refused.contains("100 Continue"), "{refused}");
}

#[tokio::test]
async fn an_http2_upload_answered_early_is_read_to_its_end_not_reset() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let listener = ", routes: [ { path_prefix: \"/small\", pool: p, max_body_bytes: 1000 } ]";
    let (_gatehouse, web) =
        single_pool_gatehouse(&dir, &[("b", backend.address)], listener, "").await;
    let tcp = TcpStream::connect(web).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let size = 1 << 20;
    let request = Request::post("http://x/small/upload")
        .header("content-length", size.to_string())
        .body(())
        .unwrap();
    let (response, mut upload) = client.send_request(request, false).unwrap();
    let response = tokio::time::timeout(DEADLINE, response)
        .await
        .expect("answered")
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // The rest of the body is taken and thrown away, not refused with a reset of the stream
    // (RST_STREAM NO_ERROR is allowed, but curl 7.x then reports error 92, not the 413).
    let mut left = size;
    while left > 0 {
        upload.reserve_capacity(left);
        let capacity = tokio::time::timeout(
            DEADLINE,
            std::future::poll_fn(|cx| upload.poll_capacity(cx)),
        )
        .await
        .expect("the window opens")
        .expect("the stream stays open")
        .unwrap_or_else(|error| panic!("the stream was reset: {error}"));
        let piece = capacity.min(left);
        upload
            .send_data(Bytes::from(vec![b'd'; piece]), piece == left)
            .unwrap_or_else(|error| panic!("the stream was reset: {error}"));
        left -= piece;
    }
}
