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
//! Which thread accepts a connection is up to the kernel: whichever thread's
//! runtime woke first. Left there, a burst of connections can land mostly on
//! one thread while the other idles, and keep-alive connections stay where
//! they landed. So every accepted connection is placed by [`Load`]: on the
//! serving thread with the fewest open connections (over every listener),
//! handed to it if that is another thread.
//!
//! The thread that calls [`crate::run`] is serving thread 0: its runtime also
//! runs the background tasks (flusher, enforcement, notifications). The
//! others are started by [`Workers::start`] and stopped last, after the final
//! flush: database connections a serving thread opened run on its runtime.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::telemetry::SERVING_CONNECTIONS;

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

/// Open connections per serving thread, over every listener (also the gauge
/// `tollgate_serving_thread_connections{thread}`).
#[derive(Clone)]
pub struct Load(Arc<[Thread]>);

struct Thread {
    open: AtomicUsize,
    gauge: metrics::Gauge,
}

impl Load {
    pub fn new(threads: usize) -> Load {
        Load(
            (0..threads.max(1))
                .map(|t| Thread {
                    open: AtomicUsize::new(0),
                    gauge: metrics::gauge!(SERVING_CONNECTIONS, "thread" => t.to_string()),
                })
                .collect(),
        )
    }

    /// Where a connection accepted on thread `here` is served: the thread
    /// with the fewest open connections, unless `here` has at most one more
    /// (a handoff costs more than that imbalance). It counts there until the
    /// returned place is dropped. Two threads placing at the same instant
    /// may both pick the same one: the next connections even it out.
    pub fn place(&self, here: usize) -> Place {
        let least = (0..self.0.len())
            .min_by_key(|&t| self.open(t))
            .unwrap_or(here);
        let thread = match self.open(here) > self.open(least) + 1 {
            true => least,
            false => here,
        };
        self.0[thread].open.fetch_add(1, Ordering::Relaxed);
        self.0[thread].gauge.increment(1.0);
        Place {
            load: self.clone(),
            thread,
        }
    }

    /// Open connections on `thread`.
    pub fn open(&self, thread: usize) -> usize {
        self.0[thread].open.load(Ordering::Relaxed)
    }
}

/// A connection's place on a serving thread, counted there while it lives.
pub struct Place {
    load: Load,
    thread: usize,
}

impl Place {
    pub fn thread(&self) -> usize {
        self.thread
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let thread = &self.load.0[self.thread];
        thread.open.fetch_sub(1, Ordering::Relaxed);
        thread.gauge.decrement(1.0);
    }
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

    #[test]
    fn connections_go_to_the_least_loaded_thread_unless_it_is_within_one() {
        let load = Load::new(3);
        // Every connection accepted on thread 0: it takes one while it has
        // at most one more than the least loaded, else the least loaded does.
        let places: Vec<Place> = (0..9).map(|_| load.place(0)).collect();
        assert_eq!((load.open(0), load.open(1), load.open(2)), (4, 3, 2));
        let threads: Vec<usize> = places.iter().map(Place::thread).collect();
        assert_eq!(threads, vec![0, 0, 1, 2, 0, 1, 2, 0, 1]);
        // Connections that end free their place; the next goes where room is.
        drop(places);
        assert_eq!((load.open(0), load.open(1), load.open(2)), (0, 0, 0));
        let kept = [load.place(2), load.place(2), load.place(1)];
        assert_eq!(load.place(2).thread(), 0);
        assert_eq!(
            kept.iter().map(Place::thread).collect::<Vec<_>>(),
            [2, 2, 1]
        );
    }
}
