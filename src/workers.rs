//! The data plane's threads. With more than one worker, each is a thread running a
//! current-thread tokio runtime of its own, and every listener accepts on each of them: a
//! connection, the tasks of its HTTP/2 streams and its pooled backend connections stay on the
//! thread that accepted it. A multi-thread runtime would move tasks between cores (an
//! HTTP/2 stream's task is often stolen by the other worker), paying cross-thread wake-ups
//! and cache misses on every request; nginx and HAProxy keep a connection on one thread for
//! the same reason. The control plane (admin API, reloads, health checks) stays on the
//! runtime that started gatehouse.
//!
//! With one worker there is no thread: the runtime that started gatehouse serves the
//! connections too.

use std::cell::Cell;
use std::io;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

thread_local! {
    /// This thread's worker number; 0 on threads that are not workers.
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The worker the current thread is (0 when it is not one): picks the per-worker share of
/// state kept apart per thread, such as idle backend connections.
pub fn current() -> usize {
    WORKER.with(Cell::get)
}

/// How many workers `worker_threads` asks for: 0 means one per core.
pub fn count(worker_threads: usize) -> usize {
    if worker_threads > 0 {
        return worker_threads;
    }
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// The running workers: where listeners spawn their accept loops. Dropping it stops the
/// worker threads (their runtimes drop whatever tasks are left).
pub struct Workers {
    handles: Vec<Handle>,
    stop: CancellationToken,
}

impl Workers {
    /// Starts `count` workers; one worker is the current runtime itself (an error outside a
    /// tokio runtime).
    pub fn start(count: usize) -> io::Result<Self> {
        let stop = CancellationToken::new();
        if count <= 1 {
            return Ok(Workers {
                handles: vec![Handle::try_current().map_err(io::Error::other)?],
                stop,
            });
        }
        let mut handles = Vec::with_capacity(count);
        for worker in 0..count {
            match start_worker(worker, stop.clone()) {
                Ok(handle) => handles.push(handle),
                Err(error) => {
                    stop.cancel();
                    return Err(error);
                }
            }
        }
        Ok(Workers { handles, stop })
    }

    /// One runtime handle per worker.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }
}

/// Starts worker number `worker`: a thread that builds its runtime (a runtime may not be
/// dropped inside another one, so it is made and dropped on its own thread) and runs it
/// until `stop`. Returns the runtime's handle once it exists.
fn start_worker(worker: usize, stop: CancellationToken) -> io::Result<Handle> {
    let (built, handle) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(format!("worker-{worker}"))
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    let _ = built.send(Err(error));
                    return;
                }
            };
            WORKER.with(|current| current.set(worker));
            if built.send(Ok(runtime.handle().clone())).is_ok() {
                runtime.block_on(stop.cancelled());
            }
        })?;
    handle.recv().map_err(io::Error::other)?
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[tokio::test]
    async fn one_worker_is_the_current_runtime() {
        let workers = Workers::start(1).expect("workers");
        assert_eq!(workers.handles().len(), 1);
        let here = std::thread::current().id();
        let there = workers.handles()[0]
            .spawn(async { std::thread::current().id() })
            .await
            .expect("task");
        assert_eq!(here, there);
        assert_eq!(current(), 0);
    }

    #[tokio::test]
    async fn each_worker_runs_its_tasks_on_a_thread_of_its_own() {
        let workers = Workers::start(3).expect("workers");
        let mut threads = HashSet::new();
        let mut numbers = Vec::new();
        for handle in workers.handles() {
            let (thread, number) = handle
                .spawn(async {
                    tokio::task::yield_now().await;
                    (std::thread::current().id(), current())
                })
                .await
                .expect("task");
            threads.insert(thread);
            numbers.push(number);
        }
        assert_eq!(threads.len(), 3);
        assert!(!threads.contains(&std::thread::current().id()));
        assert_eq!(numbers, vec![0, 1, 2]);
    }

    #[test]
    fn zero_means_one_per_core() {
        assert!(count(0) >= 1);
        assert_eq!(count(3), 3);
    }
}
