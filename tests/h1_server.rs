//! gatehouse's own HTTP/1.1 loop (src/proxy/h1.rs) serves bodiless requests, and those whose
//! Content-Length body came whole with the head, itself and hands the connection to hyper for
//! anything else — on the same connection, in order, with the
//! answers hyper always gave to bodies and to malformed or over-long heads. The responses it
//! writes carry a Date, their framing (chunked when the backend sent no length) and
//! `Connection: close` when the connection ends after them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn simple_and_other_requests_share_one_connection_in_order() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let (gatehouse, web) = single_pool_gatehouse(&dir, &[("b", backend.address)], "", "").await;
    let mut client = TcpStream::connect(web).await.unwrap();
    send_then_read_answers(
        &mut client,
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
          POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nxyz\
          GET /c HTTP/1.1\r\nHost: x\r\n\r\n",
        3,
    )
    .await;
    eventually("the connection parks", async || {
        let text = metrics_text(&gatehouse).await;
        metric(&text, "gatehouse_connections_idle", &[("listener", "web")]) == Some(1.0)
    })
    .await;
    client
        .write_all(b"GET /d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        client.read_to_end(&mut rest),
    )
    .await
    .expect("gatehouse closes after the answer")
    .unwrap();
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.starts_with("HTTP/1.1 200 OK\r\n"), "{rest}");
    assert!(rest.contains("\r\nconnection: close\r\n"), "{rest}");
    assert!(rest.contains("\r\ndate: "), "{rest}");
    assert_eq!(
        backend.paths_and_body_lengths(),
        [
            ("/a".to_string(), 0),
            ("/b".to_string(), 3),
            ("/c".to_string(), 0),
            ("/d".to_string(), 0)
        ]
    );
}

#[tokio::test]
async fn a_form_body_goes_up_whole_whether_it_came_with_its_head_or_after_it() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let (_gatehouse, web) = single_pool_gatehouse(&dir, &[("b", backend.address)], "", "").await;
    // With its head, in one write (as browsers and curl send a small form): the own loop
    // takes exactly the body, and the next request follows.
    let mut client = TcpStream::connect(web).await.unwrap();
    send_then_read_answers(
        &mut client,
        b"POST /with HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nname=a&b=cd\
          GET /next HTTP/1.1\r\nHost: x\r\n\r\n",
        2,
    )
    .await;
    // After its head: whoever serves it, it arrives whole, and so does the next request.
    let mut client = TcpStream::connect(web).await.unwrap();
    client
        .write_all(b"POST /after HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        .await
        .unwrap();
    tokio::task::yield_now().await;
    send_then_read_answers(
        &mut client,
        b"helloGET /last HTTP/1.1\r\nHost: x\r\n\r\n",
        2,
    )
    .await;
    assert_eq!(
        backend.paths_and_body_lengths(),
        [
            ("/with".to_string(), 11),
            ("/next".to_string(), 0),
            ("/after".to_string(), 5),
            ("/last".to_string(), 0)
        ]
    );
}

#[tokio::test]
async fn a_body_without_length_reaches_the_client_chunked() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let (_gatehouse, web) = single_pool_gatehouse(&dir, &[("b", backend.address)], "", "").await;
    let text = raw_exchange(
        web,
        b"GET /stream?chunks=3&ms=20 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let (head, body) = text.split_once("\r\n\r\n").expect("a whole head");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("\r\ntransfer-encoding: chunked"), "{head}");
    assert!(!head.contains("content-length"), "{head}");
    assert!(head.contains("\r\nconnection: close"), "{head}");
    assert!(head.contains("\r\ndate: "), "{head}");
    assert_eq!(
        body,
        "8\r\nchunk 0\n\r\n8\r\nchunk 1\n\r\n8\r\nchunk 2\n\r\n0\r\n\r\n"
    );
}

#[tokio::test]
async fn heads_it_does_not_serve_get_the_answers_hyper_gives() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let (_gatehouse, web) = single_pool_gatehouse(
        &dir,
        &[("b", backend.address)],
        ", limits: { max_header_bytes: 131072 }",
        "",
    )
    .await;
    let text = raw_exchange(
        web,
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nNOT A REQUEST\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("backend=b"), "{text}");
    assert!(text.contains("HTTP/1.1 400 Bad Request\r\n"), "{text}");

    // A target `http` refuses (too long for a URI) but httparse reads: hyper says 414.
    let long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000));
    let text = raw_exchange(web, long.as_bytes()).await;
    assert!(text.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{text}");

    let text = raw_exchange(
        web,
        b"HEAD /h HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(!text.contains("backend=b"), "no body after HEAD: {text}");
    assert_eq!(
        backend.count("GET"),
        1,
        "the malformed and the over-long head never reached the backend"
    );
}

#[tokio::test]
async fn a_client_whose_connection_resets_abandons_its_request_in_flight() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let (gatehouse, web) = single_pool_gatehouse(&dir, &[("b", backend.address)], "", "").await;
    let active = async || {
        let text = metrics_text(&gatehouse).await;
        metric(
            &text,
            "gatehouse_backend_active_connections",
            &[("pool", "p"), ("backend", "b")],
        )
    };
    let mut client = TcpStream::connect(web).await.unwrap();
    client
        .write_all(b"GET /slow?ms=8000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    eventually("the request is in flight", async || {
        active().await == Some(1.0)
    })
    .await;
    // Closed with a reset (zero linger): the client is gone, not only done sending.
    client.set_zero_linger().unwrap();
    drop(client);
    // Long before the backend would answer (8 s), the request is dropped.
    tokio::time::timeout(
        std::time::Duration::from_secs(4),
        eventually("the abandoned request ends", async || {
            active().await == Some(0.0)
        }),
    )
    .await
    .expect("the request ends when its client leaves");
}

#[tokio::test]
async fn a_client_that_closes_its_sending_side_is_answered_then_closed() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let (_gatehouse, web) = single_pool_gatehouse(&dir, &[("b", backend.address)], "", "").await;
    // Requests read by gatehouse's own loop (two pipelined; a form whose body came with its
    // head) and by a hyper session (a chunked upload), each followed by the client's FIN.
    let cases: [(&str, &[u8], usize); 3] = [
        (
            "pipelined",
            b"GET /slow?ms=300 HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n",
            2,
        ),
        (
            "form",
            b"POST /slow?ms=300 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\na=1",
            1,
        ),
        (
            "chunked upload",
            b"POST /slow?ms=300 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\na=1\r\n0\r\n\r\n",
            1,
        ),
    ];
    for (what, request, answers) in cases {
        let mut client = TcpStream::connect(web).await.unwrap();
        client.write_all(request).await.unwrap();
        client.shutdown().await.unwrap();
        let mut received = Vec::new();
        tokio::time::timeout(DEADLINE, client.read_to_end(&mut received))
            .await
            .unwrap_or_else(|_| panic!("{what}: the connection was not closed"))
            .unwrap();
        let text = String::from_utf8_lossy(&received).to_ascii_lowercase();
        assert_eq!(
            text.matches("http/1.1 200").count(),
            answers,
            "{what}: {text}"
        );
    }
}

/// Writes `bytes` on `client`, then reads until `answers` answers from backend `b` arrived.
async fn send_then_read_answers(client: &mut TcpStream, bytes: &[u8], answers: usize) {
    client.write_all(bytes).await.unwrap();
    let mut received = Vec::new();
    read_until(client, &mut received, |text| {
        text.matches("backend=b").count() == answers
    })
    .await;
}
