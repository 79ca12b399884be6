//! Enforcement (SPEC §4.4): the decision in force for each user this proxy has
//! seen, checked in memory on every request, and the means to cut a user's open
//! tunnels, WebSockets and streams the moment they become blocked.
//!
//! Decisions arrive three ways, all through [`Enforcer::apply`]:
//! - this proxy evaluates the users it just flushed (bandwidth does not wait for
//!   the monitor) and publishes what changed;
//! - plan and budget changes (NOTIFY `tollgate_billing`) re-evaluate at once;
//! - decisions published by the monitor or other proxies (NOTIFY
//!   `tollgate_decision`) are loaded and applied.
//!
//! Every evaluator runs the same `tollgate_core::billing` rules on the same
//! database figures, so they agree. All changes after a gate's creation go
//! through one worker task, in order, so an older read never overwrites a newer
//! decision.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use tollgate_core::billing::{self, BlockReason, Decision, Figures, Period};
use tollgate_core::clock::Clock;
use tollgate_core::db::{decisions, usage};

use crate::health::Health;
use crate::meter::VpsCounter;
use crate::telemetry;

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
    cut: Mutex<CancellationToken>,
    published: Mutex<Option<(Option<BlockReason>, Instant)>>,
    /// Bandwidth bytes left before the decision flips, as of the last evaluation.
    headroom: AtomicU64,
    /// The reason the decision will flip with, once the headroom is used up.
    headroom_reason: AtomicU8,
    /// Counters of the user's VPSes that this proxy meters.
    counters: RwLock<Vec<Arc<VpsCounter>>>,
}

impl UserGate {
    fn new(user_id: Uuid) -> Self {
        Self {
            user_id,
            reason: AtomicU8::new(0),
            period_day: AtomicI64::new(0),
            cut: Mutex::new(CancellationToken::new()),
            published: Mutex::new(None),
            headroom: AtomicU64::new(NO_HEADROOM),
            headroom_reason: AtomicU8::new(0),
            counters: RwLock::new(Vec::new()),
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
            self.counters
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .push(counter.clone());
        }
    }

    fn set_headroom(&self, headroom: Option<(u64, BlockReason)>) {
        match headroom {
            Some((bytes, reason)) => {
                self.headroom_reason
                    .store(reason_code(Some(reason)), Ordering::Release);
                self.headroom.store(bytes, Ordering::Release);
            }
            None => self.headroom.store(NO_HEADROOM, Ordering::Release),
        }
    }

    /// Bytes counted for this user here and not yet written.
    fn unflushed(&self) -> u64 {
        self.counters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|c| c.pending())
            .sum()
    }

    pub fn user_id(&self) -> Uuid {
        self.user_id
    }

    /// `Err` if the user is blocked. Take [`UserGate::cut_token`] *before* calling
    /// this, so a block landing in between still reaches the stream.
    #[inline]
    pub fn check(&self) -> Result<(), Blocked> {
        if let Some(reason) = reason_of(self.reason.load(Ordering::SeqCst)) {
            return Err(Blocked {
                reason,
                period: self.period(),
            });
        }
        let headroom = self.headroom.load(Ordering::Acquire);
        if headroom != NO_HEADROOM && self.unflushed() > headroom {
            let reason = reason_of(self.headroom_reason.load(Ordering::Acquire))
                .unwrap_or(BlockReason::Bandwidth);
            return Err(Blocked {
                reason,
                period: self.period(),
            });
        }
        Ok(())
    }

    /// A token cancelled when this user next becomes blocked.
    pub fn cut_token(&self) -> CancellationToken {
        self.cut.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn period(&self) -> Period {
        let day = self.period_day.load(Ordering::Acquire);
        chrono::NaiveDate::from_num_days_from_ce_opt(day as i32)
            .and_then(Period::starting)
            .unwrap_or_else(Period::current)
    }

    /// Set the decision; returns the previous reason.
    fn set(&self, reason: Option<BlockReason>, period: Period) -> Option<BlockReason> {
        use chrono::Datelike;
        self.period_day.store(
            i64::from(period.start().num_days_from_ce()),
            Ordering::Release,
        );
        let previous = reason_of(self.reason.swap(reason_code(reason), Ordering::SeqCst));
        if reason.is_some() && previous.is_none() {
            let mut token = self.cut.lock().unwrap_or_else(|p| p.into_inner());
            token.cancel();
            *token = CancellationToken::new();
        }
        previous
    }
}

/// What a request, stream or tunnel of a user watches: the user's cut token
/// (taken before the decision is checked, so a block landing in between still
/// reaches it) and gate (for bytes past the headroom).
#[derive(Debug, Clone)]
pub struct StreamGuard {
    cut: CancellationToken,
    gate: Option<Arc<UserGate>>,
}

impl StreamGuard {
    /// Guard for `gate`'s user. Check it with [`StreamGuard::check`] afterwards.
    pub fn new(gate: &Arc<UserGate>) -> Self {
        Self {
            cut: gate.cut_token(),
            gate: Some(gate.clone()),
        }
    }

    /// A guard that only watches `cut`.
    pub fn from_token(cut: CancellationToken) -> Self {
        Self { cut, gate: None }
    }

    /// `Err` if the user is blocked now (by decision or by unflushed bytes).
    #[inline]
    pub fn check(&self) -> Result<(), Blocked> {
        self.gate.as_ref().map_or(Ok(()), |g| g.check())
    }

    /// Whether the stream must stop now.
    #[inline]
    pub fn tripped_now(&self) -> bool {
        self.cut.is_cancelled() || self.check().is_err()
    }

    /// Resolves when the stream must stop: at once on a block decision; within
    /// `every` when unflushed bytes pass the headroom.
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
            _ = self.cut.cancelled() => {}
            _ = headroom => {}
        }
    }

    /// The token cancelled by a block decision.
    pub fn cut(&self) -> &CancellationToken {
        &self.cut
    }
}

/// Something that may change decisions, handled in order by [`Enforcer::run`].
#[derive(Debug)]
pub enum Event {
    /// A flush that started at `started` wrote usage of `users`.
    Flushed { users: Vec<Uuid>, started: Instant },
    /// A plan or budget changed: NOTIFY payload `user:<id>` or `plan:<id>`.
    BillingChanged(String),
    /// Someone published a decision for `user` in `period`.
    Published { user: Uuid, period: Period },
    /// Notifications may have been missed: re-evaluate everyone known.
    CatchUp,
}

pub type Events = mpsc::UnboundedReceiver<Event>;

/// Every user gate of this proxy.
#[derive(Debug)]
pub struct Enforcer {
    gates: DashMap<Uuid, Arc<UserGate>>,
    events: mpsc::UnboundedSender<Event>,
    pool: PgPool,
    health: Arc<Health>,
    /// `decided_by` of decisions this proxy publishes.
    name: String,
    decision_refresh: Duration,
    period: Mutex<Period>,
    clock: Arc<dyn Clock>,
}

impl Enforcer {
    /// The enforcer and the receiving end of its event queue, for [`Enforcer::run`].
    pub fn new(
        pool: PgPool,
        health: Arc<Health>,
        name: String,
        decision_refresh: Duration,
        clock: Arc<dyn Clock>,
    ) -> (Self, Events) {
        let (events, receiver) = mpsc::unbounded_channel();
        let enforcer = Self {
            gates: DashMap::new(),
            events,
            pool,
            health,
            name,
            decision_refresh,
            period: Mutex::new(clock.period()),
            clock,
        };
        (enforcer, receiver)
    }

    /// Queue an event for the worker.
    pub fn send(&self, event: Event) {
        // The receiver lives as long as the proxy; after shutdown events do not matter.
        let _ = self.events.send(event);
    }

    /// The worker: handle events in order, and every second check for a new month.
    pub async fn run(self: Arc<Self>, mut events: Events, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let event = tokio::select! {
                e = events.recv() => match e { Some(e) => e, None => return },
                _ = tick.tick() => { self.tick().await; continue; }
                _ = shutdown.cancelled() => return,
            };
            let result = match &event {
                Event::Flushed { users, started } => self.evaluate(users, Some(*started)).await,
                Event::BillingChanged(payload) => self.on_billing_change(payload).await,
                Event::Published { user, period } => self.on_published(*user, *period).await,
                Event::CatchUp => self.refresh_all().await,
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, ?event, "decision update failed; the decision in force stays");
            }
        }
    }

    /// The gate of `user_id`, with its decision loaded (or evaluated and published
    /// if none exists for the current period). A gate is only shared once its
    /// decision is known, so a database error never leaves an open gate behind.
    pub async fn gate(&self, user_id: Uuid) -> Result<Arc<UserGate>, sqlx::Error> {
        if let Some(g) = self.gates.get(&user_id) {
            return Ok(g.clone());
        }
        let gate = Arc::new(UserGate::new(user_id));
        let period = self.clock.period();
        let published = decisions::load(&self.pool, period, Some(&[user_id])).await?;
        match published.first() {
            Some(d) => self.apply_published(&gate, d),
            None => {
                self.evaluate_gates(std::slice::from_ref(&gate), None)
                    .await?
            }
        }
        Ok(self.gates.entry(user_id).or_insert(gate).clone())
    }

    /// Apply a decision someone published, with the headroom its figures leave.
    fn apply_published(&self, gate: &UserGate, d: &decisions::PublishedDecision) {
        self.apply(gate, d.blocked, d.period);
        let headroom = serde_json::from_value::<Figures>(d.figures.clone())
            .ok()
            .and_then(|f| billing::bandwidth_headroom(f.limits.as_ref(), &f.usage, f.budget_cents));
        gate.set_headroom(headroom);
        // A published decision counts as ours for refresh purposes.
        *gate.published.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((d.blocked, Instant::now()));
    }

    /// Set a decision on a gate, cutting streams if it newly blocks.
    fn apply(&self, gate: &UserGate, reason: Option<BlockReason>, period: Period) {
        let previous = gate.set(reason, period);
        match (previous, reason) {
            (None, Some(r)) => {
                tracing::info!(user_id = %gate.user_id, reason = %r, %period, "user blocked")
            }
            (Some(_), None) => tracing::info!(user_id = %gate.user_id, %period, "user unblocked"),
            _ => {}
        }
    }

    /// Evaluate the `users` that have a gate here from the database with the
    /// billing rules, apply, and publish decisions that changed or are due for a
    /// refresh. `since` is when the triggering flush started (decision latency).
    pub async fn evaluate(
        &self,
        users: &[Uuid],
        since: Option<Instant>,
    ) -> Result<(), sqlx::Error> {
        let gates: Vec<Arc<UserGate>> = users
            .iter()
            .filter_map(|u| self.gates.get(u).map(|g| g.clone()))
            .collect();
        self.evaluate_gates(&gates, since).await
    }

    async fn evaluate_gates(
        &self,
        gates: &[Arc<UserGate>],
        since: Option<Instant>,
    ) -> Result<(), sqlx::Error> {
        if gates.is_empty() {
            return Ok(());
        }
        let period = self.clock.period();
        let users: Vec<Uuid> = gates.iter().map(|g| g.user_id).collect();
        let billing = match usage::user_billing(&self.pool, &users, period).await {
            Ok(b) => b,
            Err(e) => {
                self.health.db_failed("evaluating decisions", &e);
                return Err(e);
            }
        };
        let mut to_publish: Vec<(Uuid, Decision)> = Vec::new();
        for b in billing {
            let decision = b.decide();
            let Some(gate) = gates.iter().find(|g| g.user_id == b.user_id) else {
                continue;
            };
            self.apply(gate, decision.blocked, period);
            gate.set_headroom(billing::bandwidth_headroom(
                b.limits.as_ref(),
                &b.usage,
                b.budget_cents,
            ));
            let mut published = gate.published.lock().unwrap_or_else(|p| p.into_inner());
            let due = match *published {
                Some((reason, at)) => {
                    reason != decision.blocked || at.elapsed() >= self.decision_refresh
                }
                None => true,
            };
            if due {
                *published = Some((decision.blocked, Instant::now()));
                to_publish.push((b.user_id, decision));
            }
        }
        if let Some(since) = since {
            metrics::histogram!(telemetry::DECISION_LATENCY).record(since.elapsed().as_secs_f64());
        }
        if !to_publish.is_empty() {
            decisions::publish(&self.pool, period, &to_publish, &self.name).await?;
            metrics::counter!(telemetry::DECISIONS_PUBLISHED).increment(to_publish.len() as u64);
        }
        self.health.db_ok();
        Ok(())
    }

    /// A decision was published (by anyone): load and apply it if it is for the
    /// current period and a user this proxy knows.
    pub async fn on_published(&self, user_id: Uuid, period: Period) -> Result<(), sqlx::Error> {
        if period != self.clock.period() {
            return Ok(());
        }
        let Some(gate) = self.gates.get(&user_id).map(|g| g.clone()) else {
            return Ok(());
        };
        let loaded = decisions::load(&self.pool, period, Some(&[user_id])).await?;
        if let Some(d) = loaded.first() {
            self.apply_published(&gate, d);
        }
        Ok(())
    }

    /// A plan or budget changed (`user:<id>` or `plan:<id>`): re-evaluate the
    /// affected users known here.
    pub async fn on_billing_change(&self, payload: &str) -> Result<(), sqlx::Error> {
        let users: Vec<Uuid> = match payload.split_once(':') {
            Some(("user", id)) => id.parse().ok().into_iter().collect(),
            Some(("plan", id)) => match id.parse() {
                Ok(plan) => usage::users_on_plan(&self.pool, plan).await?,
                Err(_) => Vec::new(),
            },
            _ => Vec::new(),
        };
        let known: Vec<Uuid> = users
            .into_iter()
            .filter(|u| self.gates.contains_key(u))
            .collect();
        self.evaluate(&known, None).await
    }

    /// Re-read every known user's decision (after missed notifications) and
    /// re-evaluate at a new month.
    pub async fn refresh_all(&self) -> Result<(), sqlx::Error> {
        let users: Vec<Uuid> = self.gates.iter().map(|g| *g.key()).collect();
        for chunk in users.chunks(10_000) {
            self.evaluate(chunk, None).await?;
        }
        Ok(())
    }

    /// Called every second: at a month boundary, re-evaluate everyone (usage
    /// starts over, blocks lift).
    pub async fn tick(&self) {
        metrics::gauge!(telemetry::USERS_BLOCKED).set(self.blocked_users() as f64);
        let now = self.clock.period();
        let changed = {
            let mut period = self.period.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut *period, now) != now
        };
        if changed {
            tracing::info!(period = %now, "new billing period: re-evaluating every known user");
            if let Err(e) = self.refresh_all().await {
                tracing::warn!(error = %e, "re-evaluation at the new period failed; retrying");
                *self.period.lock().unwrap_or_else(|p| p.into_inner()) =
                    Period::containing(now.start_instant() - chrono::Duration::seconds(1));
            }
        }
    }

    /// Users currently blocked here.
    pub fn blocked_users(&self) -> usize {
        self.gates.iter().filter(|g| g.check().is_err()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unflushed_bytes_past_the_headroom_block_before_the_next_decision() {
        let meter = crate::meter::Meter::new();
        let gate = UserGate::new(Uuid::new_v4());
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

    #[test]
    fn reason_codes_round_trip() {
        assert_eq!(reason_of(reason_code(None)), None);
        for r in BlockReason::ALL {
            assert_eq!(reason_of(reason_code(Some(r))), Some(r));
        }
    }

    #[test]
    fn blocking_cancels_tokens_taken_before_and_not_after() {
        let gate = UserGate::new(Uuid::new_v4());
        let period = Period::current();
        let before = gate.cut_token();
        assert!(gate.check().is_ok());
        gate.set(Some(BlockReason::Bandwidth), period);
        assert!(before.is_cancelled());
        assert_eq!(
            gate.check(),
            Err(Blocked {
                reason: BlockReason::Bandwidth,
                period
            })
        );
        // Still blocked with another reason: no second cut needed, state updates.
        let during = gate.cut_token();
        gate.set(Some(BlockReason::BudgetExhausted), period);
        assert!(!during.is_cancelled());
        gate.set(None, period);
        assert!(gate.check().is_ok());
        let after = gate.cut_token();
        assert!(!after.is_cancelled());
    }
}
