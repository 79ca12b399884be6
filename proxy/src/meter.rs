//! Byte counting on the socket that faces the VPS (SPEC §4.3).
//!
//! - [`VpsCounter`]: rx/tx atomics per VPS (rx = bytes the VPS received, tx =
//!   bytes it sent), striped over cache lines, found once per connection in the
//!   sharded [`Meter`] map and then incremented directly: no map lookup per chunk.
//! - [`ConnTally`]: a connection's link to its counter. An egress connection
//!   learns its VPS only when its first request authenticates, so bytes read
//!   before that are parked on the tally and moved to the counter on binding.
//! - [`MeteredIo`]: wraps the socket; every byte read from it was sent by the VPS
//!   (tx), every byte written to it was received by the VPS (rx). This holds for
//!   both listeners: egress wraps the agent's client connection, ingress the
//!   upstream connection to the VPS.
//!
//! The flusher swaps counters to zero with [`Meter::drain`]; increments that race
//! with the swap land in the next batch, never nowhere.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use dashmap::DashMap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use uuid::Uuid;

use crate::telemetry::{self, Listener};

/// One slot of a VPS's counter, on its own cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Stripe {
    rx: AtomicU64,
    tx: AtomicU64,
}

/// Number of stripes per VPS counter: one per core, at most 4 (a power of two).
/// Each thread counts on the stripe of its own index, so two connections of one
/// VPS served by two worker threads never write the same cache line.
pub fn stripes_per_counter() -> usize {
    stripe_count()
}

fn stripe_count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        cores.clamp(1, 4).next_power_of_two()
    })
}

/// Unflushed bytes of one VPS, striped over cache lines so concurrent
/// connections of the same VPS do not contend on one atomic.
#[derive(Debug)]
pub struct VpsCounter {
    stripes: Box<[Stripe]>,
    /// Bytes drained into a batch that is not yet written and decided on: still
    /// the user's, as far as enforcement is concerned.
    in_transit: AtomicU64,
    vps_id: Uuid,
    user_id: Uuid,
}

impl VpsCounter {
    fn new(vps_id: Uuid, user_id: Uuid) -> Self {
        let stripes = (0..stripe_count()).map(|_| Stripe::default()).collect();
        Self {
            stripes,
            in_transit: AtomicU64::new(0),
            vps_id,
            user_id,
        }
    }

    /// The stripe of the calling thread.
    #[inline]
    fn stripe(&self) -> &Stripe {
        thread_local! {
            static INDEX: usize = {
                static NEXT: AtomicUsize = AtomicUsize::new(0);
                NEXT.fetch_add(1, Ordering::Relaxed)
            };
        }
        let index = INDEX.with(|i| *i);
        &self.stripes[index & (self.stripes.len() - 1)]
    }

    /// Count `n` bytes the VPS received.
    #[inline]
    pub fn add_rx(&self, n: u64) {
        self.stripe().rx.fetch_add(n, Ordering::Relaxed);
    }

    /// Count `n` bytes the VPS sent.
    #[inline]
    pub fn add_tx(&self, n: u64) {
        self.stripe().tx.fetch_add(n, Ordering::Relaxed);
    }

    pub fn vps_id(&self) -> Uuid {
        self.vps_id
    }

    pub fn user_id(&self) -> Uuid {
        self.user_id
    }

    /// Unflushed bytes, both directions.
    pub fn pending(&self) -> u64 {
        self.stripes
            .iter()
            .map(|s| s.rx.load(Ordering::Relaxed) + s.tx.load(Ordering::Relaxed))
            .sum()
    }

    /// Bytes not yet reflected in a decision: unflushed, or drained into a
    /// batch that has not been written and decided on (while the database is
    /// down, every queued batch).
    pub fn unsettled(&self) -> u64 {
        self.pending() + self.in_transit.load(Ordering::Acquire)
    }

    fn take(&self) -> (u64, u64) {
        self.stripes.iter().fold((0, 0), |(rx, tx), s| {
            (
                rx + s.rx.swap(0, Ordering::AcqRel),
                tx + s.tx.swap(0, Ordering::AcqRel),
            )
        })
    }
}

/// Bytes taken from one counter by [`Meter::drain`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    pub vps_id: Uuid,
    pub user_id: Uuid,
    pub rx: u64,
    pub tx: u64,
}

/// Bytes drained from counters and on their way to the database, counted as
/// in transit on their counters until this is dropped: after the batch was
/// written and its users decided on again (or when it is given up).
#[derive(Debug, Default)]
pub struct InTransit(Vec<(Arc<VpsCounter>, u64)>);

impl Drop for InTransit {
    fn drop(&mut self) {
        for (counter, bytes) in &self.0 {
            counter.in_transit.fetch_sub(*bytes, Ordering::AcqRel);
        }
    }
}

/// All per-VPS counters of this process.
#[derive(Debug, Default)]
pub struct Meter {
    counters: DashMap<Uuid, Arc<VpsCounter>>,
}

impl Meter {
    pub fn new() -> Self {
        Self::default()
    }

    /// The counter of `vps_id`, created on first use. Call once per connection
    /// (or request), then count on the returned handle.
    pub fn counter(&self, vps_id: Uuid, user_id: Uuid) -> Arc<VpsCounter> {
        if let Some(c) = self.counters.get(&vps_id) {
            return c.clone();
        }
        self.counters
            .entry(vps_id)
            .or_insert_with(|| Arc::new(VpsCounter::new(vps_id, user_id)))
            .clone()
    }

    /// Swap every counter to zero and return the non-zero ones.
    pub fn drain(&self) -> Vec<Drained> {
        self.drain_in_transit().0
    }

    /// As [`Meter::drain`], with the drained bytes kept in transit on their
    /// counters until the returned [`InTransit`] is dropped, so enforcement
    /// keeps seeing them while their batch waits for the database.
    pub fn drain_in_transit(&self) -> (Vec<Drained>, InTransit) {
        let (mut out, mut in_transit) = (Vec::new(), Vec::new());
        for entry in self.counters.iter() {
            let (rx, tx) = entry.take();
            if rx != 0 || tx != 0 {
                entry.in_transit.fetch_add(rx + tx, Ordering::AcqRel);
                in_transit.push((entry.value().clone(), rx + tx));
                out.push(Drained {
                    vps_id: entry.vps_id,
                    user_id: entry.user_id,
                    rx,
                    tx,
                });
            }
        }
        (out, InTransit(in_transit))
    }

    /// Put bytes back (a batch that could not be built or written is re-queued).
    pub fn restore(&self, drained: &[Drained]) {
        for d in drained {
            let c = self.counter(d.vps_id, d.user_id);
            c.add_rx(d.rx);
            c.add_tx(d.tx);
        }
    }

    /// Forget counters that hold nothing and that no connection holds.
    pub fn evict_idle(&self) {
        self.counters
            .retain(|_, c| Arc::strong_count(c) > 1 || c.unsettled() != 0);
    }

    /// Unflushed bytes over all VPSes.
    pub fn pending_bytes(&self) -> u64 {
        self.counters.iter().map(|c| c.pending()).sum()
    }

    /// Counters currently held.
    pub fn len(&self) -> usize {
        self.counters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counters.is_empty()
    }
}

/// A connection's link to the counter of the VPS it belongs to.
#[derive(Debug, Default)]
pub struct ConnTally {
    bound: OnceLock<Arc<VpsCounter>>,
    parked_rx: AtomicU64,
    parked_tx: AtomicU64,
}

impl ConnTally {
    /// A tally whose VPS is not known yet (egress, before authentication).
    pub fn unbound() -> Self {
        Self::default()
    }

    /// A tally counting to `counter` from the first byte (ingress upstreams).
    pub fn bound_to(counter: Arc<VpsCounter>) -> Self {
        let tally = Self::default();
        let _ = tally.bound.set(counter);
        tally
    }

    /// Bind to `counter` and move the parked bytes to it. Returns false if the
    /// tally is already bound to another VPS's counter.
    pub fn bind(&self, counter: &Arc<VpsCounter>) -> bool {
        let bound = self.bound.get_or_init(|| counter.clone());
        if !Arc::ptr_eq(bound, counter) {
            return false;
        }
        self.unpark(bound);
        true
    }

    /// The VPS this connection is bound to.
    pub fn counter(&self) -> Option<&Arc<VpsCounter>> {
        self.bound.get()
    }

    fn unpark(&self, counter: &VpsCounter) {
        let rx = self.parked_rx.swap(0, Ordering::AcqRel);
        let tx = self.parked_tx.swap(0, Ordering::AcqRel);
        if rx != 0 {
            counter.add_rx(rx);
        }
        if tx != 0 {
            counter.add_tx(tx);
        }
    }

    /// Count `n` bytes the VPS received on this connection.
    #[inline]
    pub fn record_rx(&self, n: u64) {
        match self.bound.get() {
            Some(counter) => counter.add_rx(n),
            None => self.park(&self.parked_rx, n),
        }
    }

    /// Count `n` bytes the VPS sent on this connection.
    #[inline]
    pub fn record_tx(&self, n: u64) {
        match self.bound.get() {
            Some(counter) => counter.add_tx(n),
            None => self.park(&self.parked_tx, n),
        }
    }

    #[cold]
    fn park(&self, parked: &AtomicU64, n: u64) {
        parked.fetch_add(n, Ordering::AcqRel);
        // Bound meanwhile: the binder may have unparked before our add; move it now.
        if let Some(counter) = self.bound.get() {
            self.unpark(counter);
        }
    }

    /// Bytes parked on a connection that never bound (not counted to any VPS).
    pub fn parked(&self) -> (u64, u64) {
        (
            self.parked_rx.load(Ordering::Acquire),
            self.parked_tx.load(Ordering::Acquire),
        )
    }
}

/// Bytes per connection between reports to the process-wide byte metrics, so
/// the Prometheus counters are not a contended atomic on every chunk.
const METRICS_REPORT_EVERY: u64 = 256 * 1024;

/// A socket facing the VPS, counting every byte that crosses it.
#[derive(Debug)]
pub struct MeteredIo<T> {
    inner: T,
    tally: Arc<ConnTally>,
    listener: Listener,
    unreported_rx: u64,
    unreported_tx: u64,
}

impl<T> MeteredIo<T> {
    pub fn new(inner: T, tally: Arc<ConnTally>, listener: Listener) -> Self {
        Self {
            inner,
            tally,
            listener,
            unreported_rx: 0,
            unreported_tx: 0,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    #[inline]
    fn received(&mut self, n: usize) {
        self.tally.record_rx(n as u64);
        self.unreported_rx += n as u64;
        if self.unreported_rx >= METRICS_REPORT_EVERY {
            self.report();
        }
    }

    #[inline]
    fn sent(&mut self, n: usize) {
        self.tally.record_tx(n as u64);
        self.unreported_tx += n as u64;
        if self.unreported_tx >= METRICS_REPORT_EVERY {
            self.report();
        }
    }

    fn report(&mut self) {
        telemetry::bytes(self.listener, self.unreported_rx, self.unreported_tx);
        self.unreported_rx = 0;
        self.unreported_tx = 0;
    }
}

impl<T> Drop for MeteredIo<T> {
    fn drop(&mut self) {
        self.report();
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for MeteredIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.sent(n);
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for MeteredIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            self.received(n);
        }
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = poll {
            self.received(n);
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn drain_swaps_to_zero_and_skips_idle_counters() {
        let meter = Meter::new();
        let (a, b, user) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let ca = meter.counter(a, user);
        let _cb = meter.counter(b, user);
        ca.add_rx(10);
        ca.add_tx(3);
        assert_eq!(meter.pending_bytes(), 13);
        assert_eq!(
            meter.drain(),
            vec![Drained {
                vps_id: a,
                user_id: user,
                rx: 10,
                tx: 3
            }]
        );
        assert!(meter.drain().is_empty());
        assert!(
            Arc::ptr_eq(&ca, &meter.counter(a, user)),
            "one counter per VPS"
        );
    }

    #[test]
    fn eviction_keeps_held_or_dirty_counters() {
        let meter = Meter::new();
        let user = Uuid::new_v4();
        let held = meter.counter(Uuid::new_v4(), user);
        meter.counter(Uuid::new_v4(), user).add_rx(1); // dirty, unheld
        meter.counter(Uuid::new_v4(), user); // clean, unheld
        meter.evict_idle();
        assert_eq!(meter.len(), 2);
        drop(held);
        meter.drain();
        meter.evict_idle();
        assert!(meter.is_empty());
    }

    #[test]
    fn bytes_before_binding_move_to_the_counter() {
        let meter = Meter::new();
        let counter = meter.counter(Uuid::new_v4(), Uuid::new_v4());
        let tally = ConnTally::unbound();
        tally.record_tx(100); // request head read before authentication
        assert_eq!(counter.pending(), 0);
        assert!(tally.bind(&counter));
        assert_eq!(counter.pending(), 100);
        tally.record_rx(7);
        tally.record_tx(1);
        assert_eq!(meter.drain()[0].rx, 7);
        // A second VPS cannot take over the connection.
        let other = meter.counter(Uuid::new_v4(), Uuid::new_v4());
        assert!(!tally.bind(&other));
        assert!(tally.bind(&counter));
    }

    #[test]
    fn concurrent_recording_and_binding_lose_nothing() {
        for _ in 0..200 {
            let meter = Meter::new();
            let counter = meter.counter(Uuid::new_v4(), Uuid::new_v4());
            let tally = Arc::new(ConnTally::unbound());
            let writer = {
                let tally = tally.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        tally.record_rx(1);
                        tally.record_tx(2);
                    }
                })
            };
            tally.bind(&counter);
            writer.join().unwrap();
            let d = meter.drain();
            assert_eq!((d[0].rx, d[0].tx), (1000, 2000));
            assert_eq!(tally.parked(), (0, 0));
        }
    }

    #[tokio::test]
    async fn metered_io_counts_reads_as_tx_and_writes_as_rx() {
        let meter = Meter::new();
        let counter = meter.counter(Uuid::new_v4(), Uuid::new_v4());
        let (client, server) = tokio::io::duplex(1024);
        let tally = Arc::new(ConnTally::bound_to(counter.clone()));
        let mut io = MeteredIo::new(server, tally, Listener::Egress);
        let mut client = client;
        client.write_all(b"hello world").await.unwrap();
        let mut buf = [0u8; 11];
        io.read_exact(&mut buf).await.unwrap();
        io.write_all(b"ok").await.unwrap();
        let d = meter.drain();
        assert_eq!((d[0].rx, d[0].tx), (2, 11));
    }
}
