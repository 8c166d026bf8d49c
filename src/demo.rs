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

/// Width of the banner's label column, so that every command starts at the same place.
const LABEL_WIDTH: usize = 20;

/// What to try, one command per line behind an aligned label, taken from the configuration
/// served (an edited `config/gatehouse.yaml` shows its own listeners and backends).
fn banner(config: &config::Config, certs_dir: &Path) -> String {
    let mut lines: Vec<(String, String)> = Vec::new();
    let ca = certs_dir.join("dev-ca.crt");
    for listener in &config.listeners {
        let port = listener.listen.port();
        let name = &listener.name;
        match listener.protocol {
            config::Protocol::Http => {
                lines.push((
                    format!("proxy ({name}):"),
                    format!("curl http://localhost:{port}/"),
                ));
                lines.push((
                    String::new(),
                    format!(
                        "curl http://localhost:{port}/slow?ms=500   curl -o /dev/null http://localhost:{port}/bytes?n=10000000"
                    ),
                ));
            }
            config::Protocol::Https => {
                let url = format!("https://localhost:{port}/");
                lines.push((
                    format!("TLS proxy ({name}):"),
                    format!("curl --cacert {} {url}", ca.display()),
                ));
                lines.push((
                    String::new(),
                    format!("curl --http2 --cacert {} {url}", ca.display()),
                ));
            }
            protocol => lines.push((
                format!("{} ({name}):", protocol.as_str()),
                listener.listen.to_string(),
            )),
        }
    }
    let admin = config.admin.listen;
    lines.push(("dashboard:".into(), format!("http://{admin}/")));
    lines.push(("metrics:".into(), format!("curl http://{admin}/metrics")));
    lines.push((
        "status:".into(),
        format!("curl http://{admin}/api/v1/status"),
    ));
    let drainable = config.pools.iter().find_map(|pool| {
        let backend = pool.backends.get(1).or(pool.backends.first())?;
        Some((&pool.name, &backend.name))
    });
    if let Some((pool, backend)) = drainable {
        lines.push((
            format!("drain {backend}:"),
            format!(
                "curl -X PUT -d '{{\"state\":\"draining\"}}' http://{admin}/api/v1/pools/{pool}/backends/{backend}/state"
            ),
        ));
    }
    lines.push((
        "hot reload:".into(),
        format!("edit {} and watch the log", config.path.display()),
    ));
    lines.push(("stop:".into(), "Ctrl-C".into()));
    let mut text = String::from("\ngatehouse demo is running. Try:\n");
    for (label, command) in lines {
        text.push_str(&format!("  {label:<LABEL_WIDTH$} {command}\n"));
    }
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

#[cfg(test)]
mod tests {
    use super::{banner, demo_files, LABEL_WIDTH};
    use std::path::Path;

    #[test]
    fn the_banner_aligns_its_commands_and_drains_a_configured_backend() {
        let (path, certs) = demo_files(Path::new("/nonexistent/gatehouse.yaml")).unwrap();
        let mut config = crate::config::load(&path).unwrap();
        config.pools[0].backends[1].name = "tax-vm".into();
        let text = banner(&config, &certs);
        let _ = std::fs::remove_dir_all(certs.parent().unwrap());
        let commands: Vec<&str> = text.lines().filter(|line| line.starts_with("  ")).collect();
        assert!(commands.len() >= 8, "{text}");
        for line in &commands {
            let (label, command) = line.split_at(2 + LABEL_WIDTH + 1);
            assert!(
                label.trim_end().len() <= 2 + LABEL_WIDTH,
                "label too long: {line}"
            );
            assert!(
                !command.starts_with(' ') && !command.is_empty(),
                "command not at column {}: {line}",
                2 + LABEL_WIDTH + 1
            );
        }
        let pool = &config.pools[0].name;
        assert!(
            text.contains("drain tax-vm:")
                && text.contains(&format!("/api/v1/pools/{pool}/backends/tax-vm/state")),
            "{text}"
        );
        assert!(text.contains("TLS proxy ("), "{text}");
    }
}
