//! Property tests at the other trust boundaries (the cargo-fuzz targets in fuzz/ explore the
//! same paths with coverage guidance): configuration parsing never panics and always explains
//! a refusal; request-head sanitation never leaves hop-by-hop headers and never lets a client
//! choose its X-Forwarded-For, nor pass a Forwarded or X-Real-IP, when it is not a trusted
//! proxy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use gatehouse::proxy::headers;
use gatehouse::upstream::body::UpstreamBody;
use gatehouse::upstream::http1::encode_head;
use http::{HeaderName, HeaderValue, Request};
use proptest::prelude::*;
use std::net::IpAddr;

fn config_like() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "listeners",
        "pools",
        "admin",
        "listen",
        "protocol",
        "pool",
        "backends",
        "name",
        "address",
        "weight",
        "state",
        "algorithm",
        "routes",
        "host",
        "path_prefix",
        "tls",
        "certificates",
        "health_check",
        "timeouts",
        "connect",
        "limits",
        "rate_limit",
        "web",
        "p",
        "- ",
        "{",
        "}",
        "[",
        "]",
        ":",
        "\"127.0.0.1:0\"",
        "10.0.0.1:99999",
        "2s",
        "-1",
        "active",
        "round_robin",
    ]);
    prop::collection::vec(
        (
            key,
            prop::sample::select(vec![" ", "\n", "\n  ", "\n    ", ": ", ""]),
        ),
        0..60,
    )
    .prop_map(|parts| parts.into_iter().map(|(k, s)| format!("{k}{s}")).collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn config_parsing_never_panics_and_explains_refusals(text in prop_oneof![config_like(), ".{0,200}"]) {
        match gatehouse::config::parse(&text, std::path::Path::new("/nonexistent/props.yaml")) {
            Ok(config) => prop_assert!(!config.listeners.is_empty()),
            Err(error) => {
                prop_assert!(!error.problems.is_empty());
                for problem in &error.problems {
                    prop_assert!(!problem.message.is_empty());
                }
            }
        }
    }

    #[test]
    fn sanitation_removes_hop_by_hop_and_owns_forwarded_for(
        pairs in prop::collection::vec((prop_oneof![
            "[a-zA-Z-]{1,20}",
            prop::sample::select(vec!["X-Forwarded-For".to_string(), "Forwarded".to_string(), "X-Real-IP".to_string()]),
        ], "[ -~]{0,40}"), 0..20),
        connection in prop::collection::vec(prop::sample::select(vec![
            "keep-alive", "close", "upgrade", "x-forwarded-for", "host", "authorization",
            "x-request-id", "x-secret", "content-length", "te",
        ]), 0..5),
        client in any::<[u8; 4]>(),
    ) {
        let mut request = Request::new(());
        for (name, value) in &pairs {
            if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
                request.headers_mut().append(name, value);
            }
        }
        request.headers_mut().append("connection", HeaderValue::from_str(&connection.join(", ")).unwrap());
        request.headers_mut().insert("host", HeaderValue::from_static("portal.example.gov"));
        let _ = headers::check_framing(&request);
        headers::strip_hop_by_hop(request.headers_mut(), false);
        let client = IpAddr::from(client);
        let client_value = headers::client_address_value(client);
        let forwarded_for = headers::forwarded_for(request.headers(), &client_value, false);
        let request_id = headers::request_id(request.headers());
        let proto = HeaderValue::from_static("https");
        // What the backend receives.
        let (parts, ()) = request.into_parts();
        let host = headers::asked_host(&parts.uri, &parts.headers);
        let forwarded = headers::Forwarded {
            host: host.unwrap(),
            forwarded_host: host,
            forwarded_for: &forwarded_for,
            proto: &proto,
            request_id: &request_id,
            from_trusted_proxy: false,
        };
        let mut head = Vec::new();
        encode_head(&parts, &forwarded, &UpstreamBody::empty(), &mut head);
        let head = String::from_utf8_lossy(&head).into_owned();
        let sent: Vec<(String, &str)> = head
            .split("\r\n")
            .skip(1)
            .filter_map(|line| line.split_once(": "))
            .map(|(name, value)| (name.to_ascii_lowercase(), value))
            .collect();
        let values = |wanted: &str| -> Vec<&str> {
            sent.iter().filter(|(name, _)| name == wanted).map(|(_, value)| *value).collect()
        };
        for hop in ["connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "proxy-connection"] {
            prop_assert!(values(hop).is_empty(), "{hop} survived");
        }
        prop_assert_eq!(values("x-forwarded-for"), vec![client.to_string()]);
        for forged in headers::UNTRUSTED_ADDRESS_NAMES {
            prop_assert!(values(forged).is_empty(), "{forged} from a client survived");
        }
        prop_assert_eq!(values("host"), vec!["portal.example.gov"]);
        prop_assert_eq!(values("x-request-id").len(), 1);
    }

    #[test]
    fn routing_host_is_lower_case_without_port(name in "[a-zA-Z0-9.-]{1,30}", port in proptest::option::of(any::<u16>())) {
        let text = match port { Some(port) => format!("{name}:{port}"), None => name.clone() };
        let routed = headers::routing_host(&text);
        prop_assert_eq!(routed.as_ref(), name.to_ascii_lowercase());
    }
}
