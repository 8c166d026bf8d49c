//! Fuzzes request-head sanitation: arbitrary header names and values go through the framing
//! check, hop-by-hop removal and X-Forwarded-* rewriting without panicking, and no hop-by-hop
//! header survives.
#![no_main]

use gatehouse::proxy::headers;
use http::{HeaderName, HeaderValue, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut request = Request::new(());
    for line in data.split(|b| *b == b'\n') {
        let mut parts = line.splitn(2, |b| *b == b':');
        let (Some(name), Some(value)) = (parts.next(), parts.next()) else { continue };
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            request.headers_mut().append(name, value);
        }
    }
    let _ = headers::check_framing(&request);
    let _ = headers::request_host(&request);
    if let Some(host) = request.headers().get(http::header::HOST) {
        let _ = headers::routing_host(host);
    }
    let upgrade = headers::wants_upgrade(request.headers());
    headers::strip_hop_by_hop(request.headers_mut(), upgrade);
    let client = headers::client_address_value([192, 0, 2, 1].into());
    headers::set_forwarded(request.headers_mut(), &client, true, "https", None);
    for hop in ["keep-alive", "te", "trailer", "transfer-encoding", "proxy-connection"] {
        assert!(!request.headers().contains_key(hop));
    }
});
