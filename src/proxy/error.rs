//! Every way a request can fail, and the one place that maps a failure to a status.

use super::body::ProxyBody;
use crate::metrics::Rejection;
use http::{header, HeaderValue, Response, StatusCode};

/// A request gatehouse answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// Malformed or ambiguous request (never forwarded).
    BadRequest(&'static str),
    /// The request head is larger than `limits.max_header_bytes`.
    HeaderTooLarge,
    /// The client's address is refused by the listener's `allow`/`deny`.
    Forbidden,
    /// The client exceeded `rate_limit`; retry after this many seconds.
    RateLimited(u64),
    /// The request body is larger than the route's `max_body_bytes`.
    PayloadTooLarge,
    /// No route matched and the listener has no default pool.
    NoRoute,
    /// The pool has no backend that may take traffic.
    NoBackend,
    /// The backend refused the connection, reset it, or answered garbage.
    BackendFailed,
    /// The backend did not answer within `timeouts.request` (or connect).
    Timeout,
    /// `timeouts.request` ran out while the client held back the rest of its body.
    ClientTimeout,
}

impl ProxyError {
    /// The status sent to the client.
    pub fn status(self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::HeaderTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::Forbidden => StatusCode::FORBIDDEN,
            ProxyError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::NoBackend => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BackendFailed => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ClientTimeout => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// The `gatehouse_rejected_total` reason, for refusals (not for backend failures).
    pub fn rejection(self) -> Option<Rejection> {
        match self {
            ProxyError::BadRequest(_) => Some(Rejection::BadRequest),
            ProxyError::HeaderTooLarge => Some(Rejection::HeaderTooLarge),
            ProxyError::Forbidden => Some(Rejection::Acl),
            ProxyError::RateLimited(_) => Some(Rejection::RateLimit),
            ProxyError::PayloadTooLarge => Some(Rejection::BadRequest),
            ProxyError::NoBackend => Some(Rejection::NoBackend),
            ProxyError::NoRoute
            | ProxyError::BackendFailed
            | ProxyError::Timeout
            | ProxyError::ClientTimeout => None,
        }
    }

    /// What the answer's body says, also the access log's `error` for this answer.
    pub fn detail(self) -> &'static str {
        match self {
            ProxyError::BadRequest(detail) => detail,
            ProxyError::HeaderTooLarge => "request header block too large",
            ProxyError::Forbidden => "access denied",
            ProxyError::RateLimited(_) => "too many requests from this address",
            ProxyError::PayloadTooLarge => "request body too large",
            ProxyError::NoRoute => "no route for this host and path",
            ProxyError::NoBackend => "no backend available",
            ProxyError::BackendFailed => "backend failed",
            ProxyError::Timeout => "backend timed out",
            ProxyError::ClientTimeout => "request body late",
        }
    }

    /// A short plain-text answer; malformed requests also close the connection.
    pub fn response(self) -> Response<ProxyBody> {
        let status = self.status();
        let body = format!(
            "{} {}: {}\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            self.detail()
        );
        let mut response = Response::new(ProxyBody::local(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let ProxyError::RateLimited(seconds) = self {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if matches!(
            self,
            ProxyError::BadRequest(_)
                | ProxyError::HeaderTooLarge
                | ProxyError::Forbidden
                | ProxyError::PayloadTooLarge
                | ProxyError::ClientTimeout
        ) {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}
