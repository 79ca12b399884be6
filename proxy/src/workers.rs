//! Serving threads: one per core, each with a single-threaded runtime of its
//! own that accepts from the listeners and runs the connections it accepted,
//! with their exchanges, bodies and relays, start to finish (nginx's worker
//! processes, as threads sharing the directory, the meter and the gates).
//!
//! A work-stealing runtime moves tasks between threads: every exchange wakes
//! tasks across cores and the one I/O driver is handed from thread to thread,
//! which on a small machine cost more than the second core gave (two workers
//! served fewer requests per second than one). Here a connection never leaves
//! the thread that accepted it, and the upstream connections it uses come
//! from that thread's share of the pool (`upstream::Pool`).
//!
//! The thread that calls [`crate::run`] is serving thread 0: its runtime also
//! runs the background tasks (flusher, enforcement, notifications). The
//! others are started by [`Workers::start`] and stopped last, after the final
//! flush: database connections a serving thread opened run on its runtime.

use std::cell::Cell;
use std::future::Future;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The serving thread this code runs on (0: the caller's).
pub fn current() -> usize {
    INDEX.with(Cell::get)
}

/// Serving threads for this process: `TOKIO_WORKER_THREADS` when set, else
/// one per core.
pub fn configured() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1)
}

/// The serving threads beyond the caller's.
pub struct Workers {
    handles: Vec<Handle>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stop: CancellationToken,
}

impl Workers {
    /// Start `count - 1` threads (the caller's is the first of `count`).
    pub fn start(count: usize) -> std::io::Result<Workers> {
        let stop = CancellationToken::new();
        let mut workers = Workers {
            handles: Vec::new(),
            threads: Vec::new(),
            stop: stop.clone(),
        };
        for index in 1..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            workers.handles.push(runtime.handle().clone());
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("tollgate-serve-{index}"))
                .spawn(move || {
                    INDEX.with(|i| i.set(index));
                    // Its tasks run while this waits: until every connection
                    // it served has drained and the proxy says stop.
                    runtime.block_on(stop.cancelled());
                })?;
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    /// How many serving threads there are, the caller's included.
    pub fn count(&self) -> usize {
        self.handles.len() + 1
    }

    /// Run `make(index)` on every serving thread, the caller's first (index 0);
    /// `make` itself runs here, once per thread, in that order.
    pub fn on_each<F, Fut>(&self, mut make: F) -> Vec<tokio::task::JoinHandle<Fut::Output>>
    where
        F: FnMut(usize) -> Fut,
        Fut: Future + Send + 'static,
        Fut::Output: Send + 'static,
    {
        let mut tasks = vec![tokio::spawn(make(0))];
        for (i, handle) in self.handles.iter().enumerate() {
            tasks.push(handle.spawn(make(i + 1)));
        }
        tasks
    }

    /// Stop the threads, once nothing they run is left: after the drain, and
    /// after the last use of database connections they may have opened.
    pub async fn stop(mut self) {
        self.stop.cancel();
        let threads = std::mem::take(&mut self.threads);
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

impl Drop for Workers {
    /// A proxy that fails to start leaves no thread behind.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_thread_runs_its_own_share_and_knows_its_index() {
        let workers = Workers::start(3).unwrap();
        assert_eq!(workers.count(), 3);
        let tasks = workers.on_each(|i| async move {
            // Spawned from the task: stays on the same thread.
            let inner = tokio::spawn(async { (current(), std::thread::current().id()) });
            let (spawned_on, spawned_thread) = inner.await.unwrap();
            (
                i,
                current(),
                spawned_on,
                std::thread::current().id() == spawned_thread,
            )
        });
        let mut seen = Vec::new();
        for task in tasks {
            seen.push(task.await.unwrap());
        }
        assert_eq!(
            seen,
            vec![(0, 0, 0, true), (1, 1, 1, true), (2, 2, 2, true)]
        );
        workers.stop().await;
    }
}
