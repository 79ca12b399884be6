//! A one-way signal that the request path reads for free: the proxy's
//! shutdown, an agent's credential revoked.
//!
//! A `CancellationToken` takes its mutex on every `is_cancelled` and on every
//! poll of its `cancelled()` future (tokio#7775). A token every connection
//! watches (shutdown), or every request of an agent reads (its revocation), had
//! that mutex taken five to seven times per request, from every serving thread.
//! A [`Signal`] is read with one atomic load. A task that waits for it again
//! and again (a connection between its requests) registers once, with a
//! [`Watch`], and every later look is that load and a waker comparison.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

use tokio::sync::futures::Notified;
use tokio::sync::Notify;

/// Raised once, for good; read without a lock; awaited by any number of tasks.
#[derive(Debug, Default)]
pub struct Signal {
    raised: AtomicBool,
    notify: Notify,
}

impl Signal {
    pub fn new() -> Self {
        Self::default()
    }

    /// Raise it and wake every task waiting for it. `true` the first time.
    pub fn raise(&self) -> bool {
        let first = !self.raised.swap(true, Ordering::SeqCst);
        if first {
            self.notify.notify_waiters();
        }
        first
    }

    /// Whether it has been raised.
    #[inline]
    pub fn is_raised(&self) -> bool {
        self.raised.load(Ordering::SeqCst)
    }

    /// Resolves once it is raised.
    pub async fn raised(&self) {
        // A `Notified` hears every `notify_waiters` from its creation on, so a
        // raise between the look and the wait is not missed.
        let notified = self.notify.notified();
        if self.is_raised() {
            return;
        }
        notified.await;
    }

    /// Waiting for it from a task that looks again and again: see [`Watch`].
    pub fn watch(&self) -> Watch<'_> {
        Watch {
            signal: self,
            notified: self.notify.notified(),
            waker: None,
        }
    }
}

pin_project_lite::pin_project! {
    /// A wait for a [`Signal`] that lives as long as the task making it and is
    /// polled every time the task looks (in a `select!` per request, say). Its
    /// first poll registers the task's waker; a later poll by the same task is
    /// an atomic load and a waker comparison, and only a poll with another
    /// waker registers again. The signal's raise wakes the registered waker,
    /// and the poll that follows sees it raised.
    pub struct Watch<'a> {
        signal: &'a Signal,
        #[pin]
        notified: Notified<'a>,
        waker: Option<Waker>,
    }
}

impl Future for Watch<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.signal.is_raised() {
            return Poll::Ready(());
        }
        if this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return Poll::Pending;
        }
        // First look, or another task's: (re)register. `notified` heard any
        // raise since the watch was made.
        if this.notified.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        *this.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn it_is_raised_once_and_stays_raised() {
        let signal = Signal::new();
        assert!(!signal.is_raised());
        assert!(signal.raise());
        assert!(!signal.raise());
        assert!(signal.is_raised());
    }

    #[tokio::test]
    async fn a_waiting_task_wakes_on_the_raise_and_a_late_one_does_not_wait() {
        let signal = Arc::new(Signal::new());
        let waiting = tokio::spawn({
            let signal = signal.clone();
            async move { signal.raised().await }
        });
        woken_by_the_raise(&signal, waiting).await;
        tokio::time::timeout(Duration::from_secs(5), signal.raised())
            .await
            .expect("a raised signal does not wait");
    }

    /// A watch polled once per loop, as a connection polls its shutdown watch
    /// between requests, wakes its task when the signal is raised from another
    /// thread, after many looks that found it down.
    #[test]
    fn a_watch_polled_again_and_again_wakes_its_task_on_the_raise() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let signal = Arc::new(Signal::new());
        let (looked, mut looks) = tokio::sync::mpsc::unbounded_channel();
        let watching = runtime.spawn({
            let signal = signal.clone();
            async move {
                let mut watch = std::pin::pin!(signal.watch());
                let mut rounds = 0u32;
                loop {
                    tokio::select! {
                        biased;
                        () = watch.as_mut() => return rounds,
                        // From the 100th look on, only the watch can wake it.
                        () = tokio::task::yield_now(), if rounds < 100 => {
                            rounds += 1;
                            let _ = looked.send(rounds);
                        }
                    }
                }
            }
        });
        let rounds = runtime.block_on(async {
            while looks.recv().await != Some(100) {}
            let raiser = std::thread::spawn(move || signal.raise());
            assert!(raiser.join().unwrap());
            tokio::time::timeout(Duration::from_secs(5), watching)
                .await
                .expect("the raise woke the watching task")
                .unwrap()
        });
        assert_eq!(rounds, 100);
    }

    /// A watch first polled with one waker and then by a task registers the
    /// task's waker, and the raise wakes that task.
    #[tokio::test]
    async fn a_watch_moved_to_another_task_wakes_that_task() {
        let signal = Arc::new(Signal::new());
        let mut waiting = Box::pin({
            let signal = signal.clone();
            async move { signal.watch().await }
        });
        // First polled with a waker nobody listens to.
        let first = waiting
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()));
        assert!(first.is_pending());
        woken_by_the_raise(&signal, tokio::spawn(waiting)).await;
    }

    /// `task` waits while `signal` is down, and ends once it is raised.
    async fn woken_by_the_raise(signal: &Signal, task: tokio::task::JoinHandle<()>) {
        tokio::task::yield_now().await;
        assert!(
            !task.is_finished(),
            "the task waits while the signal is down"
        );
        signal.raise();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the raise woke the task")
            .unwrap();
    }
}
