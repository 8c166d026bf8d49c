//! A client that stops taking its responses (`limits.send_timeout`).
//!
//! Responses stream: a client that stops reading holds its response's backend connection —
//! and the backend's worker writing it — for as long as it likes ("slow read"). nginx bounds
//! that with `send_timeout`, HAProxy with `timeout client`; gatehouse closes a client
//! connection that accepted no byte of a response for `limits.send_timeout`.
//!
//! gatehouse's own HTTP/1 loop times its blocked writes itself (`h1`). Under a hyper session
//! the writes are hyper's, so the response bodies report instead: a body that gave its writer
//! bytes waits on the client until the writer takes it up again — hyper does so only once
//! the bytes went out (HTTP/1) or the stream's HTTP/2 window has room. [`ClientProgress`]
//! counts the bodies waiting and how often one was taken up; [`StallCheck`], run by the
//! session's periodic check, finds the client stalled when bodies waited a whole
//! `send_timeout` and none was taken up. The counts are the connection's: an HTTP/2 client
//! that keeps one stream's window shut while others move is not caught by it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Response bodies waiting on the client of one connection, and how often one was taken up
/// again. Updated by the bodies (on the connection's worker), read by its periodic check.
#[derive(Debug, Default)]
pub struct ClientProgress {
    waiting: AtomicU64,
    taken_up: AtomicU64,
    /// The check found the client stalled: the bodies dropped with its connection say why.
    stalled: AtomicBool,
}

impl ClientProgress {
    /// (bodies waiting, times one was taken up)
    fn read(&self) -> (u64, u64) {
        (
            self.waiting.load(Ordering::Relaxed),
            self.taken_up.load(Ordering::Relaxed),
        )
    }
}

/// A response body's part in its connection's [`ClientProgress`]: waiting from when it is
/// handed over, and again each time it gives its writer bytes.
#[derive(Debug)]
pub struct BodyWatch {
    progress: Arc<ClientProgress>,
    waiting: bool,
}

impl BodyWatch {
    /// A body handed to its writer now: it waits until first taken up.
    pub fn new(progress: Arc<ClientProgress>) -> Self {
        progress.waiting.fetch_add(1, Ordering::Relaxed);
        BodyWatch {
            progress,
            waiting: true,
        }
    }

    /// The writer polls the body: whatever it was given before went out.
    pub fn taken_up(&mut self) {
        if self.waiting {
            self.waiting = false;
            self.progress.waiting.fetch_sub(1, Ordering::Relaxed);
            self.progress.taken_up.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The body gave its writer bytes: it waits until the writer comes back for more.
    pub fn gave(&mut self) {
        if !self.waiting {
            self.waiting = true;
            self.progress.waiting.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl BodyWatch {
    /// Whether the connection is being closed because its client stalled.
    pub fn client_stalled(&self) -> bool {
        self.progress.stalled.load(Ordering::Relaxed)
    }
}

impl Drop for BodyWatch {
    fn drop(&mut self) {
        if self.waiting {
            self.progress.waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A session's view of its client's progress, looked at by its periodic check.
#[derive(Debug)]
pub struct StallCheck {
    progress: Arc<ClientProgress>,
    taken_up: u64,
    /// Since when bodies have waited with none taken up (to within a check period).
    since: Instant,
}

impl StallCheck {
    /// Starts watching `progress` now.
    pub fn new(progress: Arc<ClientProgress>) -> Self {
        StallCheck {
            taken_up: progress.read().1,
            progress,
            since: Instant::now(),
        }
    }

    /// Whether bodies have waited on the client for `limit` with none taken up; if so, the
    /// bodies are told (their access-log lines say why they were cut off).
    pub fn stalled(&mut self, now: Instant, limit: Duration) -> bool {
        let (waiting, taken_up) = self.progress.read();
        if waiting == 0 || taken_up != self.taken_up {
            self.taken_up = taken_up;
            self.since = now;
            return false;
        }
        let stalled = now >= self.since + limit;
        if stalled {
            self.progress.stalled.store(true, Ordering::Relaxed);
        }
        stalled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_waits_from_its_handover_and_after_each_gift_until_taken_up() {
        let progress = Arc::new(ClientProgress::default());
        let mut body = BodyWatch::new(progress.clone());
        assert_eq!(progress.read(), (1, 0));
        body.taken_up();
        body.taken_up();
        assert_eq!(progress.read(), (0, 1));
        body.gave();
        body.gave();
        assert_eq!(progress.read(), (1, 1));
        drop(body);
        assert_eq!(progress.read(), (0, 1));
        drop(BodyWatch::new(progress.clone()));
        assert_eq!(
            progress.read(),
            (0, 1),
            "a dropped waiting body waits no more"
        );
    }

    #[test]
    fn a_client_is_stalled_only_after_a_whole_limit_of_waiting_without_progress() {
        let limit = Duration::from_secs(60);
        let progress = Arc::new(ClientProgress::default());
        let mut check = StallCheck::new(progress.clone());
        let start = Instant::now();
        assert!(!check.stalled(start + limit * 2, limit), "nothing waits");
        let mut body = BodyWatch::new(progress.clone());
        let later = start + limit * 2;
        assert!(!check.stalled(later, limit), "waiting begins");
        assert!(!check.stalled(later + limit / 2, limit));
        body.taken_up();
        body.gave();
        assert!(
            !check.stalled(later + limit, limit),
            "taken up in between: the wait starts again"
        );
        assert!(!check.stalled(later + limit * 2 - Duration::from_millis(1), limit));
        assert!(check.stalled(later + limit * 2, limit));
        drop(body);
        assert!(!check.stalled(later + limit * 3, limit));
    }
}
