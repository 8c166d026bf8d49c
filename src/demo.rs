//! `gatehouse demo`: three built-in backends ("VMs") on loopback with gatehouse in front.
//!
//! The backends answer with their own name and serve `/healthz`, `/slow?ms=N` and
//! `/bytes?n=N`; tests use [`spawn_backend`] as their in-process backend too.

use crate::config;
use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;

/// The configuration served when `config/gatehouse.yaml` does not exist.
pub const EMBEDDED_CONFIG: &str = include_str!("../config/gatehouse.yaml");
/// The development-only certificate the embedded configuration uses.
pub const EMBEDDED_CERT: &str = include_str!("../certs/localhost.crt");
/// Its private key (development only: never use it for anything real).
pub const EMBEDDED_KEY: &str = include_str!("../certs/localhost.key");
/// The development CA that signed it, for `curl --cacert`.
pub const EMBEDDED_CA: &str = include_str!("../certs/dev-ca.crt");

/// The demo backends: name and address.
pub const DEMO_BACKENDS: [(&str, &str); 3] = [
    ("vm-1", "127.0.0.1:9001"),
    ("vm-2", "127.0.0.1:9002"),
    ("vm-3", "127.0.0.1:9003"),
];

/// Longest `/slow` wait, and largest `/bytes` answer.
const MAX_SLOW: Duration = Duration::from_secs(60);
const MAX_BYTES: u64 = 1 << 30;
/// The chunk `/bytes` repeats.
static ZEROS: [u8; 64 * 1024] = [b'x'; 64 * 1024];

/// Runs the demo: finds or writes the configuration, starts the backends, serves.
pub fn main(config_path: &Path) -> ExitCode {
    let (config_path, certs_dir) = match demo_files(config_path) {
        Ok(found) => found,
        Err(error) => {
            eprintln!("gatehouse demo: {error}");
            return ExitCode::FAILURE;
        }
    };
    let config = match config::load(&config_path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    let banner = banner(&config, &certs_dir);
    crate::cli::run(
        config,
        Some(Box::new(move || {
            for (name, address) in DEMO_BACKENDS {
                let Ok(address) = address.parse::<SocketAddr>() else {
                    continue;
                };
                tokio::spawn(async move {
                    match TcpListener::bind(address).await {
                        Ok(socket) => serve_backend(name.to_string(), socket).await,
                        Err(error) => {
                            tracing::error!(backend = name, %address, %error, "cannot start demo backend")
                        }
                    }
                });
            }
            println!("{banner}");
        })),
    )
}

/// The configuration file to serve and the directory holding the demo certificates: the
/// given file when it exists, else embedded copies written to a fresh temporary directory.
fn demo_files(config_path: &Path) -> Result<(PathBuf, PathBuf), String> {
    if config_path.exists() {
        let certs = config_path
            .parent()
            .unwrap_or(Path::new("."))
            .join("../certs");
        return Ok((config_path.to_path_buf(), certs));
    }
    let root = std::env::temp_dir().join(format!("gatehouse-demo-{}", std::process::id()));
    let config_dir = root.join("config");
    let certs_dir = root.join("certs");
    let write = |path: PathBuf, text: &str| {
        std::fs::write(&path, text)
            .map_err(|error| format!("cannot write {}: {error}", path.display()))
    };
    for dir in [&config_dir, &certs_dir] {
        std::fs::create_dir_all(dir)
            .map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
    }
    write(config_dir.join("gatehouse.yaml"), EMBEDDED_CONFIG)?;
    write(certs_dir.join("localhost.crt"), EMBEDDED_CERT)?;
    write(certs_dir.join("localhost.key"), EMBEDDED_KEY)?;
    write(certs_dir.join("dev-ca.crt"), EMBEDDED_CA)?;
    eprintln!(
        "gatehouse demo: {} not found; using the embedded configuration written to {}",
        config_path.display(),
        config_dir.join("gatehouse.yaml").display()
    );
    Ok((config_dir.join("gatehouse.yaml"), certs_dir))
}

fn banner(config: &config::Config, certs_dir: &Path) -> String {
    let mut text = String::from("\ngatehouse demo is running. Try:\n");
    let ca = certs_dir.join("dev-ca.crt");
    for listener in &config.listeners {
        let scheme = if listener.protocol == config::Protocol::Https {
            "https"
        } else {
            "http"
        };
        let port = listener.listen.port();
        match listener.protocol {
            config::Protocol::Http => text.push_str(&format!(
                "  proxy ({}):      curl http://localhost:{port}/\n                    curl http://localhost:{port}/slow?ms=500   curl -o /dev/null http://localhost:{port}/bytes?n=10000000\n",
                listener.name
            )),
            config::Protocol::Https => text.push_str(&format!(
                "  TLS proxy ({}): curl --cacert {} {scheme}://localhost:{port}/\n                    curl --http2 --cacert {} {scheme}://localhost:{port}/\n",
                listener.name,
                ca.display(),
                ca.display()
            )),
            _ => text.push_str(&format!(
                "  {} ({}):  {}\n",
                listener.protocol.as_str(),
                listener.name,
                listener.listen
            )),
        }
    }
    let admin = config.admin.listen;
    text.push_str(&format!(
        "  dashboard:       http://{admin}/\n  metrics:         curl http://{admin}/metrics\n  status:          curl http://{admin}/api/v1/status\n  drain vm-2:      curl -X PUT -d '{{\"state\":\"draining\"}}' http://{admin}/api/v1/pools/portal/backends/vm-2/state\n  hot reload:      edit {} and watch the log\n  stop:            Ctrl-C\n",
        config.path.display()
    ));
    text
}

/// Starts a demo backend called `name` on `address` (port 0 picks one) and returns where it
/// listens. It answers every path with its name, plus `/healthz`, `/slow?ms=N`, `/bytes?n=N`.
pub async fn spawn_backend(name: &str, address: SocketAddr) -> std::io::Result<SocketAddr> {
    let socket = TcpListener::bind(address).await?;
    let bound = socket.local_addr()?;
    tokio::spawn(serve_backend(name.to_string(), socket));
    Ok(bound)
}

async fn serve_backend(name: String, socket: TcpListener) {
    loop {
        let Ok((stream, _)) = socket.accept().await else {
            continue;
        };
        let name = name.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let name = name.clone();
                async move { Ok::<_, Infallible>(answer(&name, request).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn query_number(request: &Request<Incoming>, key: &str) -> Option<u64> {
    request.uri().query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

async fn answer(name: &str, request: Request<Incoming>) -> Response<DemoBody> {
    let path = request.uri().path();
    let body = match path {
        "/healthz" => DemoBody::text("ok\n".to_string()),
        "/slow" => {
            let wait =
                Duration::from_millis(query_number(&request, "ms").unwrap_or(1000)).min(MAX_SLOW);
            tokio::time::sleep(wait).await;
            DemoBody::text(format!("{name}: answered after {} ms\n", wait.as_millis()))
        }
        "/bytes" => DemoBody::Repeat {
            remaining: query_number(&request, "n").unwrap_or(1024).min(MAX_BYTES),
        },
        _ => DemoBody::text(format!("Hello from {name} ({} {path})\n", request.method())),
    };
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if let Ok(value) = HeaderValue::from_str(name) {
        headers.insert("x-demo-backend", value);
    }
    response
}

/// A demo backend's response body: text, or `n` generated bytes streamed in 64 KiB chunks.
pub enum DemoBody {
    Text(Option<Bytes>),
    Repeat { remaining: u64 },
}

impl DemoBody {
    fn text(text: String) -> Self {
        DemoBody::Text(Some(Bytes::from(text)))
    }
}

impl Body for DemoBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            DemoBody::Text(text) => Poll::Ready(text.take().map(|t| Ok(Frame::data(t)))),
            DemoBody::Repeat { remaining } => {
                if *remaining == 0 {
                    return Poll::Ready(None);
                }
                let chunk = (*remaining).min(ZEROS.len() as u64) as usize;
                *remaining -= chunk as u64;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&ZEROS[..chunk])))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            DemoBody::Text(text) => text.is_none(),
            DemoBody::Repeat { remaining } => *remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            DemoBody::Text(text) => {
                SizeHint::with_exact(text.as_ref().map_or(0, |t| t.len() as u64))
            }
            DemoBody::Repeat { remaining } => SizeHint::with_exact(*remaining),
        }
    }
}
