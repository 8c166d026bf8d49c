//! Header rewriting between client and backend: hop-by-hop removal, X-Forwarded-*, request id.
//!
//! Kept free of I/O so it can be unit- and property-tested at this trust boundary.

use super::error::ProxyError;
use crate::upstream::http1::{write_header, SetHeaders};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Version};
use std::net::IpAddr;

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1); `Connection`
/// first (`strip_hop_by_hop` reads its bit 0).
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// `X-Forwarded-For`.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `X-Request-Id`.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Headers a client's `Connection:` list may not remove: gatehouse sets or relies on them,
/// and letting a client strip them is a known way to smuggle past a backend's checks.
static PROTECTED: [HeaderName; 8] = [
    header::HOST,
    header::AUTHORIZATION,
    header::CONTENT_LENGTH,
    header::CONTENT_TYPE,
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    X_REQUEST_ID,
];

/// The bit `strip_hop_by_hop` keeps for `name`: `1 << i` for `HOP_BY_HOP[i]`, `1 << 8` for
/// Upgrade, 0 for the rest. One string match (by length, then bytes) instead of nine
/// `HeaderName` comparisons.
fn hop_by_hop_bit(name: &HeaderName) -> u16 {
    match name.as_str() {
        "connection" => 1,
        "keep-alive" => 1 << 1,
        "proxy-connection" => 1 << 2,
        "proxy-authenticate" => 1 << 3,
        "proxy-authorization" => 1 << 4,
        "te" => 1 << 5,
        "trailer" => 1 << 6,
        "transfer-encoding" => 1 << 7,
        "upgrade" => 1 << 8,
        _ => 0,
    }
}

/// True when `headers` ask to switch protocols (`Connection: upgrade` plus `Upgrade`) to
/// anything but `h2c`. An h2c upgrade is not passed on (its `Upgrade` is stripped, so the
/// request goes as a plain one): a backend that switched would hold an HTTP/2 connection
/// with the client that gatehouse only tunnels, and every request on it would bypass
/// routing, ACLs and rate limits ("h2c smuggling"). Clients fall back to HTTP/1.1.
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    let mut protocols = headers.get_all(header::UPGRADE).iter().peekable();
    protocols.peek().is_some()
        && !protocols.any(|value| {
            value
                .as_bytes()
                .split(|&byte| byte == b',')
                .any(|protocol| protocol.trim_ascii().eq_ignore_ascii_case(b"h2c"))
        })
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes hop-by-hop headers and every header named in `Connection` (except protected
/// ones). With `keep_upgrade`, `Connection: upgrade` and `Upgrade` survive for a tunnel.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names finds which hop-by-hop headers are present (bit i for
    // HOP_BY_HOP[i], bit 8 for Upgrade): most messages carry few or none of them.
    let mut present = 0u16;
    for name in headers.keys() {
        present |= hop_by_hop_bit(name);
    }
    if present == 0 && !keep_upgrade {
        return;
    }
    if present & 1 != 0 {
        // Connection leaves in one lookup; its tokens may name more headers to drop.
        let mut named: Vec<HeaderName> = Vec::new();
        if let header::Entry::Occupied(entry) = headers.entry(header::CONNECTION) {
            for value in entry.remove_entry_mult().1 {
                for token in value.as_bytes().split(|&byte| byte == b',') {
                    let token = token.trim_ascii();
                    // The usual tokens name no header to remove beyond HOP_BY_HOP.
                    if [&b"close"[..], b"keep-alive", b"upgrade", b""]
                        .iter()
                        .any(|usual| token.eq_ignore_ascii_case(usual))
                    {
                        continue;
                    }
                    let Ok(name) = HeaderName::from_bytes(token) else {
                        continue;
                    };
                    if !PROTECTED.contains(&name) && !HOP_BY_HOP.contains(&name) {
                        named.push(name);
                    }
                }
            }
        }
        for name in &named {
            headers.remove(name);
        }
    }
    // Connection (bit 0) is gone already.
    for (index, hop) in HOP_BY_HOP.iter().enumerate().skip(1) {
        if present & (1 << index) != 0 {
            headers.remove(hop);
        }
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if present & (1 << 8) != 0 {
        headers.remove(header::UPGRADE);
    }
}

/// The request's host as sent (the URI authority for HTTP/2 and absolute-form requests,
/// else the single `Host` header), checked before routing: several `Host` headers are
/// ambiguous, and a host is `uri-host [":" port]` (RFC 9110 §7.2) — not empty, no userinfo,
/// nothing a backend's parser could read as another host (RFC 9112 §3.2: answered 400).
pub fn request_host<B>(request: &Request<B>) -> Result<Option<&str>, ProxyError> {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let host_header = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest("more than one Host header"));
    }
    let host = match (request.uri().authority(), host_header) {
        (Some(authority), _) => authority.as_str(),
        (None, Some(host)) => host
            .to_str()
            .map_err(|_| ProxyError::BadRequest("invalid Host"))?,
        (None, None) if request.version() == Version::HTTP_11 => {
            return Err(ProxyError::BadRequest("missing Host header"))
        }
        (None, None) => return Ok(None),
    };
    if host.is_empty() || !host.bytes().all(|byte| HOST_BYTES[usize::from(byte)]) {
        return Err(ProxyError::BadRequest("invalid Host"));
    }
    Ok(Some(host))
}

/// The bytes of `uri-host [":" port]`: a reg-name's (unreserved, sub-delims, `%` of
/// pct-encoded), `:` and the brackets of an IP literal. Not `@` (userinfo), whitespace, `/`,
/// `?`, `#`, `\` or controls.
const HOST_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 256 {
        let b = byte as u8;
        table[byte] = b.is_ascii_alphanumeric();
        byte += 1;
    }
    let others = b"-._~%!$&'()*+,;=:[]";
    let mut index = 0;
    while index < others.len() {
        table[others[index] as usize] = true;
        index += 1;
    }
    table
};

/// The host a request routed by [`request_host`] asked for, read again from its head as it is
/// forwarded (the same precedence; nothing copied): for `Host` and `X-Forwarded-Host`.
pub fn asked_host<'h>(uri: &'h http::Uri, headers: &'h HeaderMap) -> Option<&'h [u8]> {
    match uri.authority() {
        Some(authority) => Some(authority.as_str().as_bytes()),
        None => headers.get(header::HOST).map(HeaderValue::as_bytes),
    }
}

/// The host for route matching: lower-case, without port or IPv6 brackets' port.
pub fn routing_host(host: &str) -> std::borrow::Cow<'_, str> {
    let name = if let Some(bracketed) = host.strip_prefix('[') {
        bracketed
            .split_once(']')
            .map_or(bracketed, |(inside, _)| inside)
    } else {
        host.rsplit_once(':').map_or(host, |(name, _)| name)
    };
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(name.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(name)
    }
}

/// A client address as `X-Forwarded-For` carries it; rendered once per client connection.
pub fn client_address_value(client_ip: IpAddr) -> HeaderValue {
    // Shared from the start: cloning it into every request allocates nothing.
    HeaderValue::from_maybe_shared(Bytes::from_owner(client_ip.to_string()))
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// The headers gatehouse sets on a request it forwards, in place of any the client sent by
/// those names (a client cannot forge them). They go into the upstream head as it is
/// written ([`SetHeaders`]), never into the request's header map.
pub struct Forwarded<'a> {
    /// `Host`: the host the client asked for ([`asked_host`]), else the backend's.
    pub host: &'a [u8],
    /// `X-Forwarded-Host`: the host the client asked for; not sent when it named none.
    pub forwarded_host: Option<&'a [u8]>,
    /// `X-Forwarded-For`, from [`forwarded_for`].
    pub forwarded_for: &'a HeaderValue,
    /// `X-Forwarded-Proto`: the listener's protocol.
    pub proto: &'a HeaderValue,
    /// `X-Request-Id`, from [`request_id`].
    pub request_id: &'a HeaderValue,
    /// Whether the client is one of the listener's `trusted_proxies`. Only then are the
    /// client-address headers gatehouse does not write itself ([`UNTRUSTED_ADDRESS_NAMES`])
    /// passed on: from anyone else they are a forgery a backend might believe.
    pub from_trusted_proxy: bool,
}

/// Headers that name the client's address, which gatehouse does not write (it writes
/// `X-Forwarded-For`): RFC 7239's `Forwarded` and nginx's customary `X-Real-IP`. Dropped
/// unless the client is a trusted proxy.
pub const UNTRUSTED_ADDRESS_NAMES: [&str; 2] = ["forwarded", "x-real-ip"];

/// The names of the headers [`Forwarded`] sets (lower case, as `HeaderName`s are).
pub const FORWARDED_NAMES: [&str; 5] = [
    "host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
];

impl SetHeaders for Forwarded<'_> {
    fn replaces(&self, name: &HeaderName) -> bool {
        // The names of FORWARDED_NAMES as one `match` (by length, then bytes): ≈ 200
        // instructions per request fewer than comparing with each in turn.
        match name.as_str() {
            "host" | "x-forwarded-for" | "x-forwarded-proto" | "x-forwarded-host"
            | "x-request-id" => true,
            "forwarded" | "x-real-ip" => !self.from_trusted_proxy,
            _ => false,
        }
    }

    fn write(&self, head: &mut Vec<u8>) {
        write_header(head, "host", self.host);
        write_header(head, "x-forwarded-for", self.forwarded_for.as_bytes());
        write_header(head, "x-forwarded-proto", self.proto.as_bytes());
        if let Some(host) = self.forwarded_host {
            write_header(head, "x-forwarded-host", host);
        }
        write_header(head, "x-request-id", self.request_id.as_bytes());
    }
}

/// The `X-Forwarded-For` to send: the client's address (`client`), after the list the
/// request carries only when `extend` (the client is a trusted proxy).
pub fn forwarded_for(headers: &HeaderMap, client: &HeaderValue, extend: bool) -> HeaderValue {
    let previous: Vec<&str> = if extend {
        headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .collect()
    } else {
        Vec::new()
    };
    if previous.is_empty() {
        return client.clone();
    }
    let list = format!(
        "{}, {}",
        previous.join(", "),
        client.to_str().unwrap_or("unknown")
    );
    HeaderValue::from_str(&list).unwrap_or_else(|_| client.clone())
}

/// The request's id: the client's `X-Request-Id` when it is sane, else a new one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    match headers.get(&X_REQUEST_ID) {
        Some(id) if is_sane_request_id(id) => id.clone(),
        _ => new_request_id(),
    }
}

/// Request ids are echoed into logs: accept only short, visible ASCII.
fn is_sane_request_id(id: &HeaderValue) -> bool {
    let bytes = id.as_bytes();
    !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(|b| b.is_ascii_graphic())
}

/// 128 random bits as 32 lower-case hex digits.
pub fn new_request_id() -> HeaderValue {
    let mut text = [0u8; 32];
    let bits = fastrand::u128(..);
    for (index, byte) in text.iter_mut().enumerate() {
        let nibble = ((bits >> (index * 4)) & 0xf) as u8;
        *byte = if nibble < 10 {
            b'0' + nibble
        } else {
            b'a' + nibble - 10
        };
    }
    // Owned in one allocation that clones share (the id goes to the backend and back to the
    // client): `from_bytes` would copy it, and the first clone allocate again.
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(text))
        .unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// Refuses HTTP/1 message framing that two parsers could read differently (request
/// smuggling): Content-Length together with Transfer-Encoding, Content-Length repeated, or a
/// Transfer-Encoding other than exactly one `chunked`.
pub fn check_framing<B>(request: &Request<B>) -> Result<(), ProxyError> {
    if request.version() >= Version::HTTP_2 {
        return Ok(());
    }
    let headers = request.headers();
    let lengths = headers.get_all(header::CONTENT_LENGTH).iter().count();
    let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter();
    let coding = codings.next();
    if coding.is_some() && lengths > 0 {
        return Err(ProxyError::BadRequest(
            "both Content-Length and Transfer-Encoding",
        ));
    }
    if lengths > 1 {
        return Err(ProxyError::BadRequest("repeated Content-Length"));
    }
    if let Some(coding) = coding {
        let exactly_chunked = coding.as_bytes().eq_ignore_ascii_case(b"chunked");
        if !exactly_chunked || codings.next().is_some() {
            return Err(ProxyError::BadRequest(
                "Transfer-Encoding must be exactly \"chunked\"",
            ));
        }
    }
    Ok(())
}

/// Size of a request head that hyper read, from its parts: the request line and header lines
/// in their usual form (gatehouse's own loop knows its heads' size as they arrived).
pub fn head_size<B>(request: &Request<B>) -> usize {
    let uri = request.uri();
    let target = uri.scheme_str().map_or(0, |scheme| scheme.len() + 3)
        + uri
            .authority()
            .map_or(0, |authority| authority.as_str().len())
        + uri.path_and_query().map_or(0, |path| path.as_str().len());
    let line = request.method().as_str().len() + target + 12;
    request.headers().iter().fold(line, |total, (name, value)| {
        total + name.as_str().len() + value.len() + 4
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        headers
    }

    #[test]
    fn hop_by_hop_bits_follow_the_table() {
        for (index, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_bit(name), 1 << index, "{name}");
        }
        assert_eq!(hop_by_hop_bit(&header::UPGRADE), 1 << 8);
        assert_eq!(hop_by_hop_bit(&header::HOST), 0);
        assert_eq!(hop_by_hop_bit(&HeaderName::from_static("x-connection")), 0);
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut headers = map(&[
            ("connection", "keep-alive, x-secret, x-forwarded-for, host"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("host", "a"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut headers, false);
        for gone in ["connection", "keep-alive", "x-secret", "te", "upgrade"] {
            assert!(!headers.contains_key(gone), "{gone} should be gone");
        }
        for kept in ["host", "x-forwarded-for", "x-kept"] {
            assert!(headers.contains_key(kept), "{kept} should stay");
        }
    }

    #[test]
    fn keeps_upgrade_for_tunnels() {
        let mut headers = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(wants_upgrade(&headers));
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(headers["connection"], "upgrade");
        assert_eq!(headers["upgrade"], "websocket");
    }

    #[test]
    fn forwarded_for_is_replaced_unless_trusted() {
        let ip = client_address_value("10.1.2.3".parse().unwrap());
        let sent = map(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "7.7.7.7"),
        ]);
        assert_eq!(forwarded_for(&sent, &ip, false), "10.1.2.3");
        assert_eq!(
            forwarded_for(&sent, &ip, true),
            "6.6.6.6, 7.7.7.7, 10.1.2.3"
        );
        assert_eq!(forwarded_for(&HeaderMap::new(), &ip, true), "10.1.2.3");
    }

    #[test]
    fn request_id_kept_or_generated() {
        assert_eq!(request_id(&map(&[("x-request-id", "abc-123")])), "abc-123");
        let id = request_id(&HeaderMap::new());
        assert_eq!(id.len(), 32);
        assert_ne!(id, new_request_id());
        assert!(id
            .as_bytes()
            .iter()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(byte)));
        let insane = map(&[("x-request-id", "a b")]);
        assert_eq!(request_id(&insane).len(), 32);
    }

    /// The head a backend receives for a request with `headers`, with `forwarded` set on it.
    fn sent(headers: HeaderMap, forwarded: &Forwarded) -> String {
        let mut request = Request::new(());
        *request.headers_mut() = headers;
        let (parts, ()) = request.into_parts();
        let mut head = Vec::new();
        let body = crate::upstream::body::UpstreamBody::empty();
        crate::upstream::http1::encode_head(&parts, forwarded, &body, &mut head);
        String::from_utf8(head).unwrap()
    }

    #[test]
    fn the_forwarded_headers_replace_the_clients_own() {
        let client_sent = map(&[
            ("Host", "portal.example.gov"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Forwarded-Proto", "gopher"),
            ("X-Forwarded-Host", "evil.example"),
            ("X-Request-Id", "abc"),
            ("Forwarded", "for=6.6.6.6"),
            ("X-Real-IP", "6.6.6.6"),
            ("Accept", "*/*"),
        ]);
        let host = b"portal.example.gov";
        let ip = client_address_value("10.1.2.3".parse().unwrap());
        let proto = HeaderValue::from_static("https");
        let id = HeaderValue::from_static("abc");
        let forwarded = Forwarded {
            host,
            forwarded_host: Some(host),
            forwarded_for: &ip,
            proto: &proto,
            request_id: &id,
            from_trusted_proxy: false,
        };
        assert_eq!(
            sent(client_sent.clone(), &forwarded),
            "GET / HTTP/1.1\r\nhost: portal.example.gov\r\nx-forwarded-for: 10.1.2.3\r\n\
             x-forwarded-proto: https\r\nx-forwarded-host: portal.example.gov\r\n\
             x-request-id: abc\r\naccept: */*\r\n\r\n"
        );
        for name in FORWARDED_NAMES {
            assert!(forwarded.replaces(&HeaderName::from_static(name)), "{name}");
        }
        assert!(!forwarded.replaces(&header::ACCEPT));
        let trusted = Forwarded {
            from_trusted_proxy: true,
            ..forwarded
        };
        for name in UNTRUSTED_ADDRESS_NAMES {
            let name = HeaderName::from_static(name);
            assert!(forwarded.replaces(&name), "{name} from a client is dropped");
            assert!(
                !trusted.replaces(&name),
                "{name} from a trusted proxy is kept"
            );
        }
        // A request that named no host: the backend's goes as Host, the client's
        // X-Forwarded-Host is not passed on.
        let no_host = Forwarded {
            host: b"10.0.0.7:8080",
            forwarded_host: None,
            ..forwarded
        };
        assert_eq!(
            sent(client_sent, &no_host),
            "GET / HTTP/1.1\r\nhost: 10.0.0.7:8080\r\nx-forwarded-for: 10.1.2.3\r\n\
             x-forwarded-proto: https\r\nx-request-id: abc\r\naccept: */*\r\n\r\n"
        );
    }

    #[test]
    fn the_host_forwarded_is_the_host_routed() {
        let request = |uri: &str, host: Option<&str>| {
            let mut request = Request::builder().uri(uri);
            if let Some(host) = host {
                request = request.header(header::HOST, host);
            }
            request.body(()).unwrap()
        };
        let cases = [
            (
                "https://a.example.gov/x",
                Some("b.example.gov"),
                Some("a.example.gov"),
            ),
            ("/x", Some("b.example.gov:8080"), Some("b.example.gov:8080")),
            ("/x", None, None),
        ];
        for (uri, host, expected) in cases {
            let request = request(uri, host);
            let routed = request_host(&request).ok().flatten();
            let asked = asked_host(request.uri(), request.headers());
            assert_eq!(routed, expected, "{uri} {host:?}");
            assert_eq!(asked, expected.map(str::as_bytes), "{uri} {host:?}");
        }
    }

    #[test]
    fn a_host_is_a_host_and_port_or_a_bad_request() {
        let host_header = |host: &str| {
            Request::builder()
                .uri("/x")
                .header(header::HOST, host)
                .body(())
                .unwrap()
        };
        for good in [
            "tax.example.gov",
            "Tax.Example.GOV:8443",
            "10.0.0.7:8080",
            "[2001:db8::1]:443",
            "xn--bcher-kva.example",
            "a_b.internal",
        ] {
            assert_eq!(request_host(&host_header(good)).unwrap(), Some(good));
        }
        for bad in [
            "", "a b", "a/b", "a?b", "a#b", "user@a", "a\\b", "a\tb", "a\"b",
        ] {
            assert!(request_host(&host_header(bad)).is_err(), "{bad:?}");
        }
        let absolute = |uri: &str| Request::builder().uri(uri).body(()).unwrap();
        assert!(request_host(&absolute("http://user@a.example.gov/")).is_err());
        assert_eq!(
            request_host(&absolute("http://a.example.gov:8080/")).unwrap(),
            Some("a.example.gov:8080")
        );
    }

    #[test]
    fn routing_host_ignores_port_and_case() {
        assert_eq!(routing_host("Tax.Example.GOV:8443"), "tax.example.gov");
        assert_eq!(routing_host("[::1]:80"), "::1");
    }
}
