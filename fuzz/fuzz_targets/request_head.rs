//! Fuzzes request-head sanitation: arbitrary header names and values go through the framing
//! check, hop-by-hop removal, X-Forwarded-* and the upstream head's encoding without
//! panicking, and no hop-by-hop header survives.
#![no_main]

use gatehouse::proxy::headers;
use gatehouse::upstream::body::UpstreamBody;
use gatehouse::upstream::http1::encode_head;
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
    if let Ok(Some(host)) = headers::request_host(&request) {
        let _ = headers::routing_host(host);
    }
    let upgrade = headers::wants_upgrade(request.headers());
    headers::strip_hop_by_hop(request.headers_mut(), upgrade);
    let client = headers::client_address_value([192, 0, 2, 1].into());
    let forwarded_for = headers::forwarded_for(request.headers(), &client, true);
    let request_id = headers::request_id(request.headers());
    let proto = HeaderValue::from_static("https");
    let forwarded = headers::Forwarded {
        host: b"backend",
        forwarded_host: None,
        forwarded_for: &forwarded_for,
        proto: &proto,
        request_id: &request_id,
        from_trusted_proxy: true,
    };
    for hop in ["keep-alive", "te", "trailer", "transfer-encoding", "proxy-connection"] {
        assert!(!request.headers().contains_key(hop));
    }
    let (parts, ()) = request.into_parts();
    let mut head = Vec::new();
    encode_head(&parts, &forwarded, &UpstreamBody::empty(), &mut head);
});
