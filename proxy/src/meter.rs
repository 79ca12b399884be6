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
//!
//! ## Bytes per destination (egress)
//!
//! On egress the client is the VPS and each request names where it goes, so
//! every byte of a connection is also attributed to a destination host. Not
//! per chunk: [`MeteredIo`] keeps the connection's running totals on its
//! tally (a plain store), and the bytes since the last *mark* go to a host at a
//! few points only:
//! - [`ConnTally::destination`], when a request's target is known: the bytes the
//!   VPS sent since the last mark (this request's head) go to the new host, the
//!   bytes it received (the end of the previous response, written after that
//!   exchange's last mark) to the previous one;
//! - [`ConnTally::attribute`], when an exchange ends, every MiB of a long
//!   response body, and every [`ATTRIBUTE_EVERY`] while a tunnel or WebSocket
//!   relays ([`attributing`]): everything since the last mark to the current host;
//! - when the connection is gone (the tally drops): the rest, to its last host.
//!
//! A request that names no host (an unparseable target, ambiguous framing) is
//! attributed to [`OTHER_HOST`]. Bytes of a connection that never binds to a
//! VPS are counted nowhere, so they are attributed nowhere either; bytes marked
//! before the binding wait on the tally and move with the binding. So once a
//! connection has ended, the hosts of a VPS hold exactly the bytes its counter
//! was given. The hosts live beside the counter, at most `destination_top_n` of
//! them between drains (the rest under [`OTHER_HOST`]), and the flusher drains
//! them with [`Meter::drain_destinations`] into the same batch as the counters.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use dashmap::DashMap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use uuid::Uuid;

use tollgate_core::config::MeterConfig;

use crate::telemetry::{self, Listener};

/// The destination row for bytes of hosts beyond a VPS's `destination_top_n`,
/// and of requests that named no host.
pub const OTHER_HOST: &str = "other";

/// How often the bytes of a running tunnel or WebSocket are attributed to its
/// destination, so the per-destination rows do not trail a long relay.
pub const ATTRIBUTE_EVERY: Duration = Duration::from_secs(1);

/// Hosts a connection keeps apart for its VPS before it is bound to one. A
/// connection names one host, plus `other` for unparseable requests, before it
/// authenticates or is closed; anything beyond goes to `other`.
const MAX_UNBOUND_HOSTS: usize = 4;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

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
    /// Egress bytes per destination host since the last drain, attributed per
    /// exchange (never per chunk). Allocated on first use: a VPS without
    /// egress traffic pays a lock and a pointer.
    hosts: Mutex<Option<Box<HostTable>>>,
    /// Most hosts `hosts` keeps apart (`destination_top_n`).
    host_limit: u32,
}

impl VpsCounter {
    fn new(vps_id: Uuid, user_id: Uuid, host_limit: u32) -> Self {
        let stripes = (0..stripe_count()).map(|_| Stripe::default()).collect();
        Self {
            stripes,
            in_transit: AtomicU64::new(0),
            vps_id,
            user_id,
            hosts: Mutex::new(None),
            host_limit,
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

    /// Attribute bytes this VPS already counted to destination `host`
    /// ([`OTHER_HOST`] for none): `rx` received from it, `tx` sent to it.
    pub fn attribute(&self, host: &str, rx: u64, tx: u64) {
        if rx == 0 && tx == 0 {
            return;
        }
        lock(&self.hosts).get_or_insert_with(Default::default).add(
            host,
            rx,
            tx,
            self.host_limit as usize,
        );
    }

    /// The bytes per host attributed since the last call, emptied.
    fn take_hosts(&self) -> Vec<HostBytes> {
        lock(&self.hosts)
            .take()
            .map_or_else(Vec::new, |table| table.into_rows())
    }

    fn has_hosts(&self) -> bool {
        lock(&self.hosts).is_some()
    }
}

/// Bytes a VPS exchanged with one destination host, as seen from the VPS: `rx`
/// received from it, `tx` sent to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBytes {
    pub host: Box<str>,
    pub rx: u64,
    pub tx: u64,
}

/// One VPS's bytes per host since the last drain: at most `limit` hosts, those
/// of any further host under [`OTHER_HOST`]. First come keep their place until
/// the drain: an agent naming a million hosts in one flush interval costs
/// `limit` entries, and the database folds what does not stay in its top N.
#[derive(Debug, Default)]
struct HostTable {
    hosts: HashMap<Box<str>, (u64, u64)>,
    other: (u64, u64),
}

impl HostTable {
    fn add(&mut self, host: &str, rx: u64, tx: u64, limit: usize) {
        if host != OTHER_HOST && self.hosts.len() < limit && !self.hosts.contains_key(host) {
            self.hosts.insert(host.into(), (0, 0));
        }
        let slot = self.hosts.get_mut(host).unwrap_or(&mut self.other);
        slot.0 = slot.0.saturating_add(rx);
        slot.1 = slot.1.saturating_add(tx);
    }

    fn into_rows(self) -> Vec<HostBytes> {
        let mut rows: Vec<HostBytes> = self
            .hosts
            .into_iter()
            .map(|(host, (rx, tx))| HostBytes { host, rx, tx })
            .collect();
        if self.other != (0, 0) {
            rows.push(HostBytes {
                host: OTHER_HOST.into(),
                rx: self.other.0,
                tx: self.other.1,
            });
        }
        rows
    }
}

/// A VPS's bytes per destination host, taken by [`Meter::drain_destinations`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainedHosts {
    pub vps_id: Uuid,
    pub hosts: Vec<HostBytes>,
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
#[derive(Debug)]
pub struct Meter {
    counters: DashMap<Uuid, Arc<VpsCounter>>,
    /// Destination hosts each VPS keeps apart between drains.
    destination_top_n: u32,
}

impl Default for Meter {
    fn default() -> Self {
        Self::with_destination_top_n(MeterConfig::default().destination_top_n)
    }
}

impl Meter {
    pub fn new() -> Self {
        Self::default()
    }

    /// A meter whose VPSes keep at most `top_n` destination hosts apart
    /// between drains (`proxy.meter.destination_top_n`).
    pub fn with_destination_top_n(top_n: u32) -> Self {
        Self {
            counters: DashMap::new(),
            destination_top_n: top_n.max(1),
        }
    }

    /// Destination hosts each VPS keeps apart, in memory and in the database.
    pub fn destination_top_n(&self) -> u32 {
        self.destination_top_n
    }

    /// The counter of `vps_id`, created on first use. Call once per connection
    /// (or request), then count on the returned handle.
    pub fn counter(&self, vps_id: Uuid, user_id: Uuid) -> Arc<VpsCounter> {
        if let Some(c) = self.counters.get(&vps_id) {
            return c.clone();
        }
        self.counters
            .entry(vps_id)
            .or_insert_with(|| Arc::new(VpsCounter::new(vps_id, user_id, self.destination_top_n)))
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

    /// Take every VPS's bytes per destination host attributed since the last
    /// call. They lag the counters by at most an exchange (or
    /// [`ATTRIBUTE_EVERY`] for a relay): what is attributed after a drain goes
    /// with the next one.
    pub fn drain_destinations(&self) -> Vec<DrainedHosts> {
        self.counters
            .iter()
            .filter_map(|entry| {
                let hosts = entry.take_hosts();
                (!hosts.is_empty()).then(|| DrainedHosts {
                    vps_id: entry.vps_id,
                    hosts,
                })
            })
            .collect()
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
            .retain(|_, c| Arc::strong_count(c) > 1 || c.unsettled() != 0 || c.has_hosts());
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
    /// Bytes moved on the connection so far, each way, as its [`MeteredIo`]
    /// (their one writer) last stored them.
    moved_rx: AtomicU64,
    moved_tx: AtomicU64,
    /// Where the bytes since the last mark go (egress).
    marks: Mutex<Marks>,
}

/// A connection's attribution to destinations: what was attributed so far, and
/// to whom the rest goes.
#[derive(Debug, Default)]
struct Marks {
    /// `moved_rx`/`moved_tx` at the last mark.
    rx: u64,
    tx: u64,
    /// The host of the exchange under way, or of the last one. `None` until a
    /// request names one (ingress connections never do: nothing is attributed).
    current: Option<Box<str>>,
    /// Bytes attributed before the connection was bound to a VPS, moved to its
    /// counter with the binding (dropped with the connection if it never binds:
    /// its bytes were not counted either).
    unbound: Vec<HostBytes>,
}

impl Marks {
    /// The bytes moved since the last mark, which is now.
    fn since(&mut self, (rx, tx): (u64, u64)) -> (u64, u64) {
        let moved = (rx.saturating_sub(self.rx), tx.saturating_sub(self.tx));
        (self.rx, self.tx) = (rx, tx);
        moved
    }
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

    /// Bind to `counter` and move the parked bytes (and the bytes already
    /// attributed to destinations) to it. Returns false if the tally is already
    /// bound to another VPS's counter.
    pub fn bind(&self, counter: &Arc<VpsCounter>) -> bool {
        let bound = self.bound.get_or_init(|| counter.clone());
        if !Arc::ptr_eq(bound, counter) {
            return false;
        }
        self.unpark(bound);
        let unbound = std::mem::take(&mut lock(&self.marks).unbound);
        for h in unbound {
            bound.attribute(&h.host, h.rx, h.tx);
        }
        true
    }

    /// An exchange on this connection goes to `host` ([`OTHER_HOST`] if it
    /// names none). Of the bytes since the last mark, those the VPS sent (this
    /// request's head, and any of its body read with it) go to `host`, those it
    /// received (the end of the previous response, written after that
    /// exchange's last mark) to the previous host. Until the next call, the
    /// connection's bytes go to `host`.
    pub fn destination(&self, host: &str) {
        let mut marks = lock(&self.marks);
        let (rx, tx) = marks.since(self.moved());
        let previous = marks.current.take();
        match previous.as_deref() {
            Some(previous) if previous != host => {
                self.attribute_to(&mut marks, previous, rx, 0);
                self.attribute_to(&mut marks, host, 0, tx);
            }
            // The same host again (most requests on a connection): one entry.
            _ => self.attribute_to(&mut marks, host, rx, tx),
        }
        marks.current = Some(match previous {
            Some(previous) if *previous == *host => previous,
            _ => host.into(),
        });
    }

    /// Attribute the bytes since the last mark to the current destination: an
    /// exchange ended, or a long one is under way. Nothing happens before a
    /// request has named a destination.
    pub fn attribute(&self) {
        let mut marks = lock(&self.marks);
        let Some(current) = marks.current.take() else {
            return;
        };
        let (rx, tx) = marks.since(self.moved());
        self.attribute_to(&mut marks, &current, rx, tx);
        marks.current = Some(current);
    }

    /// Bytes moved so far, each way.
    fn moved(&self) -> (u64, u64) {
        (
            self.moved_rx.load(Ordering::Acquire),
            self.moved_tx.load(Ordering::Acquire),
        )
    }

    /// Attribute to the bound VPS's hosts, or keep for the binding.
    fn attribute_to(&self, marks: &mut Marks, host: &str, rx: u64, tx: u64) {
        if rx == 0 && tx == 0 {
            return;
        }
        if let Some(counter) = self.bound.get() {
            return counter.attribute(host, rx, tx);
        }
        let unbound = &mut marks.unbound;
        let slot = match unbound.iter().position(|h| *h.host == *host) {
            Some(i) => i,
            None if unbound.len() < MAX_UNBOUND_HOSTS - 1 || host == OTHER_HOST => {
                unbound.push(HostBytes {
                    host: host.into(),
                    rx: 0,
                    tx: 0,
                });
                unbound.len() - 1
            }
            None => return self.attribute_to(marks, OTHER_HOST, rx, tx),
        };
        let h = &mut marks.unbound[slot];
        h.rx = h.rx.saturating_add(rx);
        h.tx = h.tx.saturating_add(tx);
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

impl Drop for ConnTally {
    fn drop(&mut self) {
        // The connection is gone (its socket with it): the rest of its bytes,
        // the end of its last response, go to its last destination.
        self.attribute();
    }
}

/// Run `work` (a relay), attributing `tally`'s bytes to its destination every
/// [`ATTRIBUTE_EVERY`] until it ends.
pub async fn attributing<F: Future>(tally: Option<&ConnTally>, work: F) -> F::Output {
    let Some(tally) = tally else {
        return work.await;
    };
    let mut work = std::pin::pin!(work);
    let mut every = tokio::time::interval_at(
        tokio::time::Instant::now() + ATTRIBUTE_EVERY,
        ATTRIBUTE_EVERY,
    );
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = every.tick() => tally.attribute(),
        }
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
    /// Bytes moved so far, stored on the tally for its destination marks.
    moved_rx: u64,
    moved_tx: u64,
}

impl<T> MeteredIo<T> {
    /// Count `inner`'s bytes on `tally`: one socket per tally, since its running
    /// totals have this one writer.
    pub fn new(inner: T, tally: Arc<ConnTally>, listener: Listener) -> Self {
        Self {
            inner,
            tally,
            listener,
            unreported_rx: 0,
            unreported_tx: 0,
            moved_rx: 0,
            moved_tx: 0,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// `n` bytes were written to the VPS.
    #[inline]
    pub(crate) fn received(&mut self, n: usize) {
        self.tally.record_rx(n as u64);
        // One writer: a plain store, no locked add on the hot path.
        self.moved_rx += n as u64;
        self.tally.moved_rx.store(self.moved_rx, Ordering::Release);
        self.unreported_rx += n as u64;
        if self.unreported_rx >= METRICS_REPORT_EVERY {
            self.report();
        }
    }

    /// `n` bytes were read from the VPS.
    #[inline]
    pub(crate) fn sent(&mut self, n: usize) {
        self.tally.record_tx(n as u64);
        self.moved_tx += n as u64;
        self.tally.moved_tx.store(self.moved_tx, Ordering::Release);
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

    /// What a connection's MeteredIo does when the VPS receives `rx` and sends `tx`.
    fn moved(tally: &ConnTally, rx: u64, tx: u64) {
        tally.record_rx(rx);
        tally.record_tx(tx);
        tally.moved_rx.fetch_add(rx, Ordering::AcqRel);
        tally.moved_tx.fetch_add(tx, Ordering::AcqRel);
    }

    /// Drained hosts of every VPS as (host, rx, tx), sorted.
    fn hosts_of(meter: &Meter) -> Vec<(String, u64, u64)> {
        let mut rows: Vec<(String, u64, u64)> = meter
            .drain_destinations()
            .into_iter()
            .flat_map(|d| d.hosts)
            .map(|h| (h.host.into(), h.rx, h.tx))
            .collect();
        rows.sort();
        rows
    }

    #[test]
    fn each_request_s_bytes_go_to_the_host_it_named() {
        let meter = Meter::new();
        let counter = meter.counter(Uuid::new_v4(), Uuid::new_v4());
        let tally = ConnTally::unbound();
        moved(&tally, 0, 120); // request head, read before authentication
        tally.destination("alpha.test");
        assert!(tally.bind(&counter));
        moved(&tally, 300, 0); // the response, as far as written when it ended
        tally.attribute();
        moved(&tally, 20, 0); // its last bytes, written after its end was recorded
        moved(&tally, 0, 90); // the next request's head
        tally.destination("beta.test");
        moved(&tally, 40, 500);
        tally.attribute();
        moved(&tally, 0, 33); // a request naming no host
        tally.destination(OTHER_HOST);
        moved(&tally, 12, 0); // its 400, still going out when the connection closes
        assert_eq!(
            hosts_of(&meter),
            vec![
                ("alpha.test".into(), 320, 120),
                ("beta.test".into(), 40, 590),
                ("other".into(), 0, 33),
            ],
            "attributed so far"
        );
        drop(tally);
        assert_eq!(hosts_of(&meter), vec![("other".into(), 12, 0)]);
        let d = meter.drain();
        assert_eq!((d[0].rx, d[0].tx), (372, 743), "everything was counted");
    }

    #[test]
    fn a_connection_that_never_binds_is_attributed_nowhere() {
        let meter = Meter::new();
        let tally = ConnTally::unbound();
        moved(&tally, 0, 200);
        tally.destination("alpha.test");
        moved(&tally, 150, 0); // a 407
        tally.attribute();
        drop(tally);
        assert!(meter.drain_destinations().is_empty());
        assert!(meter.drain().is_empty());
    }

    #[test]
    fn connections_that_name_no_destination_are_not_attributed() {
        // Ingress upstream connections: the VPS is the destination.
        let meter = Meter::new();
        let counter = meter.counter(Uuid::new_v4(), Uuid::new_v4());
        let tally = ConnTally::bound_to(counter);
        moved(&tally, 10, 20);
        tally.attribute();
        drop(tally);
        assert!(meter.drain_destinations().is_empty());
        assert_eq!(meter.drain().len(), 1);
    }

    #[test]
    fn a_vps_keeps_at_most_top_n_hosts_apart_between_drains() {
        let meter = Meter::with_destination_top_n(2);
        let counter = meter.counter(Uuid::new_v4(), Uuid::new_v4());
        counter.attribute("a.test", 1, 2);
        counter.attribute(OTHER_HOST, 100, 0); // takes no place
        counter.attribute("b.test", 3, 4);
        for i in 0..1000 {
            counter.attribute(&format!("h{i}.test"), 1, 1);
        }
        counter.attribute("a.test", 10, 0); // still in place
        assert_eq!(
            hosts_of(&meter),
            vec![
                ("a.test".into(), 11, 2),
                ("b.test".into(), 3, 4),
                ("other".into(), 1100, 1000),
            ]
        );
        // A drain frees the places.
        counter.attribute("h7.test", 5, 5);
        assert_eq!(hosts_of(&meter), vec![("h7.test".into(), 5, 5)]);
        assert!(!counter.has_hosts());
    }

    #[test]
    fn hosts_named_before_the_binding_are_bounded_too() {
        let meter = Meter::new();
        let counter = meter.counter(Uuid::new_v4(), Uuid::new_v4());
        let tally = ConnTally::unbound();
        for i in 0..20 {
            moved(&tally, 1, 10);
            tally.destination(&format!("h{i}.test"));
        }
        tally.attribute();
        assert!(tally.bind(&counter));
        drop(tally);
        let rows = hosts_of(&meter);
        assert!(rows.len() <= MAX_UNBOUND_HOSTS, "{rows:?}");
        let sum = rows.iter().fold((0, 0), |s, r| (s.0 + r.1, s.1 + r.2));
        assert_eq!(sum, (20, 200));
    }

    #[test]
    fn eviction_keeps_counters_with_hosts_to_drain() {
        let meter = Meter::new();
        let user = Uuid::new_v4();
        let vps = Uuid::new_v4();
        meter.counter(vps, user).attribute("a.test", 1, 1);
        meter.evict_idle();
        assert_eq!(meter.len(), 1);
        assert_eq!(hosts_of(&meter).len(), 1);
        meter.evict_idle();
        assert!(meter.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_relay_is_attributed_every_second_while_it_runs() {
        let meter = Meter::new();
        let counter = meter.counter(Uuid::new_v4(), Uuid::new_v4());
        let tally = ConnTally::bound_to(counter);
        moved(&tally, 0, 100); // CONNECT head
        tally.destination("tunnel.test");
        let relay = async {
            moved(&tally, 1000, 10);
            tokio::time::sleep(ATTRIBUTE_EVERY * 3 / 2).await;
            assert_eq!(hosts_of(&meter), vec![("tunnel.test".into(), 1000, 110)]);
            moved(&tally, 500, 0);
            tokio::time::sleep(ATTRIBUTE_EVERY).await;
            assert_eq!(hosts_of(&meter), vec![("tunnel.test".into(), 500, 0)]);
            moved(&tally, 1, 1);
            "ended"
        };
        assert_eq!(attributing(Some(&tally), relay).await, "ended");
        tally.attribute(); // the exchange's end
        assert_eq!(hosts_of(&meter), vec![("tunnel.test".into(), 1, 1)]);
    }

    /// What a connection can do, in any order.
    #[derive(Debug, Clone)]
    enum Step {
        Move(u64, u64),
        Name(usize),
        NameNone,
        Attribute,
        Bind,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            (0u64..5000, 0u64..5000).prop_map(|(rx, tx)| Step::Move(rx, tx)),
            (0usize..8).prop_map(Step::Name),
            Just(Step::NameNone),
            Just(Step::Attribute),
            Just(Step::Bind),
        ]
    }

    proptest::proptest! {
        /// Once its connections are gone, a VPS's hosts hold exactly the bytes
        /// its counter was given, whatever the connections did in between, and
        /// never more than top_n hosts plus `other`.
        #[test]
        fn hosts_sum_to_the_counted_bytes(
            conns in proptest::collection::vec(proptest::collection::vec(step(), 0..40), 1..6),
        ) {
            let meter = Meter::with_destination_top_n(3);
            let counter = meter.counter(Uuid::new_v4(), Uuid::new_v4());
            for steps in conns {
                let tally = ConnTally::unbound();
                for s in steps {
                    match s {
                        Step::Move(rx, tx) => moved(&tally, rx, tx),
                        Step::Name(i) => tally.destination(&format!("h{i}.test")),
                        Step::NameNone => tally.destination(OTHER_HOST),
                        Step::Attribute => tally.attribute(),
                        // Egress binds a connection as a request authenticates,
                        // after its target named a host.
                        Step::Bind => {
                            tally.destination("h0.test");
                            assert!(tally.bind(&counter));
                        }
                    }
                }
            }
            let rows = hosts_of(&meter);
            proptest::prop_assert!(rows.iter().filter(|r| r.0 != "other").count() <= 3);
            let hosts = rows.iter().fold((0, 0), |s, r| (s.0 + r.1, s.1 + r.2));
            let counted = meter.drain().iter().fold((0, 0), |s, d| (s.0 + d.rx, s.1 + d.tx));
            proptest::prop_assert_eq!(hosts, counted);
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
        // The running totals the destination marks read.
        assert_eq!(io.tally.moved(), (2, 11));
    }
}
