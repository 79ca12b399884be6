//! The hot-path side of enforcement (SPEC §4.4): each user's decision in force,
//! checked in memory on every request and every relayed chunk, and the guard a
//! stream or tunnel carries so it stops the moment its user is blocked or its
//! agent's credential is revoked.
//!
//! Gates are kept current by the enforcer's worker (`enforcement`), which is the
//! only writer; the request path only reads them.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use tollgate_core::billing::{BlockReason, OnExhausted, Period};

use crate::meter::VpsCounter;
use crate::pacing::{AgentBandwidth, Pacer, Way};
use crate::signal::Signal;
use crate::telemetry::Listener;

/// A user is blocked: why, and for which month.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocked {
    pub reason: BlockReason,
    pub period: Period,
}

fn reason_code(reason: Option<BlockReason>) -> u8 {
    match reason {
        None => 0,
        Some(r) => {
            1 + BlockReason::ALL
                .iter()
                .position(|x| *x == r)
                .expect("listed") as u8
        }
    }
}

fn reason_of(code: u8) -> Option<BlockReason> {
    code.checked_sub(1).map(|i| BlockReason::ALL[i as usize])
}

/// `headroom` when none is known: only the published decision applies.
const NO_HEADROOM: u64 = u64::MAX;

/// `lease` when leases do not apply (switched off, or suspended while the
/// database is out of reach): only the headroom of the last decision applies.
pub(crate) const UNLEASED: u64 = u64::MAX;

/// How a gate asks this proxy's lease worker for a grant, and how long a request
/// waits for one.
#[derive(Debug, Clone)]
pub struct LeaseAsks {
    pub(crate) asks: mpsc::UnboundedSender<Uuid>,
    pub(crate) wait: Duration,
    /// Live proxies: a throttled user's rate is divided among them.
    pub(crate) replicas: Arc<AtomicU64>,
}

/// Where a user's traffic stands, as the hot path sees it.
#[derive(Debug)]
pub enum Verdict {
    Go,
    /// This proxy's lease is spent and a grant is on its way: hold the bytes in
    /// hand until `news` is cancelled (the lease changed), then ask again.
    Wait {
        news: CancellationToken,
    },
    Stop(Blocked),
    /// The user is exhausted and their plan throttles: pass the bytes at the
    /// throttle rate ([`UserGate::pace`]).
    Slow(Blocked),
}

/// The decision in force for one user, and the token their long-lived streams
/// watch.
///
/// Between decisions, the gate also refuses once the bytes this proxy has
/// counted for the user but not yet written exceed the bandwidth headroom the
/// last evaluation left (`billing::bandwidth_headroom`): unflushed usage counts
/// at once, not a flush interval later.
#[derive(Debug)]
pub struct UserGate {
    user_id: Uuid,
    reason: AtomicU8,
    /// Days since the epoch of the decision's period start.
    period_day: AtomicI64,
    /// Cancelled (and replaced) each time the user's streams are cut: what
    /// a waiting stream waits on.
    cut: Mutex<CancellationToken>,
    /// Cuts so far. A guard remembers the count it was taken at and is cut
    /// once it changes: checking costs an atomic load, and only a stream that
    /// waits takes the token.
    cuts: AtomicU64,
    /// Bandwidth bytes left before the decision flips, as of the last evaluation.
    headroom: AtomicU64,
    /// The reason the decision will flip with, once the headroom is used up.
    headroom_reason: AtomicU8,
    /// Counters of the user's VPSes that this proxy meters.
    counters: RwLock<Vec<Arc<VpsCounter>>>,
    /// This proxy's lease on the user's headroom: how many bytes it may have
    /// counted and not yet settled ([`UNLEASED`] when leases do not apply).
    lease: AtomicU64,
    /// A grant was asked for and not answered yet.
    lease_asked: AtomicBool,
    /// The last grant found the user's headroom spent fleet-wide: refuse, and
    /// ask again no sooner than `spent_retry`.
    spent: AtomicBool,
    spent_retry: Mutex<Option<Instant>>,
    /// Cancelled (and replaced) whenever the lease changes or a grant is
    /// answered: what traffic waiting for a lease waits on.
    lease_news: Mutex<CancellationToken>,
    leases: Option<LeaseAsks>,
    /// Listeners that carried the user's traffic here, a bit each.
    listeners: AtomicU8,
    /// Idle checks in a row that found no bytes settled against the lease.
    lease_idle: AtomicU8,
    /// Leases fell back for this gate alone (a grant failed): the next grant
    /// replaces what the database holds for it.
    lease_lost: AtomicBool,
    /// The user's plan throttles at this rate once exhausted (bytes per second,
    /// all proxies together); 0: it blocks.
    throttle: AtomicU64,
    /// This proxy's share of the throttle rate, for every stream of the user.
    throttled: Pacer,
}

impl UserGate {
    pub(crate) fn new(user_id: Uuid, leases: Option<LeaseAsks>) -> Self {
        Self {
            user_id,
            reason: AtomicU8::new(0),
            period_day: AtomicI64::new(0),
            cut: Mutex::new(CancellationToken::new()),
            cuts: AtomicU64::new(0),
            headroom: AtomicU64::new(NO_HEADROOM),
            headroom_reason: AtomicU8::new(0),
            counters: RwLock::new(Vec::new()),
            lease: AtomicU64::new(if leases.is_some() { 0 } else { UNLEASED }),
            lease_asked: AtomicBool::new(false),
            spent: AtomicBool::new(false),
            spent_retry: Mutex::new(None),
            lease_news: Mutex::new(CancellationToken::new()),
            leases,
            listeners: AtomicU8::new(0),
            lease_idle: AtomicU8::new(0),
            lease_lost: AtomicBool::new(false),
            throttle: AtomicU64::new(0),
            throttled: Pacer::new(),
        }
    }

    /// Count `counter`'s unflushed bytes against this user's headroom.
    pub fn track(&self, counter: &Arc<VpsCounter>) {
        let known = self
            .counters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|c| Arc::ptr_eq(c, counter));
        if !known {
            // Checked again under the write lock: two fills of one agent at
            // once must not count its VPS twice.
            let mut counters = self.counters.write().unwrap_or_else(|p| p.into_inner());
            if !counters.iter().any(|c| Arc::ptr_eq(c, counter)) {
                counters.push(counter.clone());
            }
        }
    }

    pub(crate) fn set_headroom(&self, headroom: Option<(u64, BlockReason)>) {
        match headroom {
            Some((bytes, reason)) => {
                self.headroom_reason
                    .store(reason_code(Some(reason)), Ordering::Release);
                self.headroom.store(bytes, Ordering::Release);
            }
            None => self.headroom.store(NO_HEADROOM, Ordering::Release),
        }
    }

    /// Bytes counted for this user here and not yet settled: unflushed, or in a
    /// batch whose write has not been taken into account yet.
    pub(crate) fn unflushed(&self) -> u64 {
        self.counters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|c| c.unsettled())
            .sum()
    }

    pub fn user_id(&self) -> Uuid {
        self.user_id
    }

    /// `Err` if the user's traffic must stop: blocked by decision, past the
    /// headroom of the last decision, or past this proxy's lease with the user's
    /// headroom spent fleet-wide. A lease merely waiting for a grant is `Ok`
    /// here; [`UserGate::verdict`] tells it apart. Take the stream's
    /// [`StreamGuard`] *before* calling this, so a block landing in between
    /// still reaches the stream.
    #[inline]
    pub fn check(&self) -> Result<(), Blocked> {
        match self.verdict() {
            Verdict::Stop(blocked) => Err(blocked),
            Verdict::Go | Verdict::Wait { .. } | Verdict::Slow(_) => Ok(()),
        }
    }

    /// Where the user's traffic stands: where it would stop, a plan that
    /// throttles slows it instead.
    #[inline]
    pub fn verdict(&self) -> Verdict {
        match self.limits() {
            Verdict::Stop(blocked) if self.throttle.load(Ordering::Acquire) != 0 => {
                Verdict::Slow(blocked)
            }
            verdict => verdict,
        }
    }

    /// Where the user's traffic stands against their limits. Asks for a grant
    /// once the lease is half spent, so traffic far from the limit never waits
    /// for one.
    #[inline]
    fn limits(&self) -> Verdict {
        if let Some(reason) = reason_of(self.reason.load(Ordering::SeqCst)) {
            return Verdict::Stop(Blocked {
                reason,
                period: self.period(),
            });
        }
        let headroom = self.headroom.load(Ordering::Acquire);
        let lease = self.lease.load(Ordering::Acquire);
        if headroom == NO_HEADROOM && lease == UNLEASED {
            return Verdict::Go;
        }
        let unflushed = self.unflushed();
        if headroom != NO_HEADROOM && unflushed > headroom {
            return Verdict::Stop(self.spent_blocked());
        }
        if lease == UNLEASED || unflushed.saturating_mul(2) < lease {
            return Verdict::Go;
        }
        self.lease_low(unflushed)
    }

    /// The lease is at least half spent: ask for more; past it, wait or stop.
    #[cold]
    fn lease_low(&self, unflushed: u64) -> Verdict {
        // Taken before the lease is read again, so a grant landing in between
        // is either seen or wakes the waiter.
        let news = self
            .lease_news
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let lease = self.lease.load(Ordering::Acquire);
        if lease == UNLEASED || unflushed <= lease {
            if lease != UNLEASED && !self.spent.load(Ordering::Acquire) {
                self.ask();
            }
            return Verdict::Go;
        }
        if self.spent.load(Ordering::Acquire) {
            let due = self
                .spent_retry
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_none_or(|at| Instant::now() >= at);
            if due {
                self.ask();
            }
            return Verdict::Stop(self.spent_blocked());
        }
        self.ask();
        Verdict::Wait { news }
    }

    fn spent_blocked(&self) -> Blocked {
        Blocked {
            reason: reason_of(self.headroom_reason.load(Ordering::Acquire))
                .unwrap_or(BlockReason::Bandwidth),
            period: self.period(),
        }
    }

    /// Ask the lease worker for a grant, once until it answers.
    fn ask(&self) {
        if let Some(leases) = &self.leases {
            if !self.lease_asked.swap(true, Ordering::AcqRel)
                && leases.asks.send(self.user_id).is_err()
            {
                self.lease_asked.store(false, Ordering::Release);
            }
        }
    }

    /// Admit a new request from `listener`: `Err` if the user's traffic must
    /// stop. Waits while a grant is on its way; one that does not come within
    /// the configured lease wait (a slow or unreachable database) leaves this
    /// user to the last decision until the next renewal (SPEC §4.5), rather
    /// than refusing them for usage they may not have.
    pub async fn admit(&self, listener: Listener) -> Result<(), Blocked> {
        self.listeners
            .fetch_or(listener_bit(listener), Ordering::Relaxed);
        let mut deadline = None;
        loop {
            match self.verdict() {
                Verdict::Go | Verdict::Slow(_) => return Ok(()),
                Verdict::Stop(blocked) => return Err(blocked),
                Verdict::Wait { news } => {
                    let wait = self.leases.as_ref().map_or(Duration::ZERO, |l| l.wait);
                    let deadline = *deadline.get_or_insert_with(|| Instant::now() + wait);
                    if tokio::time::timeout_at(deadline, news.cancelled())
                        .await
                        .is_err()
                    {
                        self.lose_lease();
                    }
                }
            }
        }
    }

    /// The lease worker answered: `granted` more bytes (none if the headroom is
    /// spent, with the reason it would block for).
    pub(crate) fn lease_answered(&self, granted: u64, spent: Option<BlockReason>, retry: Instant) {
        if granted > 0 {
            let _ = self
                .lease
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| {
                    (l != UNLEASED).then(|| l.saturating_add(granted))
                });
        }
        match spent {
            Some(reason) => {
                self.headroom_reason
                    .store(reason_code(Some(reason)), Ordering::Release);
                *self.spent_retry.lock().unwrap_or_else(|p| p.into_inner()) = Some(retry);
                self.spent.store(true, Ordering::Release);
            }
            None => self.spent.store(false, Ordering::Release),
        }
        self.lease_asked.store(false, Ordering::Release);
        self.lease_news();
    }

    /// Wake whatever waits for this gate's lease.
    pub(crate) fn lease_news(&self) {
        let mut news = self.lease_news.lock().unwrap_or_else(|p| p.into_inner());
        news.cancel();
        *news = CancellationToken::new();
    }

    /// This proxy's lease ([`UNLEASED`] when leases do not apply).
    pub fn lease(&self) -> u64 {
        self.lease.load(Ordering::Acquire)
    }

    /// Replace the lease (starting over, suspending or resuming leases); returns
    /// what it was.
    pub(crate) fn reset_lease(&self, lease: u64) -> u64 {
        let previous = self.lease.swap(lease, Ordering::AcqRel);
        self.spent.store(false, Ordering::Release);
        self.lease_asked.store(false, Ordering::Release);
        self.lease_news();
        previous
    }

    /// A grant for this gate failed: enforce the last decision alone until
    /// [`UserGate::lease_again`].
    pub(crate) fn lose_lease(&self) {
        self.lease_lost.store(true, Ordering::Release);
        self.reset_lease(UNLEASED);
    }

    /// Lease again after [`UserGate::lose_lease`] (the next grant replaces what
    /// the database holds).
    pub(crate) fn lease_again(&self) {
        if self.lease() == UNLEASED && self.lease_lost.load(Ordering::Acquire) {
            self.reset_lease(0);
        }
    }

    /// Whether the next grant must replace what the database holds (and forget
    /// that it must).
    pub(crate) fn take_lease_lost(&self) -> bool {
        self.lease_lost.swap(false, Ordering::AcqRel)
    }

    /// Take `bytes` off the lease: they are written to usage now.
    pub(crate) fn settle_lease(&self, bytes: u64) {
        self.lease_idle.store(0, Ordering::Relaxed);
        let _ = self
            .lease
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| {
                (l != UNLEASED).then(|| l.saturating_sub(bytes))
            });
    }

    /// Give the whole lease back if nothing is counted against it: returns the
    /// bytes given back (0 when there was none, or traffic is under way).
    pub(crate) fn release_idle_lease(&self) -> u64 {
        let lease = self.lease.load(Ordering::Acquire);
        if lease == UNLEASED || lease == 0 || self.unflushed() != 0 {
            return 0;
        }
        match self
            .lease
            .compare_exchange(lease, 0, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => lease,
            Err(_) => 0,
        }
    }

    /// As [`UserGate::release_idle_lease`], once `checks` calls in a row have
    /// found no bytes settled against the lease.
    pub(crate) fn release_lease_idle_for(&self, checks: u8) -> u64 {
        let idle = self
            .lease_idle
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if idle < checks {
            return 0;
        }
        self.lease_idle.store(0, Ordering::Relaxed);
        self.release_idle_lease()
    }

    /// The listeners that have carried this user's traffic here. Not reset
    /// when read: a block that lands while long streams admitted earlier are
    /// still under way is theirs too.
    pub(crate) fn listeners(&self) -> Option<&'static str> {
        match self.listeners.load(Ordering::Relaxed) {
            0 => None,
            1 => Some(Listener::Egress.as_str()),
            2 => Some(Listener::Ingress.as_str()),
            _ => Some("both"),
        }
    }

    /// Cuts of this user's streams so far.
    #[inline]
    fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::Acquire)
    }

    /// A token cancelled at the user's next cut, if there has been none since
    /// the count was `seen`.
    fn cut_after(&self, seen: u64) -> Option<CancellationToken> {
        let token = self.cut.lock().unwrap_or_else(|p| p.into_inner());
        (self.cuts() == seen).then(|| token.clone())
    }

    fn period(&self) -> Period {
        let day = self.period_day.load(Ordering::Acquire);
        chrono::NaiveDate::from_num_days_from_ce_opt(day as i32)
            .and_then(Period::starting)
            .unwrap_or_else(Period::current)
    }

    /// Set the decision; returns the previous reason.
    pub(crate) fn set(&self, reason: Option<BlockReason>, period: Period) -> Option<BlockReason> {
        use chrono::Datelike;
        self.period_day.store(
            i64::from(period.start().num_days_from_ce()),
            Ordering::Release,
        );
        let previous = reason_of(self.reason.swap(reason_code(reason), Ordering::SeqCst));
        if reason.is_some() && previous.is_none() && !self.throttles() {
            self.cut_streams();
        }
        previous
    }

    fn cut_streams(&self) {
        let mut token = self.cut.lock().unwrap_or_else(|p| p.into_inner());
        // Counted first: a stream woken by the token sees the cut.
        self.cuts.fetch_add(1, Ordering::AcqRel);
        token.cancel();
        *token = CancellationToken::new();
    }

    /// Whether the user's plan throttles rather than blocks.
    pub fn throttles(&self) -> bool {
        self.throttle.load(Ordering::Acquire) != 0
    }

    /// What the user's plan does once exhausted. Set before the decision it
    /// came with, so a throttled user's streams are never cut; a plan that
    /// turns to blocking cuts the streams of a user already exhausted.
    pub(crate) fn set_on_exhausted(&self, on_exhausted: OnExhausted) {
        let rate = on_exhausted.rate().unwrap_or(0);
        let previous = self.throttle.swap(rate, Ordering::AcqRel);
        if previous != 0 && rate == 0 && self.reason.load(Ordering::SeqCst) != 0 {
            self.cut_streams();
        }
    }

    /// When `bytes` of a throttled user may be written: this proxy's share of
    /// the plan's rate, shared by all the user's streams here.
    pub fn pace(&self, bytes: usize) -> Option<Instant> {
        let rate = self.throttle.load(Ordering::Acquire);
        let replicas = self
            .leases
            .as_ref()
            .map_or(1, |l| l.replicas.load(Ordering::Acquire).max(1));
        self.throttled.pass(bytes, (rate / replicas).max(1))
    }
}

fn listener_bit(listener: Listener) -> u8 {
    match listener {
        Listener::Egress => 1,
        Listener::Ingress => 2,
    }
}

/// What a stream does with the bytes in hand ([`StreamGuard::pass`]).
#[derive(Debug)]
pub enum Pass {
    Go,
    /// Pass them at the throttle rate ([`StreamGuard::pace`] with `slow`).
    Slow,
    /// Hold them until the token is cancelled (the lease changed), then ask again.
    Wait(CancellationToken),
    Stop,
}

/// What a request, stream or tunnel watches: its user's cuts (counted from
/// when the guard was taken, before the decision is checked, so a block
/// landing in between still reaches it), its user's gate (for bytes past the
/// headroom), and its agent's revocation signal (raised when the credential
/// it was opened with stops being valid).
#[derive(Debug, Clone)]
pub struct StreamGuard {
    cut: Cut,
    revoked: Option<Arc<Signal>>,
    gate: Option<Arc<UserGate>>,
    /// The agent's own bandwidth limit, if it has one.
    bandwidth: Option<Arc<AgentBandwidth>>,
    /// Which way the client's bytes go, from the agent's side.
    from_client: Way,
}

/// What cuts a guard's streams, besides its credential.
#[derive(Debug, Clone)]
enum Cut {
    /// The user's next cut after this count (the guard has the user's gate).
    User(u64),
    Token(CancellationToken),
    /// Nothing: the destination is open whatever the user's decision.
    Never,
}

impl StreamGuard {
    /// Guard for `gate`'s user and, when given, the credential `revoked` belongs
    /// to. Check it with [`StreamGuard::check`] afterwards.
    pub fn new(gate: &Arc<UserGate>, revoked: Option<Arc<Signal>>) -> Self {
        Self {
            cut: Cut::User(gate.cuts()),
            revoked,
            gate: Some(gate.clone()),
            bandwidth: None,
            from_client: Way::FromAgent,
        }
    }

    /// Also hold the bytes to the agent's own bandwidth limit, for streams of
    /// `listener` (egress clients are agents; ingress clients reach one).
    pub fn with_bandwidth(
        mut self,
        bandwidth: Option<Arc<AgentBandwidth>>,
        listener: Listener,
    ) -> Self {
        self.bandwidth = bandwidth;
        self.from_client = match listener {
            Listener::Egress => Way::FromAgent,
            Listener::Ingress => Way::ToAgent,
        };
        self
    }

    /// The way bytes go, from the agent's side, when they come `from_client`
    /// or go to it.
    pub fn way(&self, from_client: bool) -> Way {
        match (from_client, self.from_client) {
            (true, way) => way,
            (false, Way::FromAgent) => Way::ToAgent,
            (false, Way::ToAgent) => Way::FromAgent,
        }
    }

    /// A guard for a destination the user's plan keeps open whatever the
    /// decision: it watches the credential and the agent's bandwidth limit, not
    /// the user's limits.
    pub fn open(&self) -> Self {
        Self {
            cut: Cut::Never,
            revoked: self.revoked.clone(),
            gate: None,
            bandwidth: self.bandwidth.clone(),
            from_client: self.from_client,
        }
    }

    /// A guard that only watches `cut`.
    pub fn from_token(cut: CancellationToken) -> Self {
        Self {
            cut: Cut::Token(cut),
            revoked: None,
            gate: None,
            bandwidth: None,
            from_client: Way::FromAgent,
        }
    }

    /// `Err` if the user is blocked now (by decision or by unflushed bytes).
    #[inline]
    pub fn check(&self) -> Result<(), Blocked> {
        self.gate.as_ref().map_or(Ok(()), |g| g.check())
    }

    /// What to do with the bytes in hand: pass them on, hold them until a
    /// grant arrives, or stop (a block, a revocation, the headroom spent).
    #[inline]
    pub fn pass(&self) -> Pass {
        if self.stopped_now() {
            return Pass::Stop;
        }
        match self.gate.as_ref().map(|g| g.verdict()) {
            None | Some(Verdict::Go) => Pass::Go,
            Some(Verdict::Slow(_)) => Pass::Slow,
            Some(Verdict::Wait { news }) => Pass::Wait(news),
            Some(Verdict::Stop(_)) => Pass::Stop,
        }
    }

    /// When `bytes` going `way` may be written: once paid for at the agent's
    /// bandwidth limit and, when `slow` (the pass said so), at the user's
    /// throttle rate. `None`: now.
    #[inline]
    pub fn pace(&self, way: Way, bytes: usize, slow: bool) -> Option<Instant> {
        let agent = self.bandwidth.as_ref().and_then(|b| b.pass(way, bytes));
        let user = match (slow, &self.gate) {
            (true, Some(gate)) => gate.pace(bytes),
            _ => None,
        };
        agent.max(user)
    }

    /// Admit a new request (see [`UserGate::admit`]).
    pub async fn admit(&self, listener: Listener) -> Result<(), Blocked> {
        match &self.gate {
            Some(gate) => gate.admit(listener).await,
            None => Ok(()),
        }
    }

    /// Whether a block decision or a revocation has stopped this guard's
    /// streams (what [`StreamGuard::stopped`] waits for), without waiting.
    #[inline]
    pub fn stopped_now(&self) -> bool {
        let cut = match (&self.cut, &self.gate) {
            (Cut::User(seen), Some(gate)) => gate.cuts() != *seen,
            (Cut::Token(cut), _) => cut.is_cancelled(),
            (Cut::User(_), None) | (Cut::Never, _) => false,
        };
        cut || self.revoked()
    }

    /// Whether the credential this guard was opened with has been revoked.
    #[inline]
    pub fn revoked(&self) -> bool {
        self.revoked.as_ref().is_some_and(|r| r.is_raised())
    }

    /// Resolves when the stream must stop: at once on a block decision or a
    /// revocation; within `every` when unflushed bytes pass the headroom.
    pub async fn tripped(&self, every: Duration) {
        let headroom = async {
            loop {
                tokio::time::sleep(every).await;
                if self.check().is_err() {
                    return;
                }
            }
        };
        tokio::select! {
            _ = self.stopped() => {}
            _ = headroom => {}
        }
    }

    /// Resolves on a block decision or a revocation (not on headroom, which is
    /// checked per chunk).
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        // `None`: cut already. A token to wait on otherwise, and none when
        // only the credential can stop the streams.
        let cut = match (&self.cut, &self.gate) {
            (Cut::User(seen), Some(gate)) => gate.cut_after(*seen).map(Some),
            (Cut::Token(cut), _) => Some(Some(cut.clone())),
            (Cut::User(_), None) | (Cut::Never, _) => Some(None),
        };
        let revoked = self.revoked.clone();
        async move {
            let Some(cut) = cut else { return };
            let cut = async {
                match cut {
                    Some(cut) => cut.cancelled().await,
                    None => std::future::pending().await,
                }
            };
            match revoked {
                Some(revoked) => tokio::select! {
                    _ = cut => {}
                    _ = revoked.raised() => {}
                },
                None => cut.await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unflushed_bytes_past_the_headroom_block_before_the_next_decision() {
        let meter = crate::meter::Meter::new();
        let gate = UserGate::new(Uuid::new_v4(), None);
        let (a, b) = (
            meter.counter(Uuid::new_v4(), gate.user_id),
            meter.counter(Uuid::new_v4(), gate.user_id),
        );
        gate.track(&a);
        gate.track(&b);
        gate.track(&a);
        a.add_rx(10_000);
        assert!(
            gate.check().is_ok(),
            "no headroom known: only decisions apply"
        );
        gate.set_headroom(Some((10_100, BlockReason::BudgetExhausted)));
        b.add_tx(100);
        assert!(
            gate.check().is_ok(),
            "exactly at the headroom is still allowed"
        );
        b.add_tx(1);
        assert_eq!(
            gate.check().unwrap_err().reason,
            BlockReason::BudgetExhausted
        );
        // A flush drains the counters and a fresh evaluation resets the headroom.
        meter.drain();
        gate.set_headroom(Some((5, BlockReason::Bandwidth)));
        assert!(gate.check().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_grant_that_does_not_come_leaves_the_user_to_the_last_decision() {
        let (asks, mut asked) = mpsc::unbounded_channel();
        let wait = Duration::from_millis(500);
        let replicas = Arc::new(AtomicU64::new(1));
        let gate = UserGate::new(
            Uuid::new_v4(),
            Some(LeaseAsks {
                asks,
                wait,
                replicas,
            }),
        );
        let meter = crate::meter::Meter::new();
        let counter = meter.counter(Uuid::new_v4(), gate.user_id);
        gate.track(&counter);
        counter.add_tx(1_000);
        let started = Instant::now();
        assert_eq!(gate.admit(Listener::Egress).await, Ok(()));
        assert_eq!(started.elapsed(), wait, "it waited for the grant first");
        assert_eq!(
            asked.try_recv().ok(),
            Some(gate.user_id),
            "a grant was asked for"
        );
        assert_eq!(gate.lease(), UNLEASED, "the last decision applies alone");
        // The last decision's headroom still holds meanwhile.
        gate.set_headroom(Some((500, BlockReason::Bandwidth)));
        assert!(gate.admit(Listener::Egress).await.is_err());
        // The next renewal leases again, from nothing.
        gate.lease_again();
        assert_eq!(gate.lease(), 0);
        assert!(
            gate.take_lease_lost(),
            "the next grant replaces the old row"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttling_plan_slows_an_exhausted_user_instead_of_cutting_them() {
        let (asks, _asked) = mpsc::unbounded_channel();
        let replicas = Arc::new(AtomicU64::new(2));
        let gate = Arc::new(UserGate::new(
            Uuid::new_v4(),
            Some(LeaseAsks {
                asks,
                wait: Duration::from_millis(10),
                replicas: replicas.clone(),
            }),
        ));
        gate.reset_lease(UNLEASED);
        let period = Period::current();
        let guard = StreamGuard::new(&gate, None);
        gate.set_on_exhausted(OnExhausted::Throttle {
            bytes_per_second: 2000,
        });
        gate.set(Some(BlockReason::BudgetExhausted), period);
        assert!(!guard.stopped_now(), "a throttled user's streams go on");
        assert_eq!(gate.admit(Listener::Ingress).await, Ok(()));
        assert!(matches!(guard.pass(), Pass::Slow));
        // Two live proxies: this one passes 1000 B/s of the user's 2000.
        let now = Instant::now();
        assert_eq!(
            guard.pace(Way::ToAgent, 500, true),
            Some(now + Duration::from_millis(500))
        );
        assert_eq!(
            guard.pace(Way::ToAgent, 500, false),
            None,
            "not slow, not paced"
        );
        // The plan turns to blocking: the exhausted user's streams are cut.
        gate.set_on_exhausted(OnExhausted::Block);
        assert!(guard.stopped_now());
        assert!(matches!(guard.pass(), Pass::Stop));
        assert!(gate.admit(Listener::Ingress).await.is_err());
        // Past the headroom on a throttling plan is slow too, not stopped.
        gate.set(None, period);
        gate.set_on_exhausted(OnExhausted::Throttle {
            bytes_per_second: 2000,
        });
        let meter = crate::meter::Meter::new();
        let counter = meter.counter(Uuid::new_v4(), gate.user_id);
        gate.track(&counter);
        gate.set_headroom(Some((10, BlockReason::Bandwidth)));
        counter.add_rx(11);
        assert!(matches!(gate.verdict(), Verdict::Slow(_)));
        assert!(gate.check().is_ok());
    }

    #[test]
    fn reason_codes_round_trip() {
        assert_eq!(reason_of(reason_code(None)), None);
        for r in BlockReason::ALL {
            assert_eq!(reason_of(reason_code(Some(r))), Some(r));
        }
    }

    /// Whether `stopped` has resolved, polled once.
    fn resolved(stopped: &mut std::pin::Pin<Box<impl Future<Output = ()>>>) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        stopped.as_mut().poll(&mut cx).is_ready()
    }

    #[test]
    fn blocking_stops_guards_taken_before_and_not_after() {
        let gate = Arc::new(UserGate::new(Uuid::new_v4(), None));
        let period = Period::current();
        let before = StreamGuard::new(&gate, None);
        // One waits from before the cut, one starts waiting only after it.
        let mut waiting = Box::pin(before.stopped());
        assert!(!resolved(&mut waiting));
        assert!(gate.check().is_ok());
        gate.set(Some(BlockReason::Bandwidth), period);
        assert!(before.stopped_now());
        assert!(resolved(&mut waiting));
        assert!(resolved(&mut Box::pin(before.stopped())));
        assert_eq!(
            gate.check(),
            Err(Blocked {
                reason: BlockReason::Bandwidth,
                period
            })
        );
        // Still blocked with another reason: no second cut needed, state updates.
        let during = StreamGuard::new(&gate, None);
        let mut during_waits = Box::pin(during.stopped());
        gate.set(Some(BlockReason::BudgetExhausted), period);
        assert!(!during.stopped_now());
        assert!(!resolved(&mut during_waits));
        gate.set(None, period);
        assert!(gate.check().is_ok());
        let after = StreamGuard::new(&gate, None);
        assert!(!after.stopped_now());
        let mut after_waits = Box::pin(after.stopped());
        assert!(!resolved(&mut after_waits));
        // The next block reaches both.
        gate.set(Some(BlockReason::Bandwidth), period);
        assert!(during.stopped_now() && after.stopped_now());
        assert!(resolved(&mut during_waits) && resolved(&mut after_waits));
    }

    #[test]
    fn a_guard_stops_on_its_credential_alone_when_the_destination_is_open() {
        let gate = Arc::new(UserGate::new(Uuid::new_v4(), None));
        let revoked = Arc::new(Signal::new());
        let open = StreamGuard::new(&gate, Some(revoked.clone())).open();
        let mut waiting = Box::pin(open.stopped());
        gate.set(Some(BlockReason::Bandwidth), Period::current());
        assert!(!open.stopped_now(), "a block leaves an open destination be");
        assert!(!resolved(&mut waiting));
        revoked.raise();
        assert!(open.stopped_now() && open.revoked());
        assert!(resolved(&mut waiting));
    }
}
