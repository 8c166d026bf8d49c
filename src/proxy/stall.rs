//! A client that stops taking its responses (`limits.send_timeout`).
//!
//! Responses stream: a client that stops reading holds its response's backend connection —
//! and the backend's worker writing it — for as long as it likes ("slow read"). nginx bounds
//! that with `send_timeout`, HAProxy with `timeout client`; gatehouse closes a client
//! connection that accepted no byte of a response for `limits.send_timeout`.
//!
//! gatehouse's own HTTP/1 loop times its blocked writes itself (`h1`). Under a hyper session
//! the writes are hyper's, so the response bodies report instead: a body that gave its writer
//! bytes waits on the client until the writer takes it up again — hyper does so once the
//! bytes went out (HTTP/1) or the stream's HTTP/2 window has room. [`ClientProgress`] keeps
//! how many bodies wait and the sum of the times they began to; [`StallCheck`], run by the
//! session's periodic check, finds the client stalled when the bodies' mean wait reached
//! `send_timeout` — then the longest wait did too, so no response is cut off early, and an
//! HTTP/2 client that keeps one stream's window shut while others move is still caught (the
//! others wait briefly, if at all, and only delay the verdict).
//!
//! The times are the check's: each check stamps the time, and a body that begins to wait
//! takes the last stamp (no clock read per body). A stamp is at most one check period old,
//! so a wait is counted as at most one period longer than it is, and the verdict needs the
//! mean to reach `send_timeout` plus one period.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Response bodies waiting on the client of one connection. Updated by the bodies and read
/// by the session's check, all on the connection's worker thread.
#[derive(Debug)]
pub struct ClientProgress {
    /// Where the stamps count from: the session's start.
    start: Instant,
    /// Milliseconds from `start` to the check's last run.
    stamp: AtomicU64,
    waiting: AtomicU64,
    /// The sum of the waiting bodies' stamps.
    waiting_since: AtomicU64,
    /// The check found the client stalled: the bodies dropped with its connection say why.
    stalled: AtomicBool,
}

impl ClientProgress {
    /// A session's, starting now.
    pub fn starting_now() -> Self {
        ClientProgress {
            start: Instant::now(),
            stamp: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            waiting_since: AtomicU64::new(0),
            stalled: AtomicBool::new(false),
        }
    }

    fn begin_wait(&self) -> u64 {
        let since = self.stamp.load(Ordering::Relaxed);
        self.waiting.fetch_add(1, Ordering::Relaxed);
        self.waiting_since.fetch_add(since, Ordering::Relaxed);
        since
    }

    fn end_wait(&self, since: u64) {
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        self.waiting_since.fetch_sub(since, Ordering::Relaxed);
    }
}

/// A response body's part in its connection's [`ClientProgress`]: waiting from when it is
/// handed over, and again each time it gives its writer bytes.
#[derive(Debug)]
pub struct BodyWatch {
    progress: Arc<ClientProgress>,
    /// The stamp its wait began at, while it waits.
    since: Option<u64>,
}

impl BodyWatch {
    /// A body handed to its writer now: it waits until first taken up.
    pub fn new(progress: Arc<ClientProgress>) -> Self {
        let since = Some(progress.begin_wait());
        BodyWatch { progress, since }
    }

    /// The writer polls the body: whatever it was given before went out.
    pub fn taken_up(&mut self) {
        if let Some(since) = self.since.take() {
            self.progress.end_wait(since);
        }
    }

    /// The body gave its writer bytes: it waits until the writer comes back for more.
    pub fn gave(&mut self) {
        if self.since.is_none() {
            self.since = Some(self.progress.begin_wait());
        }
    }

    /// Whether the connection is being closed because its client stalled.
    pub fn client_stalled(&self) -> bool {
        self.progress.stalled.load(Ordering::Relaxed)
    }
}

impl Drop for BodyWatch {
    fn drop(&mut self) {
        self.taken_up();
    }
}

/// A session's periodic look at its client's progress.
#[derive(Debug)]
pub struct StallCheck {
    progress: Arc<ClientProgress>,
}

impl StallCheck {
    /// Watches `progress`.
    pub fn new(progress: Arc<ClientProgress>) -> Self {
        StallCheck { progress }
    }

    /// Stamps `now` and says whether the waiting bodies have waited `limit` on average, for
    /// a check that runs every `period`; if so, the bodies are told (their access-log lines
    /// say why they were cut off).
    pub fn stalled(&mut self, now: Instant, limit: Duration, period: Duration) -> bool {
        let progress = &self.progress;
        let stamp = millis(now.saturating_duration_since(progress.start));
        progress.stamp.store(stamp, Ordering::Relaxed);
        let waiting = progress.waiting.load(Ordering::Relaxed);
        if waiting == 0 {
            return false;
        }
        let mean_since = progress.waiting_since.load(Ordering::Relaxed) / waiting;
        let stalled = stamp.saturating_sub(mean_since) >= millis(limit + period);
        if stalled {
            progress.stalled.store(true, Ordering::Relaxed);
        }
        stalled
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(60);
    const PERIOD: Duration = Duration::from_secs(10);

    fn waiting(progress: &ClientProgress) -> u64 {
        progress.waiting.load(Ordering::Relaxed)
    }

    #[test]
    fn a_body_waits_from_its_handover_and_after_each_gift_until_taken_up() {
        let progress = Arc::new(ClientProgress::starting_now());
        let mut body = BodyWatch::new(progress.clone());
        assert_eq!(waiting(&progress), 1);
        body.taken_up();
        body.taken_up();
        assert_eq!(waiting(&progress), 0);
        body.gave();
        body.gave();
        assert_eq!(waiting(&progress), 1);
        drop(body);
        assert_eq!(waiting(&progress), 0);
        drop(BodyWatch::new(progress.clone()));
        assert_eq!(
            waiting(&progress),
            0,
            "a dropped waiting body waits no more"
        );
        assert_eq!(progress.waiting_since.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_client_is_stalled_only_once_a_body_waited_the_whole_limit() {
        let progress = Arc::new(ClientProgress::starting_now());
        let mut check = StallCheck::new(progress.clone());
        let start = progress.start;
        assert!(
            !check.stalled(start + LIMIT * 2, LIMIT, PERIOD),
            "nothing waits"
        );
        let mut body = BodyWatch::new(progress.clone());
        let began = start + LIMIT * 2;
        assert!(!check.stalled(began + LIMIT, LIMIT, PERIOD));
        // Taken up and waiting again since the last check: the wait starts again there.
        body.taken_up();
        body.gave();
        let again = began + LIMIT;
        assert!(!check.stalled(again + LIMIT, LIMIT, PERIOD));
        assert!(!check.stalled(
            again + LIMIT + PERIOD - Duration::from_millis(1),
            LIMIT,
            PERIOD
        ));
        assert!(check.stalled(again + LIMIT + PERIOD, LIMIT, PERIOD));
        assert!(body.client_stalled());
        drop(body);
        assert!(!check.stalled(began + LIMIT * 4, LIMIT, PERIOD));
    }

    #[test]
    fn one_stalled_stream_is_caught_while_others_move() {
        let progress = Arc::new(ClientProgress::starting_now());
        let mut check = StallCheck::new(progress.clone());
        let start = progress.start;
        let _stalled = BodyWatch::new(progress.clone());
        let mut moving = BodyWatch::new(progress.clone());
        let mut now = start;
        let mut caught = None;
        // Every check, the other stream was taken up and gave again since the last one.
        while now < start + LIMIT * 4 {
            now += PERIOD;
            moving.taken_up();
            moving.gave();
            if check.stalled(now, LIMIT, PERIOD) {
                caught = Some(now - start);
                break;
            }
        }
        let caught = caught.expect("the shut stream was never caught");
        assert!(caught >= LIMIT, "caught after {caught:?}");
    }
}
