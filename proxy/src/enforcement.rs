//! The enforcer's worker (SPEC §4.4): it keeps each user's [`UserGate`] (the
//! hot-path side, in `gate`) current, from the database.
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

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use tollgate_core::billing::{self, BlockReason, Decision, Figures, OnExhausted, Period};
use tollgate_core::clock::Clock;
use tollgate_core::db::changes::BillingChange;
use tollgate_core::db::{decisions, usage};

use crate::gate::{UserGate, UNLEASED};
use crate::health::Health;
use crate::leases::{Leases, Settled};
use crate::meter::InTransit;
use crate::telemetry;

/// Something that may change decisions, handled in order by [`Enforcer::run`].
#[derive(Debug)]
pub enum Event {
    /// A flush wrote usage.
    Flushed(Flushed),
    /// A plan, its rates or a budget changed.
    BillingChanged(BillingChange),
    /// Someone published a decision for `user` in `period`.
    Published { user: Uuid, period: Period },
    /// Notifications may have been missed: re-evaluate everyone known.
    CatchUp,
}

pub type Events = mpsc::UnboundedReceiver<Event>;

impl Event {
    /// What the event is about, for a log line (a flush's counters are not
    /// worth a line each).
    fn about(&self) -> String {
        match self {
            Event::Flushed(f) => format!("usage of {} users flushed", f.users.len()),
            other => format!("{other:?}"),
        }
    }
}

/// A flush that started at `started` wrote usage of `users`. Its bytes stop
/// counting as unsettled once its users have been decided on again from the
/// database that now holds them.
#[derive(Debug)]
pub struct Flushed {
    pub users: Vec<Uuid>,
    pub started: Instant,
    pub in_transit: InTransit,
    /// The batch's bytes, to come off this proxy's leases.
    pub leases: Settled,
}

/// Most users decided on in one read when queued flushes are taken together
/// (a read per 10,000, as when everyone is re-evaluated).
const USERS_PER_READ: usize = 10_000;

/// Flushes queued one behind the other, decided on in one read: the database
/// holds all their bytes by the time it is read. A worker that falls behind
/// (a slow database, a burst of flushes) then catches up in one read instead
/// of one per flush, and a published decision queued behind them waits for
/// that read only.
#[derive(Debug)]
struct Flushes {
    /// Sorted, each once.
    users: Vec<Uuid>,
    /// When the earliest of them started.
    started: Instant,
    settling: Settling,
}

impl Flushes {
    /// `first` and the flushes queued right behind it, up to
    /// [`USERS_PER_READ`] users, and the event that came after them, if one
    /// was taken off the queue.
    fn take(first: Flushed, events: &mut Events) -> (Flushes, Option<Event>) {
        let mut flushes = Flushes {
            users: Vec::new(),
            started: first.started,
            settling: Settling::default(),
        };
        flushes.add(first);
        let mut after = None;
        while flushes.users.len() < USERS_PER_READ {
            match events.try_recv() {
                Ok(Event::Flushed(next)) => flushes.add(next),
                Ok(other) => {
                    after = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        flushes.users.sort_unstable();
        flushes.users.dedup();
        (flushes, after)
    }

    fn add(&mut self, flushed: Flushed) {
        self.users.extend(flushed.users);
        self.started = self.started.min(flushed.started);
        self.settling.0.push((flushed.in_transit, flushed.leases));
    }
}

/// Bytes the database now holds, still counted as unsettled until
/// [`Settling::apply`]: first off the leases, then out of transit, so a lease
/// never looks larger than it is.
#[derive(Debug, Default)]
struct Settling(Vec<(InTransit, Settled)>);

impl Settling {
    fn apply(self) {
        let (in_transit, leases): (Vec<InTransit>, Vec<Settled>) = self.0.into_iter().unzip();
        leases.into_iter().for_each(Settled::apply);
        drop(in_transit);
    }
}

/// What this proxy last published for a user.
#[derive(Debug, Clone, Copy)]
struct Published {
    blocked: Option<BlockReason>,
    on_exhausted: OnExhausted,
    at: Instant,
    /// How far into their bandwidth limit or budget the figures were.
    percent: u64,
}

impl Published {
    fn of(decision: &Decision) -> Self {
        Published {
            blocked: decision.blocked,
            on_exhausted: decision.on_exhausted,
            at: Instant::now(),
            percent: percent_used(&decision.figures),
        }
    }

    /// Whether `decision` is worth publishing over this one: its outcome
    /// differs, it went a percentage point further into a limit (threshold
    /// notifications are fired by what is published), or this one is stale.
    fn superseded_by(&self, decision: &Decision, refresh: Duration) -> bool {
        self.blocked != decision.blocked
            || self.on_exhausted != decision.on_exhausted
            || percent_used(&decision.figures) > self.percent
            || self.at.elapsed() >= refresh
    }
}

/// The larger of the bandwidth used and the overage budget spent, in whole
/// percent: the axes a proxy's flushes move.
fn percent_used(figures: &Figures) -> u64 {
    let percent = |used: i64, limit: i64| match limit {
        l if l > 0 => (used.max(0) as u128 * 100 / l as u128).min(u64::MAX as u128) as u64,
        _ => 0,
    };
    let bandwidth = figures.limits.as_ref().map_or(0, |l| {
        percent(figures.usage.bandwidth_bytes, l.max_bandwidth_bytes)
    });
    bandwidth.max(percent(figures.overage_cost_cents, figures.budget_cents))
}

/// Every user gate of this proxy.
#[derive(Debug)]
pub struct Enforcer {
    gates: DashMap<Uuid, Arc<UserGate>>,
    /// What this proxy last published per user, and when.
    published: DashMap<Uuid, Published>,
    events: mpsc::UnboundedSender<Event>,
    pool: PgPool,
    health: Arc<Health>,
    /// `decided_by` of decisions this proxy publishes.
    name: String,
    decision_refresh: Duration,
    period: Mutex<Period>,
    clock: Arc<dyn Clock>,
    leases: Arc<Leases>,
}

impl Enforcer {
    /// The enforcer and the receiving end of its event queue, for [`Enforcer::run`].
    pub fn new(
        pool: PgPool,
        health: Arc<Health>,
        name: String,
        decision_refresh: Duration,
        clock: Arc<dyn Clock>,
        leases: Arc<Leases>,
    ) -> (Self, Events) {
        let (events, receiver) = mpsc::unbounded_channel();
        let enforcer = Self {
            gates: DashMap::new(),
            published: DashMap::new(),
            events,
            pool,
            health,
            name,
            decision_refresh,
            period: Mutex::new(clock.period()),
            clock,
            leases,
        };
        (enforcer, receiver)
    }

    /// Queue an event for the worker.
    pub fn send(&self, event: Event) {
        // The receiver lives as long as the proxy; after shutdown events do not matter.
        let _ = self.events.send(event);
    }

    /// The worker: handle events in order (flushes queued one behind the
    /// other together), and every second check for a new month.
    pub async fn run(self: Arc<Self>, mut events: Events, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next = None;
        loop {
            let event = match next.take() {
                Some(event) => event,
                None => tokio::select! {
                    e = events.recv() => match e { Some(e) => e, None => return },
                    _ = tick.tick() => { self.tick().await; continue; }
                    _ = shutdown.cancelled() => return,
                },
            };
            let about = event.about();
            let result = match event {
                Event::Flushed(first) => {
                    let flushes;
                    (flushes, next) = Flushes::take(first, &mut events);
                    let gates = self.known(&flushes.users);
                    self.evaluate_gates(&gates, Some(flushes.started), flushes.settling)
                        .await
                }
                Event::BillingChanged(change) => self.on_billing_change(change).await,
                Event::Published { user, period } => self.on_published(user, period).await,
                Event::CatchUp => self.refresh_all().await,
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, event = %about, "decision update failed; the decision in force stays");
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
        let gate = Arc::new(UserGate::new(user_id, self.leases.asks()));
        if self.leases.initial() == UNLEASED {
            gate.reset_lease(UNLEASED);
        }
        let period = self.clock.period();
        let published = self
            .health
            .observe(
                "loading a user's decision",
                decisions::load(&self.pool, period, Some(&[user_id])),
            )
            .await?;
        match published.first() {
            Some(d) => self.apply_published(&gate, d),
            None => {
                self.evaluate_gates(std::slice::from_ref(&gate), None, Default::default())
                    .await?
            }
        }
        Ok(self.gates.entry(user_id).or_insert(gate).clone())
    }

    /// Apply a decision someone published, with the headroom its figures leave.
    fn apply_published(&self, gate: &UserGate, d: &decisions::PublishedDecision) {
        self.apply(gate, d.blocked, d.on_exhausted, d.period);
        let figures = serde_json::from_value::<Figures>(d.figures.clone()).ok();
        let headroom = figures
            .as_ref()
            .and_then(|f| billing::bandwidth_headroom(f.limits.as_ref(), &f.usage, f.budget_cents));
        gate.set_headroom(headroom);
        // A published decision counts as ours for refresh purposes.
        self.published.insert(
            gate.user_id(),
            Published {
                blocked: d.blocked,
                on_exhausted: d.on_exhausted,
                at: Instant::now(),
                percent: figures.as_ref().map_or(0, percent_used),
            },
        );
    }

    /// Set a decision on a gate, cutting streams if it newly blocks (a plan
    /// that throttles slows them instead); `true` if the user was newly
    /// blocked or throttled.
    fn apply(
        &self,
        gate: &UserGate,
        reason: Option<BlockReason>,
        on_exhausted: OnExhausted,
        period: Period,
    ) -> bool {
        gate.set_on_exhausted(on_exhausted);
        let previous = gate.set(reason, period);
        match (previous, reason) {
            (None, Some(r)) => {
                match on_exhausted {
                    OnExhausted::Block => {
                        tracing::info!(user_id = %gate.user_id(), reason = %r, %period, "user blocked")
                    }
                    OnExhausted::Throttle { bytes_per_second } => {
                        tracing::info!(user_id = %gate.user_id(), reason = %r, %period, bytes_per_second, "user throttled")
                    }
                }
                true
            }
            (Some(_), None) => {
                tracing::info!(user_id = %gate.user_id(), %period, "user unblocked");
                false
            }
            _ => false,
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
        self.evaluate_gates(&self.known(users), since, Default::default())
            .await
    }

    /// The gates of `users` that exist here.
    fn known(&self, users: &[Uuid]) -> Vec<Arc<UserGate>> {
        users
            .iter()
            .filter_map(|u| self.gates.get(u).map(|g| g.clone()))
            .collect()
    }

    /// This proxy's headroom leases.
    pub fn leases(&self) -> &Arc<Leases> {
        &self.leases
    }

    /// The gate of `user` if this proxy has one.
    pub fn known_gate(&self, user: Uuid) -> Option<Arc<UserGate>> {
        self.gates.get(&user).map(|g| g.clone())
    }

    /// Run `f` on every gate of this proxy.
    pub fn for_each_gate(&self, mut f: impl FnMut(&UserGate)) {
        for gate in self.gates.iter() {
            f(gate.value());
        }
    }

    /// Evaluate and apply; `settling` (bytes the database now holds) stops
    /// counting as unsettled once the new headroom is in force, and not before.
    async fn evaluate_gates(
        &self,
        gates: &[Arc<UserGate>],
        since: Option<Instant>,
        settling: Settling,
    ) -> Result<(), sqlx::Error> {
        if gates.is_empty() {
            return Ok(());
        }
        let period = self.clock.period();
        let users: Vec<Uuid> = gates.iter().map(|g| g.user_id()).collect();
        let billing = self
            .health
            .observe(
                "evaluating decisions",
                usage::user_billing(&self.pool, &users, period),
            )
            .await?;
        // Publish as of this read, so an older evaluation published later (by
        // anyone) never overwrites it.
        let read_at = billing.first().map(|b| b.read_at);
        let mut to_publish: Vec<(Uuid, Decision)> = Vec::new();
        for b in billing {
            let decision = b.decide();
            let Some(gate) = gates.iter().find(|g| g.user_id() == b.user_id) else {
                continue;
            };
            let listeners = gate.listeners();
            let blocks_now = self.apply(gate, decision.blocked, decision.on_exhausted, period);
            if let (true, Some(listeners)) = (blocks_now, listeners) {
                if let Some(over) =
                    billing::bandwidth_overshoot(b.limits.as_ref(), &b.usage, b.budget_cents)
                {
                    telemetry::overshoot(listeners, over);
                }
            }
            gate.set_headroom(billing::bandwidth_headroom(
                b.limits.as_ref(),
                &b.usage,
                b.budget_cents,
            ));
            let due = match self.published.get(&b.user_id).map(|p| *p) {
                Some(published) => published.superseded_by(&decision, self.decision_refresh),
                None => true,
            };
            if due {
                self.published.insert(b.user_id, Published::of(&decision));
                to_publish.push((b.user_id, decision));
            }
        }
        settling.apply();
        if let Some(since) = since {
            metrics::histogram!(telemetry::DECISION_LATENCY).record(since.elapsed().as_secs_f64());
        }
        if let (false, Some(read_at)) = (to_publish.is_empty(), read_at) {
            self.health
                .observe(
                    "publishing decisions",
                    decisions::publish_as_of(&self.pool, period, &to_publish, &self.name, read_at),
                )
                .await?;
            metrics::counter!(telemetry::DECISIONS_PUBLISHED).increment(to_publish.len() as u64);
        }
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
        let loaded = self
            .health
            .observe(
                "loading a published decision",
                decisions::load(&self.pool, period, Some(&[user_id])),
            )
            .await?;
        if let Some(d) = loaded.first() {
            self.apply_published(&gate, d);
        }
        Ok(())
    }

    /// A plan or budget changed: re-evaluate the affected users known here.
    pub async fn on_billing_change(&self, change: BillingChange) -> Result<(), sqlx::Error> {
        let users = self
            .health
            .observe("reading a plan's users", change.users(&self.pool))
            .await?;
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
    use crate::meter::{Meter, VpsCounter};

    /// A flush of `bytes` by a new VPS of `user`, drained from `meter`, and
    /// that VPS's counter.
    fn flushed(
        meter: &Meter,
        user: Uuid,
        bytes: u64,
        started: Instant,
    ) -> (Flushed, Arc<VpsCounter>) {
        let counter = meter.counter(Uuid::new_v4(), user);
        counter.add_tx(bytes);
        let (_, in_transit) = meter.drain_in_transit();
        let flushed = Flushed {
            users: vec![user],
            started,
            in_transit,
            leases: Settled::default(),
        };
        (flushed, counter)
    }

    #[tokio::test(start_paused = true)]
    async fn flushes_queued_one_behind_the_other_are_decided_on_together() {
        let meter = Meter::new();
        let (tx, mut events) = mpsc::unbounded_channel();
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let earliest = Instant::now();
        tokio::time::advance(Duration::from_millis(100)).await;
        let (first, one) = flushed(&meter, a, 10, Instant::now());
        let (second, two) = flushed(&meter, b, 20, earliest);
        let (third, three) = flushed(&meter, a, 30, Instant::now());
        tx.send(Event::Flushed(second)).unwrap();
        tx.send(Event::Flushed(third)).unwrap();
        tx.send(Event::CatchUp).unwrap();
        tx.send(Event::Flushed(flushed(&meter, c, 40, Instant::now()).0))
            .unwrap();

        let (flushes, after) = Flushes::take(first, &mut events);
        let mut users = vec![a, b];
        users.sort_unstable();
        assert_eq!(flushes.users, users, "each user once");
        assert_eq!(
            flushes.started, earliest,
            "latency counts from the earliest"
        );
        assert!(matches!(after, Some(Event::CatchUp)), "{after:?}");
        assert!(
            matches!(events.try_recv(), Ok(Event::Flushed(f)) if f.users == [c]),
            "the flush after another event waits its turn"
        );

        let unsettled = || (one.unsettled(), two.unsettled(), three.unsettled());
        assert_eq!(unsettled(), (10, 20, 30), "in transit until settled");
        flushes.settling.apply();
        assert_eq!(unsettled(), (0, 0, 0), "every flush taken settles");
    }
}
