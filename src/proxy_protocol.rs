//! The PROXY protocol (HAProxy, versions 1 and 2): parsing the header a fronting L4
//! balancer prepends, and encoding the one gatehouse sends to backends.
//!
//! Parsing is pure ([`parse`]) so it can be fuzzed and property-tested; [`read_header`] does
//! the I/O, keeping any bytes read past the header for the protocol that follows.

use crate::config::ProxyProtocolVersion;
use crate::io::ResetOnClose;
use bytes::{Bytes, BytesMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The v2 signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header, CRLF included.
const V1_MAX: usize = 107;
/// The longest v2 header we accept (address block plus TLVs).
const V2_MAX: usize = 16 + 1024;

/// What a PROXY header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The original client and the address it connected to; `None` for `LOCAL` (health
    /// checks of the fronting balancer) and `UNKNOWN`.
    pub addresses: Option<(SocketAddr, SocketAddr)>,
}

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyProtocolError {
    #[error("not a PROXY protocol header")]
    NotProxyProtocol,
    #[error("malformed PROXY v1 header: {0}")]
    V1(&'static str),
    #[error("malformed PROXY v2 header: {0}")]
    V2(&'static str),
    #[error("no PROXY header within the time limit")]
    Timeout,
    #[error("connection closed before the PROXY header ended")]
    Closed,
    #[error("i/o error reading the PROXY header: {0}")]
    Io(String),
}

/// Parses a header at the start of `input`: `Ok(None)` if more bytes are needed, else the
/// header and how many bytes it used.
pub fn parse(input: &[u8]) -> Result<Option<(Header, usize)>, ProxyProtocolError> {
    if input.is_empty() {
        return Ok(None);
    }
    let v1_prefix = b"PROXY ";
    let v2_prefix_len = input.len().min(V2_SIGNATURE.len());
    if input[..v2_prefix_len] == V2_SIGNATURE[..v2_prefix_len] {
        return parse_v2(input);
    }
    let v1_prefix_len = input.len().min(v1_prefix.len());
    if input[..v1_prefix_len] == v1_prefix[..v1_prefix_len] {
        return parse_v1(input);
    }
    Err(ProxyProtocolError::NotProxyProtocol)
}

fn parse_v1(input: &[u8]) -> Result<Option<(Header, usize)>, ProxyProtocolError> {
    let Some(end) = input.windows(2).position(|w| w == b"\r\n") else {
        if input.len() >= V1_MAX {
            return Err(ProxyProtocolError::V1("no CRLF within 107 bytes"));
        }
        if input.contains(&b'\n') || input.contains(&b'\r') && !input.ends_with(b"\r") {
            return Err(ProxyProtocolError::V1("bare CR or LF"));
        }
        return Ok(None);
    };
    if end + 2 > V1_MAX {
        return Err(ProxyProtocolError::V1("longer than 107 bytes"));
    }
    let line =
        std::str::from_utf8(&input[..end]).map_err(|_| ProxyProtocolError::V1("not ASCII"))?;
    let mut parts = line.split(' ');
    let (Some("PROXY"), Some(family)) = (parts.next(), parts.next()) else {
        return Err(ProxyProtocolError::V1("expected PROXY and a protocol"));
    };
    if family == "UNKNOWN" {
        return Ok(Some((Header { addresses: None }, end + 2)));
    }
    let fields: Vec<&str> = parts.collect();
    let [source, destination, source_port, destination_port] = fields[..] else {
        return Err(ProxyProtocolError::V1("expected four address fields"));
    };
    let parse_ip = |text: &str| -> Result<IpAddr, ProxyProtocolError> {
        match family {
            "TCP4" => text
                .parse::<Ipv4Addr>()
                .map(IpAddr::V4)
                .map_err(|_| ProxyProtocolError::V1("invalid IPv4 address")),
            "TCP6" => text
                .parse::<Ipv6Addr>()
                .map(IpAddr::V6)
                .map_err(|_| ProxyProtocolError::V1("invalid IPv6 address")),
            _ => Err(ProxyProtocolError::V1(
                "protocol must be TCP4, TCP6 or UNKNOWN",
            )),
        }
    };
    let parse_port = |text: &str| -> Result<u16, ProxyProtocolError> {
        if text.is_empty() || text.len() > 5 || (text.len() > 1 && text.starts_with('0')) {
            return Err(ProxyProtocolError::V1("invalid port"));
        }
        text.parse()
            .map_err(|_| ProxyProtocolError::V1("invalid port"))
    };
    let source = SocketAddr::new(parse_ip(source)?, parse_port(source_port)?);
    let destination = SocketAddr::new(parse_ip(destination)?, parse_port(destination_port)?);
    Ok(Some((
        Header {
            addresses: Some((source, destination)),
        },
        end + 2,
    )))
}

fn parse_v2(input: &[u8]) -> Result<Option<(Header, usize)>, ProxyProtocolError> {
    if input.len() < 16 {
        return Ok(None);
    }
    let version_command = input[12];
    if version_command >> 4 != 2 {
        return Err(ProxyProtocolError::V2("version must be 2"));
    }
    let command = version_command & 0x0f;
    let family = input[13];
    let length = usize::from(u16::from_be_bytes([input[14], input[15]]));
    if 16 + length > V2_MAX {
        return Err(ProxyProtocolError::V2("header too long"));
    }
    if input.len() < 16 + length {
        return Ok(None);
    }
    let block = &input[16..16 + length];
    let total = 16 + length;
    match command {
        0 => return Ok(Some((Header { addresses: None }, total))),
        1 => {}
        _ => return Err(ProxyProtocolError::V2("command must be LOCAL or PROXY")),
    }
    let addresses = match family {
        0x11 | 0x12 => {
            if block.len() < 12 {
                return Err(ProxyProtocolError::V2("IPv4 address block too short"));
            }
            let source = Ipv4Addr::new(block[0], block[1], block[2], block[3]);
            let destination = Ipv4Addr::new(block[4], block[5], block[6], block[7]);
            let source_port = u16::from_be_bytes([block[8], block[9]]);
            let destination_port = u16::from_be_bytes([block[10], block[11]]);
            Some((
                SocketAddr::new(source.into(), source_port),
                SocketAddr::new(destination.into(), destination_port),
            ))
        }
        0x21 | 0x22 => {
            if block.len() < 36 {
                return Err(ProxyProtocolError::V2("IPv6 address block too short"));
            }
            let mut source = [0u8; 16];
            let mut destination = [0u8; 16];
            source.copy_from_slice(&block[0..16]);
            destination.copy_from_slice(&block[16..32]);
            let source_port = u16::from_be_bytes([block[32], block[33]]);
            let destination_port = u16::from_be_bytes([block[34], block[35]]);
            Some((
                SocketAddr::new(Ipv6Addr::from(source).into(), source_port),
                SocketAddr::new(Ipv6Addr::from(destination).into(), destination_port),
            ))
        }
        0x00 => None,
        _ => return Err(ProxyProtocolError::V2("unsupported address family")),
    };
    Ok(Some((Header { addresses }, total)))
}

/// The header a health check's connection opens with: the balancer's own connection,
/// relayed for no client (v1 `UNKNOWN`, v2 `LOCAL`), as HAProxy's `check-send-proxy`
/// sends. A backend that requires the header answers its checks as it answers traffic.
pub fn encode_local(version: ProxyProtocolVersion) -> &'static [u8] {
    match version {
        ProxyProtocolVersion::V1 => b"PROXY UNKNOWN\r\n",
        // The signature, version 2 with command LOCAL, family UNSPEC, no addresses.
        ProxyProtocolVersion::V2 => b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00",
    }
}

/// Encodes a v1 header for a connection from `source` to `destination`.
pub fn encode_v1(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (source_ip, destination_ip) = (canonical(source.ip()), canonical(destination.ip()));
    match (source_ip, destination_ip) {
        (IpAddr::V4(s), IpAddr::V4(d)) => format!(
            "PROXY TCP4 {s} {d} {} {}\r\n",
            source.port(),
            destination.port()
        ),
        (s, d) => format!(
            "PROXY TCP6 {} {} {} {}\r\n",
            to_v6(s),
            to_v6(d),
            source.port(),
            destination.port()
        ),
    }
    .into_bytes()
}

/// Encodes a v2 header for a connection from `source` to `destination`.
pub fn encode_v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut header = V2_SIGNATURE.to_vec();
    header.push(0x21);
    match (canonical(source.ip()), canonical(destination.ip())) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            header.push(0x11);
            header.extend_from_slice(&12u16.to_be_bytes());
            header.extend_from_slice(&s.octets());
            header.extend_from_slice(&d.octets());
        }
        (s, d) => {
            header.push(0x21);
            header.extend_from_slice(&36u16.to_be_bytes());
            header.extend_from_slice(&to_v6(s).octets());
            header.extend_from_slice(&to_v6(d).octets());
        }
    }
    header.extend_from_slice(&source.port().to_be_bytes());
    header.extend_from_slice(&destination.port().to_be_bytes());
    header
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Reads a PROXY header from `io` within `timeout`. Bytes read past the header come back in
/// the returned prefix, to be replayed before the rest of the stream.
pub async fn read_header<I: AsyncRead + Unpin>(
    io: &mut I,
    timeout: Duration,
) -> Result<(Header, Bytes), ProxyProtocolError> {
    let reading = async {
        let mut buffer = BytesMut::with_capacity(256);
        loop {
            if let Some((header, used)) = parse(&buffer)? {
                let rest = buffer.split_off(used).freeze();
                return Ok((header, rest));
            }
            if buffer.len() >= V2_MAX {
                return Err(ProxyProtocolError::V2("header too long"));
            }
            let read = io
                .read_buf(&mut buffer)
                .await
                .map_err(|error| ProxyProtocolError::Io(error.to_string()))?;
            if read == 0 {
                return Err(ProxyProtocolError::Closed);
            }
        }
    };
    tokio::time::timeout(timeout, reading)
        .await
        .map_err(|_| ProxyProtocolError::Timeout)?
}

/// A stream that first yields `prefix` (bytes read past a PROXY header), then `inner`.
#[derive(Debug)]
pub struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Prefixed<T> {
    /// Replays `prefix` before reading from `inner`.
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Prefixed { prefix, inner }
    }

    /// Sets the bytes to replay before `inner` is read (those read past a PROXY header).
    pub fn set_prefix(&mut self, prefix: Bytes) {
        self.prefix = prefix;
    }

    /// Bytes still to replay before `inner` is read.
    pub fn prefix_len(&self) -> usize {
        self.prefix.len()
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The bytes still to replay, and the wrapped stream.
    pub fn into_parts(self) -> (Bytes, T) {
        (self.prefix, self.inner)
    }
}

impl<T: ResetOnClose> ResetOnClose for Prefixed<T> {
    fn reset_on_close(&self) {
        self.inner.reset_on_close();
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let take = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(take);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn v1_examples() {
        let (header, used) = parse(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET /")
            .unwrap()
            .unwrap();
        assert_eq!(used, 45);
        assert_eq!(
            header.addresses,
            Some((addr("192.0.2.1:56324"), addr("198.51.100.2:443")))
        );
        let (header, _) = parse(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            header.addresses,
            Some((addr("[2001:db8::1]:1"), addr("[2001:db8::2]:2")))
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n").unwrap().unwrap().0.addresses,
            None
        );
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4").unwrap(), None, "incomplete");
    }

    #[test]
    fn v1_refusals() {
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(parse(&[b'P'; 200]).is_err());
        let mut long = b"PROXY TCP4 ".to_vec();
        long.extend(std::iter::repeat_n(b'1', 120));
        assert!(parse(&long).is_err());
    }

    #[test]
    fn v2_examples_and_local() {
        let header = encode_v2(addr("10.0.0.1:1000"), addr("10.0.0.2:443"));
        assert_eq!(header.len(), 28);
        let (parsed, used) = parse(&header).unwrap().unwrap();
        assert_eq!(used, 28);
        assert_eq!(
            parsed.addresses,
            Some((addr("10.0.0.1:1000"), addr("10.0.0.2:443")))
        );
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(
            parse(&local).unwrap().unwrap(),
            (Header { addresses: None }, 16)
        );
        assert_eq!(encode_local(ProxyProtocolVersion::V2), &local[..]);
        assert_eq!(
            parse(encode_local(ProxyProtocolVersion::V1))
                .unwrap()
                .unwrap(),
            (Header { addresses: None }, 15)
        );
        assert_eq!(parse(&header[..20]).unwrap(), None, "incomplete");
        let mut bad_version = header.clone();
        bad_version[12] = 0x11;
        assert!(parse(&bad_version).is_err());
        let mut short_block = V2_SIGNATURE.to_vec();
        short_block.extend_from_slice(&[0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        assert!(parse(&short_block).is_err());
    }

    #[test]
    fn v1_encoding_round_trips() {
        let header = encode_v1(addr("192.0.2.9:4000"), addr("192.0.2.10:80"));
        assert_eq!(header, b"PROXY TCP4 192.0.2.9 192.0.2.10 4000 80\r\n");
        let mapped = encode_v1(addr("[::ffff:192.0.2.9]:4000"), addr("192.0.2.10:80"));
        assert_eq!(mapped, header, "IPv4-mapped addresses are sent as TCP4");
    }
}
