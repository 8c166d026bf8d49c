//! Relays bytes both ways between two streams (TCP tunnels and upgraded HTTP connections),
//! with half-close carried through, holding a buffer only while bytes are on their way.
//!
//! tokio's `copy_bidirectional` keeps two buffers for a connection's whole life: 128 KiB per
//! TCP tunnel, resident once the tunnel has moved that much, although most tunnels sit idle
//! most of the time. Here a direction takes a buffer from its worker's spares when it reads,
//! and gives it back as soon as it has written everything out and the next read finds
//! nothing: an idle tunnel holds no buffer. A direction whose writer does not take its bytes
//! keeps its buffer until it does (or the tunnel is cut off).

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Buffers kept for reuse per worker thread (so at most this many times a buffer's size).
const SPARES: usize = 16;

thread_local! {
    /// This worker's spare buffers: directions of different tunnels take turns with them.
    static SPARE: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of `size` bytes: a spare one if this worker has one, else a new one.
fn take(size: usize) -> Box<[u8]> {
    SPARE
        .with_borrow_mut(|spare| {
            let position = spare.iter().rposition(|buffer| buffer.len() == size)?;
            Some(spare.swap_remove(position))
        })
        .unwrap_or_else(|| vec![0; size].into_boxed_slice())
}

/// Keeps `buffer` for the next direction that reads, unless this worker has enough.
fn give_back(buffer: Box<[u8]>) {
    SPARE.with_borrow_mut(|spare| {
        if spare.len() < SPARES {
            spare.push(buffer);
        }
    });
}

/// One direction of a relay.
struct Pipe {
    size: usize,
    /// Bytes read and not yet written are `buffer[start..end]`; `None` while idle.
    buffer: Option<Box<[u8]>>,
    start: usize,
    end: usize,
    /// The reader ended (EOF): once written out, the writer is shut down.
    read_done: bool,
    /// Written since the last flush (a TLS writer may hold bytes until flushed).
    need_flush: bool,
    /// Everything relayed and the writer shut down: nothing more to do this way.
    done: bool,
}

impl Pipe {
    fn new(size: usize) -> Self {
        Pipe {
            size,
            buffer: None,
            start: 0,
            end: 0,
            read_done: false,
            need_flush: false,
            done: false,
        }
    }

    /// Moves bytes from `reader` to `writer` until the reader ends and the writer is shut
    /// down (ready), an error, or nothing can move now (pending).
    fn poll_relay<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.start == self.end && !self.read_done {
                let buffer = self.buffer.get_or_insert_with(|| take(self.size));
                let mut read = ReadBuf::new(buffer);
                match reader.as_mut().poll_read(cx, &mut read) {
                    Poll::Ready(Ok(())) => {
                        self.start = 0;
                        self.end = read.filled().len();
                        self.read_done = self.end == 0;
                    }
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                    Poll::Pending => {
                        // Quiet this way: nothing held until bytes come again.
                        if let Some(buffer) = self.buffer.take() {
                            give_back(buffer);
                        }
                        if self.need_flush {
                            ready!(writer.as_mut().poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            if let Some(buffer) = &self.buffer {
                while self.start < self.end {
                    let written = ready!(writer
                        .as_mut()
                        .poll_write(cx, &buffer[self.start..self.end]))?;
                    if written == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    self.start += written;
                    self.need_flush = true;
                }
            }
            if self.read_done {
                if let Some(buffer) = self.buffer.take() {
                    give_back(buffer);
                }
                ready!(writer.as_mut().poll_shutdown(cx))?;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Relays between `a` and `b` until both directions have ended (each side's EOF passed on as
/// a shutdown of the other's write half), or the first error.
pub fn relay<'a, A, B>(
    a: &'a mut A,
    b: &'a mut B,
    size: usize,
) -> impl Future<Output = io::Result<()>> + 'a
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a_to_b = Pipe::new(size);
    let mut b_to_a = Pipe::new(size);
    // Which direction goes first alternates, so one that always has bytes cannot spend the
    // task's whole budget every time while the other waits.
    let mut a_first = false;
    std::future::poll_fn(move |cx| {
        let mut pending = false;
        a_first = !a_first;
        for forward in [a_first, !a_first] {
            let pipe = if forward { &mut a_to_b } else { &mut b_to_a };
            if pipe.done {
                continue;
            }
            let relayed = if forward {
                pipe.poll_relay(cx, Pin::new(&mut *a), Pin::new(&mut *b))
            } else {
                pipe.poll_relay(cx, Pin::new(&mut *b), Pin::new(&mut *a))
            };
            match relayed {
                Poll::Ready(Ok(())) => pipe.done = true,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => pending = true,
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(Ok(()))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Both ways, with each EOF passed on: what one end writes the other reads, then ends.
    #[tokio::test]
    async fn bytes_and_half_closes_go_both_ways() {
        let (mut client, mut client_side) = tokio::io::duplex(1024);
        let (mut backend_side, mut backend) = tokio::io::duplex(1024);
        let relaying =
            tokio::spawn(async move { relay(&mut client_side, &mut backend_side, 4096).await });
        let request: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let sent = request.clone();
        let sending = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.unwrap();
            answer
        });
        let mut received = Vec::new();
        backend.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, request, "the client's bytes, then its EOF");
        backend
            .write_all(b"answer after the client's EOF")
            .await
            .unwrap();
        backend.shutdown().await.unwrap();
        assert_eq!(sending.await.unwrap(), b"answer after the client's EOF");
        relaying.await.unwrap().unwrap();
    }

    /// One direction with bytes at every poll (an endless source into an endless sink) must
    /// leave the other its turn: the message the other way still arrives.
    #[tokio::test]
    async fn a_direction_that_always_has_bytes_does_not_starve_the_other() {
        let (mut sender, other_reader) = tokio::io::duplex(1024);
        let (other_writer, mut receiver) = tokio::io::duplex(1024);
        let mut a = tokio::io::join(tokio::io::repeat(1), other_writer);
        let mut b = tokio::io::join(other_reader, tokio::io::sink());
        let relaying = relay(&mut a, &mut b, 4096);
        sender.write_all(b"hello").await.unwrap();
        let mut hello = [0u8; 5];
        let received = async {
            receiver.read_exact(&mut hello).await.unwrap();
        };
        tokio::select! {
            _ = relaying => panic!("the relay ended"),
            () = received => {}
            () = tokio::time::sleep(std::time::Duration::from_secs(10)) => panic!("starved"),
        }
        assert_eq!(&hello, b"hello");
    }

    /// A worker keeps at most `SPARES` buffers however many directions give theirs back at
    /// once (a burst of tunnels going quiet), and hands them out again before making new ones.
    #[test]
    fn a_worker_keeps_at_most_its_spares() {
        let size = 4_321;
        let spares = || SPARE.with_borrow(|spare| spare.iter().filter(|b| b.len() == size).count());
        let held: Vec<_> = (0..SPARES + 5).map(|_| take(size)).collect();
        assert_eq!(spares(), 0);
        for buffer in held {
            give_back(buffer);
        }
        assert_eq!(spares(), SPARES, "the rest were freed");
        let taken = take(size);
        assert_eq!(taken.len(), size);
        assert_eq!(spares(), SPARES - 1, "a spare was handed out");
        assert_eq!(
            take(size / 2).len(),
            size / 2,
            "a size with no spare is made new"
        );
        assert_eq!(spares(), SPARES - 1);
    }

    /// A direction holds a buffer only while its bytes wait for the writer: once written
    /// out and the reader has nothing more, the buffer is back with the worker's spares.
    #[tokio::test]
    async fn a_direction_holds_a_buffer_only_while_bytes_wait() {
        let size = 12_345;
        let spares = || SPARE.with_borrow(|spare| spare.iter().filter(|b| b.len() == size).count());
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let (mut source, mut reader) = tokio::io::duplex(64 * 1024);
        let (mut writer, mut sink) = tokio::io::duplex(64);
        let mut pipe = Pipe::new(size);

        source.write_all(&[7u8; 100]).await.unwrap();
        let relayed = pipe.poll_relay(&mut cx, Pin::new(&mut reader), Pin::new(&mut writer));
        assert!(relayed.is_pending(), "the writer takes 64 of the 100 bytes");
        assert!(pipe.buffer.is_some(), "36 bytes wait in the buffer");
        assert_eq!(spares(), 0);

        let mut taken = [0u8; 100];
        sink.read_exact(&mut taken[..64]).await.unwrap();
        let relayed = pipe.poll_relay(&mut cx, Pin::new(&mut reader), Pin::new(&mut writer));
        assert!(relayed.is_pending(), "nothing more to read");
        assert!(pipe.buffer.is_none(), "quiet: no buffer held");
        assert_eq!(spares(), 1, "the buffer is spare for the next reader");
        sink.read_exact(&mut taken[64..]).await.unwrap();
        assert_eq!(taken, [7u8; 100]);
    }
}
