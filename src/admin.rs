//! The admin API on `admin.listen`: health and readiness probes, Prometheus metrics, the
//! status JSON, reload, backend lifecycle changes and the dashboard.
//!
//! GETs are open; every other method mutates and needs `Authorization: Bearer <token>` when
//! a token file is configured (compared in constant time). Errors are JSON `{"error": ...}`.

use crate::config::AdminState;
use crate::reload::{self, Source};
use crate::server::Gatehouse;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};
use tokio::net::TcpListener;

/// The dashboard: one self-contained page (no CDN, no external assets) that polls the status API.
const DASHBOARD: &str = include_str!("dashboard.html");

/// Admin request bodies are tiny; anything bigger is refused.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Serves the admin API until the process exits.
pub async fn serve(socket: TcpListener, gatehouse: Arc<Gatehouse>) {
    loop {
        let (stream, peer) = match socket.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let gatehouse = gatehouse.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let gatehouse = gatehouse.clone();
                async move { Ok::<_, Infallible>(handle(request, &gatehouse, peer).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10));
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

type AdminResponse = Response<Full<Bytes>>;

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> AdminResponse {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    response
}

fn json_response(status: StatusCode, value: &Value) -> AdminResponse {
    respond(status, "application/json", value.to_string())
}

fn error(status: StatusCode, message: impl Into<String>) -> AdminResponse {
    json_response(status, &json!({ "error": message.into() }))
}

async fn handle(
    request: Request<Incoming>,
    gatehouse: &Gatehouse,
    peer: SocketAddr,
) -> AdminResponse {
    let path = request.uri().path().to_string();
    let method = request.method().clone();
    let authenticated = request.headers().contains_key(header::AUTHORIZATION);
    let actor = format!("{peer}{}", if authenticated { " (token)" } else { "" });
    if method != Method::GET && method != Method::HEAD {
        if let Some(refusal) = refuse_unauthorized(&request, gatehouse) {
            return refusal;
        }
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method.clone(), segments.as_slice()) {
        (Method::GET | Method::HEAD, [""]) => {
            respond(StatusCode::OK, "text/html; charset=utf-8", DASHBOARD)
        }
        (Method::GET | Method::HEAD, ["healthz"]) => respond(StatusCode::OK, "text/plain", "ok\n"),
        (Method::GET | Method::HEAD, ["readyz"]) => {
            if gatehouse.is_ready() {
                respond(StatusCode::OK, "text/plain", "ready\n")
            } else {
                respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
            }
        }
        (Method::GET | Method::HEAD, ["metrics"]) => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            gatehouse.metrics.render(),
        ),
        (Method::GET | Method::HEAD, ["api", "v1", "status"]) => {
            json_response(StatusCode::OK, &status(gatehouse))
        }
        (Method::GET | Method::HEAD, ["api", "v1", "config"]) => {
            let table = gatehouse.publisher.table().load();
            json_response(
                StatusCode::OK,
                &json!({
                    // Absolute, so `check --diff` run from another directory resolves the
                    // file's relative paths (certificates, logs) as this process does.
                    "path": std::path::absolute(&table.config.path)
                        .unwrap_or_else(|_| table.config.path.clone())
                        .display()
                        .to_string(),
                    "hash": table.config.hash,
                    "text": &*table.config.text,
                }),
            )
        }
        (Method::POST, ["api", "v1", "reload"]) => {
            match reload::reload(gatehouse, Source::Api, &actor).await {
                Ok(changes) => json_response(
                    StatusCode::OK,
                    &json!({ "result": "success", "changes": changes }),
                ),
                Err(failure) => json_response(
                    StatusCode::BAD_REQUEST,
                    &json!({ "result": "failure", "errors": failure.problems }),
                ),
            }
        }
        (Method::PUT, ["api", "v1", "pools", pool, "backends", backend, "state"]) => {
            let (pool, backend) = (pool.to_string(), backend.to_string());
            set_state(request, gatehouse, &pool, &backend, &actor).await
        }
        (_, [""] | ["healthz"] | ["readyz"] | ["metrics"] | ["api", "v1", "status" | "config"])
        | (_, ["api", "v1", "reload"])
        | (_, ["api", "v1", "pools", _, "backends", _, "state"]) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {method} not allowed on {path}"),
        ),
        _ => error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    }
}

/// Checks the bearer token of a mutating call, in constant time; the 401 when it is wrong.
fn refuse_unauthorized(
    request: &Request<Incoming>,
    gatehouse: &Gatehouse,
) -> Option<AdminResponse> {
    let table = gatehouse.publisher.table().load();
    let expected = table.config.admin.token.as_deref()?;
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    if constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
        None
    } else {
        let mut response = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        Some(response)
    }
}

/// Compares without an early exit, so response timing does not reveal a matching prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut difference = a.len() ^ b.len();
    for (index, byte) in b.iter().enumerate() {
        difference |= usize::from(a.get(index).copied().unwrap_or(0) ^ byte);
    }
    difference == 0
}

async fn set_state(
    request: Request<Incoming>,
    gatehouse: &Gatehouse,
    pool: &str,
    backend: &str,
    actor: &str,
) -> AdminResponse {
    let body = match Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(cause) if cause.is::<http_body_util::LengthLimitError>() => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is over {MAX_BODY_BYTES} bytes"),
            )
        }
        Err(_) => return error(StatusCode::BAD_REQUEST, "cannot read the request body"),
    };
    let state = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|value| {
            value
                .get("state")
                .and_then(Value::as_str)
                .map(str::to_string)
        });
    let Some(state) = state else {
        return error(
            StatusCode::BAD_REQUEST,
            "body must be JSON like {\"state\":\"draining\"}",
        );
    };
    let Some(state) = AdminState::parse(&state) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("unknown state \"{state}\" (expected active, draining or disabled)"),
        );
    };
    let known = gatehouse
        .publisher
        .table()
        .load()
        .pool(pool)
        .is_some_and(|p| p.backends.iter().any(|b| b.name == backend));
    if !known {
        return error(
            StatusCode::NOT_FOUND,
            format!("no backend \"{backend}\" in pool \"{pool}\""),
        );
    }
    let result = gatehouse
        .publisher
        .set_admin_state(pool, backend, state)
        .await;
    crate::audit::append(
        gatehouse
            .publisher
            .table()
            .load()
            .config
            .audit_log
            .as_deref(),
        json!({
            "event": "admin_state",
            "source": "api",
            "actor": actor,
            "pool": pool,
            "backend": backend,
            "state": state.as_str(),
            "result": if result.is_ok() { "success" } else { "failure" },
        }),
    );
    match result {
        Ok(()) => {
            tracing::info!(
                pool,
                backend,
                state = state.as_str(),
                "backend admin state changed"
            );
            json_response(
                StatusCode::OK,
                &json!({ "pool": pool, "backend": backend, "state": state.as_str() }),
            )
        }
        Err(message) => error(StatusCode::NOT_FOUND, message),
    }
}

/// The status document: config identity, listeners, pools and every backend.
fn status(gatehouse: &Gatehouse) -> Value {
    let table = gatehouse.publisher.table().load_full();
    let loaded_at = table
        .loaded_at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    let bound = gatehouse.listener_addresses();
    let listeners: Vec<Value> = table
        .config
        .listeners
        .iter()
        .map(|listener| {
            let address = bound
                .iter()
                .find(|(name, _)| *name == listener.name)
                .map(|(_, address)| address.to_string());
            json!({
                "name": listener.name,
                "listen": listener.listen.to_string(),
                "bound": address,
                "protocol": listener.protocol.as_str(),
                "pool": listener.pool,
                // What is served and until when (notAfter, Unix seconds): the first is the
                // default for a client naming none of them.
                "certificates": listener.certificates().map(|certificate| json!({
                    "file": certificate.cert_path.display().to_string(),
                    "names": certificate.names,
                    "not_after": certificate.not_after,
                })).collect::<Vec<_>>(),
                "routes": listener.routes.iter().map(|route| json!({
                    "name": route.name,
                    "host": route.host.as_ref().map(|host| match host {
                        crate::config::HostMatch::Exact(name) => name.clone(),
                        crate::config::HostMatch::Suffix(suffix) => format!("*{suffix}"),
                    }),
                    "path_prefix": route.path_prefix,
                    "pool": route.pool,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let pools: Vec<Value> = table
        .pools
        .iter()
        .map(|pool| {
            let backends: Vec<Value> = pool
                .backends
                .iter()
                .map(|backend| {
                    let (responses, server_errors) = backend.stats.responses();
                    json!({
                        "name": backend.name,
                        "address": backend.address.to_string(),
                        "weight": backend.weight,
                        "state": backend.admin_state.as_str(),
                        "healthy": backend.healthy,
                        "available": backend.is_candidate(),
                        "active_requests": backend.stats.in_flight(),
                        "requests_total": responses,
                        "errors_total": server_errors,
                    })
                })
                .collect();
            json!({
                "name": pool.name(),
                "algorithm": pool.config.algorithm.as_str(),
                "available_backends": pool.backends.iter().filter(|b| b.is_candidate()).count(),
                "backends": backends,
            })
        })
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "config": {
            "path": table.config.path.display().to_string(),
            "hash": table.config.hash,
            "loaded_at": loaded_at,
            "generation": table.generation,
        },
        "ready": gatehouse.is_ready(),
        "listeners": listeners,
        "pools": pools,
    })
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secre", b"secret"));
        assert!(!constant_time_eq(b"secret-longer", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
    }
}
