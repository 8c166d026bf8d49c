//! Shared test harness: in-process backends that say who they are and record what they
//! receive, gatehouse started in-process on port 0, certificates made with rcgen, and real
//! HTTP clients (hyper, rustls). Everything binds 127.0.0.1 and every wait has a deadline.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use gatehouse::config;
use gatehouse::metrics::Metrics;
use gatehouse::server::Gatehouse;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The longest any test waits for anything.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// What a test backend saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub version: String,
    pub headers: Vec<(String, String)>,
    pub body_len: usize,
}

impl Seen {
    /// Every value of header `name`.
    pub fn header_values(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// The single value of header `name`.
    pub fn header(&self, name: &str) -> Option<String> {
        self.header_values(name).into_iter().next()
    }
}

/// An in-process HTTP/1.1 backend on 127.0.0.1:0.
///
/// Paths: `/echo` streams the request body back; `/bytes?n=N` sends N bytes; `/slow?ms=N`
/// waits first; `/status/N` answers with status N; `/ws` accepts an Upgrade and echoes raw
/// bytes; anything else answers `backend=<name>`. Every response carries `x-backend`.
pub struct TestBackend {
    pub name: String,
    pub address: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// What `/healthz` answers: 200 when true, 503 when false.
    pub healthy: Arc<AtomicBool>,
    /// When true, every request except `/healthz` gets a 500.
    pub failing: Arc<AtomicBool>,
    stop: CancellationToken,
}

impl TestBackend {
    pub async fn start(name: &str) -> TestBackend {
        TestBackend::start_delayed(name, Duration::ZERO).await
    }

    /// A backend that waits `delay` before answering anything: a slow VM.
    pub async fn start_delayed(name: &str, delay: Duration) -> TestBackend {
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = socket.local_addr().unwrap();
        let backend = TestBackend {
            name: name.to_string(),
            address,
            seen: Arc::new(Mutex::new(Vec::new())),
            healthy: Arc::new(AtomicBool::new(true)),
            failing: Arc::new(AtomicBool::new(false)),
            stop: CancellationToken::new(),
        };
        let state = BackendState {
            name: name.to_string(),
            seen: backend.seen.clone(),
            healthy: backend.healthy.clone(),
            failing: backend.failing.clone(),
            delay,
        };
        let stop = backend.stop.clone();
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    accepted = socket.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                    () = stop.cancelled() => return,
                };
                let state = state.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(state.answer(request).await) }
                    });
                    let connection = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades();
                    tokio::select! {
                        _ = connection => {}
                        () = stop.cancelled() => {}
                    }
                });
            }
        });
        backend
    }

    /// Kills the backend: its port closes and its open connections drop.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Requests seen with `method`.
    pub fn count(&self, method: &str) -> usize {
        self.requests()
            .iter()
            .filter(|s| s.method == method)
            .count()
    }

    /// Requests seen so far.
    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The path and body length of each request seen so far, in order.
    pub fn paths_and_body_lengths(&self) -> Vec<(String, usize)> {
        self.requests()
            .into_iter()
            .map(|seen| (seen.uri, seen.body_len))
            .collect()
    }
}

/// What a backend's connection tasks share.
#[derive(Clone)]
struct BackendState {
    name: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    healthy: Arc<AtomicBool>,
    failing: Arc<AtomicBool>,
    delay: Duration,
}

impl BackendState {
    async fn answer(&self, request: Request<Incoming>) -> Response<BoxBody> {
        if request.uri().path() == "/healthz" {
            let ok = self.healthy.load(Ordering::SeqCst);
            let mut response = Response::new(full(if ok { "ok" } else { "sick" }));
            if !ok {
                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            return response;
        }
        tokio::time::sleep(self.delay).await;
        if self.failing.load(Ordering::SeqCst) {
            let _ = request.into_body().collect().await;
            let mut response = Response::new(full("failing"));
            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            response
                .headers_mut()
                .insert("x-backend", self.name.parse().unwrap());
            return response;
        }
        backend_answer(&self.name, &self.seen, request).await
    }
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// A body fed by a channel, one frame per message, for slow streams.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|bytes| Ok(http_body::Frame::data(bytes))))
    }
}

fn full(bytes: impl Into<Bytes>) -> BoxBody {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn query(request: &Request<Incoming>, key: &str) -> Option<u64> {
    request.uri().query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

async fn backend_answer(
    name: &str,
    seen: &Mutex<Vec<Seen>>,
    mut request: Request<Incoming>,
) -> Response<BoxBody> {
    let record = |body_len| Seen {
        method: request.method().to_string(),
        uri: request.uri().to_string(),
        version: format!("{:?}", request.version()),
        headers: request
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body_len,
    };
    let path = request.uri().path().to_string();
    let mut response = if path == "/stream" {
        seen.lock().unwrap().push(record(0));
        let chunks = query(&request, "chunks").unwrap_or(10);
        let pause = Duration::from_millis(query(&request, "ms").unwrap_or(100));
        let (sender, receiver) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            for index in 0..chunks {
                tokio::time::sleep(pause).await;
                if sender
                    .send(Bytes::from(format!("chunk {index}\n")))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Response::new(ChannelBody(receiver).boxed())
    } else if path == "/echo" {
        seen.lock().unwrap().push(record(0));
        Response::new(request.into_body().boxed())
    } else if path == "/ws" {
        seen.lock().unwrap().push(record(0));
        let upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let mut buffer = [0u8; 1024];
                while let Ok(n) = io.read(&mut buffer).await {
                    if n == 0 || io.write_all(&buffer[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let mut response = Response::new(full(""));
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        response
            .headers_mut()
            .insert("upgrade", "websocket".parse().unwrap());
        response
            .headers_mut()
            .insert("connection", "upgrade".parse().unwrap());
        response
    } else {
        let slow = query(&request, "ms");
        let bytes = query(&request, "n");
        let status = path
            .strip_prefix("/status/")
            .and_then(|code| code.parse::<u16>().ok());
        let partial = record(0);
        let body = request.into_body().collect().await.map(|b| b.to_bytes());
        let body_len = body.as_ref().map_or(0, |b| b.len());
        seen.lock().unwrap().push(Seen {
            body_len,
            ..partial
        });
        if path == "/slow" {
            tokio::time::sleep(Duration::from_millis(slow.unwrap_or(1000))).await;
        }
        let mut response = match (path.as_str(), bytes) {
            ("/bytes", Some(n)) => Response::new(full(vec![b'z'; n as usize])),
            _ => Response::new(full(format!("backend={name}"))),
        };
        if let Some(status) = status.and_then(|s| StatusCode::from_u16(s).ok()) {
            *response.status_mut() = status;
        }
        response
    };
    response
        .headers_mut()
        .insert("x-backend", name.parse().unwrap());
    response
        .headers_mut()
        .insert("connection", "keep-alive".parse().unwrap());
    response
}

/// A test's configuration directory.
pub struct TestDir {
    pub dir: tempfile::TempDir,
}

impl TestDir {
    pub fn new() -> TestDir {
        TestDir {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `text` to `name` inside the directory.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// Starts gatehouse in-process from YAML written to `dir/gatehouse.yaml`.
pub async fn start_gatehouse(dir: &TestDir, yaml: &str) -> Arc<Gatehouse> {
    gatehouse::tls::install_crypto_provider();
    let path = dir.write("gatehouse.yaml", yaml);
    let config =
        config::load(&path).unwrap_or_else(|error| panic!("invalid test config:\n{error}"));
    Gatehouse::start(config, Metrics::new().unwrap())
        .await
        .unwrap()
}

/// A development CA and leaf certificates made at test time.
pub struct TestCa {
    pub ca_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "gatehouse test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let certificate = params.self_signed(&key).unwrap();
        TestCa {
            ca_pem: certificate.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// Writes `<stem>.crt` and `<stem>.key` for `names` into `dir`; returns their paths.
    pub fn leaf(&self, dir: &TestDir, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let params = rcgen::CertificateParams::new(names).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let certificate = params.signed_by(&key, &self.issuer).unwrap();
        (
            dir.write(&format!("{stem}.crt"), &certificate.pem()),
            dir.write(&format!("{stem}.key"), &key.serialize_pem()),
        )
    }

    /// A rustls client trusting this CA that presents the certificate in `cert`/`key`.
    pub fn client_config_with_certificate(
        &self,
        cert: &Path,
        key: &Path,
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in rustls::pki_types::CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(ca.unwrap()).unwrap();
        }
        let chain = rustls::pki_types::CertificateDer::pem_file_iter(cert)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// A rustls client trusting this CA, offering `alpn`.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

use rustls::pki_types::pem::PemObject;

/// A simple answer: status, headers, body.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn backend(&self) -> Option<String> {
        self.headers
            .get("x-backend")
            .map(|v| v.to_str().unwrap().to_string())
    }
}

async fn collect(response: Response<Incoming>) -> Answer {
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(DEADLINE, body.collect())
        .await
        .expect("body deadline")
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// A keep-alive HTTP/1.1 client (hyper-util).
pub fn http_client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
> {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

/// Sends `request` over a fresh HTTP/1.1 client and collects the answer.
pub async fn send(request: Request<Full<Bytes>>) -> Answer {
    let response = tokio::time::timeout(DEADLINE, http_client().request(request))
        .await
        .expect("response deadline")
        .expect("request failed");
    collect(response).await
}

/// GET `http://{address}{path}` with Host `host`.
pub async fn get(address: SocketAddr, host: &str, path: &str) -> Answer {
    send(
        Request::get(format!("http://{address}{path}"))
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
}

/// Sends `request` over TLS to `address` with SNI `server_name`; returns the negotiated ALPN,
/// the DNS names of the certificate the server chose, and the answer.
pub async fn tls_get(
    ca: &TestCa,
    address: SocketAddr,
    server_name: &str,
    alpn: &[&[u8]],
    path: &str,
) -> (Option<Vec<u8>>, Vec<String>, Answer) {
    let connector = tokio_rustls::TlsConnector::from(ca.client_config(alpn));
    let tcp = TcpStream::connect(address).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).unwrap();
    let tls = tokio::time::timeout(DEADLINE, connector.connect(name, tcp))
        .await
        .unwrap()
        .unwrap();
    let (_, session) = tls.get_ref();
    let negotiated = session.alpn_protocol().map(|p| p.to_vec());
    let leaf = session.peer_certificates().unwrap()[0].clone();
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).unwrap();
    let names = parsed
        .subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let uri = format!("https://{server_name}{path}");
    let answer = if negotiated.as_deref() == Some(b"h2") {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(connection);
        let request = Request::get(uri).body(Full::new(Bytes::new())).unwrap();
        collect(sender.send_request(request).await.unwrap()).await
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(connection);
        let request = Request::get(path)
            .header("host", server_name)
            .body(Full::new(Bytes::new()))
            .unwrap();
        collect(sender.send_request(request).await.unwrap()).await
    };
    (negotiated, names, answer)
}

/// A TCP server that reads each request head and then closes the connection without an
/// answer (a backend that crashes mid-request). Returns its address and the request lines.
pub async fn resetting_backend() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = socket.local_addr().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let seen = lines.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = socket.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let Some(head) = read_request_head(&mut stream).await else {
                    return;
                };
                let text = String::from_utf8_lossy(&head);
                seen.lock()
                    .unwrap()
                    .push(text.lines().next().unwrap_or("").to_string());
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                drop(stream);
            });
        }
    });
    (address, lines)
}

/// The lines of the JSON access log `dir/access.log` written so far.
pub fn access_log_lines(dir: &TestDir) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.path("access.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// Reads from `stream` until a whole request head (through its empty line) arrived; `None`
/// when the peer closed or the read failed first.
pub async fn read_request_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut buffer = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buffer[..n]),
        }
    }
    Some(head)
}

/// A loopback port with nothing listening.
pub fn closed_port() -> SocketAddr {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap()
}

/// Polls `condition` every 20 ms until it holds or the deadline passes.
pub async fn eventually(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < DEADLINE {
        if condition().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// Sends raw bytes and reads until the server closes (or the deadline); returns the text.
pub async fn raw_exchange(address: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut received = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut received)).await;
    String::from_utf8_lossy(&received).into_owned()
}

/// Reads `stream` to its end, which must be a reset (TCP RST: the peer dropped what it had
/// queued) and not a close; the bytes read before it. `what` names the stream in failures.
pub async fn bytes_before_reset(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    what: &str,
) -> usize {
    let mut buffer = vec![0u8; 1 << 16];
    let mut received = 0;
    let reading = async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) => panic!("{what}: closed without a reset after {received} bytes"),
                Ok(read) => received += read,
                Err(error) => return error,
            }
        }
    };
    let error = tokio::time::timeout(DEADLINE, reading)
        .await
        .unwrap_or_else(|_| panic!("{what}: the connection was not closed"));
    assert_eq!(
        error.kind(),
        std::io::ErrorKind::ConnectionReset,
        "{what}: {error}"
    );
    received
}

/// Reads from `stream` into `received` until `done` holds for the text read so far.
pub async fn read_until(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    received: &mut Vec<u8>,
    done: impl Fn(&str) -> bool,
) {
    let reading = async {
        let mut buffer = [0u8; 4096];
        while !done(&String::from_utf8_lossy(received)) {
            let n = stream.read(&mut buffer).await.unwrap();
            assert!(
                n > 0,
                "closed early: {:?}",
                String::from_utf8_lossy(received)
            );
            received.extend_from_slice(&buffer[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), reading)
        .await
        .expect("the answer arrives");
}

/// A WebSocket upgrade request for `/ws` (the test backend accepts it and echoes).
pub const WEBSOCKET_REQUEST: &[u8] =
    b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
      Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

/// Asks `web` for a WebSocket upgrade of `/ws` (the test backend echoes on it); the
/// connection and the response head, lower-cased.
pub async fn websocket(web: std::net::SocketAddr) -> (TcpStream, String) {
    upgrade_to_websocket(TcpStream::connect(web).await.unwrap()).await
}

/// Asks for a WebSocket upgrade of `/ws` on `stream`; the stream and the response head,
/// lower-cased.
pub async fn upgrade_to_websocket(mut stream: TcpStream) -> (TcpStream, String) {
    stream.write_all(WEBSOCKET_REQUEST).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(DEADLINE, stream.read_exact(&mut byte))
            .await
            .unwrap()
            .unwrap();
        head.push(byte[0]);
    }
    (stream, String::from_utf8_lossy(&head).to_lowercase())
}

/// A client connection with a 4 KiB receive buffer: one that stops reading fills up fast.
pub async fn small_window_client(address: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(address).await.unwrap()
}

/// Writes `message` into an echoing tunnel and reads it back.
pub async fn echo(stream: &mut TcpStream, message: &[u8]) {
    stream.write_all(message).await.unwrap();
    let mut echoed = vec![0u8; message.len()];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(echoed, message);
}

/// Reads one metric sample's value from the text exposition.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.starts_with(name)
                && line[name.len()..].starts_with(['{', ' '])
                && labels
                    .iter()
                    .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .find_map(|line| line.rsplit(' ').next()?.parse().ok())
}

/// The admin `/metrics` text.
pub async fn metrics_text(gatehouse: &Gatehouse) -> String {
    get(gatehouse.admin_address(), "admin", "/metrics")
        .await
        .text()
}

/// Pools YAML for `name` with `backends` (name, address), health checks off.
pub fn pool_yaml(name: &str, backends: &[(&str, SocketAddr)], extra: &str) -> String {
    let mut yaml = format!("  {name}:\n    health_check: {{ type: none }}\n{extra}    backends:\n");
    for (backend, address) in backends {
        yaml.push_str(&format!(
            "      - {{ name: {backend}, address: \"{address}\" }}\n"
        ));
    }
    yaml
}

/// gatehouse with one http listener `web` (plus `listener_extra`, e.g.
/// `, trusted_proxies: [...]`) in front of pool `p` of `backends` (plus `pool_extra` lines),
/// health checks off; returns it with `web`'s address.
pub async fn single_pool_gatehouse(
    dir: &TestDir,
    backends: &[(&str, SocketAddr)],
    listener_extra: &str,
    pool_extra: &str,
) -> (Arc<Gatehouse>, SocketAddr) {
    let yaml = format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}\nlisteners:\n  web: {{ listen: \"127.0.0.1:0\", pool: p{listener_extra} }}\npools:\n{}",
        pool_yaml("p", backends, pool_extra)
    );
    let gatehouse = start_gatehouse(dir, &yaml).await;
    let web = gatehouse.listener_address("web").unwrap();
    (gatehouse, web)
}

/// The file `path` relative to the crate root.
pub fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// One HTTP/2 frame: 9-byte header then payload.
pub fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = payload.len() as u32;
    let mut frame = vec![
        (length >> 16) as u8,
        (length >> 8) as u8,
        length as u8,
        kind,
        flags,
    ];
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// An HPACK block for `GET /` on `authority` (static-table method, scheme and path; the
/// authority a literal without indexing), followed by `extra` as it is written.
pub fn h2_request_block(authority: &str, path: bool, extra: &[u8]) -> Vec<u8> {
    let mut block = vec![0x82, 0x86];
    if path {
        block.push(0x84);
    }
    block.extend_from_slice(&[0x01, authority.len() as u8]);
    block.extend_from_slice(authority.as_bytes());
    block.extend_from_slice(extra);
    block
}

/// The frames `stream` sends until `done` holds for those read so far (or the deadline):
/// `(type, flags, stream id, payload)` each.
pub async fn h2_frames_until<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    done: impl Fn(&[(u8, u8, u32, Vec<u8>)]) -> bool,
) -> Vec<(u8, u8, u32, Vec<u8>)> {
    let mut bytes = Vec::new();
    let mut frames = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, async {
        let mut buffer = [0u8; 16384];
        loop {
            while bytes.len() >= 9 {
                let length = usize::from(bytes[0]) << 16
                    | usize::from(bytes[1]) << 8
                    | usize::from(bytes[2]);
                if bytes.len() < 9 + length {
                    break;
                }
                let id = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff;
                frames.push((bytes[3], bytes[4], id, bytes[9..9 + length].to_vec()));
                bytes.drain(..9 + length);
            }
            if done(&frames) {
                return;
            }
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(read) => bytes.extend_from_slice(&buffer[..read]),
            }
        }
    })
    .await;
    frames
}
