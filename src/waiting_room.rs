//! The waiting room: client connections waiting for their client to speak, held without a
//! task, a tokio I/O registration or a buffer of their own.
//!
//! Thousands of connections may wait at once — opened and silent, or idle between keep-alive
//! requests. As a tokio task each would keep its task cell and future (≈ 1–2 KB), its I/O
//! registration (≈ 0.3 KB) and what it carries; nginx keeps ≈ 0.5 KiB per idle connection.
//! Here a waiting connection is one seat in its listener's room: its socket, its deadline and
//! a boxed [`Guest`] saying what happens next. The room watches the seats' sockets with an
//! epoll instance of its own (mio), itself watched by tokio; when a socket turns readable the
//! room gives it back to tokio and the guest spawns the task that serves it, and when the
//! deadline passes first the guest answers it late. Shutting the room (the listener's
//! shutdown) closes every seated connection.

use slab::Slab;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Readiness events taken from the room's epoll instance at a time.
const EVENTS: usize = 256;
/// Arrivals, events and deadlines handled in one poll of the room before it yields, so a
/// flood of them does not hold its worker thread.
const BATCH: usize = 1024;

/// What a seated connection does when it leaves the room. Dropped instead (the room closes),
/// its connection closes.
pub trait Guest: Send + 'static {
    /// The client sent bytes, closed or failed: serve the connection.
    fn spoke(self: Box<Self>, stream: TcpStream);
    /// The deadline passed with the client silent.
    fn late(self: Box<Self>, stream: TcpStream);
}

/// A connection on its way into the room.
struct Arrival {
    socket: std::net::TcpStream,
    deadline: Instant,
    guest: Box<dyn Guest>,
}

/// A connection in the room.
struct Seat {
    socket: std::net::TcpStream,
    /// Tells this seat's deadline from a deadline left behind by an earlier occupant (tickets
    /// wrap after 2³² arrivals, long after any deadline left behind has come up).
    ticket: u32,
    guest: Box<dyn Guest>,
}

/// Where a listener's connections wait; cloned into every connection that may wait.
#[derive(Clone, Debug)]
pub struct WaitingRoom {
    arrivals: mpsc::UnboundedSender<Arrival>,
}

impl WaitingRoom {
    /// Opens a room whose task runs on `tasks` until `shutdown`.
    pub fn open(shutdown: CancellationToken, tasks: &TaskTracker) -> io::Result<Self> {
        // The safe constructor is deprecated for fds whose owner may close them while
        // registered; this AsyncFd owns the Poll, so its fd lives exactly as long.
        #[allow(deprecated)]
        let poll = AsyncFd::with_interest(mio::Poll::new()?, Interest::READABLE)?;
        let (arrivals, queue) = mpsc::unbounded_channel();
        let room = Room {
            poll,
            events: mio::Events::with_capacity(EVENTS),
            seats: Slab::new(),
            deadlines: Deadlines::default(),
            tickets: 0,
            queue,
        };
        tasks.spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = room.run() => {}
            }
        });
        Ok(WaitingRoom { arrivals })
    }

    /// Seats `stream` until its client speaks or `deadline` passes; `guest` then takes it. A
    /// closed room (its listener shut down) drops both, closing the connection.
    pub fn seat(&self, stream: TcpStream, deadline: Instant, guest: Box<dyn Guest>) {
        let Ok(socket) = stream.into_std() else {
            return;
        };
        let _closed = self.arrivals.send(Arrival {
            socket,
            deadline,
            guest,
        });
    }
}

/// The room's own state, owned by its task.
struct Room {
    poll: AsyncFd<mio::Poll>,
    events: mio::Events,
    seats: Slab<Seat>,
    deadlines: Deadlines,
    tickets: u32,
    queue: mpsc::UnboundedReceiver<Arrival>,
}

/// Why a seat is left.
#[derive(Clone, Copy)]
enum Leaving {
    Spoke,
    Late,
}

impl Room {
    async fn run(mut self) {
        let mut timer = std::pin::pin!(tokio::time::sleep(Duration::from_secs(3600)));
        std::future::poll_fn(|cx| self.poll(cx, timer.as_mut())).await;
    }

    /// Seats arrivals, lets out the seats whose sockets turned readable and those whose
    /// deadline passed; ready only when the room can no longer work.
    fn poll(&mut self, cx: &mut Context<'_>, mut timer: Pin<&mut Sleep>) -> Poll<()> {
        let mut budget = BATCH;
        loop {
            let mut worked = false;
            while budget > 0 {
                match self.queue.poll_recv(cx) {
                    Poll::Ready(Some(arrival)) => self.admit(arrival),
                    Poll::Ready(None) => return Poll::Ready(()),
                    Poll::Pending => break,
                }
                budget -= 1;
                worked = true;
            }
            // Until epoll has nothing more: a readiness cleared is polled again, so the room's
            // task is woken by the next event.
            while let Poll::Ready(ready) = self.poll.poll_read_ready_mut(cx) {
                let Ok(mut ready) = ready else {
                    return Poll::Ready(());
                };
                match ready
                    .get_inner_mut()
                    .poll(&mut self.events, Some(Duration::ZERO))
                {
                    Ok(()) => {}
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                    Err(error) => {
                        tracing::error!(%error, "waiting room: epoll failed");
                        return Poll::Ready(());
                    }
                }
                if self.events.is_empty() {
                    ready.clear_ready();
                    continue;
                }
                drop(ready);
                let registry = self.poll.get_ref().registry();
                for event in self.events.iter() {
                    budget = budget.saturating_sub(1);
                    let Some(seat) = self.seats.try_remove(event.token().0) else {
                        continue;
                    };
                    // The commonest end of an idle connection: its client closes it. Closed
                    // here, it costs no task (its close also leaves the epoll instance).
                    let closed = event.is_read_closed() || event.is_error();
                    if closed && has_nothing_to_read(&seat.socket) {
                        continue;
                    }
                    release(registry, seat, Leaving::Spoke);
                }
                worked = true;
                break;
            }
            let now = Instant::now();
            while let Some((deadline, ticket, key)) = self.deadlines.earliest() {
                if deadline > now || budget == 0 {
                    break;
                }
                self.deadlines.pop();
                budget -= 1;
                worked = true;
                let key = key as usize;
                if self
                    .seats
                    .get(key)
                    .is_some_and(|seat| seat.ticket == ticket)
                {
                    let seat = self.seats.remove(key);
                    release(self.poll.get_ref().registry(), seat, Leaving::Late);
                }
            }
            let seats = &self.seats;
            self.deadlines.bound_stale(seats.len(), |key, ticket| {
                seats
                    .get(key as usize)
                    .is_some_and(|seat| seat.ticket == ticket)
            });
            if let Some((next, _, _)) = self.deadlines.earliest() {
                if timer.deadline() != next {
                    timer.as_mut().reset(next);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    worked = true;
                }
            }
            if !worked {
                return Poll::Pending;
            }
            if budget == 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
    }

    fn admit(&mut self, arrival: Arrival) {
        let Arrival {
            socket,
            deadline,
            guest,
        } = arrival;
        self.tickets = self.tickets.wrapping_add(1);
        let ticket = self.tickets;
        let entry = self.seats.vacant_entry();
        let key = entry.key();
        let Ok(short_key) = u32::try_from(key) else {
            return;
        };
        let registered = self.poll.get_ref().registry().register(
            &mut mio::unix::SourceFd(&socket.as_raw_fd()),
            mio::Token(key),
            mio::Interest::READABLE,
        );
        if let Err(error) = registered {
            tracing::warn!(%error, "waiting room: cannot watch a connection; closed");
            return;
        }
        entry.insert(Seat {
            socket,
            ticket,
            guest,
        });
        self.deadlines.push(deadline, ticket, short_key);
    }
}

/// Every seat's deadline, earliest first, with the seat's ticket and key. A seat that leaves
/// early leaves its entry behind (finding it in the heap would cost more than skipping it
/// when it comes up); the stale entries are dropped in bulk before they outnumber a quarter
/// of the seats, so a room whose connections come and go keeps the heap it needs for its
/// seats, not twice that — 24 bytes per waiting connection, which counts at 5,000 of them.
#[derive(Default)]
struct Deadlines {
    heap: BinaryHeap<Reverse<(Instant, u32, u32)>>,
}

impl Deadlines {
    /// Stale entries tolerated beyond a quarter of the seats.
    const SLACK: usize = 64;

    fn push(&mut self, deadline: Instant, ticket: u32, key: u32) {
        self.heap.push(Reverse((deadline, ticket, key)));
    }

    fn earliest(&self) -> Option<(Instant, u32, u32)> {
        self.heap.peek().map(|&Reverse(entry)| entry)
    }

    fn pop(&mut self) {
        self.heap.pop();
    }

    /// Drops the entries of seats already left once they are more than a quarter of the
    /// `seats` still taken (plus [`Self::SLACK`]); `is_current(key, ticket)` says whether an
    /// entry is a seated connection's. Amortised, each departure costs a few checks. After
    /// a surge has left, the heap gives back what it no longer needs.
    fn bound_stale(&mut self, seats: usize, is_current: impl Fn(u32, u32) -> bool) {
        if self.heap.len() <= seats + seats / 4 + Self::SLACK {
            return;
        }
        self.heap
            .retain(|&Reverse((_, ticket, key))| is_current(key, ticket));
        if self.heap.capacity() > 4 * self.heap.len() + 4 * Self::SLACK {
            self.heap.shrink_to(2 * self.heap.len() + Self::SLACK);
        }
    }
}

/// Whether a socket whose peer closed or failed holds no byte to serve: a request sent just
/// before the close (a half-closed client) is still served.
fn has_nothing_to_read(socket: &std::net::TcpStream) -> bool {
    !matches!(socket.peek(&mut [0u8; 1]), Ok(1..))
}

/// Gives a seat's connection back to tokio and to its guest.
fn release(registry: &mio::Registry, seat: Seat, leaving: Leaving) {
    let Seat { socket, guest, .. } = seat;
    let _ = registry.deregister(&mut mio::unix::SourceFd(&socket.as_raw_fd()));
    let stream = match TcpStream::from_std(socket) {
        Ok(stream) => stream,
        Err(error) => {
            tracing::warn!(%error, "waiting room: cannot hand a connection back; closed");
            return;
        }
    };
    match leaving {
        Leaving::Spoke => guest.spoke(stream),
        Leaving::Late => guest.late(stream),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Waits this long at most for something the room should do at once.
    const PATIENCE: Duration = Duration::from_secs(10);
    /// A deadline no test reaches.
    const FAR: Duration = Duration::from_secs(3600);

    type Left = (usize, &'static str, TcpStream);

    /// A guest that reports how it left.
    struct Probe {
        id: usize,
        left: mpsc::UnboundedSender<Left>,
    }

    impl Guest for Probe {
        fn spoke(self: Box<Self>, stream: TcpStream) {
            let _ = self.left.send((self.id, "spoke", stream));
        }
        fn late(self: Box<Self>, stream: TcpStream) {
            let _ = self.left.send((self.id, "late", stream));
        }
    }

    struct Setup {
        room: WaitingRoom,
        shutdown: CancellationToken,
        left: mpsc::UnboundedReceiver<Left>,
        report: mpsc::UnboundedSender<Left>,
        listener: TcpListener,
    }

    async fn setup() -> Setup {
        let shutdown = CancellationToken::new();
        let room = WaitingRoom::open(shutdown.clone(), &TaskTracker::new()).unwrap();
        let (report, left) = mpsc::unbounded_channel();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Setup {
            room,
            shutdown,
            left,
            report,
            listener,
        }
    }

    impl Setup {
        /// Connects a client and seats its server side as guest `id` until `wait` from now.
        async fn seat(&self, id: usize, wait: Duration) -> TcpStream {
            let client = TcpStream::connect(self.listener.local_addr().unwrap())
                .await
                .unwrap();
            let (server, _) = self.listener.accept().await.unwrap();
            let guest = Probe {
                id,
                left: self.report.clone(),
            };
            self.room
                .seat(server, Instant::now() + wait, Box::new(guest));
            client
        }

        async fn next(&mut self) -> (usize, &'static str, TcpStream) {
            tokio::time::timeout(PATIENCE, self.left.recv())
                .await
                .expect("the room let nobody out")
                .unwrap()
        }
    }

    #[tokio::test]
    async fn every_guest_leaves_when_its_client_speaks_whatever_the_order() {
        let mut room = setup().await;
        let mut clients = Vec::new();
        for id in 0..3 {
            clients.push(room.seat(id, FAR).await);
        }
        // Nothing else happens in the room between two of them: each is noticed by itself.
        for id in [2, 0, 1] {
            clients[id].write_all(b"GET").await.unwrap();
            let (left, how, mut stream) = room.next().await;
            assert_eq!((left, how), (id, "spoke"));
            let mut read = [0u8; 3];
            stream.read_exact(&mut read).await.unwrap();
            assert_eq!(&read, b"GET", "the bytes wait for the guest");
        }
    }

    #[tokio::test]
    async fn a_silent_guest_leaves_late_and_the_others_stay() {
        let mut room = setup().await;
        let _patient = room.seat(0, FAR).await;
        let mut silent = room.seat(1, Duration::from_millis(50)).await;
        let (left, how, mut stream) = room.next().await;
        assert_eq!((left, how), (1, "late"));
        stream.write_all(b"408").await.unwrap();
        let mut read = [0u8; 3];
        silent.read_exact(&mut read).await.unwrap();
        assert_eq!(
            &read, b"408",
            "the late guest gets its connection to answer on"
        );
        assert!(room.left.try_recv().is_err(), "the patient guest stays");
    }

    #[tokio::test]
    async fn a_deadline_left_behind_does_not_send_the_next_guest_out() {
        let mut room = setup().await;
        let mut first = room.seat(0, Duration::from_millis(100)).await;
        first.write_all(b"x").await.unwrap();
        assert_eq!(room.next().await.1, "spoke");
        // The next guest takes the seat the first one left.
        let _second = room.seat(1, FAR).await;
        let _third = room.seat(2, Duration::from_millis(200)).await;
        let (left, how, _) = room.next().await;
        assert_eq!(
            (left, how),
            (2, "late"),
            "the first guest's deadline passed before"
        );
        assert!(room.left.try_recv().is_err(), "the second guest stays");
    }

    #[tokio::test]
    async fn a_client_that_closes_leaves_without_its_guest_unless_it_sent_something_first() {
        let mut room = setup().await;
        let silent = room.seat(0, FAR).await;
        let mut last_words = room.seat(1, FAR).await;
        last_words.write_all(b"GET").await.unwrap();
        last_words.shutdown().await.unwrap();
        let (left, how, _) = room.next().await;
        assert_eq!(
            (left, how),
            (1, "spoke"),
            "a request sent before the close is served"
        );
        drop(silent);
        let _witness = room.seat(2, Duration::from_millis(100)).await;
        let (left, how, _) = room.next().await;
        assert_eq!(
            (left, how),
            (2, "late"),
            "the closed one was dropped, not let out"
        );
        assert!(room.left.try_recv().is_err());
    }

    #[tokio::test]
    async fn closing_the_room_closes_its_connections() {
        let mut room = setup().await;
        let mut client = room.seat(0, FAR).await;
        room.shutdown.cancel();
        let mut read = [0u8; 1];
        let closed = tokio::time::timeout(PATIENCE, client.read(&mut read))
            .await
            .expect("the connection stayed open");
        assert_eq!(closed.unwrap(), 0);
        assert!(room.left.try_recv().is_err(), "no guest was let out");
    }

    /// Connections that come and go — each leaving early, as a parked connection does when
    /// its client speaks — leave stale deadlines behind; they stay a bounded share of the
    /// heap, the seated ones are all kept in order, and a surge's heap is given back.
    #[test]
    fn stale_deadlines_stay_a_bounded_share_and_a_surge_is_given_back() {
        use std::collections::HashMap;
        let start = Instant::now();
        let mut deadlines = Deadlines::default();
        // key -> ticket of the seat that holds it now.
        let mut seated: HashMap<u32, u32> = HashMap::new();
        let mut ticket = 0;
        let mut seat = |deadlines: &mut Deadlines, seated: &mut HashMap<u32, u32>, key: u32| {
            ticket += 1;
            seated.insert(key, ticket);
            deadlines.push(
                start + Duration::from_millis(u64::from(ticket)),
                ticket,
                key,
            );
        };
        let seats = 5_000;
        for key in 0..seats {
            seat(&mut deadlines, &mut seated, key);
        }
        let full = deadlines.heap.capacity();
        for round in 0..3 * seats {
            let key = round % seats;
            seated.remove(&key);
            seat(&mut deadlines, &mut seated, key);
            deadlines.bound_stale(seated.len(), |key, ticket| {
                seated.get(&key) == Some(&ticket)
            });
            assert!(deadlines.heap.len() <= seated.len() + seated.len() / 4 + Deadlines::SLACK);
        }
        assert_eq!(deadlines.heap.capacity(), full, "the heap did not grow");

        // The surge leaves: all but ten seats empty.
        seated.retain(|&key, _| key < 10);
        deadlines.bound_stale(seated.len(), |key, ticket| {
            seated.get(&key) == Some(&ticket)
        });
        assert!(
            deadlines.heap.capacity() < full / 16,
            "{}",
            deadlines.heap.capacity()
        );
        let mut order = Vec::new();
        while let Some((deadline, ticket, key)) = deadlines.earliest() {
            deadlines.pop();
            assert_eq!(seated.get(&key), Some(&ticket));
            order.push(deadline);
        }
        assert_eq!(order.len(), 10);
        assert!(order.windows(2).all(|pair| pair[0] <= pair[1]));
    }
}
