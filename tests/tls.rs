//! TLS termination over real sockets: SNI certificate choice, ALPN (h2 and http/1.1),
//! minimum version and session resumption, with certificates made by rcgen at test time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use http::StatusCode;
use std::sync::Arc;

async fn tls_gatehouse(
    dir: &TestDir,
    ca: &TestCa,
    tls_extra: &str,
) -> (Arc<gatehouse::server::Gatehouse>, TestBackend) {
    let backend = TestBackend::start("b").await;
    ca.leaf(dir, "portal", &["portal.example.gov", "localhost"]);
    ca.leaf(dir, "tax", &["tax.example.gov"]);
    ca.leaf(dir, "wild", &["*.permits.example.gov"]);
    let yaml = format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}
listeners:
  secure:
    listen: \"127.0.0.1:0\"
    protocol: https
    tls:
      certificates:
        - {{ cert: portal.crt, key: portal.key }}
        - {{ cert: tax.crt, key: tax.key }}
        - {{ cert: wild.crt, key: wild.key }}
{tls_extra}    pool: p
pools:
{}",
        pool_yaml("p", &[("b", backend.address)], "")
    );
    (start_gatehouse(dir, &yaml).await, backend)
}

#[tokio::test]
async fn sni_chooses_the_certificate_and_falls_back_to_the_first() {
    let dir = TestDir::new();
    let ca = TestCa::new();
    let (gatehouse, _backend) = tls_gatehouse(&dir, &ca, "").await;
    let secure = gatehouse.listener_address("secure").unwrap();
    let h1: &[&[u8]] = &[b"http/1.1"];

    let (_, names, answer) = tls_get(&ca, secure, "tax.example.gov", h1, "/").await;
    assert_eq!(names, vec!["tax.example.gov"]);
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.backend().as_deref(), Some("b"));

    let (_, names, _) = tls_get(&ca, secure, "portal.example.gov", h1, "/").await;
    assert_eq!(names, vec!["portal.example.gov", "localhost"]);

    let (_, names, _) = tls_get(&ca, secure, "apply.permits.example.gov", h1, "/").await;
    assert_eq!(names, vec!["*.permits.example.gov"]);

    let client = ca.client_config(h1);
    let tcp = tokio::net::TcpStream::connect(secure).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("unknown.example.org").unwrap();
    let refused = tokio_rustls::TlsConnector::from(client)
        .connect(name, tcp)
        .await;
    assert!(
        refused.is_err(),
        "an unknown name gets the default (first) certificate, which the client rejects"
    );
}

#[tokio::test]
async fn alpn_negotiates_h2_and_http1() {
    let dir = TestDir::new();
    let ca = TestCa::new();
    let (gatehouse, backend) = tls_gatehouse(&dir, &ca, "").await;
    let secure = gatehouse.listener_address("secure").unwrap();

    let (alpn, _, answer) = tls_get(
        &ca,
        secure,
        "portal.example.gov",
        &[b"h2", b"http/1.1"],
        "/two",
    )
    .await;
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(answer.status, StatusCode::OK);

    let (alpn, _, answer) =
        tls_get(&ca, secure, "portal.example.gov", &[b"http/1.1"], "/one").await;
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(answer.status, StatusCode::OK);

    let seen = backend.requests();
    assert_eq!(
        seen[0].version, "HTTP/1.1",
        "h2 downstream, HTTP/1.1 upstream"
    );
    assert_eq!(
        seen[0].header("x-forwarded-proto").as_deref(),
        Some("https")
    );
    assert_eq!(
        seen[0].header("host").as_deref(),
        Some("portal.example.gov")
    );
}

#[tokio::test]
async fn min_version_1_3_refuses_tls_1_2_clients() {
    let dir = TestDir::new();
    let ca = TestCa::new();
    let (gatehouse, _backend) = tls_gatehouse(&dir, &ca, "      min_version: \"1.3\"\n").await;
    let secure = gatehouse.listener_address("secure").unwrap();

    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(ca.ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls12_only =
        rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
            .with_root_certificates(roots)
            .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(secure).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("portal.example.gov").unwrap();
    let result = tokio_rustls::TlsConnector::from(Arc::new(tls12_only))
        .connect(name, tcp)
        .await;
    assert!(result.is_err(), "TLS 1.2 must be refused");

    let (_, _, answer) = tls_get(&ca, secure, "portal.example.gov", &[b"http/1.1"], "/").await;
    assert_eq!(answer.status, StatusCode::OK, "TLS 1.3 works");

    let text = metrics_text(&gatehouse).await;
    assert_eq!(
        metric(
            &text,
            "gatehouse_tls_handshake_errors_total",
            &[("listener", "secure")]
        ),
        Some(1.0)
    );
}

/// Connects twice with one client config and reports whether the second handshake resumed.
async fn second_handshake_resumed(ca: &TestCa, address: std::net::SocketAddr) -> bool {
    let client = ca.client_config(&[b"http/1.1"]);
    let mut resumed = false;
    for _ in 0..2 {
        let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("portal.example.gov").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(client.clone())
            .connect(name, tcp)
            .await
            .unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tls.write_all(b"GET / HTTP/1.1\r\nHost: portal.example.gov\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, tls.read_to_end(&mut response)).await;
        resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    }
    resumed
}

#[tokio::test]
async fn session_resumption_can_be_turned_off() {
    let dir = TestDir::new();
    let ca = TestCa::new();
    let (on, _b1) = tls_gatehouse(&dir, &ca, "").await;
    assert!(second_handshake_resumed(&ca, on.listener_address("secure").unwrap()).await);

    let dir = TestDir::new();
    let (off, _b2) = tls_gatehouse(&dir, &ca, "      session_resumption: false\n").await;
    assert!(!second_handshake_resumed(&ca, off.listener_address("secure").unwrap()).await);
}

/// Sends one HTTP/1.1 request over TLS with `client` and returns the raw answer ("" if the
/// server refused the connection).
async fn raw_tls_request(
    client: Arc<rustls::ClientConfig>,
    address: std::net::SocketAddr,
    request: &[u8],
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("portal.example.gov").unwrap();
    let Ok(mut tls) = tokio_rustls::TlsConnector::from(client)
        .connect(name, tcp)
        .await
    else {
        return String::new();
    };
    if tls.write_all(request).await.is_err() {
        return String::new();
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, tls.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn mutual_tls_required_optional_and_the_subject_header() {
    let request = b"GET / HTTP/1.1\r\nHost: portal.example.gov\r\nX-Client-Subject: CN=forged\r\nConnection: close\r\n\r\n";
    for (mode, anonymous_allowed) in [("required", false), ("optional", true)] {
        let dir = TestDir::new();
        let ca = TestCa::new();
        std::fs::write(dir.path("clients.pem"), &ca.ca_pem).unwrap();
        let (client_cert, client_key) = ca.leaf(&dir, "citizen-app", &["app.example.gov"]);
        let extra = format!(
            "      client_ca: clients.pem\n      client_auth: {mode}\n      client_cert_header: X-Client-Subject\n"
        );
        let (gatehouse, backend) = tls_gatehouse(&dir, &ca, &extra).await;
        let secure = gatehouse.listener_address("secure").unwrap();

        let anonymous = raw_tls_request(ca.client_config(&[b"http/1.1"]), secure, request).await;
        assert_eq!(
            anonymous.starts_with("HTTP/1.1 200"),
            anonymous_allowed,
            "{mode}: {anonymous:?}"
        );
        let with_certificate = raw_tls_request(
            ca.client_config_with_certificate(&client_cert, &client_key),
            secure,
            request,
        )
        .await;
        assert!(
            with_certificate.starts_with("HTTP/1.1 200"),
            "{mode}: {with_certificate:?}"
        );

        let subjects: Vec<Option<String>> = backend
            .requests()
            .iter()
            .map(|seen| seen.header("x-client-subject"))
            .collect();
        let verified = subjects.last().cloned().flatten().unwrap();
        assert!(verified.contains("CN="), "{verified}");
        assert!(
            !verified.contains("forged"),
            "the client's own header is never forwarded"
        );
        if anonymous_allowed {
            assert_eq!(
                subjects[0], None,
                "an anonymous client gets no subject header"
            );
        }
    }
}

#[tokio::test]
async fn hsts_is_added_to_https_responses() {
    let dir = TestDir::new();
    let ca = TestCa::new();
    let backend = TestBackend::start("b").await;
    ca.leaf(&dir, "portal", &["portal.example.gov"]);
    let yaml = format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}
listeners:
  secure:
    listen: \"127.0.0.1:0\"
    protocol: https
    tls: {{ certificates: [ {{ cert: portal.crt, key: portal.key }} ] }}
    hsts: {{ max_age: 365d, include_subdomains: true }}
    pool: p
pools:
{}",
        pool_yaml("p", &[("b", backend.address)], "")
    );
    let gatehouse = start_gatehouse(&dir, &yaml).await;
    let secure = gatehouse.listener_address("secure").unwrap();
    let (_, _, answer) = tls_get(&ca, secure, "portal.example.gov", &[b"h2"], "/").await;
    assert_eq!(
        answer.headers["strict-transport-security"],
        "max-age=31536000; includeSubDomains"
    );
}

/// An HTTPS backend (rustls) answering `tls-backend` to everything but a `/healthz` for
/// another host than `name`, which gets 421 (a name-based virtual host).
async fn tls_backend(dir: &TestDir, ca: &TestCa, name: &str) -> std::net::SocketAddr {
    use hyper_util::rt::TokioIo;
    use rustls::pki_types::pem::PemObject as _;
    let (cert, key) = ca.leaf(dir, "backend", &[name]);
    let loaded = gatehouse::tls::LoadedCertificate::load(&cert, &key).unwrap();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            loaded.certified_key.cert.clone(),
            rustls::pki_types::PrivateKeyDer::from_pem_file(&key).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = socket.local_addr().unwrap();
    let name = name.to_owned();
    tokio::spawn(async move {
        while let Ok((stream, _)) = socket.accept().await {
            let acceptor = acceptor.clone();
            let name = name.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |request: http::Request<_>| {
                    let misdirected = request.uri().path() == "/healthz"
                        && request.headers()[http::header::HOST] != name.as_str();
                    async move {
                        let mut response = http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b"tls-backend"),
                        ));
                        if misdirected {
                            *response.status_mut() = http::StatusCode::MISDIRECTED_REQUEST;
                        }
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    address
}

/// A pool with `tls` speaks TLS to its backends, verified against its CA; so do its health
/// checks (sent in plain text, they failed, and the pool answered 503 to everything), whose
/// Host is the pool's TLS server name (a name-based backend refuses its address).
#[tokio::test]
async fn pools_can_speak_tls_to_their_backends() {
    let dir = TestDir::new();
    let ca = TestCa::new();
    std::fs::write(dir.path("backend-ca.pem"), &ca.ca_pem).unwrap();
    let backend = tls_backend(&dir, &ca, "backend.internal").await;
    let other_ca = TestCa::new();
    std::fs::write(dir.path("other-ca.pem"), &other_ca.ca_pem).unwrap();
    let yaml = format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}
listeners:
  web:
    listen: \"127.0.0.1:0\"
    routes:
      - {{ path_prefix: \"/untrusted\", pool: untrusted }}
    pool: secure
pools:
  secure:
    health_check: {{ type: http, path: /healthz }}
    tls: {{ sni: backend.internal, ca: backend-ca.pem }}
    backends: [ {{ name: b, address: \"{backend}\" }} ]
  untrusted:
    health_check: {{ type: none }}
    retries: {{ attempts: 1 }}
    tls: {{ sni: backend.internal, ca: other-ca.pem }}
    backends: [ {{ name: b, address: \"{backend}\" }} ]
"
    );
    let gatehouse = start_gatehouse(&dir, &yaml).await;
    let web = gatehouse.listener_address("web").unwrap();
    let answer = get(web, "x", "/").await;
    assert_eq!(answer.status, http::StatusCode::OK);
    assert_eq!(answer.text(), "tls-backend");
    let text = metrics_text(&gatehouse).await;
    assert_eq!(
        metric(
            &text,
            "gatehouse_backend_up",
            &[("pool", "secure"), ("backend", "b")]
        ),
        Some(1.0),
        "its health checks pass"
    );
    let refused = get(web, "x", "/untrusted").await;
    assert_eq!(
        refused.status,
        http::StatusCode::BAD_GATEWAY,
        "a backend certificate from another CA is refused"
    );
}

/// A head begun and not finished in time, and a client silent after its handshake (which
/// waits for its first byte outside the HTTP/1 loop), both get 408 and count as late heads.
#[tokio::test]
async fn a_late_request_head_over_tls_gets_408() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let ca = TestCa::new();
    ca.leaf(&dir, "portal", &["portal.example.gov"]);
    let yaml = format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}
listeners:
  secure:
    listen: \"127.0.0.1:0\"
    protocol: https
    tls: {{ certificates: [ {{ cert: portal.crt, key: portal.key }} ] }}
    limits: {{ header_timeout: 300ms }}
    pool: p
pools:
{}",
        pool_yaml("p", &[("b", backend.address)], "")
    );
    let gatehouse = start_gatehouse(&dir, &yaml).await;
    let secure = gatehouse.listener_address("secure").unwrap();
    let answer = raw_tls_request(
        ca.client_config(&[b"http/1.1"]),
        secure,
        b"GET / HTTP/1.1\r\nHost: portal.example.gov\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    let silent = raw_tls_request(ca.client_config(&[b"http/1.1"]), secure, b"").await;
    assert!(silent.starts_with("HTTP/1.1 408"), "{silent:?}");
    assert!(backend.requests().is_empty());
    let text = metrics_text(&gatehouse).await;
    let late = metric(
        &text,
        "gatehouse_rejected_total",
        &[("listener", "secure"), ("reason", "header_timeout")],
    );
    assert_eq!(late, Some(2.0));
}

/// A client that connects and closes without a byte — a fronting balancer's TCP health check,
/// a port scan — is no failed handshake: however soon it closes (before or after gatehouse
/// accepted it), it is closed without a word and counted only as a connection.
#[tokio::test]
async fn connections_closed_without_a_byte_are_not_failed_handshakes() {
    let dir = TestDir::new();
    let ca = TestCa::new();
    let (gatehouse, _backend) = tls_gatehouse(&dir, &ca, "").await;
    let secure = gatehouse.listener_address("secure").unwrap();
    for _ in 0..20 {
        drop(tokio::net::TcpStream::connect(secure).await.unwrap());
    }
    let (_, _, answer) = tls_get(&ca, secure, "portal.example.gov", &[b"http/1.1"], "/").await;
    assert_eq!(answer.status, StatusCode::OK);
    let listener = [("listener", "secure")];
    eventually("the 21 connections counted and closed", async || {
        let text = metrics_text(&gatehouse).await;
        metric(&text, "gatehouse_connections_total", &listener) == Some(21.0)
            && metric(&text, "gatehouse_connections_active", &listener) == Some(0.0)
    })
    .await;
    let text = metrics_text(&gatehouse).await;
    for errors in [
        metric(&text, "gatehouse_tls_handshake_errors_total", &listener),
        metric(
            &text,
            "gatehouse_rejected_total",
            &[("listener", "secure"), ("reason", "tls")],
        ),
    ] {
        assert!(errors.unwrap_or(0.0) == 0.0, "{text}");
    }
}
