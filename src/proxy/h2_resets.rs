//! HTTP/2 requests refused as malformed, counted from the resets the h2 crate writes.
//!
//! The h2 crate checks each request head (pseudo-headers, connection-specific fields, a
//! body's length against its Content-Length) and answers a malformed one with
//! `RST_STREAM(PROTOCOL_ERROR)` itself: hyper never sees the request, so nothing else could
//! count it. A [`ResetWatch`] reads the frame headers of what a session writes — nine bytes
//! per frame, payloads skipped — and counts each such reset as a `bad_request` rejection.
//! It never changes what is written. A session that answers in HTTP/1 (its first byte is
//! not a frame's) is left alone after its first write.

use crate::io::{Observer, Written};
use prometheus::IntCounter;

/// A frame header's length.
const FRAME_HEAD: usize = 9;
/// A frame header and an `RST_STREAM`'s error code.
const RESET_FRAME: usize = FRAME_HEAD + 4;
const RST_STREAM: u8 = 0x3;
const PROTOCOL_ERROR: [u8; 4] = [0, 0, 0, 1];

/// Follows the frames an HTTP/2 server session writes; see the module documentation.
#[derive(Debug)]
pub struct ResetWatch {
    malformed: IntCounter,
    /// The frame header (and reset code) read so far of the frame being written.
    head: [u8; RESET_FRAME],
    filled: usize,
    /// Payload bytes of the current frame still to pass unread.
    skip: usize,
    /// Nothing written yet: the first byte tells a frame from an HTTP/1 status line.
    first: bool,
    /// The session speaks HTTP/1: nothing to follow.
    stopped: bool,
}

impl ResetWatch {
    /// A watch counting into `malformed` (the listener's `bad_request` rejections).
    pub fn new(malformed: IntCounter) -> Self {
        ResetWatch {
            malformed,
            head: [0; RESET_FRAME],
            filled: 0,
            skip: 0,
            first: true,
            stopped: false,
        }
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        if self.first {
            // A server's first frame is its SETTINGS, whose length (< 16 MiB) starts with 0;
            // an HTTP/1 answer starts with "HTTP/".
            let Some(&byte) = bytes.first() else { return };
            self.first = false;
            self.stopped = byte != 0;
        }
        while !self.stopped && !bytes.is_empty() {
            if self.skip > 0 {
                let skipped = self.skip.min(bytes.len());
                self.skip -= skipped;
                bytes = bytes.get(skipped..).unwrap_or_default();
                continue;
            }
            // A whole frame header (and reset code) in this write, as nearly always: read in
            // place.
            if let (0, Some(head)) = (self.filled, bytes.first_chunk::<RESET_FRAME>()) {
                let used = self.frame_begins(head);
                bytes = bytes.get(used..).unwrap_or_default();
                continue;
            }
            let wanted = if self.filled >= FRAME_HEAD && is_reset(&self.head) {
                RESET_FRAME
            } else {
                FRAME_HEAD
            };
            let taken = (wanted - self.filled).min(bytes.len());
            if let (Some(into), Some(from)) = (
                self.head.get_mut(self.filled..self.filled + taken),
                bytes.get(..taken),
            ) {
                into.copy_from_slice(from);
            }
            self.filled += taken;
            bytes = bytes.get(taken..).unwrap_or_default();
            let head = self.head;
            if (self.filled == FRAME_HEAD && !is_reset(&head)) || self.filled == RESET_FRAME {
                self.frame_begins(&head);
                self.filled = 0;
            }
        }
    }

    /// Acts on a frame's header (and, for a reset, its code): counts a `PROTOCOL_ERROR`
    /// reset, or passes over the frame's payload. How many of `head`'s bytes the frame's
    /// start took.
    fn frame_begins(&mut self, head: &[u8; RESET_FRAME]) -> usize {
        if is_reset(head) {
            if head[FRAME_HEAD..] == PROTOCOL_ERROR {
                self.malformed.inc();
            }
            RESET_FRAME
        } else {
            self.skip = frame_length(head);
            FRAME_HEAD
        }
    }
}

/// Whether a frame header is an `RST_STREAM`'s (its payload is its 4-byte code).
fn is_reset(head: &[u8; RESET_FRAME]) -> bool {
    head[3] == RST_STREAM && frame_length(head) == 4
}

/// The payload length a frame header gives.
fn frame_length(head: &[u8; RESET_FRAME]) -> usize {
    usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2])
}

impl Observer for ResetWatch {
    fn read(&mut self, _bytes: &[u8]) {}

    fn wrote(&mut self, written: &Written<'_>) {
        for chunk in written.chunks() {
            self.feed(chunk);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let length = payload.len().to_be_bytes();
        let mut frame = length[length.len() - 3..].to_vec();
        frame.extend_from_slice(&[kind, 0]);
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    /// What a watch counts of `bytes` written in pieces of `piece` bytes.
    fn counted(bytes: &[u8], piece: usize) -> u64 {
        let counter = IntCounter::new("t", "t").unwrap();
        let mut watch = ResetWatch::new(counter.clone());
        for chunk in bytes.chunks(piece) {
            watch.feed(chunk);
        }
        counter.get()
    }

    #[test]
    fn counts_protocol_error_resets_however_the_writes_cut_the_frames() {
        let mut session = frame(0x4, 0, &[0, 3, 0, 0, 0, 100]);
        session.extend(frame(RST_STREAM, 1, &PROTOCOL_ERROR));
        // A DATA frame whose payload looks like a reset, then a reset for another reason.
        session.extend(frame(0x0, 3, &frame(RST_STREAM, 1, &PROTOCOL_ERROR)));
        session.extend(frame(RST_STREAM, 5, &[0, 0, 0, 8]));
        session.extend(frame(0x1, 7, &[0x88]));
        session.extend(frame(RST_STREAM, 9, &PROTOCOL_ERROR));
        for piece in [1, 2, 5, 9, 13, 64, session.len()] {
            assert_eq!(
                counted(&session, piece),
                2,
                "written {piece} bytes at a time"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn counts_exactly_the_protocol_error_resets_of_any_session(
            frames in proptest::collection::vec(
                (0u8..10, proptest::collection::vec(proptest::num::u8::ANY, 0..40), 0u32..4),
                1..30,
            ),
            piece in 1usize..50,
        ) {
            let mut session = frame(0x4, 0, &[]);
            let mut resets = 0;
            for (kind, payload, code) in &frames {
                if *kind == RST_STREAM {
                    session.extend(frame(RST_STREAM, 1, &code.to_be_bytes()));
                    resets += u64::from(*code == 1);
                } else {
                    session.extend(frame(*kind, 1, payload));
                }
            }
            proptest::prop_assert_eq!(counted(&session, piece), resets);
        }
    }

    #[test]
    fn an_http1_session_is_not_read() {
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 13\r\n\r\n";
        let settings = frame(0x4, 0, &[]);
        for (writes, stops) in [
            (vec![&answer[..]], true),
            (vec![&[][..], &answer[..]], true),
            (vec![&[][..], &settings[..]], false),
        ] {
            let mut watch = ResetWatch::new(IntCounter::new("t", "t").unwrap());
            for write in &writes {
                watch.feed(write);
            }
            assert_eq!(
                watch.stopped, stops,
                "an empty write tells nothing; the first byte does: {writes:?}"
            );
        }
    }

    #[test]
    fn slices_of_a_vectored_write_are_read_up_to_what_it_took() {
        let counter = IntCounter::new("t", "t").unwrap();
        let mut watch = ResetWatch::new(counter.clone());
        let reset = frame(RST_STREAM, 1, &PROTOCOL_ERROR);
        let (start, rest) = reset.split_at(4);
        let slices = [std::io::IoSlice::new(start), std::io::IoSlice::new(rest)];
        watch.wrote(&Written::new(&slices, 10));
        assert_eq!(counter.get(), 0, "three bytes of the code not taken yet");
        watch.wrote(&Written::new(&[std::io::IoSlice::new(&reset[10..])], 3));
        assert_eq!(counter.get(), 1);
    }
}
