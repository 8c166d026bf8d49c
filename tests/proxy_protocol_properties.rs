//! Property tests at the PROXY protocol trust boundary: encode → parse round trips for v1 and
//! v2, every truncated header asks for more bytes, and arbitrary input never panics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use gatehouse::proxy_protocol::{encode_v1, encode_v2, parse};
use proptest::prelude::*;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

fn address() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(Ipv4Addr::from(ip).into(), port)),
        (any::<[u8; 16]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(Ipv6Addr::from(ip).into(), port)),
    ]
}

/// IPv4-mapped IPv6 addresses travel as IPv4; mixed families travel as IPv6.
fn expected(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    let unmap = |a: SocketAddr| match a.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(a, |v4| SocketAddr::new(v4.into(), a.port())),
        _ => a,
    };
    let (s, d) = (unmap(source), unmap(destination));
    if s.is_ipv4() && d.is_ipv4() {
        (s, d)
    } else {
        let map = |a: SocketAddr| match a.ip() {
            IpAddr::V4(v4) => SocketAddr::new(v4.to_ipv6_mapped().into(), a.port()),
            _ => a,
        };
        (map(s), map(d))
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn v1_and_v2_round_trip(source in address(), destination in address(), trailer in prop::collection::vec(any::<u8>(), 0..32)) {
        let encoders: [fn(SocketAddr, SocketAddr) -> Vec<u8>; 2] = [encode_v1, encode_v2];
        for encode in encoders {
            let mut bytes = encode(source, destination);
            let length = bytes.len();
            bytes.extend_from_slice(&trailer);
            let (header, used) = parse(&bytes).unwrap().unwrap();
            prop_assert_eq!(used, length);
            prop_assert_eq!(header.addresses, Some(expected(source, destination)));
            for cut in 1..length {
                prop_assert_eq!(parse(&bytes[..cut]).unwrap(), None, "a truncated header needs more bytes");
            }
        }
    }

    #[test]
    fn arbitrary_input_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(Some((_, used))) = parse(&bytes) {
            prop_assert!(used <= bytes.len());
        }
    }

    #[test]
    fn arbitrary_v1_lines_never_panic(line in "PROXY [ -~]{0,120}\r\n") {
        let _ = parse(line.as_bytes());
    }
}
