//! A second, independent reading of HTTP/1 message framing, on the raw bytes hyper reads.
//!
//! hyper resolves a head that carries both Content-Length and Transfer-Encoding (the latter
//! wins) and collapses a repeated identical Content-Length before the handler sees the head,
//! so the handler cannot refuse them. Such heads are the classic request-smuggling probes;
//! gatehouse refuses them. A [`Tracker`] observes the client stream hyper reads (an
//! [`crate::io::Observer`]), follows request boundaries with its own parser (httparse heads,
//! Content-Length and chunked body accounting) and records the index of the first ambiguous
//! request in a shared [`Verdict`]; the handler answers that request 400 and closes the
//! connection. The tracker only observes bytes: it never changes what hyper reads.
//!
//! gatehouse's own HTTP/1 loop ([`super::h1`]) needs no tracker: it serves only heads without
//! Content-Length, Transfer-Encoding or Upgrade (nothing follows them), parsed whole, and
//! hands anything else to hyper at a request boundary, with the bytes it read ahead replayed.
//! The tracker starts there ([`Tracker::new`] with the requests served so far), so it reads
//! those replayed bytes as hyper does, and every byte after them.

use crate::io::{Observer, Written};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Longest head the tracker buffers before it gives up (hyper's own limit applies anyway).
const MAX_HEAD: usize = 1 << 20;
/// Headers parsed per head.
const MAX_HEADERS: usize = 256;

/// What the tracker learned, read by the request handler and by the connection's idle check.
#[derive(Debug)]
pub struct Verdict {
    first_ambiguous: AtomicU64,
    /// Requests read whole when the stream stands between two requests (nothing of the next
    /// one read yet); [`UNSETTLED`] until a tracker has read or mid-message, [`STOPPED`] once
    /// it stopped following.
    settled: AtomicU64,
}

impl Default for Verdict {
    fn default() -> Self {
        Verdict {
            first_ambiguous: AtomicU64::new(u64::MAX),
            settled: AtomicU64::new(UNSETTLED),
        }
    }
}

impl Verdict {
    /// Whether the request with this index (0 = first on the connection) or an earlier one
    /// had ambiguous framing.
    pub fn is_ambiguous(&self, request_index: u64) -> bool {
        self.first_ambiguous.load(Ordering::Acquire) <= request_index
    }

    /// How many requests were read whole, if every byte read so far belongs to them: the
    /// connection stands exactly between two requests. `None` before the tracker read,
    /// mid-request, after an upgrade or HTTP/2 preface, or on bytes it could not follow.
    pub fn settled_requests(&self) -> Option<u64> {
        match self.settled.load(Ordering::Relaxed) {
            UNSETTLED | STOPPED => None,
            requests => Some(requests),
        }
    }

    /// Whether the tracker stopped following the stream as HTTP/1: an HTTP/2 preface (h2c),
    /// an upgrade, or bytes it could not follow. Such a session never parks.
    pub fn stopped_following(&self) -> bool {
        self.settled.load(Ordering::Relaxed) == STOPPED
    }
}

/// `settled` before the tracker read, or mid-message.
const UNSETTLED: u64 = u64::MAX;
/// `settled` once the tracker stopped following.
const STOPPED: u64 = u64::MAX - 1;

#[derive(Debug)]
enum State {
    Head(Vec<u8>),
    Body(u64),
    ChunkSize(Vec<u8>),
    ChunkData(u64),
    ChunkDataEnd(Vec<u8>),
    Trailer(Vec<u8>),
    /// Not HTTP/1 (h2c preface), an upgrade, or unparseable: stop following.
    Done,
}

/// Whoever keeps a connection's [`Verdict`]: the connection's shared facts, so the verdict
/// is no allocation of its own (the tests use a bare verdict).
pub trait VerdictHolder: std::fmt::Debug + Send + Sync + 'static {
    /// The verdict the tracker writes and the request handler reads.
    fn verdict(&self) -> &Verdict;
}

#[cfg(test)]
impl VerdictHolder for Verdict {
    fn verdict(&self) -> &Verdict {
        self
    }
}

/// Follows request boundaries on an HTTP/1 byte stream.
#[derive(Debug)]
pub struct Tracker {
    state: State,
    requests: u64,
    holder: Arc<dyn VerdictHolder>,
}

impl Tracker {
    /// Follows a stream from a request boundary, after the `requests` that `holder`'s
    /// connection has had so far; its findings go to `holder`'s verdict. Nothing is known
    /// settled until it reads.
    pub fn new(holder: Arc<dyn VerdictHolder>, requests: u64) -> Self {
        holder.verdict().settled.store(UNSETTLED, Ordering::Relaxed);
        Tracker {
            state: State::Head(Vec::new()),
            requests,
            holder,
        }
    }
}

fn line_end(buffer: &[u8]) -> Option<usize> {
    buffer.iter().position(|&b| b == b'\n')
}

/// Where a head that arrived over several reads ends: just past its first empty line (CRLF or
/// bare LF endings). Stops at that line, so body bytes in the same read are not scanned.
fn head_end(buffer: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(offset) = line_end(&buffer[from..]) {
        let at = from + offset;
        match buffer.get(at + 1..) {
            Some([b'\n', ..]) => return Some(at + 2),
            Some([b'\r', b'\n', ..]) => return Some(at + 3),
            _ => from = at + 1,
        }
    }
    None
}

/// How a complete request head frames what follows it.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    /// Content-Length with Transfer-Encoding, or Content-Length more than once.
    Ambiguous,
    /// An upgrade or CONNECT: what follows is not HTTP/1.
    Tunnel,
    Chunked,
    Length(u64),
    /// A Content-Length that is not a number (hyper refuses the request).
    Unreadable,
}

/// The result of reading a head from the start of `bytes`.
#[derive(Debug, PartialEq, Eq)]
enum Head {
    /// The head is `length` bytes long.
    Complete(usize, Framing),
    Partial,
    /// Not an HTTP/1 request head (hyper refuses it, or it is the HTTP/2 preface).
    Invalid,
}

/// Reads the request head at the start of `bytes` with httparse, as hyper does, and finds how
/// its body is framed. The header slots stay uninitialised: only the parsed ones are read.
fn read_head(bytes: &[u8]) -> Head {
    let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let length = match request.parse_with_uninit_headers(bytes, &mut slots) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Head::Partial,
        Err(_) => return Head::Invalid,
    };
    let mut content_length: Option<&[u8]> = None;
    let mut lengths = 0;
    let mut codings = 0;
    let mut upgrade = false;
    for header in request.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            lengths += 1;
            content_length = Some(header.value);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            codings += 1;
        } else if header.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    let framing = if (codings > 0 && lengths > 0) || lengths > 1 {
        Framing::Ambiguous
    } else if upgrade || request.method == Some("CONNECT") {
        Framing::Tunnel
    } else if codings > 0 {
        Framing::Chunked
    } else {
        match content_length {
            None => Framing::Length(0),
            Some(value) => std::str::from_utf8(value)
                .ok()
                .and_then(|value| value.trim().parse().ok())
                .map_or(Framing::Unreadable, Framing::Length),
        }
    };
    Head::Complete(length, framing)
}

impl Tracker {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Done => return,
                // The usual case: a whole head at the start of a read, judged in place.
                State::Head(buffer) if buffer.is_empty() => match read_head(bytes) {
                    Head::Complete(length, framing) => {
                        bytes = &bytes[length..];
                        self.state = self.after_head(framing);
                    }
                    Head::Partial => {
                        buffer.extend_from_slice(bytes);
                        return;
                    }
                    Head::Invalid => self.state = State::Done,
                },
                State::Head(buffer) => {
                    let start = buffer.len().saturating_sub(2);
                    buffer.extend_from_slice(bytes);
                    let Some(end) = head_end(&buffer[start..]).map(|e| e + start) else {
                        if buffer.len() > MAX_HEAD {
                            self.state = State::Done;
                        }
                        return;
                    };
                    let consumed_now = bytes.len() - (buffer.len() - end);
                    let head = std::mem::take(buffer);
                    self.state = match read_head(&head[..end]) {
                        Head::Complete(_, framing) => self.after_head(framing),
                        Head::Partial | Head::Invalid => State::Done,
                    };
                    bytes = &bytes[consumed_now..];
                }
                State::Body(left) => {
                    let take = (*left).min(bytes.len() as u64);
                    *left -= take;
                    bytes = &bytes[take as usize..];
                    if *left == 0 {
                        self.state = State::Head(Vec::new());
                    }
                }
                State::ChunkSize(line) => {
                    let Some(end) = line_end(bytes) else {
                        line.extend_from_slice(bytes);
                        if line.len() > 1024 {
                            self.state = State::Done;
                        }
                        return;
                    };
                    line.extend_from_slice(&bytes[..end]);
                    bytes = &bytes[end + 1..];
                    let text = String::from_utf8_lossy(line);
                    let digits = text.split(';').next().unwrap_or("").trim();
                    self.state = match u64::from_str_radix(digits, 16) {
                        Ok(0) => State::Trailer(Vec::new()),
                        Ok(size) => State::ChunkData(size),
                        Err(_) => State::Done,
                    };
                }
                State::ChunkData(left) => {
                    let take = (*left).min(bytes.len() as u64);
                    *left -= take;
                    bytes = &bytes[take as usize..];
                    if *left == 0 {
                        self.state = State::ChunkDataEnd(Vec::new());
                    }
                }
                State::ChunkDataEnd(line) => {
                    let Some(end) = line_end(bytes) else {
                        line.extend_from_slice(bytes);
                        if line.len() > 2 {
                            self.state = State::Done;
                        }
                        return;
                    };
                    bytes = &bytes[end + 1..];
                    self.state = State::ChunkSize(Vec::new());
                }
                State::Trailer(line) => {
                    let Some(end) = line_end(bytes) else {
                        line.extend_from_slice(bytes);
                        if line.len() > MAX_HEAD {
                            self.state = State::Done;
                        }
                        return;
                    };
                    line.extend_from_slice(&bytes[..end]);
                    bytes = &bytes[end + 1..];
                    let empty = line.iter().all(|&b| b == b'\r');
                    self.state = if empty {
                        State::Head(Vec::new())
                    } else {
                        State::Trailer(Vec::new())
                    };
                }
            }
        }
    }

    /// Counts a complete head, records it if ambiguous, and says what to follow next.
    fn after_head(&mut self, framing: Framing) -> State {
        let index = self.requests;
        self.requests += 1;
        match framing {
            Framing::Ambiguous => {
                self.holder
                    .verdict()
                    .first_ambiguous
                    .fetch_min(index, Ordering::AcqRel);
                State::Done
            }
            Framing::Tunnel | Framing::Unreadable => State::Done,
            Framing::Chunked => State::ChunkSize(Vec::new()),
            Framing::Length(0) => State::Head(Vec::new()),
            Framing::Length(length) => State::Body(length),
        }
    }
}

impl Observer for Tracker {
    fn read(&mut self, bytes: &[u8]) {
        self.feed(bytes);
        let settled = match &self.state {
            State::Head(partial) if partial.is_empty() => self.requests,
            State::Done => STOPPED,
            _ => UNSETTLED,
        };
        self.holder
            .verdict()
            .settled
            .store(settled, Ordering::Relaxed);
    }

    fn wrote(&mut self, _written: &Written<'_>) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict_of(chunks: &[&[u8]]) -> (Arc<Verdict>, u64) {
        let verdict = Arc::new(Verdict::default());
        let mut tracker = Tracker::new(verdict.clone(), 0);
        for chunk in chunks {
            tracker.feed(chunk);
        }
        (verdict, tracker.requests)
    }

    #[test]
    fn knows_when_the_stream_stands_between_requests() {
        let verdict = Arc::new(Verdict::default());
        // Taking over after two requests served without it: nothing known until it reads.
        let mut tracker = Tracker::new(verdict.clone(), 2);
        assert_eq!(verdict.settled_requests(), None);
        let steps: [(&[u8], Option<u64>); 6] = [
            (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", Some(3)),
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab",
                None,
            ),
            (b"cd", Some(4)),
            (b"GET /next HTTP/1.1\r\n", None),
            (b"Host: x\r\n\r\n", Some(5)),
            (
                b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
                None,
            ),
        ];
        for (bytes, expected) in steps {
            assert!(!verdict.stopped_following());
            tracker.read(bytes);
            let text = String::from_utf8_lossy(bytes);
            assert_eq!(verdict.settled_requests(), expected, "after {text:?}");
        }
        assert!(verdict.stopped_following(), "after the upgrade");
    }

    #[test]
    fn says_when_it_stopped_following_an_http2_preface() {
        let verdict = Arc::new(Verdict::default());
        let mut tracker = Tracker::new(verdict.clone(), 0);
        tracker.read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        assert!(verdict.stopped_following());
        assert_eq!(verdict.settled_requests(), None);
        // Mid-request is not stopped: the session may still park.
        let mut tracker = Tracker::new(verdict.clone(), 0);
        tracker.read(b"GET / HTTP/1.1\r\n");
        assert!(!verdict.stopped_following());
    }

    #[test]
    fn follows_pipelined_requests_across_reads() {
        let stream: &[u8] = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloPOST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-Trailer: y\r\n\r\nGET /last HTTP/1.1\r\nHost: x\r\n\r\n";
        for split in 1..stream.len() {
            let (verdict, requests) = verdict_of(&[&stream[..split], &stream[split..]]);
            assert_eq!(requests, 3, "split at {split}");
            assert!(!verdict.is_ambiguous(2));
        }
    }

    #[test]
    fn flags_content_length_with_transfer_encoding_and_repeats() {
        let (verdict, _) = verdict_of(&[b"GET / HTTP/1.1\r\nHost: x\r\n\r\nPOST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"]);
        assert!(!verdict.is_ambiguous(0));
        assert!(verdict.is_ambiguous(1));
        let (verdict, _) = verdict_of(&[
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi",
        ]);
        assert!(verdict.is_ambiguous(0));
    }

    #[test]
    fn counts_on_from_the_requests_served_before_it() {
        let verdict = Arc::new(Verdict::default());
        let mut tracker = Tracker::new(verdict.clone(), 2);
        tracker
            .read(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx");
        assert!(
            !verdict.is_ambiguous(1),
            "the requests before it were not judged"
        );
        assert!(verdict.is_ambiguous(2));
    }

    #[test]
    fn stops_following_http2_and_upgrades() {
        let (verdict, _) = verdict_of(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00"]);
        assert!(!verdict.is_ambiguous(0));
        let (verdict, requests) = verdict_of(&[b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n"]);
        assert_eq!(requests, 1, "tunnel bytes after an upgrade are not HTTP");
        assert!(!verdict.is_ambiguous(5));
    }
}
